"""Live progress of one deployment: a pure model fed with events, rendered as Block Kit.

`Progress.apply(event)` updates the model and returns the thread notes the event calls for
(a failed step, a finished rollback); `progress_blocks(progress, now)` renders the one message
that is updated in place. Nothing here does I/O, so it is tested without Slack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from bot.slack.blocks import (
    MAX_BLOCKS,
    Block,
    code_block,
    context,
    header,
    mention,
    pack_lines,
    section,
    truncate,
)
from planner.escape import slack_code, slack_lines, slack_text
from planner.plan import Plan
from planner.render import short_rev
from state.events import (
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
)

GLOBAL = "(global)"
TAIL_LINES = 20
KEPT_OUTPUT_LINES = 200
MAX_SERVICE_LINES = 30
MAX_SERVICE_SECTIONS = 40
BAR_WIDTH = 20


class ServiceState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLING_BACK = "rolling back"
    ROLLED_BACK = "rolled back"
    ROLLBACK_FAILED = "rollback failed"
    INTERRUPTED = "interrupted"
    NOT_RUN = "not run"


EMOJI: dict[ServiceState, str] = {
    ServiceState.PENDING: ":white_circle:",
    ServiceState.RUNNING: ":arrows_counterclockwise:",
    ServiceState.SUCCEEDED: ":white_check_mark:",
    ServiceState.FAILED: ":x:",
    ServiceState.SKIPPED: ":fast_forward:",
    ServiceState.ROLLING_BACK: ":rewind:",
    ServiceState.ROLLED_BACK: ":leftwards_arrow_with_hook:",
    ServiceState.ROLLBACK_FAILED: ":rotating_light:",
    ServiceState.INTERRUPTED: ":warning:",
    ServiceState.NOT_RUN: ":heavy_minus_sign:",
}

# services in these states always get their own line, even in a very large deployment
NOTEWORTHY = frozenset(
    {
        ServiceState.RUNNING,
        ServiceState.FAILED,
        ServiceState.ROLLING_BACK,
        ServiceState.ROLLED_BACK,
        ServiceState.ROLLBACK_FAILED,
        ServiceState.INTERRUPTED,
        ServiceState.SKIPPED,
    }
)

FINAL_LINES: dict[DeploymentState, str] = {
    DeploymentState.SUCCEEDED: ":white_check_mark: *Succeeded* in {elapsed}",
    DeploymentState.FAILED: ":x: *Failed* after {elapsed}",
    DeploymentState.ROLLED_BACK: ":leftwards_arrow_with_hook: *Failed and rolled back* after {elapsed}",
    DeploymentState.INTERRUPTED: ":warning: *Interrupted* after {elapsed}",
}
DONE_STEP_STATES = frozenset(
    {StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED, StepState.ROLLED_BACK}
)


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class StepView:
    id: str
    service: str | None
    state: StepState = StepState.PENDING
    attempt: int = 0
    started: datetime | None = None
    finished: datetime | None = None
    reason: str | None = None


@dataclass
class Failure:
    """A failed step, for the thread reply."""

    step_id: str
    service: str | None
    attempt: int
    reason: str | None
    output_tail: str
    rollbacks: list[RollbackView] = field(default_factory=list)


@dataclass
class RollbackView:
    service: str
    cause: str
    ok: bool | None = None  # None while it runs
    detail: str | None = None


class NoteKind(StrEnum):
    FAILURE = "failure"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Byline:
    """What the progress message says about a deployment besides its plan: a title (None:
    made from the plan), where the request came from, who asked and who approved."""

    title: str | None = None
    requested_by: str | None = None
    approved_by: str | None = None
    origin: str | None = None


NO_BYLINE = Byline()


@dataclass(frozen=True)
class Note:
    """Something the thread should say: a new failure, or a rollback to add to one."""

    kind: NoteKind
    failure: Failure | None = None
    rollback: RollbackView | None = None


class Progress:
    """Everything the progress message shows, kept up to date from the events."""

    def __init__(
        self,
        deployment_id: str,
        plan: Plan,
        *,
        kind: DeploymentKind = DeploymentKind.DEPLOY,
        byline: Byline = NO_BYLINE,
        started_at: datetime | None = None,
        redact: Callable[[str], str] = str,
    ) -> None:
        self.redact = redact
        self.deployment_id = deployment_id
        self.plan = plan
        self.kind = kind
        self.byline = byline
        self.started_at = started_at
        self.finished_at: datetime | None = None
        self.state = DeploymentState.RUNNING
        self.summary: dict[str, object] = {}
        self.steps: dict[str, StepView] = {s.id: StepView(s.id, s.service) for s in plan.steps}
        self.output: dict[str, deque[str]] = {}
        self.failures: list[Failure] = []
        self.rollbacks: dict[str, RollbackView] = {}

    # -- events ----------------------------------------------------------------------------

    def apply(self, event: Event) -> list[Note]:
        """Update from one event; return what should be said in the thread."""
        if isinstance(event, DeploymentStarted):
            self.started_at = self.started_at or event.at
            self.kind = event.kind
        elif isinstance(event, StepStarted):
            view = self._step(event.step.id, event.step.service)
            view.state, view.attempt = StepState.RUNNING, event.attempt
            view.started = view.started or event.at
            self.started_at = self.started_at or event.at
        elif isinstance(event, StepOutput):
            kept = self.output.setdefault(event.step_id, deque(maxlen=KEPT_OUTPUT_LINES))
            kept.extend(event.text.splitlines())
        elif isinstance(event, StepFinished):
            return self._step_finished(event)
        elif isinstance(event, RollbackStarted):
            self.rollbacks[event.service] = RollbackView(event.service, event.cause)
        elif isinstance(event, RollbackFinished):
            return self._rollback_finished(event)
        elif isinstance(event, DeploymentFinished):
            self.state = event.state
            self.finished_at = event.at
            self.summary = dict(event.summary)
        return []

    def _step(self, step_id: str, service: str | None) -> StepView:
        if step_id not in self.steps:  # a step the plan did not list (e.g. a re-verify)
            self.steps[step_id] = StepView(step_id, service)
        return self.steps[step_id]

    def _step_finished(self, event: StepFinished) -> list[Note]:
        """A failed step (rolled back or not) gets a thread reply with its output tail."""
        view = self._step(event.step.id, event.step.service)
        view.state, view.finished, view.reason = event.state, event.at, event.reason
        if event.state not in {StepState.FAILED, StepState.ROLLED_BACK}:
            return []
        output = event.result.output if event.result and event.result.output else ""
        if not output:
            output = "\n".join(self.output.get(event.step.id, []))
        failure = Failure(
            step_id=event.step.id,
            service=event.step.service,
            attempt=view.attempt,
            reason=self.redact(event.reason) if event.reason else None,
            output_tail=self.redact(tail(output)),
            # the executor rolls back before it reports the step, so these are known already
            rollbacks=[r for r in self.rollbacks.values() if r.cause == event.step.id],
        )
        self.failures.append(failure)
        return [Note(NoteKind.FAILURE, failure=failure)]

    def _rollback_finished(self, event: RollbackFinished) -> list[Note]:
        """Record the outcome; a reply already posted for the failure gets it added."""
        view = self.rollbacks.setdefault(event.service, RollbackView(event.service, ""))
        view.ok = event.ok
        result = event.result
        if result is not None:
            target = result.new_system if event.ok else None
            view.detail = f"to {slack_code(target)}" if target else None
            if not event.ok and result.output:
                view.detail = self.redact(tail(result.output, 5))
        for failure in self.failures:
            if failure.step_id == view.cause or (
                not view.cause and failure.service == view.service
            ):
                if view not in failure.rollbacks:
                    failure.rollbacks.append(view)
                return [Note(NoteKind.ROLLBACK, failure=failure, rollback=view)]
        if view.cause and view.cause in self.steps:
            return []  # its step reports next, with this rollback in the reply
        return [Note(NoteKind.ROLLBACK, rollback=view)]

    # -- queries ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def counts(self) -> tuple[int, int]:
        """Steps done (in a final state) and steps in total."""
        done = sum(1 for s in self.steps.values() if s.state in DONE_STEP_STATES)
        return done, len(self.steps)

    def services(self) -> dict[str, list[StepView]]:
        """Steps grouped by service, in plan order (global steps under `(global)`)."""
        grouped: dict[str, list[StepView]] = {}
        for view in self.steps.values():
            grouped.setdefault(view.service or GLOBAL, []).append(view)
        return grouped

    def service_state(self, name: str, steps: list[StepView]) -> ServiceState:
        """One state for a service, from its steps and its rollback."""
        rollback = self.rollbacks.get(name)
        states = [s.state for s in steps]
        if rollback is not None:
            if rollback.ok is None:
                return ServiceState.ROLLING_BACK
            if not rollback.ok:
                return ServiceState.ROLLBACK_FAILED
            # rolled back, but a failed re-verification still leaves the service failed
            return ServiceState.FAILED if StepState.FAILED in states else ServiceState.ROLLED_BACK
        if StepState.RUNNING in states:
            return ServiceState.RUNNING
        for step_state, service_state in (
            (StepState.FAILED, ServiceState.FAILED),
            (StepState.ROLLED_BACK, ServiceState.ROLLED_BACK),
            (StepState.INTERRUPTED, ServiceState.INTERRUPTED),
        ):
            if step_state in states:
                return service_state
        if all(state is StepState.SUCCEEDED for state in states):
            return ServiceState.SUCCEEDED
        if StepState.PENDING not in states:
            return ServiceState.SKIPPED
        if all(state is StepState.PENDING for state in states):
            return ServiceState.NOT_RUN if self.finished else ServiceState.PENDING
        return ServiceState.NOT_RUN if self.finished else ServiceState.RUNNING

    def elapsed(self, now: datetime) -> float:
        if self.started_at is None:
            return 0.0
        return ((self.finished_at or now) - self.started_at).total_seconds()


# -- rendering -------------------------------------------------------------------------------


def service_line(progress: Progress, name: str, steps: list[StepView], now: datetime) -> str:
    """`:x: *vaultwarden* — failed · 2/4 steps · 12s`."""
    state = progress.service_state(name, steps)
    done = sum(1 for s in steps if s.state in DONE_STEP_STATES)
    label = state.value
    running = [s for s in steps if s.state is StepState.RUNNING]
    if running:
        label = f"running {slack_code(running[0].id)}"
        if running[0].attempt > 1:
            label += f" (attempt {running[0].attempt})"
    starts = [s.started for s in steps if s.started]
    timing = ""
    if starts:
        ends = [s.finished for s in steps if s.finished]
        end = now if running or not ends else max(ends)
        timing = f" · {format_duration((end - min(starts)).total_seconds())}"
    shown = slack_text(name) if name != GLOBAL else "_global_"
    return f"{EMOJI[state]} *{shown}* — {label} · {done}/{len(steps)} steps{timing}"


def progress_bar(done: int, total: int) -> str:
    filled = BAR_WIDTH if total == 0 else round(BAR_WIDTH * done / total)
    return "▰" * filled + "▱" * (BAR_WIDTH - filled)


def overall_line(progress: Progress, now: datetime) -> str:
    done, total = progress.counts()
    grouped = progress.services()
    finished_services = sum(
        1
        for name, steps in grouped.items()
        if progress.service_state(name, steps) not in {ServiceState.PENDING, ServiceState.RUNNING}
    )
    return (
        f"`{progress_bar(done, total)}` {done}/{total} steps · "
        f"{finished_services}/{len(grouped)} services done · "
        f"{format_duration(progress.elapsed(now))} elapsed"
    )


def final_line(progress: Progress, now: datetime) -> str:
    """The deployment's outcome in one line: what failed, what was rolled back, what did not run."""
    line = FINAL_LINES.get(progress.state, f"*{progress.state.value}*").format(
        elapsed=format_duration(progress.elapsed(now))
    )
    done, total = progress.counts()
    parts = [f"{done}/{total} steps"]
    if progress.failures:
        failed = ", ".join(slack_code(f.step_id) for f in progress.failures[:5])
        parts.append(f"failed: {failed}")
    rolled = sorted(name for name, r in progress.rollbacks.items() if r.ok)
    if rolled:
        parts.append("rolled back: " + ", ".join(slack_text(name) for name in rolled))
    broken = sorted(name for name, r in progress.rollbacks.items() if r.ok is False)
    if broken:
        parts.append("rollback FAILED: " + ", ".join(slack_text(name) for name in broken))
    not_run = sum(1 for s in progress.steps.values() if s.state in {StepState.PENDING})
    skipped = sum(1 for s in progress.steps.values() if s.state is StepState.SKIPPED)
    if skipped + not_run:
        parts.append(f"{skipped + not_run} steps not run")
    return f"{line} — " + "; ".join(parts)


