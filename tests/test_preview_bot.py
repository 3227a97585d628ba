"""Host previews in the bot, against the fake GitHub and the fake Slack: the plan comment first
(with a progress line), then edited in place with what changes on the hosts; a newer push
cancels the preview of the older head; the Slack approval shows a summary per host. Real Nix on
a flake with no inputs (tests/nixhosts.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.github.pulls import digest_in, plan_pull_request
from runners.config import RunnerConfig
from tests import nixhosts
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port

HOSTS = {"postgresql": {"packages": ["postgresql"]}, "gitea": {"packages": ["gitea", "openssl"]}}
VERSIONS = {"postgresql": "15.4", "gitea": "1.21.0", "openssl": "3.0.1"}
SECTION = "#### What changes on the hosts"
PROGRESS = "Building 1 host to show what changes on the hosts"


def commit_files(
    lab: ManifestRepo, branch: str, manifest: str | None, message: str, **flake: Any
) -> str:
    """Write the flake (and the manifest) on `branch` and commit them."""
    repo = lab.repo
    if branch not in [head.name for head in repo.heads]:
        repo.create_head(branch, repo.heads.main.commit)
    repo.heads[branch].checkout()
    nixhosts.write_flake(lab.path, **flake)
    if manifest is not None:
        (lab.path / "nixos/service-manifest.nix").write_text(manifest)
    repo.git.add(A=True)
    sha = repo.index.commit(message).hexsha
    repo.heads.main.checkout()
    return sha


@pytest.fixture
def lab(
    manifest_repo: ManifestRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    nixhosts.nix_env(monkeypatch)
    base = commit_files(manifest_repo, "main", None, "flake", versions=VERSIONS, hosts=HOSTS)
    nixhosts.install_hosts(manifest_repo.path, tmp_path / "hosts", sorted(HOSTS))
    runner_config = RunnerConfig.model_validate(
        {
            "transport": {"kind": "local"},
            "simulate": {"scale": 0.001},  # the bots deploy with simulated runners
            "nixos": {
                "preset": "copy-closure",
                "current_system": f"{tmp_path}/hosts/{{service}}/system",
                "system_profile": f"{tmp_path}/hosts/{{service}}/system",
                "build_cache": str(tmp_path / "builds"),
            },
        }
    )
    return {"base": base, "runner_config": runner_config}


def bodies(fake: FakeGitHub) -> list[str]:
    """Every body the bot posted or edited on PR comments, in order."""
    return [
        str(call.json["body"])
        for call in fake.calls()
        if call.method in ("POST", "PATCH") and "/comments" in call.path and call.json
    ]


async def test_the_comment_comes_first_then_is_edited_with_the_preview(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    lab: dict[str, Any],
) -> None:
    bot = await make_bot(runner_config=lab["runner_config"], preview=True)
    head = commit_files(
        manifest_repo,
        "f",
        add_port(manifest_repo.manifest()),
        "gitea port, gitea 1.21.1",
        versions={**VERSIONS, "gitea": "1.21.1"},
        hosts=HOSTS,
    )
    fake_github.add_pull(7, head_sha=head, base_sha=lab["base"])
    await bot.deliver(
        "pull_request",
        payloads.pull_request("opened", number=7, head_sha=head, base_sha=lab["base"]),
    )
    await bot.drain()

    first, *rest = bodies(fake_github)
    assert PROGRESS in first and SECTION not in first
    assert digest_in(first)[1] == head
    (comment,) = fake_github.comments_on(7)
    assert comment["_edits"] == 1  # edited in place, not a second comment
    final = comment["body"]
    assert rest == [final]
    assert PROGRESS not in final
    assert SECTION in final
    assert "<details><summary>gitea: 1 package</summary>" in final
    assert "- `gitea 1.21.0 → 1.21.1`" in final
    assert "postgresql" not in final.split(SECTION)[1]  # only the planned host was built


async def test_a_newer_push_cancels_the_preview_of_the_older_head(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    lab: dict[str, Any],
) -> None:
    bot = await make_bot(runner_config=lab["runner_config"], preview=True)
    slow = {**HOSTS, "gitea": {"packages": ["gitea", "openssl"], "sleep": 90}}
    older = commit_files(
        manifest_repo,
        "f",
        add_port(manifest_repo.manifest()),
        "slow",
        versions=VERSIONS,
        hosts=slow,
    )
    fake_github.add_pull(7, head_sha=older, base_sha=lab["base"])
    await bot.deliver(
        "pull_request",
        payloads.pull_request("opened", number=7, head_sha=older, base_sha=lab["base"]),
    )
    first_job = asyncio.create_task(bot.drain())
    while not any(PROGRESS in body for body in bodies(fake_github)):  # the older head's build runs
        assert not first_job.done(), first_job
        await asyncio.sleep(0.05)

    newer = commit_files(
        manifest_repo,
        "f",
        add_port(manifest_repo.manifest()),
        "fast, gitea 1.21.1",
        versions={**VERSIONS, "gitea": "1.21.1"},
        hosts=HOSTS,
    )
    fake_github.add_pull(7, head_sha=newer, base_sha=lab["base"])
    # a second worker takes the synchronize job while the first still previews
    payload = {"number": 7, "head_sha": newer, "base_sha": lab["base"], "base_ref": "main"}
    await plan_pull_request(bot.ctx, payload)
    await first_job  # cancelled: it does not wait for the 90 s build (drain gives up after 60 s)

    (comment,) = fake_github.comments_on(7)
    assert digest_in(comment["body"])[1] == newer
    assert "- `gitea 1.21.0 → 1.21.1`" in comment["body"]
    older_bodies = [b for b in bodies(fake_github) if digest_in(b)[1] == older]
    assert older_bodies and all(SECTION not in body for body in older_bodies)


async def test_hosts_all_completes_the_plan_that_apply_checks(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    lab: dict[str, Any],
) -> None:
    """A flake-only change selects nothing by the rules; building every host finds gitea."""
    from bot.github.pulls import PullRef, compute_plan

    bot = await make_bot(
        runner_config=lab["runner_config"], preview={"enabled": True, "hosts": "all"}
    )
    head = commit_files(
        manifest_repo,
        "f",
        None,
        "openssl 3.0.2",
        versions={**VERSIONS, "openssl": "3.0.2"},
        hosts=HOSTS,
    )
    fake_github.add_pull(7, head_sha=head, base_sha=lab["base"])
    payload = payloads.pull_request("opened", number=7, head_sha=head, base_sha=lab["base"])
    await bot.deliver("pull_request", payload)
    await bot.drain()

    first, *_ = bodies(fake_github)
    assert "Building every host to show what changes on the hosts" in first
    (comment,) = fake_github.comments_on(7)
    body = comment["body"]
    assert "`its system changes (1 package)`" in body
    assert "<details><summary>postgresql: unchanged</summary>" in body
    assert "- `openssl 3.0.1 → 3.0.2`" in body
    digest, _ = digest_in(body)
    ref = PullRef(7, head, lab["base"], "main", False)
    fresh = await compute_plan(bot.ctx, ref)  # what `/nixmox apply` compares the comment with
    assert fresh.digest == digest
    assert "nix:service-config:gitea" in fresh.by_id()
    statuses = [s["description"] for s in fake_github.statuses_for(head, "nixmox/plan")]
    assert statuses[-1] == "1 service, 2 steps"  # the completed plan, after the first report


async def test_the_slack_approval_shows_a_summary_per_host(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_slack: Any,
    manifest_repo: ManifestRepo,
    lab: dict[str, Any],
) -> None:
    from bot.app import build_app
    from bot.slack import SLACK_BOT
    from tests.fixtures_slack import (
        APPROVER,
        CHANNEL,
        PROGRESS_INTERVAL,
        SlackDriver,
        slack_settings,
    )

    hosts = {
        **HOSTS,
        "gitea": {
            **HOSTS["gitea"],
            "kernel": "6.6",
            "dry_activate": "would restart the following units: gitea.service",
        },
    }
    commit_files(manifest_repo, "main", None, "gitea 1.21.1",
                 versions={**VERSIONS, "gitea": "1.21.1"}, hosts=hosts)  # fmt: skip
    settings = slack_settings(tmp_path, fake_slack, manifest_repo.path, preview=True)
    app = build_app(settings, runner_config=lab["runner_config"])
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    driver = SlackDriver(await aiohttp_client(app), fake_slack)

    assert (await driver.command("deploy gitea")).status == 200

    def summarised() -> Any:
        for message in fake_slack.channel_messages(CHANNEL):
            if "What changes on the hosts" in message.all_text():
                return message
        return None

    message = await fake_slack.wait_for(summarised, timeout=60)
    text = message.all_text()
    assert "• *gitea*: 1 package changed, 1 unit restarts, :warning: reboot needed" in text
    assert "• *postgresql*: unchanged (no switch)" in text
    assert "Approve" in [b["text"]["text"] for b in message.buttons()]  # still pending
    assert (await driver.click(message, "Approve", user=APPROVER)).status == 200
    await fake_slack.wait_for(lambda: "Succeeded" in message.text or "Failed" in message.text)
    await app[SLACK_BOT].idle()
    assert "Succeeded" in message.text, message.text  # the approved deployment ran to its end


async def test_hosts_all_completes_the_plan_a_slack_approval_deploys(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_slack: Any,
    manifest_repo: ManifestRepo,
    lab: dict[str, Any],
) -> None:
    """After a first deployment, gitea's port changes and so does postgresql's package: the
    rules select gitea; the builds of every host add postgresql, which the approval deploys.
    Then only gitea's package changes: the builds make the empty plan gitea's deployment."""
    from bot.app import build_app, context_of
    from bot.slack import SLACK_BOT
    from tests.fixtures_slack import (
        APPROVER,
        CHANNEL,
        PROGRESS_INTERVAL,
        SlackDriver,
        slack_settings,
    )

    settings = slack_settings(
        tmp_path, fake_slack, manifest_repo.path, preview={"enabled": True, "hosts": "all"}
    )
    app = build_app(settings, runner_config=lab["runner_config"])
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    driver = SlackDriver(await aiohttp_client(app), fake_slack)

    async def approved_deployment() -> Any:
        """Ask `deploy all`, wait for its summary, approve, and wait for the end."""
        earlier = {message.ts for message in fake_slack.channel_messages(CHANNEL)}
        assert (await driver.command("deploy all")).status == 200

        def summarised() -> Any:
            for message in fake_slack.channel_messages(CHANNEL):
                if message.ts not in earlier and "What changes on the hosts" in message.all_text():
                    return message
            return None

        message = await fake_slack.wait_for(summarised, timeout=60)
        summary = message.all_text()
        assert (await driver.click(message, "Approve", user=APPROVER)).status == 200
        await fake_slack.wait_for(lambda: "Succeeded" in message.text or "Failed" in message.text)
        await app[SLACK_BOT].idle()
        assert "Succeeded" in message.text, message.text
        return summary

    await approved_deployment()
    head = commit_files(
        manifest_repo,
        "main",
        add_port(manifest_repo.manifest()),
        "gitea port, postgresql 15.5",
        versions={**VERSIONS, "postgresql": "15.5"},
        hosts=HOSTS,
    )
    summary = await approved_deployment()

    assert "• *postgresql*: 1 package changed" in summary
    store = context_of(app).require_store()
    (latest, *_) = await store.deployments.history()
    assert latest.head == head
    steps = {step.id for step in latest.plan.steps}
    assert {"nix:core:postgresql", "verify:postgresql", "nix:service-config:gitea"} <= steps

    # only gitea's package changes, in a file no rule knows: the rules select nothing, the
    # builds find gitea, and the approval deploys it (not "nothing to do")
    head = commit_files(
        manifest_repo,
        "main",
        None,
        "gitea 1.21.1",
        versions={**VERSIONS, "postgresql": "15.5", "gitea": "1.21.1"},
        hosts=HOSTS,
    )
    summary = await approved_deployment()
    assert "• *gitea*: 1 package changed" in summary
    (latest, *_) = await store.deployments.history()
    assert latest.head == head
    # (the simulated deployments left postgresql's host on 15.4: it changes as well)
    assert {"nix:service-config:gitea", "verify:gitea"} <= {step.id for step in latest.plan.steps}
    assert all(step.reasons for step in latest.plan.steps)
