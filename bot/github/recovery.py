"""Reporting to GitHub a deployment a dead process left interrupted (see `bot.recovery`).

A `GitHubNotifier` gets `DeploymentFinished(interrupted)`, so `nixmox/deploy` and the
`nixmox/deploy/<service>` statuses still pending become `error` ("interrupted: the bot stopped
during verify:gitea") and the GitHub Deployment (found by its `nixmox_deployment` payload) gets
an `error` status.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from bot.context import BotContext
from bot.github.client import GitHubClient
from bot.github.notifier import GitHubNotifier
from bot.recovery import BOT_STOPPED, finished_event, never_started, request_of, where_stopped
from state.deployments import NEVER_STARTED, DeploymentRecord, StepRecord
from state.events import DeploymentFinished, StepState

# GitHub Deployments of the head commit searched for the one a deployment created
GITHUB_DEPLOYMENT_WINDOW = 300


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
