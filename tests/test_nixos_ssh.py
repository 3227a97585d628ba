"""The copy-closure sequence for real: Nix store paths, `nix-copy-closure` and the host side
over a real sshd on loopback, then an automatic rollback over the same connection."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from planner.plan import plan_full
from runners.base import Context
from runners.config import (
    PRESETS,
    CommandTemplate,
    NixosConfig,
    NixosPreset,
    RunnerConfig,
    TerraformConfig,
    TransportConfig,
)
from runners.executor import Executor
from runners.registry import build_runners
from runners.transport import SshTransport
from state.events import DeploymentState, StepState
from tests import shims
from tests.fixtures_sshd import SshServer
from tests.test_nixos import manifest_with, nix_store_add


async def test_copy_closure_preset_over_real_ssh_with_rollback(
    sshd: SshServer, tmp_path: Path, control: Path
) -> None:
    assert shutil.which("nix-copy-closure"), "nix-copy-closure is missing: install nix-bin"
    switches, export = tmp_path / "switches.log", tmp_path / "export"
    old = nix_store_add(shims.fake_system(tmp_path / "old" / "a", switches, "old"))
    shims.fake_system(export / "systems" / "a", switches, "new", status="broken")
    profile = tmp_path / "profiles" / "system"
    profile.parent.mkdir()
    subprocess.run(["nix-env", "-p", str(profile), "--set", str(old)], check=True)

    # the preset, with the build replaced by adding a prepared system to the store
    preset = PRESETS[NixosPreset.COPY_CLOSURE]
    assert preset[0].capture == "new"
    deploy = [
        CommandTemplate(run="nix-store --add {export}/systems/{service}", capture="new"),
        *preset[1:],
    ]
    ssh_config = sshd.client_config(control)
    config = RunnerConfig(
        transport=TransportConfig(ssh=ssh_config, addresses={"a": sshd.host}),
        terraform=TerraformConfig(roots={}),
        nixos=NixosConfig(deploy=deploy, system_profile=str(profile), current_system=str(profile)),
    )
    runners = build_runners("real", config)
    assert isinstance(runners.transport, SshTransport)
    manifest = manifest_with(f"grep -qx ok {profile}/status")
    plan = plan_full(manifest)
    ctx = Context("dep-ssh", manifest, plan, export)
    try:
        result = await Executor(runners).execute(plan, ctx)
    finally:
        await runners.close()

    nix = result.steps["nix:service-config:a"].result
    assert nix.previous_system == str(old)
    new = nix.new_system
    ssh_prefix = SshTransport(ssh_config).describe("127.0.0.1", "X")[: -len("X")]
    assert nix.commands == [
        f"{ssh_prefix}'readlink -e {profile}'",
        f"nix-store --add {export}/systems/a",
        f"nix-copy-closure --to root@127.0.0.1 {new}",
        f"{ssh_prefix}'nix-env -p {profile} --set {new}'",
        f"{ssh_prefix}'{new}/bin/switch-to-configuration switch'",
        f"{ssh_prefix}'readlink -e {profile}'",
    ]
    assert result.steps["verify:a"].state is StepState.ROLLED_BACK
    assert result.state is DeploymentState.ROLLED_BACK
    assert switches.read_text() == "new switch\nold switch\n"
    assert profile.resolve() == old
