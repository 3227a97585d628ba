"""The Slack front end: `/nixmox` commands, the approval flow, and the progress notifier.

HTTP: `POST /slack/events` checks Slack's signature and the 5-minute timestamp window itself
(anything wrong or unreadable → 401, before bolt sees it), then hands the request to
slack-bolt's `AsyncApp` through its aiohttp adapter. Listeners acknowledge at once with a short
line; planning and deploying run afterwards, as jobs in the store's queue (so a restart loses
no accepted request), and talk back through the Web API.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Coroutine
from enum import StrEnum
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.async_app import AsyncAck, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.commands import (
    ApplyCommand,
    Command,
    DeployCommand,
    HelpCommand,
    HistoryCommand,
    LockCommand,
    ParseError,
    PlanCommand,
    RollbackCommand,
    StatusCommand,
    UnlockCommand,
    help_text,
    parse_command,
)
from bot.context import BotContext, DeploymentRequest
from bot.slack.approvals import (
    REFUSAL_TEXT,
    Policy,
    Refusal,
    approval_refusal,
    cancel_refusal,
    lock_refusal,
    parse_button_value,
    plan_changed,
    request_refusal,
    slack_actor,
)
from bot.slack.backend import (
    Ask,
    Backend,
    PlanFailure,
    Planned,
    RefRefused,
    RepoBackend,
    ref_refusal,
)
from bot.slack.blocks import (
    ActionId,
    RequestStatus,
    RequestView,
    request_blocks,
    request_text,
    text_blocks,
)
from bot.slack.notifier import MessagePacer, SecretRedactor, SlackNotifier
from bot.slack.status import history_text, status_text
from planner.escape import slack_lines
from planner.plan import Plan
from planner.render import render_slack
from runners.base import (
    DeploymentKind,
    DeploymentStarted,
    Event,
    Subscriber,
    Trigger,
    utcnow,
)
from runners.deploy import DeployError
from state.approvals import ApprovalRecord, ApprovalState
from state.locks import LockBusy

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
SLASH_COMMAND = "/nixmox"
SYSTEM_ACTOR = "nixmox"
API_TIMEOUT = 15  # seconds per Web API call
EXPIRY_SWEEP_INTERVAL = 60.0


class JobKind(StrEnum):
    """Job kinds in the store's queue that the Slack front end runs."""

    REQUEST = "slack.request"  # plan a deploy/rollback request and post it for approval
    DEPLOY = "slack.deploy"  # run an approved request


class Audit(StrEnum):
    """Audit-log actions of the Slack front end."""

    REQUEST = "slack.request"
    REQUEST_REFUSED = "slack.request.refused"
    REQUEST_FAILED = "slack.request.failed"
    APPROVED = "slack.approval.approved"
    REFUSED = "slack.approval.refused"
    CANCELLED = "slack.approval.cancelled"
    EXPIRED = "slack.approval.expired"
    NOT_STARTED = "slack.deploy.not_started"
    LOCK = "slack.lock"
    UNLOCK = "slack.unlock"
    MESSAGE = "slack.deployment.message"  # which message shows a deployment (crash reports)


