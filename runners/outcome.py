"""What an execution produced: each step's outcome, the overall state, a recording failure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from planner.plan import Step
from state.events import DeploymentKind, DeploymentState, StepResult, StepState


class RecordingFailed(Exception):
    """The recorder could not persist a transition; the execution stopped."""


@dataclass
class StepOutcome:
    """Where one step ended up."""

    step: Step
    state: StepState = StepState.PENDING
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: StepResult | None = None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.step.id,
            "state": self.state.value,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


@dataclass
class ExecutionResult:
    """The outcome of one execution: per-step outcomes (plan order) and the overall state."""

    deployment_id: str
    kind: DeploymentKind
    state: DeploymentState
    steps: dict[str, StepOutcome]
    started_at: datetime
    finished_at: datetime
    rollbacks: dict[str, StepResult] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.finished_at - self.started_at).total_seconds()

    def states(self) -> dict[str, StepState]:
        return {sid: outcome.state for sid, outcome in self.steps.items()}

    def to_json(self) -> dict[str, Any]:
        """The documented `--json` record of `deploy` and `rollback`."""
        return {
            "id": self.deployment_id,
            "kind": self.kind.value,
            "state": self.state.value,
            "steps": [outcome.to_json() for outcome in self.steps.values()],
        }


def overall_state(outcomes: Iterable[StepOutcome]) -> DeploymentState:
    """failed beats interrupted beats rolled_back beats succeeded."""
    states = {outcome.state for outcome in outcomes}
    if StepState.FAILED in states:
        return DeploymentState.FAILED
    if states & {StepState.INTERRUPTED, StepState.PENDING, StepState.RUNNING}:
        return DeploymentState.INTERRUPTED
    if StepState.ROLLED_BACK in states:
        return DeploymentState.ROLLED_BACK
    return DeploymentState.SUCCEEDED
