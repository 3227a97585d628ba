"""Pushes to other branches: planned from the default branch's merge base, `nixmox/plan` on the
head linking the plan page, no comment; shared with the PR of the same head; what is ignored."""

from __future__ import annotations

import asyncio
import copy
from datetime import timedelta
from typing import Any

import pytest

from bot.github.rest import short
from state.store import Store
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port, break_manifest

PLAN = "nixmox/plan"
ZERO = "0" * 40


def real_push(payloads: Payloads, *, ref: str, deleted: bool = False) -> dict[str, Any]:
    """A real `@octokit/webhooks-examples` push to `ref`, adapted (a deletion example, or one
    to the same kind of ref; the examples delete only tags, GitHub sends the same for branches)."""
    kind = "refs/heads/" if ref.startswith("refs/heads/") else "refs/tags/"
    candidates = [e for e in payloads.examples["push"] if bool(e["deleted"]) == deleted]
    candidates.sort(key=lambda e: not e["ref"].startswith(kind))  # the same kind first
    payload = payloads.adapt(copy.deepcopy(candidates[0]))
    payload["ref"] = ref
    return payload


def branch_push(
    payloads: Payloads,
    *,
    before: str,
    after: str,
    branch: str = "feature",
    files: tuple[str, ...] = ("nixos/service-manifest.nix",),
    **flags: Any,
) -> dict[str, Any]:
    """The real branch push example, as a push of one commit touching `files`."""
    payload = real_push(payloads, ref=f"refs/heads/{branch}")
    payload.update(before=before, after=after, created=False, deleted=False, forced=False)
    payload.update(flags)
    (commit,) = payload["commits"]
    commit.update(id=after, added=[], modified=list(files), removed=[])
    payload["commits"] = [commit]
    payload["head_commit"] = copy.deepcopy(commit)
    return payload


async def deliver(bot: Any, payload: dict[str, Any], event: str = "push", **kw: Any) -> Any:
    response = await bot.deliver(event, payload, **kw)
    assert response.status == 200, await response.text()
    return await response.json()


async def queued_jobs(bot: Any) -> list[Any]:
    """Every job in the store (claimed to look at them: the worker is not running)."""
    store: Store = bot.ctx.require_store()
    jobs = []
    while job := await store.queue.claim("inspector", lease=timedelta(days=1)):
        jobs.append(job)
    return jobs


def states(fake: FakeGitHub, sha: str) -> list[tuple[str, str]]:
    return [(s["state"], s["description"]) for s in fake.statuses_for(sha, PLAN)]


def count_plans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str]]:
    """Record each (base, head) the bot plans; the real planner still runs."""
    import bot.github.pulls as pulls

    planned: list[tuple[str | None, str]] = []
    real = pulls.plan_between

    async def counting(ctx: Any, base: str | None, head: str) -> Any:
        planned.append((base, head))
        return await real(ctx, base, head)

    monkeypatch.setattr(pulls, "plan_between", counting)
    return planned