UNAUTHORIZED = {"error": "invalid request signature"}
MALFORMED = {"error": "the request body is not a Slack payload"}
ACK_PLANNING = ":hourglass_flowing_sand: Planning {what}… the plan will be posted in <#{channel}>."
ACK_PLAN = ":hourglass_flowing_sand: Planning {what}…"
ACK_LOOKUP = ":mag: Looking that up…"
APPLY_ELSEWHERE = (
    "`apply` works in pull request comments; in Slack use `/nixmox deploy <service>|all`."
)
CANNOT_POST = (
    "I could not post in <#{channel}> ({error}). Invite me there (`/invite @nixmox`) or set "
    "NIXMOX_SLACK_CHANNEL to a channel I am in."
)
CHECK_FAILED = "Could not check that the plan is still current ({error}); nothing was deployed."
DEPLOYMENT_LOCK = (
    ":lock: *{service}* is locked by running {holder}; it will be released when that "
    "deployment ends."
)
CLAIM_PREFIX = "starting:"  # an approval claimed by a deploy job whose deployment has no id yet
ALREADY_DEPLOYED = (
    ":information_source: This request was already deployed as {deployment}; "
    "it is not deployed again."
)
RUN_STOPPED = (
    ":warning: An earlier run of this approved request stopped before its deployment started; "
    "it is not run again. Request the deployment again to go on."
)
NOT_APPROVED = "This request is {state}, not approved; nothing was deployed."
STORE_UNAVAILABLE = ":x: The state store did not answer; try again in a moment."
MISSING_TOKEN = "NIXMOX_SLACK_BOT_TOKEN is required when NIXMOX_SLACK_SIGNING_SECRET is set"


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


def describe(ask: Ask) -> str:
    if ask.kind is DeploymentKind.ROLLBACK:
        to = f" to {ask.to}" if ask.to else ""
        return f"a rollback of {ask.target}{to}"
    ref = f" @ {ask.ref}" if ask.ref else ""
    return f"a deployment of {ask.target}{ref}"


