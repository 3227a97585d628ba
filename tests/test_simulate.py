"""The simulated runner: per-phase durations, requested failures, observable system paths."""

from __future__ import annotations

from pathlib import Path

from planner.plan import Phase, Step, plan_full
from runners.base import Context
from runners.config import SimulateConfig
from runners.registry import RunnerKind, build_runners
from runners.simulate import SimulatedRunner, system_path
from tests.test_executor import small_manifest


def ctx(tmp_path: Path, rev: str = "r2") -> Context:
    manifest = small_manifest()
    return Context("d", manifest, plan_full(manifest), tmp_path, revision=rev)


def test_durations_per_phase_times_the_scale() -> None:
    sim = SimulatedRunner(SimulateConfig(durations={"verify": 2.0}, default_duration=5, scale=0.1))
    assert sim.duration(Step(id="verify:a", phase=Phase.VERIFY, service="a")) == 0.2
    assert sim.duration(Step(id="tf:infra", phase=Phase.TF_INFRA)) == 0.5
    runners = build_runners(RunnerKind.SIMULATE)
    assert runners.kind is RunnerKind.SIMULATE
    assert runners.estimate(Step(id="tf:infra", phase=Phase.TF_INFRA)) == 2.0


async def test_nix_steps_record_and_activate_systems_and_rollback_restores(tmp_path: Path) -> None:
    sim = SimulatedRunner(SimulateConfig(default_duration=0, durations={}))
    context = ctx(tmp_path)
    sim.hosts.running["a"] = system_path("a", "r1")  # what the store says it runs
    step = Step(id="nix:service-config:a", phase=Phase.NIX_SERVICE_CONFIG, service="a")
    result = await sim.run(step, context)
    assert (result.previous_system, result.new_system) == (
        system_path("a", "r1"),
        system_path("a", "r2"),
    )
    assert context.previous_systems == {"a": system_path("a", "r1")}
    back = await sim.rollback("a", context)
    assert back.ok and sim.hosts.running["a"] == system_path("a", "r1")
    assert sim.hosts.activations == [("a", system_path("a", "r2")), ("a", system_path("a", "r1"))]


async def test_requested_failures_and_their_cure_by_rollback(tmp_path: Path) -> None:
    sim = SimulatedRunner(
        SimulateConfig(default_duration=0, durations={}, fail=["verify:a", "tf:infra"])
    )
    context = ctx(tmp_path)
    infra = await sim.run(Step(id="tf:infra", phase=Phase.TF_INFRA), context)
    assert not infra.ok and infra.output == "simulated failure of tf:infra"
    verify = Step(id="verify:a", phase=Phase.VERIFY, service="a")
    await sim.run(
        Step(id="nix:service-config:a", phase=Phase.NIX_SERVICE_CONFIG, service="a"), context
    )
    assert not (await sim.run(verify, context)).ok
    assert (await sim.rollback("a", context)).ok
    assert (await sim.run(verify, context)).ok
    assert not (await sim.rollback("b", context)).ok  # nothing recorded for b
