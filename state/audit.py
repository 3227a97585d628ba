"""The audit log: who did what, newest first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from state.base import Repository
from state.events import utcnow
from state.schema import audit_log


@dataclass
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]


class AuditRepository(Repository):
    """The audit_log table."""

    async def record(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Append one entry."""
        async with self.engine.begin() as conn:
            await conn.execute(
                audit_log.insert().values(
                    at=utcnow(), actor=actor, action=action, detail=_jsonable(detail)
                )
            )

    async def entries(self, limit: int = 50, *, action: str | None = None) -> list[AuditRecord]:
        """The newest audit entries first, optionally only those of one action."""
        query = audit_log.select().order_by(audit_log.c.id.desc()).limit(limit)
        if action is not None:
            query = query.where(audit_log.c.action == action)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            AuditRecord(row.id, row.at, row.actor, row.action, row.detail or {}) for row in rows
        ]


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    """Audit details may hold enums, paths and datetimes: keep them as JSON text."""
    jsonable: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return jsonable