class SlackBot:
    """The Slack front end of one application (see the module docstring)."""

    def __init__(self, ctx: BotContext, *, backend: Backend | None = None) -> None:
        settings = ctx.settings
        if settings.slack_signing_secret is None:
            raise ValueError("NIXMOX_SLACK_SIGNING_SECRET is required for Slack")
        if settings.slack_bot_token is None:
            raise ValueError(MISSING_TOKEN)
        secret = settings.slack_signing_secret.get_secret_value()
        token = settings.slack_bot_token.get_secret_value()
        self.ctx = ctx
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        if not self.policy.approvers:
            log.warning("NIXMOX_SLACK_APPROVERS is empty: Slack requests cannot be approved")
        self.backend: Backend = backend or RepoBackend(ctx)
        self.verifier = SignatureVerifier(secret)
        self.client = AsyncWebClient(
            token=token, base_url=settings.slack_api_url, timeout=API_TIMEOUT
        )
        self.redactor = SecretRedactor(values=_secrets(ctx))
        # one edit per second per message at most, shared by the approval flow and progress
        self.pacer = MessagePacer()
        self.expiry_sweep_interval = EXPIRY_SWEEP_INTERVAL
        self.bolt = AsyncApp(
            name="nixmox",
            signing_secret=secret,
            client=self.client,
            logger=log,
            process_before_response=False,
        )
        self.bolt.command(SLASH_COMMAND)(self.on_command)
        self.bolt.action(str(ActionId.APPROVE))(self.on_approve)
        self.bolt.action(str(ActionId.CANCEL))(self.on_cancel)
        self.bolt.action(str(ActionId.REPLAN))(self.on_replan)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # -- HTTP ----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`POST /slack/events`: 401 unless signed by Slack in the last 5 minutes."""
        body = await request.read()
        if not verify_signature(self.verifier, body, request.headers):
            return web.json_response(UNAUTHORIZED, status=401)
        try:
            bolt_request = await to_bolt_request(request)  # parses the form / JSON payload
        except ValueError:  # not UTF-8, or a `payload` that is not JSON
            return web.json_response(MALFORMED, status=400)
        response = await self.bolt.async_dispatch(bolt_request)
        return await to_aiohttp_response(response)

    # -- background work -----------------------------------------------------------------

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

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="nixmox-slack-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.idle()

    async def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        try:
            await self.ctx.require_store().audit.record(actor, action, detail)
        except Exception:
            log.exception("Slack: could not write the audit log (%s %s)", actor, action)

    # -- Web API helpers (errors are logged, never raised) --------------------------------

    async def api(self, method: str, **args: Any) -> dict[str, Any] | None:
        try:
            response = await self.client.api_call(method, json=args)
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

    # -- the slash command ---------------------------------------------------------------

    async def on_command(
        self, ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond
    ) -> None:
        """`/nixmox …`: acknowledge with a short line, then do the work."""
        parsed = parse_command(command.get("text") or "")
        user = command.get("user_id", "")
        channel = command.get("channel_id", "")
        if isinstance(parsed, ParseError):
            await ack(text=parsed.render(), response_type="ephemeral")
            return
        await self.dispatch(parsed, user, channel, ack, respond)

    async def dispatch(
        self,
        command: Command,
        user: str,
        channel: str,
        ack: AsyncAck,
        respond: AsyncRespond,
    ) -> None:
        if isinstance(command, HelpCommand):
            await ack(text=help_text(SLASH_COMMAND), response_type="ephemeral")
        elif isinstance(command, ApplyCommand):
            await ack(text=APPLY_ELSEWHERE, response_type="ephemeral")
        elif isinstance(command, DeployCommand | RollbackCommand):
            if isinstance(command, DeployCommand):
                ask = Ask(DeploymentKind.DEPLOY, command.service, ref=command.ref)
            else:
                ask = Ask(DeploymentKind.ROLLBACK, command.service, to=command.to)
            await self.request(ask, user, channel, ack, respond)
        elif isinstance(command, PlanCommand):
            ask = Ask(DeploymentKind.DEPLOY, command.service, ref=command.ref)
            await ack(text=ACK_PLAN.format(what=describe(ask)), response_type="ephemeral")
            self.spawn(self.show_plan(ask, respond))
        elif isinstance(command, StatusCommand | HistoryCommand):
            await ack(text=ACK_LOOKUP, response_type="ephemeral")
            render = status_text if isinstance(command, StatusCommand) else history_text
            self.spawn(self.reply_with(respond, render(self.ctx.require_store(), command.service)))
        elif isinstance(command, LockCommand | UnlockCommand):
            refusal = lock_refusal(self.policy, user)
            if refusal is not None:
                await self.refuse_request(ack, user, refusal, {"command": command.name.value})
                return
            await ack(text=ACK_LOOKUP, response_type="ephemeral")
            self.spawn(self.lock(command, user, respond))

    async def reply_with(self, respond: AsyncRespond, text: Awaitable[str]) -> None:
        """Answer the asker with a text computed after the ack."""
        try:
            body = await text
        except Exception:
            log.exception("Slack: could not answer a lookup")
            body = STORE_UNAVAILABLE
        await respond(text=body, blocks=text_blocks(body), response_type="ephemeral")

    async def refuse_request(
        self, ack: AsyncAck, user: str, refusal: Refusal, detail: dict[str, Any]
    ) -> None:
        await ack(text=REFUSAL_TEXT[refusal], response_type="ephemeral")
        await self.audit(
            slack_actor(user), Audit.REQUEST_REFUSED, {**detail, "reason": refusal.value}
        )

    async def request(
        self, ask: Ask, user: str, channel: str, ack: AsyncAck, respond: AsyncRespond
    ) -> None:
        """A deploy or rollback request: check the requester, ack, then plan in a job."""
        refusal = request_refusal(self.policy, user)
        if refusal is not None:
            await self.refuse_request(ack, user, refusal, {"kind": ask.kind.value, **_ask(ask)})
            return
        refused_ref = ref_refusal(ask.ref)
        if refused_ref is not None:
            await ack(text=f":no_entry: {slack_lines(refused_ref)}", response_type="ephemeral")
            await self.audit_refused_ref(user, ask, refused_ref)
            return
        target = self.settings.slack_channel or channel
        await ack(
            text=ACK_PLANNING.format(what=slack_lines(describe(ask)), channel=target),
            response_type="ephemeral",
        )
        self.spawn(self.post_request(ask, user, target, respond))

    async def audit_refused_ref(self, user: str, ask: Ask, reason: str) -> None:
        detail = {"kind": ask.kind.value, **_ask(ask), "reason": "ref refused", "error": reason}
        await self.audit(slack_actor(user), Audit.REQUEST_REFUSED, detail)

    async def post_request(self, ask: Ask, user: str, channel: str, respond: AsyncRespond) -> None:
        """Post the request's message ("planning…") and queue its planning."""
        if ask.ref is not None:
            try:  # fork code is refused before anything is posted
                await self.backend.check_ref(ask.ref)
            except RefRefused as exc:
                text = f":no_entry: {slack_lines(str(exc))}"
                await respond(text=text, response_type="ephemeral")
                await self.audit_refused_ref(user, ask, str(exc))
                return
            except PlanFailure:
                pass  # an unknown ref: planning says so in the request's message
        view = RequestView(ask.kind, ask.target, slack_actor(user), ref=ask.ref, to=ask.to)
        posted = await self._post(channel, view, respond)
        if posted is None:
            return
        await self.enqueue(
            JobKind.REQUEST,
            {
                "ask": _ask(ask),
                "kind": ask.kind.value,
                "user": user,
                "channel": channel,
                "ts": posted,
            },
        )

    async def _post(self, channel: str, view: RequestView, respond: AsyncRespond) -> str | None:
        status = RequestStatus.PLANNING
        try:
            response = await self.client.chat_postMessage(
                channel=channel,
                text=request_text(view, status),
                blocks=request_blocks(view, status, None),
            )
        except SlackApiError as exc:
            error = str(exc.response.get("error"))
            log.warning("Slack: cannot post the request in %s: %s", channel, error)
            await self.audit(
                view.requested_by, Audit.REQUEST_FAILED, {"channel": channel, "error": error}
            )
            # the bot may not be in that channel: answer through the command's response_url
            text = CANNOT_POST.format(channel=channel, error=slack_lines(error))
            await respond(text=text, response_type="ephemeral")
            return None
        self.pacer.edited(channel, str(response.get("ts")))
        return str(response.get("ts"))

    async def show_plan(self, ask: Ask, respond: AsyncRespond) -> None:
        """`/nixmox plan`: the plan, only for the asker."""
        try:
            planned = await self.backend.plan(ask)
        except PlanFailure as exc:
            error = slack_lines(self.redactor.text(str(exc)))
            await respond(text=f":x: Could not plan: {error}", response_type="ephemeral")
            return
        message = render_slack(planned.plan, title=f"Plan: {ask.target}")
        await respond(text=message["text"], blocks=message["blocks"], response_type="ephemeral")

    async def lock(
        self, command: LockCommand | UnlockCommand, user: str, respond: AsyncRespond
    ) -> None:
        store = self.ctx.require_store()
        actor = slack_actor(user)
        service = slack_lines(command.service)
        if isinstance(command, LockCommand):
            try:
                await store.locks.lock(command.service, actor, command.reason)
            except LockBusy as busy:
                await respond(text=f":lock: {slack_lines(str(busy))}", response_type="ephemeral")
                return
            reason = f": {slack_lines(command.reason)}" if command.reason else ""
            text = f":lock: <@{user}> locked *{service}*{reason}. Deployments of it are refused."
            await self.audit(
                actor, Audit.LOCK, {"service": command.service, "reason": command.reason}
            )
        else:
            result = await store.locks.unlock(command.service)  # Slack never forces
            if result.deployment_lock is not None:
                holder = slack_lines(result.deployment_lock.holder)
                text = DEPLOYMENT_LOCK.format(service=service, holder=holder)
                await respond(text=text, response_type="ephemeral")
                return
            if not result.removed:
                await respond(text=f"*{service}* was not locked.", response_type="ephemeral")
                return
            text = f":unlock: <@{user}> unlocked *{service}*."
            await self.audit(actor, Audit.UNLOCK, {"service": command.service})
        await respond(text=text, response_type="in_channel")

    # -- planning a request (a job) ------------------------------------------------------

    async def run_request_job(self, payload: dict[str, Any]) -> None:
        ask = _ask_from(payload["kind"], payload["ask"])
        await self.plan_request(ask, payload["user"], payload["channel"], payload["ts"])

    async def plan_request(self, ask: Ask, user: str, channel: str, ts: str) -> None:
        """Plan, record a pending approval, and show the plan with Approve / Cancel."""
        actor = slack_actor(user)
        view = RequestView(ask.kind, ask.target, actor, ref=ask.ref, to=ask.to)
        try:
            planned = await self.backend.plan(ask)
        except PlanFailure as exc:
            view.error = self.redactor.text(str(exc))
            await self.show_request(channel, ts, view, RequestStatus.FAILED)
            await self.audit(actor, Audit.REQUEST_FAILED, {**_ask(ask), "error": view.error})
            return
        plan = planned.plan
        view.head = planned.revision or plan.head
        if planned.description:
            view.extra = [slack_lines(planned.description)]
        if not plan.ok:
            view.error = f"the manifest has {len(plan.errors)} error(s)"
            await self.show_request(channel, ts, view, RequestStatus.FAILED, plan)
            await self.audit(actor, Audit.REQUEST_FAILED, {**_ask(ask), "error": view.error})
            return
        if not plan.steps:
            await self.show_request(channel, ts, view, RequestStatus.NOTHING_TO_DO, plan)
            await self.audit(actor, Audit.REQUEST, {**_ask(ask), "outcome": "nothing to do"})
            return
        store = self.ctx.require_store()
        approval_id = await store.approvals.create(
            kind=ask.kind.value,
            requested_by=actor,
            digest=plan.digest,
            ttl=self.policy.ttl,
            plan=plan,
            service=ask.service,
            args={**ask.args(), "revision": view.head, "description": planned.description},
            channel=channel,
            ts=ts,
        )
        approval = await store.approvals.get(approval_id)
        view.approval_id, view.digest = approval_id, plan.digest
        view.expires_at = approval.expires_at if approval is not None else None
        await self.show_request(channel, ts, view, RequestStatus.PENDING, plan)
        await self.audit(
            actor,
            Audit.REQUEST,
            {**_ask(ask), "approval": approval_id, "digest": plan.digest, "channel": channel},
        )
        if ask.kind is DeploymentKind.DEPLOY:
            await self.show_previews(channel, ts, view, plan)

    async def show_previews(self, channel: str, ts: str, view: RequestView, plan: Plan) -> None:
        """Add the per-host summary to a pending request's message once the builds are done."""
        from bot.slack.previews import preview_for_approval

        summary = await preview_for_approval(self.ctx, plan, view.head, self.backend.git.path)
        if summary is None or view.approval_id is None:
            return
        approval = await self.ctx.require_store().approvals.get(view.approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return  # approved or cancelled meanwhile: that message stays
        view.extra = [*view.extra, summary]
        await self.show_request(channel, ts, view, RequestStatus.PENDING, plan)

    # -- buttons -------------------------------------------------------------------------

    async def on_approve(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.spawn(self.approve(body, action))

    async def on_cancel(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.spawn(self.cancel(body, action))

    async def on_replan(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.spawn(self.replan(body, action))

    async def _approval_for(
        self, body: dict[str, Any], value: str | None
    ) -> tuple[ApprovalRecord, str] | None:
        """The approval a button refers to (and the digest it carries), or tell the user."""
        user, channel = _who(body)
        parsed = parse_button_value(value)
        approval = None
        if parsed is not None:
            approval = await self.ctx.require_store().approvals.get(parsed[0])
        if approval is None or parsed is None:
            await self.ephemeral(channel, user, REFUSAL_TEXT[Refusal.UNKNOWN_REQUEST])
            await self.audit(slack_actor(user), Audit.REFUSED, {"reason": "unknown request"})
            return None
        return approval, parsed[1]

    async def approve(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Approve: only approvers, not one's own (unless allowed), unexpired, same plan."""
        found = await self._approval_for(body, action.get("value"))
        if found is None:
            return
        approval, digest = found
        user, _ = _who(body)
        refusal = approval_refusal(self.policy, approval, user, now=utcnow(), button_digest=digest)
        if refusal is not None:
            await self.refuse_approval(approval, user, refusal)
            return
        planned = await self._replan(approval, body)
        if planned is None:
            return
        if plan_changed(approval, planned.plan.digest):
            await self.refuse_approval(approval, user, Refusal.PLAN_CHANGED)
            return
        store = self.ctx.require_store()
        actor = slack_actor(user)
        if not await store.approvals.resolve(approval.id, ApprovalState.APPROVED, actor):
            # someone else got there first, or it expired while the plan was checked
            latest = await store.approvals.get(approval.id) or approval
            expired = latest.expires_at <= utcnow()
            await self.refuse_approval(
                latest, user, Refusal.EXPIRED if expired else Refusal.NOT_PENDING
            )
            return
        await self._start(approval, planned, actor, body)

    async def _replan(self, approval: ApprovalRecord, body: dict[str, Any]) -> Planned | None:
        """The request planned again now, to compare with what the approver saw."""
        user, channel = _who(body)
        try:
            return await self.backend.plan(Ask.from_approval(approval))
        except PlanFailure as exc:
            error = self.redactor.text(str(exc))
            await self.ephemeral(channel, user, CHECK_FAILED.format(error=slack_lines(error)))
            detail = {"approval": approval.id, "reason": "check failed", "error": error}
            await self.audit(slack_actor(user), Audit.REFUSED, detail)
            return None

    async def _start(
        self, approval: ApprovalRecord, planned: Planned, actor: str, body: dict[str, Any]
    ) -> None:
        """Say who approved, record it, and queue the deployment of exactly the approved plan."""
        channel, ts = _message(approval, body)
        view = view_of(approval, resolved_by=actor)
        await self.show_request(channel, ts, view, RequestStatus.APPROVED, approval.plan)
        detail = {
            "approval": approval.id,
            "digest": approval.digest,
            "requested_by": approval.requested_by,
        }
        await self.audit(actor, Audit.APPROVED, detail)
        # the stored plan is the one shown; its digest was just checked against a fresh one
        planned.plan = approval.plan or planned.plan
        payload = {
            "approval": approval.id,
            "planned": planned.to_json(),
            "approved_by": actor,
            "channel": channel,
            "ts": ts,
        }
        await self.enqueue(JobKind.DEPLOY, payload)

    async def refuse_approval(self, approval: ApprovalRecord, user: str, refusal: Refusal) -> None:
        """Tell the clicker why; an expired or outdated request also says so in its message."""
        actor = slack_actor(user)
        channel, ts = approval.channel or "", approval.ts or ""
        if refusal in {Refusal.EXPIRED, Refusal.PLAN_CHANGED}:
            state = ApprovalState.EXPIRED if refusal is Refusal.EXPIRED else ApprovalState.REFUSED
            if approval.state is ApprovalState.PENDING:
                await self.ctx.require_store().approvals.resolve(approval.id, state, actor)
            status = (
                RequestStatus.EXPIRED if refusal is Refusal.EXPIRED else RequestStatus.PLAN_CHANGED
            )
            if channel and ts:
                await self.show_request(channel, ts, view_of(approval), status, approval.plan)
        if channel:
            await self.ephemeral(channel, user, REFUSAL_TEXT[refusal])
        await self.audit(
            actor,
            Audit.REFUSED,
            {
                "approval": approval.id,
                "reason": refusal.value,
                "requested_by": approval.requested_by,
            },
        )

    async def cancel(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        found = await self._approval_for(body, action.get("value"))
        if found is None:
            return
        approval, _ = found
        user, channel = _who(body)
        actor = slack_actor(user)
        refusal = cancel_refusal(self.policy, approval, user)
        if refusal is None and not await self.ctx.require_store().approvals.resolve(
            approval.id, ApprovalState.CANCELLED, actor
        ):
            refusal = Refusal.NOT_PENDING
        if refusal is not None:
            await self.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await self.audit(
                actor,
                Audit.REFUSED,
                {"approval": approval.id, "reason": refusal.value, "action": "cancel"},
            )
            return
        view = view_of(approval, resolved_by=actor)
        await self.show_request(
            *_message(approval, body), view, RequestStatus.CANCELLED, approval.plan
        )
        await self.audit(
            actor, Audit.CANCELLED, {"approval": approval.id, "requested_by": approval.requested_by}
        )

    async def replan(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Re-plan an expired or outdated request in place, as a new request of the clicker."""
        user, channel = _who(body)
        approval = await self.ctx.require_store().approvals.get(str(action.get("value") or ""))
        if approval is None:
            await self.ephemeral(channel, user, REFUSAL_TEXT[Refusal.UNKNOWN_REQUEST])
            return
        refusal = request_refusal(self.policy, user)
        if refusal is not None:
            await self.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await self.audit(
                slack_actor(user),
                Audit.REQUEST_REFUSED,
                {"approval": approval.id, "reason": refusal.value},
            )
            return
        ask = Ask.from_approval(approval)
        message_channel, ts = _message(approval, body)
        view = RequestView(ask.kind, ask.target, slack_actor(user), ref=ask.ref, to=ask.to)
        await self.show_request(message_channel, ts, view, RequestStatus.PLANNING)
        await self.enqueue(
            JobKind.REQUEST,
            {
                "ask": _ask(ask),
                "kind": ask.kind.value,
                "user": user,
                "channel": message_channel,
                "ts": ts,
            },
        )

    # -- running an approved request (a job) ---------------------------------------------

    async def run_deploy_job(self, payload: dict[str, Any]) -> None:
        """Deploy an approved request once: a rerun of the job (after a crash) never redeploys."""
        store = self.ctx.require_store()
        approval = await store.approvals.get(payload["approval"])
        if approval is None:
            log.error("Slack: approved request %s is gone; not deploying", payload["approval"])
            return
        # claim the approval before anything runs; the real deployment id replaces the
        # placeholder as soon as the deployment starts
        placeholder = f"{CLAIM_PREFIX}{store.deployments.new_id()}"
        if not await store.approvals.claim_for_deployment(approval.id, placeholder):
            await self.refuse_rerun(approval.id, payload)
            return
        claim = functools.partial(self.record_claim, approval.id, placeholder)
        planned = Planned.from_json(payload["planned"])
        view = view_of(approval, resolved_by=payload["approved_by"])
        request = DeploymentRequest(
            trigger=Trigger.SLACK,
            requested_by=approval.requested_by,
            revision=planned.revision or planned.plan.head,
            kind=DeploymentKind(approval.kind),
            approved_by=payload["approved_by"],
            extra={
                "slack": {"channel": payload["channel"], "ts": payload["ts"]},
                "title": view.title(),
                "approval": approval.id,
            },
        )
        try:
            await self.backend.run(planned, request, subscribers=[claim])
        except DeployError as exc:
            view.error = self.redactor.text(str(exc))
            await self.show_request(
                payload["channel"], payload["ts"], view, RequestStatus.NOT_STARTED, planned.plan
            )
            await self.audit(
                payload["approved_by"],
                Audit.NOT_STARTED,
                {"approval": approval.id, "error": view.error},
            )

    async def record_claim(self, approval_id: str, placeholder: str, event: Event) -> None:
        """A subscriber: put the started deployment's id on the approval it carries out."""
        if isinstance(event, DeploymentStarted):
            store = self.ctx.require_store()
            await store.approvals.claim_for_deployment(
                approval_id, event.deployment_id, replacing=placeholder
            )

    async def refuse_rerun(self, approval_id: str, payload: dict[str, Any]) -> None:
        """Say in the request's thread why a deploy job did not deploy (again)."""
        approval = await self.ctx.require_store().approvals.get(approval_id)
        used = approval.deployment_id if approval is not None else None
        if used is None:
            state = approval.state.value if approval is not None else "gone"
            text = NOT_APPROVED.format(state=state)
        elif used.startswith(CLAIM_PREFIX):
            text = RUN_STOPPED
        else:
            text = ALREADY_DEPLOYED.format(deployment=used)
        log.warning("Slack: request %s not run again: %s", approval_id, text)
        await self.api(
            "chat.postMessage", channel=payload["channel"], thread_ts=payload["ts"], text=text
        )
        await self.audit(
            SYSTEM_ACTOR,
            Audit.NOT_STARTED,
            {"approval": approval_id, "error": text, "deployment": used},
        )

    # -- the notifier ----------------------------------------------------------------------

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
            title=request.extra.get("title"),
            requested_by=request.requested_by,
            approved_by=request.approved_by,
            origin=origin(request),
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
        await self.audit(SYSTEM_ACTOR, Audit.MESSAGE, detail)

    # -- expiry ----------------------------------------------------------------------------

    async def _sweep_expired(self) -> None:
        """Mark requests past their TTL expired and say so in their messages."""
        while True:
            await asyncio.sleep(self.expiry_sweep_interval)
            try:
                for approval in await self.ctx.require_store().approvals.expire():
                    await self.audit(SYSTEM_ACTOR, Audit.EXPIRED, {"approval": approval.id})
                    if approval.channel and approval.ts:
                        await self.show_request(
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


def origin(request: DeploymentRequest) -> str:
    """How a deployment was started, for its message."""
    if request.trigger is Trigger.MERGE:
        return "on merge"
    if request.trigger is Trigger.PR_COMMENT:
        return f"from PR #{request.pr_number}" if request.pr_number else "from a PR comment"
    if request.trigger is Trigger.SLACK:
        return "from Slack"
    return f"from the {request.trigger}"


def view_of(approval: ApprovalRecord, resolved_by: str | None = None) -> RequestView:
    """The approval message's view of a stored request."""
    args = approval.args or {}
    description = args.get("description")
    return RequestView(
        kind=DeploymentKind(approval.kind),
        target=approval.service or "all",
        requested_by=approval.requested_by,
        ref=args.get("ref"),
        to=args.get("to"),
        head=args.get("revision") or (approval.plan.head if approval.plan else None),
        approval_id=approval.id,
        digest=approval.digest,
        expires_at=approval.expires_at,
        resolved_by=resolved_by or approval.resolved_by,
        extra=[slack_lines(description)] if description else [],
    )


def _who(body: dict[str, Any]) -> tuple[str, str]:
    user = (body.get("user") or {}).get("id", "")
    channel = (body.get("channel") or {}).get("id", "")
    return str(user), str(channel)


def _message(approval: ApprovalRecord, body: dict[str, Any]) -> tuple[str, str]:
    """The message a button was on (the stored one wins: it cannot be forged)."""
    message = body.get("message") or {}
    channel = approval.channel or (body.get("channel") or {}).get("id", "")
    ts = approval.ts or message.get("ts", "")
    return str(channel), str(ts)


def _ask(ask: Ask) -> dict[str, Any]:
    return {"service": ask.service, "ref": ask.ref, "to": ask.to}


def _ask_from(kind: str, data: dict[str, Any]) -> Ask:
    return Ask(DeploymentKind(kind), data.get("service"), ref=data.get("ref"), to=data.get("to"))


def _secrets(ctx: BotContext) -> list[str]:
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
