"""One monitor across workers: leadership through a leased store lock (`bot.leadership`).

Contenders on one SQLite store: one leads, a clean stop hands over at once, a leader that stops
renewing is taken over once its lease ran out (and steps down when it finds out), a dead
process of this host loses the lead at once; a leader whose PostgreSQL database is gone steps
down before its lease could run out. Then two real worker applications on one store
(SQLite file, and PostgreSQL): a health change gives one Slack alert and one recorded
transition; the leader stops and the other takes over and alerts; only the leader exports the
monitor's gauges. Last, a `nixmox worker` process leads and is SIGKILLed: the worker standing
by takes over (the holder's pid is gone on this host) and alerts, once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT
from bot.leadership import SELF_FENCE, Leadership
from bot.monitoring import MONITOR_LOCK
from bot.roles import Role
from runners.config import RunnerConfig
from state.store import Store
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_pg import _psql
from tests.fixtures_slack import CHANNEL, slack_overrides, slack_process_env
from tests.homelab import MANIFEST, Homelab
from tests.test_serve import NIXMOX, free_port

LEASE = timedelta(seconds=0.6)
WAIT = 20.0  # seconds any awaited event may take at most before the test fails


@dataclass
class Contender:
    """A Leadership whose transitions are counted."""

    leadership: Leadership
    led: asyncio.Event = field(default_factory=asyncio.Event)
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    leads: int = 0


def contender(store: Store, name: str = "leader:test", **options: Any) -> Contender:
    made: list[Contender] = []

    async def on_lead() -> None:
        made[0].leads += 1
        made[0].led.set()

    async def on_lose() -> None:
        made[0].lost.set()

    leadership = Leadership(
        store.locks, name, lease=LEASE, on_lead=on_lead, on_lose=on_lose, **options
    )
    made.append(Contender(leadership))
    return made[0]


@asynccontextmanager
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        yield store
    finally:
        await store.close()


async def until(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


async def test_one_contender_leads_and_a_clean_stop_hands_over_at_once(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        first, second = contender(store), contender(store)
        await first.leadership.start()
        await second.leadership.start()
        try:
            assert first.leadership.leading and first.leads == 1
            assert not second.leadership.leading and second.leads == 0
            held = await store.locks.held("leader:test")
            assert held is not None and held.holder == first.leadership.holder
            host, pid, nonce = first.leadership.holder.split(":")
            assert (host, pid) == (socket.gethostname(), str(os.getpid())) and nonce
            await asyncio.sleep(LEASE.total_seconds() * 2)  # renewed: still the one leader
            assert first.leadership.leading and not second.leadership.leading
            await first.leadership.stop()
            assert first.lost.is_set()
            held = await store.locks.held("leader:test")
            assert held is None or held.holder == second.leadership.holder  # released at once
            await until(second.led)
            assert second.leadership.leading and second.leads == 1
        finally:
            await second.leadership.stop()
        assert await store.locks.held("leader:test") is None


async def test_a_leader_that_stops_renewing_is_taken_over_and_then_steps_down(
    tmp_path: Path,
) -> None:
    async with sqlite_store(tmp_path) as store:
        frozen, standby = contender(store), contender(store)
        await frozen.leadership.start()
        await standby.leadership.start()
        try:
            assert frozen.leadership.leading
            # the leader's process hangs: nothing renews its lease, nothing releases it
            assert frozen.leadership._task is not None
            frozen.leadership._task.cancel()
            await until(standby.led)
            held = await store.locks.held("leader:test")
            assert held is not None and held.holder == standby.leadership.holder
            assert not frozen.lost.is_set()
            await frozen.leadership.round()  # it wakes up: the lock is another's now
            assert frozen.lost.is_set() and not frozen.leadership.leading
            await frozen.leadership.round()
            assert standby.leadership.leading and frozen.leads == 1
        finally:
            await standby.leadership.stop()
            await frozen.leadership.stop()


async def test_a_leader_that_loses_the_store_steps_down_before_its_lease_runs_out(
    postgres_url: str, postgres_database: str
) -> None:
    store = await Store.open(postgres_database)
    leader = contender(store)
    try:
        await leader.leadership.start()
        assert leader.leadership.leading and leader.leadership._task is not None
        leader.leadership._task.cancel()  # its rounds are driven here, one by one
        name = postgres_database.rsplit("/", 1)[1]
        await asyncio.to_thread(_psql, postgres_url, f"DROP DATABASE {name} WITH (FORCE)")
        await leader.leadership.round()  # renewed a moment ago: it may still lead
        assert leader.leadership.leading and not leader.lost.is_set()
        await asyncio.sleep(LEASE.total_seconds() * SELF_FENCE)
        await leader.leadership.round()  # another may take over soon: it stops first
        assert leader.lost.is_set() and not leader.leadership.leading
    finally:
        await leader.leadership.stop()
        await store.close()


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


async def test_a_dead_process_of_this_host_loses_the_lead_at_once(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        gone = f"{socket.gethostname()}:{dead_pid()}:0ld0ne"
        elsewhere = f"other-host:{dead_pid()}:0ld0ne"
        long_lease = timedelta(minutes=10)
        await store.locks.lead("leader:a", gone, long_lease)
        await store.locks.lead("leader:b", elsewhere, long_lease)
        here, there = contender(store, "leader:a"), contender(store, "leader:b")
        await here.leadership.start()
        await there.leadership.start()
        try:
            assert here.leadership.leading  # its holder's pid is gone on this host
            assert not there.leadership.leading  # another host's pid says nothing: wait
            held = await store.locks.held("leader:b")
            assert held is not None and held.holder == elsewhere
        finally:
            await here.leadership.stop()
            await there.leadership.stop()


async def test_an_earlier_process_with_this_pid_loses_the_lead_at_once(tmp_path: Path) -> None:
    """A restarted container's pid 1 finds its own pid in the lock under another nonce."""
    async with sqlite_store(tmp_path) as store:
        earlier = f"{socket.gethostname()}:{os.getpid()}:0ld0ne"
        await store.locks.lead("leader:a", earlier, timedelta(minutes=10))
        here = contender(store, "leader:a")
        await here.leadership.start()
        try:
            assert here.leadership.leading
            held = await store.locks.held("leader:a")
            assert held is not None and held.holder == here.leadership.holder != earlier
        finally:
            await here.leadership.stop()


