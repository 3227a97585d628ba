"""One process at a time does a singleton's work (the monitor): a leased lock in the store.

Every worker contends for the store lock `name` under its own holder name (`host:pid:nonce`,
like the job workers). The holder leads: it renews the lease every third of it; the others
stand by and try again when the holder's lease runs out (at once when the holder was a process
of this host whose pid is gone). A leader that cannot renew in time, or finds the lock taken,
steps down by itself before another can take over; a clean stop releases the lock at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from bot.jobs import holder_alive, worker_name
from state.events import utcnow
from state.locks import LockRecord, LockRepository
from state.queue import dead_holder

log = logging.getLogger(__name__)

Transition = Callable[[], Awaitable[None]]
"""What a process does when it becomes the leader, or stops being it."""

MIN_WAIT = 0.05  # seconds: a standby never retries faster than this
# a leader whose renewals failed for this share of the lease steps down before it runs out
SELF_FENCE = 2 / 3
STOPPING = "stopping"


class Leadership:
    """Contends for the lock `name`; runs `on_lead` when it wins, `on_lose` when it stops leading."""

    def __init__(
        self,
        locks: LockRepository,
        name: str,
        *,
        lease: timedelta,
        on_lead: Transition,
        on_lose: Transition,
        holder: str | None = None,
        alive: Callable[[int, str], bool] = holder_alive,
    ) -> None:
        self.locks = locks
        self.name = name
        self.lease = lease
        self.on_lead, self.on_lose = on_lead, on_lose
        self.holder = holder or worker_name()
        self.alive = alive
        self.leading = False
        self._renewed = 0.0  # loop time of the last successful renewal
        self._task: asyncio.Task[None] | None = None

    @property
    def renew_every(self) -> float:
        return self.lease.total_seconds() / 3

    async def start(self) -> None:
        """Contend once now (a sole process leads before `start` returns), then keep at it."""
        wait = await self.round()
        self._task = asyncio.create_task(self._keep(wait), name=f"nixmox-leader-{self.name}")

    async def stop(self) -> None:
        """Stop contending; a leader stops its work and releases the lock at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leading:
            await self._step_down(STOPPING)
        with contextlib.suppress(Exception):
            await asyncio.shield(self.locks.release(self.holder))

    async def _keep(self, wait: float) -> None:
        while True:
            await asyncio.sleep(wait)
            try:
                wait = await self.round()
            except Exception:  # keep contending whatever one round met
                log.exception("leadership of %s: a round failed", self.name)
                wait = self.renew_every

    async def round(self) -> float:
        """One attempt to lead (or to renew the lead); the seconds until the next one."""
        try:
            found = await self._contend()
        except Exception as exc:
            log.warning("leadership of %s: the store did not answer: %s", self.name, exc)
            if (
                self.leading
                and self._now() - self._renewed >= self.lease.total_seconds() * SELF_FENCE
            ):
                await self._step_down("could not renew its lease in time")
            return self.renew_every
        if found is not None and found.holder == self.holder:
            self._renewed = self._now()
            if not self.leading:
                await self._take_the_lead()
            return self.renew_every
        if self.leading:
            await self._step_down(f"taken over by {found.holder if found else 'nobody'}")
        return self._standby_wait(found)

    async def _contend(self) -> LockRecord | None:
        """Take or renew the lock; a dead process of this host loses it at once."""
        found = await self.locks.lead(self.name, self.holder, self.lease)
        if found is None or found.holder == self.holder:
            return found
        host = self.holder.split(":", 1)[0]
        if dead_holder(found.holder, host, self.alive):
            log.warning("%s: its holder %s is gone; taking over", self.name, found.holder)
            await self.locks.take_over(self.name, found.holder, self.holder, self.lease)
            return await self.locks.held(self.name)
        return found

    def _standby_wait(self, found: LockRecord | None) -> float:
        """Until the holder's lease runs out (but a third of the lease at most)."""
        if found is None or found.expires_at is None:
            return MIN_WAIT if found is None else self.renew_every
        left = (found.expires_at - utcnow()).total_seconds() + MIN_WAIT
        return min(max(left, MIN_WAIT), self.renew_every)

    async def _take_the_lead(self) -> None:
        """Start the work; if it cannot start, let the lock go (another may do better)."""
        log.info("%s leads %s", self.holder, self.name)
        self.leading = True
        try:
            await self.on_lead()
        except Exception:
            log.exception("%s could not start %s: letting the lead go", self.holder, self.name)
            await self._step_down("its work did not start")
            await self.locks.release(self.holder)

    async def _step_down(self, why: str) -> None:
        level = logging.INFO if why == STOPPING else logging.WARNING
        log.log(level, "%s no longer leads %s: %s", self.holder, self.name, why)
        self.leading = False
        try:
            await self.on_lose()
        except Exception:
            log.exception("leadership of %s: stopping its work failed", self.name)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
