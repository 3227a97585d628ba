"""The runner interface; the states and events it uses live in `state.events`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from planner.models import Manifest
from planner.plan import Plan, Step

# re-exported: runners and front ends name these through runners.base
from state.events import (
    FINAL_STEP_STATES,
    DeploymentFinished,
    DeploymentKind,
    DeploymentStarted,
    DeploymentState,
    Event,
    RollbackFinished,
    RollbackStarted,
    StepFinished,
    StepOutput,
    StepResult,
    StepStarted,
    StepState,
    Subscriber,
    Trigger,
    utcnow,
)

__all__ = [
    "FINAL_STEP_STATES",
    "Context",
    "DeploymentFinished",
    "DeploymentKind",
    "DeploymentStarted",
    "DeploymentState",
    "Event",
    "RollbackFinished",
    "RollbackRunner",
    "RollbackStarted",
    "Runner",
    "StepFinished",
    "StepOutput",
    "StepResult",
    "StepStarted",
    "StepState",
    "Subscriber",
    "Trigger",
    "utcnow",
]


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
