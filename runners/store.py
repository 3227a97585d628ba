"""The state store: deployments, steps, services, locks, deliveries, jobs, approvals, audit.

One schema (SQLAlchemy Core, async) for SQLite (`sqlite+aiosqlite:///...`, the default) and
PostgreSQL (`postgresql+asyncpg://...`). The schema is created on first use and versioned in
the `schema_version` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from planner.models import Manifest
from planner.plan import NIX_PHASES, Phase, Plan
from runners._intake import LocalSqlite, PreparedInsert, SqliteBusy
from runners.base import (
    DeploymentFinished,
    DeploymentKind,
    DeploymentStarted,
    DeploymentState,
    Event,
    RollbackFinished,
    RollbackStarted,
    StepFinished,
    StepOutput,
    StepStarted,
    StepState,
    Trigger,
    utcnow,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: approvals.deployment_id
ID_BYTES = 4  # deployment and approval ids: 8 hex characters
MAX_OUTPUT = 256 * 1024  # characters of step output kept (the tail)
LOCK_POLL_INTERVAL = 0.2
ACTIVE_STATES = (DeploymentState.QUEUED, DeploymentState.RUNNING)

STOPPED_WHILE_RUNNING = (
    "stopped while running (attempt {attempt}, started {started}): "
    "the process running the deployment died"
)
ROLLBACK_NOTE = "--- {cause} failed: rolling {service} back ---\n"
NEVER_STARTED = "not started: the deployment was interrupted"
INTERRUPTED_NOTE = "interrupted: the process running it stopped (lease expired {expired}); {where}"


class StoreError(Exception):
    """The database cannot be used (bad URL, newer schema)."""


class LockBusy(Exception):
    """A service is locked by another holder."""

    def __init__(self, service: str, holder: str, reason: str | None = None) -> None:
        self.service, self.holder, self.reason = service, holder, reason
        because = f" ({reason})" if reason else ""
        super().__init__(f"{service} is locked by {holder}{because}")


class LockLost(Exception):
    """A lock the holder should hold is gone or held by someone else (its lease ran out)."""

    def __init__(self, lost: dict[str, str | None]) -> None:
        self.lost = lost  # service -> who holds it now (None: nobody)
        names = ", ".join(f"{s} ({h or 'free'})" for s, h in sorted(lost.items()))
        super().__init__(f"lost the lock(s) on {names}")


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUSED = "refused"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


# --- records ---------------------------------------------------------------------------------


@dataclass
class StepRecord:
    id: str
    phase: str
    service: str | None
    state: StepState
    attempt: int = 0
    output: str = ""
    reason: str | None = None
    previous_system: str | None = None
    new_system: str | None = None
    commands: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    finished_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": str(self.state),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


@dataclass
class DeploymentRecord:
    id: str
    kind: DeploymentKind
    trigger: str
    state: DeploymentState
    plan: Plan
    digest: str
    requested_by: str | None = None
    approved_by: str | None = None
    base: str | None = None
    head: str | None = None
    scope: str | None = None
    holder: str | None = None
    note: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease_until: datetime | None = None
    steps: list[StepRecord] = field(default_factory=list)
    manifest_json: str | None = field(default=None, repr=False)

    @property
    def manifest(self) -> Manifest | None:
        """The manifest the deployment ran with, if it was recorded."""
        return Manifest.model_validate_json(self.manifest_json) if self.manifest_json else None

    @property
    def services(self) -> list[str]:
        return sorted({step.service for step in self.steps if step.service})

    def step(self, step_id: str) -> StepRecord | None:
        return next((step for step in self.steps if step.id == step_id), None)

    def to_json(self) -> dict[str, Any]:
        """The documented `--json` shape of `nixmox deploy` / `nixmox rollback`."""
        return {
            "id": self.id,
            "kind": str(self.kind),
            "state": str(self.state),
            "steps": [step.to_json() for step in self.steps],
        }

    def to_detail(self) -> dict[str, Any]:
        """Everything recorded, for `history --json` and the dashboard."""
        return {
            **self.to_json(),
            "trigger": self.trigger,
            "requested_by": self.requested_by,
            "approved_by": self.approved_by,
            "base": self.base,
            "head": self.head,
            "digest": self.digest,
            "scope": self.scope,
            "note": self.note,
            "services": self.services,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "steps": [
                {
                    **step.to_json(),
                    "phase": step.phase,
                    "service": step.service,
                    "attempt": step.attempt,
                    "reason": step.reason,
                    "previous_system": step.previous_system,
                    "new_system": step.new_system,
                }
                for step in self.steps
            ],
        }


@dataclass
class ServiceRecord:
    name: str
    revision: str | None = None
    system_path: str | None = None
    previous_system: str | None = None
    last_deployment_id: str | None = None
    last_health: str | None = None
    health_at: datetime | None = None
    updated_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "system_path": self.system_path,
            "previous_system": self.previous_system,
            "last_deployment_id": self.last_deployment_id,
            "last_health": self.last_health,
            "health_at": _iso(self.health_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass
class LockRecord:
    service: str
    holder: str
    reason: str | None
    acquired_at: datetime
    expires_at: datetime | None  # None: a manual lock, held until `unlock`

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "holder": self.holder,
            "reason": self.reason,
            "acquired_at": _iso(self.acquired_at),
            "expires_at": _iso(self.expires_at),
        }


@dataclass
class UnlockResult:
    """What `Store.unlock` did: removed a lock, found none, or left a deployment's lease."""

    removed: bool
    # the live lease of a running deployment that was left in place (unlock without force)
    deployment_lock: LockRecord | None = None

    def __bool__(self) -> bool:
        return self.removed


# what identifies a delivery: its id, or its id and other keys (e.g. its body's signature);
# it is a duplicate when any of them was seen before
DeliveryKey = str | tuple[str, ...]
# a delivery and the jobs (kind, payload) it queues: `Store.record_deliveries`
DeliveryJobs = tuple[DeliveryKey, list[tuple[str, dict[str, Any]]]]


@dataclass
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    state: JobState
    attempts: int
    worker: str | None = None
    error: str | None = None
    lease_until: datetime | None = None


