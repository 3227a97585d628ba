"""Deployments a dead process left running: reported where a live deployment reports its end.

At start-up `store.deployments.recover_interrupted()` marks them `interrupted`. `start_reporting` then, in
the background, replays the end of each one through the live notifiers, primed with what the
store recorded:

- GitHub: a `GitHubNotifier` gets `DeploymentFinished(interrupted)`, so `nixmox/deploy` and the
  `nixmox/deploy/<service>` statuses still pending become `error` ("interrupted: the bot stopped
  during verify:gitea") and the GitHub Deployment (found by its `nixmox_deployment` payload) gets
  an `error` status.
- Slack: a `SlackNotifier` edits the deployment's message (recorded in `slack_messages` when it was
  posted, see `state.slack_messages`) to its final, interrupted state, with a line saying
  where it stopped and how to resume or undo it; without a known message (or if it cannot be
  edited) the same is posted as a new message in `NIXMOX_SLACK_CHANNEL`.
- The audit log gets one `deployment.interrupted` entry per deployment, saying what was reported.

While the bot runs, `start_sweeping` repeats the recovery every lease period, so a crash
followed by a restart within the lease (whose deployment was not yet stale at start-up) is
reported too, as is a deployment interrupted by another process's recovery (a `nixmox deploy`,
or a deployment of this bot that starts) since the bot started.

Every failure is logged and swallowed: reporting never keeps the bot from starting.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from bot.context import BotContext, DeploymentRequest
from bot.github.client import GitHubClient
from bot.github.notifier import GitHubNotifier
from planner.plan import Step
from runners.base import (
    DeploymentFinished,
    DeploymentState,
    StepFinished,
    StepStarted,
    StepState,
    Trigger,
    utcnow,
)
from state.deployments import INTERRUPTED_NOTE, NEVER_STARTED, DeploymentRecord, StepRecord
from state.slack_messages import SlackMessage

if TYPE_CHECKING:
    from bot.slack.bot import SlackBot

log = logging.getLogger(__name__)

ACTOR = "nixmox"
REPORT_TASK = "recovery_report"  # key of the reporting task in `BotContext.extras`
# audit entries searched for earlier reports of interrupted deployments
MESSAGE_LINK_WINDOW = 5000
# GitHub Deployments of the head commit searched for the one a deployment created
GITHUB_DEPLOYMENT_WINDOW = 300
SHUTDOWN_GRACE = 10.0  # seconds a report still in progress may delay the bot's shutdown
BOT_STOPPED = "the bot stopped while it ran"
SWEEP_TASK = "recovery_sweep"  # key of the periodic recovery task in `BotContext.extras`
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


# -- GitHub -----------------------------------------------------------------------------------


class RecoveredGitHubNotifier(GitHubNotifier):
    """The live GitHub notifier, primed with a recovered deployment, to report its end.

    Services whose steps had all finished before the process died were reported then; the
    others (a step running, or started ones with steps never reached) are reported now.
    """

    def __init__(
        self,
        ctx: BotContext,
        record: DeploymentRecord,
        client: Callable[[], Awaitable[GitHubClient]],
    ) -> None:
        super().__init__(ctx, request_of(record), client)
        self.record = record
        self.deployment_id = record.id
        by_service: dict[str, list[StepRecord]] = {}
        for step in record.steps:
            if step.service:
                by_service.setdefault(step.service, []).append(step)
        for service, service_steps in by_service.items():
            self.prime(service, service_steps)

    def prime(self, service: str, steps: list[StepRecord]) -> None:
        interrupted = any(step.state is StepState.INTERRUPTED for step in steps)
        for step in steps:
            self.steps_of[service].add(step.id)
            state = step.state
            if state is StepState.INTERRUPTED:
                self.reasons[step.id] = BOT_STOPPED
            elif never_started(step):
                # the service's next step never ran: that is this service's interruption
                state = StepState.SKIPPED if interrupted else StepState.INTERRUPTED
                self.reasons[step.id] = NEVER_STARTED
            elif step.reason:
                self.reasons[step.id] = step.reason
            self.final[service][step.id] = state
        touched = interrupted or any(never_started(step) for step in steps)
        started = any(step.started_at is not None for step in steps)
        if started:
            self.started.add(service)
        if not (touched and started):
            # reported when its last step ended, or never started: no pending status to end
            self.reported.add(service)

    def summary_of(self, event: DeploymentFinished) -> str:
        return where_stopped(self.record)

    async def find_github_deployment(self) -> int | None:
        """The GitHub Deployment the dead process created for this deployment, if any."""
        try:
            gh = await self.gh()
            seen = 0
            async for item in gh.getiter(
                "/repos/{owner}/{repo}/deployments{?sha,environment,per_page}",
                url_vars=self.repo.vars(
                    sha=self.sha, environment=self.ctx.settings.environment, per_page=100
                ),
            ):
                if payload_deployment(item) == self.record.id and isinstance(item.get("id"), int):
                    return int(item["id"])
                seen += 1
                if seen >= GITHUB_DEPLOYMENT_WINDOW:
                    break
        except Exception:
            self._failed("finding the Deployment of %s", self.record.id)
        return None


def payload_deployment(item: Any) -> str | None:
    """The `nixmox_deployment` of a listed GitHub Deployment (its payload may be a string)."""
    if not isinstance(item, dict):
        return None
    payload = item.get("payload")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return None
    if not isinstance(payload, dict):
        return None
    value = payload.get("nixmox_deployment")
    return str(value) if value is not None else None


async def report_to_github(ctx: BotContext, record: DeploymentRecord) -> dict[str, Any] | None:
    """Replay the deployment's end to GitHub; what was done, or None when GitHub is off."""
    github = ctx.github
    if github is None or not ctx.settings.repo or not record.head:
        return None

    async def client() -> GitHubClient:
        return await github.client(None)

    notifier = RecoveredGitHubNotifier(ctx, record, client)
    services = sorted(set(notifier.steps_of) - notifier.reported)
    notifier.github_deployment = await notifier.find_github_deployment()
    await notifier(finished_event(record))
    return {
        "revision": record.head,
        "github_deployment": notifier.github_deployment,
        "services": services,
        "failures": notifier.failures,
    }


