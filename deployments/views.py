"""Status and history computed once, as data; every surface (CLI text, Slack, a GitHub
comment) renders these views with the same columns and the same empty-state words."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from planner.render import short_rev, summary
from state.deployments import DeploymentRecord
from state.health import HealthCheck
from state.locks import LockRecord
from state.services import ServiceRecord
from state.store import Store

STATUS_TITLE = "NixMox Service Status"
HISTORY_TITLE = "Recent deployments"
STATUS_HEADERS = ("SERVICE", "REVISION", "HEALTH", "SYSTEM", "DEPLOYMENT", "LOCKED BY")
HISTORY_HEADERS = ("ID", "KIND", "STATE", "TRIGGER", "BY", "REVISION", "STARTED", "TOOK", "STEPS")
NOTHING_DEPLOYED = "No deployment recorded yet."
SERVICE_NOT_DEPLOYED = "No deployment of {service} recorded yet."
NO_HISTORY = "No deployments recorded."
NO_HISTORY_OF = "No deployments recorded for {service}."
NONE = "-"  # an empty cell
UNKNOWN_HEALTH = "unknown"
NO_STEPS = "no steps"
CHECKED_NOW = " (checked now)"
LATEST_CHECK = "{state} ({check}, checked {at})"
CHECK_TIME = "%Y-%m-%d %H:%M UTC"
DEFAULT_HISTORY = 20

Checked = dict[str, tuple[bool, str]]
"""Live health checks just run: service -> (healthy, last output line)."""


def revision_cell(revision: str | None) -> str:
    """A revision as every status surface shows it: short, or `-`."""
    return short_rev(revision) if revision else NONE


def took(record: DeploymentRecord) -> str:
    """How long a finished deployment ran (`12.3s`), or `-`."""
    if record.started_at and record.finished_at:
        return f"{(record.finished_at - record.started_at).total_seconds():.1f}s"
    return NONE


def step_counts(record: DeploymentRecord) -> str:
    """`3 succeeded, 1 failed` (sorted by state), or `no steps`."""
    counts: dict[str, int] = {}
    for step in record.steps:
        counts[step.state.value] = counts.get(step.state.value, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or NO_STEPS


@dataclass(frozen=True)
class DeploymentRow:
    """One deployment, as status and history show it."""

    id: str
    kind: str
    state: str
    trigger: str
    requested_by: str | None
    revision: str
    started: datetime | None
    took: str
    steps: str

    @classmethod
    def of(cls, record: DeploymentRecord) -> DeploymentRow:
        return cls(
            id=record.id,
            kind=record.kind.value,
            state=record.state.value,
            trigger=str(record.trigger),
            requested_by=record.requested_by,
            revision=revision_cell(record.head),
            started=record.started_at or record.created_at,
            took=took(record),
            steps=step_counts(record),
        )


@dataclass(frozen=True)
class LastDeployment:
    """The newest deployment, with its plan's summary and note."""

    row: DeploymentRow
    plan: str
    note: str | None


@dataclass(frozen=True)
class ServiceRow:
    """One service: SERVICE, REVISION, HEALTH, SYSTEM, DEPLOYMENT, LOCKED BY."""

    service: str
    revision: str
    health: str
    system: str
    deployment: str
    locked_by: str  # empty when not locked
    lock_reason: str | None = None

    def cells(self) -> tuple[str, ...]:
        return (
            self.service,
            self.revision,
            self.health,
            self.system,
            self.deployment,
            self.locked_by,
        )


def health_cell(
    record: ServiceRecord | None,
    checked: tuple[bool, str] | None,
    latest: HealthCheck | None = None,
) -> str:
    """The result of a check just run; else the latest health check (`nixmox health`, the
    monitor) with when it ran, unless a deployment's verify is newer; else the recorded health."""
    if checked is not None:
        ok, detail = checked
        return ("healthy" if ok else f"unhealthy: {detail}") + CHECKED_NOW
    verified_at = record.health_at if record is not None else None
    if latest is not None and (verified_at is None or latest.checked_at >= verified_at):
        state = "healthy" if latest.healthy else "unhealthy"
        return LATEST_CHECK.format(
            state=state, check=latest.check, at=latest.checked_at.strftime(CHECK_TIME)
        )
    return record.last_health if record is not None and record.last_health else UNKNOWN_HEALTH


