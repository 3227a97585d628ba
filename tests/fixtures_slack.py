"""Fixtures for the Slack bot: the fake Slack Web API, signed slash commands and button clicks
(payload fields as `@slack/bolt` types them), and the bot's aiohttp app on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from slack_sdk.signature import SignatureVerifier

from bot.config import Settings
from tests.fakes.slack import BOT_USER_ID, DEFAULT_TOKEN, TEAM_DOMAIN, TEAM_ID, FakeSlack, Message
from tests.fixtures_github import local_bot_values

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CHANNEL = "C0DEPLOYS"
CHANNEL_NAME = "deploys"
REQUESTER = "U0REQUESTER"
APPROVER = "U0APPROVER"
STRANGER = "U0STRANGER"
API_APP_ID = "A0NIXMOX"
BOLT_TYPES = "slack-bolt-4.6.0"
COMMAND_TYPES = "dist/types/command/index.d.ts"
ACTION_TYPES = "dist/types/actions/block-action.d.ts"
PROGRESS_INTERVAL = 0.2  # seconds between edits of a progress message in tests


def testdata_dir() -> Path:
    return Path(os.environ.get("NIXMOX_TESTDATA", Path.home() / ".cache" / "nixmox-testdata"))


def bolt_types(member: str) -> str:
    """A `@slack/bolt` type declaration (fetched by tests/testdata.py)."""
    path = testdata_dir() / BOLT_TYPES / member
    assert path.is_file(), (
        f"missing test material {path}: run `./dev test` or "
        f"`.venv/bin/python tests/testdata.py {testdata_dir()}` (it fetches npm packages)"
    )
    return path.read_text()


def interface_fields(source: str, name: str) -> dict[str, bool]:
    """The top-level fields of a TypeScript interface: name → required."""
    start = re.search(rf"export interface {name}\b[^{{]*{{", source)
    assert start is not None, f"interface {name} not found"
    depth, index, body_start = 1, start.end(), start.end()
    while depth:
        char = source[index]
        depth += {"{": 1, "}": -1}.get(char, 0)
        index += 1
    body = source[body_start : index - 1]
    fields: dict[str, bool] = {}
    depth = 0
    for line in body.splitlines():
        stripped = line.strip()
        if depth == 0:
            match = re.match(r"^(\w+)(\??):", stripped)
            if match:
                fields[match.group(1)] = match.group(2) != "?"
        depth += stripped.count("{") - stripped.count("}")
    return fields


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    """The fake Slack Web API; the test fails if the bot broke one of Slack's conventions."""
    fake = FakeSlack(min_update_gap=PROGRESS_INTERVAL * 0.95)
    await fake.start()
    yield fake
    await fake.stop()
    assert fake.violations == [], "requests Slack would have refused"
    assert fake.rate_limited == [], "message edits faster than the coalescing interval"


def slack_settings(tmp_path: Path, fake: FakeSlack, remote: Path, **overrides: Any) -> Settings:
    """A Slack-only bot (GitHub off) cloning the manifest from a local repository."""
    values: dict[str, Any] = {
        **slack_overrides(fake),
        "approval_ttl": timedelta(minutes=15),
        **local_bot_values(tmp_path, remote),
    }
    values.update(overrides)
    return Settings(**values)


def slack_overrides(fake: FakeSlack) -> dict[str, Any]:
    """The settings that turn Slack on, against the fake Slack."""
    return {
        "slack_signing_secret": SIGNING_SECRET,
        "slack_bot_token": DEFAULT_TOKEN,
        "slack_api_url": fake.api_url,
        "slack_channel": CHANNEL,
        "slack_approvers": [APPROVER],
    }


def slack_process_env(fake: FakeSlack, **settings: str) -> dict[str, str]:
    """The environment of a `nixmox` process with Slack on against the fake, and `settings`
    (none of this process's own NIXMOX_* settings leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXMOX_")}
    env.update(
        NIXMOX_SLACK_SIGNING_SECRET=SIGNING_SECRET,
        NIXMOX_SLACK_BOT_TOKEN=DEFAULT_TOKEN,
        NIXMOX_SLACK_API_URL=fake.api_url,
        NIXMOX_SLACK_CHANNEL=CHANNEL,
        **settings,
    )
    return env


def sign(body: bytes, timestamp: int, secret: str = SIGNING_SECRET) -> dict[str, str]:
    """Slack's request headers for `body`."""
    signature = SignatureVerifier(secret).generate_signature(timestamp=str(timestamp), body=body)
    assert signature is not None
    return {"X-Slack-Request-Timestamp": str(timestamp), "X-Slack-Signature": signature}


