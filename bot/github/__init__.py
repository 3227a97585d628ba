"""The GitHub side of the bot: webhook, PR and branch plans, comment commands, deploy on merge,
statuses."""

from __future__ import annotations

from functools import partial

from aiohttp import web

from bot.context import BotContext
from bot.github.comments import run_command
from bot.github.events import JobKind
from bot.github.notifier import notifier_factory
from bot.github.pulls import plan_pull_request
from bot.github.push import deploy_push, plan_branch_push
from bot.github.webhook import github_webhook

WEBHOOK_PATH = "/github/webhook"


def setup_github(app: web.Application, ctx: BotContext) -> None:
    """Add the webhook route, the job handlers and the statuses/Deployments notifier."""
    app.router.add_post(WEBHOOK_PATH, github_webhook)
    ctx.job_handlers[JobKind.PLAN_PULL] = partial(plan_pull_request, ctx)
    ctx.job_handlers[JobKind.COMMAND] = partial(run_command, ctx)
    ctx.job_handlers[JobKind.DEPLOY_PUSH] = partial(deploy_push, ctx)
    ctx.job_handlers[JobKind.PLAN_BRANCH] = partial(plan_branch_push, ctx)
    ctx.subscriber_factories.append(notifier_factory(ctx))


__all__ = ["WEBHOOK_PATH", "setup_github"]
