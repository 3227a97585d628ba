"""Reporting in Slack a deployment a dead process left interrupted (see `bot.recovery`).

A `SlackNotifier` edits the deployment's message (recorded in `slack_messages` when it was
posted, see `state.slack_messages`) to its final, interrupted state, with a line
saying where it stopped and how to resume or undo it; without a known message (or if it cannot
be edited) the same is posted as a new message in `NIXMOX_SLACK_CHANNEL`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient

from bot.recovery import finished_event, replayed_steps, request_of, resume_hint
from bot.slack.names import origin
from bot.slack.notifier import MessagePacer, SlackNotifier
from bot.slack.progress import Byline, Progress
from state.deployments import DeploymentRecord
from state.slack_messages import SlackMessage
from state.store import Store

log = logging.getLogger(__name__)

NO_CHANNEL = "no message known and NIXMOX_SLACK_CHANNEL unset"


@dataclass
class InterruptionReport:
    """Finishes (or announces) the Slack message of interrupted deployments."""

    client: AsyncWebClient
    pacer: MessagePacer
    redact: Callable[[str], str]
    store: Callable[[], Store]  # the store is opened when the application starts
    channel: str | None  # NIXMOX_SLACK_CHANNEL

    async def report(self, record: DeploymentRecord) -> dict[str, Any]:
        """Edit the deployment's message to its interrupted end, else announce it."""
        link = await self.store().slack_messages.get(record.id)
        if link is not None:
            notifier = self.notifier(record, link.channel, link)
            await notifier(finished_event(record))
            if notifier.updates_sent:
                return {"channel": link.channel, "ts": link.ts, "updated": True}
            log.warning(
                "could not update the Slack message of deployment %s; announcing", record.id
            )
        if not self.channel:
            return {"updated": False, "error": NO_CHANNEL}
        notifier = self.notifier(record, self.channel, None)
        await notifier(finished_event(record))
        return {
            "channel": self.channel,
            "ts": notifier.ts,
            "updated": False,
            "posted": bool(notifier.ts),
        }

    def notifier(
        self, record: DeploymentRecord, channel: str, link: SlackMessage | None
    ) -> SlackNotifier:
        """The live Slack notifier for `record`, primed with its recorded steps."""
        same_channel = link is not None and link.channel == channel
        notifier = SlackNotifier(
            self.client,
            channel,
            ts=link.ts if link is not None and same_channel else None,
            pacer=self.pacer,
            redact=self.redact,
            footer=resume_hint(record),
        )
        notifier.progress = self.progress(record, link)
        return notifier

    def progress(self, record: DeploymentRecord, link: SlackMessage | None) -> Progress:
        progress = Progress(
            record.id,
            record.plan,
            kind=record.kind,
            byline=Byline(
                title=link.title if link is not None else None,
                requested_by=record.requested_by,
                approved_by=record.approved_by,
                origin=(link.origin if link is not None else None) or origin(request_of(record)),
            ),
            started_at=record.started_at,
            redact=self.redact,
        )
        for event in replayed_steps(record):
            progress.apply(event)  # thread notes were posted by the dead process: not again
        return progress
