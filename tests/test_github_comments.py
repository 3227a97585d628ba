"""`/nixmox` PR comment commands: reactions, help, status, and every `apply` requirement."""

from __future__ import annotations

import re
from typing import Any

import pytest

from bot.chat_commands import HELP_TEXT
from bot.github.comments import Requirement, configured_requirements
from state.events import DeploymentState, Trigger
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port
from tests.test_github_pulls import open_pr

NUMBER = 7


async def planned_pr(bot: Any, repo: ManifestRepo, payloads: Payloads) -> tuple[str, str]:
    """A PR changing gitea's ports, with its plan comment posted."""
    base = repo.repo.heads.main.commit.hexsha
    head = repo.commit(add_port(repo.manifest()), "gitea: port 3001", branch="feature")
    await open_pr(bot, payloads, NUMBER, head, base)
    return base, head


async def command(
    bot: Any, payloads: Payloads, body: str, user: str = "bob", comment_id: int = 555
) -> list[dict[str, Any]]:
    """Post a comment command, run the job; return the bot's new replies."""
    before = {c["id"] for c in bot.fake.comments_on(NUMBER)}
    payload = payloads.issue_comment(number=NUMBER, body=body, user=user, comment_id=comment_id)
    response = await bot.deliver("issue_comment", payload)
    assert (await response.json())["status"] == "accepted"
    await bot.drain()
    return [c for c in bot.fake.comments_on(NUMBER) if c["id"] not in before]


def reactions(fake: FakeGitHub, comment_id: int = 555) -> list[str]:
    return [r["content"] for r in fake.reactions if r["_comment"] == comment_id]


@pytest.fixture
def reviewers(fake_github: FakeGitHub) -> FakeGitHub:
    """bob, carol and dave may write; mallory may read (`approve` adds carol's approval)."""
    fake_github.permissions.update(
        bob="write", carol="write", dave="write", mallory="read", admin="admin"
    )
    return fake_github


JOB_MARKER = re.compile(r"\n\n<!-- nixmox-job:\d+:comment-\d+ -->$")


def visible(reply: dict[str, Any]) -> str:
    """A reply's text without the job marker every job's comment ends with (`bot.jobs`)."""
    assert JOB_MARKER.search(reply["body"]), reply["body"]
    return JOB_MARKER.sub("", reply["body"])


def approve(fake: FakeGitHub, user: str = "carol") -> None:
    """`user` approves the PR's current head."""
    fake.add_review(NUMBER, user, "APPROVED")


