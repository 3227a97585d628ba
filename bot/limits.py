"""HTTP body limits: size per route, time to receive a body, bytes being received at once.

Anyone who can reach the port can send a body before any signature is checked, so the
application's middleware receives bodies itself instead of the handlers:

- a route's size limit is checked against `Content-Length` before a byte is read (413); a
  chunked body without a length is read up to the same limit (413 beyond it);
- the whole body must arrive within the route's time (408 and the connection is closed);
- the bodies being received at once hold at most `capacity` bytes between them (each holds
  its `Content-Length`, or its route's limit when chunked, until its request is answered);
  others wait for room within their own time (503 when it runs out);
- every other route accepts no body larger than `OTHER_ROUTES_LIMIT`.

Handlers take the received body from `received_body(request)`.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import StreamReader, web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GITHUB_LIMIT = 25 * 1024 * 1024  # GitHub caps webhook payloads at 25 MB
SLACK_LIMIT = 64 * 1024  # slash commands and button clicks are a few KB
OTHER_ROUTES_LIMIT = 16 * 1024  # pages and metrics take no body
TOO_LARGE = "the request body is larger than {limit} bytes"
TOO_SLOW = "the request body did not arrive within {seconds:g} seconds"
TOO_BUSY = "too many request bodies are being received at once; try again"
BODY: web.RequestKey[bytes] = web.RequestKey("nixmox_body", bytes)
# a string between quotes (escapes included), then any bracket outside strings
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class _TooLarge(Exception):
    """The body went past its route's limit."""


@dataclass(frozen=True)
class BodyRule:
    """How large a route's body may be, and how long it may take to arrive."""

    limit: int
    seconds: float


class BodyBudget:
    """Bytes of request bodies being received at once, handed out first come, first served."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def take(self, size: int) -> int | None:
        """`size` bytes (at most the capacity) if they are free now and nobody waits, else None."""
        size = min(size, self.capacity)
        if not self._waiting and self.free >= size:
            self.free -= size
            return size
        return None

    async def acquire(self, size: int) -> int:
        """Wait until `size` bytes (at most the capacity) are free; returns what was taken."""
        taken = self.take(size)
        if taken is not None:
            return taken
        size = min(size, self.capacity)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiting.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(size)  # granted just as the wait was cancelled
            else:
                self._waiting.remove(entry)
                self._grant()  # a large waiter leaving may let smaller ones in
            raise
        return size

    def release(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, waiter = self._waiting.popleft()
            self.free -= size
            waiter.set_result(None)


class BodyLimits:
    """The rules per path and the shared budget; `middleware` enforces them."""

    def __init__(self, capacity: int) -> None:
        self.budget = BodyBudget(capacity)
        self.rules: dict[str, BodyRule] = {}

    def add(self, path: str, rule: BodyRule) -> None:
        self.rules[path] = rule

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rule = self.rules.get(request.path)
        length = request.content_length
        if rule is None:
            if length is not None and length > OTHER_ROUTES_LIMIT:
                return refuse(request, 413, TOO_LARGE.format(limit=OTHER_ROUTES_LIMIT))
            return await handler(request)
        if length is not None and length > rule.limit:
            return refuse(request, 413, TOO_LARGE.format(limit=rule.limit))
        deadline = asyncio.get_running_loop().time() + rule.seconds
        wanted = rule.limit if length is None else length
        held = self.budget.take(wanted)  # the usual case: room at once, nothing to wait for
        if held is None:
            try:
                async with asyncio.timeout_at(deadline):
                    held = await self.budget.acquire(wanted)
            except TimeoutError:
                return refuse(request, 503, TOO_BUSY)
        try:
            try:
                body = arrived_body(request.content, rule.limit)
                if body is None:
                    async with asyncio.timeout_at(deadline):
                        body = await read_within(request.content, rule.limit)
                request[BODY] = body
            except TimeoutError:
                return refuse(request, 408, TOO_SLOW.format(seconds=rule.seconds))
            except _TooLarge:
                return refuse(request, 413, TOO_LARGE.format(limit=rule.limit))
            return await handler(request)
        finally:
            self.budget.release(held)


def arrived_body(stream: StreamReader, limit: int) -> bytes | None:
    """The whole body when it has all arrived already (no wait, so no timer); else None.

    A webhook's body usually comes in the same reads as its headers; setting up a deadline
    for a read that cannot wait was a tenth of the middleware's cost.
    """
    if not stream.is_eof():
        return None
    body = stream.read_nowait(-1)
    if len(body) > limit:
        raise _TooLarge
    return body


async def read_within(stream: StreamReader, limit: int) -> bytes:
    """The whole body, or `_TooLarge` as soon as more than `limit` bytes came."""
    first = await stream.readany()
    if not first:
        return b""
    if len(first) > limit:
        raise _TooLarge
    more = await stream.readany()
    if not more:
        return first  # the usual case: the whole body in one piece, no copy
    body = bytearray(first)
    while more:
        body.extend(more)
        if len(body) > limit:
            raise _TooLarge
        more = await stream.readany()
    return bytes(body)


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    """An error answer after which the connection is closed.

    Whatever the client still sends is read and dropped (never kept) for aiohttp's
    lingering time at most, so that the client sees the answer instead of a reset.
    """
    response = web.json_response({"error": message}, status=status)
    response.force_close()
    return response


def received_body(request: web.Request) -> bytes:
    """The body the limits middleware received for this request."""
    try:
        return request[BODY]
    except KeyError:
        raise RuntimeError(f"{request.path} is not covered by the body limits") from None


def nesting_depth(text: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (brackets inside strings aside)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b"", text)):
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


__all__ = [
    "GITHUB_LIMIT",
    "OTHER_ROUTES_LIMIT",
    "SLACK_LIMIT",
    "BodyBudget",
    "BodyLimits",
    "BodyRule",
    "nesting_depth",
    "received_body",
]


LIMITS: web.AppKey[BodyLimits] = web.AppKey("nixmox_body_limits", BodyLimits)
