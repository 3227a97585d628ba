"""What every repository shares: the engine, the store's error, ids and JSON helpers."""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from planner.plan import Plan

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

Record = TypeVar("Record", bound="DataclassInstance")

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


def json_of(record: DataclassInstance, names: Iterable[str] | None = None) -> dict[str, Any]:
    """A record's attributes `names` (default: its fields, in order) as JSON values:
    datetimes as ISO 8601 text, everything else as it is."""
    keys = _field_names(type(record)) if names is None else names
    return {name: _json_value(getattr(record, name)) for name in keys}


def _json_value(value: object) -> object:
    return iso(value) if isinstance(value, datetime) else value


def new_id() -> str:
    """A fresh random id (deployments, approvals)."""
    return secrets.token_hex(ID_BYTES)


def plan_json(plan: Plan) -> str:
    """A plan as stored."""
    return plan.model_dump_json()


def load_plan(text: str | None) -> Plan:
    """A stored plan (an empty plan when none was stored)."""
    return Plan.model_validate_json(text) if text else Plan()


@functools.cache
def _field_names(cls: type[DataclassInstance]) -> tuple[str, ...]:
    """A dataclass's field names (asked once per class: listings convert many rows)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def record_of(cls: type[Record], row: Any, **converted: object) -> Record:
    """A record dataclass from a row: each field from its column of the same name, except
    those given `converted` (parsed, defaulted or renamed by the caller)."""
    values = {name: getattr(row, name) for name in _field_names(cls) if name not in converted}
    return cls(**values, **converted)
