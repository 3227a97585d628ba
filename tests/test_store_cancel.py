"""A SQLite store whose query is cancelled mid-transaction (a job worker stopped at shutdown)
leaves the database unlocked for the other writers."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from state.store import Store

# about a second of SQLite work whose one row is left unread when the query is cancelled
SLOW_QUERY = sa.text(
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
    "SELECT max(x) FROM c"
)
WAIT_FOR_LOCK = 20.0  # the store's own busy timeout is 30 s: a leaked lock fails here


async def test_a_query_cancelled_mid_transaction_releases_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    started = asyncio.Event()

    def before_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "RECURSIVE" in statement:
            started.set()

    event.listen(store.engine.sync_engine, "before_cursor_execute", before_execute)

    async def slow_transaction() -> None:
        async with store.engine.begin() as conn:  # BEGIN IMMEDIATE: holds the write lock
            await conn.execute(SLOW_QUERY)

    task = asyncio.create_task(slow_transaction())
    await started.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()

    other = sqlite3.connect(
        path, timeout=WAIT_FOR_LOCK, isolation_level=None, check_same_thread=False
    )
    try:
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")  # another writer gets in
        other.execute("ROLLBACK")
    finally:
        other.close()
        await store.close()
