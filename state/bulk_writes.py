"""Fast bulk writes for the store's busiest path (webhook deliveries and their jobs).

Private to `state.queue`, which owns the intake and decides what is written; this module
only knows how to write many rows cheaply: INSERTs compiled once and run as one driver
`executemany`, and a synchronous SQLite connection used straight from the event loop.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa


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
    every request the loop is serving. A short busy timeout means a database held by
    another writer is never waited for here (`SqliteBusy`: the caller takes the async path).
    """

    BUSY_TIMEOUT = 0.05

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
