"""Background work repeated forever (sweeps, checks, drift rounds) that logs a failure and
carries on, rather than ending its task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn


async def repeat_forever(
    action: Callable[[], Awaitable[object]],
    seconds: float,
    logger: logging.Logger,
    failure: str,
    *args: object,
    wait_first: bool = False,
) -> NoReturn:
    """Run `action` every `seconds` (after the first wait, with `wait_first`) until cancelled.

    A failure is logged (`failure % args`, with its traceback) and the next round runs as
    planned: one bad round must not stop the work for good.
    """
    while True:
        if wait_first:
            await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:
            logger.exception(failure, *args)
        if not wait_first:
            await asyncio.sleep(seconds)
