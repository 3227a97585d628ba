"""The Slack message that shows each deployment (channel, ts), to edit it later."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from state.base import Repository, record_of
from state.events import utcnow
from state.schema import slack_messages


@dataclass(frozen=True)
class SlackMessage:
    """Where a deployment's Slack message is, as recorded when it was posted."""

    deployment_id: str
    channel: str
    ts: str
    title: str | None = None
    origin: str | None = None
    posted_at: datetime | None = None


class SlackMessageRepository(Repository):
    """The slack_messages table: one message per deployment, the latest one recorded wins."""

    async def remember(
        self,
        deployment_id: str,
        channel: str,
        ts: str,
        *,
        title: str | None = None,
        origin: str | None = None,
    ) -> None:
        """Record (or replace) the message that shows `deployment_id`."""
        values: dict[str, Any] = {
            "channel": channel,
            "ts": ts,
            "title": title,
            "origin": origin,
            "posted_at": utcnow(),
        }
        where = slack_messages.c.deployment_id == deployment_id
        async with self.engine.begin() as conn:
            result = await conn.execute(slack_messages.update().where(where).values(**values))
            if result.rowcount:
                return
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        slack_messages.insert().values(deployment_id=deployment_id, **values)
                    )
            except IntegrityError:  # recorded by another process meanwhile: ours is newer
                await conn.execute(slack_messages.update().where(where).values(**values))

    async def get(self, deployment_id: str) -> SlackMessage | None:
        """The message of one deployment, if one was recorded."""
        return (await self.of([deployment_id])).get(deployment_id)

    async def of(self, deployment_ids: Iterable[str]) -> dict[str, SlackMessage]:
        """The recorded messages of these deployments, by deployment id."""
        wanted = sorted(set(deployment_ids))
        if not wanted:
            return {}
        query = sa.select(slack_messages).where(slack_messages.c.deployment_id.in_(wanted))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return {row.deployment_id: _message(row) for row in rows}


def _message(row: Any) -> SlackMessage:
    return record_of(SlackMessage, row)
