"""The monitor's alerts in Slack: health transitions, drift found and cleared, and the drift
message's "Redeploy" button, which asks for a deployment through the usual approval flow.

Everything goes to `NIXMOX_SLACK_CHANNEL`, escaped and redacted; nothing redeploys by itself.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from bot.chat_commands import ALL
from bot.slack.approvals import REFUSAL_TEXT, request_refusal, slack_actor
from bot.slack.asks import Ask
from bot.slack.blocks import ActionId, Block, actions, button, code_block, context, section
from bot.slack.services import SlackServices
from bot.slack.slash import SlashCommands
from deployments.drift import DriftKind, DriftReport
from deployments.monitor import ChangeKind, HealthChange
from planner.escape import slack_code, slack_text
from state.events import DeploymentKind
from state.health import DriftRecord

log = logging.getLogger(__name__)

OUTPUT_CHARS = 1500
DOWN = (
    ":red_circle: *{service}* is unhealthy: its {check} check failed {failures} time(s) "
    "in a row (since {since})."
)
REMINDER = ":red_circle: *{service}* is still unhealthy (since {since}): its {check} check fails."
UP = (
    ":large_green_circle: *{service}* is healthy again: its {check} check passes "
    "(it was unhealthy since {since})."
)
HEALTH_TEXT = {ChangeKind.DOWN: DOWN, ChangeKind.REMINDER: REMINDER, ChangeKind.UP: UP}
DRIFT_NEW = {
    DriftKind.SYSTEM: (
        ":warning: Drift on *{subject}*: the host runs {actual}, not the deployed "
        "{expected} (rebuilt or rolled back by hand?)."
    ),
    DriftKind.PENDING: (
        ":warning: Pending: {actual_short} on the default branch is not deployed "
        "({detail} to deploy it)."
    ),
    DriftKind.TERRAFORM: ":warning: Terraform drift in *{subject}*: resources would change.",
}
DRIFT_CLEARED = ":white_check_mark: Drift cleared: {kind} on *{subject}*."
REPORT_ONLY = "Nothing is changed by itself: Redeploy asks for a deployment, approved as usual."
REDEPLOY_LABEL = "Redeploy"
REDEPLOY_REFUSED = "slack.request.refused"


def when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def redeploy_ask(kind: str, target: str) -> Ask:
    """What Redeploy asks for: a drifted host's service in full (its revision is deployed, so a
    diff plan would be empty), the whole homelab in full for terraform drift, and the usual
    plan from the deployed revision for pending changes."""
    service = None if target == ALL else target
    return Ask(DeploymentKind.DEPLOY, service, redeploy=kind != DriftKind.PENDING)


class SlackAlerts:
    """A `deployments.monitor.MonitorListener` posting to the Slack channel."""

    def __init__(self, core: SlackServices, slash: SlashCommands) -> None:
        self.core = core
        self.slash = slash

    @property
    def channel(self) -> str | None:
        return self.core.settings.slack_channel

    async def checked(self, service: str, up: bool | None, at: datetime) -> None:
        return None  # every check is a gauge (bot.monitoring), only transitions are messages

    async def health_changed(self, change: HealthChange) -> None:
        if not self.channel:
            log.info(
                "monitor: %s is %s (no NIXMOX_SLACK_CHANNEL)", change.check.service, change.kind
            )
            return
        text = HEALTH_TEXT[change.kind].format(
            service=slack_text(change.check.service),
            check=slack_text(change.check.check),
            failures=change.failures,
            since=when(change.since),
        )
        blocks = [section(text)]
        if change.kind is not ChangeKind.UP and change.check.output:
            output = self.core.redactor.text(change.check.output)[-OUTPUT_CHARS:]
            blocks.append(section(code_block(output)))
        await self.core.api("chat.postMessage", channel=self.channel, text=text, blocks=blocks)

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None:
        if not self.channel:
            return
        for record in new:
            text, blocks = self.drift_message(record, report)
            await self.core.api("chat.postMessage", channel=self.channel, text=text, blocks=blocks)
        for record in cleared:
            text = DRIFT_CLEARED.format(
                kind=slack_text(record.kind), subject=slack_text(record.subject)
            )
            await self.core.api("chat.postMessage", channel=self.channel, text=text)

    def drift_message(self, record: DriftRecord, report: DriftReport) -> tuple[str, list[Block]]:
        """A new drift: what was found, and the Redeploy button."""
        redact = self.core.redactor.text
        text = DRIFT_NEW[DriftKind(record.kind)].format(
            subject=slack_text(record.subject),
            actual=slack_code(redact(record.actual or "")),
            expected=slack_code(redact(record.expected or "")),
            actual_short=slack_code((record.actual or "")[:12]),
            detail=slack_text(record.detail or ""),
        )
        blocks = [section(text)]
        if record.kind == DriftKind.TERRAFORM and record.detail:
            blocks.append(section(code_block(redact(record.detail)[-OUTPUT_CHARS:])))
        notes = [slack_text(redact(note)) for note in report.notes]
        blocks.append(context(REPORT_ONLY, *notes))
        target = record.subject if record.kind == DriftKind.SYSTEM else ALL
        redeploy = button(REDEPLOY_LABEL, ActionId.REDEPLOY, f"{record.kind} {target}", "primary")
        blocks.append(actions("nixmox_drift", redeploy))
        return text, blocks

    async def on_redeploy(
        self, ack: Any, body: dict[str, Any], action: dict[str, Any], respond: Any
    ) -> None:
        """The Redeploy button: a deploy request, like `/nixmox deploy SERVICE`."""
        await ack()
        user = str((body.get("user") or {}).get("id", ""))
        channel = str((body.get("channel") or {}).get("id", ""))
        refusal = request_refusal(self.core.policy, user)
        if refusal is not None:
            await self.core.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await self.core.audit(slack_actor(user), REDEPLOY_REFUSED, {"redeploy": True})
            return
        kind, _, target = str(action.get("value") or "").partition(" ")
        ask = redeploy_ask(kind, target or ALL)
        self.core.spawn(self.slash.post_request(ask, user, self.channel or channel, respond))