async def test_help_is_answered_with_eyes(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    fake_github.add_pull(NUMBER, head_sha="a" * 40, base_sha="b" * 40)
    (reply,) = await command(bot, payloads, "/nixmox help")
    assert visible(reply) == HELP_TEXT
    assert reactions(fake_github) == ["eyes"]


async def test_unparseable_command_gets_confused_and_the_help(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    (reply,) = await command(bot, payloads, "/nixmox deploy")
    assert "say which service to deploy" in reply["body"]
    assert visible(reply).endswith(HELP_TEXT)
    assert reactions(fake_github) == ["confused"]


async def test_slack_only_commands_are_explained(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    (reply,) = await command(bot, payloads, "/nixmox deploy gitea")
    assert "`deploy` is not available in pull request comments" in reply["body"]
    assert reactions(fake_github) == ["eyes"]


async def test_status_with_nothing_deployed(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    fake_github.add_pull(NUMBER, head_sha="a" * 40, base_sha="b" * 40)
    fake_github.permissions["bob"] = "triage"
    (reply,) = await command(bot, payloads, "/nixmox status")
    assert visible(reply) == "No deployment recorded yet."


async def test_plan_command_replans_the_pr(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    fake_github.permissions["bob"] = "write"
    _, head = await planned_pr(bot, manifest_repo, payloads)
    statuses = len(fake_github.statuses_for(head, "nixmox/plan"))
    replies = await command(bot, payloads, "/nixmox plan")
    assert replies == []  # the plan comment is edited (here: unchanged), not duplicated
    assert len(fake_github.statuses_for(head, "nixmox/plan")) == statuses + 2
    assert len(fake_github.comments_on(NUMBER)) == 1


async def test_apply_from_a_user_without_write_permission_is_refused(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    (reply,) = await command(bot, payloads, "/nixmox apply", user="mallory")
    assert "refused" in reply["body"]
    assert "**write permission** (permission): @mallory has `read` access" in reply["body"]
    assert reactions(reviewers) == ["eyes"]
    assert reviewers.deployments == {}
    assert await bot.ctx.require_store().deployments.history() == []


async def test_apply_from_a_stranger_is_refused(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    (reply,) = await command(bot, payloads, "/nixmox apply", user="stranger")
    assert "@stranger has `none` access" in reply["body"]


async def test_apply_needs_an_approval_by_someone_else(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    fake_github.permissions.update(alice="write")
    await planned_pr(bot, manifest_repo, payloads)
    fake_github.add_review(NUMBER, "alice", "APPROVED")  # the author approving their own PR
    (reply,) = await command(bot, payloads, "/nixmox apply", user="alice")
    assert "**approved** (approved): no approval of the current head commit " in (reply["body"])
    assert "by another writer (someone other than the author @alice" in reply["body"]
    assert "mergeable" not in reply["body"]
    assert fake_github.deployments == {}


async def test_apply_is_blocked_by_requested_changes(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    approve(reviewers)
    reviewers.add_review(NUMBER, "dave", "CHANGES_REQUESTED")
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "**mergeable** (mergeable): changes requested by @dave" in reply["body"]
    assert "**approved**" not in reply["body"]


async def test_a_later_approval_clears_requested_changes(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    approve(reviewers)
    reviewers.add_review(NUMBER, "dave", "CHANGES_REQUESTED")
    reviewers.add_review(NUMBER, "dave", "APPROVED")
    replies = await command(bot, payloads, "/nixmox apply")
    assert "refused" not in replies[0]["body"]


async def test_apply_with_a_stale_plan_comment_is_refused(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    """A push the bot has not planned yet: the comment's digest is not the head's plan."""
    bot = await make_bot()
    base, _ = await planned_pr(bot, manifest_repo, payloads)
    text = manifest_repo.manifest().replace("vmid = 303", "vmid = 313")
    newer = manifest_repo.commit(text, "vmid too", branch="feature")
    reviewers.add_pull(NUMBER, head_sha=newer, base_sha=base)
    approve(reviewers)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "**plan is current** (plan_current)" in reply["body"]
    assert "run `/nixmox plan`" in reply["body"]
    assert reviewers.deployments == {}


async def test_apply_without_a_plan_comment_is_refused(
    make_bot: Any, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    reviewers.add_pull(NUMBER, head_sha="a" * 40, base_sha="b" * 40)
    approve(reviewers)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "there is no plan comment yet" in reply["body"]


async def test_fork_prs_are_never_applied(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot(plan_forks=True)
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    await open_pr(bot, payloads, NUMBER, head, base, fork=True)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert (
        "**not from a fork** (not_fork): pull requests from forks are never applied"
        in (reply["body"])
    )
    assert reviewers.deployments == {}


async def test_an_accepted_apply_deploys_the_pr_head(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    _, head = await planned_pr(bot, manifest_repo, payloads)
    approve(reviewers)
    started, finished = await command(bot, payloads, "/nixmox apply")
    assert reactions(reviewers) == ["eyes"]
    assert f"Deploying {head[:12]} (1 service, 2 steps), requested by @bob" in started["body"]
    assert "**succeeded**" in finished["body"]
    assert "succeeded    verify:gitea" in finished["body"]

    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.state is DeploymentState.SUCCEEDED
    assert record.trigger == Trigger.PR_COMMENT
    assert record.requested_by == "github:bob"
    assert record.approved_by == "github:carol"
    assert record.head == head

    assert reviewers.last_status(head, "nixmox/deploy")["state"] == "success"
    assert reviewers.last_status(head, "nixmox/deploy/gitea")["state"] == "success"
    (deployment,) = reviewers.deployments.values()
    assert deployment["sha"] == head and deployment["environment"] == "homelab"
    assert deployment["payload"]["nixmox_deployment"] == record.id
    states = [s["state"] for s in reviewers.deployment_statuses[deployment["id"]]]
    assert states == ["in_progress", "success"]


async def test_requirements_are_configurable(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    """A single-person homelab: no approvals needed, write permission still is."""
    bot = await make_bot(apply_requirements=[])
    fake_github.permissions["alice"] = "admin"
    await planned_pr(bot, manifest_repo, payloads)
    _, finished = await command(bot, payloads, "/nixmox apply", user="alice")
    assert "**succeeded**" in finished["body"]
    assert fake_github.calls("GET", r"/reviews$") != []  # approvers are still recorded


async def test_refusals_are_audited(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    await command(bot, payloads, "/nixmox apply", user="mallory")
    (entry,) = [
        e for e in await bot.ctx.require_store().audit.entries() if e.action == "apply.refused"
    ]
    assert entry.actor == "github:mallory"
    assert entry.detail["failed"] == ["permission"]


def test_configured_requirements() -> None:
    assert configured_requirements(["approved", " Mergeable "]) == {
        Requirement.APPROVED,
        Requirement.MERGEABLE,
    }
    assert configured_requirements([]) == set()
    with pytest.raises(ValueError, match="unknown apply requirement 'green'"):
        configured_requirements(["green"])
    with pytest.raises(ValueError, match="unknown apply requirement 'permission'"):
        configured_requirements(["permission"])  # always required, not configurable


async def test_an_approval_of_an_older_commit_does_not_count(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    """carol approved, then the author pushed: the new head is not approved."""
    bot = await make_bot()
    base, _ = await planned_pr(bot, manifest_repo, payloads)
    approve(reviewers)
    text = manifest_repo.manifest().replace("vmid = 303", "vmid = 313")
    newer = manifest_repo.commit(text, "vmid too", branch="feature")
    await open_pr(bot, payloads, NUMBER, newer, base, action="synchronize")
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "refused" in reply["body"]
    assert f"no approval of the current head commit {newer[:12]}" in reply["body"]
    assert reviewers.deployments == {}


async def test_only_writers_reviews_count(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    """A reader's approval approves nothing, and a reader's requested changes block nothing."""
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    reviewers.permissions["eve"] = "triage"
    approve(reviewers, "mallory")
    approve(reviewers, "eve")
    reviewers.add_review(NUMBER, "stranger", "CHANGES_REQUESTED")
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "**approved** (approved): no approval of the current head commit" in reply["body"]
    assert "**mergeable**" not in reply["body"]
    approve(reviewers, "dave")
    _, finished = await command(bot, payloads, "/nixmox apply", comment_id=556)
    assert "**succeeded**" in finished["body"]
    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.approved_by == "github:dave"


async def test_a_writers_latest_requested_changes_block_even_on_an_older_commit(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    await planned_pr(bot, manifest_repo, payloads)
    reviewers.add_review(NUMBER, "dave", "CHANGES_REQUESTED", commit_id="f" * 40)
    approve(reviewers)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "**mergeable** (mergeable): changes requested by @dave" in reply["body"]


async def test_a_forged_plan_comment_is_ignored_and_left_alone(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    """Anyone can type the marker and a digest: only the bot's own comment is the plan."""
    from bot.github.pulls import PullRef, compute_plan

    bot = await make_bot()
    forged_body = "<!-- nixmox:plan -->\nlooks harmless"
    forged = reviewers.add_comment_by(NUMBER, "mallory", forged_body)
    base, _ = await planned_pr(bot, manifest_repo, payloads)
    assert reviewers.comments[forged["id"]]["body"] == forged_body  # not taken as the bot's
    assert reviewers.comments[forged["id"]]["_edits"] == 0
    ours = [c for c in reviewers.comments_on(NUMBER) if c["id"] != forged["id"]]
    assert len(ours) == 1 and ours[0]["user"]["login"] == reviewers.bot_login

    # the PR moves on; mallory posts the new head's digest before the bot has planned it
    text = manifest_repo.manifest().replace("vmid = 303", "vmid = 313")
    newer = manifest_repo.commit(text, "vmid too", branch="feature")
    pull = reviewers.add_pull(NUMBER, head_sha=newer, base_sha=base)
    fresh = await compute_plan(bot.ctx, PullRef.from_api(pull, None))
    reviewers.comments[forged["id"]]["body"] = (
        f"<!-- nixmox:plan -->\n<!-- nixmox:meta digest={fresh.digest} head={newer} -->\n"
    )
    approve(reviewers)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert "**plan is current** (plan_current)" in reply["body"]
    assert reviewers.deployments == {}
    assert forged["id"] in reviewers.comments
    assert reviewers.calls("PATCH", rf"/comments/{forged['id']}$") == []
    assert reviewers.calls("DELETE") == []
    assert len(reviewers.calls("GET", r"^/user$")) == 1  # the bot's login is asked once


async def test_apply_is_refused_when_main_deployed_what_the_pr_lacks(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    """Applying a PR branched before the last merge deploy would undo that deploy."""
    bot = await make_bot()
    fork_point = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    text = manifest_repo.manifest().replace("vmid = 302", "vmid = 312")
    merged = manifest_repo.commit(text, "postgres vmid on main")
    push = payloads.push(before=fork_point, after=merged)
    assert (await (await bot.deliver("push", push)).json())["status"] == "accepted"
    await bot.drain()
    assert await bot.ctx.require_store().deployments.last_deployed_revision() == merged
    await open_pr(bot, payloads, NUMBER, head, merged)
    approve(reviewers)
    (reply,) = await command(bot, payloads, "/nixmox apply")
    assert (
        "**contains what is deployed** (contains_deployed): main has deployed changes this PR "
        "does not contain; rebase or merge main" in reply["body"]
    )
    assert len(await bot.ctx.require_store().deployments.history()) == 1

    # the author merges main into the branch: now the PR contains what runs
    repo = manifest_repo.repo
    repo.heads.feature.checkout()
    repo.git.merge("--no-edit", "main")
    rebased = repo.heads.feature.commit.hexsha
    repo.heads.main.checkout()
    await open_pr(bot, payloads, NUMBER, rebased, merged, action="synchronize")
    approve(reviewers)
    _, finished = await command(bot, payloads, "/nixmox apply", comment_id=556)
    assert "**succeeded**" in finished["body"]


@pytest.mark.parametrize("body", ["/nixmox status", "/nixmox history", "/nixmox plan"])
async def test_read_commands_need_the_author_or_triage(
    make_bot: Any, payloads: Payloads, reviewers: FakeGitHub, body: str
) -> None:
    bot = await make_bot()
    reviewers.add_pull(NUMBER, head_sha="a" * 40, base_sha="b" * 40, author="alice")
    (reply,) = await command(bot, payloads, body, user="mallory")
    name = body.split()[1]
    assert visible(reply) == (
        f"`/nixmox {name}` is for the pull request's author and people with triage, write, "
        "maintain or admin access to octo-org/homelab; @mallory has `read` access."
    )
    assert reactions(reviewers) == []
    assert reviewers.statuses == []


async def test_the_author_and_triagers_may_read(
    make_bot: Any, payloads: Payloads, reviewers: FakeGitHub
) -> None:
    bot = await make_bot()
    reviewers.add_pull(NUMBER, head_sha="a" * 40, base_sha="b" * 40, author="alice")
    reviewers.permissions["tina"] = "triage"
    (reply,) = await command(bot, payloads, "/nixmox history", user="alice")  # no permission
    assert visible(reply) == "No deployments recorded."
    (reply,) = await command(bot, payloads, "/nixmox status", user="tina", comment_id=556)
    assert visible(reply) == "No deployment recorded yet."
    assert reactions(reviewers) == ["eyes"] and reactions(reviewers, 556) == ["eyes"]
