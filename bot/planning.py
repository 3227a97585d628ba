"""Where the bot's CPU-heavy planning (`planner.revisions.plan_revisions`) runs.

In a process that answers webhooks or runs jobs (`nixmox serve` with `--role all` or
`worker`), planning in a thread would hold the GIL while acknowledgements, or a worker's
claims and job ends, wait: it runs in a small process pool instead, so acks stay fast while
plans run. Each pool process keeps its own evaluation cache; tests plan in threads.

The pool's processes run at a lower CPU priority (`NIXMOX_WORKER_NICE`, `lower_priority`),
and so does what they start (Nix evaluation), so that on a busy machine the web gets the cores
first. The processes that write the store keep their priority: a claim or a job's end holds
SQLite's one write lock for a moment, and a holder descheduled for a lower priority would make
the web's next delivery wait behind it (measured: a niced worker process doubled the web's
p99 acknowledgement on a shared SQLite file).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from pathlib import Path
from typing import Any

from planner.plan import Plan
from planner.source import EvalCache

log = logging.getLogger(__name__)

POOL_PROCESSES = 1  # one planning process beside the event loop's (the machine has 2 cores)
_CHILD_CACHE: EvalCache | None = None  # each pool process's own evaluation cache


def _plan_in_child(repo_dir: str, base: str | None, head: str, kwargs: dict[str, Any]) -> Plan:
    """`plan_revisions` in a pool process, with that process's cache."""
    global _CHILD_CACHE
    from planner.revisions import plan_revisions

    if _CHILD_CACHE is None:
        _CHILD_CACHE = EvalCache()
    return plan_revisions(repo_dir, base, head, cache=_CHILD_CACHE, **kwargs)


def lower_priority(increment: int) -> int:
    """Lower this process's CPU priority by `increment` nice levels (what it starts inherits
    it); its niceness now. 0 changes nothing; a process cannot raise its priority back."""
    return os.nice(increment) if increment > 0 else os.nice(0)


def _warm() -> None:
    """Import the planner in a pool process before the first plan needs it."""
    import planner.revisions  # noqa: F401


class Planning:
    """Runs `plan_revisions` in a process pool (`in_processes`) or in threads; the pool's
    processes run `nice` levels below this one."""

    def __init__(self, *, in_processes: bool, cache: EvalCache, nice: int = 0) -> None:
        self.in_processes = in_processes
        self.cache = cache
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Start the pool's process now (in the background), so the first plan is not slower."""
        if self.in_processes and self._pool is None:
            self._pool = ProcessPoolExecutor(
                POOL_PROCESSES,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=lower_priority,
                initargs=(self.nice,),
            )
            self._pool.submit(_warm)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def plan_revisions(
        self, repo_dir: Path, base: str | None, head: str, **kwargs: Any
    ) -> Plan:
        """The plan of base → head (keyword arguments as `plan_revisions` takes them)."""
        if not self.in_processes:
            from planner.revisions import plan_revisions

            return await asyncio.to_thread(
                plan_revisions, repo_dir, base, head, cache=self.cache, **kwargs
            )
        self.start()
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        call = partial(_plan_in_child, str(repo_dir), base, head, kwargs)
        try:
            return await loop.run_in_executor(self._pool, call)
        except BrokenProcessPool:
            # the planning process died (killed, out of memory): a fresh pool, one more try
            log.warning("the planning process died; starting another")
            self.close()
            self.start()
            assert self._pool is not None
            return await loop.run_in_executor(self._pool, call)
