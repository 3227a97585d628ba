"""`github-app-manifest.json` asks for exactly what the bot uses: the fake GitHub grants an App
installation only the manifest's permissions and records what each call needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.github import FakeGitHub, Permission
from tests.fixtures_github import ManifestRepo, Payloads, add_port
from tests.test_github_client import APP_ID, app_key  # noqa: F401  (the App's key pair fixture)
from tests.test_github_comments import approve, command, planned_pr

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((ROOT / "github-app-manifest.json").read_text())
# what no REST call of the bot shows: GitHub grants metadata to every App, and the Git cache
# fetches the repository with the installation token (contents: read)
OUTSIDE_THE_API = {Permission("metadata", "read"), Permission("contents", "read")}
LEVELS = {"read": 1, "write": 2}


def strongest(permissions: set[Permission]) -> dict[str, str]:
    """One level per permission name: the highest any call needed."""
    out: dict[str, str] = {}
    for permission in permissions:
        if LEVELS[permission.level] > LEVELS.get(out.get(permission.name, ""), 0):
            out[permission.name] = permission.level
    return out


@pytest.fixture
def app_github(fake_github: FakeGitHub, app_key: tuple[str, str]) -> FakeGitHub:  # noqa: F811
    """The fake in App mode, the installation granted the manifest's permissions."""
    fake_github.app_id, fake_github.app_public_key = APP_ID, app_key[1]
    fake_github.tokens.clear()
    fake_github.granted = dict(MANIFEST["default_permissions"])
    fake_github.permissions.update(bob="write", carol="write")
    return fake_github


async def app_bot(make_bot: Any, app_key: tuple[str, str], tmp_path: Path) -> Any:  # noqa: F811
    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key[0])
    return await make_bot(github_token=None, github_app_id=APP_ID, github_private_key_file=key_file)


@pytest.fixture
async def github_app_bot(
    make_bot: Any,
    app_github: FakeGitHub,
    app_key: tuple[str, str],  # noqa: F811
    tmp_path: Path,
) -> Any:
    """A bot signed in as the App, against the fake in App mode."""
    return await app_bot(make_bot, app_key, tmp_path)


def test_the_manifest_subscribes_to_the_events_the_bot_handles() -> None:
    from bot.github.events import router

    handled = {event for event in router._shallow_routes} | {event for event in router._deep_routes}
    assert set(MANIFEST["default_events"]) == handled
    assert MANIFEST["hook_attributes"]["url"].endswith("/github/webhook")
    assert MANIFEST["public"] is False


async def test_plan_apply_and_merge_need_exactly_the_manifest_permissions(
    github_app_bot: Any,
    app_github: FakeGitHub,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    bot = github_app_bot
    _base, head = await planned_pr(bot, manifest_repo, payloads)
    (plan_run,) = app_github.check_runs_for(head, "nixmox/plan")
    assert plan_run["conclusion"] == "success"
    approve(app_github)
    _started, finished = await command(bot, payloads, "/nixmox apply")
    assert "**succeeded**" in finished["body"]
    merged = manifest_repo.commit(add_port(manifest_repo.manifest(), 3002), "port 3002")
    response = await bot.deliver("push", payloads.push(before=head, after=merged))
    assert (await response.json())["status"] == "accepted"
    await bot.drain()
    (deploy_run,) = app_github.check_runs_for(merged, "nixmox/deploy")
    assert deploy_run["conclusion"] == "success"

    assert app_github.issued_tokens, "the calls were made with installation tokens"
    assert app_github.violations == []  # nothing needed more than the manifest grants
    needed = strongest(app_github.used_permissions | OUTSIDE_THE_API)
    assert needed == MANIFEST["default_permissions"]
