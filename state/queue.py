"""The bot's queue: webhook deliveries (seen once) and the jobs they queue, leased to workers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from state.base import Repository, record_of
from state.bulk_writes import (
    LOCAL_RETRY,
    LOCAL_TRIES,
    LocalEngine,
    LocalSqlite,
    PreparedInsert,
    SqliteBusy,
)
from state.engine import sqlite_file
from state.events import utcnow
from state.schema import UTCDateTime, deliveries, job_effects, jobs

log = logging.getLogger(__name__)

# PostgreSQL: every commit that queues jobs notifies this channel (workers LISTEN on it)
JOBS_CHANNEL = "nixmox_jobs"
_NOTIFY = sa.text(f"SELECT pg_notify('{JOBS_CHANNEL}', '')")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# what identifies a delivery: its id, or its id and other keys (e.g. its body's signature);
# it is a duplicate when any of them was seen before
DeliveryKey = str | tuple[str, ...]
# a delivery and the jobs (kind, payload) it queues: `QueueRepository.record_deliveries`
DeliveryJobs = tuple[DeliveryKey, list[tuple[str, dict[str, Any]]]]


@dataclass
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    state: JobState
    attempts: int
    worker: str | None = None
    error: str | None = None
    lease_until: datetime | None = None


class QueueRepository(Repository):
    """Deliveries and jobs; on a SQLite file, deliveries are recorded on a synchronous
    connection (opened on first use), the cheapest path for the busiest write."""

    def __init__(self, engine: AsyncEngine, url: URL) -> None:
        super().__init__(engine)
        # a SQLite file (not `:memory:`, which only the engine's connection sees)
        self._local_path = sqlite_file(url) if url.get_backend_name() == "sqlite" else None
        self._local: LocalSqlite | None = None
        self._local_engine: LocalEngine | None = None

    def close(self) -> None:
        """Close the synchronous SQLite connections, if any were opened."""
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._local_engine is not None:
            self._local_engine.close()
            self._local_engine = None

    def _local_writes(self) -> LocalEngine | None:
        """The synchronous engine of short job writes (a SQLite file only)."""
        if self._local_engine is None and self._local_path is not None:
            self._local_engine = LocalEngine(self._local_path)
        return self._local_engine

    async def record_delivery(self, delivery_id: str) -> bool:
        """True the first time a webhook delivery id is seen, False for a redelivery."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    deliveries.insert().values(delivery_id=delivery_id, received_at=utcnow())
                )
        except IntegrityError:
            return False
        return True

    async def record_deliveries(self, items: Sequence[DeliveryJobs]) -> list[bool]:
        """Record new deliveries with their jobs, all in one transaction (a group commit).

        Each item is a delivery id (or a tuple of keys: the id and, say, the body's
        signature) and the jobs `(kind, payload)` it queues. Per item: True when recorded
        now (all its keys, its jobs queued), False when any of its keys was seen before, in
        an earlier call or earlier in `items` (nothing recorded or queued).
        """
        if not items:
            return []
        try:
            return await self._record_together(items)
        except IntegrityError:
            # another replica recorded one of these ids meanwhile: one at a time, then
            return [await self._record_alone(delivery_id, work) for delivery_id, work in items]

    async def _record_together(self, items: Sequence[DeliveryJobs]) -> list[bool]:
        local = self._local_sqlite()
        if local is not None:
            # another writer (a job's short transaction) holds the file: try again soon,
            # letting the loop run meanwhile, rather than in SQLite's sleeping busy handler
            for _ in range(LOCAL_TRIES):
                try:
                    return self._record_now(local, items)
                except SqliteBusy:
                    await asyncio.sleep(LOCAL_RETRY)
            # held for long (a migration, a stuck process): the asynchronous path waits
            log.info("SQLite is busy; recording deliveries asynchronously")
        wanted = _all_keys(items)
        async with self.engine.begin() as conn:
            seen = sa.select(deliveries.c.delivery_id).where(deliveries.c.delivery_id.in_(wanted))
            rows = _IntakeRows.of(items, set((await conn.execute(seen)).scalars()))
            delivery_insert, job_insert = _intake_inserts(conn.dialect)
            await delivery_insert.run(conn, rows.deliveries)
            await job_insert.run(conn, rows.jobs)
            if rows.jobs:
                await _notify(conn)
        return rows.recorded

    def _local_sqlite(self) -> LocalSqlite | None:
        if self._local is None and self._local_path is not None:
            self._local = LocalSqlite(str(self._local_path))
        return self._local

    def _record_now(self, local: LocalSqlite, items: Sequence[DeliveryJobs]) -> list[bool]:
        """`_record_together` on the synchronous SQLite connection (SqliteBusy: nothing done)."""
        wanted = _all_keys(items)
        delivery_insert, job_insert = _intake_inserts(local.dialect)
        with local.transaction() as cursor:
            found = cursor.execute(f"{_SEEN_SQL}({','.join('?' * len(wanted))})", wanted)
            rows = _IntakeRows.of(items, {row[0] for row in found})
            delivery_insert.run_now(cursor, rows.deliveries)
            job_insert.run_now(cursor, rows.jobs)
        return rows.recorded

    async def _record_alone(
        self, delivery_id: DeliveryKey, work: list[tuple[str, dict[str, Any]]]
    ) -> bool:
        """One delivery and its jobs in their own transaction; False when seen before."""
        try:
            async with self.engine.begin() as conn:
                rows = _IntakeRows.of([(delivery_id, work)], set())
                delivery_insert, job_insert = _intake_inserts(conn.dialect)
                await delivery_insert.run(conn, rows.deliveries)
                await job_insert.run(conn, rows.jobs)
                if rows.jobs:
                    await _notify(conn)
        except IntegrityError:
            return False
        return True

    async def enqueue(self, kind: str, payload: dict[str, Any]) -> int:
        """Queue one job; its id."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                jobs.insert()
                .values(
                    kind=kind,
                    payload=payload,
                    state=str(JobState.QUEUED),
                    attempts=0,
                    created_at=utcnow(),
                )
                .returning(jobs.c.id)
            )
            await _notify(conn)
            return int(result.scalar_one())

    async def claim(self, worker: str, *, lease: timedelta) -> Job | None:
        """The oldest queued job (or one whose worker's lease ran out), now leased to `worker`."""
        local = self._local_writes()
        if local is not None:
            # one statement: SQLite's write lock is held only while SQLite runs it
            now = utcnow()
            claimed = await local.write(
                _CLAIM_NEXT, {"worker": worker, "now": now, "until": now + lease}
            )
            if claimed is not None:
                return _job(claimed[0]) if claimed else None
        for _ in range(10):
            now = utcnow()
            async with self.engine.begin() as conn:
                candidate = (await conn.execute(_next_claimable(now))).scalar()
                if candidate is None:
                    return None
                # conditional update: if another worker claimed it first, nothing changes
                result = await conn.execute(_lease_to(candidate, worker, now, lease))
                if result.rowcount == 1:
                    row = (await conn.execute(jobs.select().where(jobs.c.id == candidate))).one()
                    return _job(row)
        return None

    async def renew(self, job_id: int, worker: str, lease: timedelta) -> bool:
        """Extend a running job's lease; False if another worker took it over."""
        async with self.engine.begin() as conn:
            return await _set_lease(conn, job_id, worker, utcnow() + lease)

    async def finish(self, job_id: int, error: str | None = None) -> None:
        """A job is done (or failed, with `error`)."""
        state = JobState.FAILED if error else JobState.DONE
        values = {"job_id": job_id, "state": str(state), "error": error, "at": utcnow()}
        local = self._local_writes()
        if local is not None and await local.write(_FINISH, values) is not None:
            return
        async with self.engine.begin() as conn:
            await conn.execute(_FINISH, values)

    async def reclaim_dead(
        self, host: str, alive: Callable[[int, str], bool], *, keep: str | None = None
    ) -> list[int]:
        """Jobs running under a dead process of `host` (not `alive(pid, nonce)`) are claimable now.

        Worker names are `host:pid:nonce` (`bot.jobs.worker_name`); `keep` (the caller's own
        name) is never reclaimed. Their lease is ended, so the next claim takes them over.
        """
        async with self.engine.connect() as conn:
            held = (
                await conn.execute(
                    sa.select(jobs.c.id, jobs.c.worker).where(
                        jobs.c.state == str(JobState.RUNNING),
                        jobs.c.worker.like(f"{_like_literal(host)}:%", escape="\\"),
                    )
                )
            ).all()
        dead = [
            (job_id, name)
            for job_id, name in held
            if name != keep and dead_holder(name, host, alive)
        ]
        reclaimed: list[int] = []
        for job_id, name in dead:
            async with self.engine.begin() as conn:
                ended = await _set_lease(conn, job_id, name, utcnow() - timedelta(seconds=1))
            if ended:
                reclaimed.append(job_id)
        return reclaimed

    async def effect(self, job_id: int, step: str) -> str | None:
        """What a job's side effect `step` recorded (a message ts, a deployment id), if any."""
        async with self.engine.connect() as conn:
            found = await conn.execute(
                sa.select(job_effects.c.ref).where(
                    job_effects.c.job_id == job_id, job_effects.c.step == step
                )
            )
            return found.scalar()

    async def record_effect(self, job_id: int, step: str, ref: str) -> bool:
        """Remember that a job had side effect `step`; False if it was recorded before."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    job_effects.insert().values(
                        job_id=job_id, step=step, ref=ref, created_at=utcnow()
                    )
                )
        except IntegrityError:
            return False
        return True

    async def prune_deliveries(self, prefix: str, before: datetime) -> int:
        """Forget delivery keys starting with `prefix` received before `before` (replay keys
        past their window); how many."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                deliveries.delete().where(
                    deliveries.c.delivery_id.like(f"{_like_literal(prefix)}%", escape="\\"),
                    deliveries.c.received_at < before,
                )
            )
        return int(result.rowcount or 0)

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(jobs.select().where(jobs.c.id == job_id))).first()
        return _job(row) if row is not None else None


