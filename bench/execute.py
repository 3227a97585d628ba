"""Executor makespan against the plan's critical path, with simulated runners.

Run: .venv/bin/python bench/execute.py [--services 500] [--scale 0.1] [--parallel 0 32]
Plans a generated manifest (500 services by default), then executes it with the simulated
runner (the default per-phase durations times `--scale`: about 15 s in all) once per
`--parallel` value (0: as many slots as steps). Prints, per run, the makespan, the plan's
critical path (the longest chain of nominal durations: no schedule can be shorter), a lower
bound for that many slots (the critical path, or for some step the chain before it plus the
work after it shared by every slot, whichever is longer), and makespan / bound.
Goal: makespan <= 1.05 x critical path with enough parallelism (the `0` row).
The last column is the same ratio against the step durations actually measured (simulated
sleeps overshoot by up to a millisecond on Linux), which isolates the executor's own overhead.

Build case (`--build-services 12`, `--build-parallel 4`): a build takes 60 s and a switch 5 s
(times `--scale`). Builds start with the deployment, `build_parallel` at once; each nix step
waits for its build, then switches. Prints makespan / (the build waves, ceil(hosts /
build_parallel) x 60 s, plus the critical path of everything else with 5 s switches), goal
<= 1.05, and the makespan of the old serial build-and-switch (each nix step 65 s in one).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.models import Manifest
from planner.plan import Plan, Step, plan_full
from planner.synthetic import synthetic_manifest
from runners.base import Context
from runners.config import NixosConfig, RunnerConfig, SimulateConfig
from runners.executor import Executor, critical_path
from runners.outcome import ExecutionResult
from runners.registry import RunnerSet, build_runners
from state.events import DeploymentState

GOAL = 1.05
BUILD_SECONDS, SWITCH_SECONDS = 60.0, 5.0
NIX_PHASE_NAMES = ("nix:core", "nix:service-config")


def lower_bound(plan: Plan, weight: Callable[[Step], float], slots: int) -> float:
    """No schedule on `slots` slots is shorter: the critical path, and for every step, the
    longest chain before it plus the work of it and everything after it, shared by all slots."""
    graph = plan.graph()
    by_id = plan.by_id()
    head: dict[str, float] = {}
    for sid in nx.topological_sort(graph):
        head[sid] = max((head[p] + weight(by_id[p]) for p in graph.predecessors(sid)), default=0.0)
    best = critical_path(plan, weight)
    for sid in graph:
        rest = sum(weight(by_id[d]) for d in nx.descendants(graph, sid)) + weight(by_id[sid])
        best = max(best, head[sid] + rest / slots)
    return best


def measured_critical_path(plan: Plan, result: ExecutionResult) -> float:
    """The critical path with each step's measured duration."""
    spent = {
        sid: (o.finished_at - o.started_at).total_seconds()
        for sid, o in result.steps.items()
        if o.started_at and o.finished_at
    }
    return critical_path(plan, lambda step: spent.get(step.id, 0.0))


async def timed_execution(
    runners: RunnerSet, manifest: Manifest, plan: Plan, slots: int, deployment_id: str
) -> tuple[ExecutionResult, float]:
    """Execute `plan` on `slots` slots; the result (which must succeed) and its makespan."""
    executor = Executor(runners, parallel=slots)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = Context(deployment_id, manifest, plan, Path(workdir), revision="bench")
        start = time.perf_counter()
        result = await executor.execute(plan, ctx)
        makespan = time.perf_counter() - start
    assert result.state is DeploymentState.SUCCEEDED, result.state
    return result, makespan


async def run_once(manifest: Manifest, plan: Plan, scale: float, parallel: int) -> dict[str, float]:
    runners = build_runners("simulate", RunnerConfig(simulate=SimulateConfig(scale=scale)))
    slots = parallel or len(plan.steps)
    result, makespan = await timed_execution(runners, manifest, plan, slots, "bench")
    path = critical_path(plan, runners.estimate)
    bound = lower_bound(plan, runners.estimate, slots)
    return {
        "parallel": parallel,
        "makespan": makespan,
        "critical": path,
        "bound": bound,
        "ratio": makespan / bound,
        "measured": makespan / max(measured_critical_path(plan, result), bound),
    }


