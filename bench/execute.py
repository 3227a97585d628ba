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
"""

from __future__ import annotations

import argparse
import asyncio
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
from runners.base import Context, DeploymentState
from runners.config import RunnerConfig, SimulateConfig
from runners.executor import Executor, critical_path
from runners.outcome import ExecutionResult
from runners.registry import build_runners

GOAL = 1.05


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


async def run_once(manifest: Manifest, plan: Plan, scale: float, parallel: int) -> dict[str, float]:
    runners = build_runners("simulate", RunnerConfig(simulate=SimulateConfig(scale=scale)))
    slots = parallel or len(plan.steps)
    executor = Executor(runners, parallel=slots)
    with tempfile.TemporaryDirectory() as workdir:
        ctx = Context("bench", manifest, plan, Path(workdir), revision="bench")
        start = time.perf_counter()
        result = await executor.execute(plan, ctx)
        makespan = time.perf_counter() - start
    assert result.state is DeploymentState.SUCCEEDED, result.state
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--parallel", type=int, nargs="+", default=[0, 32])
    args = parser.parse_args()

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
