"""Host previews and build-first deployments with real Nix, on a flake with no inputs
(tests/nixhosts.py): several hosts emulated here with the local transport, and once over ssh."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from planner.plan import plan_full
from planner.preview import HostPreview, preview_json
from planner.render import render_markdown, render_text
from runners.base import Context
from runners.config import (
    NixosConfig,
    NixosPreset,
    PreviewConfig,
    PreviewHosts,
    RunnerConfig,
    TerraformConfig,
    TransportConfig,
    TransportKind,
)
from runners.executor import Executor
from runners.preview import preview_plan
from runners.registry import build_runners
from state.events import DeploymentState, StepState
from tests import nixhosts
from tests.fixtures_sshd import SshServer

COMMIT = "ab" * 20  # a Git commit id: what the build cache keys on
NAMES = ["forgejo", "nextcloud", "vaultwarden"]


def config(tmp_path: Path, **nixos: object) -> RunnerConfig:
    hosts = tmp_path / "hosts"
    values: dict[str, object] = {
        "preset": NixosPreset.COPY_CLOSURE,
        "current_system": f"{hosts}/{{service}}/system",
        "system_profile": f"{hosts}/{{service}}/system",
        "build_cache": tmp_path / "builds",
        **nixos,
    }
    return RunnerConfig(
        transport=TransportConfig(kind=TransportKind.LOCAL),
        terraform=TerraformConfig(roots={}),
        nixos=NixosConfig.model_validate(values),
    )


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Three hosts running the systems of the base flake; the head bumps openssl and changes
    vaultwarden's units."""
    nixhosts.nix_env(monkeypatch)
    base = nixhosts.write_flake(tmp_path / "base")
    nixhosts.install_hosts(base, tmp_path / "hosts", NAMES)
    hosts = {
        **nixhosts.HOSTS,
        "vaultwarden": {
            "packages": ["vaultwarden", "openssl"],
            "dry_activate": "would stop the following units: old-sync.service\n"
            "would restart the following units: vaultwarden.service, nginx.service\n"
            "would start the following units: backup.timer",
        },
        "forgejo": {"packages": ["forgejo", "openssl"], "kernel": "6.6"},
    }
    head = nixhosts.write_flake(
        tmp_path / "head", versions={**nixhosts.VERSIONS, "openssl": "3.0.2"}, hosts=hosts
    )
    switches = tmp_path / "switches.log"
    monkeypatch.setenv(nixhosts.SWITCHES_ENV, str(switches))
    return {"base": base, "head": head, "switches": switches, "root": tmp_path}


async def test_a_version_bump_shows_on_exactly_the_hosts_that_include_it(
    lab: dict[str, Path],
) -> None:
    manifest = nixhosts.manifest(NAMES)
    plan = plan_full(manifest)
    _, previews = await preview_plan(
        plan, manifest, lab["head"], COMMIT, config(lab["root"]), PreviewConfig()
    )

    data = preview_json(previews)
    assert sorted(data) == NAMES
    for name in ("vaultwarden", "forgejo"):
        assert data[name]["packages"] == [
            {"name": "openssl", "old": "3.0.1", "new": "3.0.2", "size_delta": None}
        ], data[name]
        assert data[name]["unchanged"] is False and data[name]["error"] is None
    assert data["nextcloud"]["unchanged"] is True
    assert data["nextcloud"]["packages"] == []
    assert data["nextcloud"]["current"] == data["nextcloud"]["new"]
    assert set(data["vaultwarden"]) == {
        "current", "new", "unchanged", "packages", "units", "restart_systemd", "reboot", "error",
    }  # fmt: skip
    assert data["vaultwarden"]["units"] == {
        "stop": ["old-sync.service"],
        "not_stopped": [],
        "reload": [],
        "restart": ["vaultwarden.service", "nginx.service"],
        "start": ["backup.timer"],
    }
    # forgejo's kernel changed: it needs a reboot; vaultwarden's did not
    assert (data["forgejo"]["reboot"], data["vaultwarden"]["reboot"]) == (True, False)

    markdown = "\n\n".join(render_markdown(plan, previews=previews))
    assert "#### What changes on the hosts" in markdown
    assert "<details><summary>vaultwarden: 1 package, 3 units restart</summary>" in markdown
    assert "- `openssl 3.0.1 → 3.0.2`" in markdown
    assert "- restart: `vaultwarden.service`, `nginx.service`" in markdown
    assert "<details><summary>nextcloud: unchanged</summary>" in markdown
    assert "forgejo: 1 package, reboot needed" in markdown
    assert markdown.count("`openssl 3.0.1 → 3.0.2`") == 2  # forgejo and vaultwarden, not nextcloud
    assert "; 2 of 3 hosts change" in markdown.splitlines()[1]
    text = render_text(plan, previews)
    assert "What changes on the hosts:" in text
    assert "      openssl 3.0.1 → 3.0.2" in text


