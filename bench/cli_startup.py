"""Start-up cost of `nixmox validate` and `nixmox plan FILE` against Python plus Nix alone.

Run: .venv/bin/python bench/cli_startup.py [--runs N] [--manifest PATH]
Times (median of N runs, wall clock, and the child's CPU time) `nixmox validate
manifests/small.nix` and `nixmox plan manifests/small.nix`, and the baseline measured in the
same run: `python -c pass` plus the same `nix-instantiate` evaluation the CLI runs. Prints each
command's ratio to the baseline and its absolute overhead. Goal: each command within 0.4 s.
On a shared machine the wall times move with the load; the CPU times and ratios move less.

The commands run with Python's bytecode cache on, in a private directory (PYTHONPYCACHEPREFIX),
as an installed nixmox runs (pip compiles the package at install; the image does too). A
PYTHONDONTWRITEBYTECODE=1 in the caller's environment (this sandbox sets it) would make every
run compile the whole package from source, about 80 ms that no installation pays;
`--no-bytecode-cache` measures that case.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.source import nix_command  # noqa: E402  (after the path set-up)

DEFAULT_RUNS = 15
GOAL_SECONDS = 0.4
NIXMOX = Path(sys.executable).parent / "nixmox"


@dataclass(frozen=True)
class Timing:
    """Median wall and CPU (user + system) seconds of one command line."""

    wall: float
    cpu: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(
    argv: list[str], runs: int, env: dict[str, str] | None = None, cwd: str | None = None
) -> Timing:
    """Run `argv` `runs` times (after one warm-up run); it must succeed every time."""
    subprocess.run(argv, check=True, capture_output=True, env=env, cwd=cwd)
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(runs):
        cpu, start = children_cpu(), time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env, cwd=cwd)
        walls.append(time.perf_counter() - start)
        cpus.append(children_cpu() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus))


def python_env(pycache: str | None) -> dict[str, str]:
    """The environment of the measured Python commands: bytecode cached in `pycache` (or not)."""
    env = dict(os.environ)
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def nix_alone(manifest: Path, runs: int) -> Timing:
    """The CLI's own evaluation command, with the same scrubbed environment."""
    with tempfile.TemporaryDirectory(prefix="nixmox-bench-") as home:
        argv = nix_command(manifest.resolve(), manifest.resolve().parent)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "NIX_PATH": ""}
        return measure(argv, runs, env=env, cwd=home)


def report(name: str, timing: Timing, baseline: Timing) -> bool:
    """One line per command; True when it is within the goal."""
    ok = timing.wall <= GOAL_SECONDS
    print(
        f"{name:<26} {timing.wall * 1000:7.0f} ms wall ({timing.cpu * 1000:4.0f} ms CPU)  "
        f"x{timing.wall / baseline.wall:4.1f} of baseline  "
        f"+{(timing.wall - baseline.wall) * 1000:4.0f} ms wall "
        f"(+{(timing.cpu - baseline.cpu) * 1000:4.0f} ms CPU)  "
        f"{'within' if ok else 'over'} {GOAL_SECONDS} s"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    parser.add_argument("--manifest", type=Path, default=ROOT / "manifests" / "small.nix")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="compile every module from source on every run (PYTHONDONTWRITEBYTECODE=1)",
    )
    args = parser.parse_args()
    if not NIXMOX.exists():
        sys.exit(f"{NIXMOX} is missing: run ./dev run (or pip install -e .) first")
    with tempfile.TemporaryDirectory(prefix="nixmox-bench-pycache-") as pycache:
        env = python_env(None if args.no_bytecode_cache else pycache)
        return run_all(args.runs, args.manifest, env)


def run_all(runs: int, manifest: Path, env: dict[str, str]) -> int:
    """Measure the baseline and both commands; 0 when both are within the goal."""
    python = measure([sys.executable, "-c", "pass"], runs, env=env)
    nix = nix_alone(manifest, runs)
    baseline = Timing(python.wall + nix.wall, python.cpu + nix.cpu)
    cache = "off" if "PYTHONPYCACHEPREFIX" not in env else "on"
    print(f"runs: {runs} (median), manifest: {manifest.name}, bytecode cache: {cache}")
    for name, timing in (
        ("python -c pass", python),
        ("nix-instantiate", nix),
        ("baseline", baseline),
    ):
        print(f"{name:<26} {timing.wall * 1000:7.0f} ms wall ({timing.cpu * 1000:4.0f} ms CPU)")
    results = [
        report(f"nixmox {command} FILE",
               measure([str(NIXMOX), command, str(manifest)], runs, env=env), baseline)
        for command in ("validate", "plan")
    ]  # fmt: skip
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
