"""Shared parts of the Slack front end: settings, policy, backend, Web API client, pacing,
redaction, the audit log, the job queue and the work done after an acknowledgement."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.context import BotContext
from bot.slack.approvals import (
    Policy,
)
from bot.slack.asks import Ask
from bot.slack.backend import (
    Backend,
    RepoBackend,
)
from bot.slack.blocks import (
    RequestStatus,
    RequestView,
    request_blocks,
    request_text,
)
from bot.slack.notifier import MessagePacer, SecretRedactor
from bot.slack.once import web_api_args
from planner.escape import slack_lines
from state.approvals import ApprovalRecord

log = logging.getLogger(__name__)

API_TIMEOUT = 15  # seconds per Web API call
MISSING_SECRET = "NIXMOX_SLACK_SIGNING_SECRET is required for Slack"
MISSING_TOKEN = "NIXMOX_SLACK_BOT_TOKEN is required when NIXMOX_SLACK_SIGNING_SECRET is set"
NO_APPROVERS = "NIXMOX_SLACK_APPROVERS is empty: Slack requests cannot be approved"


class SlackServices:
    """What the Slack command, button and run handlers share."""

    def __init__(self, ctx: BotContext, *, backend: Backend | None = None) -> None:
        settings = ctx.settings
        if settings.slack_signing_secret is None:
            raise ValueError(MISSING_SECRET)
        if settings.slack_bot_token is None:
            raise ValueError(MISSING_TOKEN)
        self.signing_secret = settings.slack_signing_secret.get_secret_value()
        self.ctx = ctx
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        if not self.policy.approvers:
            log.warning(NO_APPROVERS)
        self.backend: Backend = backend or RepoBackend(ctx)
        self.client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(),
            base_url=settings.slack_api_url,
            timeout=API_TIMEOUT,
        )
        self.redactor = SecretRedactor(values=secrets_of(ctx))
        # one edit per second per message at most, shared by the approval flow and progress
        self.pacer = MessagePacer()
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` after the acknowledgement; keep a reference until it is done."""
        task = asyncio.create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _guarded(work: Coroutine[Any, Any, Any]) -> None:
        try:
            await work
        except Exception:
            log.exception("Slack: background work failed")

    async def idle(self) -> None:
        """Wait until no after-the-ack work is running (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def enqueue(self, kind: str, payload: dict[str, Any]) -> None:
        """Hand slow work to the store's job queue (it survives a restart)."""
        await self.ctx.require_jobs().enqueue(kind, payload)

    async def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        try:
            await self.ctx.require_store().audit.record(actor, action, detail)
        except Exception:
            log.exception("Slack: could not write the audit log (%s %s)", actor, action)

    async def api(self, method: str, **args: Any) -> dict[str, Any] | None:
        try:
            response = await self.client.api_call(method, **web_api_args(method, args))
            return dict(response.data) if isinstance(response.data, dict) else {}
        except SlackApiError as exc:
            log.warning("Slack %s failed: %s", method, exc.response.get("error"))
            return None
        except Exception as exc:
            log.warning("Slack %s failed: %s", method, type(exc).__name__)
            return None

    async def ephemeral(self, channel: str, user: str, text: str) -> None:
        await self.api("chat.postEphemeral", channel=channel, user=user, text=text)

    async def show_request(
        self,
        channel: str,
        ts: str,
        view: RequestView,
        status: RequestStatus,
        plan: Any = None,
    ) -> None:
        """Edit a request's message (paced like every edit of a message)."""
        await self.pacer.wait(channel, ts)
        await self.api(
            "chat.update",
            channel=channel,
            ts=ts,
            text=request_text(view, status),
            blocks=request_blocks(view, status, plan),
        )
        self.pacer.edited(channel, ts)


def view_of(approval: ApprovalRecord, resolved_by: str | None = None) -> RequestView:
    """The approval message's view of a stored request."""
    args = approval.args or {}
    description = args.get("description")
    return RequestView(
        Ask.from_approval(approval),
        requested_by=approval.requested_by,
        head=args.get("revision") or (approval.plan.head if approval.plan else None),
        approval=approval,
        resolved_by=resolved_by or approval.resolved_by,
        extra=[slack_lines(description)] if description else [],
    )


def who_of(body: dict[str, Any]) -> tuple[str, str]:
    user = (body.get("user") or {}).get("id", "")
    channel = (body.get("channel") or {}).get("id", "")
    return str(user), str(channel)


def message_of(approval: ApprovalRecord, body: dict[str, Any]) -> tuple[str, str]:
    """The message a button was on (the stored one wins: it cannot be forged)."""
    message = body.get("message") or {}
    channel = approval.channel or (body.get("channel") or {}).get("id", "")
    ts = approval.ts or message.get("ts", "")
    return str(channel), str(ts)


def secrets_of(ctx: BotContext) -> list[str]:
    """Every secret the bot holds: none of them may ever be posted."""
    settings = ctx.settings
    values = []
    for secret in (
        settings.slack_bot_token,
        settings.slack_signing_secret,
        settings.github_token,
        settings.github_webhook_secret,
        settings.github_private_key,
    ):
        if secret is not None:
            values.append(secret.get_secret_value())
    return values
