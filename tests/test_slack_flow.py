"""The Slack bot end to end: signed slash commands and clicks into the real aiohttp app on
127.0.0.1, the bot talking to the fake Slack Web API over HTTP, plans from a real Git repository
(real nix-instantiate), deployments by the simulated runner, everything recorded in SQLite."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from aiohttp import web

from bot.app import build_app
from bot.context import CONTEXT, BotContext
from bot.slack import SLACK_BOT, SlackBot
from bot.slack.names import JobKind
from runners.config import RunnerConfig, SimulateConfig
from state.approvals import ApprovalRecord, ApprovalState
from state.events import DeploymentKind, DeploymentState, Trigger, utcnow
from state.schema import jobs
from state.store import Store
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_github import ManifestRepo, add_port, break_manifest
from tests.fixtures_slack import (
    APPROVER,
    CHANNEL,
    PROGRESS_INTERVAL,
    REQUESTER,
    STRANGER,
    SlackDriver,
    slack_settings,
)

SCALE = 0.1  # simulated step durations x0.1: a deployment of gitea takes about a second


@dataclass
class Bot:
    """The app under test and the handles a test needs."""

    app: web.Application
    driver: SlackDriver
    fake: FakeSlack

    @property
    def ctx(self) -> BotContext:
        return self.app[CONTEXT]

    @property
    def slack(self) -> SlackBot:
        return self.app[SLACK_BOT]

    @property
    def store(self) -> Store:
        return self.ctx.require_store()

    async def request(self, command: str, user: str = REQUESTER) -> Message:
        """`user` sends `/nixmox <command>`; its request message (with Approve), once posted."""
        await self.driver.command(command, user=user)
        return await self.pending_request()

    async def pending_request(self, after: int = 0) -> Message:
        """The newest message with an Approve button (after `after` earlier versions)."""

        def find() -> Message | None:
            for message in reversed(self.fake.channel_messages(CHANNEL)):
                labels = [b["text"]["text"] for b in message.buttons()]
                if "Approve" in labels and len(message.versions) > after:
                    return message
            return None

        return await self.fake.wait_for(find)

    async def approval_of(self, message: Message) -> ApprovalRecord:
        approve = next(b for b in message.buttons() if b["text"]["text"] == "Approve")
        approval = await self.store.approvals.get(approve["value"].split(" ")[0])
        assert approval is not None
        return approval

    async def audit(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [
            (a.actor, a.action, a.detail) for a in reversed(await self.store.audit.entries(200))
        ]

    async def settled(self) -> None:
        """Every after-the-ack task and queued job has finished."""
        await self.slack.idle()
        await self.ctx.require_jobs().drain(timeout=60)
        await self.slack.idle()


async def start_bot(
    aiohttp_client: Any,
    tmp_path: Path,
    fake: FakeSlack,
    repo: ManifestRepo,
    *,
    fail: tuple[str, ...] = (),
    **settings: Any,
) -> Bot:
    config = RunnerConfig(simulate=SimulateConfig(scale=SCALE, fail=list(fail)))
    app = build_app(slack_settings(tmp_path, fake, repo.path, **settings), runner_config=config)
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    client = await aiohttp_client(app)
    return Bot(app, SlackDriver(client, fake), fake)


def ephemerals_to(fake: FakeSlack, user: str) -> list[str]:
    return [e.all_text() for e in fake.ephemerals if e.user == user]


async def deploy_gitea(bot: Bot) -> Message:
    """`/nixmox deploy gitea`, approved by the approver, waited for until it finishes."""
    sent = await bot.driver.command("deploy gitea")
    assert sent.status == 200
    message = await bot.pending_request()
    assert (await bot.driver.click(message, "Approve", user=APPROVER)).status == 200
    await bot.fake.wait_for(lambda: "Succeeded" in message.text or "Failed" in message.text)
    return message


async def test_deploy_approve_progress_success(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    head = manifest_repo.repo.heads.main.commit.hexsha

    sent = await bot.driver.command("deploy gitea")
    assert sent.status == 200
    ack = sent.json()
    assert ack["response_type"] == "ephemeral"
    assert "Planning a deployment of gitea" in ack["text"]

    message = await bot.pending_request()
    approval = await bot.approval_of(message)
    text = message.all_text()
    assert "Deploy gitea" in text and f"<@{REQUESTER}>" in text
    assert "*gitea*" in text and "*postgresql*" in text  # a line per service
    assert f"revision `{head[:12]}`" in text
    assert approval.state is ApprovalState.PENDING
    assert approval.requested_by == f"slack:{REQUESTER}"
    assert approval.plan is not None and approval.digest == approval.plan.digest
    assert {b["value"] for b in message.buttons()} == {f"{approval.id} {approval.digest}"}

    assert (await bot.driver.click(message, "Approve", user=APPROVER)).status == 200
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)

    texts = [version["text"] for version in message.versions]
    approved = next(i for i, t in enumerate(texts) if f"Approved by <@{APPROVER}>" in t)
    progress = texts[approved + 1 :]
    assert len(progress) >= 3, texts  # live updates between the approval and the end
    assert any("steps" in t and "Succeeded" not in t for t in progress[:-1])
    assert "Succeeded" in progress[-1]
    final = message.all_text()
    assert ":white_check_mark: *gitea* — succeeded" in final
    assert ":white_check_mark: *postgresql* — succeeded" in final
    assert f"approved by <@{APPROVER}>" in final and "5/5 steps" in final
    # every edit of the message came at least one coalescing interval after the previous one
    gaps = [b - a for a, b in zip(message.update_times, message.update_times[1:], strict=False)]
    assert min(gaps) >= PROGRESS_INTERVAL * 0.95

    await bot.settled()
    [record] = await bot.store.deployments.history()
    assert record.state is DeploymentState.SUCCEEDED
    assert record.trigger == Trigger.SLACK and record.kind is DeploymentKind.DEPLOY
    assert (record.requested_by, record.approved_by) == (f"slack:{REQUESTER}", f"slack:{APPROVER}")
    assert record.digest == approval.digest and record.head == head
    # a one-service deployment does not count as the homelab's deployed revision
    assert record.scope == "gitea"
    assert await bot.store.deployments.last_deployed_revision() is None
    stored = await bot.store.approvals.get(approval.id)
    assert stored is not None and stored.state is ApprovalState.APPROVED
    assert stored.resolved_by == f"slack:{APPROVER}"
    actions = [(actor, action) for actor, action, _ in await bot.audit()]
    assert (f"slack:{REQUESTER}", "slack.request") in actions
    assert (f"slack:{APPROVER}", "slack.approval.approved") in actions


async def test_unauthorised_approver_changes_nothing(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    message = await bot.request("deploy gitea")
    versions = len(message.versions)

    assert (await bot.driver.click(message, "Approve", user=STRANGER)).status == 200
    await fake_slack.wait_for(lambda: ephemerals_to(fake_slack, STRANGER))
    await bot.settled()

    assert "Only the configured approvers can approve" in ephemerals_to(fake_slack, STRANGER)[0]
    assert len(message.versions) == versions  # the message did not change
    assert "Approve" in [b["text"]["text"] for b in message.buttons()]
    assert (await bot.approval_of(message)).state is ApprovalState.PENDING
    assert await bot.store.deployments.history() == []
    refused = [d for _, action, d in await bot.audit() if action == "slack.approval.refused"]
    assert refused and refused[0]["reason"] == "not_approver"

    # a stranger cannot cancel someone else's request either
    await bot.driver.click(message, "Cancel", user=STRANGER)
    await fake_slack.wait_for(lambda: len(ephemerals_to(fake_slack, STRANGER)) == 2)
    await bot.settled()
    assert "Only the requester or an approver can cancel" in ephemerals_to(fake_slack, STRANGER)[1]
    assert (await bot.approval_of(message)).state is ApprovalState.PENDING


async def test_self_approval_refused_by_default(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, slack_approvers=[APPROVER, REQUESTER]
    )
    message = await bot.request("deploy gitea", user=REQUESTER)
    versions = len(message.versions)

    await bot.driver.click(message, "Approve", user=REQUESTER)
    await fake_slack.wait_for(lambda: ephemerals_to(fake_slack, REQUESTER))
    await bot.settled()

    assert "cannot approve your own request" in ephemerals_to(fake_slack, REQUESTER)[0]
    assert len(message.versions) == versions
    assert (await bot.approval_of(message)).state is ApprovalState.PENDING
    assert await bot.store.deployments.history() == []
    refused = [d for _, action, d in await bot.audit() if action == "slack.approval.refused"]
    assert refused[0]["reason"] == "self_approval"

    # the requester may still cancel their own request
    await bot.driver.click(message, "Cancel", user=REQUESTER)
    await fake_slack.wait_for(lambda: "Cancelled by" in message.text)
    await bot.settled()
    assert message.buttons() == []
    assert f"Cancelled by <@{REQUESTER}>" in message.all_text()
    actions = [action for _, action, _ in await bot.audit()]
    assert "slack.approval.cancelled" in actions


async def test_self_approval_in_a_single_person_homelab(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client,
        tmp_path,
        fake_slack,
        manifest_repo,
        slack_approvers=[REQUESTER],
        slack_allow_self_approval=True,
    )
    message = await bot.request("deploy gitea", user=REQUESTER)
    await bot.driver.click(message, "Approve", user=REQUESTER)
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    await bot.settled()
    [record] = await bot.store.deployments.history()
    assert record.requested_by == record.approved_by == f"slack:{REQUESTER}"


async def test_expired_approval_refused(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, approval_ttl=timedelta(seconds=1)
    )
    message = await bot.request("deploy gitea")
    approval = await bot.approval_of(message)
    while utcnow() < approval.expires_at:
        await asyncio.sleep(0.05)

    await bot.driver.click(message, "Approve", user=APPROVER)
    await fake_slack.wait_for(lambda: "Expired" in message.text)
    await bot.settled()

    assert "expired and cannot be approved" in ephemerals_to(fake_slack, APPROVER)[0]
    assert [b["text"]["text"] for b in message.buttons()] == ["Re-plan"]
    stored = await bot.store.approvals.get(approval.id)
    assert stored is not None and stored.state is ApprovalState.EXPIRED
    assert await bot.store.deployments.history() == []
    refused = [d for _, action, d in await bot.audit() if action == "slack.approval.refused"]
    assert refused[0]["reason"] == "expired"

    # Re-plan asks again, in the same message, as a new request
    await bot.driver.click(message, "Re-plan", user=REQUESTER)
    replanned = await bot.pending_request(after=len(message.versions))
    assert replanned.ts == message.ts
    assert (await bot.approval_of(replanned)).id != approval.id


async def test_failing_step_reports_in_thread_and_rolls_back(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, fail=("verify:gitea",)
    )
    message = await deploy_gitea(bot)
    await bot.settled()

    final = message.all_text()
    assert "Failed and rolled back" in final
    assert "rolled back: gitea" in final
    assert ":leftwards_arrow_with_hook: *gitea* — rolled back" in final
    [reply] = fake_slack.replies(CHANNEL, message.ts)
    text = reply.all_text()
    assert "`verify:gitea` failed" in text
    assert "simulated failure of verify:gitea" in text  # the step's last output lines
    assert "rolled back *gitea* to `/nix/store/" in text
    [record] = await bot.store.deployments.history()
    assert record.state is DeploymentState.ROLLED_BACK


async def test_rollback_from_slack(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await deploy_gitea(bot)
    await bot.settled()
    [deployed] = await bot.store.deployments.history()

    sent = await bot.driver.command("rollback gitea")
    assert "Planning a rollback of gitea" in sent.json()["text"]
    message = await bot.pending_request()
    text = message.all_text()
    assert "Roll back gitea" in text
    assert f"undo deployment {deployed.id}: gitea back to the systems they ran before it" in text
    approval = await bot.approval_of(message)
    assert approval.kind == "rollback"

    await bot.driver.click(message, "Approve", user=APPROVER)
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    await bot.settled()

    assert "Roll back gitea" in message.all_text()
    rollback, _ = await bot.store.deployments.history()
    assert rollback.kind is DeploymentKind.ROLLBACK
    assert rollback.state is DeploymentState.SUCCEEDED
    assert rollback.trigger == Trigger.SLACK and rollback.approved_by == f"slack:{APPROVER}"
    previous = {s.service: s.previous_system for s in deployed.steps if s.phase.startswith("nix")}
    activated = {s.service: s.new_system for s in rollback.steps if s.phase.startswith("nix")}
    assert activated == {"gitea": previous["gitea"]}

    # --to a deployment id: back to the systems that deployment installed
    await bot.driver.command(f"rollback gitea --to {deployed.id}")
    again = await bot.pending_request()
    assert again.ts != message.ts
    assert f"gitea back to the systems of deployment {deployed.id}" in again.all_text()
    assert (await bot.approval_of(again)).args["to"] == deployed.id


async def test_forged_and_stale_requests_get_401(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    driver = bot.driver
    now = int(driver.clock())
    forged = await driver.command("deploy gitea", secret="not-the-signing-secret")
    # well outside the 5-minute window, so a slow machine cannot move them back into it
    stale = await driver.command("deploy gitea", timestamp=now - 400)
    future = await driver.command("deploy gitea", timestamp=now + 400)
    unsigned = await driver.command("deploy gitea", headers={})
    garbage = await driver.command(
        "deploy gitea", headers={"X-Slack-Request-Timestamp": "soon", "X-Slack-Signature": "v0=1"}
    )
    for sent in (forged, stale, future, unsigned, garbage):
        assert sent.status == 401, sent
    # signed, but not a Slack payload: a clear 400, never a 500
    malformed = await driver.post(b"payload=%7Bnot-json", "application/x-www-form-urlencoded")
    assert malformed.status == 400 and "not a Slack payload" in malformed.text
    await bot.settled()
    assert fake_slack.calls == []
    assert await bot.audit() == []
    assert await bot.store.deployments.history() == []

    # the same request, signed now, is accepted
    assert (await driver.command("help")).status == 200


async def test_help_and_bad_commands_answer_with_the_help_text(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    for text, problem in (
        ("frobnicate", "unknown command `frobnicate`"),
        ("deploy", "say which service to deploy"),
        ("deploy gitea --force", "unknown option `--force`"),
        ("help", "Usage: `/nixmox <command>`"),
    ):
        sent = await bot.driver.command(text)
        assert sent.status == 200
        body = sent.json()
        assert body["response_type"] == "ephemeral"
        assert problem in body["text"]
        assert "`/nixmox deploy <service>|all [--ref REF]`" in body["text"]
    await bot.settled()
    assert fake_slack.channel_messages(CHANNEL) == []


async def test_status_mirrors_the_cli(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await deploy_gitea(bot)
    await bot.settled()
    [record] = await bot.store.deployments.history()

    sent = await bot.driver.command("status")
    assert sent.status == 200 and "Looking that up" in sent.json()["text"]
    response = await fake_slack.wait_for(lambda: fake_slack.responses)
    text = response[-1].all_text()
    assert "NixMox Service Status" in text
    assert f"Last deployment: `{record.id}` deploy *succeeded*" in text
    for service in ("gitea", "postgresql"):
        assert f"*{service}* · revision `{record.head[:12]}`" in text
    assert response[-1].body["response_type"] == "ephemeral"

    await bot.driver.command("history gitea")
    await fake_slack.wait_for(lambda: len(fake_slack.responses) == 2)
    history = fake_slack.responses[1].all_text()
    assert "Recent deployments of gitea" in history
    assert f"`{record.id}` deploy *succeeded* (slack by <@{REQUESTER}>)" in history


async def test_plan_of_a_branch_and_a_broken_manifest(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    feature = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    broken = manifest_repo.commit(break_manifest(manifest_repo.manifest()), "oops", branch="bad")

    sent = await bot.driver.command("plan gitea --ref feature")
    assert "Planning a deployment of gitea @ feature" in sent.json()["text"]
    [response] = await fake_slack.wait_for(lambda: fake_slack.responses)
    assert response.body["response_type"] == "ephemeral"
    assert f"head `{feature[:12]}`" in response.all_text()
    assert "*gitea*" in response.all_text()
    assert fake_slack.channel_messages(CHANNEL) == []  # a plan is only for the asker

    await bot.driver.command("deploy gitea --ref bad")
    message = await fake_slack.wait_for(
        lambda: next((m for m in fake_slack.channel_messages(CHANNEL) if "error" in m.text), None)
    )
    await bot.settled()
    text = message.all_text()
    assert "Could not plan: the manifest has 2 error(s)" in text
    assert "nope" in text  # the validation errors are listed
    assert f"revision `{broken[:12]}`" in text
    assert message.buttons() == []  # nothing to approve
    failed = [d for _, action, d in await bot.audit() if action == "slack.request.failed"]
    assert failed and failed[0]["ref"] == "bad"


async def test_only_deployers_may_request(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, slack_deployers=[REQUESTER]
    )
    for text in ("deploy gitea", "rollback"):
        sent = await bot.driver.command(text, user=STRANGER)
        assert sent.status == 200
        assert "not allowed to request deployments" in sent.json()["text"]
    sent = await bot.driver.command("lock gitea", user=STRANGER)
    assert "Only the configured deployers and approvers can lock" in sent.json()["text"]
    await bot.settled()
    assert fake_slack.channel_messages(CHANNEL) == []
    refused = [(a, d) for a, action, d in await bot.audit() if action == "slack.request.refused"]
    assert len(refused) == 3 and all(actor == f"slack:{STRANGER}" for actor, _ in refused)


async def test_a_locked_service_is_not_deployed(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, slack_deployers=[REQUESTER]
    )
    await bot.driver.command("lock gitea disk replacement")
    [locked] = await fake_slack.wait_for(lambda: fake_slack.responses)
    assert locked.body["response_type"] == "in_channel"
    assert f"<@{REQUESTER}> locked *gitea*: disk replacement" in locked.all_text()

    message = await bot.request("deploy gitea")
    await bot.driver.click(message, "Approve", user=APPROVER)
    await fake_slack.wait_for(lambda: "could not start" in message.text)
    await bot.settled()
    assert f"gitea is locked by slack:{REQUESTER} (disk replacement)" in message.all_text()
    assert await bot.store.deployments.history() == []

    await bot.driver.command("unlock gitea")
    await fake_slack.wait_for(lambda: len(fake_slack.responses) == 2)
    assert f"<@{REQUESTER}> unlocked *gitea*" in fake_slack.responses[1].all_text()
    actions = [action for _, action, _ in await bot.audit()]
    assert {"slack.lock", "slack.unlock", "slack.deploy.not_started"} <= set(actions)


async def test_lock_and_unlock_need_a_deployer_or_approver(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    # approvers are configured, deployers are not: a stranger may not lock or unlock
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await bot.driver.command("lock gitea mine", user=APPROVER)
    await fake_slack.wait_for(lambda: fake_slack.responses)
    for text in ("unlock gitea", "lock postgresql"):
        sent = await bot.driver.command(text, user=STRANGER)
        assert sent.status == 200
        assert "Only the configured deployers and approvers can lock" in sent.json()["text"]
    await bot.settled()
    assert [(lock.service, lock.holder) for lock in await bot.store.locks.all()] == [
        ("gitea", f"slack:{APPROVER}")
    ]


async def test_unlock_never_frees_a_running_deployment(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    holder = "deployment 3f2a9c1d (bot-1:4242)"  # the lease a running deployment holds
    await bot.store.locks.acquire(["gitea"], holder, lease=timedelta(minutes=5))
    sent = await bot.driver.command("unlock gitea", user=APPROVER)
    assert sent.status == 200
    [answer] = await fake_slack.wait_for(lambda: fake_slack.responses)
    await bot.settled()
    assert answer.body["response_type"] == "ephemeral"
    assert (
        f"*gitea* is locked by running {holder}; it will be released when that deployment ends"
        in answer.all_text()
    )
    assert [lock.holder for lock in await bot.store.locks.all()] == [holder]
    assert "slack.unlock" not in [action for _, action, _ in await bot.audit()]


async def test_a_rerun_deploy_job_does_not_deploy_again(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    message = await bot.request("deploy gitea")
    requested = await bot.approval_of(message)
    await bot.driver.click(message, "Approve", user=APPROVER)
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    await bot.settled()
    [record] = await bot.store.deployments.history()
    approval = await bot.store.approvals.get(requested.id)
    assert (
        approval is not None and approval.deployment_id == record.id
    )  # recorded when the deployment started

    # the worker died after the deployment: the queue hands the same job out again
    async with bot.store.engine.connect() as conn:
        [payload] = (
            await conn.execute(sa.select(jobs.c.payload).where(jobs.c.kind == JobKind.DEPLOY))
        ).scalars()
    await bot.ctx.require_jobs().enqueue(JobKind.DEPLOY, payload)
    [reply] = await fake_slack.wait_for(lambda: fake_slack.replies(CHANNEL, message.ts))
    await bot.settled()
    assert f"already deployed as {record.id}" in reply.text
    assert [r.id for r in await bot.store.deployments.history()] == [record.id]
    not_started = [d for _, action, d in await bot.audit() if action == "slack.deploy.not_started"]
    assert not_started and not_started[0]["deployment"] == record.id


async def test_fork_code_is_refused(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    # a fork's pull request: its commit is under refs/pull/7/head, on no branch of the repo
    fork = manifest_repo.commit(add_port(manifest_repo.manifest()), "fork", branch="fork")
    manifest_repo.repo.git.update_ref("refs/pull/7/head", fork)
    manifest_repo.repo.delete_head("fork", force=True)
    # a commit on a branch is still fine by its full id
    feature = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")

    sent = await bot.driver.command("deploy gitea --ref refs/pull/7/head")
    assert sent.status == 200 and sent.json()["response_type"] == "ephemeral"
    assert "`refs/pull/7/head` is a pull request ref" in sent.json()["text"]

    sent = await bot.driver.command(f"deploy gitea --ref {fork}")
    assert "Planning" in sent.json()["text"]
    [refused] = await fake_slack.wait_for(lambda: fake_slack.responses)
    await bot.settled()
    assert refused.body["response_type"] == "ephemeral"
    assert f"commit `{fork[:12]}` is not on any branch" in refused.all_text()
    assert fake_slack.channel_messages(CHANNEL) == []  # nothing posted, nothing to approve
    assert await bot.store.deployments.history() == []
    reasons = [d["ref"] for _, a, d in await bot.audit() if a == "slack.request.refused"]
    assert reasons == ["refs/pull/7/head", fork]

    await bot.driver.command(f"deploy gitea --ref {feature}")
    message = await bot.pending_request()
    assert f"revision `{feature[:12]}`" in message.all_text()


async def test_two_approvers_at_once_deploy_once(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    other = "U0OTHERAPPROVER"
    bot = await start_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, slack_approvers=[APPROVER, other]
    )
    message = await bot.request("deploy gitea")
    clicks = await asyncio.gather(
        bot.driver.click(message, "Approve", user=APPROVER),
        bot.driver.click(message, "Approve", user=other),
    )
    assert [sent.status for sent in clicks] == [200, 200]
    await fake_slack.wait_for(lambda: "Succeeded" in message.text)
    await bot.settled()
    assert len(await bot.store.deployments.history()) == 1
    refused = ephemerals_to(fake_slack, APPROVER) + ephemerals_to(fake_slack, other)
    assert refused == ["This request was already handled."]


async def test_an_expired_request_says_so_without_a_click(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    config = RunnerConfig(simulate=SimulateConfig(scale=SCALE))
    settings = slack_settings(
        tmp_path, fake_slack, manifest_repo.path, approval_ttl=timedelta(seconds=1)
    )
    app = build_app(settings, runner_config=config)
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    app[SLACK_BOT].expiry_sweep_interval = 0.2
    bot = Bot(app, SlackDriver(await aiohttp_client(app), fake_slack), fake_slack)

    message = await bot.request("deploy gitea")
    await fake_slack.wait_for(lambda: "Expired" in message.text)
    assert [b["text"]["text"] for b in message.buttons()] == ["Re-plan"]
    audit = await bot.audit()
    assert ("nixmox", "slack.approval.expired") in [(actor, action) for actor, action, _ in audit]


async def test_a_channel_the_bot_cannot_post_in_is_explained(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo, slack_channel=None)
    fake_slack.fail["chat.postMessage"] = "not_in_channel"
    sent = await bot.driver.command("deploy gitea", channel="C0GENERAL")
    assert "posted in <#C0GENERAL>" in sent.json()["text"]  # no channel set: where it was asked
    [response] = await fake_slack.wait_for(lambda: fake_slack.responses)
    await bot.settled()
    assert "I could not post in <#C0GENERAL> (not_in_channel)" in response.all_text()
    assert "/invite @nixmox" in response.all_text()
    assert await bot.store.deployments.history() == []
    failed = [d for _, action, d in await bot.audit() if action == "slack.request.failed"]
    assert failed == [{"channel": "C0GENERAL", "error": "not_in_channel"}]
