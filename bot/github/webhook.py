"""`POST /github/webhook`: verify, parse, deduplicate, enqueue, acknowledge.

Order matters: the signature is checked before anything else is looked at (401, nothing
recorded); then headers and body (400); then the repository filter; then the delivery id is
recorded in the store together with the body's signature (a redelivery, or a captured body
resent under a new delivery id, does nothing twice, across restarts and replicas); then the
jobs are enqueued and the response goes out. No GitHub call and no planning happens here.
The body itself was received, within its size and time limits, by `bot.limits`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import urllib.parse
from enum import StrEnum
from typing import Any

from aiohttp import web
from gidgethub import ValidationFailure, sansio
from prometheus_client import Counter

from bot.context import CONTEXT, BotContext
from bot.github.events import BadPayload, Delivery, handles, router
from bot.github.payloads import PayloadError, decode
from bot.limits import received_body

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PATTERN = re.compile(r"sha256=[0-9a-f]{64}")
EVENT_HEADER = "X-GitHub-Event"
DELIVERY_HEADER = "X-GitHub-Delivery"
MAX_HEADER_LENGTH = 200
CACHED_ANSWERS = 256  # distinct (outcome, message, jobs) answers kept encoded
TOO_DEEP = "the payload is nested too deeply"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    PONG = "pong"
    UNAUTHORIZED = "unauthorized"
    BAD_REQUEST = "bad_request"


class Rejected(Exception):
    """A delivery answered with an HTTP error (message safe to show)."""

    def __init__(self, status: int, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.status, self.outcome, self.message = status, outcome, message


def verify_signature(body: bytes, signature: str | None, secret: str) -> None:
    """HMAC-SHA256 of the raw body; only `sha256=<64 lowercase hex>` is accepted."""
    if not signature:
        raise Rejected(401, Outcome.UNAUTHORIZED, f"missing {SIGNATURE_HEADER}")
    if not SIGNATURE_PATTERN.fullmatch(signature):
        raise Rejected(401, Outcome.UNAUTHORIZED, f"malformed {SIGNATURE_HEADER}")
    try:
        sansio.validate_event(body, signature=signature, secret=secret)
    except ValidationFailure:
        raise Rejected(401, Outcome.UNAUTHORIZED, "signature does not match") from None


def decode_body(event: str, content_type: str, body: bytes) -> dict[str, Any]:
    """JSON (or GitHub's form-encoded `payload=`) to the fields the bot reads."""
    try:
        if content_type == "application/x-www-form-urlencoded":
            text: bytes | str = urllib.parse.parse_qs(body.decode())["payload"][0]
        else:
            text = body
        return decode(event, text)
    except (UnicodeDecodeError, KeyError, IndexError):
        raise Rejected(400, Outcome.BAD_REQUEST, "the body is not a JSON payload") from None
    except PayloadError as exc:
        raise Rejected(400, Outcome.BAD_REQUEST, str(exc)) from None
    except RecursionError:
        # msgspec's own depth limit (about 1,000 levels; GitHub's payloads nest a dozen)
        raise Rejected(400, Outcome.BAD_REQUEST, TOO_DEEP) from None


def replay_key(signature: str) -> str:
    """The key a verified body is remembered by: `sha256:<hex>` of its signature."""
    return "sha256:" + signature.removeprefix("sha256=")


def header(request: web.Request, name: str) -> str:
    value = request.headers.get(name, "").strip()
    if not value or len(value) > MAX_HEADER_LENGTH:
        raise Rejected(400, Outcome.BAD_REQUEST, f"missing or invalid {name} header")
    return value


def parse_event(request: web.Request, body: bytes) -> sansio.Event:
    event = header(request, EVENT_HEADER)
    delivery_id = header(request, DELIVERY_HEADER)
    data = decode_body(event, request.content_type, body)
    return sansio.Event(data, event=event, delivery_id=delivery_id)


def repository_of(data: dict[str, Any]) -> str | None:
    repository = data.get("repository")
    name = repository.get("full_name") if isinstance(repository, dict) else None
    return name if isinstance(name, str) else None


async def accept(ctx: BotContext, event: sansio.Event, body_key: str) -> tuple[Outcome, str, int]:
    """Everything after parsing: filter, route, record (by delivery id and body), enqueue."""
    if event.event == "ping":
        return Outcome.PONG, "pong", 0
    if not handles(event.event):
        return Outcome.IGNORED, f"{event.event} events are not used", 0
    repo = repository_of(event.data)
    wanted = ctx.settings.repo
    if repo is None or wanted is None or repo.lower() != wanted.lower():
        return Outcome.IGNORED, f"repository {repo} is not NIXMOX_REPO", 0
    delivery = Delivery(ctx.settings)
    try:
        await router.dispatch(event, delivery)
    except BadPayload as exc:
        raise Rejected(400, Outcome.BAD_REQUEST, str(exc)) from None
    except (TypeError, ValueError, AttributeError):
        raise Rejected(
            400, Outcome.BAD_REQUEST, "the payload has fields of the wrong type"
        ) from None
    if not delivery.jobs:
        return Outcome.IGNORED, "; ".join(delivery.ignored) or "nothing to do", 0
    specs = [(str(spec.kind), spec.payload) for spec in delivery.jobs]
    if not await ctx.require_jobs().enqueue_delivery((event.delivery_id, body_key), specs):
        return Outcome.DUPLICATE, "delivery already processed", 0
    return Outcome.ACCEPTED, "queued", len(specs)


@functools.lru_cache(maxsize=CACHED_ANSWERS)
def _encoded(status: Outcome, message: str, jobs: int) -> bytes:
    """The JSON answer to a handled delivery, encoded once (most answers repeat exactly)."""
    return json.dumps({"status": status.value, "message": message, "jobs": jobs}).encode()


@functools.lru_cache(maxsize=CACHED_ANSWERS)
def _counter(counter: Counter, event: str, outcome: Outcome) -> Counter:
    """The labelled child of `counter`, looked up once per (event, outcome)."""
    return counter.labels(event, outcome.value)


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", charset="utf-8")


async def github_webhook(request: web.Request) -> web.Response:
    """The aiohttp handler of `POST /github/webhook`."""
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    secret = ctx.settings.github_webhook_secret
    intake = ctx.require_jobs().intake
    intake.arrive()
    try:
        return await _handle(ctx, request, secret, started)
    finally:
        intake.leave()


async def _handle(
    ctx: BotContext, request: web.Request, secret: Any, started: float
) -> web.Response:
    try:
        body = received_body(request)
        if secret is None:  # `nixmox serve` refuses to start like this; be safe anyway
            raise Rejected(401, Outcome.UNAUTHORIZED, "no webhook secret is configured")
        signature = request.headers.get(SIGNATURE_HEADER)
        verify_signature(body, signature, secret.get_secret_value())
        event = parse_event(request, body)
        outcome, message, queued = await accept(ctx, event, replay_key(str(signature)))
    except Rejected as exc:
        # the event header of an unverified request is not trusted as a metric label
        _counter(ctx.metrics.webhooks, "-", exc.outcome).inc()
        log.info("github delivery rejected (%d): %s", exc.status, exc.message)
        return _json(json.dumps({"error": exc.message}).encode(), exc.status)
    _counter(ctx.metrics.webhooks, event.event[:50], outcome).inc()
    ctx.metrics.webhook_seconds.observe(time.perf_counter() - started)
    if outcome is Outcome.ACCEPTED:
        log.info("github %s %s: %d job(s) queued", event.event, event.delivery_id, queued)
    return _json(_encoded(outcome, message, queued))
