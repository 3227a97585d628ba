"""The build scheduler, the build output's path, the parsers of the preview tools, and the
simulated runner's builds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from planner.plan import plan_full
from planner.preview import (
    HostPreview,
    UnitChanges,
    parse_boot_files,
    parse_diff_closures,
    parse_dry_activate,
)
from planner.render import render_markdown
from runners.base import Context
from runners.builds import BuildResult, BuildScheduler, output_path
from runners.config import NixosConfig, RunnerConfig, SimulateConfig
from runners.executor import Executor
from runners.registry import build_runners
from runners.simulate import SimulatedRunner
from state.events import DeploymentState
from tests import nixhosts

NIX_28_JSON = (
    '[{"drvPath":"/nix/store/x9g-nixos-system-a-24.05.drv",'
    '"outputs":{"out":"/nix/store/wq2-nixos-system-a-24.05"}}]'
)


def test_output_path_reads_nix_build_json_or_a_last_line() -> None:
    assert output_path(NIX_28_JSON + "\n") == "/nix/store/wq2-nixos-system-a-24.05"
    assert output_path("copying...\n/nix/store/abc-system\n") == "/nix/store/abc-system"
    assert output_path("") is None
    assert output_path("error: no path here") is None


async def test_scheduler_runs_at_most_build_parallel_builds_at_once() -> None:
    running, peak, release = 0, 0, asyncio.Event()

    async def build(service: str) -> BuildResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return BuildResult(True, f"/nix/store/{service}")

    scheduler = BuildScheduler(build, parallel=2)
    scheduler.start(["a", "b", "c", "d", "e"])
    for _ in range(5):
        await asyncio.sleep(0)
    assert scheduler.started == ["a", "b"] and peak == 2
    release.set()
    results = [await scheduler.result(name) for name in "abcde"]
    assert [r.path for r in results] == [f"/nix/store/{name}" for name in "abcde"]
    assert peak == 2 and scheduler.started == list("abcde")


def test_default_build_and_copy_closure_preset_work_with_nix_2_8() -> None:
    nixos = NixosConfig(preset="copy-closure")  # type: ignore[arg-type]
    assert nixos.builds_first
    assert "--print-out-paths" not in nixos.build_template()
    assert nixos.build_template().startswith("nix build --no-link --json ")
    assert nixos.deploy_commands()[0].run == nixos.build_template()
    assert not NixosConfig().builds_first  # nixos-rebuild builds by itself, as before
    on_host = NixosConfig(preset="copy-closure", build_host="builder.lab")  # type: ignore[arg-type]
    assert "--store ssh-ng://{build_host}" in on_host.build_template()
    assert on_host.copy_template().startswith("nix copy --from ssh-ng://{build_host}")


def test_diff_closures_lines() -> None:
    text = (
        "vaultwarden: 1.30.0 → 1.30.1, \x1b[31;1m+12.3 KiB\x1b[0m\n"
        "openssl: 3.0.1 → ∅, -1024.0 KiB\n"
        "glibc: +16.0 KiB\n"
        "nginx: ∅ → 1.25\n"
        "\n"
        "not a change line\n"
    )
    packages = [(p.name, p.old, p.new, p.size_delta) for p in parse_diff_closures(text)]
    assert packages == [
        ("vaultwarden", "1.30.0", "1.30.1", round(12.3 * 1024)),
        ("openssl", "3.0.1", None, -1024 * 1024),
        ("glibc", None, None, 16 * 1024),
        ("nginx", None, "1.25", None),
    ]


def test_dry_activate_lines_and_boot_files() -> None:
    text = (
        "would stop the following units: a.service, b.service\n"
        "would NOT stop the following changed units: dbus.service\n"
        "would activate the configuration...\n"
        "would restart systemd\n"
        "would reload the following units: nginx.service\n"
        "would restart the following units: vaultwarden.service\n"
        "would start the following units: backup.timer\n"
    )
    units, restart_systemd = parse_dry_activate(text)
    assert units == UnitChanges(
        stop=["a.service", "b.service"],
        not_stopped=["dbus.service"],
        reload=["nginx.service"],
        restart=["vaultwarden.service"],
        start=["backup.timer"],
    )
    assert restart_systemd
    assert parse_boot_files("kernel\t1 2\t1 2\ninitrd\t3 4\t5 6\n")
    assert not parse_boot_files("kernel\t1 2\t1 2\nkernel-params\t\t\n")


def test_tool_output_is_escaped_in_markdown() -> None:
    manifest = nixhosts.manifest(["vaultwarden"])
    plan = plan_full(manifest)
    evil = "x`</details><img src=x>@admin"
    preview = HostPreview(
        current="/nix/store/a",
        new="/nix/store/b",
        units=UnitChanges(restart=[evil]),
        packages=parse_diff_closures(f"{evil}: 1 → 2\n"),
    )
    markdown = "\n\n".join(render_markdown(plan, previews={"vaultwarden": preview}))
    # only inside code spans (which hold no HTML); every `<details>` is closed on its own line
    lines = markdown.splitlines()
    assert [line for line in lines if "<img" in line] == [
        "- ``x`</details><img src=x>@admin 1 → 2``",
        "- restart: ``x`</details><img src=x>@admin``",
    ]
    assert lines.count("</details>") == markdown.count("<details><summary>")


async def test_simulated_builds_run_apart_from_switches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Builds start with the deployment, `build_parallel` at once; a nix step (the switch)
    starts only after its own build is done."""
    manifest = nixhosts.manifest(["forgejo", "nextcloud", "vaultwarden"])
    plan = plan_full(manifest)
    simulate = SimulateConfig(durations={"build": 0.01}, default_duration=0.0)
    runners = build_runners(
        "simulate",
        RunnerConfig(simulate=simulate, nixos=NixosConfig(build_parallel=2)),
    )
    sim = runners.rollback
    assert isinstance(sim, SimulatedRunner) and sim.builds_apart and sim.build_parallel == 2
    log: list[str] = []
    running, peak = 0, 0
    build = sim._build

    async def traced(service: str) -> BuildResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        log.append(f"build {service}")
        result = await build(service)
        running -= 1
        log.append(f"built {service}")
        return result

    activate = sim.hosts.activate

    def switch(service: str, path: str) -> None:
        log.append(f"switch {service}")
        activate(service, path)

    monkeypatch.setattr(sim, "_build", traced)
    monkeypatch.setattr(sim.hosts, "activate", switch)
    ctx = Context("sim-builds", manifest, plan, tmp_path, "rev")
    result = await Executor(runners).execute(plan, ctx)
    assert result.state is DeploymentState.SUCCEEDED
    assert peak == 2
    assert log[:2] == ["build forgejo", "build nextcloud"]  # at once, before any switch
    for name in ("forgejo", "nextcloud", "vaultwarden"):
        assert log.index(f"built {name}") < log.index(f"switch {name}")
    assert sorted(service for service, _ in sim.hosts.activations) == [
        "forgejo",
        "nextcloud",
        "vaultwarden",
    ]
    assert sim.schedulers == {}  # the deployment's builds are finished with it


def test_simulate_duration_build_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--simulate-duration build=SECONDS`: nix steps wait for their simulated builds."""
    from click.testing import CliRunner

    from cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NIXMOX_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/state.db")
    config = tmp_path / "nixmox.toml"
    config.write_text("[runners.nixos]\nbuild_parallel = 1\n")
    small = Path(__file__).resolve().parents[1] / "manifests" / "small.nix"
    result = CliRunner().invoke(
        main,
        ["deploy", str(small), "--runner", "simulate", "--simulate-scale", "0.001",
         "--simulate-duration", "build=5", "--config", str(config), "--json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"state": "succeeded"' in result.output
