"""The Slack front end: `/nixmox` commands, the approval flow, and the progress notifier.

HTTP: `POST /slack/events` checks Slack's signature and the 5-minute timestamp window itself
(anything wrong or unreadable → 401, before bolt sees it), refuses payloads nested too deeply
(400) and answers a replay of an already handled request with an empty 200 (`bot.slack.intake`),
then hands the request to slack-bolt's `AsyncApp`. Listeners acknowledge at once with a short
line; planning and deploying run afterwards, as jobs in the store's queue (so a restart loses
no accepted request), and talk back through the Web API. The work is split by concern:
`slash` (the command), `buttons` (Approve / Cancel / Re-plan), `runs` (approved requests),
`services` (what they share), `recovery` (interrupted deployments).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.signature import SignatureVerifier

from bot.context import BotContext
from bot.limits import received_body
from bot.request import DeploymentRequest
from bot.slack.alerts import SlackAlerts
from bot.slack.backend import (
    Backend,
)
from bot.slack.blocks import (
    ActionId,
    RequestStatus,
)
from bot.slack.buttons import ApprovalButtons
from bot.slack.intake import Unreadable, bolt_request, first_time
from bot.slack.names import SYSTEM_ACTOR, Audit, origin
from bot.slack.notifier import SlackNotifier
from bot.slack.progress import Byline
from bot.slack.recovery import InterruptionReport
from bot.slack.runs import ApprovedRuns
from bot.slack.services import SlackServices, view_of
from bot.slack.slash import STORE_UNAVAILABLE, SlashCommands
from state.deployments import DeploymentRecord
from state.events import Subscriber

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
SLASH_COMMAND = "/nixmox"
EXPIRY_SWEEP_INTERVAL = 60.0


UNAUTHORIZED = {"error": "invalid request signature"}
REPLAYED = "Slack: a repeat of an already handled request (same timestamp and signature) ignored"


def verify_signature(verifier: SignatureVerifier, body: bytes, headers: Any) -> bool:
    """Slack's HMAC over `v0:{timestamp}:{body}`, within 5 minutes; never raises."""
    timestamp = headers.get("X-Slack-Request-Timestamp")
    signature = headers.get("X-Slack-Signature")
    if not timestamp or not signature or not timestamp.isascii() or not signature.isascii():
        return False
    if not timestamp.isdigit() or len(timestamp) > 12:
        return False
    try:
        return verifier.is_valid(body=body, timestamp=timestamp, signature=signature)
    except (ValueError, TypeError):
        return False


class SlackBot:
    """The Slack front end of one application (see the module docstring)."""

    def __init__(self, ctx: BotContext, *, backend: Backend | None = None) -> None:
        self.core = SlackServices(ctx, backend=backend)
        self.ctx = ctx
        self.settings = ctx.settings
        self.client = self.core.client
        self.pacer = self.core.pacer
        self.redactor = self.core.redactor
        self.verifier = SignatureVerifier(self.core.signing_secret)
        self.slash = SlashCommands(self.core)
        self.buttons = ApprovalButtons(self.core)
        self.runs = ApprovedRuns(self.core)
        self.alerts = SlackAlerts(self.core, self.slash)
        self.interruptions = InterruptionReport(
            self.client,
            self.pacer,
            self.redactor.text,
            ctx.require_store,
            self.settings.slack_channel,
        )
        self.expiry_sweep_interval = EXPIRY_SWEEP_INTERVAL
        self.bolt = AsyncApp(
            name="nixmox",
            signing_secret=self.core.signing_secret,
            client=self.client,
            logger=log,
            process_before_response=False,
        )
        self.bolt.command(SLASH_COMMAND)(self.slash.on_command)
        self.bolt.action(str(ActionId.APPROVE))(self.buttons.on_approve)
        self.bolt.action(str(ActionId.CANCEL))(self.buttons.on_cancel)
        self.bolt.action(str(ActionId.REPLAN))(self.buttons.on_replan)
        self.bolt.action(str(ActionId.REDEPLOY))(self.alerts.on_redeploy)
        self._sweeper: asyncio.Task[None] | None = None

    async def idle(self) -> None:
        """Wait until no after-the-ack work is running (tests, shutdown)."""
        await self.core.idle()

    async def run_request_job(self, payload: dict[str, Any]) -> None:
        """The `slack.request` job: plan a request and post it for approval."""
        await self.slash.run_request_job(payload)

    async def run_deploy_job(self, payload: dict[str, Any]) -> None:
        """The `slack.deploy` job: run an approved request once."""
        await self.runs.run_deploy_job(payload)

    async def report_interrupted(self, record: DeploymentRecord) -> dict[str, Any]:
        """Finish the message of a deployment a dead process left interrupted (or announce
        it in NIXMOX_SLACK_CHANNEL); what was done."""
        return await self.interruptions.report(record)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`POST /slack/events`: 401 unless signed by Slack in the last 5 minutes; once each."""
        body = received_body(request)  # within its size and time limits (bot.limits)
        if not verify_signature(self.verifier, body, request.headers):
            return web.json_response(UNAUTHORIZED, status=401)
        try:
            parsed = bolt_request(request, body)  # the form / JSON payload, depth checked
        except Unreadable as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            if not await first_time(self.ctx.require_store(), request.headers):
                log.info(REPLAYED)
                return web.Response(status=200)
        except Exception:
            log.exception("Slack: could not record the request")
            return web.Response(text=STORE_UNAVAILABLE)
        response = await self.bolt.async_dispatch(parsed)
        return await to_aiohttp_response(response)

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="nixmox-slack-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.idle()

    async def subscriber_for(self, request: DeploymentRequest) -> Subscriber | None:
        """Progress in Slack: the request's own message, or an announcement in the channel."""
        slack = request.extra.get("slack") or {}
        channel, ts = slack.get("channel"), slack.get("ts")
        if not (channel and ts):
            channel, ts = self.settings.slack_channel, None
        if not channel:
            return None
        notifier = SlackNotifier(
            self.client,
            channel,
            ts=ts,
            byline=Byline(
                title=request.extra.get("title"),
                requested_by=request.requested_by,
                approved_by=request.approved_by,
                origin=origin(request),
            ),
            pacer=self.pacer,
            redact=self.redactor.text,
            on_message=functools.partial(self.remember_message, request),
        )
        return notifier

    async def remember_message(
        self, request: DeploymentRequest, deployment_id: str, channel: str, ts: str
    ) -> None:
        """Record a deployment's message, so a restart can report an interruption in it."""
        title, where = request.extra.get("title"), origin(request)
        try:
            await self.ctx.require_store().slack_messages.remember(
                deployment_id, channel, ts, title=title, origin=where
            )
        except Exception:
            log.exception("Slack: could not record the message of deployment %s", deployment_id)
        detail = {
            "deployment": deployment_id,
            "channel": channel,
            "ts": ts,
            "title": title,
            "origin": where,
        }
        await self.core.audit(SYSTEM_ACTOR, Audit.MESSAGE, detail)

    async def _sweep_expired(self) -> None:
        """Mark requests past their TTL expired and say so in their messages."""
        while True:
            await asyncio.sleep(self.expiry_sweep_interval)
            try:
                for approval in await self.ctx.require_store().approvals.expire():
                    await self.core.audit(SYSTEM_ACTOR, Audit.EXPIRED, {"approval": approval.id})
                    if approval.channel and approval.ts:
                        await self.core.show_request(
                            approval.channel,
                            approval.ts,
                            view_of(approval),
                            RequestStatus.EXPIRED,
                            approval.plan,
                        )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Slack: the expiry sweep failed")