async def run_build_case(
    manifest: Manifest, plan: Plan, scale: float, build_parallel: int, parallel: int, *, apart: bool
) -> tuple[float, float]:
    """(makespan, reference): builds apart (reference: build waves + the rest's critical path)
    or the old serial build-and-switch (reference: its critical path)."""
    durations = dict(SimulateConfig().durations)
    nix = SWITCH_SECONDS if apart else BUILD_SECONDS + SWITCH_SECONDS
    durations.update(dict.fromkeys(NIX_PHASE_NAMES, nix))
    if apart:
        durations["build"] = BUILD_SECONDS
    config = RunnerConfig(
        simulate=SimulateConfig(durations=durations, scale=scale),
        nixos=NixosConfig(build_parallel=build_parallel),
    )
    runners = build_runners("simulate", config)
    _, makespan = await timed_execution(runners, manifest, plan, parallel, "bench-builds")
    reference = lower_bound(plan, runners.estimate, parallel)
    if apart:
        hosts = sum(1 for step in plan.steps if str(step.phase) in NIX_PHASE_NAMES)
        reference += math.ceil(hosts / build_parallel) * BUILD_SECONDS * scale
    return makespan, reference


def build_case(services: int, scale: float, build_parallel: int, parallel: int) -> None:
    manifest = Manifest.model_validate(synthetic_manifest(services))
    plan = plan_full(manifest)
    slots = parallel or len(plan.steps)
    case = (manifest, plan, scale, build_parallel, slots)
    new, reference = asyncio.run(run_build_case(*case, apart=True))
    old, _ = asyncio.run(run_build_case(*case, apart=False))
    ratio = new / reference
    verdict = "meets" if ratio <= GOAL else "MISSES"
    print(
        f"build case: {services} services, build {BUILD_SECONDS:g}s, switch {SWITCH_SECONDS:g}s, "
        f"build_parallel {build_parallel}, {slots} steps at once, durations x{scale:g}"
    )
    print(f"  builds first:           makespan {new:8.3f}s, reference {reference:8.3f}s")
    print(f"  old serial build+switch: makespan {old:8.3f}s ({old / new:.2f}x the new one)")
    print(
        f"makespan / (build waves + critical path of the rest) = {ratio:.3f} "
        f"({verdict} the goal <= {GOAL})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--parallel", type=int, nargs="+", default=[0, 32])
    parser.add_argument("--build-services", type=int, default=12, help="0: no build case")
    parser.add_argument("--build-parallel", type=int, default=4)
    parser.add_argument("--build-scale", type=float, default=0.01)
    parser.add_argument("--build-step-parallel", type=int, default=4, help="0: unlimited")
    args = parser.parse_args()
    if args.build_services:
        build_case(
            args.build_services, args.build_scale, args.build_parallel, args.build_step_parallel
        )
    if not args.services:
        return

    manifest = Manifest.model_validate(synthetic_manifest(args.services))
    plan = plan_full(manifest)
    assert plan.ok, plan.errors
    print(
        f"{args.services} services: {len(plan.steps)} steps in {len(plan.waves)} waves; "
        f"simulated durations x{args.scale:g}"
    )
    print(
        f"{'parallel':>9} {'makespan':>9} {'critical':>9} {'bound':>9} {'ratio':>6} {'measured':>9}"
    )
    rows = [asyncio.run(run_once(manifest, plan, args.scale, p)) for p in args.parallel]
    for row in rows:
        slots = "all" if row["parallel"] == 0 else str(int(row["parallel"]))
        print(
            f"{slots:>9} {row['makespan']:8.3f}s {row['critical']:8.3f}s {row['bound']:8.3f}s "
            f"{row['ratio']:6.3f} {row['measured']:9.3f}"
        )
    unlimited = next((row for row in rows if row["parallel"] == 0), None)
    if unlimited is not None:
        verdict = "meets" if unlimited["ratio"] <= GOAL else "MISSES"
        print(f"makespan / critical path = {unlimited['ratio']:.3f} ({verdict} the goal <= {GOAL})")


if __name__ == "__main__":
    main()
