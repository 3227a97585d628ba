"""The background worker: drains the store's job queue, so webhooks only validate and enqueue.

Jobs live in the store (SQLite or PostgreSQL), so work accepted by a webhook survives a restart
and can be taken by any replica. A worker claims a job with a lease; a crashed worker's job is
claimed again once the lease has run out. Handlers are registered per job kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.metrics import Metrics
    from state.queue import DeliveryKey, Job
    from state.store import Store

log = logging.getLogger(__name__)

JobHandler = Callable[[dict[str, Any]], Awaitable[None]]
"""Runs one queued job from its JSON payload."""

DEFAULT_CONCURRENCY = 4
MAX_BATCH = 256
LINGER = 0.005  # at most this long a delivery waits for others to share its commit
DEFAULT_LEASE = timedelta(minutes=5)  # renewed while the job runs; a dead worker's job waits this
MAX_ATTEMPTS = 3  # a job whose worker died this many times is given up, not retried forever
DEFAULT_POLL = 1.0  # other replicas' jobs are noticed this fast; ours wake the worker at once
ERROR_LIMIT = 2000


class UnknownJobKind(Exception):
    """A job of a kind no handler is registered for."""


@dataclass
class _Intake:
    """One webhook delivery waiting to be recorded with its jobs."""

    delivery_id: DeliveryKey
    jobs: list[tuple[str, dict[str, Any]]]
    future: asyncio.Future[bool]


class DeliveryIntake:
    """Records webhook deliveries and queues their jobs, many per transaction (group commit).

    A delivery is acknowledged only once its id and its jobs are committed together, so a
    crash never loses accepted work and a redelivery is recognised. Deliveries that arrive
    while a transaction is being written share the next one: under load, one commit (and
    one fsync) serves dozens of deliveries, which keeps acknowledgements fast. This class
    only forms the batches; each is written by `store.queue.record_deliveries`.
    """

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH, linger: float = LINGER) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger = linger
        self._pending: list[_Intake] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        # requests inside a webhook handler, and how many of them wait for a commit
        self.active = 0
        self.waiting = 0
        self.batches = 0

    def arrive(self) -> None:
        """A webhook request started: the writer may wait a moment for it to submit."""
        self.active += 1

    def leave(self) -> None:
        """That request is done (submitted and answered, or refused)."""
        self.active -= 1
        if self._pending:
            self._wake.set()

    async def submit(
        self, delivery_id: DeliveryKey, jobs: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """Record the delivery and queue its jobs; False for a redelivery (nothing queued)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append(_Intake(delivery_id, jobs, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="nixmox-intake")
        self._wake.set()
        self.waiting += 1
        try:
            return await future
        finally:
            self.waiting -= 1

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)

    async def _write_pending(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._should_linger():
                # group commit: requests still on their way here join this transaction
                # (asyncio.timeout, unlike wait_for, creates no task per wait)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        while self._should_linger():
                            self._wake.clear()
                            await self._wake.wait()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await self._write_batch(batch)

    def _should_linger(self) -> bool:
        return (
            bool(self._pending)
            and self.active > self.waiting
            and len(self._pending) < self.max_batch
        )

    async def _write_batch(self, batch: list[_Intake]) -> None:
        try:
            results = await self.store.queue.record_deliveries(
                [(item.delivery_id, item.jobs) for item in batch]
            )
        except Exception as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        self.batches += 1
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)


def worker_name() -> str:
    """Unique per process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobWorker:
    """Runs queued jobs with up to `concurrency` at once."""

    def __init__(
        self,
        store: Store,
        *,
        metrics: Metrics | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        lease: timedelta = DEFAULT_LEASE,
        poll_interval: float = DEFAULT_POLL,
        name: str | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self.name = name or worker_name()
        self.handlers: dict[str, JobHandler] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.intake = DeliveryIntake(store)

    def register(self, kind: str, handler: JobHandler) -> None:
        if kind in self.handlers:
            raise ValueError(f"a handler for job kind {kind!r} is already registered")
        self.handlers[kind] = handler

    async def enqueue(self, kind: str, payload: dict[str, Any]) -> int:
        """Persist a job, then wake a worker loop (the job is safe once this returns)."""
        if kind not in self.handlers:
            raise UnknownJobKind(kind)
        job_id = await self.store.queue.enqueue(kind, payload)
        self._wake.set()
        return job_id

    async def enqueue_delivery(
        self, delivery_id: DeliveryKey, jobs: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """Record a webhook delivery and queue its jobs atomically (False: seen before)."""
        for kind, _ in jobs:
            if kind not in self.handlers:
                raise UnknownJobKind(kind)
        recorded = await self.intake.submit(delivery_id, jobs)
        if recorded:
            self._wake.set()
        return recorded

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._loop(index), name=f"nixmox-job-worker-{index}")
            for index in range(self.concurrency)
        ]

    async def stop(self) -> None:
        """Stop taking jobs; jobs still running are cancelled (their lease lets others retry)."""
        await self.intake.close()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, index: int) -> None:
        while True:
            try:
                ran = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                # the store itself failed (database down): back off, then try again
                log.exception("job worker %d could not claim a job", index)
                ran = False
                await asyncio.sleep(self.poll_interval)
            if ran:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        job = await self.store.queue.claim(self.name, lease=self.lease)
        if job is None:
            return False
        self._running += 1
        self._idle.clear()
        try:
            await self._run(job)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()
        return True

    async def _run(self, job: Job) -> None:
        handler = self.handlers.get(job.kind)
        started = time.perf_counter()
        error: str | None = None
        if self.metrics is not None:
            self.metrics.jobs_running.inc()
        heartbeat = asyncio.create_task(self._renew(job.id))
        try:
            if handler is None:
                raise UnknownJobKind(job.kind)
            if job.attempts > MAX_ATTEMPTS:
                raise RuntimeError(f"given up after {MAX_ATTEMPTS} attempts (workers died)")
            await handler(job.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
            log.exception("job %s (%s) failed", job.id, job.kind)
        finally:
            heartbeat.cancel()
            if self.metrics is not None:
                self.metrics.jobs_running.dec()
                self.metrics.job_seconds.labels(job.kind).observe(time.perf_counter() - started)
                self.metrics.jobs.labels(job.kind, "failed" if error else "done").inc()
        await self.store.queue.finish(job.id, error)

    async def _renew(self, job_id: int) -> None:
        """Keep the lease of a running job alive (a third of the lease, every time)."""
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.queue.renew(job_id, self.name, self.lease):
                    log.warning("job %s was taken over by another worker", job_id)
                    return
            except Exception:
                log.exception("could not renew the lease of job %s", job_id)

    async def drain(self, timeout: float = 60.0) -> None:
        """Run jobs until the queue is empty and nothing runs (tests and shutdown)."""
        async with asyncio.timeout(timeout):
            while True:
                while await self.run_once():
                    pass
                await self._idle.wait()
                if not await self.run_once() and self._running == 0:
                    return
