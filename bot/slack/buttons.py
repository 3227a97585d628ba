"""The buttons of a request message: Approve, Cancel and Re-plan."""

from __future__ import annotations

from typing import Any, NamedTuple

from slack_bolt.async_app import AsyncAck

from bot.slack.approvals import (
    REFUSAL_TEXT,
    Refusal,
    approval_refusal,
    cancel_refusal,
    parse_button_value,
    plan_changed,
    request_refusal,
    slack_actor,
)
from bot.slack.asks import Ask
from bot.slack.backend import (
    PlanFailure,
    Planned,
)
from bot.slack.blocks import (
    RequestStatus,
    RequestView,
)
from bot.slack.names import Audit, JobKind
from bot.slack.services import SlackServices, message_of, view_of, who_of
from planner.escape import slack_lines
from state.approvals import ApprovalRecord, ApprovalState
from state.events import utcnow

CHECK_FAILED = "Could not check that the plan is still current ({error}); nothing was deployed."


class Click(NamedTuple):
    """A click on a request's button: the request, the plan digest it showed, and the clicker."""

    approval: ApprovalRecord
    digest: str
    user: str
    channel: str


class ApprovalButtons:
    """Approve (only approvers, unexpired, the same plan), Cancel and Re-plan."""

    def __init__(self, core: SlackServices) -> None:
        self.core = core

    async def on_approve(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.core.spawn(self.approve(body, action))

    async def on_cancel(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.core.spawn(self.cancel(body, action))

    async def on_replan(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        self.core.spawn(self.replan(body, action))

    async def _click(self, body: dict[str, Any], action: dict[str, Any]) -> Click | None:
        """Who clicked which request's button (and the digest it carries), or tell the user."""
        user, channel = who_of(body)
        parsed = parse_button_value(action.get("value"))
        approval = None
        if parsed is not None:
            approval = await self.core.ctx.require_store().approvals.get(parsed[0])
        if approval is None or parsed is None:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[Refusal.UNKNOWN_REQUEST])
            await self.core.audit(slack_actor(user), Audit.REFUSED, {"reason": "unknown request"})
            return None
        return Click(approval, parsed[1], user, channel)

    async def approve(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Approve: only approvers, not one's own (unless allowed), unexpired, same plan."""
        click = await self._click(body, action)
        if click is None:
            return
        approval, user = click.approval, click.user
        refusal = approval_refusal(
            self.core.policy, approval, user, now=utcnow(), button_digest=click.digest
        )
        if refusal is not None:
            await self.refuse_approval(approval, user, refusal)
            return
        planned = await self._replan(approval, body)
        if planned is None:
            return
        if plan_changed(approval, planned.plan.digest):
            await self.refuse_approval(approval, user, Refusal.PLAN_CHANGED)
            return
        store = self.core.ctx.require_store()
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
        user, channel = who_of(body)
        try:
            return await self.core.backend.plan(Ask.from_approval(approval))
        except PlanFailure as exc:
            error = self.core.redactor.text(str(exc))
            await self.core.ephemeral(channel, user, CHECK_FAILED.format(error=slack_lines(error)))
            detail = {"approval": approval.id, "reason": "check failed", "error": error}
            await self.core.audit(slack_actor(user), Audit.REFUSED, detail)
            return None

    async def _start(
        self, approval: ApprovalRecord, planned: Planned, actor: str, body: dict[str, Any]
    ) -> None:
        """Say who approved, record it, and queue the deployment of exactly the approved plan."""
        channel, ts = message_of(approval, body)
        view = view_of(approval, resolved_by=actor)
        await self.core.show_request(channel, ts, view, RequestStatus.APPROVED, approval.plan)
        detail = {
            "approval": approval.id,
            "digest": approval.digest,
            "requested_by": approval.requested_by,
        }
        await self.core.audit(actor, Audit.APPROVED, detail)
        # the stored plan is the one shown; its digest was just checked against a fresh one
        planned.plan = approval.plan or planned.plan
        payload = {
            "approval": approval.id,
            "planned": planned.to_json(),
            "approved_by": actor,
            "channel": channel,
            "ts": ts,
        }
        await self.core.enqueue(JobKind.DEPLOY, payload)

    async def refuse_approval(self, approval: ApprovalRecord, user: str, refusal: Refusal) -> None:
        """Tell the clicker why; an expired or outdated request also says so in its message."""
        actor = slack_actor(user)
        channel, ts = approval.channel or "", approval.ts or ""
        if refusal in {Refusal.EXPIRED, Refusal.PLAN_CHANGED}:
            state = ApprovalState.EXPIRED if refusal is Refusal.EXPIRED else ApprovalState.REFUSED
            if approval.state is ApprovalState.PENDING:
                await self.core.ctx.require_store().approvals.resolve(approval.id, state, actor)
            status = (
                RequestStatus.EXPIRED if refusal is Refusal.EXPIRED else RequestStatus.PLAN_CHANGED
            )
            if channel and ts:
                await self.core.show_request(channel, ts, view_of(approval), status, approval.plan)
        if channel:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[refusal])
        await self.core.audit(
            actor,
            Audit.REFUSED,
            {
                "approval": approval.id,
                "reason": refusal.value,
                "requested_by": approval.requested_by,
            },
        )

    async def cancel(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        click = await self._click(body, action)
        if click is None:
            return
        approval, user, channel = click.approval, click.user, click.channel
        actor = slack_actor(user)
        refusal = cancel_refusal(self.core.policy, approval, user)
        if refusal is None and not await self.core.ctx.require_store().approvals.resolve(
            approval.id, ApprovalState.CANCELLED, actor
        ):
            refusal = Refusal.NOT_PENDING
        if refusal is not None:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await self.core.audit(
                actor,
                Audit.REFUSED,
                {"approval": approval.id, "reason": refusal.value, "action": "cancel"},
            )
            return
        view = view_of(approval, resolved_by=actor)
        await self.core.show_request(
            *message_of(approval, body), view, RequestStatus.CANCELLED, approval.plan
        )
        await self.core.audit(
            actor, Audit.CANCELLED, {"approval": approval.id, "requested_by": approval.requested_by}
        )

    async def replan(self, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Re-plan an expired or outdated request in place, as a new request of the clicker."""
        user, channel = who_of(body)
        approval = await self.core.ctx.require_store().approvals.get(str(action.get("value") or ""))
        if approval is None:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[Refusal.UNKNOWN_REQUEST])
            return
        refusal = request_refusal(self.core.policy, user)
        if refusal is not None:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await self.core.audit(
                slack_actor(user),
                Audit.REQUEST_REFUSED,
                {"approval": approval.id, "reason": refusal.value},
            )
            return
        ask = Ask.from_approval(approval)
        message_channel, ts = message_of(approval, body)
        view = RequestView(ask, slack_actor(user))
        await self.core.show_request(message_channel, ts, view, RequestStatus.PLANNING)
        await self.core.enqueue(
            JobKind.REQUEST,
            {
                "ask": ask.to_json(),
                "kind": ask.kind.value,
                "user": user,
                "channel": message_channel,
                "ts": ts,
            },
        )
