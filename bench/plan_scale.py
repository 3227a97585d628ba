"""Plan time against Nix evaluation time for generated manifests of 500, 2,000 and 5,000 services.

Run: .venv/bin/python bench/plan_scale.py
Prints, per size, the Nix evaluation time (the baseline, measured in the same run), the time to
parse, validate and plan after evaluation, and their ratio. Goal: planning cost beyond Nix
evaluation stays small (total latency <= 1.2 x evaluation).
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

from planner.plan import plan_full
from planner.source import evaluate_nix, parse_manifest
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


def measure_full(size: int, workdir: Path) -> dict[str, float]:
    """Evaluation time, plan-after-evaluation time and their ratio for one size."""
    path = workdir / f"manifest-{size}.nix"
    path.write_text(to_nix(synthetic_manifest(size)))
    eval_time, data = best_of(lambda: evaluate_nix(path))
    plan_time, plan = best_of(lambda: plan_full(parse_manifest(data)))
    assert plan.ok and len(plan.steps) > size, "the generated manifest must plan"
    return {
        "services": size,
        "steps": len(plan.steps),
        "eval_s": eval_time,
        "plan_s": plan_time,
        "plan_over_eval": plan_time / eval_time,
        "latency_over_eval": (eval_time + plan_time) / eval_time,
    }


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


if __name__ == "__main__":
    main()