# --- delivery intake ---

_SEEN_SQL = (
    f"SELECT {deliveries.c.delivery_id.name} FROM {deliveries.name} "
    f"WHERE {deliveries.c.delivery_id.name} IN "
)
_INTAKE_INSERTS: dict[str, tuple[PreparedInsert, PreparedInsert]] = {}


def _intake_inserts(dialect: sa.Dialect) -> tuple[PreparedInsert, PreparedInsert]:
    """The delivery and job INSERTs for a dialect (compiled once per dialect)."""
    key = dialect.name
    if key not in _INTAKE_INSERTS:
        _INTAKE_INSERTS[key] = (
            PreparedInsert(deliveries, ["delivery_id", "received_at"], dialect),
            PreparedInsert(jobs, ["kind", "payload", "state", "attempts", "created_at"], dialect),
        )
    return _INTAKE_INSERTS[key]


@dataclass
class _IntakeRows:
    """What a batch of deliveries writes: per item whether it is new, and the rows to insert."""

    recorded: list[bool]
    deliveries: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]

    @classmethod
    def of(cls, items: Sequence[DeliveryJobs], seen: set[str]) -> _IntakeRows:
        """An item with a key in `seen` is not new; of several sharing a key, only the first is."""
        now = utcnow()  # one object for every row: PreparedInsert binds it once
        queued = str(JobState.QUEUED)
        rows = cls([], [], [])
        for delivery, work in items:
            keys = _keys(delivery)
            new = seen.isdisjoint(keys)
            rows.recorded.append(new)
            if new:
                seen.update(keys)
                rows.deliveries.extend((key, now) for key in keys)
                rows.jobs.extend((kind, payload, queued, 0, now) for kind, payload in work)
        return rows


