"""Step and deployment states and the events an execution emits (shared by runners and state)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from planner.plan import Plan, Step


def utcnow() -> datetime:
    return datetime.now(UTC)


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    ROLLED_BACK = "rolled_back"
    INTERRUPTED = "interrupted"


class DeploymentState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    INTERRUPTED = "interrupted"


class DeploymentKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


class Trigger(StrEnum):
    CLI = "cli"
    MERGE = "merge"
    PR_COMMENT = "pr_comment"
    SLACK = "slack"


FINAL_STEP_STATES = frozenset(
    {
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.SKIPPED,
        StepState.ROLLED_BACK,
        StepState.INTERRUPTED,
    }
)


@dataclass
class StepResult:
    """What a runner reports for one step."""

    ok: bool
    output: str = ""
    previous_system: str | None = None
    new_system: str | None = None
    commands: list[str] = field(default_factory=list)


# Events: every transition of a deployment, received by subscribers in order.


@dataclass(frozen=True)
class Event:
    deployment_id: str
    at: datetime = field(default_factory=utcnow, kw_only=True)


@dataclass(frozen=True)
class DeploymentStarted(Event):
    plan: Plan
    kind: DeploymentKind = DeploymentKind.DEPLOY


@dataclass(frozen=True)
class StepStarted(Event):
    step: Step
    attempt: int = 1


@dataclass(frozen=True)
class StepOutput(Event):
    step_id: str
    text: str


@dataclass(frozen=True)
class StepFinished(Event):
    step: Step
    state: StepState
    result: StepResult | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RollbackStarted(Event):
    service: str
    cause: str


@dataclass(frozen=True)
class RollbackFinished(Event):
    service: str
    ok: bool
    result: StepResult | None = None


@dataclass(frozen=True)
class DeploymentFinished(Event):
    state: DeploymentState
    summary: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], Awaitable[None]]
