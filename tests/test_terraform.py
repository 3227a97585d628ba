"""The terraform runner with real terraform: `terraform_data` modules need no provider download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from planner.models import Manifest
from planner.plan import Phase, Plan, Step, plan_full
from planner.source import load_manifest
from runners.base import Context
from runners.config import RedactConfig, RunnerConfig, TerraformConfig
from runners.redact import REDACTED
from runners.registry import build_runners
from runners.terraform import TerraformRunner, service_variables
from tests.fixtures_manifests import lab_manifest

SECRET = "tok-SECRET-4711"

MODULE = """
variable "service" { type = string }
variable "ip" { type = string }
variable "hostname" { type = string }
variable "network" { type = any }
variable "resources" { type = any }
variable "proxy" { type = any }
variable "oidc" { type = any }
variable "quota_gb" { type = number }
variable "api_token" {
  type      = string
  sensitive = true
}

resource "terraform_data" "app" {
  input = {
    ip       = var.ip
    hostname = var.hostname
    domain   = var.network.domain
    memory   = var.resources.memory
    upstream = var.proxy.upstream
    scopes   = var.oidc.scopes
    quota_gb = var.quota_gb
  }
}

output "summary" { value = terraform_data.app.output }
# the other outputs refer to the resource too, so that `-target` applies them
output "token" {
  value     = terraform_data.app.id == "" ? "" : var.api_token
  sensitive = true
}
output "token_unmasked" { value = nonsensitive(terraform_data.app.id == "" ? "" : var.api_token) }
output "note" { value = terraform_data.app.id == "" ? "" : "admin password is hunter42" }
"""

INFRA = """
variable "names" {
  type    = list(string)
  default = ["app", "db"]
}
resource "terraform_data" "container" {
  for_each = toset(var.names)
  input    = each.key
}
"""


@pytest.fixture(scope="module", autouse=True)
def terraform_on_path() -> None:
    assert shutil.which("terraform"), "terraform is not on PATH: install terraform >= 1.5"


def manifest(hostname: str = "app.lab.lan", *, with_app: bool = True) -> Manifest:
    services: dict[str, Any] = {}
    if with_app:
        services["app"] = {
            "ip": "10.20.0.3",
            "hostname": hostname,
            "resources": {"cores": 2, "memory": 2048, "disk_gb": 16},
            "interface": {
                "terraform": {
                    "modules": ["./terraform/app"],
                    "targets": ["terraform_data.app"],
                    "variables": {"quota_gb": 100, "api_token": SECRET},
                },
                "proxy": {"domain": "app.lab.lan", "upstream": "10.20.0.3:8080"},
                "auth": {
                    "type": "oidc",
                    "provider": "authentik",
                    "oidc": {"client_type": "confidential", "scopes": ["openid", "email"]},
                },
            },
        }
    return lab_manifest(services)


def export(tmp_path: Path, name: str, *, module: bool = True, infra: bool = False) -> Path:
    """A fresh exported revision, as each deployment gets."""
    root = tmp_path / name
    if module:
        (root / "terraform" / "app").mkdir(parents=True)
        (root / "terraform" / "app" / "main.tf").write_text(MODULE)
    if infra:
        (root / "terraform" / "infrastructure").mkdir(parents=True)
        (root / "terraform" / "infrastructure" / "main.tf").write_text(INFRA)
    root.mkdir(parents=True, exist_ok=True)
    return root


def runner(tmp_path: Path, **tf: Any) -> TerraformRunner:
    config = RunnerConfig(
        terraform=TerraformConfig(state_dir=tmp_path / "state", **{"roots": {}, **tf}),
        redact=RedactConfig(patterns=[r"hunter\d+"]),
    )
    tf_runner = build_runners("real", config).by_phase[Phase.TF_SERVICE_INFRA]
    assert isinstance(tf_runner, TerraformRunner)
    return tf_runner


def ctx_for(m: Manifest, workdir: Path, plan: Plan | None = None) -> Context:
    return Context("dep", m, plan or plan_full(m), workdir, revision="r1")


def state_of(tmp_path: Path, workspace: str) -> dict[str, Any]:
    path = tmp_path / "state" / "terraform__app" / "terraform.tfstate.d" / workspace
    return json.loads((path / "terraform.tfstate").read_text())


def resources(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [i["attributes"]["input"]["value"] for r in state["resources"] for i in r["instances"]]


def test_variables_are_the_manifest_values() -> None:
    values = service_variables("app", manifest())
    assert values == {
        "service": "app",
        "ip": "10.20.0.3",
        "hostname": "app.lab.lan",
        "network": {"domain": "lab.lan", "gateway": "10.20.0.1", "network_cidr": "10.20.0.0/24"},
        "resources": {"cores": 2, "memory": 2048, "disk_gb": 16},
        "proxy": {"domain": "app.lab.lan", "upstream": "10.20.0.3:8080"},
        "oidc": {"client_type": "confidential", "scopes": ["openid", "email"]},
        "quota_gb": 100,
        "api_token": SECRET,
    }


async def test_module_is_planned_and_applied_in_its_workspace_with_secrets_redacted(
    tmp_path: Path,
) -> None:
    tf = runner(tmp_path)
    m = manifest()
    workdir = export(tmp_path, "rev1")
    ctx = ctx_for(m, workdir)
    step = ctx.plan.by_id()["tf:service-infra:app"]
    module, data = workdir / "terraform" / "app", tmp_path / "state" / "terraform__app" / "data"
    env = f"TF_DATA_DIR={data}/nixmox-service-infra-app"
    planfile = f"{data}/nixmox-service-infra-app/nixmox.tfplan"
    assert tf.commands(step, ctx) == [
        f"{env} terraform -chdir={module} init -input=false -no-color",
        f"{env} terraform -chdir={module} workspace select -or-create -no-color "
        "nixmox-service-infra-app",
        f"{env} terraform -chdir={module} plan -input=false -no-color -compact-warnings "
        f"-out={planfile} -target=terraform_data.app",
        f"{env} terraform -chdir={module} apply -input=false -no-color -compact-warnings {planfile}",
    ]

    result = await tf.run(step, ctx)
    assert result.ok, result.output
    written = json.loads((module / "nixmox.auto.tfvars.json").read_text())
    assert written == service_variables("app", m)
    applied = resources(state_of(tmp_path, "nixmox-service-infra-app"))
    assert applied == [
        {
            "ip": "10.20.0.3",
            "hostname": "app.lab.lan",
            "domain": "lab.lan",
            "memory": 2048,
            "upstream": "10.20.0.3:8080",
            "scopes": ["openid", "email"],
            "quota_gb": 100,
        }
    ]
    assert "Apply complete! Resources: 1 added, 0 changed, 0 destroyed." in result.output
    # the sensitive variable's value (printed by terraform via nonsensitive) and output
    assert SECRET not in result.output
    assert '"token_unmasked": "<redacted>"' in result.output
    assert '"token": "<redacted>"' in result.output
    # a configured pattern
    assert "hunter42" not in result.output and f"admin password is {REDACTED}" in result.output
    assert all(SECRET not in line for line in result.commands)


async def test_state_persists_between_deployments_and_removal_destroys(tmp_path: Path) -> None:
    tf = runner(tmp_path)
    first = ctx_for(manifest(), export(tmp_path, "rev1"))
    assert (await tf.run(first.plan.by_id()["tf:service-infra:app"], first)).ok

    # the next deployment: a new export, a changed hostname -> an update, not a create
    second = ctx_for(manifest("app2.lab.lan"), export(tmp_path, "rev2"))
    result = await tf.run(second.plan.by_id()["tf:service-infra:app"], second)
    assert result.ok, result.output
    assert "Plan: 0 to add, 1 to change, 0 to destroy." in result.output
    state = state_of(tmp_path, "nixmox-service-infra-app")
    assert resources(state)[0]["hostname"] == "app2.lab.lan"
    assert state["serial"] > 1

    # the service-config workspace is separate
    assert (await tf.run(second.plan.by_id()["tf:service-config:app"], second)).ok
    assert [r["workspace"] for r in tf.applied("app")] == [
        "nixmox-service-config-app",
        "nixmox-service-infra-app",
    ]

    # removal: the service and its module are gone from the revision
    gone = manifest(with_app=False)
    removal = ctx_for(gone, export(tmp_path, "rev3", module=False))
    destroy = Step(id="tf:destroy:app", phase=Phase.TF_DESTROY, service="app", targets=["app"])
    result = await tf.run(destroy, removal)
    assert result.ok, result.output
    assert "Destroy complete! Resources: 1 destroyed." in result.output
    assert [line.split(" -chdir=")[1].split()[1] for line in result.commands] == [
        "init", "workspace", "destroy", "init", "workspace", "destroy",
    ]  # fmt: skip
    assert "workspace select -or-create -no-color nixmox-service-config-app" in result.commands[1]
    assert resources(state_of(tmp_path, "nixmox-service-infra-app")) == []
    assert resources(state_of(tmp_path, "nixmox-service-config-app")) == []
    assert tf.applied("app") == []
    again = await tf.run(destroy, removal)
    assert again.ok and again.output == "no terraform workspace was applied for app"


async def test_infra_root_targets_only_the_containers_of_a_diff_plan(tmp_path: Path) -> None:
    tf = runner(
        tmp_path,
        roots={"tf:infra": "terraform/infrastructure"},
        infra_target='terraform_data.container["{service}"]',
    )
    m = manifest()
    workdir = export(tmp_path, "rev1", infra=True)
    diff = plan_full(m).model_copy(update={"base": "r0"})
    step = Step(id="tf:infra", phase=Phase.TF_INFRA, targets=["app"])
    ctx = ctx_for(m, workdir, diff)
    assert tf.commands(step, ctx)[1].endswith("-target='terraform_data.container[\"app\"]'")
    result = await tf.run(step, ctx)
    assert result.ok, result.output
    state = json.loads(
        (tmp_path / "state" / "terraform__infrastructure" / "terraform.tfstate").read_text()
    )
    assert [i["index_key"] for r in state["resources"] for i in r["instances"]] == ["app"]

    # a full plan (no base) applies the whole root
    full = await tf.run(step, ctx_for(m, workdir))
    assert full.ok and "-target" not in " ".join(full.commands)
    assert "1 added" in full.output


async def test_missing_root_fails_with_its_path_and_an_unconfigured_root_is_a_no_op(
    tmp_path: Path,
) -> None:
    m = manifest()
    workdir = export(tmp_path, "rev1")
    step = Step(id="tf:auth-core", phase=Phase.TF_AUTH_CORE)
    configured = runner(tmp_path, roots={"tf:auth-core": "terraform/authentik"})
    result = await configured.run(step, ctx_for(m, workdir))
    assert not result.ok
    assert result.output == (
        "terraform root terraform/authentik for tf:auth-core does not exist in the exported "
        f"revision ({workdir / 'terraform' / 'authentik'})"
    )
    unconfigured = await runner(tmp_path).run(step, ctx_for(m, workdir))
    assert unconfigured.ok
    assert unconfigured.output == "no terraform root is configured for tf:auth-core: nothing to do"


async def test_missing_terraform_binary_is_a_clear_failure(tmp_path: Path) -> None:
    tf = runner(tmp_path, binary="terraform-not-installed")
    ctx = ctx_for(manifest(), export(tmp_path, "rev1"))
    result = await tf.run(ctx.plan.by_id()["tf:service-infra:app"], ctx)
    assert not result.ok
    assert "terraform was not found (looked for 'terraform-not-installed' on PATH)" in result.output


# a module whose plan fails with errors quoting its variables' values
FAILING = """
variable "network" { type = any }
variable "magic" {
  type = string
  # a nested block must not hide the attribute below it
  validation {
    condition     = length(var.magic) > 0
    error_message = "magic must not be empty {really}."
  }
  sensitive = true
}
variable "db_password" { type = string }
variable "note" { type = string }

