"""Plan time against Nix evaluation time for generated manifests of 500, 2,000 and 5,000 services.

Run: .venv/bin/python bench/plan_scale.py
Prints, per size, the Nix evaluation time (the baseline, measured in the same run), the time to
parse, validate and plan after evaluation, and their ratio. Goal: planning cost beyond Nix
evaluation stays small (total latency <= 1.2 x evaluation).

The diff case plans a one-service change between two Git revisions with `plan_revisions`
(export, evaluate, diff, plan): with the base revision already in the evaluation cache (as a bot
has it after planning the previous push: one Nix evaluation) and cold (two evaluations). Its
ratios are against one and two evaluations of the same manifest measured in the same run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.perf import gc_paused
from planner.plan import plan_full
from planner.revisions import plan_revisions
from planner.source import EvalCache, evaluate_nix, parse_manifest
from planner.synthetic import synthetic_manifest, to_nix

SIZES = (500, 2000, 5000)
REPEAT = 3


def best_of(func: Callable[[], Any], repeat: int = REPEAT) -> tuple[float, Any]:
    """Median wall time of `repeat` runs, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def plan_paused(manifest: Any) -> Any:
    """`plan_full` as the entry points call it: with the cyclic GC paused (planner.perf)."""
    with gc_paused():
        return plan_full(manifest)


def measure_full(size: int, workdir: Path) -> dict[str, float]:
    """Evaluation time, plan-after-evaluation time and their ratio for one size."""
    path = workdir / f"manifest-{size}.nix"
    path.write_text(to_nix(synthetic_manifest(size)))
    eval_time, data = best_of(lambda: evaluate_nix(path))
    plan_time, plan = best_of(lambda: plan_paused(parse_manifest(data)))
    assert plan.ok and len(plan.steps) > size, "the generated manifest must plan"
    return {
        "services": size,
        "steps": len(plan.steps),
        "eval_s": eval_time,
        "plan_s": plan_time,
        "plan_over_eval": plan_time / eval_time,
        "latency_over_eval": (eval_time + plan_time) / eval_time,
    }


DIFF_MANIFEST = "nixos/service-manifest.nix"


def diff_repo(size: int, workdir: Path) -> tuple[Path, str, str]:
    """A Git repository whose head changes one application's proxy upstream."""
    import git

    data = synthetic_manifest(size)
    repo_dir = workdir / f"repo-{size}"
    (repo_dir / "nixos").mkdir(parents=True)
    repo = git.Repo.init(repo_dir)
    with repo.config_writer() as config:
        config.set_value("user", "name", "bench")
        config.set_value("user", "email", "bench@example.invalid")
    manifest = repo_dir / DIFF_MANIFEST
    manifest.write_text(to_nix(data))
    repo.git.add("--all")
    repo.git.commit("-q", "-m", "base")
    base = repo.head.commit.hexsha
    app = data["services"][f"app{size // 2:05d}"]
    app["interface"]["proxy"]["upstream"] = app["interface"]["proxy"]["upstream"] + "1"
    manifest.write_text(to_nix(data))
    repo.git.commit("-q", "-am", "head")
    return repo_dir, base, repo.head.commit.hexsha


def measure_diff(size: int, workdir: Path) -> dict[str, float]:
    """Diff-plan latency, base cached and cold, against Nix evaluation time of the same file."""
    repo_dir, base, head = diff_repo(size, workdir)
    eval_time, _ = best_of(lambda: evaluate_nix(repo_dir / DIFF_MANIFEST, repo_dir))

    def cached() -> float:
        cache = EvalCache()
        plan_revisions(repo_dir, base, base, cache=cache)  # the base, planned earlier as a head
        start = time.perf_counter()
        plan = plan_revisions(repo_dir, base, head, cache=cache)
        elapsed = time.perf_counter() - start
        assert plan.ok and len(plan.steps) == 2, [s.id for s in plan.steps]
        return elapsed

    cached_time = statistics.median(cached() for _ in range(REPEAT))
    cold_time, plan = best_of(lambda: plan_revisions(repo_dir, base, head, cache=EvalCache()))
    assert plan.ok and len(plan.steps) == 2
    return {
        "services": size,
        "eval_s": eval_time,
        "cached_s": cached_time,
        "cold_s": cold_time,
        "cached_over_1_eval": cached_time / eval_time,
        "cold_over_2_evals": cold_time / (2 * eval_time),
    }


def print_diff_table(workdir: Path) -> None:
    print()
    print("diff plan (one service changes), plan_revisions latency:")
    print(
        f"{'services':>8} {'nix eval s':>10} {'cached s':>9} {'cold s':>8} "
        f"{'cached/1 eval':>13} {'cold/2 evals':>12}"
    )
    for size in SIZES:
        row = measure_diff(size, workdir)
        print(
            f"{row['services']:>8} {row['eval_s']:>10.3f} {row['cached_s']:>9.3f} "
            f"{row['cold_s']:>8.3f} {row['cached_over_1_eval']:>13.2f} "
            f"{row['cold_over_2_evals']:>12.2f}"
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(
            f"{'services':>8} {'steps':>6} {'nix eval s':>10} {'plan s':>8} "
            f"{'plan/eval':>9} {'latency/eval':>12}"
        )
        for size in SIZES:
            row = measure_full(size, Path(tmp))
            print(
                f"{row['services']:>8} {row['steps']:>6} {row['eval_s']:>10.3f} "
                f"{row['plan_s']:>8.3f} {row['plan_over_eval']:>9.2f} "
                f"{row['latency_over_eval']:>12.2f}"
            )
        print_diff_table(Path(tmp))


if __name__ == "__main__":
    main()
