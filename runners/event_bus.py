"""Event delivery: each subscriber fed in order through its own queue, never slowing a deployment."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from state.events import Event, Subscriber

log = logging.getLogger(__name__)


class EventBus:
    """Delivers events to each subscriber in order, through one queue and worker per subscriber."""

    def __init__(self, subscribers: Iterable[Subscriber], *, timeout: float) -> None:
        self.subscribers = list(subscribers)
        self.timeout = timeout
        self.queues: list[asyncio.Queue[Event | None]] = []
        self.workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for subscriber in self.subscribers:
            queue: asyncio.Queue[Event | None] = asyncio.Queue()
            self.queues.append(queue)
            self.workers.append(asyncio.create_task(self._deliver(subscriber, queue)))

    def publish(self, event: Event) -> None:
        for queue in self.queues:
            queue.put_nowait(event)

    async def _deliver(self, subscriber: Subscriber, queue: asyncio.Queue[Event | None]) -> None:
        name = getattr(subscriber, "__qualname__", repr(subscriber))
        while (event := await queue.get()) is not None:
            try:
                await asyncio.wait_for(subscriber(event), self.timeout)
            except TimeoutError:
                log.warning("subscriber %s took over %gs on %s; skipped", name, self.timeout, event)
            except Exception:
                log.exception("subscriber %s failed on %s; the deployment goes on", name, event)

    async def close(self, drain_timeout: float) -> None:
        """Let every subscriber finish its queue (bounded), then stop the workers."""
        for queue in self.queues:
            queue.put_nowait(None)
        if not self.workers:
            return
        _, pending = await asyncio.wait(self.workers, timeout=drain_timeout)
        for task in pending:
            log.warning("a subscriber did not finish its events in %gs; dropped", drain_timeout)
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