def title(progress: Progress) -> str:
    if progress.byline.title:
        return progress.byline.title
    services = progress.plan.services()
    what = services[0] if len(services) == 1 else f"{len(services)} services"
    verb = "Rollback of" if progress.kind is DeploymentKind.ROLLBACK else "Deploying"
    return f"{verb} {what}"


def service_section_lines(progress: Progress, now: datetime) -> list[str]:
    """A line per service; past MAX_SERVICE_LINES only the noteworthy ones, plus counts."""
    grouped = progress.services()
    lines = [(name, service_line(progress, name, steps, now)) for name, steps in grouped.items()]
    if len(lines) <= MAX_SERVICE_LINES:
        return [line for _, line in lines]
    states = {name: progress.service_state(name, steps) for name, steps in grouped.items()}
    shown = [line for name, line in lines if states[name] in NOTEWORTHY][:MAX_SERVICE_LINES]
    counts: dict[ServiceState, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    summary = " · ".join(f"{EMOJI[s]} {n} {s.value}" for s, n in counts.items())
    return [*shown, f"_{len(lines)} services:_ {summary}"]


def progress_text(progress: Progress, now: datetime) -> str:
    """The fallback text of the progress message."""
    done, total = progress.counts()
    if progress.finished:
        return truncate(f"{slack_text(title(progress))}: {final_line(progress, now)}", 3000)
    return (
        f"{slack_text(title(progress))}: {done}/{total} steps, "
        f"{format_duration(progress.elapsed(now))}"
    )


def progress_blocks(progress: Progress, now: datetime) -> list[Block]:
    """The one message of a deployment: title, who, overall progress, services, outcome."""
    byline = progress.byline
    facts = [f"deployment {slack_code(progress.deployment_id)}"]
    if byline.origin:
        facts.append(slack_lines(byline.origin))
    if progress.plan.head:
        facts.append(f"revision {slack_code(short_rev(progress.plan.head))}")
    if byline.requested_by:
        facts.append(f"requested by {mention(byline.requested_by)}")
    if byline.approved_by:
        facts.append(f"approved by {mention(byline.approved_by)}")
    blocks: list[Block] = [
        header(title(progress)),
        context(" · ".join(facts)),
        section(overall_line(progress, now), block_id="nixmox_overall"),
    ]
    chunks = pack_lines(service_section_lines(progress, now))
    blocks += [section(chunk) for chunk in chunks[:MAX_SERVICE_SECTIONS]]
    if progress.finished:
        blocks.append(section(final_line(progress, now), block_id="nixmox_final"))
    return blocks[:MAX_BLOCKS]


# -- thread replies ---------------------------------------------------------------------------


def failure_text(failure: Failure) -> str:
    attempt = f" (attempt {failure.attempt})" if failure.attempt > 1 else ""
    reason = f": {slack_text(failure.reason)}" if failure.reason else ""
    return f":x: {slack_code(failure.step_id)} failed{attempt}{reason}"


def rollback_line(rollback: RollbackView) -> str:
    name = slack_text(rollback.service)
    if rollback.ok is None:
        return f":rewind: rolling back *{name}*…"
    if rollback.ok:
        detail = f" {rollback.detail}" if rollback.detail else ""
        return f":leftwards_arrow_with_hook: rolled back *{name}*{detail}"
    detail = f"\n{code_block(rollback.detail, 800)}" if rollback.detail else ""
    return f":rotating_light: rollback of *{name}* FAILED{detail}"


def failure_blocks(failure: Failure) -> list[Block]:
    """The thread reply for a failed step: what failed, its last output lines, the rollbacks."""
    blocks = [
        section(failure_text(failure)),
        section(f"Last {TAIL_LINES} lines of output:\n{code_block(failure.output_tail)}"),
    ]
    if failure.rollbacks:
        blocks.append(section("\n".join(rollback_line(r) for r in failure.rollbacks)))
    elif failure.service:
        blocks.append(context(f"no rollback of {slack_text(failure.service)} (yet)"))
    return blocks


def rollback_blocks(rollback: RollbackView) -> list[Block]:
    """A thread reply for a rollback with no failed step of its own to attach to."""
    return [section(rollback_line(rollback))]
