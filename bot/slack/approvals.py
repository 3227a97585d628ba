"""Who may request and approve Slack deployments: the rules as pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from bot.config import Settings
from state.approvals import ApprovalRecord, ApprovalState

BUTTON_SEPARATOR = " "  # neither request ids nor digests contain spaces
SLACK_ACTOR_PREFIX = "slack:"


class Refusal(StrEnum):
    """Why a request, an approval or a cancellation is refused."""

    NOT_DEPLOYER = "not_deployer"
    NOT_LOCKER = "not_locker"
    NOT_APPROVER = "not_approver"
    NO_APPROVERS = "no_approvers"
    SELF_APPROVAL = "self_approval"
    NOT_PENDING = "not_pending"
    EXPIRED = "expired"
    PLAN_CHANGED = "plan_changed"
    NOT_ALLOWED_TO_CANCEL = "not_allowed_to_cancel"
    UNKNOWN_REQUEST = "unknown_request"


REFUSAL_TEXT: dict[Refusal, str] = {
    Refusal.NOT_DEPLOYER: "You are not allowed to request deployments (NIXMOX_SLACK_DEPLOYERS).",
    Refusal.NOT_LOCKER: (
        "Only the configured deployers and approvers can lock or unlock services "
        "(NIXMOX_SLACK_DEPLOYERS, NIXMOX_SLACK_APPROVERS)."
    ),
    Refusal.NOT_APPROVER: "Only the configured approvers can approve; nothing was deployed.",
    Refusal.NO_APPROVERS: (
        "No approvers are configured (NIXMOX_SLACK_APPROVERS), so nothing can be approved."
    ),
    Refusal.SELF_APPROVAL: (
        "You cannot approve your own request; ask another approver "
        "(a single-person setup can set NIXMOX_SLACK_ALLOW_SELF_APPROVAL=true)."
    ),
    Refusal.NOT_PENDING: "This request was already handled.",
    Refusal.EXPIRED: "This request has expired and cannot be approved; re-plan to ask again.",
    Refusal.PLAN_CHANGED: (
        "The plan has changed since it was posted, so this approval would not match what runs; "
        "re-plan to ask again."
    ),
    Refusal.NOT_ALLOWED_TO_CANCEL: "Only the requester or an approver can cancel this request.",
    Refusal.UNKNOWN_REQUEST: "This request is not known to the bot (it may have been removed).",
}


@dataclass(frozen=True)
class Policy:
    """The Slack permission settings, frozen at start-up."""

    approvers: frozenset[str]
    deployers: frozenset[str]
    allow_self_approval: bool
    ttl: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            approvers=frozenset(settings.slack_approvers),
            deployers=frozenset(settings.slack_deployers),
            allow_self_approval=settings.slack_allow_self_approval,
            ttl=settings.approval_ttl,
        )

    def is_approver(self, user: str) -> bool:
        return user in self.approvers


def slack_actor(user_id: str) -> str:
    """How a Slack user is named in the store and the audit log (`slack:U123`)."""
    return f"{SLACK_ACTOR_PREFIX}{user_id}"


def is_requester(approval: ApprovalRecord, user_id: str) -> bool:
    return approval.requested_by in {user_id, slack_actor(user_id)}


def request_refusal(policy: Policy, user: str) -> Refusal | None:
    """May `user` ask for a deployment or a rollback? (no deployers: anyone may)."""
    if policy.deployers and user not in policy.deployers:
        return Refusal.NOT_DEPLOYER
    return None


def lock_refusal(policy: Policy, user: str) -> Refusal | None:
    """May `user` lock or unlock a service? Deployers and approvers (neither set: anyone)."""
    if not (policy.deployers or policy.approvers):
        return None  # a one-person homelab with no lists: documented in the README
    if user in policy.deployers or user in policy.approvers:
        return None
    return Refusal.NOT_LOCKER


def is_expired(approval: ApprovalRecord, now: datetime) -> bool:
    return now >= approval.expires_at


def approval_refusal(
    policy: Policy,
    approval: ApprovalRecord,
    user: str,
    *,
    now: datetime,
    button_digest: str,
) -> Refusal | None:
    """Whether Slack user `user` (an id like U123) may approve this request now (the current plan is checked separately).

    Order matters: someone who may not approve at all learns only that, and changes
    nothing; expiry and a changed plan are reported to approvers, who can re-plan.
    """
    if not policy.approvers:
        return Refusal.NO_APPROVERS
    if not policy.is_approver(user):
        return Refusal.NOT_APPROVER
    if approval.state is ApprovalState.EXPIRED:
        return Refusal.EXPIRED  # the expiry sweep got there first: same answer as a click
    if approval.state is not ApprovalState.PENDING:
        return Refusal.NOT_PENDING
    if is_requester(approval, user) and not policy.allow_self_approval:
        return Refusal.SELF_APPROVAL
    if is_expired(approval, now):
        return Refusal.EXPIRED
    if button_digest != approval.digest:
        return Refusal.PLAN_CHANGED
    return None


def plan_changed(approval: ApprovalRecord, current_digest: str) -> bool:
    """The plan computed now differs from the one the approver saw (or from the one the
    host previews completed into it: the builds of the same head complete it the same way)."""
    return current_digest not in approval.plans_digests()


def cancel_refusal(policy: Policy, approval: ApprovalRecord, user: str) -> Refusal | None:
    """The requester and any approver may cancel a pending request."""
    if approval.state is not ApprovalState.PENDING:
        return Refusal.NOT_PENDING
    if not is_requester(approval, user) and not policy.is_approver(user):
        return Refusal.NOT_ALLOWED_TO_CANCEL
    return None


def button_value(approval_id: str, digest: str) -> str:
    """What an Approve/Cancel button carries: the request id and the plan digest."""
    return f"{approval_id}{BUTTON_SEPARATOR}{digest}"


def parse_button_value(value: str | None) -> tuple[str, str] | None:
    """The request id and digest of a button value (None when it is not ours)."""
    if not value or BUTTON_SEPARATOR not in value:
        return None
    approval_id, _, digest = value.partition(BUTTON_SEPARATOR)
    if not approval_id or not digest:
        return None
    return approval_id, digest