# --- two worker applications on one store ---------------------------------------------------


def messages_about(fake: FakeSlack, text: str) -> list[Message]:
    return [m for m in fake.channel_messages(CHANNEL) if text in m.text]


def lab_on(tmp_path: Path, database_url: str | None) -> Homelab:
    """A deployed homelab checked every second; its state in `database_url` if given."""
    lab = Homelab(tmp_path, interval=1, retries=1)
    if database_url is not None:
        sqlite = f'database_url = "sqlite+aiosqlite:///{lab.root / "state.db"}"'
        text = lab.config.read_text()
        assert sqlite in text
        lab.config.write_text(text.replace(sqlite, f'database_url = "{database_url}"'))
    lab.deploy()
    return lab


def worker_settings(lab: Homelab, fake: FakeSlack, database_url: str) -> Settings:
    return Settings(
        **slack_overrides(fake),
        database_url=database_url,
        workdir=lab.root / "bot",
        runner="real",
        manifest_path=MANIFEST,
        monitor=True,
        monitor_lease=timedelta(seconds=1.5),
        drift_interval=timedelta(hours=1),
    )


Client = Callable[..., Awaitable[Any]]


async def leader_gauge(client: Any) -> str:
    text: str = await (await client.get("/metrics")).text()
    (line,) = [line for line in text.splitlines() if line.startswith("nixmox_monitor_leader ")]
    return line.split()[1]


async def exports_health(client: Any) -> bool:
    text: str = await (await client.get("/metrics")).text()
    return 'nixmox_service_up{service="gitea"}' in text


async def run_two_workers(
    tmp_path: Path, fake: FakeSlack, aiohttp_client: Client, database_url: str | None
) -> None:
    lab = await asyncio.to_thread(lab_on, tmp_path, database_url)
    url = database_url or f"sqlite+aiosqlite:///{lab.root / 'state.db'}"
    settings = worker_settings(lab, fake, url)
    config = RunnerConfig.from_toml(lab.config)
    apps = [build_app(settings, runner_config=config, role=Role.WORKER) for _ in range(2)]
    first = await aiohttp_client(apps[0])
    second = await aiohttp_client(apps[1])
    leader, standby = apps[0][CONTEXT], apps[1][CONTEXT]
    assert leader.tasks.monitor is not None and standby.tasks.monitor is None
    held = await standby.require_store().locks.held(MONITOR_LOCK)
    assert held is not None and held.holder.startswith(f"{socket.gethostname()}:{os.getpid()}:")

    lab.set_up("gitea", False)
    await fake.wait_for(lambda: messages_about(fake, "*gitea* is unhealthy"), timeout=WAIT)
    assert await leader_gauge(first) == "1.0" and await leader_gauge(second) == "0.0"
    assert await exports_health(first) and not await exports_health(second)
    assert standby.tasks.monitor is None

    await first.close()  # the leader stops: the standby takes over and alerts
    assert leader.tasks.monitor is None
    lab.set_up("gitea", True)
    await fake.wait_for(lambda: messages_about(fake, "*gitea* is healthy again"), timeout=WAIT)
    assert standby.tasks.monitor is not None
    assert await leader_gauge(second) == "1.0" and await exports_health(second)
    await second.close()

    assert len(messages_about(fake, "*gitea* is unhealthy")) == 1
    assert len(messages_about(fake, "*gitea* is healthy again")) == 1
    assert messages_about(fake, "postgresql* is unhealthy") == []
    store = await Store.open(url)
    try:
        history = await store.health.history("gitea")
        assert await store.locks.held(MONITOR_LOCK) is None  # both stopped: released
    finally:
        await store.close()
    transitions = [
        check.healthy for check in history if check.source == "monitor" and check.transition
    ]
    # newest first: down once, up once (then the first check, where the store had none yet)
    assert transitions[:2] == [True, False] and transitions[2:] in ([], [True])