def _keys(delivery: DeliveryKey) -> tuple[str, ...]:
    return (delivery,) if isinstance(delivery, str) else tuple(dict.fromkeys(delivery))


def _all_keys(items: Sequence[DeliveryJobs]) -> list[str]:
    """Every key of every item, once each."""
    return list(dict.fromkeys(key for delivery, _ in items for key in _keys(delivery)))


async def _notify(conn: Any) -> None:
    """Wake the LISTENing workers when this transaction commits (PostgreSQL only)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_NOTIFY)


def _like_literal(text: str) -> str:
    """`text` matched literally by LIKE (with ESCAPE '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def dead_holder(holder: str, host: str, alive: Callable[[int, str], bool]) -> bool:
    """A `host:pid:nonce` holder (a job worker, a leader) of `host` that is not `alive(pid,
    nonce)` (another host's, or an unreadable name: not known dead)."""
    parts = holder.split(":")
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    return not alive(int(parts[1]), parts[2])


def _claimable(now: Any) -> sa.ColumnElement[bool]:
    """Queued, or running under a lease that ran out."""
    return sa.or_(
        jobs.c.state == str(JobState.QUEUED),
        sa.and_(jobs.c.state == str(JobState.RUNNING), jobs.c.lease_until < now),
    )


def _next_claimable(now: Any) -> sa.Select[Any]:
    return sa.select(jobs.c.id).where(_claimable(now)).order_by(jobs.c.id).limit(1)


def _lease_to(job_id: Any, worker: str, now: datetime, lease: timedelta) -> sa.Update:
    """Lease the job to `worker` if it is still claimable (else nothing changes)."""
    return (
        jobs.update()
        .where(jobs.c.id == job_id, _claimable(now))
        .values(
            state=str(JobState.RUNNING),
            worker=worker,
            lease_until=now + lease,
            attempts=jobs.c.attempts + 1,
        )
    )


# built once: SQLAlchemy's work per call is then binding the values
_CLAIM_NEXT = (
    jobs.update()
    .where(
        jobs.c.id == _next_claimable(sa.bindparam("now", type_=UTCDateTime)).scalar_subquery(),
        _claimable(sa.bindparam("now", type_=UTCDateTime)),
    )
    .values(
        state=str(JobState.RUNNING),
        worker=sa.bindparam("worker"),
        lease_until=sa.bindparam("until", type_=UTCDateTime),
        attempts=jobs.c.attempts + 1,
    )
    .returning(*jobs.c)
)
"""`claim` as one statement: lease the next claimable job to `worker`, returning it."""
_FINISH = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"))
    .values(
        state=sa.bindparam("state"),
        error=sa.bindparam("error"),
        finished_at=sa.bindparam("at", type_=UTCDateTime),
        lease_until=None,
    )
)


def _job(row: Any) -> Job:
    return record_of(Job, row, payload=dict(row.payload or {}), state=JobState(row.state))


async def _set_lease(conn: AsyncConnection, job_id: int, worker: str, until: datetime) -> bool:
    """Move the lease of a job `worker` is running; False if it runs elsewhere or is done."""
    result = await conn.execute(
        jobs.update()
        .where(
            jobs.c.id == job_id,
            jobs.c.worker == worker,
            jobs.c.state == str(JobState.RUNNING),
        )
        .values(lease_until=until)
    )
    return result.rowcount == 1
