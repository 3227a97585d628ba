"""Pull requests: plan comment (found by marker, edited in place, split), `nixmox/plan` status."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from bot.github.pulls import (
    MARKER_PREFIX,
    digest_in,
    is_plan_comment,
    success_description,
    upsert_plan_comment,
)
from bot.github.rest import Repo
from planner.synthetic import synthetic_manifest
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import (
    ManifestRepo,
    Payloads,
    add_port,
    break_manifest,
)

PLAN = "nixmox/plan"


async def open_pr(
    bot: Any,
    payloads: Payloads,
    number: int,
    head: str,
    base: str,
    action: str = "opened",
    **kw: Any,
) -> None:
    """Tell the fake about the PR, deliver the event, run the job."""
    bot.fake.add_pull(number, head_sha=head, base_sha=base, fork=kw.get("fork", False))
    payload = payloads.pull_request(action, number=number, head_sha=head, base_sha=base, **kw)
    response = await bot.deliver("pull_request", payload)
    assert (await response.json())["status"] == "accepted", await response.text()
    await bot.drain()


def states(fake: FakeGitHub, sha: str, context: str = PLAN) -> list[tuple[str, str]]:
    return [(s["state"], s["description"]) for s in fake.statuses_for(sha, context)]


async def test_pr_gets_one_plan_comment_and_a_success_status(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea port", branch="f")
    await open_pr(bot, payloads, 7, head, base)

    (comment,) = fake_github.comments_on(7)
    body = comment["body"]
    assert body.startswith(MARKER_PREFIX)
    assert "nix:service-config:gitea" in body and "verify:gitea" in body
    digest, planned_head = digest_in(body)
    assert planned_head == head
    assert states(fake_github, head) == [
        ("pending", "planning…"),
        ("success", "1 service, 2 steps"),
    ]
    final = fake_github.last_status(head, PLAN)
    assert final["target_url"] == f"http://bot.test/plans/{digest}"
    # the target URL is served by the bot itself
    page = await bot.client.get(f"/plans/{digest}")
    assert page.status == 200
    assert "verify:gitea" in await page.text()
    as_json = await bot.client.get(f"/plans/{digest}", headers={"Accept": "application/json"})
    assert (await as_json.json())["digest"] == digest


async def test_a_new_push_edits_the_same_comment(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    first = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    await open_pr(bot, payloads, 7, first, base)
    (comment,) = fake_github.comments_on(7)

    text = (manifest_repo.path / "nixos/service-manifest.nix").read_text()
    second = manifest_repo.commit(
        add_port(add_port(text), 3002).replace("vmid = 303", "vmid = 313"), "vmid", branch="f"
    )
    await open_pr(bot, payloads, 7, second, base, action="synchronize")

    (edited,) = fake_github.comments_on(7)
    assert edited["id"] == comment["id"]
    assert edited["_edits"] == 1
    assert digest_in(edited["body"])[1] == second
    assert "tf:infra" in edited["body"]
    assert fake_github.calls("POST", r"/issues/7/comments$").__len__() == 1
    assert fake_github.last_status(second, PLAN)["state"] == "success"


async def test_same_plan_again_does_not_touch_the_comment(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    await open_pr(bot, payloads, 7, head, base)
    await open_pr(bot, payloads, 7, head, base, action="reopened")
    assert fake_github.calls("PATCH") == []
    assert len(fake_github.comments_on(7)) == 1


def recorded(calls: list[str], name: str, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, noting `name` in `calls` each time it is called."""

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return real(*args, **kwargs)

    return call


