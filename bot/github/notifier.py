"""Deployment events → commit statuses and a GitHub Deployment (an executor subscriber).

For the deployed commit: `nixmox/deploy` (pending → success/failure), one
`nixmox/deploy/<service>` per service (pending when its first step starts, final when its
last step ends), and a Deployment in `NIXMOX_ENVIRONMENT` with statuses in_progress →
success/failure. Every call is guarded: a GitHub failure is logged, counted, and never
reaches the deployment.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from bot.context import BotContext
from bot.github.checks import CheckRuns, Report
from bot.github.client import GitHubClient
from bot.github.rest import (
    DEPLOY_CONTEXT,
    Repo,
    StatusState,
    service_context,
    set_status,
    short,
)
from bot.request import DeploymentRequest
from planner.escape import md_code
from planner.words import plan_size
from state.events import (
    DeploymentFinished,
    DeploymentKind,
    DeploymentStarted,
    DeploymentState,
    Event,
    StepFinished,
    StepStarted,
    StepState,
    Subscriber,
)

log = logging.getLogger(__name__)


class DeploymentStatusState:
    IN_PROGRESS = "in_progress"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"


FINAL_DEPLOYMENT_STATUS = {
    DeploymentState.SUCCEEDED: (StatusState.SUCCESS, DeploymentStatusState.SUCCESS),
    DeploymentState.FAILED: (StatusState.FAILURE, DeploymentStatusState.FAILURE),
    DeploymentState.ROLLED_BACK: (StatusState.FAILURE, DeploymentStatusState.FAILURE),
    DeploymentState.INTERRUPTED: (StatusState.ERROR, DeploymentStatusState.ERROR),
}
STEP_WORDS = {
    StepState.FAILED: "failed",
    StepState.ROLLED_BACK: "rolled back",
    StepState.SKIPPED: "skipped",
    StepState.INTERRUPTED: "interrupted",
}


def service_outcome(
    states: dict[str, StepState], reasons: dict[str, str]
) -> tuple[StatusState, str]:
    """The status of one service from the final states of its steps."""
    for state in (StepState.FAILED, StepState.ROLLED_BACK, StepState.INTERRUPTED):
        failed = sorted(sid for sid, s in states.items() if s is state)
        if failed:
            why = reasons.get(failed[0])
            text = f"{failed[0]} {STEP_WORDS[state]}" + (f": {why}" if why else "")
            return StatusState.FAILURE if state is not StepState.INTERRUPTED else (
                StatusState.ERROR
            ), text
    if states and all(s is StepState.SKIPPED for s in states.values()):
        first = sorted(states)[0]
        return StatusState.FAILURE, f"skipped: {reasons.get(first, 'a step it needs failed')}"
    skipped = sorted(sid for sid, s in states.items() if s is StepState.SKIPPED)
    if skipped:
        return StatusState.FAILURE, f"{skipped[0]} skipped: {reasons.get(skipped[0], '')}"
    return StatusState.SUCCESS, f"deployed ({len(states)} step{'s' * (len(states) != 1)})"


class GitHubNotifier:
    """Reports one deployment of `request.revision` to GitHub."""

    def __init__(
        self,
        ctx: BotContext,
        request: DeploymentRequest,
        client: Callable[[], Awaitable[GitHubClient]],
    ) -> None:
        self.ctx = ctx
        self.request = request
        self.sha = request.revision or ""
        self.repo = Repo.parse(ctx.settings.repo)
        self._client = client
        self._gh: GitHubClient | None = None
        self.github_deployment: int | None = None
        self.deployment_id: str | None = None
        self.steps_of: dict[str, set[str]] = defaultdict(set)
        self.final: dict[str, dict[str, StepState]] = defaultdict(dict)
        self.reasons: dict[str, str] = {}
        self.started: set[str] = set()
        self.reported: set[str] = set()
        self.failures = 0
        # GitHub App: `nixmox/deploy` is a check run listing the steps as they finish
        self.app_mode = ctx.settings.github_app_id is not None
        self._runs: CheckRuns | None = None
        self.step_ids: list[str] = []
        self.step_states: dict[str, StepState] = {}
        self.summary = "deploying"

    async def __call__(self, event: Event) -> None:
        try:
            await self.handle(event)
        except Exception:
            self._failed("handling %s", type(event).__name__)

    def _failed(self, what: str, *args: Any) -> None:
        self.failures += 1
        self.ctx.metrics.github_calls_failed.inc()
        log.warning("GitHub notification failed (" + what + ")", *args, exc_info=True)

    async def gh(self) -> GitHubClient:
        if self._gh is None:
            self._gh = await self._client()
        return self._gh

    async def handle(self, event: Event) -> None:
        if isinstance(event, DeploymentStarted):
            await self.started_deployment(event)
        elif isinstance(event, StepStarted):
            await self.step_started(event)
        elif isinstance(event, StepFinished):
            await self.step_finished(event)
        elif isinstance(event, DeploymentFinished):
            await self.finished(event)

    async def status(
        self, state: StatusState, context: str, description: str, target: str | None = None
    ) -> None:
        try:
            await set_status(
                await self.gh(),
                self.repo,
                self.sha,
                state,
                context,
                description,
                target or self.target,
            )
        except Exception:
            self._failed("status %s %s", context, state.value)

    async def deploy_check(self, state: StatusState, description: str) -> None:
        """`nixmox/deploy`: a status, or (App) a check run whose output lists every step."""
        if not self.app_mode:
            await self.status(state, DEPLOY_CONTEXT, description)
            return
        try:
            if self._runs is None:
                self._runs = CheckRuns(await self.gh(), self.repo)
            report = Report(state, description, self.target, summary=self.steps_table())
            if state is StatusState.PENDING:
                await self._runs.progress(self.sha, DEPLOY_CONTEXT, report)
            else:
                await self._runs.final(self.sha, DEPLOY_CONTEXT, report)
        except Exception:
            self._failed("check run %s %s", DEPLOY_CONTEXT, state.value)

    def steps_table(self) -> str:
        """Markdown: each step of the deployment with its state so far."""
        rows = [
            f"| {md_code(sid, in_table=True)} | {self.step_state(sid)} |" for sid in self.step_ids
        ]
        return "\n".join(["| step | state |", "| --- | --- |", *rows])

    def step_state(self, step_id: str) -> str:
        state = self.step_states.get(step_id)
        return state.value if state is not None else "waiting"

    @property
    def target(self) -> str | None:
        return self.ctx.deployment_url(self.deployment_id) if self.deployment_id else None

    async def started_deployment(self, event: DeploymentStarted) -> None:
        self.deployment_id = event.deployment_id
        self.step_ids = [sid for wave in event.plan.waves for sid in wave]
        for step in event.plan.steps:
            if step.service:
                self.steps_of[step.service].add(step.id)
        verb = "rolling back" if event.kind is DeploymentKind.ROLLBACK else "deploying"
        summary = f"{verb} {plan_size(event.plan)}"
        self.summary = summary
        await self.deploy_check(StatusState.PENDING, summary)
        await self.create_deployment(event, summary)
        await self.deployment_status(DeploymentStatusState.IN_PROGRESS, summary)

    async def create_deployment(self, event: DeploymentStarted, summary: str) -> None:
        data = {
            "ref": self.sha,
            "environment": self.ctx.settings.environment,
            "auto_merge": False,
            "required_contexts": [],
            "description": short(summary),
            "payload": {
                "nixmox_deployment": event.deployment_id,
                "digest": event.plan.digest,
                "trigger": self.request.trigger.value,
                "requested_by": self.request.requested_by,
            },
            "production_environment": True,
        }
        try:
            gh = await self.gh()
            created = await gh.post(
                "/repos/{owner}/{repo}/deployments", url_vars=self.repo.vars(), data=data
            )
            if isinstance(created, dict) and isinstance(created.get("id"), int):
                self.github_deployment = int(created["id"])
        except Exception:
            self._failed("creating the Deployment")

    async def deployment_status(self, state: str, description: str) -> None:
        if self.github_deployment is None:
            return
        data: dict[str, Any] = {"state": state, "description": short(description)}
        if self.target:
            data["log_url"] = self.target
        try:
            gh = await self.gh()
            await gh.post(
                "/repos/{owner}/{repo}/deployments/{deployment_id}/statuses",
                url_vars=self.repo.vars(deployment_id=self.github_deployment),
                data=data,
            )
        except Exception:
            self._failed("deployment status %s", state)

    async def step_started(self, event: StepStarted) -> None:
        service = event.step.service
        if service and service not in self.started:
            self.started.add(service)
            self.steps_of[service].add(event.step.id)
            await self.status(
                StatusState.PENDING, service_context(service), f"running {event.step.id}"
            )

    async def step_finished(self, event: StepFinished) -> None:
        self.step_states[event.step.id] = event.state
        if event.step.id not in self.step_ids:
            self.step_ids.append(event.step.id)
        if self.app_mode:
            done = f"{len(self.step_states)} of {len(self.step_ids)} steps done"
            await self.deploy_check(StatusState.PENDING, f"{self.summary}: {done}")
        service = event.step.service
        if not service:
            return
        self.steps_of[service].add(event.step.id)
        self.final[service][event.step.id] = event.state
        if event.reason:
            self.reasons[event.step.id] = event.reason
        if len(self.final[service]) >= len(self.steps_of[service]):
            await self.report_service(service)

    async def report_service(self, service: str) -> None:
        if service in self.reported:
            return
        self.reported.add(service)
        state, text = service_outcome(self.final[service], self.reasons)
        await self.status(state, service_context(service), text)

    async def finished(self, event: DeploymentFinished) -> None:
        for service in sorted(self.steps_of):
            if service not in self.reported and self.final.get(service):
                await self.report_service(service)
        state, deployment_state = FINAL_DEPLOYMENT_STATUS.get(
            event.state, (StatusState.ERROR, DeploymentStatusState.ERROR)
        )
        description = f"{event.state.value}: {self.summary_of(event)}"
        # the Deployment first: whoever sees `nixmox/deploy` final finds the Deployment final too
        await self.deployment_status(deployment_state, description)
        await self.deploy_check(state, description)

    def summary_of(self, event: DeploymentFinished) -> str:
        counts: dict[str, int] = defaultdict(int)
        for states in self.final.values():
            for state in states.values():
                counts[state.value] += 1
        if not counts:
            return "nothing ran"
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def notifier_factory(
    ctx: BotContext,
) -> Callable[[DeploymentRequest], Awaitable[Subscriber | None]]:
    """The subscriber factory registered in `ctx.subscriber_factories` when GitHub is on."""

    async def make(request: DeploymentRequest) -> Subscriber | None:
        if not request.revision or ctx.github is None or not ctx.settings.repo:
            return None
        github = ctx.github

        async def client() -> GitHubClient:
            return await github.client(request.installation_id)

        return GitHubNotifier(ctx, request, client)

    return make
