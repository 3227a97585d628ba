"""Live progress of a deployment on the command line: rich on a terminal, plain lines else."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from planner.plan import Plan
from state.events import (
    DeploymentFinished,
    Event,
    RollbackFinished,
    RollbackStarted,
    StepFinished,
    StepStarted,
    StepState,
)

STATE_MARKS = {
    StepState.SUCCEEDED: "✓",
    StepState.FAILED: "✗",
    StepState.SKIPPED: "-",
    StepState.ROLLED_BACK: "↺",
    StepState.INTERRUPTED: "!",
}


class PlainProgress:
    """One line per transition, for logs and pipes."""

    def __init__(self, out: TextIO, verbose: bool = False) -> None:
        self.out = out
        self.verbose = verbose

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def __call__(self, event: Event) -> None:
        stamp = event.at.astimezone().strftime("%H:%M:%S")
        if isinstance(event, StepStarted):
            self.line(f"{stamp} {event.step.id}: started")
        elif isinstance(event, StepFinished):
            reason = f" ({event.reason})" if event.reason else ""
            self.line(f"{stamp} {event.step.id}: {event.state.value}{reason}")
            if self.verbose and event.result is not None and event.result.output:
                for text in event.result.output.rstrip().splitlines():
                    self.line(f"    {text}")
        elif isinstance(event, RollbackStarted):
            self.line(f"{stamp} {event.service}: rolling back after {event.cause} failed")
        elif isinstance(event, RollbackFinished):
            self.line(f"{stamp} {event.service}: rollback {'done' if event.ok else 'FAILED'}")
        elif isinstance(event, DeploymentFinished):
            self.line(f"{stamp} deployment {event.deployment_id}: {event.state.value}")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class LiveProgress:
    """A rich progress display with one line per step, on a terminal."""

    def __init__(self, out: TextIO, plan: Plan, verbose: bool = False) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=out)
        self.verbose = verbose
        self.progress = Progress(
            SpinnerColumn(finished_text=" "),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.overall = self.progress.add_task(f"0/{len(plan.steps)} steps", total=len(plan.steps))
        self.tasks: dict[str, Any] = {}

    def _task(self, sid: str) -> Any:
        if sid not in self.tasks:
            self.tasks[sid] = self.progress.add_task(f"{sid}: waiting", total=1, start=False)
        return self.tasks[sid]

    async def __call__(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            task = self._task(event.step.id)
            self.progress.start_task(task)
            self.progress.update(task, description=f"{event.step.id}: running")
        elif isinstance(event, StepFinished):
            task = self._task(event.step.id)
            mark = STATE_MARKS.get(event.state, "?")
            reason = f" ({event.reason})" if event.reason else ""
            self.progress.update(
                task,
                description=f"{mark} {event.step.id}: {event.state.value}{reason}",
                completed=1,
            )
            self.progress.stop_task(task)
            self.progress.advance(self.overall)
            done = sum(1 for t in self.progress.tasks if t.id != self.overall and t.finished)
            self.progress.update(self.overall, description=f"{done}/{len(self.tasks)} steps")
            if self.verbose and event.result is not None and event.result.output:
                self.progress.console.print(event.result.output.rstrip(), markup=False)
        elif isinstance(event, RollbackStarted):
            self.progress.console.print(f"↺ rolling {event.service} back ({event.cause} failed)")

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def progress_for(plan: Plan, as_json: bool, verbose: bool) -> PlainProgress | LiveProgress:
    """Live display on a terminal; plain lines otherwise (on stderr when stdout is JSON)."""
    out = sys.stderr if as_json else sys.stdout
    if out.isatty():
        return LiveProgress(out, plan, verbose)
    return PlainProgress(out, verbose)
