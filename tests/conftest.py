"""Shared pytest configuration; fixture modules are listed in pytest_plugins."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import git
import pytest

from state.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
UPSTREAM = SHARED / "fixtures" / "nixmox-upstream"

pytest_plugins: list[str] = [
    "tests.fixtures_pg",
    "tests.fixtures_sshd",
    "tests.fixtures_github",
    "tests.fixtures_slack",
]


@pytest.fixture(scope="session")
def upstream_manifest() -> Path:
    """The real NixMox manifest (read from ../shared, never copied into the repo)."""
    path = UPSTREAM / "service-manifest.nix"
    assert path.exists(), f"missing {path}: the shared fixtures must sit next to the checkout"
    return path


@pytest.fixture(scope="session")
def upstream_manifest_old() -> Path:
    """The older NixMox manifest, with interface.terraform on every service."""
    path = UPSTREAM / "service-manifest.ebf3bcb.nix"
    assert path.exists(), f"missing {path}: the shared fixtures must sit next to the checkout"
    return path


SMALL_MANIFEST = (REPO_ROOT / "manifests" / "small.nix").read_text()
REPO_MANIFEST = "nixos/service-manifest.nix"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real SQLite state store in the test's directory."""
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/state.db")
    yield opened
    await opened.close()


@pytest.fixture
def repo(tmp_path: Path) -> git.Repo:
    """A Git repository whose manifest (nixos/service-manifest.nix) is manifests/small.nix,
    one commit on main."""
    root = tmp_path / "repo"
    (root / "nixos").mkdir(parents=True)
    made = git.Repo.init(root, initial_branch="main")
    with made.config_writer() as config:
        config.set_value("user", "name", "test").set_value("user", "email", "t@example.org")
    (root / REPO_MANIFEST).write_text(SMALL_MANIFEST)
    made.index.add([REPO_MANIFEST])
    made.index.commit("first")
    return made
