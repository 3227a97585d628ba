"""`nixmox health`: every deployed service's startup then liveness check, now, on emulated hosts
(the local transport; health commands `test -f <dir>/up/<service>`), recorded in the store."""

from __future__ import annotations

import json
from pathlib import Path

from deployments.health import shorten
from tests.homelab import Homelab


def test_health_exits_0_when_every_check_passes_and_1_naming_the_failing_service(
    tmp_path: Path,
) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    result = lab.nixmox("health", "--config", str(lab.config))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["Service Health:", "✓ gitea", "✓ postgresql"]

    lab.set_up("gitea", False)
    result = lab.nixmox("health", "--config", str(lab.config))
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        "Service Health:",
        f"✗ gitea  (startup: {shorten(f'test -f {tmp_path}/up/gitea')} failed: "
        "startup attempt 2/2: exit status 1: no output)",
        "✓ postgresql",
    ]


def test_health_json_and_the_status_show_the_latest_check_with_when_it_ran(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    lab.set_up("postgresql", False)
    result = lab.nixmox("health", "--json", "--config", str(lab.config))
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert set(body) == {"services"}
    assert set(body["services"]) == {"gitea", "postgresql"}
    pg = body["services"]["postgresql"]
    assert set(pg) == {"healthy", "check", "checked_at", "output"}
    assert pg["healthy"] is False and pg["check"] == "startup"
    assert "postgresql startup failed after 2 attempt(s)" in pg["output"]
    assert body["services"]["gitea"]["healthy"] is True
    assert body["services"]["gitea"]["check"] == "liveness"

    status = lab.nixmox("status", "--config", str(lab.config))
    assert status.exit_code == 0, status.output
    row = next(line for line in status.output.splitlines() if line.startswith("postgresql"))
    assert "unhealthy" in row and pg["checked_at"][:10] in row


def test_health_of_one_service_of_a_manifest_path_and_of_a_revision(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.set_up("gitea", False)
    manifest = lab.repo_dir / "nixos" / "service-manifest.nix"
    result = lab.nixmox("health", "postgresql", str(manifest), "--config", str(lab.config))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["Service Health:", "✓ postgresql"]
    result = lab.nixmox("health", "--repo", str(lab.repo_dir), "--ref", "main", "--config",
                        str(lab.config))  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[1:] == [
        f"✗ gitea  (startup: {shorten(f'test -f {tmp_path}/up/gitea')} failed: "
        "startup attempt 2/2: exit status 1: no output)",
        "✓ postgresql",
    ]
    result = lab.nixmox("health", "nosuch", str(manifest), "--config", str(lab.config))
    assert result.exit_code == 2
    assert "nosuch is not an enabled service of the manifest" in result.output


def test_health_without_any_deployment_or_manifest_says_what_to_give(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    result = lab.nixmox("health", "--config", str(lab.config))
    assert result.exit_code == 2
    assert "no deployment recorded yet: give a manifest PATH" in result.output
