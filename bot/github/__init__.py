"""The GitHub side of the bot: webhook, PR and branch plans, comment commands, deploy on merge,
statuses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from aiohttp import web

from bot.context import BotContext
from bot.frontend import BaseFrontEnd, Method, Route
from bot.github.comments import run_command
from bot.github.events import JobKind
from bot.github.notifier import notifier_factory
from bot.github.pulls import plan_pull_request
from bot.github.push import deploy_push, plan_branch_push
from bot.github.recovery import report_to_github
from bot.github.webhook import github_webhook
from bot.jobs import JobHandler
from bot.limits import GITHUB_LIMIT, BodyRule
from bot.request import DeploymentRequest
from state.deployments import DeploymentRecord
from state.events import Subscriber

WEBHOOK_PATH = "/github/webhook"


class GitHubFrontEnd(BaseFrontEnd):
    """The webhook route, the job handlers and the statuses/Deployments notifier."""

    name = "github"

    def __init__(self, ctx: BotContext) -> None:
        self.ctx = ctx
        self.notifier = notifier_factory(ctx)

    @classmethod
    def create(cls, app: web.Application, ctx: BotContext) -> GitHubFrontEnd:
        return cls(ctx)

    def routes(self) -> Sequence[Route]:
        body = BodyRule(GITHUB_LIMIT, self.ctx.settings.github_body_timeout)
        return (Route(Method.POST, WEBHOOK_PATH, github_webhook, body=body),)

    def job_handlers(self) -> Mapping[str, JobHandler]:
        return {
            JobKind.PLAN_PULL: partial(plan_pull_request, self.ctx),
            JobKind.COMMAND: partial(run_command, self.ctx),
            JobKind.DEPLOY_PUSH: partial(deploy_push, self.ctx),
            JobKind.PLAN_BRANCH: partial(plan_branch_push, self.ctx),
        }

    async def subscriber_for(self, request: DeploymentRequest) -> Subscriber | None:
        return await self.notifier(request)

    async def report_interrupted(self, record: DeploymentRecord) -> dict[str, Any] | None:
        return await report_to_github(self.ctx, record)


__all__ = ["WEBHOOK_PATH", "GitHubFrontEnd"]
