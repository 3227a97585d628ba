"""Services: what each one runs (revision, system) and its last health."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from state.base import Repository, json_of, record_of
from state.events import utcnow
from state.schema import services


class Health(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


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

    def to_json(self) -> dict[str, Any]:
        return json_of(self)


async def upsert_service(conn: AsyncConnection, name: str, **values: Any) -> None:
    """Update a service's row, or insert it (inside the caller's transaction)."""
    result = await conn.execute(services.update().where(services.c.name == name).values(**values))
    if result.rowcount == 0:
        try:
            async with conn.begin_nested():
                await conn.execute(services.insert().values(name=name, **values))
        except IntegrityError:
            await conn.execute(services.update().where(services.c.name == name).values(**values))


async def set_health_in(
    conn: AsyncConnection, service: str, health: Health | str, at: datetime
) -> None:
    """Record a service's health (inside the caller's transaction)."""
    await upsert_service(conn, service, last_health=str(health), health_at=at)


class ServiceRepository(Repository):
    """The services table."""

    async def set_health(
        self, service: str, health: Health | str, at: datetime | None = None
    ) -> None:
        """Record the result of a live health check (`nixmox status --check`, `nixmox health`)
        that ran `at` (default: now)."""
        async with self.engine.begin() as conn:
            await set_health_in(conn, service, health, at or utcnow())

    async def all(self) -> dict[str, ServiceRecord]:
        """Every service the store knows, by name."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(services.select().order_by(services.c.name))).all()
        return {row.name: record_of(ServiceRecord, row) for row in rows}
