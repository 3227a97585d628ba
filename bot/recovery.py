"""Deployments a dead process left running: reported where a live deployment reports its end.

At start-up `store.deployments.recover_interrupted()` marks them `interrupted`. `start_reporting` then, in
the background, hands each one to every front end's `report_interrupted` (`bot.frontend`),
which replays its end through the live notifiers, primed with what the store recorded (GitHub:
`bot.github.recovery`, Slack: `bot.slack.recovery`). The audit log gets one
`deployment.interrupted` entry per deployment, saying what each front end reported.

While the bot runs, `start_sweeping` repeats the recovery every lease period, so a crash
followed by a restart within the lease (whose deployment was not yet stale at start-up) is
reported too, as is a deployment interrupted by another process's recovery (a `nixmox deploy`,
or a deployment of this bot that starts) since the bot started.

Every failure is logged and swallowed: reporting never keeps the bot from starting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any

from bot.context import BotContext
from bot.request import DeploymentRequest
from deployments.periodic import repeat_forever
from planner.plan import Step
from state.deployments import INTERRUPTED_NOTE, NEVER_STARTED, DeploymentRecord, StepRecord
from state.events import (
    DeploymentFinished,
    DeploymentState,
    StepFinished,
    StepStarted,
    StepState,
    Trigger,
    utcnow,
)

log = logging.getLogger(__name__)

ACTOR = "nixmox"
# audit entries searched for deployments another bot instance reported already
AUDIT_WINDOW = 5000
SHUTDOWN_GRACE = 10.0  # seconds a report still in progress may delay the bot's shutdown
BOT_STOPPED = "the bot stopped while it ran"
SWEEP_WINDOW = 50  # latest deployments the sweep looks at for ones another process recovered
# the note `store.deployments.recover_interrupted` leaves on a deployment it interrupted
RECOVERED_NOTE = INTERRUPTED_NOTE.split("{", 1)[0]
MAX_STEPS_NAMED = 3


class RecoveryAudit(StrEnum):
    """Audit-log actions of the start-up recovery."""

    INTERRUPTED = "deployment.interrupted"


# -- where a deployment stopped -------------------------------------------------------------


def stopped_in(record: DeploymentRecord) -> list[str]:
    """The steps that were running when the process died (marked interrupted by recovery)."""
    return [step.id for step in record.steps if step.state is StepState.INTERRUPTED]


def never_started(step: StepRecord) -> bool:
    """A step recovery skipped because the deployment stopped before it started."""
    return step.state is StepState.SKIPPED and step.reason == NEVER_STARTED


def named(step_ids: list[str], quote: str = "") -> str:
    shown = ", ".join(f"{quote}{step}{quote}" for step in step_ids[:MAX_STEPS_NAMED])
    more = len(step_ids) - MAX_STEPS_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def where_stopped(record: DeploymentRecord, quote: str = "") -> str:
    """`the bot stopped during verify:gitea`, or before which step it stopped."""
    running = stopped_in(record)
    if running:
        return f"the bot stopped during {named(running, quote)}"
    waiting = [step.id for step in record.steps if never_started(step)]
    if waiting:
        return f"the bot stopped before {named(waiting, quote)} started"
    return "the bot stopped before the deployment ended"


def target_of(record: DeploymentRecord) -> str | None:
    """The one service a deployment was about, if it was about one."""
    if record.scope:
        return record.scope
    services = record.services
    return services[0] if len(services) == 1 else None


def resume_hint(record: DeploymentRecord) -> str:
    """The Slack line saying where it stopped and which commands resume or undo it."""
    target = target_of(record)
    deploy = f"/nixmox deploy {target or 'all'}"
    rollback = f"/nixmox rollback {target}" if target else "/nixmox rollback"
    where = where_stopped(record, "`")
    return (
        f":information_source: {where[0].upper()}{where[1:]}; nothing more of this deployment "
        f"will run. `{deploy}` resumes it, `{rollback}` undoes what it changed."
    )


def request_of(record: DeploymentRecord) -> DeploymentRequest:
    """The request a recorded deployment was made for, as far as the store knows it."""
    try:
        trigger = Trigger(record.trigger)
    except ValueError:
        trigger = Trigger.CLI
    return DeploymentRequest(
        trigger=trigger,
        requested_by=record.requested_by or "",
        revision=record.head,
        kind=record.kind,
        approved_by=record.approved_by,
    )


def finished_event(record: DeploymentRecord) -> DeploymentFinished:
    return DeploymentFinished(
        record.id, state=DeploymentState.INTERRUPTED, at=record.finished_at or utcnow()
    )


def step_of(record: DeploymentRecord, step: StepRecord) -> Step:
    """The plan's step for a step record (a step outside the plan, such as a re-verify, too)."""
    for planned in record.plan.steps:
        if planned.id == step.id:
            return planned
    return Step.model_validate({"id": step.id, "phase": step.phase, "service": step.service})


