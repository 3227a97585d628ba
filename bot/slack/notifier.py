"""The Slack progress notifier: an event subscriber keeping one message per deployment current.

Events only update the in-memory `Progress` and wake a background task; that task posts the
message (or takes over an existing one, such as the approval message), then edits it with
`chat.update` at most once per `interval` seconds with whatever the latest state is, so a
500-step deployment costs a handful of calls, not a thousand. Failures go to the thread.
Every Slack error is logged and swallowed: a notification never fails a deployment.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.blocks import MAX_BLOCKS, MAX_FALLBACK_TEXT, section, truncate
from bot.slack.once import Posting, post_once, web_api_args
from bot.slack.progress import (
    NO_BYLINE,
    Byline,
    Failure,
    Note,
    NoteKind,
    Progress,
    failure_blocks,
    failure_text,
    progress_blocks,
    progress_text,
    rollback_blocks,
    rollback_line,
)
from runners.redact import REDACTED, Redactor
from state.events import DeploymentFinished, DeploymentStarted, Event, utcnow

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0  # seconds between two edits of one message
DEFAULT_FINISH_TIMEOUT = 20.0  # how long the final edit may hold up the end of a deployment
DEFAULT_RETRY_AFTER = 1.0
FOOTER_BLOCK = "nixmox_interrupted"

MessageLink = Callable[[str, str, str], Awaitable[None]]
"""Told `(deployment_id, channel, ts)` once a deployment's message is known."""

# a second net behind the runners' own redaction: token shapes that must never be posted
TOKEN_PATTERNS = (
    r"xox[abposr]-[A-Za-z0-9-]{10,}",
    r"gh[pousr]_[A-Za-z0-9]{20,}",
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
)
# `password=hunter2` keeps `password=` so the reader still knows what was hidden
ASSIGNMENT_PATTERN = re.compile(
    r"(?i)(?<![A-Za-z])((?:password|passwd|secret|token|api[_-]?key)\s*[=:]\s*)[^\s\"',]+"
)