async def test_the_next_job_for_a_head_runs_no_git(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The merge base of a fetched (base, head) is remembered: a relabel or redelivery for
    the same head spawns no Git process (commits never change; fetched ones are pinned)."""
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    await open_pr(bot, payloads, 7, head, base)
    asked: list[str] = []
    git = bot.ctx.git
    for name in ("has_commit", "merge_base", "fetch"):
        monkeypatch.setattr(git, name, recorded(asked, name, getattr(git, name)))
    await open_pr(bot, payloads, 7, head, base, action="reopened")
    assert asked == []
    assert [state for state, _ in states(fake_github, head)] == ["pending", "success"] * 2
    other = manifest_repo.commit(add_port(manifest_repo.manifest(), 3002), "another", branch="f")
    await open_pr(bot, payloads, 7, other, base, action="synchronize")
    assert "fetch" in asked and "merge_base" in asked  # a new head is fetched as before
    assert fake_github.last_status(other, PLAN)["state"] == "success"


async def test_a_change_that_needs_no_deployment_says_so(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit("# a comment\n" + manifest_repo.manifest(), "doc", branch="f")
    await open_pr(bot, payloads, 7, head, base)
    assert fake_github.last_status(head, PLAN)["description"] == "no deployment needed"
    assert fake_github.last_status(head, PLAN)["state"] == "success"
    (comment,) = fake_github.comments_on(7)
    assert "No deployment needed" in comment["body"]


async def test_an_invalid_manifest_fails_the_status_and_lists_every_error(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(break_manifest(manifest_repo.manifest()), "oops", branch="f")
    await open_pr(bot, payloads, 7, head, base)
    status = fake_github.last_status(head, PLAN)
    assert status["state"] == "failure"
    assert status["description"] == "invalid manifest: 2 errors"
    (comment,) = fake_github.comments_on(7)
    assert "nope" in comment["body"]  # the unknown dependency
    assert "10.20.0.2" in comment["body"]  # the duplicate IP


async def test_when_the_bot_cannot_plan_the_status_is_error(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub, tmp_path: Any
) -> None:
    bot = await make_bot(git_remote=str(tmp_path / "no-such-repo"))
    head, base = "c" * 40, "d" * 40
    await open_pr(bot, payloads, 7, head, base)
    status = fake_github.last_status(head, PLAN)
    assert status["state"] == "error"
    assert status["description"].startswith("could not plan: could not fetch")
    assert len(status["description"]) < 140
    assert fake_github.comments_on(7) == []


async def test_a_pr_that_moved_on_keeps_the_newer_comment(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    """A late plan job for an old head sets that commit's status but leaves the comment."""
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    old = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    fake_github.add_pull(7, head_sha="e" * 40, base_sha=base)  # GitHub already has a newer head
    payload = payloads.pull_request("opened", number=7, head_sha=old, base_sha=base)
    await bot.deliver("pull_request", payload)
    await bot.drain()
    assert fake_github.comments_on(7) == []
    assert fake_github.last_status(old, PLAN)["state"] == "success"


async def test_fork_prs_are_planned_when_allowed(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot(plan_forks=True)
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    await open_pr(bot, payloads, 9, head, base, fork=True)
    assert fake_github.last_status(head, PLAN)["state"] == "success"
    assert len(fake_github.comments_on(9)) == 1


async def test_the_pr_is_planned_against_its_merge_base(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    """main moved on after the branch was made: its changes are not part of the PR's plan."""
    bot = await make_bot()
    fork_point = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    main_text = manifest_repo.manifest().replace("vmid = 302", "vmid = 312")
    main_head = manifest_repo.commit(main_text, "postgres vmid on main")
    assert main_head != fork_point
    await open_pr(bot, payloads, 7, head, main_head)
    (comment,) = fake_github.comments_on(7)
    assert "postgresql" not in comment["body"].split("<details>")[0]
    assert "gitea" in comment["body"]


def big_manifest(services: int) -> str:
    return json.dumps(synthetic_manifest(services), indent=1)


async def test_long_plans_are_split_and_extra_comments_removed_when_they_shrink(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    json_path = "nixos/service-manifest.json"
    bot = await make_bot(manifest_path=json_path)
    repo = manifest_repo.repo

    def commit_json(text: str, branch: str) -> str:
        if branch not in [h.name for h in repo.heads]:
            repo.create_head(branch, repo.heads.main.commit)
        repo.heads[branch].checkout()
        (manifest_repo.path / json_path).write_text(text)
        repo.index.add([json_path])
        sha = repo.index.commit(f"{branch} manifest").hexsha
        repo.heads.main.checkout()
        return sha

    base = commit_json(big_manifest(0), "main")
    big = commit_json(big_manifest(400), "f")
    await open_pr(bot, payloads, 7, big, base)
    parts = fake_github.comments_on(7)
    assert len(parts) >= 2
    assert all(is_plan_comment(p["body"]) and len(p["body"]) <= 65536 for p in parts)
    assert "(part 1 of" in parts[0]["body"] and digest_in(parts[0]["body"])[1] == big
    first_id = parts[0]["id"]

    small = commit_json(big_manifest(3), "f")
    await open_pr(bot, payloads, 7, small, base, action="synchronize")
    (remaining,) = fake_github.comments_on(7)
    assert remaining["id"] == first_id
    assert digest_in(remaining["body"])[1] == small
    assert len(fake_github.calls("DELETE")) == len(parts) - 1


async def test_upsert_leaves_other_comments_alone(make_bot: Any, fake_github: FakeGitHub) -> None:
    bot = await make_bot()
    gh = await bot.ctx.require_github().client(None)
    repo = Repo.parse("octo-org/homelab")
    other = await gh.post(
        "/repos/{owner}/{repo}/issues/{number}/comments",
        url_vars=repo.vars(number=3),
        data={"body": "> <!-- nixmox:plan -->\nquoting the bot is not a plan comment"},
    )
    login = await bot.ctx.require_github().bot_login()
    ids = await upsert_plan_comment(
        gh, repo, 3, ["<!-- nixmox:plan -->\na", "<!-- nixmox:plan -->\nb"], login
    )
    assert len(ids) == 2 and other["id"] not in ids
    ids2 = await upsert_plan_comment(gh, repo, 3, ["<!-- nixmox:plan -->\nc"], login)
    assert ids2 == ids[:1]
    bodies = [c["body"] for c in fake_github.comments_on(3)]
    assert bodies == [other["body"], "<!-- nixmox:plan -->\nc"]


def test_success_descriptions() -> None:
    from planner.plan import Plan, Step

    assert success_description(Plan()) == "no deployment needed"
    one = Plan(steps=[Step(id="verify:a", phase="verify", service="a")])
    assert success_description(one) == "1 service, 1 step"


async def test_an_unexpected_failure_never_leaves_the_status_pending(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    from tests.fakes.github import Failure

    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    fake_github.fail_next(100, Failure.SERVER_ERROR, method="GET", path=r"/pulls/7$")
    await open_pr(bot, payloads, 7, head, base)
    status = fake_github.last_status(head, PLAN)
    assert status["state"] == "error"
    assert status["description"] == "could not plan: internal error (see the bot's log)"
    job = await bot.ctx.require_store().queue.get(1)
    assert job.state.value == "failed" and "GitHubBroken" in job.error
