"""Both channels see everything: merges are announced in Slack, Slack deployments get GitHub
statuses and a Deployment, and a failing Slack API never fails a deployment."""

from __future__ import annotations

from typing import Any

import pytest

from bot.slack import SLACK_BOT
from state.events import DeploymentState, Trigger
from tests.fakes.github import FakeGitHub
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_github import ManifestRepo, Payloads, add_port
from tests.fixtures_slack import (
    APPROVER,
    CHANNEL,
    PROGRESS_INTERVAL,
    SlackDriver,
    slack_overrides,
)

DEPLOY = "nixmox/deploy"


@pytest.fixture
async def both_bots(make_bot: Any, fake_slack: FakeSlack) -> Any:
    """One bot with GitHub and Slack on, Slack's edits paced as the fake expects."""
    bot = await make_bot(**slack_overrides(fake_slack))
    bot.app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    return bot


async def merge(bot: Any, payloads: Payloads, repo: ManifestRepo) -> str:
    """Push a change to main (gitea gets a port) and run the resulting deployment."""
    before = repo.repo.heads.main.commit.hexsha
    after = repo.commit(add_port(repo.manifest()), "gitea: port 3001")
    response = await bot.deliver("push", payloads.push(before=before, after=after))
    assert (await response.json())["status"] == "accepted"
    await bot.drain()
    return after


async def test_a_merge_is_announced_and_followed_in_slack(
    both_bots: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    fake_slack: FakeSlack,
) -> None:
    bot = both_bots
    after = await merge(bot, payloads, manifest_repo)
    await bot.app[SLACK_BOT].idle()

    [record] = await bot.ctx.require_store().deployments.history()
    assert record.trigger == Trigger.MERGE and record.state is DeploymentState.SUCCEEDED
    [message] = fake_slack.channel_messages(CHANNEL)
    text = message.all_text()
    assert f"deployment `{record.id}` · on merge · revision `{after[:12]}`" in text
    assert "requested by github:alice" in text
    assert ":white_check_mark: *gitea* — succeeded · 2/2 steps" in text
    assert "Succeeded" in message.text
    assert fake_github.last_status(after, DEPLOY)["state"] == "success"


async def test_a_slack_deployment_sets_github_statuses_and_deployment(
    both_bots: Any,
    manifest_repo: ManifestRepo,
    fake_github: FakeGitHub,
    fake_slack: FakeSlack,
) -> None:
    bot = both_bots
    driver = SlackDriver(bot.client, fake_slack)
    head = manifest_repo.repo.heads.main.commit.hexsha

    assert (await driver.command("deploy gitea")).status == 200
    await bot.app[SLACK_BOT].idle()
    await bot.drain()  # plans the request (worker not started in these tests)

    def pending() -> Message | None:
        return next((m for m in fake_slack.channel_messages(CHANNEL) if m.buttons()), None)

    message = await fake_slack.wait_for(pending)
    await driver.click(message, "Approve", user=APPROVER)
    await bot.app[SLACK_BOT].idle()
    await bot.drain()  # runs the approved deployment
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)

    [record] = await bot.ctx.require_store().deployments.history()
    assert record.trigger == Trigger.SLACK and record.head == head
    assert [s["state"] for s in fake_github.statuses_for(head, DEPLOY)][-1] == "success"
    assert fake_github.last_status(head, f"{DEPLOY}/gitea")["state"] == "success"
    [deployment] = fake_github.deployments.values()
    assert deployment["sha"] == head
    states = [s["state"] for s in fake_github.deployment_statuses[deployment["id"]]]
    assert states == ["in_progress", "success"]


async def test_a_failing_slack_api_never_fails_a_deployment(
    both_bots: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    fake_slack: FakeSlack,
) -> None:
    bot = both_bots
    fake_slack.http_fail = {"chat.postMessage", "chat.update"}
    after = await merge(bot, payloads, manifest_repo)
    await bot.app[SLACK_BOT].idle()

    [record] = await bot.ctx.require_store().deployments.history()
    assert record.state is DeploymentState.SUCCEEDED
    assert fake_slack.calls_to("chat.postMessage")  # it did try
    assert all(not call.ok for call in fake_slack.calls_to("chat.postMessage"))
    assert fake_github.last_status(after, DEPLOY)["state"] == "success"