async def test_a_failing_build_and_an_unreachable_host_show_their_errors_only(
    lab: dict[str, Path],
) -> None:
    hosts = {**nixhosts.HOSTS, "forgejo": {"packages": ["forgejo"], "broken": True}}
    head = nixhosts.write_flake(
        lab["root"] / "broken", versions={**nixhosts.VERSIONS, "openssl": "3.0.2"}, hosts=hosts
    )
    shutil.rmtree(lab["root"] / "hosts" / "nextcloud")  # its current system cannot be read
    manifest = nixhosts.manifest(NAMES)
    plan = plan_full(manifest)
    completed, previews = await preview_plan(
        plan, manifest, head, None, config(lab["root"]), PreviewConfig()
    )

    assert "no such option services.nope" in (previews["forgejo"].error or "")
    assert previews["forgejo"].new is None
    assert "could not record the running system of nextcloud" in (previews["nextcloud"].error or "")
    assert previews["vaultwarden"].error is None
    assert [p.name for p in previews["vaultwarden"].packages] == ["openssl"]
    assert completed.digest == plan.digest  # the rest of the plan is unaffected
    markdown = "\n\n".join(render_markdown(plan, previews=previews))
    assert "<details><summary>forgejo: preview failed</summary>" in markdown
    assert "no such option services.nope" in markdown
    assert "; 1 of 3 hosts change" in markdown


async def test_hosts_all_adds_the_hosts_the_rules_missed_with_their_reason(
    lab: dict[str, Path],
) -> None:
    manifest = nixhosts.manifest(NAMES)
    plan = plan_full(manifest, service="vaultwarden")
    assert "nix:service-config:forgejo" not in plan.by_id()
    completed, previews = await preview_plan(
        plan,
        manifest,
        lab["head"],
        COMMIT,
        config(lab["root"]),
        PreviewConfig(hosts=PreviewHosts.ALL),
    )

    assert sorted(previews) == NAMES
    steps = completed.by_id()
    assert steps["nix:service-config:forgejo"].reasons == ["its system changes (1 package)"]
    assert steps["verify:forgejo"].needs == ["nix:service-config:forgejo"]
    assert "nix:service-config:nextcloud" not in steps  # unchanged: not added
    assert completed.digest != plan.digest
    # selected hosts only (the default) previews vaultwarden alone
    _, selected = await preview_plan(
        plan, manifest, lab["head"], COMMIT, config(lab["root"]), PreviewConfig()
    )
    assert sorted(selected) == ["vaultwarden"]


async def test_a_deployment_switches_only_changed_hosts_and_reuses_the_previewed_builds(
    lab: dict[str, Path],
) -> None:
    manifest = nixhosts.manifest(NAMES)
    plan = plan_full(manifest)
    runner_config = config(lab["root"])
    _, previews = await preview_plan(
        plan, manifest, lab["head"], COMMIT, runner_config, PreviewConfig()
    )
    assert previews["nextcloud"].unchanged

    runners = build_runners("real", runner_config)
    ctx = Context("dep-preview", manifest, plan, lab["head"], COMMIT)
    result = await Executor(runners).execute(plan, ctx)

    assert result.state is DeploymentState.SUCCEEDED, result.states()
    assert runners.rollback.builds_run == 0  # type: ignore[union-attr]
    assert sorted(nixhosts.switches(lab["switches"])) == [
        ("forgejo", "switch"),
        ("vaultwarden", "switch"),
    ]
    nextcloud = result.steps["nix:service-config:nextcloud"].result
    assert nextcloud is not None
    assert nextcloud.output.splitlines()[-1] == f"already running {previews['nextcloud'].current}"
    vaultwarden = result.steps["nix:service-config:vaultwarden"].result
    assert vaultwarden is not None and vaultwarden.new_system == previews["vaultwarden"].new
    assert "(build cache)" in vaultwarden.output
    assert not any("nix-copy-closure" in line for line in vaultwarden.commands)  # local


async def test_a_failing_build_fails_its_step_before_the_host_changes(
    lab: dict[str, Path],
) -> None:
    hosts = {**nixhosts.HOSTS, "forgejo": {"packages": ["forgejo"], "broken": True}}
    head = nixhosts.write_flake(
        lab["root"] / "broken", versions={**nixhosts.VERSIONS, "openssl": "3.0.2"}, hosts=hosts
    )
    manifest = nixhosts.manifest(NAMES)
    plan = plan_full(manifest)
    runners = build_runners("real", config(lab["root"]))
    ctx = Context("dep-broken", manifest, plan, head, None)
    result = await Executor(runners).execute(plan, ctx)

    forgejo = result.steps["nix:service-config:forgejo"]
    assert forgejo.state is StepState.FAILED
    assert forgejo.result is not None and "no such option services.nope" in forgejo.result.output
    assert forgejo.reason is not None and "nothing was changed on forgejo" in forgejo.reason
    assert "forgejo" not in result.rollbacks
    assert result.steps["verify:forgejo"].state is StepState.SKIPPED
    assert ("forgejo", "switch") not in nixhosts.switches(lab["switches"])
    assert ("vaultwarden", "switch") in nixhosts.switches(lab["switches"])
    # the default build line is the Nix 2.8 one
    assert forgejo.result.commands[1].startswith("nix build --no-link --json ")


async def test_preview_over_real_ssh_copies_and_runs_on_the_host(
    lab: dict[str, Path], sshd: SshServer, control: Path
) -> None:
    root = lab["root"]
    runner_config = config(root)
    runner_config.transport = TransportConfig(
        ssh=sshd.client_config(control), addresses={"vaultwarden": sshd.host}
    )
    manifest = nixhosts.manifest(["vaultwarden"])
    plan = plan_full(manifest)
    _, previews = await preview_plan(
        plan, manifest, lab["head"], None, runner_config, PreviewConfig()
    )

    preview: HostPreview = previews["vaultwarden"]
    assert preview.error is None, preview.error
    assert [(p.name, p.old, p.new) for p in preview.packages] == [("openssl", "3.0.1", "3.0.2")]
    assert preview.units.restart == ["vaultwarden.service", "nginx.service"]
