"""What `POST /slack/events` checks of a signed request before bolt sees it: depth and replays.

A signed request can be captured and sent again within Slack's 5-minute window; its
`(timestamp, signature)` pair is recorded in the store's deliveries table (so every replica
sees it) and a repeat is answered without acting. Keys need no pruning to stay correct: a key
holds its timestamp, and a request whose timestamp left the window fails the signature check
before the store is asked.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence

from aiohttp import web
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.limits import nesting_depth
from state.store import Store

MAX_DEPTH = 64  # Slack's block payloads nest about a dozen levels
FORM = "application/x-www-form-urlencoded"
TIMESTAMP_HEADER = "X-Slack-Request-Timestamp"
SIGNATURE_HEADER = "X-Slack-Signature"


class Unreadable(ValueError):
    """A signed body that is not a Slack payload (message safe to show)."""


def payload_depth(body: bytes, content_type: str) -> int:
    """How deeply the JSON of a request nests: the body, or a form's `payload` field."""
    if content_type != FORM:
        return nesting_depth(body)
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    return max((nesting_depth(value.encode()) for value in fields.get("payload", [])), default=0)


def bolt_headers(request: web.Request) -> dict[str, str | Sequence[str]]:
    """The headers as bolt normalizes them: lower-case names, the last of repeated ones."""
    return {name.lower(): value for name, value in request.headers.items()}


def bolt_request(request: web.Request, body: bytes) -> AsyncBoltRequest:
    """The request as bolt takes it, parsed; `Unreadable` when it is not a Slack payload."""
    if payload_depth(body, request.content_type) > MAX_DEPTH:
        raise Unreadable(f"the payload nests deeper than {MAX_DEPTH} levels")
    try:
        text = body.decode(request.charset or "utf-8")
        return AsyncBoltRequest(
            body=text, query=request.query_string, headers=bolt_headers(request)
        )
    except (ValueError, RecursionError):  # not UTF-8, or a `payload` that is not JSON
        raise Unreadable("the request body is not a Slack payload") from None


def replay_key(headers: Mapping[str, str]) -> str:
    """The key a verified request is remembered by: `slack:<timestamp>:<signature>`."""
    return f"slack:{headers[TIMESTAMP_HEADER]}:{headers[SIGNATURE_HEADER]}"


async def first_time(store: Store, headers: Mapping[str, str]) -> bool:
    """Record a verified request; False when the same signed request was seen before."""
    (recorded,) = await store.queue.record_deliveries([(replay_key(headers), [])])
    return recorded
