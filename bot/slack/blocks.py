"""Block Kit builders: small typed helpers and the approval message in its every state."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from bot.slack.approvals import SLACK_ACTOR_PREFIX, button_value
from bot.slack.asks import Ask
from planner.escape import slack_block, slack_code, slack_lines, slack_text
from planner.plan import Plan
from planner.render import render_slack, short_rev
from state.approvals import ApprovalRecord

Block = dict[str, Any]

# Slack limits the bot keeps to (api.slack.com/reference/block-kit)
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_HEADER_TEXT = 150
MAX_BUTTON_TEXT = 75
MAX_FALLBACK_TEXT = 3000
# blocks the approval message adds around the plan: context, extra lines, status, buttons
APPROVAL_FRAME_BLOCKS = 4


class ActionId(StrEnum):
    """The interactive elements the bot posts (block_actions routes on these)."""

    APPROVE = "nixmox_approve"
    CANCEL = "nixmox_cancel"
    REPLAN = "nixmox_replan"
    REDEPLOY = "nixmox_redeploy"  # on a drift message: asks for a deployment (approval flow)


APPROVAL_ACTIONS_BLOCK = "nixmox_approval"


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mention(actor: str | None) -> str:
    """`<@U123>` for a Slack actor (`slack:U123` or a bare id), the plain name otherwise."""
    if not actor:
        return "someone"
    if actor.startswith(SLACK_ACTOR_PREFIX):
        return f"<@{actor.removeprefix(SLACK_ACTOR_PREFIX)}>"
    if actor[:1] in {"U", "W"} and actor.isalnum() and actor.isupper():
        return f"<@{actor}>"
    return slack_text(actor)


def mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": truncate(text, MAX_SECTION_TEXT)}


def plain(text: str, limit: int = MAX_SECTION_TEXT) -> dict[str, Any]:
    return {"type": "plain_text", "text": truncate(text, limit), "emoji": True}


def section(text: str, block_id: str | None = None) -> Block:
    block: Block = {"type": "section", "text": mrkdwn(text)}
    if block_id:
        block["block_id"] = block_id
    return block


def header(text: str) -> Block:
    return {"type": "header", "text": plain(text, MAX_HEADER_TEXT)}


def context(*texts: str) -> Block:
    return {"type": "context", "elements": [mrkdwn(t) for t in texts if t][:10]}


def divider() -> Block:
    return {"type": "divider"}


def button(text: str, action_id: ActionId, value: str, style: str | None = None) -> Block:
    element: Block = {
        "type": "button",
        "text": plain(text, MAX_BUTTON_TEXT),
        "action_id": str(action_id),
        "value": value,
    }
    if style:
        element["style"] = style
    return element


def actions(block_id: str, *elements: Block) -> Block:
    return {"type": "actions", "block_id": block_id, "elements": list(elements)}


def pack_lines(lines: Iterable[str], limit: int = MAX_SECTION_TEXT) -> list[str]:
    """Join lines into as few texts of at most `limit` characters as possible."""
    chunks: list[str] = []
    current = ""
    for line in lines:
        line = truncate(line, limit)
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            chunks.append(current)
            current = line
        else:
            current = candidate
    if current:
        chunks.append(current)
    return chunks


def code_block(text: str, limit: int = MAX_SECTION_TEXT - 200) -> str:
    """Preformatted text (escaped), keeping the end when it is too long: the end says why."""
    text = slack_block(text).rstrip()
    if len(text) > limit:
        text = "…" + text[-(limit - 1) :]
    return f"```\n{text or '(no output)'}\n```"


def format_time(at: datetime) -> str:
    """Slack renders `<!date^…>` in each reader's time zone; the fallback is UTC."""
    stamp = int(at.timestamp())
    fallback = at.strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{stamp}^{{date_short_pretty}} {{time}}|{fallback}>"


# -- the approval message --------------------------------------------------------------------


