"""The monitor reaches the manifest repository through the one Git access (`bot.gitcache`),
shared with Slack, never through a front end: real Git repositories, the real app."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT, BotContext
from bot.gitcache import GitCache, GitFetchError, ManifestGit, UnknownRef, resolve_ref
from bot.monitoring import repo_source
from bot.slack.backend import PlanFailure, RepoBackend
from tests.fakes.slack import FakeSlack
from tests.fixtures_github import ManifestRepo
from tests.fixtures_slack import slack_settings

ROOT = Path(__file__).resolve().parent.parent
FRONT_ENDS = ("bot.slack", "bot.github", "bot.dashboard")


def settings_for(tmp_path: Path, remote: Path | None) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        workdir=tmp_path / "work",
        git_remote=str(remote) if remote is not None else None,
    )


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_monitor_imports_no_front_end() -> None:
    for module in ("bot/monitoring.py", "bot/leadership.py", "bot/gitcache.py"):
        reaches = sorted(
            name for name in imported_modules(ROOT / module) if name.startswith(FRONT_ENDS)
        )
        assert reaches == [], f"{module} reaches into a front end: {reaches}"


async def test_the_default_branch_head_is_resolved_and_fetched_into_the_cache(
    tmp_path: Path, manifest_repo: ManifestRepo
) -> None:
    head = manifest_repo.repo.head.commit.hexsha
    cache = GitCache(tmp_path / "cache.git")
    access = ManifestGit(settings_for(tmp_path, manifest_repo.path), cache)
    assert await access.default_branch() == head
    assert cache.has_commit(head)
    (manifest_repo.path / "README").write_text("a second commit\n")
    manifest_repo.repo.index.add(["README"])
    newer = manifest_repo.repo.index.commit("newer").hexsha
    assert await access.default_branch() == newer and cache.has_commit(newer)


async def test_unknown_refs_and_a_missing_remote_are_clear_errors(
    tmp_path: Path, manifest_repo: ManifestRepo
) -> None:
    access = ManifestGit(settings_for(tmp_path, manifest_repo.path), GitCache(tmp_path / "c.git"))
    with pytest.raises(UnknownRef) as unknown:
        await resolve_ref(await access.remote(), "no-such-branch")
    assert unknown.value.ref == "no-such-branch"
    nowhere = ManifestGit(settings_for(tmp_path, None), GitCache(tmp_path / "c.git"))
    with pytest.raises(GitFetchError, match="does not know where the manifest repository is"):
        await nowhere.default_branch()


async def test_slack_and_the_monitor_share_the_one_cache_and_fetch(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    app = build_app(slack_settings(tmp_path, fake_slack, manifest_repo.path), start_monitor=False)
    await aiohttp_client(app)
    ctx = app[CONTEXT]
    assert ctx.git is not None  # made at start: a Slack-only bot with NIXMOX_GIT_REMOTE too
    source = repo_source(ctx)
    assert source is not None
    found = await source()
    head = manifest_repo.repo.head.commit.hexsha
    assert found == (ctx.git.path, head)
    backend = RepoBackend(ctx)
    assert backend.git is ctx.git and await backend.fetch(None) == head
    with pytest.raises(PlanFailure, match="`nope` is not a branch, tag or full commit id"):
        await backend.fetch("nope")


async def test_the_monitor_does_without_the_default_branch_when_it_cannot_fetch(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack
) -> None:
    gone = tmp_path / "no-such-repository"
    app = build_app(slack_settings(tmp_path, fake_slack, gone), start_monitor=False)
    await aiohttp_client(app)
    source = repo_source(app[CONTEXT])
    assert source is not None and await source() is None  # drift without `pending`: logged
    assert repo_source(BotContext(settings=settings_for(tmp_path, None))) is None  # no remote