@dataclass
class ApprovalRecord:
    id: str
    kind: str
    requested_by: str
    state: ApprovalState
    digest: str
    expires_at: datetime
    service: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    channel: str | None = None
    ts: str | None = None
    resolved_by: str | None = None
    created_at: datetime | None = None
    resolved_at: datetime | None = None
    deployment_id: str | None = None  # set once, when an approved request starts deploying

    @property
    def expired(self) -> bool:
        return self.expires_at <= utcnow()


@dataclass
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- schema ----------------------------------------------------------------------------------


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; stored naive (UTC) on both backends."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


metadata = sa.MetaData()
NAME = sa.String(255)
STATE = sa.String(32)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", STATE, nullable=False),
    sa.Column("trigger", STATE, nullable=False),
    sa.Column("state", STATE, nullable=False),
    sa.Column("requested_by", NAME),
    sa.Column("approved_by", NAME),
    sa.Column("base", NAME),
    sa.Column("head", NAME),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("plan", sa.Text, nullable=False),
    # the manifest the deployment ran with: health checks and rollbacks need it later
    sa.Column("manifest", sa.Text),
    sa.Column("scope", NAME),
    sa.Column("holder", NAME),
    sa.Column("note", sa.Text),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_deployments_created", "created_at"),
    sa.Index("ix_deployments_state", "state"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("deployment_id", sa.String(32), sa.ForeignKey("deployments.id"), primary_key=True),
    sa.Column("step_id", NAME, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("phase", STATE, nullable=False),
    sa.Column("service", NAME),
    sa.Column("state", STATE, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("output", sa.Text, nullable=False, default=""),
    sa.Column("reason", sa.Text),
    sa.Column("previous_system", sa.Text),
    sa.Column("new_system", sa.Text),
    sa.Column("commands", sa.JSON),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_steps_service", "service"),
)

services = sa.Table(
    "services",
    metadata,
    sa.Column("name", NAME, primary_key=True),
    sa.Column("revision", NAME),
    sa.Column("system_path", sa.Text),
    sa.Column("previous_system", sa.Text),
    sa.Column("last_deployment_id", sa.String(32)),
    sa.Column("last_health", STATE),
    sa.Column("health_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime),
)

locks = sa.Table(
    "locks",
    metadata,
    sa.Column("service", NAME, primary_key=True),
    sa.Column("holder", NAME, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", NAME, primary_key=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", NAME, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("state", STATE, nullable=False),
    sa.Column("worker", NAME),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_jobs_state", "state"),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", STATE, nullable=False),
    sa.Column("requested_by", NAME, nullable=False),
    sa.Column("service", NAME),
    sa.Column("args", sa.JSON),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("plan", sa.Text),
    sa.Column("channel", NAME),
    sa.Column("ts", NAME),
    sa.Column("state", STATE, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("resolved_by", NAME),
    sa.Column("resolved_at", UTCDateTime),
    sa.Column("deployment_id", sa.String(32)),  # schema 2
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", NAME, nullable=False),
    sa.Column("action", NAME, nullable=False),
    sa.Column("detail", sa.JSON),
    sa.Index("ix_audit_at", "at"),
)


# --- engine ----------------------------------------------------------------------------------


def normalize_url(url: str) -> URL:
    """Accept `postgres://`, `postgresql://` and `sqlite://` too, with the async drivers."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with its own wording
        raise StoreError(f"invalid database URL {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise StoreError(
        f"unsupported database {backend!r}: use sqlite+aiosqlite:///FILE or "
        "postgresql+asyncpg://USER@HOST/DB"
    )


def _sqlite_file(url: URL) -> Path | None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: URL) -> AsyncEngine:
    """An engine for the URL; SQLite gets a busy timeout, WAL and serialised write transactions."""
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    path = _sqlite_file(url)
    if path is None:
        engine = create_async_engine(url, poolclass=StaticPool)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy emit BEGIN itself (below), so transactions take the write lock up
        # front: a deferred read transaction upgraded to a write can fail with SQLITE_BUSY
        # at once, without waiting, when another process wrote in between
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if path is not None:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _new_id() -> str:
    return secrets.token_hex(ID_BYTES)


def _tail(text: str) -> str:
    return text if len(text) <= MAX_OUTPUT else "…" + text[-MAX_OUTPUT:]


def _plan_json(plan: Plan) -> str:
    return plan.model_dump_json()


def _load_plan(text: str | None) -> Plan:
    return Plan.model_validate_json(text) if text else Plan()


# --- the store -------------------------------------------------------------------------------


class Store:
    """Async access to the state database; every method is one short transaction."""

    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        self.engine = engine
        self.url = url
        # a SQLite file (not `:memory:`, which only the engine's connection sees) gets a
        # synchronous connection for recording deliveries, opened on first use
        self._local_path = _sqlite_file(url) if url.get_backend_name() == "sqlite" else None
        self._local: LocalSqlite | None = None

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect, create the schema on first use and check its version."""
        parsed = normalize_url(url)
        store = cls(make_engine(parsed), parsed)
        try:
            await store._migrate()
        except BaseException:
            await store.engine.dispose()
            raise
        return store

    async def close(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    def describe(self) -> str:
        """The URL without its password, for messages."""
        return self.url.render_as_string(hide_password=True)

    async def _migrate(self) -> None:
        for attempt in range(3):
            try:
                async with self.engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
                break
            except (IntegrityError, ProgrammingError):
                # another process created the same tables at the same moment (PostgreSQL)
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1)
        async with self.engine.connect() as conn:
            found = (await conn.execute(sa.select(sa.func.max(schema_version.c.version)))).scalar()
        if found is None:
            with contextlib.suppress(IntegrityError):
                async with self.engine.begin() as conn:
                    await conn.execute(
                        schema_version.insert().values(version=SCHEMA_VERSION, applied_at=utcnow())
                    )
        elif found < SCHEMA_VERSION:
            await self._upgrade(found)
        elif found > SCHEMA_VERSION:
            raise StoreError(
                f"the database {self.describe()} has schema version {found}, newer than "
                f"this nixmox ({SCHEMA_VERSION}): upgrade nixmox"
            )

    async def _upgrade(self, found: int) -> None:
        """Bring an older schema up to SCHEMA_VERSION (create_all adds no columns)."""
        if found < 2:
            async with self.engine.begin() as conn:
                columns = await conn.run_sync(
                    lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("approvals")}
                )
            if "deployment_id" not in columns:
                # another process may add it at the same moment: its error is harmless
                with contextlib.suppress(ProgrammingError, OperationalError):
                    async with self.engine.begin() as conn:
                        await conn.execute(
                            sa.text("ALTER TABLE approvals ADD COLUMN deployment_id VARCHAR(32)")
                        )
        with contextlib.suppress(IntegrityError):
            async with self.engine.begin() as conn:
                await conn.execute(
                    schema_version.insert().values(version=SCHEMA_VERSION, applied_at=utcnow())
                )

    async def schema_version(self) -> int:
        async with self.engine.connect() as conn:
            return int(
                (await conn.execute(sa.select(sa.func.max(schema_version.c.version)))).scalar()
            )

    # --- deployments ---------------------------------------------------------------------------

    def new_deployment_id(self) -> str:
        """A fresh id to create a deployment with (locks are taken before it is recorded)."""
        return _new_id()

    async def create_deployment(
        self,
        *,
        kind: DeploymentKind | str,
        trigger: Trigger | str,
        plan: Plan,
        requested_by: str | None = None,
        approved_by: str | None = None,
        base: str | None = None,
        head: str | None = None,
        holder: str | None = None,
        scope: str | None = None,
        lease: timedelta | None = None,
        deployment_id: str | None = None,
        note: str | None = None,
        manifest: Manifest | None = None,
    ) -> str:
        """Record a queued deployment and all its steps (pending); return its id."""
        now = utcnow()
        row = {
            "kind": str(DeploymentKind(kind)),
            "trigger": str(trigger),
            "state": str(DeploymentState.QUEUED),
            "requested_by": requested_by,
            "approved_by": approved_by,
            "base": base if base is not None else plan.base,
            "head": head if head is not None else plan.head,
            "digest": plan.digest,
            "plan": _plan_json(plan),
            "manifest": manifest.model_dump_json() if manifest is not None else None,
            "scope": scope,
            "holder": holder,
            "note": note,
            "lease_until": now + lease if lease else None,
            "created_at": now,
        }
        for _ in range(5):
            new_id = deployment_id or _new_id()
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(deployments.insert().values(id=new_id, **row))
                    if plan.steps:
                        await conn.execute(
                            steps.insert(),
                            [
                                {
                                    "deployment_id": new_id,
                                    "step_id": step.id,
                                    "position": position,
                                    "phase": str(step.phase),
                                    "service": step.service,
                                    "state": str(StepState.PENDING),
                                    "attempt": 0,
                                    "output": "",
                                }
                                for position, step in enumerate(plan.steps)
                            ],
                        )
                return new_id
            except IntegrityError:
                if deployment_id is not None:
                    raise StoreError(f"deployment id {deployment_id} already exists") from None
        raise StoreError("could not allocate a deployment id")

    async def set_deployment_state(
        self, deployment_id: str, state: DeploymentState, note: str | None = None
    ) -> None:
        values: dict[str, Any] = {"state": str(state)}
        now = utcnow()
        if state is DeploymentState.RUNNING:
            values["started_at"] = sa.func.coalesce(deployments.c.started_at, now)
        elif state not in ACTIVE_STATES:
            values["finished_at"] = now
            values["lease_until"] = None
        if note is not None:
            values["note"] = note
        async with self.engine.begin() as conn:
            await conn.execute(
                deployments.update().where(deployments.c.id == deployment_id).values(**values)
            )

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(deployments.select().where(deployments.c.id == deployment_id))
            ).first()
            if row is None:
                return None
            return (await self._with_steps(conn, [row]))[0]

    async def history(self, service: str | None = None, limit: int = 20) -> list[DeploymentRecord]:
        """The newest deployments first, optionally only those touching `service`."""
        query = deployments.select()
        if service is not None:
            touching = sa.select(steps.c.deployment_id).where(steps.c.service == service)
            query = query.where(deployments.c.id.in_(touching))
        query = query.order_by(deployments.c.created_at.desc(), deployments.c.id).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            return await self._with_steps(conn, rows)

    async def last_deployment(
        self, kind: DeploymentKind | None = None, finished: bool = True
    ) -> DeploymentRecord | None:
        """The newest deployment (of a kind), by default one that has finished."""
        query = deployments.select()
        if kind is not None:
            query = query.where(deployments.c.kind == str(kind))
        if finished:
            query = query.where(deployments.c.state.not_in([str(s) for s in ACTIVE_STATES]))
        query = query.order_by(deployments.c.created_at.desc(), deployments.c.id).limit(1)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            found = await self._with_steps(conn, rows)
        return found[0] if found else None

    async def last_deployed_revision(self) -> str | None:
        """The revision of the newest deployment of everything (no `--service`) that succeeded."""
        query = (
            sa.select(deployments.c.head)
            .where(
                deployments.c.state == str(DeploymentState.SUCCEEDED),
                deployments.c.scope.is_(None),
                deployments.c.head.is_not(None),
            )
            .order_by(deployments.c.finished_at.desc(), deployments.c.created_at.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(query)).scalar()

    async def _with_steps(
        self, conn: AsyncConnection, rows: Iterable[sa.Row[Any]]
    ) -> list[DeploymentRecord]:
        rows = list(rows)
        if not rows:
            return []
        ids = [row.id for row in rows]
        step_rows = (
            await conn.execute(
                steps.select()
                .where(steps.c.deployment_id.in_(ids))
                .order_by(steps.c.deployment_id, steps.c.position)
            )
        ).all()
        by_deployment: dict[str, list[StepRecord]] = {i: [] for i in ids}
        for srow in step_rows:
            by_deployment[srow.deployment_id].append(_step_record(srow))
        return [_deployment_record(row, by_deployment[row.id]) for row in rows]

    # --- events --------------------------------------------------------------------------------

    async def record_event(self, event: Event) -> None:
        """A Subscriber: persist every transition of a deployment as it happens."""
        if isinstance(event, DeploymentStarted):
            await self._deployment_started(event)
        elif isinstance(event, StepStarted):
            await self._step_started(event)
        elif isinstance(event, StepOutput):
            await self._step_output(event)
        elif isinstance(event, StepFinished):
            await self._step_finished(event)
        elif isinstance(event, RollbackStarted):
            await self._rollback_started(event)
        elif isinstance(event, RollbackFinished):
            await self._rollback_finished(event)
        elif isinstance(event, DeploymentFinished):
            await self._deployment_finished(event)

    async def _deployment_started(self, event: DeploymentStarted) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                deployments.update()
                .where(deployments.c.id == event.deployment_id)
                .values(
                    state=str(DeploymentState.RUNNING),
                    started_at=sa.func.coalesce(deployments.c.started_at, event.at),
                )
            )
        if result.rowcount == 0:
            # an executor run without a recorded deployment (library use): record it now
            await self.create_deployment(
                kind=event.kind,
                trigger=Trigger.CLI,
                plan=event.plan,
                deployment_id=event.deployment_id,
            )
            await self.set_deployment_state(event.deployment_id, DeploymentState.RUNNING)

    async def _upsert_step(
        self, conn: AsyncConnection, event: Event, step: Any, **values: Any
    ) -> None:
        where = sa.and_(steps.c.deployment_id == event.deployment_id, steps.c.step_id == step.id)
        result = await conn.execute(steps.update().where(where).values(**values))
        if result.rowcount == 0:
            # a step the plan did not list (e.g. a re-verify after a rollback)
            position = (
                await conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(steps.c.position), -1) + 1).where(
                        steps.c.deployment_id == event.deployment_id
                    )
                )
            ).scalar()
            defaults = {"attempt": 0, "output": "", "state": str(StepState.PENDING)}
            await conn.execute(
                steps.insert().values(
                    deployment_id=event.deployment_id,
                    step_id=step.id,
                    position=position,
                    phase=str(step.phase),
                    service=step.service,
                    **{**defaults, **values},
                )
            )

    async def _step_started(self, event: StepStarted) -> None:
        async with self.engine.begin() as conn:
            await self._upsert_step(
                conn,
                event,
                event.step,
                state=str(StepState.RUNNING),
                attempt=event.attempt,
                started_at=event.at,
                finished_at=None,
                reason=None,
            )

    async def _step_output(self, event: StepOutput) -> None:
        text = event.text if event.text.endswith("\n") else event.text + "\n"
        await self._append_output(event.deployment_id, event.step_id, text)

    async def _step_finished(self, event: StepFinished) -> None:
        values: dict[str, Any] = {
            "state": str(event.state),
            "finished_at": event.at,
            "reason": event.reason,
        }
        result = event.result
        if result is not None:
            if result.previous_system:
                values["previous_system"] = result.previous_system
            if result.new_system:
                values["new_system"] = result.new_system
            if result.commands:
                values["commands"] = list(result.commands)
        where = sa.and_(
            steps.c.deployment_id == event.deployment_id, steps.c.step_id == event.step.id
        )
        async with self.engine.begin() as conn:
            streamed = (await conn.execute(sa.select(steps.c.output).where(where))).scalar()
            # output streamed through StepOutput events is kept (it may hold a rollback's
            # and a re-verification's output too); otherwise the result's output is stored
            if streamed:
                if len(streamed) > MAX_OUTPUT:
                    values["output"] = _tail(streamed)
            elif result is not None and result.output:
                values["output"] = _tail(result.output)
            await self._upsert_step(conn, event, event.step, **values)
            health = _health_after(event)
            if health is not None and event.step.service:
                await self._set_health(conn, event.step.service, health, event.at)

    async def _append_output(self, deployment_id: str, step_id: str, text: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                steps.update()
                .where(steps.c.deployment_id == deployment_id, steps.c.step_id == step_id)
                .values(output=sa.func.coalesce(steps.c.output, "") + text)
            )

    async def _rollback_started(self, event: RollbackStarted) -> None:
        """Say in the failed step's output that its service is being rolled back."""
        note = ROLLBACK_NOTE.format(service=event.service, cause=event.cause)
        await self._append_output(event.deployment_id, event.cause, note)

    async def _rollback_finished(self, event: RollbackFinished) -> None:
        """A service rolled back: its running system is the one recorded before the deploy."""
        if event.result is not None and event.result.output:
            async with self.engine.connect() as conn:
                cause = (
                    await conn.execute(
                        sa.select(steps.c.step_id).where(
                            steps.c.deployment_id == event.deployment_id,
                            steps.c.service == event.service,
                            steps.c.state == str(StepState.RUNNING),
                        )
                    )
                ).scalar()
            if cause is not None:
                await self._append_output(event.deployment_id, cause, event.result.output + "\n")
        if not event.ok:
            return
        system = event.result.new_system if event.result else None
        if system is None:
            async with self.engine.connect() as conn:
                system = (
                    await conn.execute(
                        sa.select(steps.c.previous_system).where(
                            steps.c.deployment_id == event.deployment_id,
                            steps.c.service == event.service,
                            steps.c.previous_system.is_not(None),
                        )
                    )
                ).scalar()
        if system is None:
            return
        async with self.engine.begin() as conn:
            await self._upsert_service(
                conn,
                event.service,
                system_path=system,
                last_deployment_id=event.deployment_id,
                updated_at=event.at,
            )

    async def _deployment_finished(self, event: DeploymentFinished) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                deployments.update()
                .where(deployments.c.id == event.deployment_id)
                .values(state=str(event.state), finished_at=event.at, lease_until=None)
            )
            head = (
                await conn.execute(
                    sa.select(deployments.c.head).where(deployments.c.id == event.deployment_id)
                )
            ).scalar()
            step_rows = (
                await conn.execute(
                    steps.select().where(
                        steps.c.deployment_id == event.deployment_id, steps.c.service.is_not(None)
                    )
                )
            ).all()
            per_service: dict[str, list[Any]] = {}
            for row in step_rows:
                per_service.setdefault(row.service, []).append(row)
            for name, rows in per_service.items():
                await self._service_outcome(conn, name, rows, event, head)

    async def _service_outcome(
        self, conn: AsyncConnection, name: str, rows: list[Any], event: Event, head: str | None
    ) -> None:
        """Record what a finished deployment left a service running."""
        values: dict[str, Any] = {"last_deployment_id": event.deployment_id, "updated_at": event.at}
        nix = [row for row in rows if row.phase in {str(p) for p in NIX_PHASES}]
        if all(row.state == str(StepState.SUCCEEDED) for row in rows):
            values["revision"] = head
            for row in nix:
                if row.new_system:
                    values["system_path"] = row.new_system
                if row.previous_system:
                    values["previous_system"] = row.previous_system
        await self._upsert_service(conn, name, **values)

    async def _upsert_service(self, conn: AsyncConnection, name: str, **values: Any) -> None:
        result = await conn.execute(
            services.update().where(services.c.name == name).values(**values)
        )
        if result.rowcount == 0:
            try:
                async with conn.begin_nested():
                    await conn.execute(services.insert().values(name=name, **values))
            except IntegrityError:
                await conn.execute(
                    services.update().where(services.c.name == name).values(**values)
                )

    async def _set_health(
        self, conn: AsyncConnection, service: str, health: Health | str, at: datetime
    ) -> None:
        await self._upsert_service(conn, service, last_health=str(health), health_at=at)

    async def set_health(self, service: str, health: Health | str) -> None:
        """Record the result of a live health check (`nixmox status --check`)."""
        async with self.engine.begin() as conn:
            await self._set_health(conn, service, health, utcnow())

    async def services(self) -> dict[str, ServiceRecord]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(services.select().order_by(services.c.name))).all()
        return {
            row.name: ServiceRecord(
                name=row.name,
                revision=row.revision,
                system_path=row.system_path,
                previous_system=row.previous_system,
                last_deployment_id=row.last_deployment_id,
                last_health=row.last_health,
                health_at=row.health_at,
                updated_at=row.updated_at,
            )
            for row in rows
        }

    # --- locks ---------------------------------------------------------------------------------

    async def acquire_locks(
        self,
        services: Iterable[str],
        holder: str,
        *,
        lease: timedelta,
        wait: float = 0,
        reason: str | None = None,
    ) -> None:
        """Lock every service for `holder`, all or none; wait up to `wait` s, then LockBusy."""
        wanted = sorted(set(services))
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            try:
                await self._try_locks(wanted, holder, lease, reason)
                return
            except LockBusy:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(LOCK_POLL_INTERVAL)

    async def _try_locks(
        self, wanted: list[str], holder: str, lease: timedelta, reason: str | None
    ) -> None:
        now = utcnow()
        try:
            async with self.engine.begin() as conn:
                # a lease that ran out belongs to a holder that died: reclaim it
                await conn.execute(
                    locks.delete().where(
                        locks.c.service.in_(wanted),
                        locks.c.expires_at.is_not(None),
                        locks.c.expires_at < now,
                    )
                )
                held = (await conn.execute(locks.select().where(locks.c.service.in_(wanted)))).all()
                for row in held:
                    if row.holder != holder:
                        raise LockBusy(row.service, row.holder, row.reason)
                mine = {row.service for row in held}
                if mine:
                    await conn.execute(
                        locks.update()
                        .where(locks.c.service.in_(mine))
                        .values(expires_at=now + lease)
                    )
                missing = [name for name in wanted if name not in mine]
                if missing:
                    await conn.execute(
                        locks.insert(),
                        [
                            {
                                "service": name,
                                "holder": holder,
                                "reason": reason,
                                "acquired_at": now,
                                "expires_at": now + lease,
                            }
                            for name in missing
                        ],
                    )
        except IntegrityError:
            # another holder inserted one of them between our read and our write
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(
                        locks.select()
                        .where(locks.c.service.in_(wanted), locks.c.holder != holder)
                        .limit(1)
                    )
                ).first()
            if row is None:
                raise LockBusy(wanted[0], "another deployment") from None
            raise LockBusy(row.service, row.holder, row.reason) from None

    async def renew_locks(
        self, holder: str, lease: timedelta, services: Iterable[str] | None = None
    ) -> None:
        """Extend the leases of `holder`'s locks and of its running deployments.

        With `services` (the ones `holder` locked), raise LockLost, renewing nothing, when any
        of them is gone or held by someone else: its lease ran out and another process took it.
        """
        until = utcnow() + lease
        async with self.engine.begin() as conn:
            if services is not None:
                await self._check_held(conn, holder, set(services))
            await conn.execute(
                locks.update()
                .where(locks.c.holder == holder, locks.c.expires_at.is_not(None))
                .values(expires_at=until)
            )
            await conn.execute(
                deployments.update()
                .where(
                    deployments.c.holder == holder,
                    deployments.c.state.in_([str(s) for s in ACTIVE_STATES]),
                )
                .values(lease_until=until)
            )

    @staticmethod
    async def _check_held(conn: AsyncConnection, holder: str, wanted: set[str]) -> None:
        """Raise LockLost unless `holder` still holds a lock on every service in `wanted`."""
        rows = (await conn.execute(locks.select().where(locks.c.service.in_(wanted)))).all()
        current = {row.service: row.holder for row in rows}
        lost = {name: current.get(name) for name in wanted if current.get(name) != holder}
        if lost:
            raise LockLost(lost)

    async def release_locks(self, holder: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                locks.delete().where(locks.c.holder == holder, locks.c.expires_at.is_not(None))
            )

    async def lock(self, service: str, holder: str, reason: str | None = None) -> None:
        """A manual lock (`lock <service>`): no lease, held until `unlock`."""
        now = utcnow()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    locks.delete().where(
                        locks.c.service == service,
                        locks.c.expires_at.is_not(None),
                        locks.c.expires_at < now,
                    )
                )
                row = (await conn.execute(locks.select().where(locks.c.service == service))).first()
                if row is not None and row.holder != holder:
                    raise LockBusy(row.service, row.holder, row.reason)
                if row is not None:
                    await conn.execute(
                        locks.update()
                        .where(locks.c.service == service)
                        .values(expires_at=None, reason=reason)
                    )
                else:
                    await conn.execute(
                        locks.insert().values(
                            service=service,
                            holder=holder,
                            reason=reason,
                            acquired_at=now,
                            expires_at=None,
                        )
                    )
        except IntegrityError:
            raise LockBusy(service, "another holder") from None

    async def unlock(self, service: str, *, force: bool = False) -> UnlockResult:
        """Remove a manual lock (or an expired lease); a running deployment's only with `force`."""
        now = utcnow()
        removable = [locks.c.service == service]
        if not force:
            removable.append(sa.or_(locks.c.expires_at.is_(None), locks.c.expires_at < now))
        async with self.engine.begin() as conn:
            result = await conn.execute(locks.delete().where(*removable))
            if result.rowcount > 0:
                return UnlockResult(removed=True)
            row = (await conn.execute(locks.select().where(locks.c.service == service))).first()
        if row is None:
            return UnlockResult(removed=False)
        held = LockRecord(row.service, row.holder, row.reason, row.acquired_at, row.expires_at)
        return UnlockResult(removed=False, deployment_lock=held)

    async def locks(self) -> list[LockRecord]:
        """The locks in force (expired leases are not listed)."""
        now = utcnow()
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    locks.select()
                    .where(sa.or_(locks.c.expires_at.is_(None), locks.c.expires_at >= now))
                    .order_by(locks.c.service)
                )
            ).all()
        return [
            LockRecord(row.service, row.holder, row.reason, row.acquired_at, row.expires_at)
            for row in rows
        ]

    # --- crash recovery ------------------------------------------------------------------------

    async def recover_interrupted(self) -> list[DeploymentRecord]:
        """Mark deployments whose holder stopped renewing its lease `interrupted`; free locks."""
        now = utcnow()
        async with self.engine.begin() as conn:
            await conn.execute(
                locks.delete().where(locks.c.expires_at.is_not(None), locks.c.expires_at < now)
            )
            stale = (
                await conn.execute(
                    deployments.select().where(
                        deployments.c.state.in_([str(s) for s in ACTIVE_STATES]),
                        deployments.c.lease_until.is_not(None),
                        deployments.c.lease_until < now,
                    )
                )
            ).all()
        recovered: list[str] = []
        for row in stale:
            if await self._interrupt(row, now):
                recovered.append(row.id)
        found = [await self.get_deployment(i) for i in recovered]
        return [record for record in found if record is not None]

    async def _interrupt(self, row: Any, now: datetime) -> bool:
        """Interrupt one stale deployment; False if another process did it first."""
        async with self.engine.begin() as conn:
            running = (
                await conn.execute(
                    steps.select().where(
                        steps.c.deployment_id == row.id,
                        steps.c.state == str(StepState.RUNNING),
                    )
                )
            ).all()
            where = (
                "it stopped during " + ", ".join(step.step_id for step in running)
                if running
                else "no step was running"
            )
            note = INTERRUPTED_NOTE.format(expired=_iso(row.lease_until), where=where)
            result = await conn.execute(
                deployments.update()
                .where(
                    deployments.c.id == row.id,
                    deployments.c.state == row.state,
                    deployments.c.lease_until == row.lease_until,
                )
                .values(
                    state=str(DeploymentState.INTERRUPTED),
                    finished_at=now,
                    lease_until=None,
                    note=note,
                )
            )
            if result.rowcount == 0:
                return False
            for step in running:
                await conn.execute(
                    steps.update()
                    .where(steps.c.deployment_id == row.id, steps.c.step_id == step.step_id)
                    .values(
                        state=str(StepState.INTERRUPTED),
                        finished_at=now,
                        reason=STOPPED_WHILE_RUNNING.format(
                            attempt=step.attempt, started=_iso(step.started_at)
                        ),
                    )
                )
            await conn.execute(
                steps.update()
                .where(
                    steps.c.deployment_id == row.id,
                    steps.c.state == str(StepState.PENDING),
                )
                .values(state=str(StepState.SKIPPED), reason=NEVER_STARTED)
            )
        return True

    # --- GitHub deliveries ---------------------------------------------------------------------

    async def record_delivery(self, delivery_id: str) -> bool:
        """True the first time a webhook delivery id is seen, False for a redelivery."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    deliveries.insert().values(delivery_id=delivery_id, received_at=utcnow())
                )
        except IntegrityError:
            return False
        return True

    async def record_deliveries(self, items: Sequence[DeliveryJobs]) -> list[bool]:
        """Record new deliveries with their jobs, all in one transaction (a group commit).

        Each item is a delivery id (or a tuple of keys: the id and, say, the body's
        signature) and the jobs `(kind, payload)` it queues. Per item: True when recorded
        now (all its keys, its jobs queued), False when any of its keys was seen before, in
        an earlier call or earlier in `items` (nothing recorded or queued).
        """
        if not items:
            return []
        try:
            return await self._record_together(items)
        except IntegrityError:
            # another replica recorded one of these ids meanwhile: one at a time, then
            return [await self._record_alone(delivery_id, work) for delivery_id, work in items]

    async def _record_together(self, items: Sequence[DeliveryJobs]) -> list[bool]:
        local = self._local_sqlite()
        if local is not None:
            try:
                return self._record_now(local, items)
            except SqliteBusy:
                # another writer holds the database: take the asynchronous path and wait
                log.info("SQLite is busy; recording deliveries asynchronously")
        wanted = _all_keys(items)
        async with self.engine.begin() as conn:
            seen = sa.select(deliveries.c.delivery_id).where(deliveries.c.delivery_id.in_(wanted))
            rows = _IntakeRows.of(items, set((await conn.execute(seen)).scalars()))
            delivery_insert, job_insert = _intake_inserts(conn.dialect)
            await delivery_insert.run(conn, rows.deliveries)
            await job_insert.run(conn, rows.jobs)
        return rows.recorded

    def _local_sqlite(self) -> LocalSqlite | None:
        if self._local is None and self._local_path is not None:
            self._local = LocalSqlite(str(self._local_path))
        return self._local

    def _record_now(self, local: LocalSqlite, items: Sequence[DeliveryJobs]) -> list[bool]:
        """`_record_together` on the synchronous SQLite connection (SqliteBusy: nothing done)."""
        wanted = _all_keys(items)
        delivery_insert, job_insert = _intake_inserts(local.dialect)
        with local.transaction() as cursor:
            found = cursor.execute(f"{_SEEN_SQL}({','.join('?' * len(wanted))})", wanted)
            rows = _IntakeRows.of(items, {row[0] for row in found})
            delivery_insert.run_now(cursor, rows.deliveries)
            job_insert.run_now(cursor, rows.jobs)
        return rows.recorded

    async def _record_alone(
        self, delivery_id: DeliveryKey, work: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """One delivery and its jobs in their own transaction; False when seen before."""
        try:
            async with self.engine.begin() as conn:
                rows = _IntakeRows.of([(delivery_id, work)], set())
                delivery_insert, job_insert = _intake_inserts(conn.dialect)
                await delivery_insert.run(conn, rows.deliveries)
                await job_insert.run(conn, rows.jobs)
        except IntegrityError:
            return False
        return True

    # --- job queue -----------------------------------------------------------------------------

    async def enqueue_job(self, kind: str, payload: dict[str, Any]) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.insert()
                .values(
                    kind=kind,
                    payload=payload,
                    state=str(JobState.QUEUED),
                    attempts=0,
                    created_at=utcnow(),
                )
                .returning(jobs.c.id)
            )
            return int(result.scalar_one())

    async def claim_job(self, worker: str, *, lease: timedelta) -> Job | None:
        """The oldest queued job (or one whose worker's lease ran out), now leased to `worker`."""
        for _ in range(10):
            now = utcnow()
            claimable = sa.or_(
                jobs.c.state == str(JobState.QUEUED),
                sa.and_(jobs.c.state == str(JobState.RUNNING), jobs.c.lease_until < now),
            )
            async with self.engine.begin() as conn:
                candidate = (
                    await conn.execute(
                        sa.select(jobs.c.id).where(claimable).order_by(jobs.c.id).limit(1)
                    )
                ).scalar()
                if candidate is None:
                    return None
                # conditional update: if another worker claimed it first, nothing changes
                result = await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == candidate, claimable)
                    .values(
                        state=str(JobState.RUNNING),
                        worker=worker,
                        lease_until=now + lease,
                        attempts=jobs.c.attempts + 1,
                    )
                )
                if result.rowcount == 1:
                    row = (await conn.execute(jobs.select().where(jobs.c.id == candidate))).one()
                    return _job(row)
        return None

    async def renew_job(self, job_id: int, worker: str, lease: timedelta) -> bool:
        """Extend a running job's lease; False if another worker took it over."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.update()
                .where(
                    jobs.c.id == job_id,
                    jobs.c.worker == worker,
                    jobs.c.state == str(JobState.RUNNING),
                )
                .values(lease_until=utcnow() + lease)
            )
        return result.rowcount == 1

    async def finish_job(self, job_id: int, error: str | None = None) -> None:
        state = JobState.FAILED if error else JobState.DONE
        async with self.engine.begin() as conn:
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(state=str(state), error=error, finished_at=utcnow(), lease_until=None)
            )

    async def get_job(self, job_id: int) -> Job | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(jobs.select().where(jobs.c.id == job_id))).first()
        return _job(row) if row is not None else None

    # --- approvals -----------------------------------------------------------------------------

    async def create_approval(
        self,
        *,
        kind: str,
        requested_by: str,
        digest: str,
        ttl: timedelta,
        plan: Plan | None = None,
        service: str | None = None,
        args: dict[str, Any] | None = None,
        channel: str | None = None,
        ts: str | None = None,
    ) -> str:
        """A pending approval for one plan digest, expiring after `ttl`."""
        now = utcnow()
        for _ in range(5):
            new_id = _new_id()
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        approvals.insert().values(
                            id=new_id,
                            kind=kind,
                            requested_by=requested_by,
                            service=service,
                            args=args or {},
                            digest=digest,
                            plan=_plan_json(plan) if plan is not None else None,
                            channel=channel,
                            ts=ts,
                            state=str(ApprovalState.PENDING),
                            created_at=now,
                            expires_at=now + ttl,
                        )
                    )
                return new_id
            except IntegrityError:
                continue
        raise StoreError("could not allocate an approval id")

    async def set_approval_message(self, approval_id: str, channel: str, ts: str) -> None:
        """Remember the chat message that shows the approval, to update it later."""
        async with self.engine.begin() as conn:
            await conn.execute(
                approvals.update()
                .where(approvals.c.id == approval_id)
                .values(channel=channel, ts=ts)
            )

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(approvals.select().where(approvals.c.id == approval_id))
            ).first()
        return _approval(row) if row is not None else None

    async def resolve_approval(self, approval_id: str, state: ApprovalState | str, by: str) -> bool:
        """Move a pending approval to `state`, atomically; approving needs it unexpired."""
        state = ApprovalState(state)
        now = utcnow()
        conditions = [
            approvals.c.id == approval_id,
            approvals.c.state == str(ApprovalState.PENDING),
        ]
        if state in (ApprovalState.APPROVED, ApprovalState.REFUSED):
            conditions.append(approvals.c.expires_at > now)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                approvals.update()
                .where(*conditions)
                .values(state=str(state), resolved_by=by, resolved_at=now)
            )
        return result.rowcount == 1

    async def expire_approvals(self) -> list[ApprovalRecord]:
        """Mark pending approvals past their expiry `expired`; return them (to update messages)."""
        now = utcnow()
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    approvals.select().where(
                        approvals.c.state == str(ApprovalState.PENDING),
                        approvals.c.expires_at <= now,
                    )
                )
            ).all()
            expired: list[ApprovalRecord] = []
            for row in rows:
                result = await conn.execute(
                    approvals.update()
                    .where(
                        approvals.c.id == row.id,
                        approvals.c.state == str(ApprovalState.PENDING),
                    )
                    .values(state=str(ApprovalState.EXPIRED), resolved_at=now)
                )
                if result.rowcount == 1:
                    record = _approval(row)
                    record.state, record.resolved_at = ApprovalState.EXPIRED, now
                    expired.append(record)
        return expired

    # --- audit ---------------------------------------------------------------------------------

    async def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                audit_log.insert().values(
                    at=utcnow(), actor=actor, action=action, detail=_jsonable(detail)
                )
            )

    async def audit_log(self, limit: int = 50, *, action: str | None = None) -> list[AuditRecord]:
        """The newest audit entries first, optionally only those of one action."""
        query = audit_log.select().order_by(audit_log.c.id.desc()).limit(limit)
        if action is not None:
            query = query.where(audit_log.c.action == action)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            AuditRecord(row.id, row.at, row.actor, row.action, row.detail or {}) for row in rows
        ]

    async def claim_approval_for_deployment(
        self, approval_id: str, deployment_id: str, *, replacing: str | None = None
    ) -> bool:
        """Record the deployment of an approved request, once; True only for the one claimer.

        `replacing` swaps the caller's own earlier claim (a placeholder taken before the
        deployment had an id) for the real id.
        """
        claimed = (
            approvals.c.deployment_id.is_(None)
            if replacing is None
            else approvals.c.deployment_id == replacing
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(
                approvals.update()
                .where(
                    approvals.c.id == approval_id,
                    approvals.c.state == str(ApprovalState.APPROVED),
                    claimed,
                )
                .values(deployment_id=deployment_id)
            )
        return result.rowcount == 1


def _health_after(event: StepFinished) -> Health | None:
    """What a finished step says about its service's health, if anything."""
    if event.state is StepState.ROLLED_BACK:
        return Health.HEALTHY  # rolled back and re-verified
    if event.step.phase is Phase.VERIFY and event.state is StepState.SUCCEEDED:
        return Health.HEALTHY
    if event.step.phase is Phase.VERIFY and event.state is StepState.FAILED:
        return Health.UNHEALTHY
    return None