class RequestStatus(StrEnum):
    PLANNING = "planning"
    PENDING = "pending"
    APPROVED = "approved"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    PLAN_CHANGED = "plan_changed"
    NOTHING_TO_DO = "nothing_to_do"
    FAILED = "failed"
    NOT_STARTED = "not_started"


@dataclass
class RequestView:
    """What an approval message shows about one request (and its approval, once recorded)."""

    ask: Ask
    requested_by: str
    head: str | None = None
    approval: ApprovalRecord | None = None
    resolved_by: str | None = None
    error: str | None = None
    extra: list[str] = field(default_factory=list)

    def title(self) -> str:
        return self.ask.title()


STATUS_LINES: dict[RequestStatus, str] = {
    RequestStatus.PLANNING: ":hourglass_flowing_sand: Planning…",
    RequestStatus.PENDING: ":raised_hand: Waiting for an approver",
    RequestStatus.APPROVED: ":white_check_mark: Approved by {by}",
    RequestStatus.CANCELLED: ":no_entry_sign: Cancelled by {by}; nothing was deployed",
    RequestStatus.EXPIRED: ":hourglass: Expired; nothing was deployed. Re-plan to ask again",
    RequestStatus.PLAN_CHANGED: (
        ":warning: The plan changed since it was posted; nothing was deployed. Re-plan to ask again"
    ),
    RequestStatus.NOTHING_TO_DO: ":zzz: No deployment needed",
    RequestStatus.FAILED: ":x: Could not plan: {error}",
    RequestStatus.NOT_STARTED: (
        ":no_entry: Approved by {by}, but the deployment could not start: {error}"
    ),
}


def request_text(view: RequestView, status: RequestStatus) -> str:
    """The fallback text (notifications, screen readers) of an approval message."""
    line = STATUS_LINES[status].format(
        by=mention(view.resolved_by), error=slack_lines(view.error or "unknown error")
    )
    title = slack_text(view.title())
    return truncate(f"{title} (asked by {mention(view.requested_by)}): {line}", 3000)


def request_blocks(view: RequestView, status: RequestStatus, plan: Plan | None) -> list[Block]:
    """The approval message: the plan (planner's Block Kit), who and what, status, buttons."""
    facts = [f"requested by {mention(view.requested_by)}"]
    if view.head:
        facts.append(f"revision {slack_code(short_rev(view.head))}")
    approval = view.approval
    if status is RequestStatus.PENDING and approval is not None:
        facts.append(f"expires {format_time(approval.expires_at)}")
    if plan is not None:
        room = MAX_BLOCKS - APPROVAL_FRAME_BLOCKS - len(view.extra)
        rendered = render_slack(plan, title=view.title(), max_blocks=room)["blocks"]
        blocks = [rendered[0], context(" · ".join(facts)), *rendered[1:]]
    else:
        blocks = [header(view.title()), context(" · ".join(facts))]
    blocks += [section(line) for line in view.extra]
    line = STATUS_LINES[status].format(
        by=mention(view.resolved_by),
        error=slack_lines(truncate(view.error or "unknown error", 500)),
    )
    blocks.append(section(line, block_id="nixmox_status"))
    if status is RequestStatus.PENDING and approval is not None:
        value = button_value(approval.id, approval.digest)
        blocks.append(
            actions(
                APPROVAL_ACTIONS_BLOCK,
                button("Approve", ActionId.APPROVE, value, "primary"),
                button("Cancel", ActionId.CANCEL, value, "danger"),
            )
        )
    elif status in {RequestStatus.EXPIRED, RequestStatus.PLAN_CHANGED} and approval is not None:
        blocks.append(
            actions(APPROVAL_ACTIONS_BLOCK, button("Re-plan", ActionId.REPLAN, approval.id))
        )
    return blocks[:MAX_BLOCKS]


def text_blocks(text: str) -> list[Block]:
    """A plain reply as sections (long texts split at line boundaries)."""
    lines = [line for line in text.splitlines()] or ["(empty)"]
    return [section(chunk) for chunk in pack_lines(lines) if chunk.strip()][:MAX_BLOCKS]
