"""Database URLs and engines: the async drivers, and SQLite's busy timeout, WAL and
write-locking transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from state.base import StoreError


def normalize_url(url: str) -> URL:
    """Accept `postgres://`, `postgresql://` and `sqlite://` too, with the async drivers."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with its own wording
        raise StoreError(f"invalid database URL {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    if backend in ("postgres", "postgresql"):
        return parsed.set(drivername="postgresql+asyncpg")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise StoreError(
        f"unsupported database {backend!r}: use sqlite+aiosqlite:///FILE or "
        "postgresql+asyncpg://USER@HOST/DB"
    )


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL (None: in memory)."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


class _RollingBackConnection(sqlite3.Connection):
    """A SQLite connection that rolls its transaction back when closed.

    SQLAlchemy closes a connection whose query was cancelled (a task cancelled at shutdown)
    without finishing that query's statement; SQLite then keeps the connection, and its
    write lock, alive until the statement is garbage collected, and every other writer
    waits out the busy timeout. Rolling back first releases the lock at once.
    """

    def close(self) -> None:
        try:
            if self.in_transaction:
                self.rollback()
        finally:
            super().close()


def make_engine(url: URL) -> AsyncEngine:
    """An engine for the URL; SQLite gets a busy timeout, WAL and serialised write transactions."""
    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    path = sqlite_file(url)
    if path is None:
        engine = create_async_engine(url, poolclass=StaticPool)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url, connect_args={"timeout": 30, "factory": _RollingBackConnection}
        )

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # let SQLAlchemy emit BEGIN itself (below), so transactions take the write lock up
        # front: a deferred read transaction upgraded to a write can fail with SQLITE_BUSY
        # at once, without waiting, when another process wrote in between
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if path is not None:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
