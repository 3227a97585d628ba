"""Health checks (latest per service, and history) and drift findings, in the state store
(tables `health_latest`, `health_history`, `drift_findings` of `state.schema`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from state.base import Repository, record_of
from state.events import utcnow
from state.schema import drift_findings, health_history, health_latest

MAX_OUTPUT = 4000  # characters of a check's output tail kept
HISTORY_LIMIT = 50


@dataclass(frozen=True)
class HealthCheck:
    """One check's outcome: which check decided it, what it printed (redacted tail)."""

    service: str
    healthy: bool
    check: str
    output: str
    checked_at: datetime
    source: str = "cli"
    since: datetime | None = None
    transition: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "check": self.check,
            "checked_at": self.checked_at.isoformat(),
            "output": self.output,
        }


@dataclass(frozen=True)
class DriftRecord:
    """A drift finding as stored: active while `cleared_at` is None."""

    subject: str
    kind: str
    expected: str | None
    actual: str | None
    detail: str | None
    first_seen: datetime
    last_seen: datetime
    cleared_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.kind)


def _tail(text: str) -> str:
    return text[-MAX_OUTPUT:]


def _check(row: Any, *, with_since: bool) -> HealthCheck:
    return record_of(
        HealthCheck,
        row,
        healthy=bool(row.healthy),
        check=row.check_kind,
        since=row.since if with_since else None,
        transition=bool(getattr(row, "transition", False)),
    )


def _check_columns(check: HealthCheck) -> dict[str, Any]:
    """The columns the latest check and the history share."""
    return {
        "service": check.service,
        "healthy": check.healthy,
        "check_kind": check.check,
        "output": check.output,
        "source": check.source,
        "checked_at": check.checked_at,
    }


def _drift(row: Any) -> DriftRecord:
    return record_of(DriftRecord, row)


class HealthRepository(Repository):
    """Reads and writes the health and drift tables through the Store's engine."""

    async def record(self, check: HealthCheck, *, history: bool = True) -> HealthCheck:
        """Store a check as the service's latest (and in its history); returns it with `since`
        and `transition` filled from the previous latest."""
        async with self.engine.begin() as conn:
            previous = (
                await conn.execute(
                    health_latest.select().where(health_latest.c.service == check.service)
                )
            ).first()
            changed = previous is None or bool(previous.healthy) != check.healthy
            since = check.checked_at if changed or previous is None else previous.since
            stored = replace(
                check,
                output=_tail(check.output),
                since=since,
                transition=changed or check.transition,
            )
            values = {**_check_columns(stored), "since": since}
            if previous is None:
                await conn.execute(health_latest.insert().values(**values))
            else:
                await conn.execute(
                    health_latest.update()
                    .where(health_latest.c.service == check.service)
                    .values(**values)
                )
            if history or stored.transition:
                history_values = {**_check_columns(stored), "transition": stored.transition}
                await conn.execute(health_history.insert().values(**history_values))
        return stored

    async def latest(self) -> dict[str, HealthCheck]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(health_latest.select())).all()
        return {row.service: _check(row, with_since=True) for row in rows}

    async def history(self, service: str, limit: int = HISTORY_LIMIT) -> list[HealthCheck]:
        """The service's recorded checks and transitions, newest first."""
        query = (
            health_history.select()
            .where(health_history.c.service == service)
            .order_by(health_history.c.checked_at.desc(), health_history.c.id.desc())
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_check(row, with_since=False) for row in rows]

    async def active_drift(self) -> list[DriftRecord]:
        query = (
            drift_findings.select()
            .where(drift_findings.c.cleared_at.is_(None))
            .order_by(drift_findings.c.subject, drift_findings.c.kind)
        )
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_drift(row) for row in rows]

    async def replace_drift(
        self,
        found: Iterable[DriftRecord],
        *,
        at: datetime | None = None,
        kinds: set[str] | None = None,
    ) -> tuple[list[DriftRecord], list[DriftRecord]]:
        """Make `found` the active findings (of `kinds`, default all, the kinds that were
        looked at): returns (new ones, cleared ones)."""
        now = at or utcnow()
        wanted = {record.key: record for record in found}
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    drift_findings.select().where(drift_findings.c.cleared_at.is_(None))
                )
            ).all()
            active = {(row.subject, row.kind): row for row in rows}
            new: list[DriftRecord] = []
            cleared: list[DriftRecord] = []
            for key, row in active.items():
                if key not in wanted and (kinds is None or row.kind in kinds):
                    await conn.execute(
                        drift_findings.update()
                        .where(drift_findings.c.id == row.id)
                        .values(cleared_at=now)
                    )
                    cleared.append(_drift(row))
            for key, record in wanted.items():
                values = {
                    "expected": record.expected,
                    "actual": record.actual,
                    "detail": record.detail,
                    "last_seen": now,
                }
                if key in active:
                    await conn.execute(
                        drift_findings.update()
                        .where(drift_findings.c.id == active[key].id)
                        .values(**values)
                    )
                    continue
                await conn.execute(
                    drift_findings.insert().values(
                        subject=record.subject, kind=record.kind, first_seen=now, **values
                    )
                )
                new.append(
                    DriftRecord(record.subject, record.kind, record.expected, record.actual,
                                record.detail, now, now)
                )  # fmt: skip
        return new, cleared
