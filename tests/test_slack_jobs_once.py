"""Slack messages a job posts, at most once: a job re-run after its worker died (same job id,
`rerun`) edits what its first attempt posted instead of posting again. The real app on
127.0.0.1, the fake Slack over HTTP, a real Git repository and SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from slack_sdk.web.async_client import AsyncWebClient

from bot.jobs import JobContext, current_job
from bot.slack.names import JobKind
from bot.slack.once import Posting, post_once
from bot.slack.slash import APPROVAL_STEP
from state.schema import approvals, jobs
from state.store import Store
from tests.fakes.slack import DEFAULT_TOKEN, FakeSlack
from tests.fixtures_github import ManifestRepo
from tests.fixtures_slack import APPROVER, CHANNEL
from tests.test_slack_flow import Bot, start_bot


async def job_of(store: Store, kind: str) -> tuple[int, dict[str, Any]]:
    """The newest job of `kind`: its id and payload."""
    query = sa.select(jobs.c.id, jobs.c.payload).where(jobs.c.kind == kind).order_by(jobs.c.id)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    assert rows, f"no {kind} job was queued"
    return int(rows[-1].id), dict(rows[-1].payload)


async def rerun(bot: Bot, job_id: int, handler: Any, payload: dict[str, Any]) -> None:
    """Run a job again as its second attempt (the worker of the first one died)."""
    token = current_job.set(JobContext(job_id, 2, bot.store))
    try:
        await handler(payload)
    finally:
        current_job.reset(token)
    await bot.settled()


async def test_a_rerun_request_job_edits_the_one_request_message(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await bot.driver.command("deploy gitea")
    message = await bot.pending_request()
    await bot.settled()
    job_id, payload = await job_of(bot.store, JobKind.REQUEST)
    versions = len(message.versions)
    requested = await bot.approval_of(message)
    assert await bot.store.queue.effect(job_id, f"{APPROVAL_STEP}-1") == requested.id

    await rerun(bot, job_id, bot.slack.run_request_job, payload)

    [only] = fake_slack.channel_messages(CHANNEL)
    assert only.ts == message.ts and len(only.versions) > versions  # edited, not posted again
    assert "Approve" in [button["text"]["text"] for button in only.buttons()]
    assert len(fake_slack.calls_to("chat.postMessage")) == 1
    # the same request, not a second one beside it (whose expiry would rewrite the message)
    assert (await bot.approval_of(only)).id == requested.id
    async with bot.store.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(approvals))).scalar() == 1


async def test_a_rerun_deploy_job_says_why_once(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await bot.driver.command("deploy gitea")
    message = await bot.pending_request()
    await bot.driver.click(message, "Approve", user=APPROVER)
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    await bot.settled()
    [record] = await bot.store.deployments.history()
    # a second deploy job of the approval says in the thread why it does not deploy...
    _, payload = await job_of(bot.store, JobKind.DEPLOY)
    await bot.ctx.require_jobs().enqueue(JobKind.DEPLOY, payload)
    [reply] = await fake_slack.wait_for(lambda: fake_slack.replies(CHANNEL, message.ts))
    await bot.settled()
    job_id, _ = await job_of(bot.store, JobKind.DEPLOY)
    assert await bot.store.queue.effect(job_id, f"{Posting.REFUSAL}-1") == reply.ts

    # ...and its worker died after posting: the re-run edits that reply, posts none
    await rerun(bot, job_id, bot.slack.run_deploy_job, payload)
    assert [r.ts for r in fake_slack.replies(CHANNEL, message.ts)] == [reply.ts]
    assert reply.updates == 1 and f"already deployed as {record.id}" in reply.text
    assert [r.id for r in await bot.store.deployments.history()] == [record.id]


async def test_an_announcement_posted_in_a_job_is_edited_by_its_rerun(
    fake_slack: FakeSlack, store: Store
) -> None:
    client = AsyncWebClient(token=DEFAULT_TOKEN, base_url=fake_slack.api_url)

    async def call(method: str, **args: Any) -> Any:
        return await client.api_call(method, json=args)

    job_id = await store.queue.enqueue("deploy", {})
    first = current_job.set(JobContext(job_id, 1, store))
    try:
        ts = await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="Deploying gitea")
    finally:
        current_job.reset(first)
    again = current_job.set(JobContext(job_id, 2, store))
    try:
        same = await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="Deploying gitea (2)")
    finally:
        current_job.reset(again)
    [message] = fake_slack.channel_messages(CHANNEL)
    assert ts is not None and same == ts == message.ts
    assert message.text == "Deploying gitea (2)" and message.updates == 1
    # outside a job nothing is recorded: every call posts
    assert await post_once(call, Posting.ANNOUNCEMENT, CHANNEL, text="elsewhere") != ts
    assert len(fake_slack.channel_messages(CHANNEL)) == 2
