"""Deployments and their steps: records, creation, queries and crash recovery."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from planner.models import Manifest
from planner.plan import Plan
from state.base import (
    Repository,
    StoreError,
    iso,
    json_of,
    load_plan,
    new_id,
    plan_json,
    record_of,
)
from state.events import DeploymentKind, DeploymentState, Event, StepState, Trigger, utcnow
from state.locks import delete_expired_locks
from state.recording import EventRecorder
from state.schema import deployments, steps

ACTIVE_STATES = (DeploymentState.QUEUED, DeploymentState.RUNNING)
STOPPED_WHILE_RUNNING = (
    "stopped while running (attempt {attempt}, started {started}): "
    "the process running the deployment died"
)
# what `to_detail` adds to `to_json`, in this order
DETAIL_FIELDS = (
    "trigger",
    "requested_by",
    "approved_by",
    "base",
    "head",
    "digest",
    "scope",
    "note",
    "services",
    "created_at",
    "started_at",
    "finished_at",
)
STEP_DETAIL_FIELDS = ("phase", "service", "attempt", "reason", "previous_system", "new_system")
NEVER_STARTED = "not started: the deployment was interrupted"
INTERRUPTED_NOTE = "interrupted: the process running it stopped (lease expired {expired}); {where}"


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
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
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
            **json_of(self, DETAIL_FIELDS),
            "steps": [
                {**step.to_json(), **json_of(step, STEP_DETAIL_FIELDS)} for step in self.steps
            ],
        }


# --- the repository ---


class DeploymentRepository(Repository):
    """Deployments and steps; `record_event` is the Subscriber that records their progress."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._recorder = EventRecorder(engine, self)

    async def record_event(self, event: Event) -> None:
        """A Subscriber: persist every transition of a deployment as it happens."""
        await self._recorder.record(event)

    def new_id(self) -> str:
        """A fresh id to create a deployment with (locks are taken before it is recorded)."""
        return new_id()

    async def create(
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
            "plan": plan_json(plan),
            "manifest": manifest.model_dump_json() if manifest is not None else None,
            "scope": scope,
            "holder": holder,
            "note": note,
            "lease_until": now + lease if lease else None,
            "created_at": now,
        }
        for _ in range(5):
            fresh = deployment_id or new_id()
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(deployments.insert().values(id=fresh, **row))
                    if plan.steps:
                        await conn.execute(
                            steps.insert(),
                            [
                                {
                                    "deployment_id": fresh,
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
                return fresh
            except IntegrityError:
                if deployment_id is not None:
                    raise StoreError(f"deployment id {deployment_id} already exists") from None
        raise StoreError("could not allocate a deployment id")

    async def set_state(
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

    async def get(self, deployment_id: str) -> DeploymentRecord | None:
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

    async def last(
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

    async def recover_interrupted(self) -> list[DeploymentRecord]:
        """Mark deployments whose holder stopped renewing its lease `interrupted`; free locks."""
        now = utcnow()
        async with self.engine.begin() as conn:
            await delete_expired_locks(conn, now)
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
        found = [await self.get(i) for i in recovered]
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
            note = INTERRUPTED_NOTE.format(expired=iso(row.lease_until), where=where)
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
                            attempt=step.attempt, started=iso(step.started_at)
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


def _step_record(row: Any) -> StepRecord:
    return record_of(
        StepRecord,
        row,
        id=row.step_id,
        state=StepState(row.state),
        output=row.output or "",
        commands=list(row.commands or []),
    )


def _deployment_record(row: Any, step_records: list[StepRecord]) -> DeploymentRecord:
    return record_of(
        DeploymentRecord,
        row,
        kind=DeploymentKind(row.kind),
        state=DeploymentState(row.state),
        plan=load_plan(row.plan),
        steps=step_records,
        manifest_json=row.manifest,
    )
