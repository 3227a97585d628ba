"""Fast recovery and side effects once: reclaiming a dead process's jobs, job effects, markers,
Slack replay keys pruned, LISTEN/NOTIFY wake-ups (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest

from bot.jobs import (
    DEFAULT_LEASE,
    REPLAY_WINDOW,
    JobWorker,
    current_job,
    holder_alive,
    pid_alive,
)
from state.events import utcnow
from state.queue import JobState
from state.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres_database")
    opened = await Store.open(url)
    yield opened
    await opened.close()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def test_leases_are_short() -> None:
    assert timedelta(seconds=30) == DEFAULT_LEASE


async def test_a_dead_local_process_jobs_are_reclaimed_at_once(store: Store) -> None:
    host = socket.gethostname()
    ran: list[str] = []

    async def work(payload: dict[str, Any]) -> None:
        ran.append(payload["who"])

    worker = JobWorker(store, name=f"{host}:{os.getpid()}:abcdef")
    worker.register("work", work)
    for who in ("dead", "alive", "elsewhere"):
        await worker.enqueue("work", {"who": who})
    lease = timedelta(minutes=10)
    dead = await store.queue.claim(f"{host}:{dead_pid()}:000001", lease=lease)
    alive = await store.queue.claim(f"{host}:1:000002", lease=lease)  # pid 1 always runs
    other = await store.queue.claim(f"not-{host}:{dead_pid()}:000003", lease=lease)
    assert dead and alive and other
    assert not await worker.run_once()  # all three are leased for ten minutes
    assert await worker.sweep() == [dead.id]
    assert await worker.run_once()
    assert not await worker.run_once()
    assert ran == ["dead"]
    job = await store.queue.get(dead.id)
    assert job is not None and job.state is JobState.DONE and job.attempts == 2


async def test_jobs_of_an_earlier_process_with_this_pid_are_reclaimed_at_once(
    store: Store,
) -> None:
    """A container restarted with the same pid 1: the old names carry another nonce."""
    host = socket.gethostname()
    worker = JobWorker(store)
    sibling = JobWorker(store)  # another worker of this very process is alive
    worker.register("work", lambda payload: asyncio.sleep(0))
    assert worker.name.split(":")[:2] == [host, str(os.getpid())]
    for who in ("earlier", "sibling"):
        await worker.enqueue("work", {"who": who})
    lease = timedelta(minutes=10)
    earlier = await store.queue.claim(f"{host}:{os.getpid()}:0ld0ne", lease=lease)
    running = await store.queue.claim(sibling.name, lease=lease)
    assert earlier and running
    assert await worker.reclaim() == [earlier.id]
    assert holder_alive(os.getpid(), sibling.name.split(":")[2])
    assert not holder_alive(os.getpid(), "0ld0ne")


async def test_job_effects_are_recorded_once(store: Store) -> None:
    job_id = await store.queue.enqueue("work", {})
    assert await store.queue.effect(job_id, "comment-1") is None
    assert await store.queue.record_effect(job_id, "comment-1", "1234.5678")
    assert not await store.queue.record_effect(job_id, "comment-1", "other")
    assert await store.queue.effect(job_id, "comment-1") == "1234.5678"


async def test_a_rerun_job_sees_what_its_first_attempt_did(store: Store) -> None:
    seen: list[tuple[bool, str | None]] = []

    async def work(payload: dict[str, Any]) -> None:
        job = current_job.get()
        assert job is not None
        step = job.next_step("message")
        seen.append((job.rerun, await job.effect(step)))
        await job.record(step, "ts-1")

    worker = JobWorker(store, name="w")
    worker.register("work", work)
    job_id = await worker.enqueue("work", {})
    first = await store.queue.claim("dying", lease=timedelta(0))
    assert first is not None and first.id == job_id
    await store.queue.record_effect(job_id, "message-1", "ts-0")  # what the dead attempt did
    assert await worker.run_once()
    assert seen == [(True, "ts-0")]
    assert current_job.get() is None


async def test_old_slack_replay_keys_are_pruned_by_the_sweep(store: Store) -> None:
    assert await store.queue.record_delivery("slack:1:v0=old")
    assert await store.queue.record_delivery("gh-delivery")
    pruned = await store.queue.prune_deliveries("slack:", utcnow() + timedelta(seconds=1))
    assert pruned == 1
    assert await store.queue.record_delivery("slack:1:v0=old")  # forgotten
    assert not await store.queue.record_delivery("gh-delivery")  # GitHub ids are kept
    await JobWorker(store).sweep()  # keys inside the window stay
    assert not await store.queue.record_delivery("slack:1:v0=old")
    assert timedelta(minutes=5) == REPLAY_WINDOW


async def test_a_worker_wakes_on_notify_from_another_process(postgres_database: str) -> None:
    """Queued through a second store (another replica's connection): LISTEN wakes the worker
    long before its 60 s poll."""
    ours, theirs = await Store.open(postgres_database), await Store.open(postgres_database)
    done = asyncio.Event()

    async def work(payload: dict[str, Any]) -> None:
        done.set()

    worker = JobWorker(ours, poll_interval=60)
    worker.register("work", work)
    worker.start()
    try:
        await asyncio.sleep(1.0)  # the LISTEN connection is up, the first polls are done
        await theirs.queue.enqueue("work", {})
        await asyncio.wait_for(done.wait(), 20)
    finally:
        await worker.stop()
        await ours.close()
        await theirs.close()