resource "terraform_data" "magic" { input = tonumber(nonsensitive(var.magic)) }
resource "terraform_data" "db" { input = tonumber(var.db_password) }
resource "terraform_data" "radius" { input = tonumber(var.network.outposts.radius.shared_secret) }
resource "terraform_data" "note" { input = tonumber(var.note) }
"""

MAGIC, DB_PASSWORD, RADIUS = "opaque-MAGIC-0042", "db-PASS-8080", "radius_secret_change_me"


def failing_manifest() -> Manifest:
    """A service whose variables hold secrets, in a manifest with an outpost secret."""
    m = manifest()
    data = m.model_dump(mode="json", exclude_unset=True)
    data["network"]["outposts"] = {"radius": {"shared_secret": RADIUS}}
    data["services"]["app"]["interface"]["terraform"]["variables"] = {
        "magic": MAGIC,
        "db_password": DB_PASSWORD,
        "note": "visible-note-value",
    }
    data["services"]["app"]["interface"]["terraform"]["targets"] = []
    return Manifest.model_validate(data)


async def test_a_failing_plan_never_shows_a_secret_it_echoes(tmp_path: Path) -> None:
    tf = runner(tmp_path)
    m = failing_manifest()
    workdir = export(tmp_path, "rev1")
    (workdir / "terraform" / "app" / "main.tf").write_text(FAILING)
    ctx = ctx_for(m, workdir)
    result = await tf.run(ctx.plan.by_id()["tf:service-infra:app"], ctx)
    assert not result.ok
    assert "Planning failed" in result.output and "exit status 1" in result.output
    # terraform echoes every value it cannot convert (wrapping lines); the non-secret one
    # stays readable, the three secrets are hidden
    flat = " ".join(result.output.split())
    assert 'cannot convert "visible-note-value" to number' in flat
    assert flat.count(f'cannot convert "{REDACTED}" to number') == 3
    # declared sensitive, named like a password, a manifest secret outside the service
    for secret in (MAGIC, DB_PASSWORD, RADIUS):
        assert secret not in result.output
        assert all(secret not in line for line in result.commands)
    assert "apply" not in result.commands[-1]


async def test_the_manifest_secrets_are_hidden_from_every_step(tmp_path: Path) -> None:
    tf = runner(tmp_path, roots={"tf:infra": "terraform/infrastructure"})
    m = failing_manifest()
    workdir = export(tmp_path, "rev1", module=False, infra=True)
    # the global root echoes the radius secret in a successful apply's output
    (workdir / "terraform" / "infrastructure" / "echo.tf").write_text(
        'variable "radius" {\n  type    = string\n  default = "' + RADIUS + '"\n}\n'
        'output "radius" { value = var.radius }\n'
    )
    ctx = ctx_for(m, workdir)
    result = await tf.run(ctx.plan.by_id()["tf:infra"], ctx)
    assert result.ok, result.output
    assert "Apply complete!" in result.output and '"radius": "<redacted>"' in result.output
    assert RADIUS not in result.output


def test_step_secrets_of_the_upstream_manifest_include_the_radius_secret(
    tmp_path: Path, upstream_manifest: Path
) -> None:
    m = load_manifest(upstream_manifest)
    tf = runner(tmp_path)
    ctx = ctx_for(m, tmp_path)
    secrets = tf.step_secrets([], ctx)
    assert RADIUS in secrets
    assert "dc=nixmox,dc=lan" not in secrets
