"""The Slack bot: `/nixmox` slash commands, approvals, live progress, announcements.

`setup_slack(app, ctx)` mounts `POST /slack/events`, registers the Slack job kinds and adds the
Slack progress notifier to `ctx.subscriber_factories`, so every deployment (from Slack, a merge,
`/nixmox apply` or the CLI through the bot) is reported in Slack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from bot.context import BotContext
from bot.slack.bot import EVENTS_PATH, JobKind, SlackBot
from bot.slack.notifier import SlackNotifier

SLACK_BOT: web.AppKey[SlackBot] = web.AppKey("nixmox_slack", SlackBot)


def setup_slack(app: web.Application, ctx: BotContext) -> None:
    """Mount the Slack endpoint and wire the Slack bot into the application."""
    bot = SlackBot(ctx)
    app[SLACK_BOT] = bot
    ctx.extras["slack"] = bot
    app.router.add_post(EVENTS_PATH, bot.handle)
    ctx.job_handlers[JobKind.REQUEST] = bot.run_request_job
    ctx.job_handlers[JobKind.DEPLOY] = bot.run_deploy_job
    ctx.subscriber_factories.append(bot.subscriber_for)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await bot.start()
        try:
            yield
        finally:
            await bot.close()

    app.cleanup_ctx.append(lifecycle)


__all__ = ["SLACK_BOT", "SlackBot", "SlackNotifier", "setup_slack"]