# --- delivery intake -------------------------------------------------------------------------

_SEEN_SQL = (
    f"SELECT {deliveries.c.delivery_id.name} FROM {deliveries.name} "
    f"WHERE {deliveries.c.delivery_id.name} IN "
)
_INTAKE_INSERTS: dict[str, tuple[PreparedInsert, PreparedInsert]] = {}


def _intake_inserts(dialect: sa.Dialect) -> tuple[PreparedInsert, PreparedInsert]:
    """The delivery and job INSERTs for a dialect (compiled once per dialect)."""
    key = dialect.name
    if key not in _INTAKE_INSERTS:
        _INTAKE_INSERTS[key] = (
            PreparedInsert(deliveries, ["delivery_id", "received_at"], dialect),
            PreparedInsert(jobs, ["kind", "payload", "state", "attempts", "created_at"], dialect),
        )
    return _INTAKE_INSERTS[key]


@dataclass
class _IntakeRows:
    """What a batch of deliveries writes: per item whether it is new, and the rows to insert."""

    recorded: list[bool]
    deliveries: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]

    @classmethod
    def of(cls, items: Sequence[DeliveryJobs], seen: set[str]) -> _IntakeRows:
        """An item with a key in `seen` is not new; of several sharing a key, only the first is."""
        now = utcnow()  # one object for every row: PreparedInsert binds it once
        queued = str(JobState.QUEUED)
        rows = cls([], [], [])
        for delivery, work in items:
            keys = _keys(delivery)
            new = seen.isdisjoint(keys)
            rows.recorded.append(new)
            if new:
                seen.update(keys)
                rows.deliveries.extend((key, now) for key in keys)
                rows.jobs.extend((kind, payload, queued, 0, now) for kind, payload in work)
        return rows


