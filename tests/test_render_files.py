"""`nixmox render --out DIR`: the generated scripts and workspace files, run for real."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner

from cli.main import main
from runners.terraform_files import hcl
from tests.fixtures_manifests import LAB_NETWORK

MODULE = """
variable "ip" { type = string }
variable "hostname" { type = string }
variable "network" { type = any }
variable "quota_gb" { type = number }
resource "terraform_data" "app" {
  input = { ip = var.ip, hostname = var.hostname, domain = var.network.domain, quota = var.quota_gb }
}
output "ip" { value = terraform_data.app.output.ip }
"""


def write_manifest(tmp_path: Path, startup: str, liveness: str) -> Path:
    manifest = {
        "network": LAB_NETWORK,
        "services": {
            "app": {
                "ip": "10.20.0.3",
                "hostname": "app.lab.lan",
                "interface": {
                    "terraform": {"modules": ["./terraform/app"], "variables": {"quota_gb": 5}},
                    "health": {
                        "startup": startup,
                        "liveness": liveness,
                        "retries": 2,
                        "interval": 0,
                        "timeout": 5,
                    },
                },
            },
            "plain": {"ip": "10.20.0.4", "hostname": "plain.lab.lan"},
        },
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def render(tmp_path: Path, manifest: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "repo"
    (root / "terraform" / "app").mkdir(parents=True)
    (root / "terraform" / "app" / "main.tf").write_text(MODULE)
    config = tmp_path / "nixmox.toml"
    config.write_text(f'[runners.terraform]\nstate_dir = "{tmp_path / "state"}"\n')
    out = tmp_path / "out"
    args = [
        "render",
        str(manifest),
        "--out",
        str(out),
        "--root",
        str(root),
        "--config",
        str(config),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output.splitlines()


def test_render_writes_health_scripts_and_workspace_files(tmp_path: Path) -> None:
    out, listed = render(tmp_path, write_manifest(tmp_path, "true", "true"))
    expected = ["health/app-health-check.sh", "health/plain-health-check.sh"]
    for workspace in ("nixmox-service-config-app", "nixmox-service-infra-app"):
        for name in ("apply.sh", "init.sh", "plan.sh", "terraform.tfvars", "workspace.tf"):
            expected.append(f"terraform/{workspace}/{name}")
    assert listed == [str(out / path) for path in sorted(expected)]
    tfvars = (out / "terraform" / "nixmox-service-infra-app" / "terraform.tfvars").read_text()
    assert 'ip = "10.20.0.3"' in tfvars and "quota_gb = 5" in tfvars
    assert 'network = {\n  "domain" = "lab.lan"\n' in tfvars
    workspace_tf = (out / "terraform" / "nixmox-service-infra-app" / "workspace.tf").read_text()
    assert f'workspace_dir = "{tmp_path}/state/terraform__app/terraform.tfstate.d"' in workspace_tf


def test_rendered_terraform_scripts_plan_and_apply_the_workspace(tmp_path: Path) -> None:
    assert shutil.which("terraform"), "terraform is not on PATH: install terraform >= 1.5"
    out, _ = render(tmp_path, write_manifest(tmp_path, "true", "true"))
    scripts = out / "terraform" / "nixmox-service-infra-app"
    for script in ("init.sh", "plan.sh", "apply.sh"):
        run = subprocess.run([str(scripts / script)], capture_output=True, text=True)
        assert run.returncode == 0, (script, run.stdout, run.stderr)
    assert "Apply complete! Resources: 1 added" in run.stdout
    state_file = (
        tmp_path / "state" / "terraform__app" / "terraform.tfstate.d" / "nixmox-service-infra-app"
    ) / "terraform.tfstate"
    state = json.loads(state_file.read_text())
    inputs = [i["attributes"]["input"]["value"] for r in state["resources"] for i in r["instances"]]
    assert inputs == [
        {"ip": "10.20.0.3", "hostname": "app.lab.lan", "domain": "lab.lan", "quota": 5}
    ]


def test_rendered_health_script_checks_startup_then_liveness(tmp_path: Path) -> None:
    marker = tmp_path / "seen"
    good, _ = render(tmp_path, write_manifest(tmp_path, f"echo s >> {marker}", "true"))
    run = subprocess.run(
        [str(good / "health" / "app-health-check.sh")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "app startup passed (attempt 1/2)",
        "app liveness passed (attempt 1/2)",
        "app is healthy",
    ]

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad, _ = render(bad_dir, write_manifest(bad_dir, f"echo s >> {marker}; false", "true"))
    run = subprocess.run(
        [str(bad / "health" / "app-health-check.sh")], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr.strip() == "app startup failed after 2 attempt(s)"
    assert marker.read_text() == "s\ns\ns\n"  # one good run, then two failed attempts
    plain = (bad / "health" / "plain-health-check.sh").read_text()
    assert "plain defines no health checks" in plain


def test_hcl_literals() -> None:
    assert hcl({"a": [1, True, None], "b": "x${y}"}) == (
        '{\n  "a" = [\n    1,\n    true,\n    null,\n  ]\n  "b" = "x$${y}"\n}'
    )