class SecretRedactor(Redactor):
    """The runners' Redactor plus token shapes and `password=...` assignments."""

    def __init__(self, values: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(patterns=TOKEN_PATTERNS, values=values)

    def text(self, text: str) -> str:
        return ASSIGNMENT_PATTERN.sub(rf"\1{REDACTED}", super().text(text))


class MessagePacer:
    """At most one edit per `interval` seconds per message, whoever edits it.

    The approval flow and the progress notifier share one pacer, so a message is never edited
    faster than Slack likes, and the notifier's edits carry the latest state when they go out.
    """

    MAX_TRACKED = 1000

    def __init__(
        self, interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._next: dict[tuple[str, str], float] = {}

    def delay(self, channel: str, ts: str) -> float:
        """Seconds until `channel`/`ts` may be edited again."""
        return max(0.0, self._next.get((channel, ts), 0.0) - self.clock())

    async def wait(self, channel: str, ts: str) -> None:
        delay = self.delay(channel, ts)
        if delay > 0:
            await asyncio.sleep(delay)

    def edited(self, channel: str, ts: str, *, after: float | None = None) -> None:
        """Record an edit (or a posting) that just got its answer; `after` overrides the wait."""
        now = self.clock()
        if len(self._next) > self.MAX_TRACKED:
            self._next = {key: at for key, at in self._next.items() if at > now}
        self._next[(channel, ts)] = now + (self.interval if after is None else after)


class SlackNotifier:
    """One deployment's Slack message; call it with every event of that deployment."""

    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        *,
        ts: str | None = None,
        byline: Byline = NO_BYLINE,
        pacer: MessagePacer | None = None,
        finish_timeout: float = DEFAULT_FINISH_TIMEOUT,
        redact: Callable[[str], str] = str,
        now: Callable[[], datetime] = utcnow,
        on_message: MessageLink | None = None,
        footer: str | None = None,
    ) -> None:
        self.client = client
        self.channel = channel
        self.ts = ts
        self.byline = byline
        self.pacer = pacer or MessagePacer()
        self.finish_timeout = finish_timeout
        self.redact = redact
        self.now = now
        self.on_message = on_message
        self.footer = footer  # a last line below the outcome (how to resume an interruption)
        self._linked = False
        self.progress: Progress | None = None
        self.updates_sent = 0
        self._dirty = False
        self._closing = False
        self._notes: deque[Note] = deque()
        self._replies: dict[int, str] = {}  # id(failure) -> ts of its thread reply
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the subscriber ------------------------------------------------------------------

    async def __call__(self, event: Event) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("Slack notifier: could not follow event %s", type(event).__name__)
        if isinstance(event, DeploymentFinished):
            await self.close()

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DeploymentStarted) and self.progress is None:
            self.progress = Progress(
                event.deployment_id,
                event.plan,
                kind=event.kind,
                byline=self.byline,
                started_at=event.at,
                redact=self.redact,
            )
        if self.progress is None:
            return  # joined late: nothing to show until the plan is known
        self._notes.extend(self.progress.apply(event))
        self._dirty = True
        if self._task is None:
            self._task = asyncio.create_task(self._pump(), name="nixmox-slack-progress")
        self._wake.set()

    async def close(self) -> None:
        """Send the final state (waiting at most `finish_timeout`), then stop."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.finish_timeout)
        except TimeoutError:
            log.warning("Slack notifier: final update still pending after %ss", self.finish_timeout)
            self._task.cancel()
        except Exception:
            log.exception("Slack notifier stopped with an error")

    # -- the background task --------------------------------------------------------------

    def _has_work(self) -> bool:
        return self._dirty or bool(self._notes)

    async def _pump(self) -> None:
        while True:
            if not self._has_work():
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._send_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug here reach the deployment
                log.exception("Slack notifier: update failed")
                self._dirty = False
                self._notes.clear()

    async def _send_pending(self) -> None:
        if self.ts is None:
            await self._post_main()
            if self.ts is None:
                self._notes.clear()  # no message to thread under; the log has the error
                return
        if not self._linked:
            await self._link()
        while self._notes:
            await self._send_note(self._notes.popleft())
        if self._dirty:
            await self.pacer.wait(self.channel, self.ts)
            if self._notes:
                return  # a failure arrived meanwhile: post it first, the edit follows
            await self._update_main()

    async def _link(self) -> None:
        """Say which message shows this deployment (a restart reports an interruption there)."""
        self._linked = True
        if self.on_message is None or self.progress is None or self.ts is None:
            return
        try:
            await self.on_message(self.progress.deployment_id, self.channel, self.ts)
        except Exception:
            log.exception("Slack notifier: could not record the deployment's message")

    def _render(self) -> tuple[str, list[dict[str, Any]]]:
        assert self.progress is not None
        now = self.now()
        text, blocks = progress_text(self.progress, now), progress_blocks(self.progress, now)
        if self.footer is None:
            return text, blocks
        footer = section(self.footer, block_id=FOOTER_BLOCK)
        return truncate(f"{text}\n{self.footer}", MAX_FALLBACK_TEXT), [
            *blocks[: MAX_BLOCKS - 1],
            footer,
        ]

    async def _post_main(self) -> None:
        self._dirty = False
        text, blocks = self._render()
        # in a job, recorded with the job: a re-run edits this message instead of posting again
        ts = await post_once(
            self._call, Posting.ANNOUNCEMENT, self.channel, text=text, blocks=blocks
        )
        if ts:
            self.ts = ts
            self.pacer.edited(self.channel, self.ts)

    async def _update_main(self) -> None:
        self._dirty = False
        text, blocks = self._render()
        response = await self._call(
            "chat.update", channel=self.channel, ts=self.ts, text=text, blocks=blocks
        )
        if response is not None:
            self.updates_sent += 1

    async def _send_note(self, note: Note) -> None:
        if note.kind is NoteKind.FAILURE and note.failure is not None:
            await self._post_failure(note.failure)
        elif note.failure is not None and id(note.failure) in self._replies:
            reply = self._replies[id(note.failure)]
            await self.pacer.wait(self.channel, reply)
            await self._call(
                "chat.update",
                channel=self.channel,
                ts=reply,
                text=failure_text(note.failure),
                blocks=failure_blocks(note.failure),
            )
        elif note.rollback is not None:
            await self._call(
                "chat.postMessage",
                channel=self.channel,
                thread_ts=self.ts,
                text=rollback_line(note.rollback),
                blocks=rollback_blocks(note.rollback),
            )

    async def _post_failure(self, failure: Failure) -> None:
        response = await self._call(
            "chat.postMessage",
            channel=self.channel,
            thread_ts=self.ts,
            text=failure_text(failure),
            blocks=failure_blocks(failure),
        )
        if response is not None and response.get("ts"):
            self._replies[id(failure)] = str(response["ts"])
            self.pacer.edited(self.channel, str(response["ts"]))

    async def _call(self, method: str, **args: Any) -> Any:
        """One Web API call; a rate limit is waited out once, every other error is logged.

        Every edit is recorded with the pacer once answered, so the next one waits its turn.
        """
        for attempt in range(2):
            try:
                response = await self.client.api_call(method, **web_api_args(method, args))
                if method == "chat.update":
                    self.pacer.edited(self.channel, str(args["ts"]))
                return response
            except SlackApiError as exc:
                status = getattr(exc.response, "status_code", None)
                if status == 429 and attempt == 0:
                    headers = getattr(exc.response, "headers", {}) or {}
                    retry_after = _retry_after(headers)
                    if method == "chat.update":
                        self.pacer.edited(self.channel, str(args["ts"]), after=retry_after)
                    if method == "chat.update" and args.get("ts") == self.ts:
                        # the main message: skip this state, the next edit carries a newer one
                        self._dirty = True
                        return None
                    await asyncio.sleep(retry_after)
                    continue
                log.warning("Slack %s failed: %s", method, exc.response.get("error", status))
                return None
            except Exception as exc:
                log.warning("Slack %s failed: %s", method, type(exc).__name__)
                return None
        return None


def _retry_after(headers: Any) -> float:
    value = None
    for key in ("Retry-After", "retry-after"):
        if key in headers:
            value = headers[key]
            break
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return max(0.0, float(value)) if value is not None else DEFAULT_RETRY_AFTER
    except ValueError:
        return DEFAULT_RETRY_AFTER
