"""A fake Slack Web API served over HTTP on 127.0.0.1 that checks every request it gets.

It answers `auth.test`, `chat.postMessage` (with message `metadata`), `chat.update`,
`chat.postEphemeral`, `conversations.history` and `conversations.replies` (form or query
arguments only, as Slack reads them; metadata listed only with `include_all_metadata`) and
posts to the `response_url`s it hands out, and checks each request against Slack's conventions:
the token in the `Authorization: Bearer` header (never in the body), the required arguments,
that an updated or threaded message exists in that channel and was posted by the bot, and that
Block Kit payloads stay within Slack's documented limits. Anything wrong gets the error Slack
would answer (`{"ok": false, "error": ...}`) and is recorded in `violations`, so a test can end
with `assert fake.violations == []`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

DEFAULT_TOKEN = "xoxb-1111-2222-fake-bot-token"
BOT_USER_ID = "U0NIXBOT"
BOT_ID = "B0NIXBOT"
TEAM_ID = "T0HOMELAB"
TEAM_DOMAIN = "homelab"

# Slack's documented Block Kit and message limits (api.slack.com/reference/block-kit).
MAX_BLOCKS = 50
MAX_MESSAGE_TEXT = 40_000
MAX_SECTION_TEXT = 3_000
MAX_SECTION_FIELDS = 10
MAX_FIELD_TEXT = 2_000
MAX_HEADER_TEXT = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_ACTIONS_ELEMENTS = 25
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2_000
MAX_ID = 255
MAX_RESPONSE_URL_USES = 5
KNOWN_BLOCKS = frozenset({"section", "header", "context", "actions", "divider", "image"})
RESPONSE_FIELDS = frozenset(
    {"text", "blocks", "response_type", "replace_original", "delete_original", "thread_ts"}
)


@dataclass
class Call:
    """One request the fake received."""

    method: str
    args: dict[str, Any]
    ok: bool
    error: str | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class Message:
    """A message the bot posted, with every version it had."""

    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    thread_ts: str | None = None
    user: str = BOT_USER_ID
    versions: list[dict[str, Any]] = field(default_factory=list)
    update_times: list[float] = field(default_factory=list)
    metadata: dict[str, Any] | None = None  # Slack message metadata (event_type, event_payload)

    def as_listed(self, *, with_metadata: bool) -> dict[str, Any]:
        """The message as conversations.history / .replies list it."""
        listed: dict[str, Any] = {
            "type": "message", "user": self.user, "ts": self.ts, "text": self.text,
            "blocks": self.blocks,
            **({"thread_ts": self.thread_ts} if self.thread_ts else {}),
        }  # fmt: skip
        if with_metadata and self.metadata is not None:
            listed["metadata"] = self.metadata
        return listed

    @property
    def updates(self) -> int:
        return len(self.update_times)

    def all_text(self) -> str:
        """The fallback text and every text object of the blocks, for assertions."""
        return "\n".join([self.text, *_block_texts(self.blocks)])

    def buttons(self) -> list[dict[str, Any]]:
        return [
            element
            for block in self.blocks
            if block.get("type") == "actions"
            for element in block.get("elements", [])
            if element.get("type") == "button"
        ]


@dataclass
class Ephemeral:
    channel: str
    user: str
    text: str
    blocks: list[dict[str, Any]]

    def all_text(self) -> str:
        return "\n".join([self.text, *_block_texts(self.blocks)])


@dataclass
class Response:
    """A post to a response_url."""

    key: str
    body: dict[str, Any]

    def all_text(self) -> str:
        return "\n".join([str(self.body.get("text", "")), *_block_texts(self.body.get("blocks"))])


def _block_texts(blocks: Any) -> list[str]:
    """Every text string inside a list of blocks."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") in {"plain_text", "mrkdwn"} and isinstance(node.get("text"), str):
                found.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(blocks or [])
    return found


def check_text_object(
    obj: Any, where: str, *, plain_only: bool = False, limit: int = 0
) -> list[str]:
    """Problems with one composition text object."""
    if not isinstance(obj, dict) or obj.get("type") not in {"plain_text", "mrkdwn"}:
        return [f"{where}: not a text object: {obj!r:.80}"]
    if plain_only and obj["type"] != "plain_text":
        return [f"{where}: must be plain_text"]
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        return [f"{where}: text must be a non-empty string"]
    if limit and len(text) > limit:
        return [f"{where}: text is {len(text)} characters, the limit is {limit}"]
    return []


