"""Slack messages a job posts, at most once per job: a re-run edits what its first attempt posted.

Each posting is a step of the running job (`bot.jobs.JobContext`), named by its purpose
(`slack-refusal-1`, `slack-announcement-1`): the message ts is recorded as that step's effect
in the store, and a re-run of the job (its worker died) finds the ts and edits that message
instead of posting a second one. Outside a job, a message is simply posted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from bot.jobs import current_job

SlackCall = Callable[..., Awaitable[Any]]
"""One Web API call: `call(method, **args)`, answering the response (or None on failure)."""

POST = "chat.postMessage"
UPDATE = "chat.update"
NOT_EDITABLE = ("thread_ts", "reply_broadcast", "unfurl_links", "unfurl_media")


class Posting(StrEnum):
    """Why a job posts a message (each purpose counts its own steps)."""

    REFUSAL = "slack-refusal"  # a re-run deploy job says why it does not deploy again
    ANNOUNCEMENT = "slack-announcement"  # a deployment's own message in the channel


async def post_once(call: SlackCall, purpose: Posting, channel: str, **args: Any) -> str | None:
    """Post a message (its ts), or in a re-run edit the one an earlier attempt posted."""
    job = current_job.get()
    step = job.next_step(purpose.value) if job is not None else None
    if job is not None and step is not None:
        posted = await job.effect(step)
        if posted is not None:
            edit = {key: value for key, value in args.items() if key not in NOT_EDITABLE}
            await call(UPDATE, channel=channel, ts=posted, **edit)
            return posted
    response = await call(POST, channel=channel, **args)
    ts = response.get("ts") if response is not None else None
    if ts and job is not None and step is not None:
        await job.record(step, str(ts))
    return str(ts) if ts else None
