"""Fast bulk writes for the store's busiest path (webhook deliveries and their jobs).

Private to `state.queue`, which owns the intake and decides what is written; this module
only knows how to write many rows cheaply: INSERTs compiled once and run as one driver
`executemany`, and synchronous SQLite connections used straight from the event loop (the
delivery intake's, and `LocalEngine` for the jobs' claims and ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

# a busy SQLite file is tried again every millisecond, at most this many times
LOCAL_RETRY = 0.001
LOCAL_TRIES = 200


class SqliteBusy(Exception):
    """The SQLite file is held by another writer (nothing was written): use the async engine."""


class PreparedInsert:
    """An INSERT compiled once for a dialect and run as one driver `executemany`.

    The values go through the columns' own bind processors (so they are stored exactly as
    the store's SQLAlchemy types store them), but without SQLAlchemy's per-row statement
    machinery, which costs several times more than the database itself for small rows.
    """

    def __init__(self, table: sa.Table, columns: list[str], dialect: sa.Dialect) -> None:
        statement = table.insert().values({name: sa.bindparam(name) for name in columns})
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        order = list(compiled.positiontup or [])
        self.positional = bool(order)
        self.names = order or columns
        index = {name: columns.index(name) for name in columns}
        self.indexes = [index[name] for name in self.names]
        self.processors = [
            table.c[name].type._cached_bind_processor(dialect) for name in self.names
        ]

    def rows(self, values: list[tuple[Any, ...]]) -> list[Any]:
        """Driver parameters; a value repeated in every row (the batch's time) is bound once."""
        columns: list[list[Any]] = []
        for index, process in zip(self.indexes, self.processors, strict=True):
            column = [row[index] for row in values]
            if process is not None:
                first = column[0]
                if all(value is first for value in column):
                    column = [process(first)] * len(column)
                else:
                    column = [process(value) for value in column]
            columns.append(column)
        if self.positional:
            return list(zip(*columns, strict=True))
        return [dict(zip(self.names, row, strict=True)) for row in zip(*columns, strict=True)]

    async def run(self, conn: Any, values: list[tuple[Any, ...]]) -> None:
        """On an async SQLAlchemy connection (inside its transaction)."""
        if values:
            await conn.exec_driver_sql(self.sql, self.rows(values))

    def run_now(self, cursor: sqlite3.Cursor, values: list[tuple[Any, ...]]) -> None:
        """On a `LocalSqlite` cursor (inside its transaction)."""
        if values:
            cursor.executemany(self.sql, self.rows(values))


class LocalSqlite:
    """A synchronous connection to a SQLite file, used from the event loop.

    With SQLite, a batch of deliveries commits in about a millisecond; doing it right here
    is cheaper than handing it to aiosqlite's thread, whose competition for the GIL slows
    every request the loop is serving. No busy timeout: a database held by another writer
    is never waited for here, since SQLite's busy handler would sleep with the event loop
    blocked, and the writer holding the lock may be a job of this very loop (`SqliteBusy`:
    the caller tries again after yielding to the loop).
    """

    BUSY_TIMEOUT = 0.0

    def __init__(self, path: str) -> None:
        # autocommit mode: BEGIN IMMEDIATE / COMMIT are ours, so the write lock is taken
        # up front and a busy database fails at once instead of mid-transaction
        self.connection = sqlite3.connect(
            path, timeout=self.BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        # WAL (set by the store's engine) + NORMAL: a commit is durable across crashes and
        # restarts of the bot (the OS has it); only a power cut can lose the last
        # acknowledged deliveries, which GitHub can redeliver. It saves an fsync per batch.
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.dialect = sa.create_engine("sqlite://").dialect

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; SqliteBusy when busy."""
        cursor = self.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            yield cursor
            cursor.execute("COMMIT")
        except BaseException as exc:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise SqliteBusy(str(exc)) from exc
            raise
        finally:
            cursor.close()

    def close(self) -> None:
        self.connection.close()


class LocalEngine:
    """A synchronous SQLAlchemy engine on a SQLite file, for one-statement writes from the loop.

    Through aiosqlite, a transaction holds SQLite's one write lock from its BEGIN to its
    COMMIT across several trips between the loop and the driver's thread; on a busy loop
    (a worker running jobs) that is many milliseconds, during which the web's deliveries
    wait. Here each write is a single statement in autocommit mode: the lock is held only
    while SQLite itself runs it (SQLAlchemy's own work happens before and after), and a busy
    file is tried again after yielding to the loop, never waited for with the loop blocked.
    """

    def __init__(self, path: Path) -> None:
        self.engine = sa.create_engine(
            f"sqlite:///{path}", connect_args={"timeout": 0, "check_same_thread": False}
        ).execution_options(isolation_level="AUTOCOMMIT")
        sa_event.listen(self.engine, "connect", _local_connection)

    async def write(
        self, statement: sa.Executable, params: dict[str, Any] | None = None
    ) -> list[sa.Row[Any]] | None:
        """Run one statement (its own transaction); its rows (RETURNING), or None when the
        file stayed busy (the caller takes the asynchronous path, which waits). A statement
        built once with bind parameters costs SQLAlchemy least."""
        for _ in range(LOCAL_TRIES):
            try:
                with self.engine.connect() as conn:
                    result = conn.execute(statement, params)
                    return list(result.all()) if result.returns_rows else []
            except sa.exc.OperationalError as exc:
                if not _busy(exc):
                    raise
            await asyncio.sleep(LOCAL_RETRY)
        return None

    def close(self) -> None:
        self.engine.dispose()


def _local_connection(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")  # as LocalSqlite, for the same reason
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _busy(exc: sa.exc.OperationalError) -> bool:
    """SQLite refused the write lock (another writer holds it): nothing was done."""
    text = str(exc.orig).lower()
    return "locked" in text or "busy" in text