def check_button(element: dict[str, Any], where: str) -> list[str]:
    problems = check_text_object(
        element.get("text"), f"{where}.text", plain_only=True, limit=MAX_BUTTON_TEXT
    )
    action_id = element.get("action_id")
    if not isinstance(action_id, str) or not action_id or len(action_id) > MAX_ID:
        problems.append(f"{where}: action_id missing or longer than {MAX_ID}")
    value = element.get("value")
    if value is not None and (not isinstance(value, str) or len(value) > MAX_BUTTON_VALUE):
        problems.append(f"{where}: value must be a string of at most {MAX_BUTTON_VALUE}")
    if element.get("style") not in {None, "primary", "danger"}:
        problems.append(f"{where}: style must be primary or danger")
    return problems


def check_block(block: Any, where: str) -> list[str]:
    """Problems with one layout block."""
    if not isinstance(block, dict):
        return [f"{where}: not an object"]
    kind = block.get("type")
    if kind not in KNOWN_BLOCKS:
        return [f"{where}: unknown block type {kind!r}"]
    block_id = block.get("block_id")
    if block_id is not None and (not isinstance(block_id, str) or len(block_id) > MAX_ID):
        return [f"{where}: block_id must be a string of at most {MAX_ID}"]
    problems: list[str] = []
    if kind == "section":
        if "text" not in block and "fields" not in block:
            problems.append(f"{where}: a section needs text or fields")
        if "text" in block:
            problems += check_text_object(block["text"], f"{where}.text", limit=MAX_SECTION_TEXT)
        fields = block.get("fields", [])
        if len(fields) > MAX_SECTION_FIELDS:
            problems.append(f"{where}: more than {MAX_SECTION_FIELDS} fields")
        for i, item in enumerate(fields):
            problems += check_text_object(item, f"{where}.fields[{i}]", limit=MAX_FIELD_TEXT)
        accessory = block.get("accessory")
        if accessory is not None and accessory.get("type") == "button":
            problems += check_button(accessory, f"{where}.accessory")
    elif kind == "header":
        problems += check_text_object(
            block.get("text"), f"{where}.text", plain_only=True, limit=MAX_HEADER_TEXT
        )
    elif kind == "context":
        elements = block.get("elements") or []
        if not elements or len(elements) > MAX_CONTEXT_ELEMENTS:
            problems.append(f"{where}: a context needs 1 to {MAX_CONTEXT_ELEMENTS} elements")
        for i, item in enumerate(elements):
            if item.get("type") != "image":
                problems += check_text_object(item, f"{where}.elements[{i}]")
    elif kind == "actions":
        elements = block.get("elements") or []
        if not elements or len(elements) > MAX_ACTIONS_ELEMENTS:
            problems.append(f"{where}: an actions block needs 1 to {MAX_ACTIONS_ELEMENTS} elements")
        for i, item in enumerate(elements):
            if item.get("type") == "button":
                problems += check_button(item, f"{where}.elements[{i}]")
    return problems


def check_blocks(blocks: Any) -> list[str]:
    """Problems with a message's blocks (empty list: valid)."""
    if not isinstance(blocks, list):
        return ["blocks must be an array"]
    if len(blocks) > MAX_BLOCKS:
        return [f"{len(blocks)} blocks, the limit is {MAX_BLOCKS}"]
    problems: list[str] = []
    ids = [b.get("block_id") for b in blocks if isinstance(b, dict) and b.get("block_id")]
    if len(ids) != len(set(ids)):
        problems.append("block_id values must be unique within a message")
    action_ids = [
        e.get("action_id")
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "actions"
        for e in b.get("elements", [])
    ]
    if len(action_ids) != len(set(action_ids)):
        problems.append("action_id values must be unique within a message")
    for i, block in enumerate(blocks):
        problems += check_block(block, f"blocks[{i}]")
    return problems


READ_METHODS = frozenset({"conversations.history", "conversations.replies"})
LISTING_ARGUMENTS = frozenset(
    {"channel", "cursor", "include_all_metadata", "inclusive", "latest", "limit", "oldest"}
)
MAX_LISTING = 999
EVENT_TYPE = re.compile(r"^[a-zA-Z0-9_]{1,255}$")


