"""The `/nixmox` slash command: acknowledge at once, then look up, plan or lock; and the
job that plans a request and posts it for approval."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncRespond
from slack_sdk.errors import SlackApiError

from bot.chat_commands import (
    ALL,
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
from bot.jobs import current_job
from bot.slack.approvals import (
    REFUSAL_TEXT,
    Refusal,
    lock_refusal,
    request_refusal,
    slack_actor,
)
from bot.slack.asks import Ask
from bot.slack.backend import (
    PlanFailure,
    RefRefused,
    RepoBackend,
    ref_refusal,
)
from bot.slack.blocks import (
    RequestStatus,
    RequestView,
    request_blocks,
    request_text,
    text_blocks,
)
from bot.slack.names import Audit, JobKind
from bot.slack.services import SlackServices, view_of
from bot.slack.status import history_text, status_text
from planner.escape import slack_lines
from planner.plan import Plan
from planner.render import render_slack
from runners.config import PreviewHosts
from state.approvals import PLANNED_DIGEST, ApprovalState
from state.events import DeploymentKind
from state.locks import LockBusy

log = logging.getLogger(__name__)

SLASH_COMMAND = "/nixmox"


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
DEPLOYMENT_LOCK = (
    ":lock: *{service}* is locked by running {holder}; it will be released when that "
    "deployment ends."
)
STORE_UNAVAILABLE = ":x: The state store did not answer; try again in a moment."
APPROVAL_STEP = "slack-approval"  # the request job's approval, recorded as a job effect


class SlashCommands:
    """`/nixmox …` in Slack: parse, check the asker, acknowledge, then do the work."""

    def __init__(self, core: SlackServices) -> None:
        self.core = core

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
            await ack(
                text=ACK_PLAN.format(what=slack_lines(ask.description())), response_type="ephemeral"
            )
            self.core.spawn(self.show_plan(ask, respond))
        elif isinstance(command, StatusCommand | HistoryCommand):
            await ack(text=ACK_LOOKUP, response_type="ephemeral")
            render = status_text if isinstance(command, StatusCommand) else history_text
            self.core.spawn(
                self.reply_with(respond, render(self.core.ctx.require_store(), command.service))
            )
        elif isinstance(command, LockCommand | UnlockCommand):
            refusal = lock_refusal(self.core.policy, user)
            if refusal is not None:
                await self.refuse_request(ack, user, refusal, {"command": command.name.value})
                return
            await ack(text=ACK_LOOKUP, response_type="ephemeral")
            self.core.spawn(self.lock(command, user, respond))

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
        # recorded before the answer goes out: whoever reads the answer finds the record
        await self.core.audit(
            slack_actor(user), Audit.REQUEST_REFUSED, {**detail, "reason": refusal.value}
        )
        await ack(text=REFUSAL_TEXT[refusal], response_type="ephemeral")

    async def request(
        self, ask: Ask, user: str, channel: str, ack: AsyncAck, respond: AsyncRespond
    ) -> None:
        """A deploy or rollback request: check the requester, ack, then plan in a job."""
        refusal = request_refusal(self.core.policy, user)
        if refusal is not None:
            await self.refuse_request(ack, user, refusal, {"kind": ask.kind.value, **ask.to_json()})
            return
        refused_ref = ref_refusal(ask.ref)
        if refused_ref is not None:
            await ack(text=f":no_entry: {slack_lines(refused_ref)}", response_type="ephemeral")
            await self.audit_refused_ref(user, ask, refused_ref)
            return
        target = self.core.settings.slack_channel or channel
        await ack(
            text=ACK_PLANNING.format(what=slack_lines(ask.description()), channel=target),
            response_type="ephemeral",
        )
        self.core.spawn(self.post_request(ask, user, target, respond))

    async def audit_refused_ref(self, user: str, ask: Ask, reason: str) -> None:
        detail = {"kind": ask.kind.value, **ask.to_json(), "reason": "ref refused", "error": reason}
        await self.core.audit(slack_actor(user), Audit.REQUEST_REFUSED, detail)

    async def post_request(self, ask: Ask, user: str, channel: str, respond: AsyncRespond) -> None:
        """Post the request's message ("planning…") and queue its planning."""
        if ask.ref is not None:
            try:  # fork code is refused before anything is posted
                await self.core.backend.check_ref(ask.ref)
            except RefRefused as exc:
                text = f":no_entry: {slack_lines(str(exc))}"
                await respond(text=text, response_type="ephemeral")
                await self.audit_refused_ref(user, ask, str(exc))
                return
            except PlanFailure:
                pass  # an unknown ref: planning says so in the request's message
        view = RequestView(ask, slack_actor(user))
        posted = await self._post(channel, view, respond)
        if posted is None:
            return
        await self.core.enqueue(
            JobKind.REQUEST,
            {
                "ask": ask.to_json(),
                "kind": ask.kind.value,
                "user": user,
                "channel": channel,
                "ts": posted,
            },
        )

    async def _post(self, channel: str, view: RequestView, respond: AsyncRespond) -> str | None:
        status = RequestStatus.PLANNING
        try:
            response = await self.core.client.chat_postMessage(
                channel=channel,
                text=request_text(view, status),
                blocks=request_blocks(view, status, None),
            )
        except SlackApiError as exc:
            error = str(exc.response.get("error"))
            log.warning("Slack: cannot post the request in %s: %s", channel, error)
            await self.core.audit(
                view.requested_by, Audit.REQUEST_FAILED, {"channel": channel, "error": error}
            )
            # the bot may not be in that channel: answer through the command's response_url
            text = CANNOT_POST.format(channel=channel, error=slack_lines(error))
            await respond(text=text, response_type="ephemeral")
            return None
        self.core.pacer.edited(channel, str(response.get("ts")))
        return str(response.get("ts"))

    async def show_plan(self, ask: Ask, respond: AsyncRespond) -> None:
        """`/nixmox plan`: the plan, only for the asker."""
        try:
            planned = await self.core.backend.plan(ask)
        except PlanFailure as exc:
            error = slack_lines(self.core.redactor.text(str(exc)))
            await respond(text=f":x: Could not plan: {error}", response_type="ephemeral")
            return
        message = render_slack(planned.plan, title=f"Plan: {ask.target}")
        await respond(text=message["text"], blocks=message["blocks"], response_type="ephemeral")

    async def lock(
        self, command: LockCommand | UnlockCommand, user: str, respond: AsyncRespond
    ) -> None:
        store = self.core.ctx.require_store()
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
            await self.core.audit(
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
            await self.core.audit(actor, Audit.UNLOCK, {"service": command.service})
        await respond(text=text, response_type="in_channel")

    async def run_request_job(self, payload: dict[str, Any]) -> None:
        ask = Ask.from_json(payload["kind"], payload["ask"])
        await self.plan_request(ask, payload["user"], payload["channel"], payload["ts"])

    async def plan_request(self, ask: Ask, user: str, channel: str, ts: str) -> None:
        """Plan, record a pending approval, and show the plan with Approve / Cancel."""
        job = current_job.get()
        step = job.next_step(APPROVAL_STEP) if job is not None else None
        earlier = await job.effect(step) if job is not None and step is not None else None
        if earlier is not None:  # a re-run: the dead attempt had recorded the approval
            await self.resume_request(earlier, channel, ts)
            return
        actor = slack_actor(user)
        view = RequestView(ask, actor)
        try:
            planned = await self.core.backend.plan(ask)
        except PlanFailure as exc:
            view.error = self.core.redactor.text(str(exc))
            await self.core.show_request(channel, ts, view, RequestStatus.FAILED)
            await self.core.audit(
                actor, Audit.REQUEST_FAILED, {**ask.to_json(), "error": view.error}
            )
            return
        plan = planned.plan
        view.head = planned.revision or plan.head
        if planned.description:
            view.extra = [slack_lines(planned.description)]
        if not plan.ok:
            view.error = f"the manifest has {len(plan.errors)} error(s)"
            await self.core.show_request(channel, ts, view, RequestStatus.FAILED, plan)
            await self.core.audit(
                actor, Audit.REQUEST_FAILED, {**ask.to_json(), "error": view.error}
            )
            return
        previewed, rules_digest = False, plan.digest
        if not plan.steps and ask.kind is DeploymentKind.DEPLOY and ask.target == ALL:
            plan, previewed = await self.complete_from_builds(view, plan)
        if not plan.steps:
            await self.core.show_request(channel, ts, view, RequestStatus.NOTHING_TO_DO, plan)
            await self.core.audit(
                actor, Audit.REQUEST, {**ask.to_json(), "outcome": "nothing to do"}
            )
            return
        store = self.core.ctx.require_store()
        approval_id = await store.approvals.create(
            kind=ask.kind.value,
            requested_by=actor,
            digest=plan.digest,
            ttl=self.core.policy.ttl,
            plan=plan,
            service=ask.service,
            args={
                **ask.args(),
                "revision": view.head,
                "description": planned.description,
                # an Approve re-plans with the rules: their digest stands for the completed plan
                **({PLANNED_DIGEST: rules_digest} if plan.digest != rules_digest else {}),
            },
            channel=channel,
            ts=ts,
        )
        if job is not None and step is not None:
            await job.record(step, approval_id)
        view.approval = await store.approvals.get(approval_id)
        await self.core.show_request(channel, ts, view, RequestStatus.PENDING, plan)
        await self.core.audit(
            actor,
            Audit.REQUEST,
            {**ask.to_json(), "approval": approval_id, "digest": plan.digest, "channel": channel},
        )
        if ask.kind is DeploymentKind.DEPLOY and not previewed:
            await self.show_previews(channel, ts, view, plan)

    async def complete_from_builds(self, view: RequestView, plan: Plan) -> tuple[Plan, bool]:
        """A `deploy all` the rules find nothing for, with the hosts whose built systems change
        (`[preview] hosts = "all"`: a host can change with no file a rule knows), its summary
        added to the view; and whether the hosts were previewed."""
        if self.core.ctx.settings.preview.hosts is not PreviewHosts.ALL:
            return plan, False  # only the selected hosts are built: an empty plan selects none
        previewed = await self.previewed(view, plan, complete=True)
        if previewed is None:
            return plan, False
        completed, summary = previewed
        if summary:
            view.extra = [*view.extra, summary]
        return completed, True

    async def previewed(
        self, view: RequestView, plan: Plan, *, complete: bool
    ) -> tuple[Plan, str | None] | None:
        """The request's plan (completed from the head's builds, when `complete`) and the
        hosts' summary; None when previews are off or there is no repository to build from."""
        from bot.slack.previews import preview_for_approval

        backend = self.core.backend
        if not isinstance(backend, RepoBackend):
            return None  # previews build from the manifest repository's Git cache
        return await preview_for_approval(
            self.core.ctx, plan, view.head, backend.git.path, complete=complete
        )

    async def resume_request(self, approval_id: str, channel: str, ts: str) -> None:
        """Show the approval an earlier attempt of the job recorded, instead of a second one
        (approved or cancelled meanwhile: its message already says so, and stays)."""
        approval = await self.core.ctx.require_store().approvals.get(approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return
        view = view_of(approval)
        await self.core.show_request(channel, ts, view, RequestStatus.PENDING, approval.plan)
        if approval.plan is not None and approval.kind == DeploymentKind.DEPLOY.value:
            await self.show_previews(channel, ts, view, approval.plan)

    async def show_previews(self, channel: str, ts: str, view: RequestView, plan: Plan) -> None:
        """Add the per-host summary to a pending request's message once the builds are done."""
        previewed = await self.previewed(view, plan, complete=view.ask.target == ALL)
        if previewed is None or view.approval is None:
            return
        completed, summary = previewed
        approvals = self.core.ctx.require_store().approvals
        approval_id = view.approval.id
        # the builds found hosts the rules missed: the request now deploys them too
        if completed.digest != plan.digest and not await approvals.complete_plan(
            approval_id, plan.digest, completed
        ):
            return  # approved or cancelled meanwhile: that message stays
        view.approval = await approvals.get(approval_id)
        if view.approval is None or view.approval.state is not ApprovalState.PENDING:
            return  # approved or cancelled meanwhile: that message stays
        if summary is None and completed is plan:
            return
        view.extra = [*view.extra, *([summary] if summary else [])]
        await self.core.show_request(channel, ts, view, RequestStatus.PENDING, completed)
