"""With `--role web`, a Slack Approve click only queues the `slack.deploy` job: the web
process runs no deployment, a worker sharing its store does (one SQLite file, the real apps on
127.0.0.1, the fake Slack over HTTP, a real Git repository, the simulated runner)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from bot.app import build_app
from bot.context import CONTEXT
from bot.roles import Role
from bot.slack import SLACK_BOT
from bot.slack.names import JobKind
from runners.config import RunnerConfig, SimulateConfig
from state.events import DeploymentState
from state.queue import JobState
from state.schema import jobs
from state.store import Store
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_github import ManifestRepo
from tests.fixtures_slack import APPROVER, CHANNEL, PROGRESS_INTERVAL, SlackDriver, slack_settings

SCALE = 0.1


def role_app(tmp_path: Path, fake: FakeSlack, repo: ManifestRepo, role: Role) -> web.Application:
    """One process of the bot: the same settings (one SQLite file) in every role."""
    config = RunnerConfig(simulate=SimulateConfig(scale=SCALE))
    app = build_app(slack_settings(tmp_path, fake, repo.path), runner_config=config, role=role)
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    return app


async def job_rows(store: Store, kind: str) -> list[Any]:
    query = sa.select(jobs.c.state, jobs.c.worker).where(jobs.c.kind == kind)
    async with store.engine.connect() as conn:
        return list((await conn.execute(query)).all())


def pending(fake: FakeSlack) -> Message | None:
    for message in fake.channel_messages(CHANNEL):
        if "Approve" in [b["text"]["text"] for b in message.buttons()]:
            return message
    return None


async def test_a_web_approve_queues_the_deployment_for_a_worker(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    web_app = role_app(tmp_path, fake_slack, manifest_repo, Role.WEB)
    driver = SlackDriver(await aiohttp_client(web_app), fake_slack)
    web_ctx = web_app[CONTEXT]
    store = web_ctx.require_store()
    assert (await driver.command("deploy gitea")).status == 200
    await web_app[SLACK_BOT].idle()
    assert [row.state for row in await job_rows(store, JobKind.REQUEST)] == [JobState.QUEUED]

    # a worker plans the request, then stops
    planner = await aiohttp_client(role_app(tmp_path, fake_slack, manifest_repo, Role.WORKER))
    message = await fake_slack.wait_for(lambda: pending(fake_slack))
    await planner.close()
    # someone reads the request before clicking; edits are paced per process, and this web
    # never saw the planner's last edit
    await asyncio.sleep(PROGRESS_INTERVAL)

    assert (await driver.click(message, "Approve", user=APPROVER)).status == 200
    await web_app[SLACK_BOT].idle()
    assert [row.state for row in await job_rows(store, JobKind.DEPLOY)] == [JobState.QUEUED]
    assert await store.deployments.history() == []  # the web process deployed nothing
    assert web_ctx.require_jobs()._tasks == []  # and claims no jobs

    worker_app = role_app(tmp_path, fake_slack, manifest_repo, Role.WORKER)
    worker = await aiohttp_client(worker_app)
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    [record] = await worker_app[CONTEXT].require_store().deployments.history()
    [deploy_job] = await job_rows(store, JobKind.DEPLOY)
    assert deploy_job.worker == worker_app[CONTEXT].require_jobs().name
    assert record.state is DeploymentState.SUCCEEDED and record.approved_by is not None
    await worker.close()  # before the web's store closes: nothing of it runs on in teardown