def service_row(
    name: str,
    record: ServiceRecord | None,
    lock: LockRecord | None,
    checked: tuple[bool, str] | None = None,
    latest: HealthCheck | None = None,
) -> ServiceRow:
    return ServiceRow(
        service=name,
        revision=revision_cell(record.revision if record else None),
        health=health_cell(record, checked, latest),
        system=(record.system_path or NONE) if record else NONE,
        deployment=(record.last_deployment_id or NONE) if record else NONE,
        locked_by=lock.holder if lock else "",
        lock_reason=lock.reason if lock else None,
    )


@dataclass(frozen=True)
class StatusView:
    """The NixMox Service Status: the last deployment, then one row per service."""

    last: LastDeployment | None
    rows: list[ServiceRow]
    service: str | None = None  # the one service asked about
    # the records the view was made from (for JSON output)
    last_record: DeploymentRecord | None = None
    services: dict[str, ServiceRecord] = field(default_factory=dict)
    locks: dict[str, LockRecord] = field(default_factory=dict)
    health: dict[str, HealthCheck] = field(default_factory=dict)  # the latest health checks

    @property
    def empty_text(self) -> str | None:
        """What is said instead of the rows (None: there are rows)."""
        if self.rows:
            return None
        if self.service is not None:
            return SERVICE_NOT_DEPLOYED.format(service=self.service)
        return NOTHING_DEPLOYED if self.last is None else None


@dataclass(frozen=True)
class HistoryView:
    """Past deployments and rollbacks, newest first (only those touching `service`)."""

    rows: list[DeploymentRow]
    service: str | None = None
    records: list[DeploymentRecord] = field(default_factory=list)

    @property
    def empty_text(self) -> str | None:
        if self.rows:
            return None
        return NO_HISTORY_OF.format(service=self.service) if self.service else NO_HISTORY

    @property
    def title(self) -> str:
        return f"{HISTORY_TITLE} of {self.service}" if self.service else HISTORY_TITLE


Clock = Callable[[datetime | None], str]
"""How a surface writes a time (local time on a terminal, UTC in a comment)."""


def last_deployment_lines(last: LastDeployment, when: Clock) -> list[str]:
    """`Last deployment: …`, its plan and steps, and its note: plain text, every surface."""
    row = last.row
    by = f" by {row.requested_by}" if row.requested_by else ""
    lines = [
        f"Last deployment: {row.id} {row.kind} {row.state} ({row.trigger}{by}) at "
        f"{when(row.started)}, revision {row.revision}",
        f"plan: {last.plan}; steps: {row.steps}",
    ]
    return [*lines, last.note] if last.note else lines


def history_cells(row: DeploymentRow, when: Clock) -> tuple[str, ...]:
    """A history row's cells, in HISTORY_HEADERS order."""
    return (
        row.id,
        row.kind,
        row.state,
        row.trigger,
        row.requested_by or NONE,
        row.revision,
        when(row.started),
        row.took,
        row.steps,
    )


def last_deployment(record: DeploymentRecord | None) -> LastDeployment | None:
    if record is None:
        return None
    return LastDeployment(DeploymentRow.of(record), summary(record.plan), record.note)


async def status_view(
    store: Store, service: str | None = None, checked: Checked | None = None
) -> StatusView:
    """The status from the store: every service deployed, locked or just checked."""
    checked = checked or {}
    last = await store.deployments.last(finished=False)
    services = await store.services.all()
    locks = {lock.service: lock for lock in await store.locks.all()}
    latest = await store.health.latest()
    names = sorted(set(services) | set(locks) | set(checked))
    if service is not None:
        names = [name for name in names if name == service]
    rows = [
        service_row(n, services.get(n), locks.get(n), checked.get(n), latest.get(n)) for n in names
    ]
    return StatusView(last_deployment(last), rows, service, last, services, locks, latest)


async def history_view(
    store: Store, service: str | None = None, limit: int = DEFAULT_HISTORY
) -> HistoryView:
    """The newest `limit` deployments from the store."""
    records = await store.deployments.history(service, limit=limit)
    return HistoryView([DeploymentRow.of(record) for record in records], service, records)
