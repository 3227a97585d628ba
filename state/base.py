"""What every repository shares: the engine, the store's error, ids and JSON helpers."""

from __future__ import annotations

import secrets
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from planner.plan import Plan

ID_BYTES = 4  # deployment and approval ids: 8 hex characters


class StoreError(Exception):
    """The database cannot be used (bad URL, newer schema)."""


class Repository:
    """One aggregate's tables, reached through the store's engine; each method is one
    short transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine


def iso(value: datetime | None) -> str | None:
    """A datetime as ISO 8601 text, for JSON."""
    return value.isoformat() if value else None


def new_id() -> str:
    """A fresh random id (deployments, approvals)."""
    return secrets.token_hex(ID_BYTES)


def plan_json(plan: Plan) -> str:
    """A plan as stored."""
    return plan.model_dump_json()


def load_plan(text: str | None) -> Plan:
    """A stored plan (an empty plan when none was stored)."""
    return Plan.model_validate_json(text) if text else Plan()
