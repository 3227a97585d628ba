"""Loading manifests with the real nix-instantiate in restricted mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from planner.findings import ManifestError
from planner.source import EvalLimits, _run_to_exit, evaluate_nix, load_manifest

BROKEN = Path(__file__).resolve().parents[1] / "manifests" / "broken"


def test_nix_instantiate_is_installed() -> None:
    assert shutil.which("nix-instantiate"), "nix-instantiate missing: run ./dev test (nix-bin)"


def load_error(path: Path, limits: EvalLimits | None = None) -> ManifestError:
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, limits=limits)
    return caught.value


def test_reading_a_file_outside_the_repo_is_refused_and_nothing_leaks() -> None:
    error = load_error(BROKEN / "read-file.nix")
    text = str(error)
    assert error.evaluation_failed
    assert "access to absolute path '/etc/hostname' is forbidden in restricted mode" in text
    secret = Path("/etc/hostname").read_text().strip()
    assert secret and secret not in text.replace("/etc/hostname", "")


def test_fetching_a_url_is_refused() -> None:
    error = load_error(BROKEN / "fetch-url.nix")
    assert "access to URI 'http://127.0.0.1:9/secret' is forbidden in restricted mode" in str(error)


def test_environment_secrets_are_invisible_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXMOX_GITHUB_TOKEN", "ghp_supersecret")
    path = tmp_path / "m.nix"
    path.write_text('{ network.domain = builtins.getEnv "NIXMOX_GITHUB_TOKEN"; }')
    assert load_manifest(path).network.domain == ""


def test_imports_inside_the_manifest_directory_work(tmp_path: Path) -> None:
    (tmp_path / "net.nix").write_text('{ domain = "lab.lan"; }')
    (tmp_path / "m.nix").write_text("{ network = import ./net.nix; }")
    assert load_manifest(tmp_path / "m.nix").network.domain == "lab.lan"


def test_syntax_error_keeps_nix_file_line_and_column() -> None:
    error = load_error(BROKEN / "syntax-error.nix")
    text = str(error)
    assert "syntax error, unexpected '}', expecting ';'" in text
    assert "syntax-error.nix:3:34" in text
    assert error.evaluation_failed


def test_partial_output_before_an_error_is_never_parsed(tmp_path: Path) -> None:
    path = tmp_path / "m.nix"
    path.write_text('{ a = 1; b = throw "boom at b"; }')
    error = load_error(path)
    assert "boom at b" in str(error)


def test_evaluation_timeout_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "slow.nix"
    path.write_text(
        "let f = n: if n == 0 then 0 else 1 + f (n - 1); "
        "in { x = builtins.foldl' (a: b: a + f 2000) 0 (builtins.genList (i: i) 100000000); }"
    )
    error = load_error(path, EvalLimits(timeout=0.5))
    assert "took longer than 0.5 s" in str(error)
    assert error.evaluation_failed


def no_pidfd(pid: int) -> int:
    raise OSError("no pidfd on this kernel")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_the_evaluator_wait_returns_the_status_and_kills_past_the_deadline(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    assert _run_to_exit(subprocess.Popen(["sh", "-c", "exit 3"]), timeout=10) == 3
    slow = subprocess.Popen(["sleep", "30"])
    with pytest.raises(subprocess.TimeoutExpired):
        _run_to_exit(slow, timeout=0.2)
    assert slow.returncode is not None, "the process past its deadline was killed and reaped"


def test_output_cap_stops_huge_manifests(tmp_path: Path) -> None:
    path = tmp_path / "big.nix"
    path.write_text('{ x = builtins.genList (i: "padding-padding-padding") 20000; }')
    error = load_error(path, EvalLimits(max_output=4096))
    assert "printed more than 4096 bytes" in str(error)


def test_memory_limit_ends_runaway_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "mem.nix"
    path.write_text("{ x = builtins.length (builtins.genList (x: x) 100000000); }")
    error = load_error(path, EvalLimits(memory_limit=300 * 1024 * 1024, timeout=20))
    assert "out of memory" in str(error) or "bad_alloc" in str(error)


def test_json_manifests_are_read_directly(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"services": {"web": {"ip": "10.0.0.2"}}}))
    assert str(load_manifest(path).services["web"].ip) == "10.0.0.2"
    path.write_text("{ not json")
    assert "m.json:1:3" in str(load_error(path))


def test_a_manifest_that_is_not_an_attribute_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.nix"
    path.write_text("[ 1 2 ]")
    assert "evaluates to list, not an attribute set" in str(load_error(path))


def test_evaluate_nix_gives_plain_json_data(upstream_manifest: Path) -> None:
    data = evaluate_nix(upstream_manifest)
    assert data["network"]["network_cidr"] == "192.168.99.0/24"
    assert data["services"]["mail"]["enable"] is False
