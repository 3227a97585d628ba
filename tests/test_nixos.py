"""The NixOS runner: recording shims for `nixos-rebuild`/`ssh`, and a real Nix profile."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from planner.models import Manifest
from planner.plan import plan_full
from runners.base import Context
from runners.config import (
    CommandTemplate,
    NixosConfig,
    RunnerConfig,
    SshConfig,
    TerraformConfig,
    TransportConfig,
    TransportKind,
    Where,
)
from runners.executor import Executor
from runners.registry import build_runners
from runners.transport import LocalTransport, SshTransport
from state.events import DeploymentState, StepState
from tests import shims
from tests.fixtures_manifests import lab_manifest


def manifest_with(health: str, ip: str = "10.20.0.3") -> Manifest:
    """One application `a`; its health check decides whether its system is good."""
    return lab_manifest(
        {
            "a": {
                "ip": ip,
                "hostname": "a.lab.lan",
                "interface": {"health": {"startup": health, "retries": 1, "interval": 0}},
            }
        }
    )


@pytest.fixture
def shimmed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Shims first on PATH, an old (good) and a new (broken) system, a profile on the old one."""
    log, switches = tmp_path / "calls.jsonl", tmp_path / "switches.log"
    shims.install(tmp_path / "bin", log, "nixos-rebuild", "nix-env", "ssh")
    old = shims.fake_system(tmp_path / "sys-old", switches, "old")
    new = shims.fake_system(tmp_path / "sys-new", switches, "new", status="broken")
    profile = tmp_path / "profile"
    profile.symlink_to(old)
    export = tmp_path / "export"
    export.mkdir()
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SHIM_PROFILE", str(profile))
    monkeypatch.setenv("SHIM_NEW_SYSTEM", str(new))
    return {
        "log": log,
        "switches": switches,
        "old": old,
        "new": new,
        "profile": profile,
        "export": export,
    }


def real_config(profile: Path, **nixos: object) -> RunnerConfig:
    return RunnerConfig(
        transport=TransportConfig(kind=TransportKind.LOCAL),
        terraform=TerraformConfig(roots={}),
        nixos=NixosConfig(system_profile=str(profile), current_system=str(profile), **nixos),
    )


async def test_default_template_records_switches_and_rolls_back_a_failed_verify(
    shimmed: dict[str, Path],
) -> None:
    profile, old, new, export = (shimmed[k] for k in ("profile", "old", "new", "export"))
    manifest = manifest_with(f"grep -qx ok {profile}/status")
    plan = plan_full(manifest)
    ctx = Context("dep-1", manifest, plan, export, revision="abc")
    config = real_config(profile)
    executor = Executor(build_runners("real", config, transport=LocalTransport()))

    assert dict(executor.dry_run(plan, ctx))["nix:service-config:a"] == [
        f"readlink -e {profile}",
        f"nixos-rebuild switch --flake {export}#a --target-host root@10.20.0.3",
        f"readlink -e {profile}",
    ]
    result = await executor.execute(plan, ctx)

    assert shims.calls(shimmed["log"], "nixos-rebuild") == [
        ["switch", "--flake", f"{export}#a", "--target-host", "root@10.20.0.3"]
    ]
    nix = result.steps["nix:service-config:a"]
    assert nix.state is StepState.SUCCEEDED
    assert (nix.result.previous_system, nix.result.new_system) == (str(old), str(new))
    assert ctx.previous_systems == {"a": str(old)}
    assert result.steps["tf:infra"].result.output == (
        "no terraform root is configured for tf:infra: nothing to do"
    )

    verify = result.steps["verify:a"]
    assert verify.state is StepState.ROLLED_BACK
    assert "a startup failed after 1 attempt(s)" in verify.result.output
    assert result.rollbacks["a"].commands == [
        f"readlink -e {profile}",
        f"nix-env -p {profile} --set {old}",
        f"{old}/bin/switch-to-configuration switch",
        f"readlink -e {profile}",
    ]
    assert shims.calls(shimmed["log"], "nix-env") == [["-p", str(profile), "--set", str(old)]]
    assert shimmed["switches"].read_text() == "old switch\n"
    assert profile.resolve() == old
    assert result.state is DeploymentState.ROLLED_BACK