def _flag(value: Any, name: str) -> bool:
    """A boolean argument as Slack reads it from a form or query."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).lower() in {"true", "1"}:
        return True
    if str(value).lower() in {"false", "0", ""}:
        return False
    raise SlackError("invalid_arguments", f"{name} must be a boolean")


def _integer(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SlackError("invalid_arguments", f"{name} must be an integer") from None


def _timestamp(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SlackError("invalid_ts_oldest" if name == "oldest" else "invalid_ts_latest") from None


class SlackError(Exception):
    """A request Slack would refuse with `{"ok": false, "error": code}`."""

    def __init__(self, code: str, detail: str = "", *, injected: bool = False) -> None:
        super().__init__(code)
        self.code, self.detail, self.injected = code, detail, injected


class FakeSlack:
    """The fake Web API; `start()` it, point the bot at `api_url`, then inspect what it got."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        channels: dict[str, str] | None = None,
        min_update_gap: float | None = None,
    ) -> None:
        self.token = token
        self.channels = channels or {"C0DEPLOYS": "deploys", "C0GENERAL": "general"}
        # when set, a chat.update of one message closer than this to the previous one gets a
        # 429 with Retry-After, as Slack's rate limits would
        self.min_update_gap = min_update_gap
        self.calls: list[Call] = []
        self.violations: list[str] = []
        self.rate_limited: list[Call] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.ephemerals: list[Ephemeral] = []
        self.responses: list[Response] = []
        self.fail: dict[str, str] = {}  # method -> Slack error code to answer with
        self.http_fail: set[str] = set()  # methods answered with HTTP 500
        self._response_urls: dict[str, int] = {}
        self._ts = itertools.count(1)
        self._seconds = int(time.time())
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # slack_sdk reads history with GET
        app.router.add_post("/response/{key}", self._response)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def new_response_url(self) -> str:
        """A response_url as Slack puts in a slash command or interaction payload."""
        key = f"T{len(self._response_urls) + 1:04d}"
        self._response_urls[key] = 0
        return f"http://127.0.0.1:{self.port}/response/{key}"

    # -- queries for tests ---------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    def channel_messages(self, channel: str, *, thread_ts: str | None = None) -> list[Message]:
        """Top-level messages of a channel (or the replies of one thread), oldest first."""
        return [
            m for m in self.messages.values() if m.channel == channel and m.thread_ts == thread_ts
        ]

    def replies(self, channel: str, ts: str) -> list[Message]:
        return self.channel_messages(channel, thread_ts=ts)

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> Any:
        """Wait until `predicate()` returns something truthy (re-checked on every request)."""

        async def until() -> Any:
            async with self._changed:
                while not (result := predicate()):
                    await self._changed.wait()
                return result

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"fake Slack: condition not met within {timeout}s; calls: "
                + ", ".join(f"{c.method}{'' if c.ok else '!' + str(c.error)}" for c in self.calls)
            ) from None

    # -- request handling ----------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        try:
            args = await self._read_args(request)
            if method in READ_METHODS and request.content_type == "application/json":
                # Slack reads only form or query arguments for these: a JSON body is ignored
                raise SlackError("invalid_arguments", f"{method} takes no JSON body")
        except SlackError as exc:
            return await self._answer(method, {}, exc)
        if method in self.http_fail:
            await self._record(Call(method, args, ok=False, error="http_500"))
            return web.Response(status=500, text="fake Slack: internal error")
        try:
            self._check_token(request, args)
            if method in self.fail:
                raise SlackError(self.fail[method], injected=True)
            handler = {
                "auth.test": self._auth_test,
                "chat.postMessage": self._post_message,
                "chat.update": self._update,
                "chat.postEphemeral": self._post_ephemeral,
                "conversations.history": self._history,
                "conversations.replies": self._replies,
            }.get(method)
            if handler is None:
                raise SlackError("unknown_method", method)
            result = handler(args)
        except SlackError as exc:
            return await self._answer(method, args, exc)
        except RateLimited as exc:
            call = Call(method, args, ok=False, error="ratelimited")
            self.rate_limited.append(call)
            await self._record(call)
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": str(exc.retry_after)},
            )
        await self._record(Call(method, args, ok=True))
        return web.json_response({"ok": True, **result})

    async def _answer(self, method: str, args: dict[str, Any], exc: SlackError) -> web.Response:
        """Slack answers errors with HTTP 200 and ok=false; the fake also records a violation."""
        if not exc.injected:
            self.violations.append(f"{method}: {exc.code} {exc.detail}".strip())
        await self._record(Call(method, args, ok=False, error=exc.code))
        return web.json_response({"ok": False, "error": exc.code})

    async def _record(self, call: Call) -> None:
        self.calls.append(call)
        async with self._changed:
            self._changed.notify_all()

    async def _read_args(self, request: web.Request) -> dict[str, Any]:
        """Arguments from a JSON body or a form body (Slack accepts both)."""
        if request.method == "GET":
            return dict(request.query)
        raw = await request.read()
        ctype = request.content_type
        if ctype == "application/json":
            if request.charset not in {None, "utf-8"}:
                raise SlackError("invalid_charset")
            try:
                args = json.loads(raw or b"{}")
            except ValueError:
                raise SlackError("invalid_json") from None
            if not isinstance(args, dict):
                raise SlackError("invalid_json")
            return args
        if ctype in {"application/x-www-form-urlencoded", ""}:
            args = dict(parse_qsl(raw.decode()))
            if isinstance(args.get("blocks"), str):
                try:
                    args["blocks"] = json.loads(args["blocks"])
                except ValueError:
                    raise SlackError("invalid_blocks_format") from None
            return args
        raise SlackError("invalid_form_data", f"content type {ctype}")

    def _check_token(self, request: web.Request, args: dict[str, Any]) -> None:
        if "token" in args:
            # slack_sdk sends the token in the header; a token in the body ends up in logs
            raise SlackError("invalid_arguments", "token sent in the body")
        header = request.headers.get("Authorization", "")
        if not header:
            raise SlackError("not_authed")
        if header != f"Bearer {self.token}":
            raise SlackError("invalid_auth")

    def _next_ts(self) -> str:
        return f"{self._seconds}.{next(self._ts):06d}"

    def _channel(self, args: dict[str, Any]) -> str:
        channel = args.get("channel")
        if not channel:
            raise SlackError("channel_not_found", "channel is required")
        if channel not in self.channels:
            raise SlackError("channel_not_found", str(channel))
        return str(channel)

    @staticmethod
    def _content(args: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """The text and blocks of a message, checked."""
        text = args.get("text")
        blocks = args.get("blocks")
        if not text and not blocks and not args.get("attachments"):
            raise SlackError("no_text")
        if text is not None and not isinstance(text, str):
            raise SlackError("invalid_arguments", "text must be a string")
        if text and len(text) > MAX_MESSAGE_TEXT:
            raise SlackError("msg_too_long")
        if blocks is not None:
            problems = check_blocks(blocks)
            if problems:
                raise SlackError("invalid_blocks", "; ".join(problems[:5]))
            if not text:
                # Slack accepts it, but notifications and screen readers then show nothing
                raise SlackError("missing_fallback_text", "blocks without a top-level text")
        return text or "", list(blocks or [])

    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{TEAM_DOMAIN}.slack.com/",
            "team": "Homelab",
            "user": "nixmox",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _post_message(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(args)
        text, blocks = self._content(args)
        thread_ts = args.get("thread_ts")
        if thread_ts is not None:
            parent = self.messages.get((channel, str(thread_ts)))
            if parent is None:
                raise SlackError("thread_not_found", str(thread_ts))
            if parent.thread_ts is not None:
                raise SlackError("invalid_thread_ts", "replies go to the parent message")
        metadata = self._metadata(args.get("metadata"))
        ts = self._next_ts()
        message = Message(channel, ts, text, blocks, thread_ts=thread_ts, metadata=metadata)
        message.versions.append({"text": text, "blocks": blocks})
        self.messages[(channel, ts)] = message
        return {"channel": channel, "ts": ts, "message": {"text": text, "blocks": blocks}}

    def _update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(args)
        ts = args.get("ts")
        if not ts:
            raise SlackError("message_not_found", "ts is required")
        message = self.messages.get((channel, str(ts)))
        if message is None:
            raise SlackError("message_not_found", f"{channel}/{ts}")
        if message.user != BOT_USER_ID:
            raise SlackError("cant_update_message")
        text, blocks = self._content(args)
        now = time.monotonic()
        last = message.update_times[-1] if message.update_times else None
        gap = self.min_update_gap
        if gap is not None and last is not None and now - last < gap:
            raise RateLimited(1)
        message.text, message.blocks = text, blocks
        message.versions.append({"text": text, "blocks": blocks})
        message.update_times.append(now)
        return {"channel": channel, "ts": message.ts, "text": text}

    @staticmethod
    def _metadata(value: Any) -> dict[str, Any] | None:
        """chat.postMessage `metadata`: an event_type and an event_payload object."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise SlackError("invalid_metadata_format", "not JSON") from None
        if not isinstance(value, dict) or set(value) != {"event_type", "event_payload"}:
            raise SlackError("invalid_metadata_format", "event_type and event_payload only")
        if not isinstance(value["event_type"], str) or not EVENT_TYPE.match(value["event_type"]):
            raise SlackError("invalid_metadata_format", "event_type")
        if not isinstance(value["event_payload"], dict):
            raise SlackError("invalid_metadata_format", "event_payload must be an object")
        return value

    def _listing(
        self, args: dict[str, Any], messages: list[Message], *, newest_first: bool
    ) -> dict[str, Any]:
        """One page of `messages` as the conversations.* read methods answer, arguments checked."""
        unknown = set(args) - LISTING_ARGUMENTS
        if unknown:
            raise SlackError("invalid_arguments", f"unknown arguments {sorted(unknown)}")
        flags = {
            name: _flag(args.get(name), name) for name in ("include_all_metadata", "inclusive")
        }
        limit = _integer(args.get("limit", 100), "limit")
        if not 1 <= limit <= MAX_LISTING:
            raise SlackError("invalid_limit", str(limit))
        oldest = _timestamp(args.get("oldest", "0"), "oldest")
        latest = _timestamp(args.get("latest", str(time.time() + 1e6)), "latest")

        def within(message: Message) -> bool:
            ts = float(message.ts)
            if flags["inclusive"]:
                return oldest <= ts <= latest
            return oldest < ts < latest

        found = sorted((m for m in messages if within(m)), key=lambda m: float(m.ts))
        if newest_first:
            found.reverse()
        start = _integer(args.get("cursor", "0"), "cursor")
        page = found[start : start + limit]
        more = start + limit < len(found)
        return {
            "messages": [m.as_listed(with_metadata=flags["include_all_metadata"]) for m in page],
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _history(self, args: dict[str, Any]) -> dict[str, Any]:
        """A channel's messages (thread replies are not listed), newest first."""
        channel = self._channel(args)
        listed = [
            m
            for (where, _), m in self.messages.items()
            if where == channel and (m.thread_ts is None or m.thread_ts == m.ts)
        ]
        return self._listing(args, listed, newest_first=True)

    def _replies(self, args: dict[str, Any]) -> dict[str, Any]:
        """A thread: its parent and replies, oldest first."""
        channel = self._channel(args)
        ts = args.get("ts")
        if not ts:
            raise SlackError("invalid_arguments", "ts is required")
        if (channel, str(ts)) not in self.messages:
            raise SlackError("thread_not_found", str(ts))
        thread = [
            m
            for (where, _), m in self.messages.items()
            if where == channel and (m.ts == ts or m.thread_ts == ts)
        ]
        rest = {key: value for key, value in args.items() if key != "ts"}
        return self._listing(rest, thread, newest_first=False)

    def _post_ephemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(args)
        user = args.get("user")
        if not user:
            raise SlackError("user_not_in_channel", "user is required")
        text, blocks = self._content(args)
        self.ephemerals.append(Ephemeral(channel, str(user), text, blocks))
        return {"message_ts": self._next_ts()}

    async def _response(self, request: web.Request) -> web.Response:
        """A post to a response_url: JSON, known fields, at most five uses."""
        key = request.match_info["key"]
        if key not in self._response_urls:
            self.violations.append(f"response_url: unknown url {key}")
            return web.Response(status=404, text="no_such_response_url")
        self._response_urls[key] += 1
        problems: list[str] = []
        if self._response_urls[key] > MAX_RESPONSE_URL_USES:
            problems.append(f"used more than {MAX_RESPONSE_URL_USES} times")
        body: dict[str, Any] = {}
        if request.content_type != "application/json":
            problems.append(f"content type {request.content_type}, expected application/json")
        else:
            try:
                body = json.loads(await request.read())
            except ValueError:
                problems.append("body is not JSON")
        if body:
            unknown = set(body) - RESPONSE_FIELDS
            if unknown:
                problems.append(f"unknown fields {sorted(unknown)}")
            if body.get("response_type") not in {None, "ephemeral", "in_channel"}:
                problems.append("response_type must be ephemeral or in_channel")
            if not body.get("text") and not body.get("blocks") and not body.get("delete_original"):
                problems.append("no text")
            if body.get("blocks") is not None:
                problems += check_blocks(body["blocks"])
        if problems:
            self.violations.extend(f"response_url {key}: {p}" for p in problems)
            await self._record(Call("response_url", body, ok=False, error=problems[0]))
            return web.Response(status=400, text="invalid_payload")
        self.responses.append(Response(key, body))
        await self._record(Call("response_url", body, ok=True))
        return web.Response(text="ok")


class RateLimited(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after
