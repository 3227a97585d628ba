"""`nixmox plan --preview` and `nixmox deploy --dry-run --preview` as a user runs them, on a Git
repository holding a flake with no inputs (real Nix), hosts emulated with the local transport."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import git
import pytest

from tests import nixhosts

NIXMOX = Path(sys.executable).parent / "nixmox"
MANIFEST = "nixos/service-manifest.json"
NAMES = ["forgejo", "nextcloud", "vaultwarden"]


def commit(repo: git.Repo, message: str) -> str:
    repo.git.add(A=True)
    repo.index.commit(message)
    return repo.head.commit.hexsha


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """base: three hosts, running its systems; head: vaultwarden's ports change (the rules
    select it) and openssl is bumped (forgejo's system changes too, unselected). Made once:
    the tests only read it (previews and dry runs change no host)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        nixhosts.nix_env(monkeypatch)
        yield make_lab(tmp_path_factory.mktemp("preview-lab"))


def make_lab(tmp_path: Path) -> dict[str, object]:
    root = tmp_path / "repo"
    repo = git.Repo.init(root, initial_branch="main")
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "test").set_value("user", "email", "t@example.org")
    nixhosts.write_flake(root)
    data = nixhosts.manifest_data(NAMES)
    (root / "nixos").mkdir()
    (root / MANIFEST).write_text(json.dumps(data, indent=2))
    base = commit(repo, "base")
    nixhosts.install_hosts(root, tmp_path / "hosts", NAMES)
    data["services"]["vaultwarden"]["ports"] = [8080]  # type: ignore[index]
    (root / MANIFEST).write_text(json.dumps(data, indent=2))
    nixhosts.write_flake(root, versions={**nixhosts.VERSIONS, "openssl": "3.0.2"})
    head = commit(repo, "head")
    config = tmp_path / "nixmox.toml"
    config.write_text(
        f"""
[runners.transport]
kind = "local"

[runners.nixos]
preset = "copy-closure"
current_system = "{tmp_path}/hosts/{{service}}/system"
system_profile = "{tmp_path}/hosts/{{service}}/system"
build_cache = "{tmp_path}/builds"

[preview]
hosts = "all"
"""
    )
    return {"root": root, "base": base, "head": head, "config": config, "tmp": tmp_path}


def run(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIX_CONFIG": nixhosts.NIX_CONFIG}
    return subprocess.run(
        [str(NIXMOX), *args], cwd=tmp, capture_output=True, text=True, timeout=300, env=env
    )


def plan_args(lab: dict[str, object], fmt: str) -> list[str]:
    return [
        "plan",
        "--repo", str(lab["root"]), "--manifest", MANIFEST,
        "--base", str(lab["base"]), "--head", str(lab["head"]),
        "--preview", "--config", str(lab["config"]), "--format", fmt,
    ]  # fmt: skip


def test_plan_preview_json_and_markdown(lab: dict[str, object]) -> None:
    tmp = Path(str(lab["tmp"]))
    out = run(tmp, *plan_args(lab, "json"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    preview = data["preview"]
    assert sorted(preview) == NAMES  # hosts = "all"
    assert preview["nextcloud"]["unchanged"] is True
    for name in ("forgejo", "vaultwarden"):
        assert preview[name]["packages"] == [
            {"name": "openssl", "old": "3.0.1", "new": "3.0.2", "size_delta": None}
        ]
    steps = {step["id"]: step for step in data["steps"]}
    assert steps["nix:service-config:forgejo"]["reasons"] == ["its system changes (1 package)"]
    assert "nix:service-config:nextcloud" not in steps
    assert steps["nix:service-config:vaultwarden"]["reasons"] != ["its system changes (1 package)"]

    md = run(tmp, *plan_args(lab, "markdown"))
    assert md.returncode == 0, md.stderr
    assert "2 of 3 hosts change" in md.stdout.splitlines()[1]
    assert "#### What changes on the hosts" in md.stdout
    assert "<details><summary>forgejo: 1 package</summary>" in md.stdout
    assert "- `openssl 3.0.1 → 3.0.2`" in md.stdout


def test_plan_preview_needs_a_text_json_or_markdown_format(lab: dict[str, object]) -> None:
    out = run(Path(str(lab["tmp"])), *plan_args(lab, "slack"))
    assert out.returncode == 2
    assert "--preview goes with text, json or markdown" in out.stderr
    assert "Traceback" not in out.stderr


def test_deploy_dry_run_preview(lab: dict[str, object], tmp_path: Path) -> None:
    tmp = Path(str(lab["tmp"]))
    out = run(
        tmp,
        "deploy", "--repo", str(lab["root"]), "--manifest", MANIFEST, "--ref", str(lab["head"]),
        "--dry-run", "--preview", "--config", str(lab["config"]), "--json",
        "--database-url", f"sqlite+aiosqlite:///{tmp_path}/state.db",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["dry_run"] is True
    assert data["preview"]["nextcloud"]["unchanged"] is True
    assert data["preview"]["vaultwarden"]["packages"][0]["new"] == "3.0.2"
    commands = {step["id"]: step["commands"] for step in data["steps"]}
    build = commands["nix:service-config:vaultwarden"][1]
    assert build.startswith("nix build --no-link --json ")
    assert "--print-out-paths" not in build


def test_deploy_dry_run_preview_text(lab: dict[str, object], tmp_path: Path) -> None:
    tmp = Path(str(lab["tmp"]))
    out = run(
        tmp,
        "deploy", "--repo", str(lab["root"]), "--manifest", MANIFEST, "--ref", str(lab["head"]),
        "--dry-run", "--preview", "--config", str(lab["config"]),
        "--database-url", f"sqlite+aiosqlite:///{tmp_path}/state.db",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dry run: nothing is changed; these steps would run:")
    assert "What changes on the hosts:\n" in out.stdout
    assert "  nextcloud: unchanged" in out.stdout
    assert "  vaultwarden: 1 package\n      openssl 3.0.1 → 3.0.2" in out.stdout
    # without --dry-run, --preview is refused plainly
    refused = run(tmp, "deploy", "--repo", str(lab["root"]), "--preview")
    assert refused.returncode == 2 and "--preview goes with --dry-run" in refused.stderr