async def test_ssh_transport_wraps_host_commands_in_batch_mode_ssh(
    shimmed: dict[str, Path], tmp_path: Path
) -> None:
    """The `ssh` shim records the exact ssh argv and runs the remote command here."""
    profile, old, export = shimmed["profile"], shimmed["old"], shimmed["export"]
    manifest = manifest_with("true")
    plan = plan_full(manifest)
    ctx = Context("dep-2", manifest, plan, export)
    ssh = SshConfig(identity_file=tmp_path / "key", port=2222, control_dir=Path("/tmp/nixmox-cm"))
    transport = SshTransport(ssh)
    runner = build_runners("real", real_config(profile), transport=transport).rollback
    nix_step = plan.by_id()["nix:service-config:a"]
    result = await runner.run(nix_step, ctx)
    assert result.ok, result.output

    base = [
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-o", "ControlMaster=auto", "-o", "ControlPath=/tmp/nixmox-cm/%C",
        "-o", "ControlPersist=60s", "-i", str(tmp_path / "key"), "-p", "2222",
    ]  # fmt: skip
    record = [*base, "root@10.20.0.3", "--", f"readlink -e {profile}"]
    assert shims.calls(shimmed["log"], "ssh") == [record, record]
    # nixos-rebuild reaches the host with the same ssh options
    assert result.previous_system == str(old)
    assert transport.ssh_options() == " ".join(base)


async def test_failed_switch_that_changed_nothing_ends_failed(
    shimmed: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    profile, old, export = shimmed["profile"], shimmed["old"], shimmed["export"]
    monkeypatch.setenv("SHIM_EXIT_NIXOS_REBUILD", "1")
    manifest = manifest_with("true")
    plan = plan_full(manifest)
    ctx = Context("dep-3", manifest, plan, export)
    executor = Executor(build_runners("real", real_config(profile), transport=LocalTransport()))
    result = await executor.execute(plan, ctx)
    nix = result.steps["nix:service-config:a"]
    # the shimmed switch fails before touching the profile: the host still runs `old`
    assert nix.state is StepState.FAILED
    assert "exit status 1" in nix.result.output
    assert nix.reason.endswith(f"; nothing was changed on a: it still runs {old}")
    assert result.steps["verify:a"].state is StepState.SKIPPED
    assert shims.calls(shimmed["log"], "nix-env") == [["-p", str(profile), "--set", str(old)]]


def nix_store_add(directory: Path) -> Path:
    assert shutil.which("nix-store"), "nix-store is missing: install nix-bin (./dev test does)"
    out = subprocess.run(
        ["nix-store", "--add", str(directory)], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def generations(profile: Path) -> list[str]:
    out = subprocess.run(
        ["nix-env", "-p", str(profile), "--list-generations"],
        check=True,
        capture_output=True,
        text=True,
    )
    return [
        line.split()[0] + (" current" if "(current)" in line else "")
        for line in out.stdout.splitlines()
    ]


async def test_record_activate_rollback_for_real_with_a_nix_profile(tmp_path: Path) -> None:
    """Real store paths and a real profile: the copy-closure-style sequence, then rollback."""
    switches = tmp_path / "switches.log"
    export = tmp_path / "export"
    old = nix_store_add(shims.fake_system(tmp_path / "old" / "a", switches, "old"))
    shims.fake_system(export / "systems" / "a", switches, "new", status="broken")
    profile = tmp_path / "profiles" / "system"
    profile.parent.mkdir()
    subprocess.run(["nix-env", "-p", str(profile), "--set", str(old)], check=True)

    deploy = [
        CommandTemplate(run="nix-store --add {export}/systems/{service}", capture="new"),
        CommandTemplate(run="nix-env -p {system_profile} --set {new}", on=Where.HOST),
        CommandTemplate(run="{new}/bin/switch-to-configuration switch", on=Where.HOST),
    ]
    manifest = manifest_with(f"grep -qx ok {profile}/status")
    plan = plan_full(manifest)
    ctx = Context("dep-4", manifest, plan, export)
    executor = Executor(
        build_runners("real", real_config(profile, deploy=deploy), transport=LocalTransport())
    )
    result = await executor.execute(plan, ctx)

    nix = result.steps["nix:service-config:a"].result
    new = Path(nix.new_system)
    assert nix.previous_system == str(old)
    assert new.parent == Path("/nix/store") and new != old
    assert nix.commands[1] == f"nix-store --add {export}/systems/a"
    assert nix.commands[2] == f"nix-env -p {profile} --set {new}"
    assert result.steps["verify:a"].state is StepState.ROLLED_BACK
    assert switches.read_text() == "new switch\nold switch\n"
    assert profile.resolve() == old
    # generation 1 (old), 2 (new), 3 (old again, current)
    assert generations(profile) == ["1", "2", "3 current"]