def _keys(delivery: DeliveryKey) -> tuple[str, ...]:
    return (delivery,) if isinstance(delivery, str) else tuple(dict.fromkeys(delivery))


def _all_keys(items: Sequence[DeliveryJobs]) -> list[str]:
    """Every key of every item, once each."""
    return list(dict.fromkeys(key for delivery, _ in items for key in _keys(delivery)))


# --- row conversion --------------------------------------------------------------------------


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    """Audit details may hold enums, paths and datetimes: keep them as JSON text."""
    return json.loads(json.dumps(detail, default=str))


def _step_record(row: Any) -> StepRecord:
    return StepRecord(
        id=row.step_id,
        phase=row.phase,
        service=row.service,
        state=StepState(row.state),
        attempt=row.attempt,
        output=row.output or "",
        reason=row.reason,
        previous_system=row.previous_system,
        new_system=row.new_system,
        commands=list(row.commands or []),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _deployment_record(row: Any, step_records: list[StepRecord]) -> DeploymentRecord:
    return DeploymentRecord(
        id=row.id,
        kind=DeploymentKind(row.kind),
        trigger=row.trigger,
        state=DeploymentState(row.state),
        plan=_load_plan(row.plan),
        digest=row.digest,
        requested_by=row.requested_by,
        approved_by=row.approved_by,
        base=row.base,
        head=row.head,
        scope=row.scope,
        holder=row.holder,
        note=row.note,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        lease_until=row.lease_until,
        steps=step_records,
        manifest_json=row.manifest,
    )


def _job(row: Any) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        payload=dict(row.payload or {}),
        state=JobState(row.state),
        attempts=row.attempts,
        worker=row.worker,
        error=row.error,
        lease_until=row.lease_until,
    )


def _approval(row: Any) -> ApprovalRecord:
    return ApprovalRecord(
        id=row.id,
        kind=row.kind,
        requested_by=row.requested_by,
        state=ApprovalState(row.state),
        digest=row.digest,
        expires_at=row.expires_at,
        service=row.service,
        args=dict(row.args or {}),
        plan=_load_plan(row.plan) if row.plan else None,
        channel=row.channel,
        ts=row.ts,
        resolved_by=row.resolved_by,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        deployment_id=row.deployment_id,
    )
