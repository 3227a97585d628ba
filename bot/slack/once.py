"""Slack messages a job posts, at most once per job: a re-run edits what its first attempt posted.

Each posting is a step of the running job (`bot.jobs.JobContext`), named by its purpose
(`slack-refusal-1`, `slack-announcement-1`): the message ts is recorded as that step's effect
in the store, and a re-run of the job (its worker died) finds the ts and edits that message
instead of posting a second one. Outside a job, a message is simply posted.

The worker may die between Slack's answer and the ts being recorded. So the intent to post is
recorded first (`<step>:intent`, with the time), and the message carries Slack message
metadata naming the job and the step. A re-run that finds the intent but no ts looks the
message up in the channel (or the thread) since the intent, with
`conversations.history`/`conversations.replies` and `include_all_metadata` (the
`channels:history` scope), and edits it if it is there; only a message not found is posted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from bot.jobs import JobContext, current_job

log = logging.getLogger(__name__)

SlackCall = Callable[..., Awaitable[Any]]
"""One Web API call: `call(method, **args)`, answering the response (or None on failure)."""

POST = "chat.postMessage"
UPDATE = "chat.update"
HISTORY = "conversations.history"
REPLIES = "conversations.replies"
READ_METHODS = frozenset({HISTORY, REPLIES})  # Slack takes only form arguments for these
NOT_EDITABLE = ("thread_ts", "reply_broadcast", "unfurl_links", "unfurl_media")
INTENT = ":intent"  # the step recorded (with the time) just before a message is posted
METADATA_EVENT = "nixmox_job_effect"
CLOCK_SKEW = 60.0  # seconds: the look-up starts this long before the intent (Slack's clock)
LOOKUP_LIMIT = 200  # messages per page
LOOKUP_PAGES = 3  # at most this many pages: a message further back is posted again
LOOKUP_FAILED = "Slack %s could not look up message %s of job %s: posting it (again)"


class Posting(StrEnum):
    """Why a job posts a message (each purpose counts its own steps)."""

    REFUSAL = "slack-refusal"  # a re-run deploy job says why it does not deploy again
    ANNOUNCEMENT = "slack-announcement"  # a deployment's own message in the channel


def web_api_args(method: str, args: dict[str, Any]) -> dict[str, Any]:
    """`slack_sdk` `api_call` keywords for `args`: a JSON body for writes; the read methods
    accept no JSON body, so a GET with query arguments, as slack_sdk's own methods send."""
    if method in READ_METHODS:
        return {"http_verb": "GET", "params": {k: form_value(v) for k, v in args.items()}}
    return {"json": args}


def form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def metadata_of(job: JobContext, step: str) -> dict[str, Any]:
    """The Slack message metadata that names a job's posting."""
    return {"event_type": METADATA_EVENT, "event_payload": {"job": job.id, "step": step}}


async def post_once(call: SlackCall, purpose: Posting, channel: str, **args: Any) -> str | None:
    """Post a message (its ts), or in a re-run edit the one an earlier attempt posted."""
    job = current_job.get()
    if job is None:
        return ts_of(await call(POST, channel=channel, **args))
    step = job.next_step(purpose.value)
    posted = await job.effect(step)
    if posted is None and job.rerun:
        posted = await find_posted(call, job, step, channel, args.get("thread_ts"))
        if posted is not None:
            await job.record(step, posted)
    if posted is not None:
        edit = {key: value for key, value in args.items() if key not in NOT_EDITABLE}
        await call(UPDATE, channel=channel, ts=posted, **edit)
        return posted
    await job.record(step + INTENT, f"{time.time():.6f}")
    ts = ts_of(await call(POST, channel=channel, metadata=metadata_of(job, step), **args))
    if ts is not None:
        await job.record(step, ts)
    return ts


def ts_of(response: Any) -> str | None:
    ts = response.get("ts") if response is not None else None
    return str(ts) if ts else None


async def find_posted(
    call: SlackCall, job: JobContext, step: str, channel: str, thread_ts: str | None
) -> str | None:
    """The ts of the message an attempt posted for `step` without recording it, if any."""
    intent = await job.effect(step + INTENT)
    if intent is None:
        return None  # no attempt came as far as posting it
    method = REPLIES if thread_ts else HISTORY
    query: dict[str, Any] = {
        "channel": channel,
        "oldest": f"{float(intent) - CLOCK_SKEW:.6f}",
        "include_all_metadata": True,
        "limit": LOOKUP_LIMIT,
        **({"ts": thread_ts} if thread_ts else {}),
    }
    wanted = metadata_of(job, step)
    for _ in range(LOOKUP_PAGES):
        response = await call(method, **query)
        if response is None:
            log.warning(LOOKUP_FAILED, method, step, job.id)
            return None
        for message in response.get("messages") or []:
            if message.get("metadata") == wanted and message.get("ts"):
                return str(message["ts"])
        cursor = (response.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            return None
        query["cursor"] = cursor
    return None
