"""What the store records of a deployment: every event (retried), the end, stops and losses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import DBAPIError

from deployments.locks import lost_lock_note
from runners.outcome import ExecutionResult
from runners.registry import RunnerKind, RunnerSet
from state.deployments import DeploymentRecord
from state.events import (
    DeploymentFinished,
    DeploymentState,
    Event,
    StepFinished,
    StepState,
    Subscriber,
)
from state.locks import LockLost
from state.store import Store

log = logging.getLogger(__name__)

# a store write is retried this many times, waiting RECORD_BACKOFF * 2**n seconds in between
# (about 6 s in all: a SQLite busy spell or a PostgreSQL failover), before the deployment fails
RECORD_RETRIES = 6
RECORD_BACKOFF = 0.1
CRASHED = "the deployment stopped: {error}"
BY_OPERATOR = "interrupted by the operator"

Recovered = Callable[[list[DeploymentRecord]], Awaitable[None]]
"""Told about the deployments the start-of-deployment recovery marked interrupted."""


async def retrying(write: Callable[[], Awaitable[None]], what: object) -> None:
    """One store write, retried with backoff on database errors; the last error is raised."""
    for attempt in range(RECORD_RETRIES + 1):
        try:
            await write()
            return
        except DBAPIError as exc:
            if attempt == RECORD_RETRIES:
                raise
            log.warning("recording %s failed (%s); retrying", what, exc.__class__.__name__)
            await asyncio.sleep(RECORD_BACKOFF * 2**attempt)


def durable_recorder(store: Store) -> Subscriber:
    """The executor's recorder: each event written to the store, retried on database errors."""

    async def record(event: Event) -> None:
        await retrying(lambda: store.deployments.record_event(event), event)

    return record


async def record_result(store: Store, result: ExecutionResult) -> None:
    """Write the final step and deployment states of an execution (idempotent: only what the
    recorded events did not already leave so, then the deployment's end)."""
    record = await store.deployments.get(result.deployment_id)
    recorded = {step.id: step.state for step in record.steps} if record is not None else {}
    for sid, outcome in result.steps.items():
        if outcome.state in (StepState.PENDING, StepState.RUNNING):
            continue
        if recorded.get(sid) is outcome.state:
            continue
        await store.deployments.record_event(
            StepFinished(
                result.deployment_id,
                outcome.step,
                outcome.state,
                outcome.result,
                outcome.reason,
                at=outcome.finished_at or result.finished_at,
            )
        )
    if record is None or record.state is not result.state or record.finished_at is None:
        await store.deployments.record_event(
            DeploymentFinished(result.deployment_id, result.state, at=result.finished_at)
        )


async def record_lost(store: Store, deployment_id: str, lost: LockLost) -> None:
    """End a deployment that lost a lock `interrupted`, saying to whom."""
    note = lost_lock_note(lost)
    log.warning("deployment %s: %s", deployment_id, note)
    await retrying(
        lambda: store.deployments.set_state(deployment_id, DeploymentState.INTERRUPTED, note=note),
        "the lost lock",
    )
    with contextlib.suppress(Exception):
        await store.audit.record(
            f"deployment {deployment_id}",
            "lock lost",
            {"deployment": deployment_id, "lost": lost.lost},
        )


async def mark_stopped(store: Store, deployment_id: str, exc: BaseException) -> None:
    """A deployment that ended by an exception (or Ctrl-C) is not left `running`."""
    record = await store.deployments.get(deployment_id)
    if record is None or record.state not in (DeploymentState.QUEUED, DeploymentState.RUNNING):
        return
    cancelled = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
    state = DeploymentState.INTERRUPTED if cancelled else DeploymentState.FAILED
    note = BY_OPERATOR if cancelled else CRASHED.format(error=exc)
    with contextlib.suppress(Exception):
        await store.deployments.set_state(deployment_id, state, note=note)


async def recover(store: Store, on_recovered: Recovered | None) -> None:
    """Interrupt what dead processes left running; tell `on_recovered` (e.g. the bot's report)."""
    recovered = await store.deployments.recover_interrupted()
    if not recovered or on_recovered is None:
        return
    try:
        await on_recovered(recovered)
    except Exception:
        log.exception("reporting %d interrupted deployment(s) failed", len(recovered))


async def seed_simulation(store: Store, runners: RunnerSet) -> None:
    """Simulated hosts start from the systems the store says they run (across processes)."""
    hosts = getattr(runners.rollback, "hosts", None)
    if runners.kind is not RunnerKind.SIMULATE or hosts is None:
        return
    for name, record in (await store.services.all()).items():
        if record.system_path:
            hosts.running.setdefault(name, record.system_path)