async def test_a_branch_push_gets_a_plan_status_linking_the_plan_page(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    fork_point = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea port", branch="feature")
    # main moves on after the branch was made: that change is not the branch's
    main = manifest_repo.commit(
        manifest_repo.manifest().replace("vmid = 302", "vmid = 312"), "vmid on main"
    )
    answer = await deliver(bot, branch_push(payloads, before=fork_point, after=head))
    assert (answer["status"], answer["jobs"]) == ("accepted", 1)
    await bot.drain()

    assert states(fake_github, head) == [
        ("pending", "planning…"),
        ("success", "1 service, 2 steps"),
    ]
    final = fake_github.last_status(head, PLAN)
    assert final["target_url"].startswith("http://bot.test/plans/")
    path = final["target_url"].removeprefix("http://bot.test")
    page = await bot.client.get(path)
    assert page.status == 200
    text = await page.text()
    assert "nix:service-config:gitea" in text and "verify:gitea" in text
    as_json = await (await bot.client.get(path, headers={"Accept": "application/json"})).json()
    assert (as_json["base"], as_json["head"]) == (fork_point, head)  # the merge base, not main
    assert main != fork_point
    assert not any("postgresql" in step for step in as_json["steps"])
    # no comment anywhere, no deployment, nothing on the deploy context
    assert fake_github.comments == {}
    assert fake_github.calls("POST", r"/comments$") == []
    assert fake_github.deployments == {}
    assert fake_github.statuses_for(head, "nixmox/deploy") == []
    assert await bot.ctx.require_store().deployments.history() == []


async def test_an_invalid_manifest_on_a_branch_fails_naming_the_error(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(break_manifest(manifest_repo.manifest()), "oops", branch="wip")
    await deliver(bot, branch_push(payloads, before=base, after=head, branch="wip"))
    await bot.drain()
    final = fake_github.last_status(head, PLAN)
    assert final["state"] == "failure"
    path = final["target_url"].removeprefix("http://bot.test")
    text = await (await bot.client.get(path)).text()
    assert "nope" in text and "10.20.0.2" in text  # the page lists every error
    errors = (await (await bot.client.get(path, params={"format": "json"})).json())["errors"]
    assert len(errors) == 2
    assert final["description"] == short(f"invalid manifest: 2 errors; {errors[0]}")
    assert "nope" in final["description"] or "10.20.0.2" in final["description"]
    assert fake_github.comments == {}


async def test_a_branch_that_cannot_be_fetched_gets_error(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    missing = "ab" * 20  # a head the remote does not have
    await deliver(bot, branch_push(payloads, before=base, after=missing))
    await bot.drain()
    final = fake_github.last_status(missing, PLAN)
    assert final["state"] == "error"
    assert final["description"].startswith("could not plan: could not fetch abababababab")


async def test_a_push_and_a_pr_synchronize_for_the_same_head_plan_once(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planned = count_plans(monkeypatch)
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    first = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    fake_github.add_pull(7, head_sha=first, base_sha=base, head_ref="feature")
    head = manifest_repo.commit(
        add_port(manifest_repo.manifest(), 3002), "another port", branch="feature"
    )
    fake_github.pulls[7]["head"]["sha"] = head  # GitHub moved the PR along with the branch
    push = branch_push(payloads, before=first, after=head)
    sync = payloads.pull_request("synchronize", number=7, head_sha=head, base_sha=base)
    answers = await asyncio.gather(deliver(bot, push), deliver(bot, sync, "pull_request"))
    assert [a["status"] for a in answers] == ["accepted", "accepted"]
    jobs = bot.ctx.require_jobs()
    await asyncio.gather(jobs.run_once(), jobs.run_once())  # both jobs at once
    await bot.drain()

    assert planned == [(base, head)]
    assert states(fake_github, head) == [
        ("pending", "planning…"),
        ("success", "1 service, 2 steps"),
    ]
    (comment,) = fake_github.comments_on(7)
    assert head in comment["body"]


async def test_a_fork_pr_of_the_same_branch_name_does_not_take_the_push(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    """Only a PR whose head is this repository's branch plans it; a fork's `feature` is not."""
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    fake_github.add_pull(9, head_sha="c" * 40, base_sha=base, head_ref="feature", fork=True)
    await deliver(bot, branch_push(payloads, before=base, after=head))
    await bot.drain()
    assert fake_github.last_status(head, PLAN)["state"] == "success"
    (listing,) = fake_github.calls("GET", r"/pulls$")
    assert listing.query["head"] == "octo-org:feature" and listing.query["state"] == "open"


async def test_the_push_is_planned_when_github_cannot_list_pull_requests(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    fake_github.fail_next(100, path=r"/pulls$")  # every retry too
    await deliver(bot, branch_push(payloads, before=base, after=head))
    await bot.drain()
    assert states(fake_github, head)[-1] == ("success", "1 service, 2 steps")


async def test_a_pr_opened_on_a_planned_branch_shares_its_plan(
    make_bot: Any,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    planned = count_plans(monkeypatch)
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    await deliver(bot, branch_push(payloads, before=base, after=head, created=True))
    await bot.drain()
    branch_target = fake_github.last_status(head, PLAN)["target_url"]

    fake_github.add_pull(8, head_sha=head, base_sha=base, head_ref="feature")
    opened = payloads.pull_request("opened", number=8, head_sha=head, base_sha=base)
    await deliver(bot, opened, "pull_request")
    await bot.drain()
    assert planned == [(base, head)]  # the PR took the branch's plan
    assert len(fake_github.comments_on(8)) == 1
    assert fake_github.last_status(head, PLAN)["target_url"] == branch_target


async def test_planning_calls_arriving_together_share_one_plan(
    make_bot: Any, manifest_repo: ManifestRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared plan itself: concurrent callers wait for the one computation."""
    from bot.gitcache import Remote
    from bot.github.pulls import shared_plan

    planned = count_plans(monkeypatch)
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    git = bot.ctx.git
    await git.fetch(Remote(str(manifest_repo.path)), [head, base])
    plans = await asyncio.gather(*(shared_plan(bot.ctx, base, head) for _ in range(5)))
    assert planned == [(base, head)]
    assert len({plan.digest for plan in plans}) == 1 and plans[0].ok


IGNORED = [
    (
        "branch-deleted",
        lambda p: real_push(p, ref="refs/heads/feature", deleted=True),
        {},
        "branch feature was deleted",
    ),
    (
        "tag-pushed",
        lambda p: real_push(p, ref="refs/tags/simple-tag"),
        {},
        "tag pushes are not planned (refs/tags/simple-tag)",
    ),
    (
        "tag-deleted",
        lambda p: real_push(p, ref="refs/tags/simple-tag", deleted=True),
        {},
        "tag pushes are not planned",
    ),
    (
        "readme-only",
        lambda p: branch_push(
            p, before="a" * 40, after="b" * 40, files=("README.md", "docs/setup.md")
        ),
        {},
        "the push to feature touches no manifest-related file",
    ),
    (
        "branch-pushes-off",
        lambda p: branch_push(p, before="a" * 40, after="b" * 40),
        {"plan_branch_pushes": False},
        "NIXMOX_PLAN_BRANCH_PUSHES is off",
    ),
    (
        "not-listed",
        lambda p: branch_push(p, before="a" * 40, after="b" * 40),
        {"plan_branches": "wip/*,release-*"},
        "branch feature matches no NIXMOX_PLAN_BRANCHES",
    ),
]


@pytest.mark.parametrize(
    ("make", "settings", "reason"), [c[1:] for c in IGNORED], ids=[c[0] for c in IGNORED]
)
async def test_deletions_tags_and_unrelated_pushes_are_ignored_with_a_reason(
    make_bot: Any,
    payloads: Payloads,
    fake_github: FakeGitHub,
    make: Any,
    settings: dict[str, Any],
    reason: str,
) -> None:
    bot = await make_bot(**settings)
    answer = await deliver(bot, make(payloads))
    assert answer["status"] == "ignored"
    assert reason in answer["message"]
    assert await queued_jobs(bot) == []
    assert fake_github.statuses == []


@pytest.mark.parametrize(
    ("branch", "flags", "files", "settings"),
    [
        ("feature", {"created": True}, ("README.md",), {}),  # may carry unlisted commits
        ("feature", {"forced": True}, ("README.md",), {}),  # may have dropped commits
        ("feature", {}, ("terraform/modules/lxc/main.tf",), {}),
        ("feature", {}, ("flake.lock",), {}),
        ("wip/gitea", {}, ("nixos/gitea.nix",), {"plan_branches": "wip/*,release-*"}),
    ],
    ids=["created", "forced", "terraform", "flake-lock", "listed-branch"],
)
async def test_pushes_that_may_change_a_plan_are_queued(
    make_bot: Any,
    payloads: Payloads,
    branch: str,
    flags: dict[str, Any],
    files: tuple[str, ...],
    settings: dict[str, Any],
) -> None:
    bot = await make_bot(**settings)
    payload = branch_push(payloads, before="a" * 40, after="b" * 40, branch=branch, files=files)
    payload.update(flags)
    answer = await deliver(bot, payload)
    assert answer["status"] == "accepted"
    (job,) = await queued_jobs(bot)
    assert job.kind == "github.plan_branch"
    assert (job.payload["branch"], job.payload["after"]) == (branch, "b" * 40)


async def test_a_redelivered_push_does_nothing_twice(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    payload = branch_push(payloads, before=base, after=head)
    first = await deliver(bot, payload, delivery="d-1")
    await bot.drain()
    again = await deliver(bot, payload, delivery="d-1")  # GitHub's "Redeliver" keeps the id
    await bot.drain()
    assert (first["status"], again["status"]) == ("accepted", "duplicate")
    assert states(fake_github, head) == [
        ("pending", "planning…"),
        ("success", "1 service, 2 steps"),
    ]
    assert await queued_jobs(bot) == []


def test_branch_settings_default_to_every_branch() -> None:
    from bot.config import Settings

    assert Settings().plan_branch_pushes is True
    assert Settings().plan_branches == []
    assert Settings(plan_branches="wip/*, release-*").plan_branches == ["wip/*", "release-*"]


def test_the_fixture_payloads_are_the_real_examples(payloads: Payloads) -> None:
    """The ignored-push cases start from GitHub's own payloads, not hand-made ones."""
    deletion = real_push(payloads, ref="refs/heads/feature", deleted=True)
    assert deletion["after"] == ZERO and deletion["deleted"] is True
    created = real_push(payloads, ref="refs/heads/feature")
    assert created["commits"][0]["added"] == ["README.md"]
