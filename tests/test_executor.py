"""Executor semantics with the simulated runner: waves, parallelism, skips, rollback, events."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from planner.models import Manifest
from planner.plan import Phase, Plan, Step, finalize, plan_full
from runners.base import Context
from runners.config import RunnerConfig, SimulateConfig
from runners.executor import Executor, critical_path
from runners.outcome import RecordingFailed
from runners.registry import build_runners
from runners.simulate import SimulatedRunner, system_path
from state import events
from state.events import DeploymentKind, DeploymentState, StepResult, StepState
from tests.fixtures_manifests import HEALTH, lab_manifest


def small_manifest() -> Manifest:
    """postgresql <- a <- b, and c on its own."""
    return lab_manifest(
        {
            "a": {"ip": "10.20.0.3", "depends_on": ["postgresql"], "interface": HEALTH},
            "b": {"ip": "10.20.0.4", "depends_on": ["a"], "interface": HEALTH},
            "c": {"ip": "10.20.0.5", "interface": HEALTH},
        },
        core={"postgresql": {"ip": "10.20.0.2", "interface": HEALTH}},
    )


def context(plan: Plan, manifest: Manifest, tmp_path: Path, rev: str = "rev1") -> Context:
    return Context("dep-1", manifest, plan, tmp_path, revision=rev)


def simulated(seconds: float = 0.02, fail: list[str] | None = None, **extra: Any):
    config = RunnerConfig(
        simulate=SimulateConfig(durations={}, default_duration=seconds, fail=fail or [], **extra)
    )
    return build_runners("simulate", config)


class Recorder:
    """A subscriber that keeps every event it receives."""

    def __init__(self) -> None:
        self.events: list[events.Event] = []

    async def __call__(self, event: events.Event) -> None:
        self.events.append(event)

    def finished(self) -> dict[str, events.StepFinished]:
        return {e.step.id: e for e in self.events if isinstance(e, events.StepFinished)}


async def test_all_steps_succeed_in_dependency_order(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    recorder = Recorder()
    executor = Executor(simulated(), parallel=4, subscribers=[recorder])
    result = await executor.execute(plan, context(plan, manifest, tmp_path))

    assert result.state is DeploymentState.SUCCEEDED
    assert set(result.states().values()) == {StepState.SUCCEEDED}
    for step in plan.steps:
        outcome = result.steps[step.id]
        for need in step.needs:
            assert result.steps[need].finished_at <= outcome.started_at, (need, step.id)
    assert isinstance(recorder.events[0], events.DeploymentStarted)
    assert isinstance(recorder.events[-1], events.DeploymentFinished)
    assert recorder.events[-1].state is DeploymentState.SUCCEEDED
    started = [e.step.id for e in recorder.events if isinstance(e, events.StepStarted)]
    assert sorted(started) == sorted(step.id for step in plan.steps)
    assert result.to_json()["steps"][0] == {
        "id": "tf:infra",
        "state": "succeeded",
        "started_at": result.steps["tf:infra"].started_at.isoformat(),
        "finished_at": result.steps["tf:infra"].finished_at.isoformat(),
    }


async def test_independent_steps_run_in_parallel_up_to_the_limit(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    for parallel, expected_max in ((1, 1), (4, 2)):
        executor = Executor(simulated(0.05), parallel=parallel)
        result = await executor.execute(plan, context(plan, manifest, tmp_path))
        spans = [(o.started_at, o.finished_at) for o in result.steps.values()]
        most = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
        assert most == expected_max, parallel
    # the second wave (postgresql and c) overlapped when allowed
    pg, c = result.steps["nix:core:postgresql"], result.steps["nix:service-config:c"]
    assert pg.started_at < c.finished_at and c.started_at < pg.finished_at


async def test_a_failure_skips_its_dependents_and_unrelated_branches_finish(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    recorder = Recorder()
    runners = simulated(fail=["nix:service-config:a"])
    executor = Executor(runners, auto_rollback=False, subscribers=[recorder])
    result = await executor.execute(plan, context(plan, manifest, tmp_path))

    states = result.states()
    assert states["nix:service-config:a"] is StepState.FAILED
    for skipped in ("verify:a", "nix:service-config:b", "verify:b"):
        assert states[skipped] is StepState.SKIPPED
        assert result.steps[skipped].reason == "needs nix:service-config:a, which failed"
        assert result.steps[skipped].started_at is None
    for ok in ("tf:infra", "nix:core:postgresql", "verify:postgresql", "verify:c"):
        assert states[ok] is StepState.SUCCEEDED
    assert result.state is DeploymentState.FAILED
    assert recorder.finished()["verify:b"].state is StepState.SKIPPED
    assert not [e for e in recorder.events if isinstance(e, events.RollbackStarted)]


async def test_failed_verify_rolls_the_service_back_and_re_verifies(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    recorder = Recorder()
    runners = simulated(fail=["verify:a"])
    sim = runners.rollback
    assert isinstance(sim, SimulatedRunner)
    ctx = context(plan, manifest, tmp_path)
    result = await Executor(runners, subscribers=[recorder]).execute(plan, ctx)

    before, deployed = system_path("a", "initial"), system_path("a", "rev1")
    assert result.steps["verify:a"].state is StepState.ROLLED_BACK
    assert result.steps["verify:a"].reason == f"a rolled back to {before} after verify:a failed"
    assert result.steps["nix:service-config:a"].result.previous_system == before
    assert result.steps["nix:service-config:a"].result.new_system == deployed
    assert ctx.previous_systems["a"] == before
    # activated the new system, then the recorded one again
    assert [path for svc, path in sim.hosts.activations if svc == "a"] == [deployed, before]
    assert sim.hosts.running["a"] == before
    assert result.states()["nix:service-config:b"] is StepState.SKIPPED
    assert result.states()["verify:c"] is StepState.SUCCEEDED
    assert result.state is DeploymentState.ROLLED_BACK
    assert result.rollbacks["a"].ok
    kinds = [
        type(e)
        for e in recorder.events
        if isinstance(e, events.RollbackStarted | events.RollbackFinished)
    ]
    assert kinds == [events.RollbackStarted, events.RollbackFinished]
    rollback_at = next(
        i for i, e in enumerate(recorder.events) if isinstance(e, events.RollbackStarted)
    )
    verify_done = next(
        i
        for i, e in enumerate(recorder.events)
        if isinstance(e, events.StepFinished) and e.step.id == "verify:a"
    )
    assert rollback_at < verify_done


async def test_nix_step_failing_before_activation_fails_without_rolling_back(
    tmp_path: Path,
) -> None:
    """A build error leaves the host on its recorded system: the step fails (not rolled back)
    and keeps its own error, with a note that nothing changed."""
    manifest = small_manifest()
    plan = plan_full(manifest)
    runners = simulated(fail=["nix:service-config:c"])
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    initial = system_path("c", "initial")
    outcome = result.steps["nix:service-config:c"]
    assert outcome.state is StepState.FAILED
    assert outcome.reason == (
        f"simulated failure of nix:service-config:c; nothing was changed on c: it still runs "
        f"{initial}"
    )
    assert runners.rollback.hosts.current("c") == initial
    assert result.steps["verify:c"].state is StepState.SKIPPED
    assert result.state is DeploymentState.FAILED


async def test_failed_verify_rolls_the_activated_system_back(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    runners = simulated(fail=["verify:c"])
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    assert result.steps["verify:c"].state is StepState.ROLLED_BACK
    assert result.rollbacks["c"].new_system == system_path("c", "initial")
    assert runners.rollback.hosts.current("c") == system_path("c", "initial")


class UnreachableRunner:
    """A nix runner whose host cannot be read: it fails before recording anything."""

    async def run(self, step: Step, ctx: Context) -> StepResult:
        return StepResult(False, "ssh: connect to host 10.0.0.9 port 22: No route to host")

    def commands(self, step: Step, ctx: Context) -> list[str]:
        return []

    def estimate(self, step: Step) -> float:
        return 0.0


async def test_a_failed_rollback_leaves_the_step_failed(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    runners = simulated(fail=["verify:a"], fail_rollback=["a"])
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    assert result.steps["verify:a"].state is StepState.FAILED
    assert result.steps["verify:a"].reason == (
        "simulated failure of verify:a; rollback of a failed: simulated rollback failure of a"
    )
    assert result.state is DeploymentState.FAILED


async def test_verify_without_a_recorded_system_cannot_roll_back(tmp_path: Path) -> None:
    manifest = small_manifest()
    full = plan_full(manifest)
    verify_only = finalize({"verify:c": full.by_id()["verify:c"].model_copy(update={"needs": []})})
    runners = simulated(fail=["verify:c"])
    result = await Executor(runners).execute(verify_only, context(verify_only, manifest, tmp_path))
    assert result.steps["verify:c"].state is StepState.FAILED
    assert result.steps["verify:c"].reason == (
        "simulated failure of verify:c; no recorded previous system for c: cannot roll back"
    )


async def test_an_unreachable_host_keeps_its_error_as_the_reason(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    simulation = simulated()
    unreachable = {**simulation.by_phase, Phase.NIX_SERVICE_CONFIG: UnreachableRunner()}
    runners = replace(simulation, by_phase=unreachable)
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    assert result.steps["nix:service-config:c"].state is StepState.FAILED
    assert result.steps["nix:service-config:c"].reason == (
        "ssh: connect to host 10.0.0.9 port 22: No route to host; "
        "no recorded previous system for c: cannot roll back"
    )


async def test_subscribers_that_raise_or_hang_do_not_break_the_deployment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)

    async def raises(event: events.Event) -> None:
        raise RuntimeError("notifier down")

    async def hangs(event: events.Event) -> None:
        await asyncio.sleep(3600)

    recorder = Recorder()
    executor = Executor(
        simulated(0.005),
        subscribers=[raises, hangs, recorder],
        subscriber_timeout=0.05,
        drain_timeout=0.3,
    )
    result = await asyncio.wait_for(
        executor.execute(plan, context(plan, manifest, tmp_path)), timeout=10
    )
    assert result.state is DeploymentState.SUCCEEDED
    # the healthy subscriber got every event, in order, ending with the deployment's end
    assert isinstance(recorder.events[-1], events.DeploymentFinished)
    assert len(recorder.finished()) == len(plan.steps)
    assert "notifier down" in caplog.text


async def test_longest_remaining_chain_goes_first(tmp_path: Path) -> None:
    """With one slot, the head of the long chain starts before the short independent steps."""
    steps = {
        "a:short": Step(id="a:short", phase=Phase.VERIFY, service="a"),
        "b:short": Step(id="b:short", phase=Phase.VERIFY, service="b"),
        "z:1": Step(id="z:1", phase=Phase.VERIFY, service="z"),
        "z:2": Step(id="z:2", phase=Phase.VERIFY, service="z", needs=["z:1"]),
        "z:3": Step(id="z:3", phase=Phase.VERIFY, service="z", needs=["z:2"]),
    }
    plan = finalize(steps)
    result = await Executor(simulated(0.01), parallel=1).execute(
        plan, context(plan, small_manifest(), tmp_path)
    )
    first = min(result.steps.values(), key=lambda o: o.started_at)
    assert first.step.id == "z:1"


async def test_explicit_rollback_activates_targets_and_re_verifies(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    runners = simulated()
    sim = runners.rollback
    executor = Executor(runners)
    await executor.execute(plan, context(plan, manifest, tmp_path))
    target = system_path("a", "older")
    ctx = context(plan, manifest, tmp_path)
    assert executor.rollback_dry_run(["a"], ctx, {"a": target}) == [
        ("nix:service-config:a", [f"simulate rollback a to {target}"]),
        ("verify:a", ["simulate verify:a (0.02s)"]),
    ]
    result = await executor.rollback_services(["a"], ctx, {"a": target})
    assert result.kind is DeploymentKind.ROLLBACK
    assert result.state is DeploymentState.SUCCEEDED
    assert list(result.states()) == ["nix:service-config:a", "verify:a"]
    assert sim.hosts.running["a"] == target
    assert result.steps["nix:service-config:a"].result.previous_system == system_path("a", "rev1")
    with pytest.raises(ValueError, match="no system to roll back to for: b"):
        await executor.rollback_services(["b"], ctx, {})


def test_dry_run_lists_every_step_with_its_commands(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    lines = Executor(simulated(0.5)).dry_run(plan, context(plan, manifest, tmp_path))
    assert [sid for sid, _ in lines] == [sid for wave in plan.waves for sid in wave]
    assert lines[0] == ("tf:infra", ["simulate tf:infra (0.5s)"])


def test_critical_path_is_the_longest_weighted_chain() -> None:
    plan = plan_full(small_manifest())
    # tf:infra -> nix pg -> verify pg -> nix a -> verify a -> nix b -> verify b
    assert critical_path(plan, lambda step: 1.0) == 7.0


async def test_a_slow_subscriber_does_not_hold_the_deployment_back(tmp_path: Path) -> None:
    """The slow subscriber is blocked until every step has finished, then gets all events."""
    manifest = small_manifest()
    plan = plan_full(manifest)
    gate = asyncio.Event()
    finished: set[str] = set()
    slow_seen: list[events.Event] = []

    async def slow(event: events.Event) -> None:
        await gate.wait()
        slow_seen.append(event)

    async def fast(event: events.Event) -> None:
        if isinstance(event, events.StepFinished):
            finished.add(event.step.id)
            if len(finished) == len(plan.steps):
                gate.set()

    recorder = Recorder()
    executor = Executor(simulated(0.005), subscribers=[slow, fast, recorder])
    result = await executor.execute(plan, context(plan, manifest, tmp_path))
    assert result.state is DeploymentState.SUCCEEDED
    assert gate.is_set()
    assert slow_seen == recorder.events  # same events, same order


async def test_cancelling_an_execution_marks_unfinished_steps_interrupted(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    recorder = Recorder()
    executor = Executor(simulated(10.0), subscribers=[recorder])
    task = asyncio.create_task(executor.execute(plan, context(plan, manifest, tmp_path)))
    while not any(isinstance(e, events.StepStarted) for e in recorder.events):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    final = recorder.events[-1]
    assert (
        isinstance(final, events.DeploymentFinished) and final.state is DeploymentState.INTERRUPTED
    )
    assert recorder.finished()["tf:infra"].state is StepState.INTERRUPTED


async def test_a_runner_that_raises_fails_only_its_step(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    runners = simulated()

    class Broken:
        async def run(self, step: Step, ctx: Context) -> None:
            raise RuntimeError("boom")

    runners.by_phase = {**runners.by_phase, Phase.TF_INFRA: Broken()}
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    assert result.steps["tf:infra"].state is StepState.FAILED
    assert result.steps["tf:infra"].reason == "runner error: boom"
    assert all(o.state is StepState.SKIPPED for sid, o in result.steps.items() if sid != "tf:infra")

    no_verify = simulated()
    no_verify.by_phase = {p: r for p, r in no_verify.by_phase.items() if p is not Phase.VERIFY}
    result = await Executor(no_verify, auto_rollback=False).execute(
        plan, context(plan, manifest, tmp_path)
    )
    assert result.steps["verify:c"].state is StepState.FAILED
    assert result.steps["verify:c"].reason == (
        "runner error: no runner configured for phase verify"
    )
    assert result.steps["nix:service-config:c"].state is StepState.SUCCEEDED


async def test_the_recorder_writes_each_event_before_it_goes_on(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    recorded: list[events.Event] = []
    out_of_order: list[events.Event] = []

    async def recorder(event: events.Event) -> None:
        await asyncio.sleep(0.001)  # a write takes time; the executor waits for it
        recorded.append(event)

    async def notifier(event: events.Event) -> None:
        if event not in recorded:
            out_of_order.append(event)

    executor = Executor(simulated(0.001), recorder=recorder, subscribers=[notifier])
    result = await executor.execute(plan, context(plan, manifest, tmp_path))
    assert result.state is DeploymentState.SUCCEEDED
    assert out_of_order == []  # notifiers only ever hear about recorded transitions
    assert isinstance(recorded[-1], events.DeploymentFinished)
    finished = {e.step.id for e in recorded if isinstance(e, events.StepFinished)}
    assert finished == {step.id for step in plan.steps}


async def test_a_recorder_that_fails_stops_the_execution(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = plan_full(manifest)
    notified = Recorder()

    async def recorder(event: events.Event) -> None:
        if isinstance(event, events.StepFinished) and event.step.id == "tf:infra":
            raise OSError("disk full")

    executor = Executor(simulated(0.001), recorder=recorder, subscribers=[notified])
    with pytest.raises(RecordingFailed, match="disk full"):
        await executor.execute(plan, context(plan, manifest, tmp_path))
    started = {e.step.id for e in notified.events if isinstance(e, events.StepStarted)}
    assert started == {"tf:infra"}  # nothing ran after the unrecorded transition
    final = notified.events[-1]
    assert (
        isinstance(final, events.DeploymentFinished) and final.state is DeploymentState.INTERRUPTED
    )


def core_change_plan(manifest: Manifest) -> Plan:
    """A diff plan for postgresql's own change: redeploy and verify it, re-verify a and b."""
    by_id = plan_full(manifest).by_id()
    return finalize(
        {
            "nix:core:postgresql": by_id["nix:core:postgresql"].model_copy(update={"needs": []}),
            "verify:postgresql": by_id["verify:postgresql"],
            "verify:a": by_id["verify:a"].model_copy(update={"needs": ["verify:postgresql"]}),
            "verify:b": by_id["verify:b"].model_copy(update={"needs": ["verify:a"]}),
        }
    )


