"""A deployment left running by a dead process is reported when the bot starts again: GitHub
statuses and Deployment end in `error`, its Slack message gets its interrupted ending (or a new
message says so), the audit log records it, and failing reports never keep the bot down.

The dead process is played by a first application: its real notifiers (from
`ctx.subscribers_for`) see the deployment start and run until a step is running, the store
records the same events under a short lease, then that application goes away without finishing
anything, and a second application starts on the same store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.app import build_app
from bot.context import BotContext, DeploymentRequest
from bot.recovery import RecoveryAudit, RecoverySweeper
from bot.slack import SLACK_BOT
from bot.slack.names import Audit
from planner.plan import Plan, plan_full
from planner.source import load_manifest
from state import events
from state.events import DeploymentKind, DeploymentState, StepState, Subscriber, Trigger, utcnow
from state.store import Store
from tests.fakes.github import FakeGitHub
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_github import ManifestRepo
from tests.fixtures_manifests import SMALL_MANIFEST
from tests.fixtures_slack import (
    APPROVER,
    CHANNEL,
    PROGRESS_INTERVAL,
    REQUESTER,
    slack_overrides,
    slack_settings,
)

SMALL = SMALL_MANIFEST
DEPLOY = "nixmox/deploy"
LEASE = timedelta(milliseconds=200)
DEAD_HOLDER = "deployment (bot-0:4242)"
BEFORE_VERIFY = [
    "tf:infra",
    "nix:core:postgresql",
    "verify:postgresql",
    "nix:service-config:gitea",
]


def small_plan(head: str, service: str | None = None) -> Plan:
    return plan_full(load_manifest(SMALL), service=service, head=head)


async def emit(event: events.Event, store: Store, subscribers: Sequence[Subscriber]) -> None:
    """What the executor does with every event: record it, then tell the notifiers."""
    await store.deployments.record_event(event)
    for subscriber in subscribers:
        await subscriber(event)


async def left_running(
    store: Store,
    plan: Plan,
    request: DeploymentRequest,
    *,
    done: list[str],
    running: str,
    subscribers: Sequence[Subscriber] = (),
    scope: str | None = None,
    lease: timedelta = LEASE,
) -> str:
    """A deployment whose process died while `running` ran, after `done` had succeeded."""
    deployment_id = await store.deployments.create(
        kind=request.kind,
        trigger=request.trigger,
        plan=plan,
        requested_by=request.requested_by,
        approved_by=request.approved_by,
        head=request.revision,
        holder=DEAD_HOLDER,
        lease=lease,
        scope=scope,
    )
    steps = {step.id: step for step in plan.steps}
    await emit(events.DeploymentStarted(deployment_id, plan, kind=request.kind), store, subscribers)
    for step_id in done:
        await emit(events.StepStarted(deployment_id, steps[step_id]), store, subscribers)
        await emit(
            events.StepFinished(deployment_id, steps[step_id], StepState.SUCCEEDED),
            store,
            subscribers,
        )
    await emit(events.StepStarted(deployment_id, steps[running]), store, subscribers)
    return deployment_id


async def lease_runs_out(store: Store, deployment_id: str) -> None:
    """Nobody renews the dead holder's lease: wait until it is in the past."""
    record = await store.deployments.get(deployment_id)
    assert record is not None and record.state is DeploymentState.RUNNING
    assert record.lease_until is not None
    while utcnow() <= record.lease_until:
        await asyncio.sleep(0.05)


async def die(subscribers: list[Subscriber]) -> None:
    """The process is gone: its notifiers' background tasks end with it.

    A restart takes longer than Slack's interval between two edits of a message (the new
    process cannot know when the dead one last edited it).
    """
    for subscriber in subscribers:
        task = getattr(subscriber, "_task", None)
        if task is not None:
            task.cancel()
    await asyncio.sleep(PROGRESS_INTERVAL)


async def reported(ctx: BotContext) -> None:
    """Wait for the start-up report of the interrupted deployments."""
    task = ctx.tasks.recovery_report
    assert task is not None, "the bot did not start reporting interrupted deployments"
    await asyncio.wait_for(task, 60)


async def audit_entry(store: Store, action: str, deployment_id: str) -> dict[str, Any]:
    """The one audit entry of `action` about a deployment."""
    entries = [
        entry.detail
        for entry in await store.audit.entries(200)
        if entry.action == action and entry.detail.get("deployment") == deployment_id
    ]
    assert len(entries) == 1, (action, entries)
    return entries[0]


async def linked(store: Store, deployment_id: str) -> dict[str, Any]:
    """The recorded Slack message of a deployment, once its notifier has recorded it."""
    for _ in range(200):
        try:
            return await audit_entry(store, Audit.MESSAGE, deployment_id)
        except AssertionError:
            await asyncio.sleep(0.05)
    return await audit_entry(store, Audit.MESSAGE, deployment_id)


