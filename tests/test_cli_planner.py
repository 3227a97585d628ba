"""`nixmox validate` and `nixmox plan` as a user runs them (the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NIXMOX = Path(sys.executable).parent / "nixmox"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NIXMOX), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_validate_exit_codes() -> None:
    assert run("validate", "manifests/homelab.nix").returncode == 0
    invalid = run("validate", "manifests/broken/cycle.nix")
    assert invalid.returncode == 1
    assert "dependency cycle: cache → gitea → runner → cache" in invalid.stderr
    unevaluable = run("validate", "manifests/broken/syntax-error.nix")
    assert unevaluable.returncode == 2
    assert "syntax-error.nix:3:34" in unevaluable.stderr


def test_validate_upstream_manifest(upstream_manifest: Path) -> None:
    result = run("validate", str(upstream_manifest))
    assert result.returncode == 0, result.stderr
    assert "valid (11 services planned)" in result.stderr


def test_plan_json_shape(upstream_manifest: Path) -> None:
    result = run("plan", str(upstream_manifest), "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["digest"]) == 64
    assert data["waves"][0] == ["tf:infra"]
    step = next(s for s in data["steps"] if s["id"] == "nix:service-config:vaultwarden")
    assert step == {
        "id": "nix:service-config:vaultwarden",
        "phase": "nix:service-config",
        "service": "vaultwarden",
        "needs": ["verify:authentik", "verify:caddy", "verify:postgresql"],
        "reasons": ["services.vaultwarden"],
        "targets": [],
    }
    assert next(s for s in data["steps"] if s["id"] == "tf:infra")["service"] is None
    assert isinstance(data["warnings"], list)
    ids = [s["id"] for s in data["steps"]]
    assert ids == [sid for wave in data["waves"] for sid in wave]


def test_plan_service_filter_text() -> None:
    result = run("plan", "manifests/homelab.nix", "--service", "homepage")
    assert result.returncode == 0, result.stderr
    assert "verify:homepage" in result.stdout
    assert "vaultwarden" not in result.stdout


def test_plan_of_invalid_manifest_exits_1_with_the_error() -> None:
    result = run("plan", "manifests/broken/duplicate-ip.nix", "--format", "json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["steps"] == []
    assert (
        "duplicate-ip.nix:3:50: services.wiki.ip: ip 10.30.0.3 is also used by gitea"
        in result.stderr
    )


def test_restricted_mode_refusal_through_the_cli_leaks_nothing() -> None:
    result = run("plan", "manifests/broken/read-file.nix")
    assert result.returncode == 2
    assert "forbidden in restricted mode" in result.stderr
    secret = Path("/etc/hostname").read_text().strip()
    assert secret not in (result.stdout + result.stderr).replace("/etc/hostname", "")
    assert "Traceback" not in result.stderr


def test_only_file_commands_end_without_the_interpreters_teardown() -> None:
    from cli.main import is_file_only

    assert is_file_only(["validate", "manifests/small.nix"])
    assert is_file_only(["plan", "manifests/small.nix", "--format", "json"])
    for args in (
        ["plan", "--repo", ".", "--base", "HEAD~1"],
        ["plan", "manifests/small.nix", "--preview"],
        ["plan", "--config=x.toml", "manifests/small.nix"],
        ["deploy", "manifests/small.nix"],
        ["serve"],
        [],
    ):
        assert not is_file_only(args), args


def test_a_large_plan_is_printed_whole_through_a_pipe_before_the_quick_exit() -> None:
    from click.testing import CliRunner

    from cli.main import main

    for fmt in ("markdown", "json", "text"):
        args = ["plan", str(REPO / "manifests" / "homelab.nix"), "--format", fmt]
        piped = run(*args)
        in_process = CliRunner().invoke(main, args)
        assert piped.returncode == in_process.exit_code == 0, piped.stderr
        assert len(piped.stdout) > 2000
        assert piped.stdout == in_process.stdout, fmt
