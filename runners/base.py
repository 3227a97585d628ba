"""The runner interface; the states and events it uses live in `state.events`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from planner.models import Manifest
from planner.plan import Plan, Step
from state.events import StepResult

__all__ = ["Context", "RollbackRunner", "Runner"]


@dataclass
class Context:
    """Everything a runner needs to act on one step of one deployment."""

    deployment_id: str
    manifest: Manifest
    plan: Plan
    workdir: Path
    revision: str | None = None
    dry_run: bool = False
    # previous system paths recorded by the nixos runner, per service (for rollback)
    previous_systems: dict[str, str] = field(default_factory=dict)


class Runner(Protocol):
    """Runs the steps of one or more phases."""

    async def run(self, step: Step, ctx: Context) -> StepResult: ...


class RollbackRunner(Runner, Protocol):
    async def rollback(self, service: str, ctx: Context) -> StepResult: ...
