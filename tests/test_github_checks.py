"""As a GitHub App the bot reports check runs: `nixmox/plan` with the plan as its output and the
manifest's findings as annotations on their own lines (50 per request), `nixmox/deploy` updated
as steps finish. With a token it keeps posting commit statuses (tests of pulls and pushes)."""

from __future__ import annotations

from typing import Any

from tests.fakes.github import ANNOTATIONS_PER_REQUEST, FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port, break_manifest
from tests.fixtures_manifests import MANIFEST_PATH
from tests.test_github_app_manifest import app_github, github_app_bot  # noqa: F401  (fixtures)
from tests.test_github_client import app_key  # noqa: F401  (the App's key pair fixture)
from tests.test_github_pulls import open_pr

PLAN = "nixmox/plan"
DEPLOY = "nixmox/deploy"


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


async def pr_with(bot: Any, repo: ManifestRepo, payloads: Payloads, manifest: str) -> str:
    """A PR whose head has this manifest, planned; its head."""
    base = repo.repo.heads.main.commit.hexsha
    head = repo.commit(manifest, "the change", branch="f")
    await open_pr(bot, payloads, 7, head, base)
    return head


def the_run(fake: FakeGitHub, sha: str, name: str) -> dict[str, Any]:
    (run,) = fake.check_runs_for(sha, name)
    return run


async def test_a_plan_is_a_check_run_with_the_plan_as_output(
    github_app_bot: Any,  # noqa: F811
    app_github: FakeGitHub,  # noqa: F811
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    head = await pr_with(
        github_app_bot, manifest_repo, payloads, add_port(manifest_repo.manifest())
    )

    run = the_run(app_github, head, PLAN)
    assert run["status"] == "completed" and run["conclusion"] == "success"
    assert run["updates"][0]["status"] == "in_progress"  # shown while planning
    assert run["output"]["title"] == "1 service, 2 steps"
    assert "nix:service-config:gitea" in run["output"]["text"]
    assert run["details_url"].startswith("http://bot.test/plans/")
    assert run["annotations"] == []
    assert app_github.statuses_for(head, PLAN) == []  # a check run instead of a status


async def test_validation_errors_are_annotations_on_the_manifest_lines(
    github_app_bot: Any,  # noqa: F811
    app_github: FakeGitHub,  # noqa: F811
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    broken = break_manifest(manifest_repo.manifest())
    head = await pr_with(github_app_bot, manifest_repo, payloads, broken)

    run = the_run(app_github, head, PLAN)
    assert run["conclusion"] == "failure"
    annotations = sorted(run["annotations"], key=lambda a: a["start_line"])
    assert len(annotations) == 2  # one per error
    by_title = {a["title"]: a for a in annotations}
    duplicate = by_title["services.gitea.ip"]
    assert duplicate["path"] == MANIFEST_PATH
    assert duplicate["start_line"] == line_of(broken, 'ip = "10.20.0.2"; hostname = "gitea')
    assert duplicate["annotation_level"] == "failure"
    assert "is also used by postgresql" in duplicate["message"]
    dependency = by_title["services.gitea.depends_on[1]"]
    assert dependency["start_line"] == line_of(broken, '"postgresql" "nope"')
    assert "nope" in dependency["message"] and "Fix:" in dependency["message"]


def many_duplicates(text: str, count: int) -> str:
    """`count` more services, all on gitea's address: one error each."""
    extra = "".join(
        f'  services.dup{i} = {{ ip = "10.20.0.3"; hostname = "dup{i}.lab.lan"; vmid = {500 + i};'
        ' interface.health.liveness = "true"; };\n'
        for i in range(count)
    )
    marker = "  services.gitea = {\n"
    assert marker in text
    return text.replace(marker, extra + marker, 1)


async def test_more_than_50_annotations_go_in_several_requests(
    github_app_bot: Any,  # noqa: F811
    app_github: FakeGitHub,  # noqa: F811
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    head = await pr_with(
        github_app_bot, manifest_repo, payloads, many_duplicates(manifest_repo.manifest(), 60)
    )

    run = the_run(app_github, head, PLAN)
    assert run["conclusion"] == "failure"
    sizes = [len(u.get("output", {}).get("annotations") or []) for u in run["updates"]]
    assert max(sizes) <= ANNOTATIONS_PER_REQUEST
    assert len(run["annotations"]) >= 60
    assert len({(a["path"], a["start_line"], a["title"]) for a in run["annotations"]}) == len(
        run["annotations"]
    )
    assert run["updates"][-1]["conclusion"] == "failure"  # the conclusion comes last


async def test_a_deployment_is_a_check_run_updated_as_steps_finish(
    github_app_bot: Any,  # noqa: F811
    app_github: FakeGitHub,  # noqa: F811
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    bot = github_app_bot
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea port")
    response = await bot.deliver("push", payloads.push(before=before, after=after))
    assert (await response.json())["status"] == "accepted"
    await bot.drain()

    run = the_run(app_github, after, DEPLOY)
    assert run["conclusion"] == "success"
    progress = [u for u in run["updates"] if u.get("status") == "in_progress"]
    assert len(progress) >= 3  # started, then one update per finished step
    assert "| `nix:service-config:gitea` | succeeded |" in run["output"]["summary"]
    assert "| `verify:gitea` | succeeded |" in run["output"]["summary"]
    assert run["details_url"].startswith("http://bot.test/deployments/")
    assert app_github.statuses_for(after, DEPLOY) == []
    assert app_github.last_status(after, "nixmox/deploy/gitea")["state"] == "success"
