"""The state store: opens the database, migrates it, and holds one repository per aggregate.

One schema (SQLAlchemy Core, async) for SQLite (`sqlite+aiosqlite:///...`, the default) and
PostgreSQL (`postgresql+asyncpg://...`), migrated by Alembic at start-up (`state.migrate`).
"""

from __future__ import annotations

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from state.approvals import ApprovalRepository
from state.audit import AuditRepository
from state.base import StoreError
from state.deployments import DeploymentRepository
from state.engine import make_engine, normalize_url
from state.health import HealthRepository
from state.locks import LockRepository
from state.migrate import current_revision, migrate
from state.queue import QueueRepository
from state.services import ServiceRepository
from state.slack_messages import SlackMessageRepository

__all__ = ["SCHEMA_REVISION", "Store", "StoreError"]

SCHEMA_REVISION = "0004"  # the head of state/migrations (a test checks they agree)


class Store:
    """The state database: `store.deployments`, `.services`, `.locks`, `.queue`,
    `.approvals`, `.audit`, `.slack_messages`."""

    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        self.engine = engine
        self.url = url
        self.deployments = DeploymentRepository(engine)
        self.services = ServiceRepository(engine)
        self.locks = LockRepository(engine)
        self.queue = QueueRepository(engine, url)
        self.approvals = ApprovalRepository(engine)
        self.audit = AuditRepository(engine)
        self.slack_messages = SlackMessageRepository(engine)
        self.health = HealthRepository(engine)

    @classmethod
    async def open(cls, url: str) -> Store:
        """Connect, and create or upgrade the schema to this code's revision."""
        parsed = normalize_url(url)
        store = cls(make_engine(parsed), parsed)
        try:
            await migrate(store.engine, store.describe())
        except BaseException:
            await store.engine.dispose()
            raise
        return store

    async def close(self) -> None:
        self.queue.close()
        await self.engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    def describe(self) -> str:
        """The URL without its password, for messages."""
        return self.url.render_as_string(hide_password=True)

    async def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (a cheap query: the health check uses it)."""
        return await current_revision(self.engine)