def replayed_steps(record: DeploymentRecord) -> Iterable[StepStarted | StepFinished]:
    """The step events the dead process emitted, and the interruption of the running steps.

    Steps it never reached stay pending, so the message says they did not run.
    """
    for record_step in record.steps:
        step = step_of(record, record_step)
        if record_step.started_at is not None:
            yield StepStarted(
                record.id, step, max(1, record_step.attempt), at=record_step.started_at
            )
        if never_started(record_step):
            continue
        if record_step.state not in {StepState.PENDING, StepState.RUNNING}:
            at = record_step.finished_at or record_step.started_at or utcnow()
            yield StepFinished(record.id, step, record_step.state, reason=record_step.reason, at=at)


# -- the report -------------------------------------------------------------------------------


async def report_one(ctx: BotContext, record: DeploymentRecord) -> dict[str, Any]:
    """Report one recovered deployment everywhere, then audit what was reported."""
    detail: dict[str, Any] = {
        "deployment": record.id,
        "kind": record.kind.value,
        "trigger": record.trigger,
        "revision": record.head,
        "stopped_during": stopped_in(record),
        "note": record.note,
    }
    for front_end in ctx.front_ends:
        try:
            reported = await front_end.report_interrupted(record)
        except Exception as exc:
            log.exception(
                "could not report interrupted deployment %s to %s", record.id, front_end.name
            )
            reported = {"error": type(exc).__name__}
        if reported is not None:
            detail[front_end.name] = reported
    try:
        await ctx.require_store().audit.record(ACTOR, RecoveryAudit.INTERRUPTED, detail)
    except Exception:
        log.exception("could not audit interrupted deployment %s", record.id)
    return detail


async def report_interrupted(ctx: BotContext, records: list[DeploymentRecord]) -> None:
    """Report every deployment recovered as interrupted (oldest first)."""
    for record in sorted(records, key=lambda r: r.created_at or datetime.min):
        await report_one(ctx, record)


def start_reporting(ctx: BotContext, records: list[DeploymentRecord]) -> asyncio.Task[None] | None:
    """Report in the background (the bot serves meanwhile); the task is in `ctx.tasks`."""
    if not records:
        return None

    async def run() -> None:
        try:
            await report_interrupted(ctx, records)
        except Exception:
            log.exception("reporting interrupted deployments failed")

    task = asyncio.create_task(run(), name="nixmox-recovery-report")
    ctx.tasks.recovery_report = task
    return task


async def stop_reporting(task: asyncio.Task[None] | None) -> None:
    """Let a report in progress finish for a moment at shutdown, then cancel it."""
    if task is None or task.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(task), SHUTDOWN_GRACE)
    except TimeoutError:
        log.warning("reporting interrupted deployments was cut short by the shutdown")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- recovery while the bot runs --------------------------------------------------------------


def recovered_since(record: DeploymentRecord, since: datetime) -> bool:
    """Interrupted by a recovery (of any process) after `since`."""
    return (
        record.state is DeploymentState.INTERRUPTED
        and (record.note or "").startswith(RECOVERED_NOTE)
        and record.finished_at is not None
        and record.finished_at >= since
    )


class RecoverySweeper:
    """Runs the recovery every `interval` seconds and reports what it, or another process's
    recovery since `since`, marked interrupted (each deployment once)."""

    def __init__(
        self, ctx: BotContext, interval: float, since: datetime, reported: Iterable[str] = ()
    ) -> None:
        self.ctx = ctx
        self.interval = interval
        self.since = since
        self.reported = set(reported)

    async def sweep(self) -> list[DeploymentRecord]:
        """One pass: recover, find what is not reported yet, report it; what was reported."""
        store = self.ctx.require_store()
        found = {record.id: record for record in await store.deployments.recover_interrupted()}
        for record in await store.deployments.history(limit=SWEEP_WINDOW):
            if recovered_since(record, self.since):
                found.setdefault(record.id, record)
        fresh = {i: record for i, record in found.items() if i not in self.reported}
        if fresh:
            # another bot instance may have reported it already
            audited = await store.audit.entries(AUDIT_WINDOW, action=RecoveryAudit.INTERRUPTED)
            for entry in audited:
                fresh.pop(str(entry.detail.get("deployment")), None)
        self.reported.update(fresh)
        for record in fresh.values():
            log.warning("deployment %s was left running by a dead process: interrupted", record.id)
        await report_interrupted(self.ctx, list(fresh.values()))
        return list(fresh.values())

    async def run(self) -> None:
        failure = "the periodic recovery sweep failed; trying again later"
        await repeat_forever(self.sweep, self.interval, log, failure, wait_first=True)


def start_sweeping(
    ctx: BotContext, interval: float, since: datetime, reported: Iterable[str] = ()
) -> asyncio.Task[None]:
    """Sweep in the background while the bot runs; the task is in `ctx.tasks`."""
    sweeper = RecoverySweeper(ctx, interval, since, reported)
    task = asyncio.create_task(sweeper.run(), name="nixmox-recovery-sweep")
    ctx.tasks.recovery_sweep = task
    return task


async def stop_sweeping(task: asyncio.Task[None] | None) -> None:
    """Stop the periodic sweep (a report in progress is cut short: the next start redoes it
    only if it was not audited)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


__all__ = [
    "RecoveryAudit",
    "RecoverySweeper",
    "report_interrupted",
    "resume_hint",
    "start_reporting",
    "start_sweeping",
    "stop_reporting",
    "stop_sweeping",
    "where_stopped",
]