class BrokenByNewPostgres:
    """A verify runner for which `a` fails while postgresql runs the newly deployed system."""

    def __init__(self, sim: SimulatedRunner, broken: str) -> None:
        self.sim = sim
        self.broken = broken
        self.verified: list[str] = []

    async def run(self, step: Step, ctx: Context) -> StepResult:
        self.verified.append(step.id)
        if step.service == "a" and self.sim.hosts.current("postgresql") == self.broken:
            return StepResult(False, "a: cannot talk to postgresql")
        return await self.sim.run(step, ctx)

    def commands(self, step: Step, ctx: Context) -> list[str]:
        return self.sim.commands(step, ctx)

    def estimate(self, step: Step) -> float:
        return 0.0


async def test_failed_dependent_verify_rolls_back_the_redeployed_upstream(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = core_change_plan(manifest)
    simulation = simulated()
    sim = simulation.rollback
    assert isinstance(sim, SimulatedRunner)
    before, deployed = system_path("postgresql", "initial"), system_path("postgresql", "rev1")
    verify = BrokenByNewPostgres(sim, deployed)
    runners = replace(simulation, by_phase={**simulation.by_phase, Phase.VERIFY: verify})
    recorder = Recorder()
    result = await Executor(runners, subscribers=[recorder]).execute(
        plan, context(plan, manifest, tmp_path)
    )

    assert [path for svc, path in sim.hosts.activations if svc == "postgresql"] == [
        deployed,
        before,
    ]
    assert sim.hosts.running["postgresql"] == before
    # the failing verify ran, then postgresql and a were re-verified after the rollback
    assert verify.verified == ["verify:postgresql", "verify:a", "verify:postgresql", "verify:a"]
    outcome = result.steps["verify:a"]
    assert outcome.state is StepState.ROLLED_BACK
    assert outcome.reason == (
        f"postgresql rolled back to {before}: verify:a failed after its redeploy"
    )
    assert result.states()["nix:core:postgresql"] is StepState.SUCCEEDED
    assert result.states()["verify:postgresql"] is StepState.SUCCEEDED
    assert result.states()["verify:b"] is StepState.SKIPPED
    assert result.state is DeploymentState.ROLLED_BACK
    assert result.rollbacks["postgresql"].ok
    rollbacks = [
        e
        for e in recorder.events
        if isinstance(e, events.RollbackStarted | events.RollbackFinished)
    ]
    assert [type(e) for e in rollbacks] == [events.RollbackStarted, events.RollbackFinished]
    assert rollbacks[0].service == "postgresql"


async def test_dependent_still_failing_after_the_upstream_rollback_fails(tmp_path: Path) -> None:
    manifest = small_manifest()
    plan = core_change_plan(manifest)
    runners = simulated(fail=["verify:a"])  # fails whatever postgresql runs
    result = await Executor(runners).execute(plan, context(plan, manifest, tmp_path))
    before = system_path("postgresql", "initial")
    assert runners.rollback.hosts.running["postgresql"] == before
    outcome = result.steps["verify:a"]
    assert outcome.state is StepState.FAILED
    assert outcome.reason == (
        f"simulated failure of verify:a; postgresql rolled back to {before}, but verify:a still "
        "failed: simulated failure of verify:a"
    )
    assert result.state is DeploymentState.FAILED
