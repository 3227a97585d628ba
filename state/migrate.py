"""Bring a database to the schema of this code with Alembic, at start-up (no alembic.ini).

A database made before Alembic has only the `schema_version` table: at version 2 (the schema
of the first revision) it is stamped with that revision; at version 1 the first revision
adopts it (creates what is missing). Then every later revision runs, in one transaction.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from state.base import StoreError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INITIAL_REVISION = "0001"  # the schema of schema_version 2, the last one before Alembic
LEGACY_STAMPED = 2  # a pre-Alembic database at this version is stamped INITIAL_REVISION
LEGACY_KNOWN = 2  # the newest schema_version that nixmox before Alembic wrote
MIGRATION_LOCK = 0x6E69786D  # PostgreSQL advisory lock: one migrating process at a time
NEWER_SCHEMA = (
    "the database {where} has schema version {found}, newer than this nixmox ({head}): "
    "upgrade nixmox"
)


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """The Alembic configuration of our migrations; env.py uses `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this code's schema is at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "state/migrations has no revisions"
    return head


async def migrate(engine: AsyncEngine, where: str) -> None:
    """Upgrade the database to head; StoreError if it is newer than this code."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, where)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None: not under Alembic)."""
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


def _upgrade(conn: sa.Connection, where: str) -> None:
    if conn.dialect.name == "postgresql":
        # processes starting together: the others wait, then find the schema at head
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    config = alembic_config(conn)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    current = MigrationContext.configure(conn).get_current_heads()
    known = {revision.revision for revision in script.walk_revisions()}
    for found in current:
        if found not in known:
            raise StoreError(NEWER_SCHEMA.format(where=where, found=found, head=head))
    if not current:
        legacy = _legacy_version(conn)
        if legacy is not None and legacy > LEGACY_KNOWN:
            raise StoreError(NEWER_SCHEMA.format(where=where, found=legacy, head=head))
        if legacy == LEGACY_STAMPED:
            command.stamp(config, INITIAL_REVISION)
    command.upgrade(config, "head")


def _legacy_version(conn: sa.Connection) -> int | None:
    """The pre-Alembic schema_version of the database (None: no such table or no row)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return None
    found = conn.execute(sa.text("SELECT MAX(version) FROM schema_version")).scalar()
    return int(found) if found is not None else None
