"""The crash window of a job's Slack message: the worker dies after Slack answered
chat.postMessage but before the ts was recorded. The message carries metadata naming the job
and step; the re-run looks it up (conversations.history / .replies with include_all_metadata)
and edits it instead of posting a duplicate. The fake Slack over HTTP, a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.jobs import JobContext, current_job
from bot.slack.once import HISTORY, INTENT, POST, REPLIES, Posting, post_once, web_api_args
from state.store import Store
from tests.fakes.slack import DEFAULT_TOKEN, FakeSlack
from tests.fixtures_slack import CHANNEL

STEP = f"{Posting.ANNOUNCEMENT}-1"


class Died(Exception):
    """The worker process ended here (SIGKILL): nothing after this point ran."""


@asynccontextmanager
async def slack_calls(fake: FakeSlack) -> AsyncIterator[Any]:
    """`call(method, **args)` as the bot's Slack services make it (through web_api_args)."""
    client = AsyncWebClient(token=DEFAULT_TOKEN, base_url=fake.api_url)

    async def call(method: str, **args: Any) -> Any:
        return await client.api_call(method, **web_api_args(method, args))

    yield call


def dying_after(call: Any, method: str, *, answered: bool) -> Any:
    """A call that dies at `method`: after Slack answered it (`answered`) or before it was sent."""

    async def dying(name: str, **args: Any) -> Any:
        if name == method and not answered:
            raise Died(name)
        response = await call(name, **args)
        if name == method:
            raise Died(name)
        return response

    return dying


@contextmanager
def attempt(store: Store, job_id: int, number: int) -> Iterator[None]:
    token = current_job.set(JobContext(job_id, number, store))
    try:
        yield
    finally:
        current_job.reset(token)


async def test_a_message_posted_just_before_the_worker_died_is_edited_by_the_rerun(
    fake_slack: FakeSlack, store: Store
) -> None:
    job_id = await store.queue.enqueue("deploy", {})
    async with slack_calls(fake_slack) as call:
        with attempt(store, job_id, 1), pytest.raises(Died):
            await post_once(
                dying_after(call, POST, answered=True), Posting.ANNOUNCEMENT, CHANNEL, text="v1"
            )
        [message] = fake_slack.channel_messages(CHANNEL)
        assert await store.queue.effect(job_id, STEP) is None  # the ts never reached the store
        assert await store.queue.effect(job_id, STEP + INTENT) is not None
        assert message.metadata == {
            "event_type": "nixmox_job_effect",
            "event_payload": {"job": job_id, "step": STEP},
        }
        with attempt(store, job_id, 2):
            ts = await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="v2")
    assert ts == message.ts and fake_slack.channel_messages(CHANNEL) == [message]
    assert message.text == "v2" and message.updates == 1
    assert len(fake_slack.calls_to(POST)) == 1
    [lookup] = fake_slack.calls_to(HISTORY)
    assert lookup.args["include_all_metadata"] == "true" and lookup.args["channel"] == CHANNEL
    assert await store.queue.effect(job_id, STEP) == message.ts  # recorded now
    assert fake_slack.violations == []


async def test_a_thread_reply_is_looked_up_in_its_thread(
    fake_slack: FakeSlack, store: Store
) -> None:
    job_id = await store.queue.enqueue("slack.deploy", {})
    async with slack_calls(fake_slack) as call:
        parent = await call(POST, channel=CHANNEL, text="the request")
        thread = str(parent["ts"])
        with attempt(store, job_id, 1), pytest.raises(Died):
            await post_once(
                dying_after(call, POST, answered=True),
                Posting.REFUSAL,
                CHANNEL,
                thread_ts=thread,
                text="not deployed again",
            )
        with attempt(store, job_id, 2):
            ts = await post_once(
                call, Posting.REFUSAL, CHANNEL, thread_ts=thread, text="not deployed again."
            )
    [reply] = fake_slack.replies(CHANNEL, thread)
    assert ts == reply.ts and reply.text == "not deployed again."
    assert [call.args["ts"] for call in fake_slack.calls_to(REPLIES)] == [thread]
    assert fake_slack.calls_to(HISTORY) == [] and fake_slack.violations == []


async def test_a_message_that_never_reached_slack_is_posted_once_by_the_rerun(
    fake_slack: FakeSlack, store: Store
) -> None:
    job_id = await store.queue.enqueue("deploy", {})
    other_job = await store.queue.enqueue("deploy", {})
    async with slack_calls(fake_slack) as call:
        with attempt(store, other_job, 1):  # another job's message, same step name
            await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="other")
        with attempt(store, job_id, 1), pytest.raises(Died):
            await post_once(
                dying_after(call, POST, answered=False), Posting.ANNOUNCEMENT, CHANNEL, text="v1"
            )
        with attempt(store, job_id, 2):
            ts = await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="v2")
    assert [m.text for m in fake_slack.channel_messages(CHANNEL)] == ["other", "v2"]
    assert ts == fake_slack.channel_messages(CHANNEL)[1].ts
    assert len(fake_slack.calls_to(HISTORY)) == 1 and fake_slack.violations == []


async def test_only_an_attempt_that_meant_to_post_makes_the_rerun_look(
    fake_slack: FakeSlack, store: Store
) -> None:
    job_id = await store.queue.enqueue("deploy", {})
    async with slack_calls(fake_slack) as call:
        with attempt(store, job_id, 2):  # the first attempt died before this posting
            await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="v1")
        with attempt(store, job_id, 3):  # ...and the second after recording its ts
            await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="v2")
    assert [m.text for m in fake_slack.channel_messages(CHANNEL)] == ["v2"]
    assert fake_slack.calls_to(HISTORY) == [] and fake_slack.calls_to(REPLIES) == []


async def test_the_fake_reads_history_as_slack_does(fake_slack: FakeSlack) -> None:
    client = AsyncWebClient(token=DEFAULT_TOKEN, base_url=fake_slack.api_url)
    metadata = {"event_type": "nixmox_job_effect", "event_payload": {"job": 1, "step": "s-1"}}
    posted = await client.api_call(
        POST, json={"channel": CHANNEL, "text": "a", "metadata": metadata}
    )
    plain = await client.conversations_history(channel=CHANNEL)
    assert [m["ts"] for m in plain["messages"]] == [posted["ts"]]
    assert "metadata" not in plain["messages"][0]  # only with include_all_metadata
    full = await client.conversations_history(channel=CHANNEL, include_all_metadata=True)
    assert full["messages"][0]["metadata"] == metadata
    later = await client.conversations_history(channel=CHANNEL, oldest=posted["ts"])
    assert later["messages"] == []  # oldest is exclusive unless `inclusive`
    with pytest.raises(SlackApiError, match="invalid_arguments"):
        await client.api_call(HISTORY, json={"channel": CHANNEL})  # Slack reads no JSON here
    with pytest.raises(SlackApiError, match="invalid_metadata_format"):
        await client.api_call(POST, json={"channel": CHANNEL, "text": "b", "metadata": {"x": 1}})
    with pytest.raises(SlackApiError, match="channel_not_found"):
        await client.conversations_history(channel="C0NOWHERE")
    fake_slack.violations.clear()  # the refusals above were the point
