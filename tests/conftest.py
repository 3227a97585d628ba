"""Shared pytest configuration; fixture modules are listed in pytest_plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

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