@dataclass
class Sent:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text) if self.text else None


@dataclass
class SlackDriver:
    """Sends what Slack sends the bot: signed slash commands and button clicks."""

    client: Any  # aiohttp TestClient of the bot's app
    fake: FakeSlack
    secret: str = SIGNING_SECRET
    clock: Callable[[], float] = time.time
    sent: list[dict[str, Any]] = field(default_factory=list)

    def command_payload(self, text: str, user: str, channel: str) -> dict[str, str]:
        """The form fields of a slash command (bolt's `SlashCommand`)."""
        return {
            "token": "verification-token-unused",
            "command": "/nixmox",
            "text": text,
            "response_url": self.fake.new_response_url(),
            "trigger_id": f"{uuid.uuid4().int % 10**12}.{TEAM_ID}",
            "user_id": user,
            "user_name": user.lower(),
            "team_id": TEAM_ID,
            "team_domain": TEAM_DOMAIN,
            "channel_id": channel,
            "channel_name": self.fake.channels.get(channel, "unknown"),
            "api_app_id": API_APP_ID,
        }

    def action_payload(self, message: Message, button: dict[str, Any], user: str) -> dict[str, Any]:
        """A `block_actions` payload for a click on `button` of `message` (bolt's `BlockAction`)."""
        block_id = next(
            block.get("block_id", "")
            for block in message.blocks
            if block.get("type") == "actions" and button in block.get("elements", [])
        )
        return {
            "type": "block_actions",
            "actions": [
                {
                    "type": "button",
                    "block_id": block_id,
                    "action_id": button["action_id"],
                    "action_ts": f"{time.time():.6f}",
                    "value": button.get("value"),
                    "text": button["text"],
                    **({"style": button["style"]} if "style" in button else {}),
                }
            ],
            "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
            "user": {
                "id": user,
                "username": user.lower(),
                "name": user.lower(),
                "team_id": TEAM_ID,
            },
            "channel": {"id": message.channel, "name": self.fake.channels[message.channel]},
            "message": {
                "type": "message",
                "user": BOT_USER_ID,
                "ts": message.ts,
                "text": message.text,
                "blocks": message.blocks,
            },
            "state": {"values": {}},
            "token": "verification-token-unused",
            "response_url": self.fake.new_response_url(),
            "trigger_id": f"{uuid.uuid4().int % 10**12}.{TEAM_ID}",
            "api_app_id": API_APP_ID,
            "container": {
                "type": "message",
                "message_ts": message.ts,
                "channel_id": message.channel,
                "is_ephemeral": False,
            },
        }

    async def post(
        self,
        body: bytes,
        content_type: str,
        *,
        timestamp: int | None = None,
        secret: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Sent:
        stamp = int(self.clock()) if timestamp is None else timestamp
        signed = sign(body, stamp, secret or self.secret) if headers is None else headers
        response = await self.client.post(
            "/slack/events",
            data=body,
            headers={"Content-Type": content_type, **signed},
        )
        return Sent(response.status, await response.text())

    async def command(
        self, text: str, *, user: str = REQUESTER, channel: str = CHANNEL, **signing: Any
    ) -> Sent:
        payload = self.command_payload(text, user, channel)
        self.sent.append(payload)
        body = urlencode(payload).encode()
        return await self.post(body, "application/x-www-form-urlencoded", **signing)

    async def click(self, message: Message, label: str, *, user: str, **signing: Any) -> Sent:
        """Press the button labelled `label` on `message` as `user`."""
        buttons = {b["text"]["text"]: b for b in message.buttons()}
        assert label in buttons, f"no {label!r} button on the message; it has {sorted(buttons)}"
        payload = self.action_payload(message, buttons[label], user)
        self.sent.append(payload)
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.post(body, "application/x-www-form-urlencoded", **signing)


@pytest.fixture
def slack_driver_factory(fake_slack: FakeSlack) -> Callable[[Any], SlackDriver]:
    return lambda client: SlackDriver(client, fake_slack)
