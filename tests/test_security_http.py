"""HTTP intake under attack: body limits, slow bodies, memory, deep nesting and replays.

Requests go over real sockets to the aiohttp app on 127.0.0.1 (raw ones where a well-behaved
client could not send them), or to a real `nixmox serve` where the server's memory is measured.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from bot.app import build_app
from bot.limits import GITHUB_LIMIT, OTHER_ROUTES_LIMIT, SLACK_LIMIT, BodyBudget, nesting_depth
from state.store import Store
from tests.fakes.github import DEFAULT_TOKEN, FakeGitHub
from tests.fakes.slack import FakeSlack
from tests.fixtures_github import (
    TEST_REPO,
    WEBHOOK_SECRET,
    ManifestRepo,
    Payloads,
    add_port,
    delivery_headers,
    fast_runners,
    sign,
)
from tests.fixtures_slack import CHANNEL, REQUESTER, SlackDriver, slack_settings
from tests.fixtures_slack import sign as slack_sign
from tests.test_serve import Server, server_env, write_config
from tests.test_slack_flow import Bot as SlackBot
from tests.test_slack_flow import start_bot

SHA_A, SHA_B = "a" * 40, "b" * 40
GUARD = 60.0  # seconds a test waits for an answer before it fails (never a speed assertion)
MB = 10**6


# --- raw HTTP ------------------------------------------------------------------------------


async def raw_request(
    port: int, head: str, body_chunks: list[bytes] | None = None, *, pause: float = 0.0
) -> tuple[int | None, bytes]:
    """Send a request head (and body pieces, `pause` apart); the status and the answer.

    The status is None when the server closed the connection without an answer. Sending
    stops as soon as the server answers or closes.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode())
        await writer.drain()
        answer = asyncio.create_task(read_answer(reader))
        for chunk in body_chunks or []:
            if answer.done():
                break
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            if pause:
                await asyncio.wait([answer], timeout=pause)
        try:
            data = await asyncio.wait_for(answer, GUARD)
        except ConnectionError:
            data = b""
    finally:
        writer.close()
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    return int(data.split(b" ", 2)[1]), data


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One HTTP answer (head and its Content-Length of body), or what came before EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
         if line.startswith(b"content-length:")),
        0,
    )  # fmt: skip
    return head + await reader.readexactly(length)


def head_of(path: str, headers: dict[str, str], *, method: str = "POST") -> str:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(data: bytes, piece: int = 1024 * 1024) -> list[bytes]:
    """`data` in HTTP/1.1 chunked encoding, closed by the last chunk."""
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


def port_of(client: Any) -> int:
    return int(client.server.port)


# --- sizes ---------------------------------------------------------------------------------


async def start_both(
    aiohttp_client: Any, tmp_path: Path, fake_github: FakeGitHub, fake_slack: FakeSlack,
    manifest_repo: ManifestRepo, **overrides: Any,
) -> SlackBot:  # fmt: skip
    """The app with GitHub and Slack both on, talking to the fakes, jobs run by its worker."""
    settings = slack_settings(
        tmp_path, fake_slack, manifest_repo.path,
        github_webhook_secret=WEBHOOK_SECRET, github_token=DEFAULT_TOKEN,
        github_api_url=fake_github.url, repo=TEST_REPO, **overrides,
    )  # fmt: skip
    app = build_app(settings, runner_config=fast_runners())
    client = await aiohttp_client(app)
    return SlackBot(app, SlackDriver(client, fake_slack), fake_slack)


@pytest.fixture
async def both(
    aiohttp_client: Any, tmp_path: Path, fake_github: FakeGitHub, fake_slack: FakeSlack,
    manifest_repo: ManifestRepo,
) -> SlackBot:  # fmt: skip
    return await start_both(aiohttp_client, tmp_path, fake_github, fake_slack, manifest_repo)


@pytest.mark.parametrize(
    ("path", "limit", "method"),
    [
        ("/github/webhook", GITHUB_LIMIT, "POST"),
        ("/slack/events", SLACK_LIMIT, "POST"),
        ("/healthz", OTHER_ROUTES_LIMIT, "GET"),
        ("/metrics", OTHER_ROUTES_LIMIT, "GET"),
    ],
)
async def test_a_body_over_its_routes_limit_is_refused_by_its_length_before_it_is_sent(
    both: Any, path: str, limit: int, method: str
) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(limit + 1)}
    # only the head is sent: an answer proves nothing waited for the body
    status, answer = await raw_request(
        port_of(both.driver.client), head_of(path, headers, method=method)
    )
    assert status == 413, answer[:300]
    assert f"larger than {limit} bytes".encode() in answer


