"""Approvals: a pending request for one plan digest, approved, refused, cancelled or expired."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import IntegrityError

from planner.plan import Plan
from state.base import Repository, StoreError, load_plan, new_id, plan_json, record_of
from state.events import utcnow
from state.schema import approvals

PLANNED_DIGEST = "planned_digest"  # args key: the rules' plan a completed plan replaced


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUSED = "refused"


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
    deployment_id: str | None = None  # set once, when an approved request starts deploying

    @property
    def expired(self) -> bool:
        return self.expires_at <= utcnow()

    def plans_digests(self) -> set[str]:
        """The digest of its plan, and of the plan its previews completed (if they did)."""
        planned = self.args.get(PLANNED_DIGEST)
        return {self.digest, planned} if isinstance(planned, str) else {self.digest}


class ApprovalRepository(Repository):
    """The approvals table; every change of state is one conditional update."""

    async def create(
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
        """A pending approval for one plan digest, expiring after `ttl`."""
        now = utcnow()
        for _ in range(5):
            fresh = new_id()
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        approvals.insert().values(
                            id=fresh,
                            kind=kind,
                            requested_by=requested_by,
                            service=service,
                            args=args or {},
                            digest=digest,
                            plan=plan_json(plan) if plan is not None else None,
                            channel=channel,
                            ts=ts,
                            state=str(ApprovalState.PENDING),
                            created_at=now,
                            expires_at=now + ttl,
                        )
                    )
                return fresh
            except IntegrityError:
                continue
        raise StoreError("could not allocate an approval id")

    async def set_message(self, approval_id: str, channel: str, ts: str) -> None:
        """Remember the chat message that shows the approval, to update it later."""
        async with self.engine.begin() as conn:
            await conn.execute(
                approvals.update()
                .where(approvals.c.id == approval_id)
                .values(channel=channel, ts=ts)
            )

    async def complete_plan(self, approval_id: str, digest: str, plan: Plan) -> bool:
        """Replace a pending approval's plan (still of digest `digest`) by `plan`, completed
        from the head's builds; `args["planned_digest"]` keeps the digest it replaced."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    approvals.select().where(
                        approvals.c.id == approval_id,
                        approvals.c.state == str(ApprovalState.PENDING),
                        approvals.c.digest == digest,
                    )
                )
            ).first()
            if row is None:
                return False
            result = await conn.execute(
                approvals.update()
                .where(
                    approvals.c.id == approval_id,
                    approvals.c.state == str(ApprovalState.PENDING),
                    approvals.c.digest == digest,
                )
                .values(
                    digest=plan.digest,
                    plan=plan_json(plan),
                    args={**dict(row.args or {}), PLANNED_DIGEST: digest},
                )
            )
        return result.rowcount == 1

    async def get(self, approval_id: str) -> ApprovalRecord | None:
        """One approval by id."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(approvals.select().where(approvals.c.id == approval_id))
            ).first()
        return _approval(row) if row is not None else None

    async def resolve(self, approval_id: str, state: ApprovalState | str, by: str) -> bool:
        """Move a pending approval to `state`, atomically; approving needs it unexpired."""
        state = ApprovalState(state)
        now = utcnow()
        conditions = [
            approvals.c.id == approval_id,
            approvals.c.state == str(ApprovalState.PENDING),
        ]
        if state in (ApprovalState.APPROVED, ApprovalState.REFUSED):
            conditions.append(approvals.c.expires_at > now)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                approvals.update()
                .where(*conditions)
                .values(state=str(state), resolved_by=by, resolved_at=now)
            )
        return result.rowcount == 1

    async def expire(self) -> list[ApprovalRecord]:
        """Mark pending approvals past their expiry `expired`; return them (to update messages)."""
        now = utcnow()
        async with self.engine.begin() as conn:
            rows = (
                await conn.execute(
                    approvals.select().where(
                        approvals.c.state == str(ApprovalState.PENDING),
                        approvals.c.expires_at <= now,
                    )
                )
            ).all()
            expired: list[ApprovalRecord] = []
            for row in rows:
                result = await conn.execute(
                    approvals.update()
                    .where(
                        approvals.c.id == row.id,
                        approvals.c.state == str(ApprovalState.PENDING),
                    )
                    .values(state=str(ApprovalState.EXPIRED), resolved_at=now)
                )
                if result.rowcount == 1:
                    record = _approval(row)
                    record.state, record.resolved_at = ApprovalState.EXPIRED, now
                    expired.append(record)
        return expired

    async def claim_for_deployment(
        self, approval_id: str, deployment_id: str, *, replacing: str | None = None
    ) -> bool:
        """Record the deployment of an approved request, once; True only for the one claimer.

        `replacing` swaps the caller's own earlier claim (a placeholder taken before the
        deployment had an id) for the real id.
        """
        claimed = (
            approvals.c.deployment_id.is_(None)
            if replacing is None
            else approvals.c.deployment_id == replacing
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(
                approvals.update()
                .where(
                    approvals.c.id == approval_id,
                    approvals.c.state == str(ApprovalState.APPROVED),
                    claimed,
                )
                .values(deployment_id=deployment_id)
            )
        return result.rowcount == 1


def _approval(row: Any) -> ApprovalRecord:
    return record_of(
        ApprovalRecord,
        row,
        state=ApprovalState(row.state),
        args=dict(row.args or {}),
        plan=load_plan(row.plan) if row.plan else None,
    )
