"""The background worker: drains the store's job queue, so webhooks only validate and enqueue.

Jobs live in the store (SQLite or PostgreSQL), so work accepted by a webhook survives a restart
and can be taken by any replica. A worker claims a job with a short lease (30 s, renewed every
10 s while it runs); a crashed worker's job is claimed again once the lease has run out, or at
once when the crashed process was on this host (its pid is gone). On PostgreSQL a worker
LISTENs for new jobs (`state.queue.JOBS_CHANNEL`) and polls only as the fallback. Handlers are
registered per job kind; while one runs, `current_job` is its `JobContext`, through which its
side effects (comments, messages, deployments) are marked so a re-run does not repeat them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from state.events import utcnow

if TYPE_CHECKING:
    from bot.metrics import Metrics
    from state.queue import DeliveryKey, Job
    from state.store import Store
from deployments.periodic import repeat_forever

log = logging.getLogger(__name__)

JobHandler = Callable[[dict[str, Any]], Awaitable[None]]
"""Runs one queued job from its JSON payload."""

DEFAULT_CONCURRENCY = 4
MAX_BATCH = 256
LINGER = 0.005  # at most this long a delivery waits for others to share its commit
DEFAULT_LEASE = timedelta(seconds=30)  # renewed every third of it while the job runs
MAX_ATTEMPTS = 3  # a job whose worker died this many times is given up, not retried forever
RECLAIM_INTERVAL = 2.0  # seconds between looks for the jobs of this host's dead processes
DEFAULT_POLL = 1.0  # other replicas' jobs are noticed this fast; ours wake the worker at once
ERROR_LIMIT = 2000
# Slack replay keys (`slack:<ts>:<sig>`) outlive Slack's 5-minute signature window for nothing
SLACK_REPLAY_PREFIX = "slack:"
REPLAY_WINDOW = timedelta(minutes=5)
LISTEN_RETRY = 5.0  # seconds between attempts to (re)open the LISTEN connection


@dataclass
class JobContext:
    """The job a handler runs: its id, whether this is a re-run, and its side effects."""

    id: int
    attempts: int
    store: Store
    _counts: dict[str, int] = field(default_factory=dict)

    @property
    def rerun(self) -> bool:
        """A previous attempt's worker died: its side effects may have happened."""
        return self.attempts > 1

    def next_step(self, kind: str) -> str:
        """The name of this job's next side effect of `kind` (`comment-1`, `comment-2`...):
        the same in every attempt, since a job does the same things in the same order."""
        self._counts[kind] = self._counts.get(kind, 0) + 1
        return f"{kind}-{self._counts[kind]}"

    def marker(self, step: str) -> str:
        """The hidden marker of a side effect in a GitHub comment."""
        return f"<!-- nixmox-job:{self.id}:{step} -->"

    async def effect(self, step: str) -> str | None:
        """What an earlier attempt recorded for `step` (only re-runs ask the store)."""
        return await self.store.queue.effect(self.id, step) if self.rerun else None

    async def record(self, step: str, ref: str) -> None:
        await self.store.queue.record_effect(self.id, step, ref)


current_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "nixmox_current_job", default=None
)
"""The job whose handler runs in this task (None outside jobs)."""


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


# this process's part of every name it gives: a restarted container's pid 1 is a new process
# with an old process's pid, told apart by this
PROCESS_NONCE = uuid.uuid4().hex[:8]
_names = itertools.count()


def worker_name() -> str:
    """Unique per name given: host, pid, and this process's nonce with a count."""
    return f"{socket.gethostname()}:{os.getpid()}:{PROCESS_NONCE}{next(_names)}"


def holder_alive(pid: int, nonce: str) -> bool:
    """The process that took a `host:pid:nonce` name of this host still runs.

    Our own pid in a name that is not ours is an earlier process (a container restarted with
    the same pid 1): it is gone.
    """
    if pid == os.getpid():
        return nonce.startswith(PROCESS_NONCE)
    return pid_alive(pid)


def _set_on_close(event: asyncio.Event, _connection: Any) -> None:
    event.set()


def pid_alive(pid: int) -> bool:
    """A process with this pid runs on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    return True


@dataclass(eq=False)
class JobWorker:
    """Runs queued jobs with up to `concurrency` at once."""

    store: Store
    _: KW_ONLY
    metrics: Metrics | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    lease: timedelta = DEFAULT_LEASE
    poll_interval: float = DEFAULT_POLL
    name: str = field(default_factory=worker_name)
    handlers: dict[str, JobHandler] = field(default_factory=dict, init=False)
    intake: DeliveryIntake = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _running: int = field(default=0, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._idle.set()
        self.intake = DeliveryIntake(self.store)

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
        self._tasks.append(asyncio.create_task(self._maintain(), name="nixmox-job-sweep"))
        if self.store.url.get_backend_name() == "postgresql":
            self._tasks.append(asyncio.create_task(self._listen(), name="nixmox-job-listen"))

    async def sweep(self) -> list[int]:
        """Make this host's dead processes' jobs claimable now, and prune old replay keys;
        the jobs reclaimed."""
        reclaimed = await self.reclaim()
        await self.store.queue.prune_deliveries(SLACK_REPLAY_PREFIX, utcnow() - REPLAY_WINDOW)
        return reclaimed

    async def reclaim(self) -> list[int]:
        """Make this host's dead processes' jobs claimable now; the jobs reclaimed."""
        host = self.name.split(":", 1)[0]
        reclaimed = await self.store.queue.reclaim_dead(host, holder_alive, keep=self.name)
        if reclaimed:
            log.warning("reclaimed job(s) %s of a dead process on %s", reclaimed, host)
            self._wake.set()
        return reclaimed

    async def _maintain(self) -> None:
        """`sweep` at start (before the first claim waits), then every third of the lease;
        a dead local process's jobs are looked for more often (one cheap query)."""
        every = self.lease.total_seconds() / 3
        reclaims = max(1, round(every / RECLAIM_INTERVAL))
        rounds = itertools.count()

        async def maintain() -> None:
            if next(rounds) % reclaims == 0:
                await self.sweep()
            else:
                await self.reclaim()

        await repeat_forever(
            maintain, every / reclaims, log, "the job sweep failed; trying again later"
        )

    async def _listen(self) -> None:
        """LISTEN for new jobs on a dedicated connection; reopened when it drops."""
        import asyncpg  # type: ignore[import-untyped]

        from state.queue import JOBS_CHANNEL

        dsn = self.store.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(dsn)
            except Exception as exc:
                log.warning("cannot LISTEN for jobs (polling meanwhile): %s", exc)
                await asyncio.sleep(LISTEN_RETRY)
                continue
            try:
                conn.add_termination_listener(functools.partial(_set_on_close, lost))
                await conn.add_listener(JOBS_CHANNEL, lambda *_: self._wake.set())
                self._wake.set()  # jobs queued while no one listened
                await lost.wait()
                log.warning("the LISTEN connection dropped; polling until it is back")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(LISTEN_RETRY)

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
            token = current_job.set(JobContext(job.id, job.attempts, self.store))
            try:
                await handler(job.payload)
            finally:
                current_job.reset(token)
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