# -- Slack ------------------------------------------------------------------------------------


async def message_links(ctx: BotContext, deployment_ids: set[str]) -> dict[str, SlackMessage]:
    """The recorded Slack message of each deployment (the latest record wins)."""
    return await ctx.require_store().slack_messages.of(deployment_ids)


def slack_notifier(
    bot: SlackBot, record: DeploymentRecord, channel: str, link: SlackMessage | None
) -> Any:
    """The live Slack notifier for `record`, primed with its recorded steps."""
    from bot.slack.blocks import MAX_BLOCKS, section, truncate
    from bot.slack.bot import origin
    from bot.slack.notifier import SlackNotifier
    from bot.slack.progress import Progress

    hint = resume_hint(record)

    class RecoveredSlackNotifier(SlackNotifier):
        """The progress message, with where it stopped and how to go on below the outcome."""

        def _render(self) -> tuple[str, list[dict[str, Any]]]:
            text, blocks = super()._render()
            return truncate(f"{text}\n{hint}", 3000), [
                *blocks[: MAX_BLOCKS - 1],
                section(hint, block_id="nixmox_interrupted"),
            ]

    same_channel = link is not None and link.channel == channel
    notifier = RecoveredSlackNotifier(
        bot.client,
        channel,
        ts=link.ts if link is not None and same_channel else None,
        pacer=bot.pacer,
        redact=bot.redactor.text,
    )
    progress = Progress(
        record.id,
        record.plan,
        kind=record.kind,
        title=link.title if link is not None else None,
        requested_by=record.requested_by,
        approved_by=record.approved_by,
        origin=(link.origin if link is not None else None) or origin(request_of(record)),
        started_at=record.started_at,
        redact=bot.redactor.text,
    )
    for event in replayed_steps(record):
        progress.apply(event)  # thread notes were posted by the dead process: not again
    notifier.progress = progress
    return notifier


