"""Recording a deployment's events (the store's Subscriber): steps, output and what each
service runs afterwards."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from planner.plan import NIX_PHASES, Phase, Plan
from state import events
from state.events import DeploymentKind, DeploymentState, StepState, Trigger
from state.schema import deployments, steps
from state.services import Health, set_health_in, upsert_service


class DeploymentWriter(Protocol):
    """What recording needs of the deployments repository (which itself owns a recorder)."""

    async def create(
        self, *, kind: DeploymentKind | str, trigger: Trigger | str, plan: Plan, deployment_id: str
    ) -> Any: ...

    async def set_state(self, deployment_id: str, state: DeploymentState) -> None: ...


MAX_OUTPUT = 256 * 1024  # characters of step output kept (the tail)
ROLLBACK_NOTE = "--- {cause} failed: rolling {service} back ---\n"


def tail(text: str) -> str:
    """The last MAX_OUTPUT characters of a step's output."""
    return text if len(text) <= MAX_OUTPUT else "…" + text[-MAX_OUTPUT:]


class EventRecorder:
    """Persists every transition of a deployment as it happens."""

    def __init__(self, engine: AsyncEngine, deployments: DeploymentWriter) -> None:
        self.engine = engine
        self.deployments = deployments
        self._by_type = self._handlers()

    async def record(self, event: events.Event) -> None:
        """Dispatch one event to the handler of its type (or of a base type; others are ignored)."""
        for kind in type(event).__mro__:
            handler = self._by_type.get(kind)
            if handler is not None:
                await handler(event)
                return

    def _handlers(self) -> dict[type, Callable[[Any], Awaitable[None]]]:
        """The handler of each event type this recorder persists."""
        return {
            events.DeploymentStarted: self._deployment_started,
            events.StepStarted: self._step_started,
            events.StepOutput: self._step_output,
            events.StepFinished: self._step_finished,
            events.RollbackStarted: self._rollback_started,
            events.RollbackFinished: self._rollback_finished,
            events.DeploymentFinished: self._deployment_finished,
        }

    async def _deployment_started(self, event: events.DeploymentStarted) -> None:
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
            await self.deployments.create(
                kind=event.kind,
                trigger=Trigger.CLI,
                plan=event.plan,
                deployment_id=event.deployment_id,
            )
            await self.deployments.set_state(event.deployment_id, DeploymentState.RUNNING)

    async def _upsert_step(
        self, conn: AsyncConnection, event: events.Event, step: Any, **values: Any
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

    async def _step_started(self, event: events.StepStarted) -> None:
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

    async def _step_output(self, event: events.StepOutput) -> None:
        text = event.text if event.text.endswith("\n") else event.text + "\n"
        await self._append_output(event.deployment_id, event.step_id, text)

    async def _step_finished(self, event: events.StepFinished) -> None:
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
            # output streamed through events.StepOutput events is kept (it may hold a rollback's
            # and a re-verification's output too); otherwise the result's output is stored
            if streamed:
                if len(streamed) > MAX_OUTPUT:
                    values["output"] = tail(streamed)
            elif result is not None and result.output:
                values["output"] = tail(result.output)
            await self._upsert_step(conn, event, event.step, **values)
            health = _health_after(event)
            if health is not None and event.step.service:
                await set_health_in(conn, event.step.service, health, event.at)

    async def _append_output(self, deployment_id: str, step_id: str, text: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                steps.update()
                .where(steps.c.deployment_id == deployment_id, steps.c.step_id == step_id)
                .values(output=sa.func.coalesce(steps.c.output, "") + text)
            )

    async def _rollback_started(self, event: events.RollbackStarted) -> None:
        """Say in the failed step's output that its service is being rolled back."""
        note = ROLLBACK_NOTE.format(service=event.service, cause=event.cause)
        await self._append_output(event.deployment_id, event.cause, note)

    async def _rollback_finished(self, event: events.RollbackFinished) -> None:
        """A service rolled back: its running system is the one recorded before the deploy."""
        if event.result is not None and event.result.output:
            running = steps.c.state == str(StepState.RUNNING)
            cause = await self._step_value(steps.c.step_id, event, running)
            if cause is not None:
                await self._append_output(event.deployment_id, cause, event.result.output + "\n")
        if not event.ok:
            return
        system = event.result.new_system if event.result else None
        if system is None:
            recorded = steps.c.previous_system.is_not(None)
            system = await self._step_value(steps.c.previous_system, event, recorded)
        if system is None:
            return
        async with self.engine.begin() as conn:
            await upsert_service(
                conn,
                event.service,
                system_path=system,
                last_deployment_id=event.deployment_id,
                updated_at=event.at,
            )

    async def _step_value(
        self, column: sa.Column[Any], event: events.RollbackFinished, condition: Any
    ) -> Any:
        """`column` of a step of the rolled-back service, in its deployment, that meets `condition`."""
        async with self.engine.connect() as conn:
            found = await conn.execute(
                sa.select(column).where(
                    steps.c.deployment_id == event.deployment_id,
                    steps.c.service == event.service,
                    condition,
                )
            )
            return found.scalar()

    async def _deployment_finished(self, event: events.DeploymentFinished) -> None:
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
        self,
        conn: AsyncConnection,
        name: str,
        rows: list[Any],
        event: events.Event,
        head: str | None,
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
        await upsert_service(conn, name, **values)


def _health_after(event: events.StepFinished) -> Health | None:
    """What a finished step says about its service's health, if anything."""
    if event.state is StepState.ROLLED_BACK:
        return Health.HEALTHY  # rolled back and re-verified
    if event.step.phase is Phase.VERIFY and event.state is StepState.SUCCEEDED:
        return Health.HEALTHY
    if event.step.phase is Phase.VERIFY and event.state is StepState.FAILED:
        return Health.UNHEALTHY
    return None
