"""Alembic environment: run on the connection the store hands over (the normal path, see
`state.migrate`), or, for the `alembic` command line, on an async engine for sqlalchemy.url."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context

from state.engine import make_engine, normalize_url
from state.schema import metadata


def run_on(connection: sa.Connection) -> None:
    """Run the pending revisions on a connection (inside its transaction)."""
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_from_url(url: str) -> None:
    """Open an async engine for `url` and migrate through it."""
    engine = make_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(run_on)
    finally:
        await engine.dispose()


def main() -> None:
    """Pick the connection: the store's, or one made from the configured URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    if not url:
        raise SystemExit("set sqlalchemy.url (the state database URL) to run migrations")
    asyncio.run(run_from_url(url))


main()
