"""The background job worker over the real store (SQLite): order, failures, leases, crashes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.jobs import MAX_ATTEMPTS, JobWorker, UnknownJobKind
from bot.metrics import Metrics
from state.queue import JobState
from state.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    opened = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}")
    yield opened
    await opened.close()


async def test_jobs_run_in_order_and_failures_are_recorded(store: Store) -> None:
    ran: list[int] = []

    async def work(payload: dict[str, Any]) -> None:
        if payload["n"] == 2:
            raise RuntimeError("two is broken")
        ran.append(payload["n"])

    metrics = Metrics()
    worker = JobWorker(store, metrics=metrics, name="w1")
    worker.register("work", work)
    ids = [await worker.enqueue("work", {"n": n}) for n in (1, 2, 3)]
    await worker.drain()
    assert ran == [1, 3]
    states = [(await store.queue.get(i)).state for i in ids]
    assert states == [JobState.DONE, JobState.FAILED, JobState.DONE]
    assert "two is broken" in (await store.queue.get(ids[1])).error
    assert metrics.jobs.labels("work", "failed")._value.get() == 1


async def test_unknown_kinds_are_refused_when_enqueued(store: Store) -> None:
    worker = JobWorker(store)
    with pytest.raises(UnknownJobKind):
        await worker.enqueue("nope", {})


async def test_a_running_worker_picks_up_new_jobs_at_once(store: Store) -> None:
    done = asyncio.Event()

    async def work(payload: dict[str, Any]) -> None:
        done.set()

    worker = JobWorker(store, poll_interval=30)
    worker.register("work", work)
    worker.start()
    try:
        await worker.enqueue("work", {})
        await asyncio.wait_for(done.wait(), 5)  # far sooner than the 30 s poll
    finally:
        await worker.stop()


async def test_a_dead_workers_job_is_taken_over_after_its_lease(store: Store) -> None:
    ran: list[str] = []

    async def work(payload: dict[str, Any]) -> None:
        ran.append(payload["what"])

    worker = JobWorker(store, name="survivor")
    worker.register("work", work)
    job_id = await worker.enqueue("work", {"what": "plan"})
    claimed = await store.queue.claim("dead-worker", lease=timedelta(milliseconds=50))
    assert claimed is not None and claimed.id == job_id
    assert not await worker.run_once()  # leased to the dead worker
    await asyncio.sleep(0.1)
    assert await worker.run_once()
    assert ran == ["plan"]
    assert (await store.queue.get(job_id)).state is JobState.DONE


async def test_a_live_job_keeps_its_lease(store: Store) -> None:
    release = asyncio.Event()

    async def slow(payload: dict[str, Any]) -> None:
        await release.wait()

    busy = JobWorker(store, lease=timedelta(milliseconds=150), name="busy")
    busy.register("slow", slow)
    other = JobWorker(store, lease=timedelta(milliseconds=150), name="other")
    other.register("slow", slow)
    await busy.enqueue("slow", {})
    running = asyncio.create_task(busy.run_once())
    await asyncio.sleep(0.5)  # several leases long: renewed meanwhile
    assert not await other.run_once()
    release.set()
    assert await running


async def test_a_job_whose_workers_keep_dying_is_given_up(store: Store) -> None:
    ran: list[int] = []

    async def work(payload: dict[str, Any]) -> None:
        ran.append(1)

    worker = JobWorker(store, name="last")
    worker.register("work", work)
    job_id = await worker.enqueue("work", {})
    for _ in range(MAX_ATTEMPTS):
        assert await store.queue.claim("dying", lease=timedelta(0)) is not None
    assert await worker.run_once()
    assert ran == []
    job = await store.queue.get(job_id)
    assert job.state is JobState.FAILED and "given up" in job.error


async def _intake_cases(store: Store) -> None:
    """Shared by both backends: batching, duplicates, and jobs the store reads back."""
    worker = JobWorker(store, name="intake")

    async def noop(payload: dict[str, Any]) -> None:
        return None

    worker.register("work", noop)
    results = await asyncio.gather(
        *(worker.enqueue_delivery(f"d-{n % 40}", [("work", {"n": n})]) for n in range(50))
    )
    # 40 distinct ids: the first of each is recorded, later ones in the same burst are not
    assert results == [True] * 40 + [False] * 10
    assert worker.intake.batches < 50  # they shared transactions
    assert await worker.enqueue_delivery("d-3", [("work", {"n": 99})]) is False
    assert await store.queue.record_delivery("d-7") is False  # the store sees them too
    claimed = []
    while (job := await store.queue.claim("reader", lease=timedelta(minutes=1))) is not None:
        claimed.append(job)
    assert sorted(job.payload["n"] for job in claimed) == list(range(40))
    assert all(job.kind == "work" and job.state is JobState.RUNNING for job in claimed)
    await worker.stop()


async def test_intake_records_deliveries_and_jobs_together_sqlite(store: Store) -> None:
    await _intake_cases(store)


async def test_intake_on_postgresql(postgres_database: str) -> None:
    store = await Store.open(postgres_database)
    try:
        await _intake_cases(store)
    finally:
        await store.close()


async def test_intake_waits_when_another_writer_holds_sqlite(tmp_path: Path) -> None:
    """The fast path does not block the loop on a busy file: the async path waits instead."""
    import sqlite3

    path = tmp_path / "busy.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    worker = JobWorker(store)

    async def noop(payload: dict[str, Any]) -> None:
        return None

    worker.register("work", noop)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process is writing
    pending = asyncio.create_task(worker.enqueue_delivery("busy-1", [("work", {})]))
    await asyncio.sleep(0.3)
    assert not pending.done()
    other.execute("COMMIT")
    assert await asyncio.wait_for(pending, 30) is True
    other.close()
    await worker.stop()
    await store.close()
