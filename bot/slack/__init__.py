"""The Slack bot: `/nixmox` slash commands, approvals, live progress, announcements.

`SlackFrontEnd` plugs into `bot.app.build_app` (`bot.frontend`): it mounts
`POST /slack/events`, runs the Slack job kinds, and subscribes the Slack progress notifier to
every deployment (from Slack, a merge, `/nixmox apply` or the CLI through the bot), and
reports in Slack the deployments a dead process left interrupted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from bot.context import BotContext
from bot.frontend import BaseFrontEnd, Method, Route
from bot.jobs import JobHandler
from bot.limits import SLACK_LIMIT, BodyRule
from bot.request import DeploymentRequest
from bot.slack.bot import EVENTS_PATH, SlackBot
from bot.slack.names import JobKind
from bot.slack.notifier import SlackNotifier
from deployments.monitor import MonitorListener
from state.deployments import DeploymentRecord
from state.events import Subscriber

SLACK_BOT: web.AppKey[SlackBot] = web.AppKey("nixmox_slack", SlackBot)


class SlackFrontEnd(BaseFrontEnd):
    """The Slack bot as a front end of the application."""

    name = "slack"

    def __init__(self, bot: SlackBot) -> None:
        self.bot = bot

    @classmethod
    def create(cls, app: web.Application, ctx: BotContext) -> SlackFrontEnd:
        bot = SlackBot(ctx)
        app[SLACK_BOT] = bot
        return cls(bot)

    def routes(self) -> Sequence[Route]:
        body = BodyRule(SLACK_LIMIT, self.bot.settings.slack_body_timeout)
        return (Route(Method.POST, EVENTS_PATH, self.bot.handle, body=body),)

    def job_handlers(self) -> Mapping[str, JobHandler]:
        return {JobKind.REQUEST: self.bot.run_request_job, JobKind.DEPLOY: self.bot.run_deploy_job}

    async def subscriber_for(self, request: DeploymentRequest) -> Subscriber | None:
        return await self.bot.subscriber_for(request)

    async def report_interrupted(self, record: DeploymentRecord) -> dict[str, Any] | None:
        return await self.bot.report_interrupted(record)

    def monitor_listener(self) -> MonitorListener | None:
        return self.bot.alerts

    async def start(self) -> None:
        await self.bot.start()

    async def close(self) -> None:
        await self.bot.close()


__all__ = ["SLACK_BOT", "SlackBot", "SlackFrontEnd", "SlackNotifier"]
