"""SQLite's one write lock held by another process: the job claim, a job's end and the
delivery intake wait for it (trying again while the event loop runs), then write once."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from state import bulk_writes, queue
from state.queue import JobState
from state.store import Store

T = TypeVar("T")
LEASE = timedelta(seconds=30)
HELD = 0.05  # seconds the other writer holds the lock (the writes must wait, then succeed)


@pytest.fixture(params=["retried", "asynchronous"])
def path_taken(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`retried`: the lock is let go while the synchronous path tries again; `asynchronous`:
    it tries once only, then the asynchronous engine waits (a lock held for long)."""
    if request.param == "asynchronous":
        monkeypatch.setattr(bulk_writes, "LOCAL_TRIES", 1)
        monkeypatch.setattr(queue, "LOCAL_TRIES", 1)
    return str(request.param)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    yield opened
    await opened.close()


@contextmanager
def other_writer(store: Store) -> Iterator[sqlite3.Connection]:
    """Another process's connection, holding the file's write lock until the block ends."""
    database = store.url.database
    assert database
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder
    finally:
        holder.execute("COMMIT")
        holder.close()


async def written_after_the_lock(store: Store, write: asyncio.Future[T]) -> T:
    """The write is still waiting while the lock is held; it completes once it is let go."""
    with other_writer(store):
        await asyncio.sleep(HELD)
        assert not write.done()
    return await asyncio.wait_for(write, 30)


async def test_a_claim_waits_for_another_writer(store: Store, path_taken: str) -> None:
    job_id = await store.queue.enqueue("work", {"n": 1})
    claim = asyncio.ensure_future(store.queue.claim("w:1:a", lease=LEASE))
    job = await written_after_the_lock(store, claim)
    assert job is not None and job.id == job_id and job.attempts == 1
    assert job.payload == {"n": 1} and job.worker == "w:1:a"
    assert job.lease_until is not None and job.lease_until.tzinfo is not None
    assert await store.queue.claim("w:2:b", lease=LEASE) is None  # taken once


async def test_a_job_end_waits_for_another_writer(store: Store, path_taken: str) -> None:
    job_id = await store.queue.enqueue("work", {})
    assert await store.queue.claim("w:1:a", lease=LEASE)
    await written_after_the_lock(store, asyncio.ensure_future(store.queue.finish(job_id, "boom")))
    job = await store.queue.get(job_id)
    assert job is not None and job.state is JobState.FAILED and job.error == "boom"
    assert job.lease_until is None


async def test_deliveries_wait_for_another_writer(
    store: Store, path_taken: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "state.queue")
    items: list[queue.DeliveryJobs] = [("d-1", [("work", {"n": 1})]), ("d-2", [])]
    record = asyncio.ensure_future(store.queue.record_deliveries(items))
    assert await written_after_the_lock(store, record) == [True, True]
    fell_back = "recording deliveries asynchronously" in caplog.text
    assert fell_back == (path_taken == "asynchronous")
    assert await store.queue.record_deliveries([("d-1", [("work", {"n": 1})])]) == [False]
    job = await store.queue.claim("w:1:a", lease=LEASE)
    assert job is not None and job.payload == {"n": 1}
    assert await store.queue.claim("w:1:a", lease=LEASE) is None