async def test_two_workers_on_one_sqlite_file_alert_once_and_hand_over(
    tmp_path: Path, fake_slack: FakeSlack, aiohttp_client: Client
) -> None:
    await run_two_workers(tmp_path, fake_slack, aiohttp_client, None)


async def test_two_workers_on_postgresql_alert_once_and_hand_over(
    tmp_path: Path, fake_slack: FakeSlack, aiohttp_client: Client, postgres_database: str
) -> None:
    await run_two_workers(tmp_path, fake_slack, aiohttp_client, postgres_database)


# --- real worker processes: the leader is SIGKILLed --------------------------------------------


@dataclass
class WorkerProcess:
    """`nixmox worker` in a subprocess, its log kept for assertions."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(cls, lab: Homelab, env: dict[str, str], name: str) -> WorkerProcess:
        port = free_port()
        log = lab.root / f"{name}.log"
        argv = [str(NIXMOX), "worker", "--host", "127.0.0.1", "--port", str(port),
                "--config", str(lab.config)]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return cls(proc, f"http://127.0.0.1:{port}", log)

    async def metric(self, session: aiohttp.ClientSession, name: str) -> str | None:
        """The value of an unlabelled sample (None: not exported, or not answering yet)."""
        try:
            async with session.get(f"{self.url}/metrics") as response:
                text = await response.text()
        except aiohttp.ClientConnectionError:
            return None
        found = [line.split()[1] for line in text.splitlines() if line.startswith(f"{name} ")]
        return found[0] if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def until_true(check: Callable[[], Awaitable[bool]], what: str, logs: list[Path]) -> None:
    for _ in range(int(WAIT / 0.1)):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never {what}:\n" + "\n".join(log.read_text() for log in logs))


async def test_a_sigkilled_leader_process_is_replaced_and_the_survivor_alerts_once(
    tmp_path: Path, fake_slack: FakeSlack, aiohttp_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    lab = await asyncio.to_thread(lab_on, tmp_path, None)
    url = f"sqlite+aiosqlite:///{lab.root / 'state.db'}"
    env = slack_process_env(fake_slack, NIXMOX_DRIFT_INTERVAL="3600", NIXMOX_MONITOR_LEASE="3")
    leader = WorkerProcess.start(lab, env, "leader")
    try:
        async with aiohttp.ClientSession() as session:

            async def leads() -> bool:
                return await leader.metric(session, "nixmox_monitor_leader") == "1.0"

            await until_true(leads, "the worker process leading", [leader.log])
            # the survivor, a worker in this process, stands by
            settings = worker_settings(lab, fake_slack, url)
            config = RunnerConfig.from_toml(lab.config)
            app = build_app(settings, runner_config=config, role=Role.WORKER)
            await aiohttp_client(app)
            survivor = app[CONTEXT]
            store = survivor.require_store()
            held = await store.locks.held(MONITOR_LOCK)
            assert held is not None and held.holder.split(":")[1] == str(leader.proc.pid)
            assert survivor.tasks.monitor is None

            lab.set_up("gitea", False)
            await fake_slack.wait_for(
                lambda: messages_about(fake_slack, "*gitea* is unhealthy"), timeout=WAIT
            )
            leader.proc.kill()  # SIGKILL: nothing released, nothing renewed
            leader.proc.wait()
            lab.set_up("gitea", True)
            await fake_slack.wait_for(
                lambda: messages_about(fake_slack, "*gitea* is healthy again"), timeout=WAIT
            )
            assert survivor.tasks.monitor is not None
            held = await store.locks.held(MONITOR_LOCK)
            assert held is not None and held.holder.split(":")[1] == str(os.getpid())
    finally:
        leader.stop()
    assert "gitea is down" in leader.log.read_text()  # the alert came from the killed leader
    assert f":{leader.proc.pid}:" in caplog.text and "is gone; taking over" in caplog.text
    assert len(messages_about(fake_slack, "*gitea* is unhealthy")) == 1  # none from the survivor
    assert len(messages_about(fake_slack, "*gitea* is healthy again")) == 1
