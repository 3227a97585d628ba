"""The bare cache clone: fetch by commit id, remotes, token in a header (never in a URL)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.config import Settings
from bot.gitcache import GitCache, GitFetchError, Remote, remote_for, safe_url
from tests.fixtures_github import ManifestRepo, add_port

TOKEN = "ghs_secret_installation_token"


def test_the_configured_remote_wins_and_tokens_only_go_to_https() -> None:
    mirror = Settings(git_remote="/srv/mirror.git")
    assert remote_for(mirror, "https://github.com/o/r.git", TOKEN) == Remote("/srv/mirror.git")
    github = remote_for(Settings(), "https://github.com/o/r.git", TOKEN)
    assert github == Remote("https://github.com/o/r.git", TOKEN)
    plain = remote_for(Settings(git_remote="http://mirror.lan/r.git"), None, TOKEN)
    assert plain.token is None
    with pytest.raises(GitFetchError, match="NIXMOX_GIT_REMOTE"):
        remote_for(Settings(), None, TOKEN)


def test_the_token_travels_in_the_environment_as_a_basic_auth_header() -> None:
    env = Remote("https://github.com/o/r.git", TOKEN).environment()
    assert env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    header = env["GIT_CONFIG_VALUE_0"].removeprefix("Authorization: Basic ")
    assert base64.b64decode(header).decode() == f"x-access-token:{TOKEN}"
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert "GIT_CONFIG_COUNT" not in Remote("/local").environment()


def test_urls_in_messages_lose_their_credentials() -> None:
    assert safe_url("https://user:pw@github.com/o/r.git") == "https://github.com/o/r.git"
    assert safe_url("/srv/repo") == "/srv/repo"


async def test_fetch_by_commit_id(tmp_path: Path, manifest_repo: ManifestRepo) -> None:
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    cache = GitCache(tmp_path / "cache.git")
    await cache.fetch(Remote(str(manifest_repo.path)), [base, head])
    assert cache.has_commit(base) and cache.has_commit(head)
    assert cache.is_ancestor(base, head) and not cache.is_ancestor(head, base)
    assert cache.merge_base(base, head) == base
    assert (tmp_path / "cache.git" / "HEAD").exists()
    assert not (tmp_path / "cache.git" / "nixos").exists()  # bare: nothing checked out
    # fetched commits are pinned under refs/nixmox so `git gc` keeps them
    refs = cache.repo().git.for_each_ref("refs/nixmox", format="%(objectname)").split()
    assert sorted(refs) == sorted({base, head})


async def test_an_unknown_commit_is_a_clear_error(
    tmp_path: Path, manifest_repo: ManifestRepo
) -> None:
    cache = GitCache(tmp_path / "cache.git")
    with pytest.raises(GitFetchError, match=r"could not fetch 0123456789ab from"):
        await cache.fetch(Remote(str(manifest_repo.path)), ["0123456789ab" + "c" * 28])


async def test_the_token_reaches_an_https_style_remote_only_in_a_header(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A Git smart-HTTP endpoint that refuses: it saw the header; the error hides the token."""
    seen: list[str] = []

    async def refs(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.Response(status=403, text="denied")

    app = web.Application()
    app.router.add_get("/o/r.git/info/refs", refs)
    server = await aiohttp_server(app, host="127.0.0.1")
    cache = GitCache(tmp_path / "cache.git", timeout=30)
    with pytest.raises(GitFetchError) as raised:
        await cache.fetch(Remote(f"http://127.0.0.1:{server.port}/o/r.git", TOKEN), ["a" * 40])
    expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert seen and seen[0] == expected
    assert TOKEN not in str(raised.value)