def only_message(fake: FakeSlack) -> Message:
    [message] = fake.channel_messages(CHANNEL)
    return message


async def start_slack_bot(
    aiohttp_client: Any,
    tmp_path: Path,
    fake: FakeSlack,
    repo: ManifestRepo,
    recovery_interval: float | None = None,
) -> Any:
    app = build_app(
        slack_settings(tmp_path, fake, repo.path),
        start_worker=False,
        recovery_interval=recovery_interval,
    )
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    return await aiohttp_client(app)


async def test_a_merge_interrupted_during_verify_ends_in_error_on_github_and_in_slack(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    fake_github: FakeGitHub,
    fake_slack: FakeSlack,
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    dead = await make_bot(**slack_overrides(fake_slack))
    dead.app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    store = dead.ctx.require_store()
    request = DeploymentRequest(trigger=Trigger.MERGE, requested_by="github:alice", revision=head)
    subscribers = await dead.ctx.subscribers_for(request)
    assert len(subscribers) == 2  # GitHub and Slack
    deployment_id = await left_running(
        store,
        small_plan(head),
        request,
        done=BEFORE_VERIFY,
        running="verify:gitea",
        subscribers=subscribers,
    )
    [message] = await fake_slack.wait_for(
        lambda: [
            m
            for m in fake_slack.channel_messages(CHANNEL)
            if "running `verify:gitea`" in m.all_text()
        ]
    )
    # what the dead process left on GitHub: pending statuses and an in_progress Deployment
    assert fake_github.last_status(head, DEPLOY)["state"] == "pending"
    assert fake_github.last_status(head, f"{DEPLOY}/gitea")["state"] == "pending"
    assert fake_github.last_status(head, f"{DEPLOY}/postgresql")["state"] == "success"
    [github_deployment] = fake_github.deployments
    assert fake_github.deployment_statuses[github_deployment][-1]["state"] == "in_progress"
    await dead.client.close()
    await die(subscribers)
    await lease_runs_out(store, deployment_id)

    bot = await make_bot(**slack_overrides(fake_slack))
    await reported(bot.ctx)

    record = await bot.ctx.require_store().deployments.get(deployment_id)
    assert record is not None and record.state is DeploymentState.INTERRUPTED
    deploy = fake_github.last_status(head, DEPLOY)
    assert deploy["state"] == "error"
    assert deploy["description"] == "interrupted: the bot stopped during verify:gitea"
    assert deploy["target_url"] == f"http://bot.test/deployments/{deployment_id}"
    gitea = fake_github.last_status(head, f"{DEPLOY}/gitea")
    assert gitea["state"] == "error"
    assert gitea["description"] == "verify:gitea interrupted: the bot stopped while it ran"
    # postgresql had finished and was reported then: not reported again
    postgresql = fake_github.statuses_for(head, f"{DEPLOY}/postgresql")
    assert [status["state"] for status in postgresql] == ["pending", "success"]
    # the same GitHub Deployment ends in error; no second one is created
    assert list(fake_github.deployments) == [github_deployment]
    final = fake_github.deployment_statuses[github_deployment][-1]
    assert final["state"] == "error"
    assert final["description"] == "interrupted: the bot stopped during verify:gitea"

    # the same Slack message, now with its ending
    assert only_message(fake_slack) is message
    text = message.all_text()
    assert f"deployment `{record.id}` · on merge" in text
    assert ":warning: *gitea* — interrupted" in text
    assert ":white_check_mark: *postgresql* — succeeded" in text
    assert ":warning: *Interrupted* after" in text
    assert "The bot stopped during `verify:gitea`" in text
    assert "`/nixmox deploy all` resumes it, `/nixmox rollback` undoes what it changed" in text
    assert "Interrupted" in message.text and "verify:gitea" in message.text
    assert fake_slack.replies(CHANNEL, message.ts) == []

    detail = await audit_entry(bot.ctx.require_store(), RecoveryAudit.INTERRUPTED, deployment_id)
    assert detail["stopped_during"] == ["verify:gitea"]
    assert detail["github"]["github_deployment"] == github_deployment
    assert detail["github"]["services"] == ["gitea"]
    assert detail["github"]["failures"] == 0
    assert detail["slack"] == {"channel": CHANNEL, "ts": message.ts, "updated": True}
    assert (await bot.client.get("/healthz")).status == 200


async def test_a_slack_deployment_gets_its_ending_in_the_approval_message(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    dead = await start_slack_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    ctx = dead.app[SLACK_BOT].ctx
    # the approval message the Slack flow posted and that the deployment took over
    posted = await dead.app[SLACK_BOT].client.chat_postMessage(
        channel=CHANNEL, text="Deploy gitea? (approved)"
    )
    request = DeploymentRequest(
        trigger=Trigger.SLACK,
        requested_by=f"slack:{REQUESTER}",
        approved_by=f"slack:{APPROVER}",
        revision=head,
        extra={"slack": {"channel": CHANNEL, "ts": posted["ts"]}, "title": "Deploy gitea"},
    )
    subscribers = await ctx.subscribers_for(request)
    deployment_id = await left_running(
        ctx.require_store(),
        small_plan(head, service="gitea"),
        request,
        done=BEFORE_VERIFY[:3],
        running="nix:service-config:gitea",
        subscribers=subscribers,
        scope="gitea",
    )
    [message] = fake_slack.channel_messages(CHANNEL)
    await fake_slack.wait_for(lambda: "running `nix:service-config:gitea`" in message.all_text())
    link = await linked(ctx.require_store(), deployment_id)
    assert (link["channel"], link["ts"], link["title"]) == (CHANNEL, posted["ts"], "Deploy gitea")
    store = ctx.require_store()
    await dead.close()
    await die(subscribers)
    await lease_runs_out(store, deployment_id)

    bot = await start_slack_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    bot_ctx = bot.app[SLACK_BOT].ctx
    await reported(bot_ctx)

    assert only_message(fake_slack) is message
    text = message.all_text()
    assert "Deploy gitea" in text  # the title it had
    assert f"requested by <@{REQUESTER}>" in text and f"approved by <@{APPROVER}>" in text
    assert ":warning: *gitea* — interrupted · 0/2 steps" in text
    assert "The bot stopped during `nix:service-config:gitea`" in text
    assert "`/nixmox deploy gitea` resumes it, `/nixmox rollback gitea` undoes" in text
    detail = await audit_entry(bot_ctx.require_store(), RecoveryAudit.INTERRUPTED, deployment_id)
    assert "github" not in detail  # GitHub is not configured: nothing reported there
    assert detail["slack"]["updated"] is True


async def test_without_a_known_message_the_interruption_is_announced_in_the_channel(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        # a `nixmox deploy` from the command line: no notifier, no Slack message
        request = DeploymentRequest(trigger=Trigger.CLI, requested_by="ops", revision=head)
        deployment_id = await left_running(
            store, small_plan(head), request, done=BEFORE_VERIFY[:1], running="nix:core:postgresql"
        )
        await lease_runs_out(store, deployment_id)
    finally:
        await store.close()

    bot = await start_slack_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await reported(bot.app[SLACK_BOT].ctx)

    [message] = fake_slack.channel_messages(CHANNEL)
    text = message.all_text()
    assert f"deployment `{deployment_id}` · from the cli" in text
    assert ":warning: *postgresql* — interrupted" in text
    assert ":heavy_minus_sign: *gitea* — not run · 0/2 steps" in text
    assert "1/5 steps; 3 steps not run" in text
    assert ":warning: *Interrupted* after" in text
    assert "The bot stopped during `nix:core:postgresql`" in text
    assert "`/nixmox deploy all` resumes it, `/nixmox rollback` undoes" in text
    store = bot.app[SLACK_BOT].ctx.require_store()
    detail = await audit_entry(store, RecoveryAudit.INTERRUPTED, deployment_id)
    assert detail["slack"] == {
        "channel": CHANNEL,
        "ts": message.ts,
        "updated": False,
        "posted": True,
    }


async def test_a_message_that_cannot_be_edited_is_replaced_by_an_announcement(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    dead = await start_slack_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    ctx = dead.app[SLACK_BOT].ctx
    request = DeploymentRequest(trigger=Trigger.MERGE, requested_by="github:alice", revision=head)
    subscribers = await ctx.subscribers_for(request)
    store = ctx.require_store()
    deployment_id = await left_running(
        store, small_plan(head), request, done=[], running="tf:infra", subscribers=subscribers
    )
    [first] = await fake_slack.wait_for(lambda: fake_slack.channel_messages(CHANNEL))
    await linked(store, deployment_id)
    await dead.close()
    await die(subscribers)
    await lease_runs_out(store, deployment_id)
    fake_slack.fail["chat.update"] = "message_not_found"  # deleted meanwhile

    bot = await start_slack_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    await reported(bot.app[SLACK_BOT].ctx)

    messages = fake_slack.channel_messages(CHANNEL)
    assert len(messages) == 2 and messages[0] is first
    announcement = messages[1].all_text()
    assert f"deployment `{deployment_id}`" in announcement
    assert "The bot stopped during `tf:infra`" in announcement


async def test_failing_reports_never_keep_the_bot_from_starting(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    fake_github: FakeGitHub,
    fake_slack: FakeSlack,
    tmp_path: Path,
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        request = DeploymentRequest(
            trigger=Trigger.MERGE,
            requested_by="github:alice",
            revision=head,
            kind=DeploymentKind.DEPLOY,
        )
        deployment_id = await left_running(
            store, small_plan(head), request, done=BEFORE_VERIFY, running="verify:gitea"
        )
        await lease_runs_out(store, deployment_id)
    finally:
        await store.close()
    fake_github.fail_next(1000)  # every GitHub call answers 500
    fake_slack.fail["chat.postMessage"] = "channel_not_found"

    bot = await make_bot(**slack_overrides(fake_slack))
    await reported(bot.ctx)

    assert (await bot.client.get("/healthz")).status == 200
    assert fake_github.statuses_for(head) == []
    assert fake_slack.channel_messages(CHANNEL) == []
    detail = await audit_entry(bot.ctx.require_store(), RecoveryAudit.INTERRUPTED, deployment_id)
    assert detail["github"]["failures"] > 0
    assert detail["slack"]["posted"] is False
    record = await bot.ctx.require_store().deployments.get(deployment_id)
    assert record is not None and record.state is DeploymentState.INTERRUPTED


async def cli_deployment_left_running(tmp_path: Path, head: str, lease: timedelta) -> str:
    """A `nixmox deploy` (no notifier) whose process died during nix:core:postgresql."""
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        request = DeploymentRequest(trigger=Trigger.CLI, requested_by="ops", revision=head)
        return await left_running(
            store,
            small_plan(head),
            request,
            done=BEFORE_VERIFY[:1],
            running="nix:core:postgresql",
            lease=lease,
        )
    finally:
        await store.close()


async def test_a_restart_within_the_lease_is_reported_once_the_lease_runs_out(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    deployment_id = await cli_deployment_left_running(tmp_path, head, timedelta(seconds=2))

    # the bot is back before the dead deployment's lease ran out: nothing is stale yet
    bot = await start_slack_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, recovery_interval=0.1
    )
    ctx = bot.app[SLACK_BOT].ctx
    store = ctx.require_store()
    assert ctx.tasks.recovery_report is None
    record = await store.deployments.get(deployment_id)
    assert record is not None and record.state is DeploymentState.RUNNING
    assert fake_slack.channel_messages(CHANNEL) == []
    assert not ctx.tasks.recovery_sweep.done()

    # no restart: the periodic sweep interrupts and reports it after the lease
    [message] = await fake_slack.wait_for(lambda: fake_slack.channel_messages(CHANNEL))
    text = message.all_text()
    assert f"deployment `{deployment_id}` · from the cli" in text
    assert ":warning: *postgresql* — interrupted" in text
    assert "The bot stopped during `nix:core:postgresql`" in text
    record = await store.deployments.get(deployment_id)
    assert record is not None and record.state is DeploymentState.INTERRUPTED
    for _ in range(100):
        entries = await store.audit.entries(50, action=RecoveryAudit.INTERRUPTED)
        if entries:
            break
        await asyncio.sleep(0.05)
    detail = await audit_entry(store, RecoveryAudit.INTERRUPTED, deployment_id)
    assert detail["slack"]["ts"] == message.ts and detail["slack"]["posted"] is True
    # later sweeps do not report it again
    await asyncio.sleep(0.3)
    assert len(fake_slack.channel_messages(CHANNEL)) == 1
    await audit_entry(store, RecoveryAudit.INTERRUPTED, deployment_id)


async def test_a_deployment_another_process_recovered_is_reported_by_the_sweep(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.heads.main.commit.hexsha
    since = utcnow()
    deployment_id = await cli_deployment_left_running(tmp_path, head, timedelta(seconds=1))
    bot = await start_slack_bot(
        aiohttp_client, tmp_path, fake_slack, manifest_repo, recovery_interval=3600
    )
    ctx = bot.app[SLACK_BOT].ctx
    await lease_runs_out(ctx.require_store(), deployment_id)
    # the recovery a `nixmox deploy` (another process, another connection) runs as it starts
    other = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        [recovered] = await other.deployments.recover_interrupted()
    finally:
        await other.close()
    assert recovered.id == deployment_id

    sweeper = RecoverySweeper(ctx, 3600, since)
    assert [record.id for record in await sweeper.sweep()] == [deployment_id]
    [message] = fake_slack.channel_messages(CHANNEL)
    assert "The bot stopped during `nix:core:postgresql`" in message.all_text()
    await audit_entry(ctx.require_store(), RecoveryAudit.INTERRUPTED, deployment_id)
    # reported once, by this sweeper or by another (the audit log says so)
    assert await sweeper.sweep() == []
    assert await RecoverySweeper(ctx, 3600, since).sweep() == []
    assert len(fake_slack.channel_messages(CHANNEL)) == 1
