"""The locks of a deployment: who holds them, keeping them renewed, stopping when one is lost."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from planner.plan import Plan
from runners.outcome import ExecutionResult
from state.locks import LockLost
from state.store import Store

log = logging.getLogger(__name__)

# a renewal found a lock gone or taken (its lease ran out while the renewals were starved)
LOST_LOCK = "lost the lock on {what}; stopped"
LOST_TO_NOBODY = "its expired lease (nobody holds it now)"


def holder_name(deployment_id: str) -> str:
    """Who holds a deployment's locks: the deployment, on this host, in this process."""
    return f"deployment {deployment_id} ({socket.gethostname()}:{os.getpid()})"


def holder_label(holder: str | None) -> str:
    """How a lock holder is named in a note: `deployment X` without the host and pid."""
    if holder is None:
        return LOST_TO_NOBODY
    return holder.split(" (", 1)[0] if holder.startswith("deployment ") else holder


def lost_lock_note(lost: LockLost) -> str:
    """The note of a deployment stopped because it lost locks, grouped by who has them now."""
    by_holder: dict[str, list[str]] = {}
    for service, holder in sorted(lost.lost.items()):
        by_holder.setdefault(holder_label(holder), []).append(service)
    parts = [f"{', '.join(services)} to {holder}" for holder, services in by_holder.items()]
    return LOST_LOCK.format(what="; on ".join(parts))


def lock_names(plan: Plan) -> list[str]:
    """The services a plan touches, plus its global terraform roots (one at a time too)."""
    globals_ = [step.id for step in plan.steps if step.service is None]
    return sorted({*plan.services(), *globals_})


class LeaseGuard:
    """Runs the execution so that losing a lock cancels it (the executor interrupts its steps)."""

    def __init__(self) -> None:
        self.lost: LockLost | None = None
        self.work: asyncio.Future[ExecutionResult] | None = None

    def lose(self, lost: LockLost) -> None:
        """Called by the renewal task: remember what was lost and stop the execution."""
        self.lost = lost
        if self.work is not None:
            self.work.cancel()

    async def run(self, work: Callable[[], Awaitable[ExecutionResult]]) -> ExecutionResult | None:
        """The execution's result; None when it was stopped (or never started) for a lost lock."""
        if self.lost is not None:
            return None  # lost before the execution began: nothing ran on the hosts
        self.work = asyncio.ensure_future(work())
        try:
            return await self.work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # our own cancellation (Ctrl-C, shutdown) goes on up; only the guard's is absorbed
            if self.lost is None or (current is not None and current.cancelling()):
                raise
            return None
        finally:
            self.work = None


async def keep_renewing(
    store: Store,
    holder: str,
    lease: timedelta,
    services: Sequence[str],
    on_lost: Callable[[LockLost], None],
) -> None:
    """Renew the leases well before they run out; a failed renewal is retried next time.

    A lock found gone or taken by another holder is lost for good: `on_lost` stops the run.
    """
    interval = max(lease.total_seconds() / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        try:
            await store.locks.renew(holder, lease, services)
        except LockLost as lost:
            log.error("deployment holder %s: %s", holder, lost)
            on_lost(lost)
            return
        except Exception:
            log.exception("renewing the locks of %s failed", holder)


async def stop_renewing(renewer: asyncio.Task[None]) -> None:
    """Cancel the renewal task and wait for it."""
    renewer.cancel()
    await asyncio.gather(renewer, return_exceptions=True)
