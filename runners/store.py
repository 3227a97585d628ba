"""The state store: deployments, steps, services, locks, deliveries, jobs, approvals, audit.

One schema (SQLAlchemy Core, async) for SQLite (`sqlite+aiosqlite:///...`, the default) and
PostgreSQL (`postgresql+asyncpg://...`). The schema is created on first use and versioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from planner.plan import Plan
from runners.base import DeploymentKind, DeploymentState, Event, StepState, Trigger

SCHEMA_VERSION = 1


class LockBusy(Exception):
    """A service is locked by another holder."""

    def __init__(self, service: str, holder: str, reason: str | None = None) -> None:
        self.service, self.holder, self.reason = service, holder, reason
        because = f" ({reason})" if reason else ""
        super().__init__(f"{service} is locked by {holder}{because}")


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUSED = "refused"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass
class StepRecord:
    id: str
    phase: str
    service: str | None
    state: StepState
    attempt: int = 0
    output: str = ""
    reason: str | None = None
    previous_system: str | None = None
    new_system: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class DeploymentRecord:
    id: str
    kind: DeploymentKind
    trigger: Trigger | str
    state: DeploymentState
    plan: Plan
    digest: str
    requested_by: str | None = None
    approved_by: str | None = None
    base: str | None = None
    head: str | None = None
    scope: str | None = None
    holder: str | None = None
    note: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: list[StepRecord] = field(default_factory=list)


@dataclass
class ServiceRecord:
    name: str
    revision: str | None = None
    system_path: str | None = None
    previous_system: str | None = None
    last_deployment_id: str | None = None
    last_health: str | None = None
    health_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass
class LockRecord:
    service: str
    holder: str
    reason: str | None
    acquired_at: datetime
    expires_at: datetime | None


@dataclass
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    state: JobState
    attempts: int
    worker: str | None = None
    error: str | None = None


@dataclass
class ApprovalRecord:
    id: str
    kind: str
    requested_by: str
    state: ApprovalState
    digest: str
    expires_at: datetime
    service: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None
    channel: str | None = None
    ts: str | None = None
    resolved_by: str | None = None
    created_at: datetime | None = None
    resolved_at: datetime | None = None


@dataclass
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]


class Store:
    """Async access to the state database (skeleton: bodies land next)."""

    @classmethod
    async def open(cls, url: str) -> Store:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def create_deployment(
        self,
        *,
        kind: DeploymentKind,
        trigger: Trigger | str,
        plan: Plan,
        requested_by: str | None = None,
        approved_by: str | None = None,
        base: str | None = None,
        head: str | None = None,
        holder: str | None = None,
        scope: str | None = None,
    ) -> str:
        raise NotImplementedError

    async def set_deployment_state(
        self, deployment_id: str, state: DeploymentState, note: str | None = None
    ) -> None:
        raise NotImplementedError

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        raise NotImplementedError

    async def history(self, service: str | None = None, limit: int = 20) -> list[DeploymentRecord]:
        raise NotImplementedError

    async def record_event(self, event: Event) -> None:
        raise NotImplementedError

    async def services(self) -> dict[str, ServiceRecord]:
        raise NotImplementedError

    async def last_deployed_revision(self) -> str | None:
        raise NotImplementedError

    async def acquire_locks(
        self, services: list[str], holder: str, *, lease: timedelta, wait: float = 0
    ) -> None:
        raise NotImplementedError

    async def renew_locks(self, holder: str, lease: timedelta) -> None:
        raise NotImplementedError

    async def release_locks(self, holder: str) -> None:
        raise NotImplementedError

    async def lock(self, service: str, holder: str, reason: str | None = None) -> None:
        raise NotImplementedError

    async def unlock(self, service: str) -> bool:
        raise NotImplementedError

    async def locks(self) -> list[LockRecord]:
        raise NotImplementedError

    async def recover_interrupted(self) -> list[DeploymentRecord]:
        raise NotImplementedError

    async def record_delivery(self, delivery_id: str) -> bool:
        raise NotImplementedError

    async def enqueue_job(self, kind: str, payload: dict[str, Any]) -> int:
        raise NotImplementedError

    async def claim_job(self, worker: str, *, lease: timedelta) -> Job | None:
        raise NotImplementedError

    async def finish_job(self, job_id: int, error: str | None = None) -> None:
        raise NotImplementedError

    async def create_approval(
        self,
        *,
        kind: str,
        requested_by: str,
        digest: str,
        ttl: timedelta,
        plan: Plan | None = None,
        service: str | None = None,
        args: dict[str, Any] | None = None,
        channel: str | None = None,
        ts: str | None = None,
    ) -> str:
        raise NotImplementedError

    async def get_approval(self, approval_id: str) -> ApprovalRecord | None:
        raise NotImplementedError

    async def resolve_approval(self, approval_id: str, state: ApprovalState, by: str) -> bool:
        raise NotImplementedError

    async def audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        raise NotImplementedError

    async def audit_log(self, limit: int = 50) -> list[AuditRecord]:
        raise NotImplementedError