@pytest.mark.parametrize(
    ("path", "limit"), [("/github/webhook", GITHUB_LIMIT), ("/slack/events", SLACK_LIMIT)]
)
async def test_a_chunked_body_without_a_length_is_cut_at_the_same_limit(
    both: Any, path: str, limit: int
) -> None:
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    body = b" " * (limit + 64 * 1024)
    status, answer = await raw_request(
        port_of(both.driver.client), head_of(path, headers), chunked(body)
    )
    assert status == 413, answer[:300]


async def test_bodies_within_the_limits_still_reach_the_handlers(both: Any) -> None:
    port = port_of(both.driver.client)
    body = b"{}"
    for path in ("/github/webhook", "/slack/events"):
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        status, _ = await raw_request(port, head_of(path, headers), [body])
        assert status == 401  # read whole, then refused for its missing signature
    status, _ = await raw_request(
        port, head_of("/slack/events", {"Transfer-Encoding": "chunked"}), chunked(b"x=1")
    )
    assert status == 401


# --- time ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/github/webhook", "/slack/events"])
async def test_a_trickled_body_is_cut_off_after_the_configured_time(
    aiohttp_client: Any, tmp_path: Path, fake_github: FakeGitHub, fake_slack: FakeSlack,
    manifest_repo: ManifestRepo, path: str,
) -> None:  # fmt: skip
    bot = await start_both(
        aiohttp_client, tmp_path, fake_github, fake_slack, manifest_repo,
        github_body_timeout=1.0, slack_body_timeout=1.0,
    )  # fmt: skip
    headers = {"Content-Type": "application/json", "Content-Length": "200"}
    # one byte every 0.5 s would take 100 s; the server answers 408 long before the last byte
    status, answer = await raw_request(
        port_of(bot.driver.client), head_of(path, headers), [b" "] * 200, pause=0.5
    )
    assert status == 408, answer[:300]
    assert b"did not arrive within 1 seconds" in answer


async def test_a_body_waits_for_room_in_the_budget_within_its_own_time(
    aiohttp_client: Any, tmp_path: Path, fake_github: FakeGitHub, fake_slack: FakeSlack,
    manifest_repo: ManifestRepo,
) -> None:  # fmt: skip
    bot = await start_both(
        aiohttp_client, tmp_path, fake_github, fake_slack, manifest_repo,
        github_body_timeout=1.0, slack_body_timeout=3.0, body_bytes_in_flight=1000,
    )  # fmt: skip
    port = port_of(bot.driver.client)
    headers = {"Content-Type": "application/json", "Content-Length": "900"}
    # a Slack body holds 900 of the 1000 bytes while it trickles for 3 s; a GitHub body
    # (1 s to arrive) finds no room in its time
    first = asyncio.create_task(
        raw_request(port, head_of("/slack/events", headers), [b" "] * 900, pause=0.3)
    )
    await asyncio.sleep(0.2)
    status, answer = await raw_request(port, head_of("/github/webhook", headers), [b" " * 900])
    assert status == 503, answer[:300]
    assert (await first)[0] == 408
    # once both are answered the room is back: a small body goes through to the handler
    status, _ = await raw_request(
        port, head_of("/github/webhook", {**headers, "Content-Length": "2"}), [b"{}"]
    )
    assert status == 401


async def test_each_webhook_route_declares_its_body_limit(both: Any) -> None:
    from bot.github import WEBHOOK_PATH
    from bot.limits import LIMITS
    from bot.slack.bot import EVENTS_PATH

    rules = both.app[LIMITS].rules
    assert rules[WEBHOOK_PATH].limit == GITHUB_LIMIT
    assert rules[EVENTS_PATH].limit == SLACK_LIMIT


def test_body_timeouts_are_settings_with_defaults() -> None:
    from bot.config import Settings

    settings = Settings()
    assert (settings.github_body_timeout, settings.slack_body_timeout) == (30.0, 10.0)
    assert settings.body_bytes_in_flight == 64 * 1024 * 1024


async def test_the_budget_hands_out_bytes_first_come_first_served() -> None:
    budget = BodyBudget(100)
    assert await budget.acquire(60) == 60
    second = asyncio.create_task(budget.acquire(60))
    third = asyncio.create_task(budget.acquire(10))
    await asyncio.sleep(0)
    assert not second.done() and not third.done()  # the third waits behind the second
    budget.release(60)
    assert await second == 60 and await third == 10
    assert budget.free == 30
    waiting = asyncio.create_task(budget.acquire(500))  # more than all: waits for all of it
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    budget.release(60)
    budget.release(10)
    assert budget.free == 100