async def report_to_slack(
    ctx: BotContext, record: DeploymentRecord, link: SlackMessage | None
) -> dict[str, Any] | None:
    """Finish the deployment's message (or announce the interruption); what was done."""
    bot = ctx.extras.get("slack")
    if bot is None:
        return None
    if link is not None:
        notifier = slack_notifier(bot, record, link.channel, link)
        await notifier(finished_event(record))
        if notifier.updates_sent:
            return {"channel": link.channel, "ts": link.ts, "updated": True}
        log.warning("could not update the Slack message of deployment %s; announcing", record.id)
    channel = ctx.settings.slack_channel
    if not channel:
        return {"updated": False, "error": "no message known and NIXMOX_SLACK_CHANNEL unset"}
    notifier = slack_notifier(bot, record, channel, None)
    await notifier(finished_event(record))
    return {"channel": channel, "ts": notifier.ts, "updated": False, "posted": bool(notifier.ts)}


# -- the report -------------------------------------------------------------------------------


async def report_one(
    ctx: BotContext, record: DeploymentRecord, link: SlackMessage | None
) -> dict[str, Any]:
    """Report one recovered deployment everywhere, then audit what was reported."""
    detail: dict[str, Any] = {
        "deployment": record.id,
        "kind": record.kind.value,
        "trigger": record.trigger,
        "revision": record.head,
        "stopped_during": stopped_in(record),
        "note": record.note,
    }
    reports = {
        "github": lambda: report_to_github(ctx, record),
        "slack": lambda: report_to_slack(ctx, record, link),
    }
    for channel, report in reports.items():
        try:
            detail[channel] = await report()
        except Exception as exc:
            log.exception("could not report interrupted deployment %s to %s", record.id, channel)
            detail[channel] = {"error": type(exc).__name__}
    try:
        await ctx.require_store().audit.record(ACTOR, RecoveryAudit.INTERRUPTED, detail)
    except Exception:
        log.exception("could not audit interrupted deployment %s", record.id)
    return detail


async def report_interrupted(ctx: BotContext, records: list[DeploymentRecord]) -> None:
    """Report every deployment recovered as interrupted (oldest first)."""
    if not records:
        return
    try:
        links = await message_links(ctx, {record.id for record in records})
    except Exception:
        log.exception("could not read the Slack messages of interrupted deployments")
        links = {}
    for record in sorted(records, key=lambda r: r.created_at or datetime.min):
        await report_one(ctx, record, links.get(record.id))


def start_reporting(ctx: BotContext, records: list[DeploymentRecord]) -> asyncio.Task[None] | None:
    """Report in the background (the bot serves meanwhile); the task is in `ctx.extras`."""
    if not records:
        return None

    async def run() -> None:
        try:
            await report_interrupted(ctx, records)
        except Exception:
            log.exception("reporting interrupted deployments failed")

    task = asyncio.create_task(run(), name="nixmox-recovery-report")
    ctx.extras[REPORT_TASK] = task
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
            audited = await store.audit.entries(
                MESSAGE_LINK_WINDOW, action=RecoveryAudit.INTERRUPTED
            )
            for entry in audited:
                fresh.pop(str(entry.detail.get("deployment")), None)
        self.reported.update(fresh)
        for record in fresh.values():
            log.warning("deployment %s was left running by a dead process: interrupted", record.id)
        await report_interrupted(self.ctx, list(fresh.values()))
        return list(fresh.values())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("the periodic recovery sweep failed; trying again later")


def start_sweeping(
    ctx: BotContext, interval: float, since: datetime, reported: Iterable[str] = ()
) -> asyncio.Task[None]:
    """Sweep in the background while the bot runs; the task is in `ctx.extras`."""
    sweeper = RecoverySweeper(ctx, interval, since, reported)
    task = asyncio.create_task(sweeper.run(), name="nixmox-recovery-sweep")
    ctx.extras[SWEEP_TASK] = task
    return task


async def stop_sweeping(task: asyncio.Task[None] | None) -> None:
    """Stop the periodic sweep (a report in progress is cut short: the next start redoes it
    only if it was not audited)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


__all__ = [
    "REPORT_TASK",
    "SWEEP_TASK",
    "RecoveredGitHubNotifier",
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