# --- memory --------------------------------------------------------------------------------


def memory_kb(pid: int, field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (the peak so far) of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def upload(port: int, size: int, *, with_length: bool) -> int | None:
    """An unsigned upload of `size` bytes to the webhook, with or without Content-Length."""
    piece = b"x" * MB
    if with_length:
        headers = {"Content-Type": "application/json", "Content-Length": str(size)}
        body = [piece] * (size // MB)
    else:
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        body = [b"%x\r\n%s\r\n" % (MB, piece)] * (size // MB) + [b"0\r\n\r\n"]
    status, _ = await raw_request(port, head_of("/github/webhook", headers), body)
    return status


async def test_many_concurrent_oversized_uploads_keep_the_servers_memory_bounded(
    tmp_path: Path, fake_github: FakeGitHub, manifest_repo: ManifestRepo
) -> None:
    import aiohttp

    server = Server(
        write_config(tmp_path, fake_github, manifest_repo.path), server_env(), tmp_path / "log"
    )
    try:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)
        pid = server.proc.pid
        before = memory_kb(pid, "VmRSS")
        for with_length in (True, False):
            statuses = await asyncio.gather(
                *(upload(server.port, 27 * MB, with_length=with_length) for _ in range(20))
            )
            # refused (413; 503 when waiting for room took all its time) or cut off
            assert set(statuses) <= {413, 503, None}, statuses
            assert 413 in statuses
        peak = memory_kb(pid, "VmHWM")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/healthz") as response,
        ):
            assert response.status == 200
    finally:
        server.stop()
    print(f"serve RSS before the uploads {before} kB, peak {peak} kB")  # shown with -rP
    # twenty 27 MB bodies buffered whole would be 540 MB; at most 64 MiB are received at once
    assert (peak - before) * 1024 < 200 * MB, f"grew from {before} kB to a peak of {peak} kB"


# --- deep nesting --------------------------------------------------------------------------


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


@pytest.mark.parametrize("event", ["pull_request", "issue_comment", "ping", "release"])
async def test_a_signed_webhook_nested_100000_levels_gets_400(
    make_bot: Any, payloads: Payloads, event: str
) -> None:
    bot = await make_bot()
    body = b'{"action": "opened", "zen": ' + nested(100_000) + b"}"
    response = await bot.client.post(
        "/github/webhook", data=body, headers=delivery_headers(event, body)
    )
    assert response.status == 400
    assert "nested too deeply" in (await response.json())["error"]
    ok = await bot.deliver("ping", payloads.ping())
    assert ok.status == 200


async def test_signed_slack_payloads_nested_deeply_get_400(both: Any) -> None:
    driver = both.driver
    deep_json = b'{"type": "event_callback", "event": ' + nested(30_000) + b"}"
    sent = await driver.post(deep_json, "application/json")
    assert sent.status == 400, sent.text
    form = urlencode({"payload": '{"type": "block_actions", "x": ' + "[" * 5000 + "]" * 5000 + "}"})
    sent = await driver.post(form.encode(), "application/x-www-form-urlencoded")
    assert sent.status == 400, sent.text
    assert "deeper than 64 levels" in sent.json()["error"]
    assert (await driver.command("help")).status == 200


def test_nesting_depth_ignores_brackets_inside_strings() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[{{"}], "c": "\\"]]"}') == 3
    assert nesting_depth(b"{}") == 1 and nesting_depth(b"12") == 0


# --- replays -------------------------------------------------------------------------------


async def test_a_replayed_slack_request_is_executed_once(both: Any, fake_slack: FakeSlack) -> None:
    driver = both.driver
    payload = driver.command_payload("deploy gitea", REQUESTER, CHANNEL)
    body = urlencode(payload).encode()
    headers = slack_sign(body, int(time.time()))
    first = await driver.post(body, "application/x-www-form-urlencoded", headers=headers)
    assert first.status == 200 and "Planning" in first.text
    for _ in range(2):
        again = await driver.post(body, "application/x-www-form-urlencoded", headers=headers)
        assert (again.status, again.text) == (200, "")
    await both.pending_request()
    await both.settled()
    requests = [m for m in fake_slack.channel_messages(CHANNEL) if m.buttons()]
    assert len(requests) == 1  # one plan posted for approval: one job, one Slack action
    # the same command signed anew (a new timestamp) is a new request
    resent = await driver.post(body, "application/x-www-form-urlencoded")
    assert resent.status == 200 and "Planning" in resent.text


async def test_a_slack_replay_is_recognised_by_another_replica(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    one = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    other = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)  # same store
    body = urlencode(one.driver.command_payload("status", REQUESTER, CHANNEL)).encode()
    headers = slack_sign(body, int(time.time()))
    first = await one.driver.post(body, "application/x-www-form-urlencoded", headers=headers)
    assert first.status == 200 and first.text
    again = await other.driver.post(body, "application/x-www-form-urlencoded", headers=headers)
    assert (again.status, again.text) == (200, "")


async def test_a_github_delivery_resent_under_a_new_id_is_a_duplicate(
    make_bot: Any, payloads: Payloads, fake_github: FakeGitHub, manifest_repo: ManifestRepo
) -> None:
    bot = await make_bot()
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
    fake_github.add_pull(7, head_sha=head, base_sha=base)
    body = json.dumps(payloads.pull_request("opened", number=7, head_sha=head, base_sha=base))
    answers = []
    for delivery in ("d-1", "d-2", str(uuid.uuid4()), "d-1"):  # captured, resent, redelivered
        headers = delivery_headers("pull_request", body.encode(), delivery=delivery)
        response = await bot.client.post("/github/webhook", data=body, headers=headers)
        answers.append((response.status, (await response.json())["status"]))
    assert answers == [(200, "accepted")] + [(200, "duplicate")] * 3
    await bot.drain()
    assert len(fake_github.comments_on(7)) == 1  # one plan comment: one job ran
    # a different body (another action) under a fresh id is still accepted
    other = payloads.pull_request("synchronize", number=7, head_sha=head, base_sha=base)
    assert (await (await bot.deliver("pull_request", other)).json())["status"] == "accepted"


async def test_record_deliveries_dedupes_on_any_key(store: Store) -> None:
    await check_dedupes_on_any_key(store)


async def test_record_deliveries_dedupes_on_any_key_on_postgresql(postgres_database: str) -> None:
    store = await Store.open(postgres_database)
    try:
        await check_dedupes_on_any_key(store)
    finally:
        await store.close()


async def check_dedupes_on_any_key(store: Store) -> None:
    job = [("k", {"n": 1})]
    assert await store.queue.record_deliveries([(("d-1", "sha256:aa"), job)]) == [True]
    assert await store.queue.record_deliveries(
        [(("d-2", "sha256:aa"), job), (("d-1", "sha256:bb"), job), (("d-3", "sha256:cc"), job)]
    ) == [False, False, True]
    assert await store.queue.record_deliveries([(("d-4", "sha256:dd"), job), ("d-4", job)]) == [
        True,
        False,
    ]
    assert await store.queue.record_deliveries([("sha256:cc", [])]) == [False]
    queued = 0
    while await store.queue.claim("inspector", lease=timedelta(days=1)):
        queued += 1
    assert queued == 3


def test_the_webhook_signature_is_the_replay_key() -> None:
    from bot.github.webhook import replay_key

    signature = sign(b"{}")
    assert replay_key(signature) == "sha256:" + signature.split("=", 1)[1]


async def test_a_body_that_has_all_arrived_is_taken_without_waiting_and_still_limited() -> None:
    from aiohttp.streams import StreamReader

    from bot.limits import _TooLarge, arrived_body

    class Protocol:  # what a StreamReader asks of its connection: pausing and resuming
        _reading_paused = False

        def pause_reading(self) -> None:
            self._reading_paused = True

        def resume_reading(self, resume_parser: bool = True) -> None:
            self._reading_paused = False

    def stream() -> StreamReader:
        loop = asyncio.get_running_loop()
        return StreamReader(Protocol(), 2**16, loop=loop)  # type: ignore[arg-type]

    on_its_way = stream()
    on_its_way.feed_data(b'{"a": 1')
    assert arrived_body(on_its_way, 100) is None, "not all there: read under the deadline"
    whole = stream()
    whole.feed_data(b'{"a": ')
    whole.feed_data(b"1}")
    whole.feed_eof()
    assert arrived_body(whole, 100) == b'{"a": 1}'
    too_big = stream()
    too_big.feed_data(b"x" * 101)
    too_big.feed_eof()
    with pytest.raises(_TooLarge):
        arrived_body(too_big, 100)
