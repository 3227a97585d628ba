"""Replicas for real: two `--role web` and two worker processes on one real PostgreSQL.

Deliveries go to both webs, each redelivered through the other one (by delivery id, and the
same body under a new id); one worker is SIGKILLed while it runs jobs, after one of its
replies reached GitHub. The remaining worker reclaims the dead worker's jobs (same host, pid
gone) and finishes every job; the fake GitHub, served over HTTP by this test process, holds
exactly one reply per accepted delivery. A merge push delivered through both webs deploys once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from aiohttp import web

from bot.chat_commands import HELP_TEXT
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import (
    MANIFEST_PATH,
    TEST_REPO,
    ManifestRepo,
    Payloads,
    add_port,
    delivery_headers,
)
from tests.test_serve import NIXMOX, Server, free_port, server_env

NUMBER = 7
COMMANDS = 12  # `/nixmox help` deliveries, each answered by one comment
REPLY_DELAY = 2.0  # seconds the fake GitHub holds a reply's answer after storing the comment
RECOVERY = 30.0  # every job done this long after the kill
MARKER = re.compile(r"<!-- nixmox-job:(\d+):comment-\d+ -->")


class RoleServer(Server):
    """`nixmox serve --role ROLE` (or `nixmox worker`) in a subprocess."""

    def __init__(  # the base class's readiness wait and stop, with another command
        self, args: list[str], config: Path, env: dict[str, str], log: Path
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [str(NIXMOX), *args, "--host", "127.0.0.1", "--port", str(self.port),
             "--config", str(config)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def write_config(directory: Path, database: str, fake: FakeGitHub, remote: Path) -> Path:
    """One process's configuration: the shared database, its own work directory."""
    directory.mkdir()
    config = directory / "nixmox.toml"
    config.write_text(
        f"""
repo = "{TEST_REPO}"
github_api_url = "{fake.url}"
git_remote = "{remote}"
database_url = "{database}"
runner = "simulate"
workdir = "{directory / "work"}"
public_url = "https://nixmox.example"
manifest_path = "{MANIFEST_PATH}"

[runners.simulate]
scale = 0.001
"""
    )
    return config


def slow_replies(fake: FakeGitHub, delay: float) -> None:
    """Comments are stored at once but answered `delay` s later: a worker killed meanwhile
    has posted a reply it never learned about."""
    for index, (method, pattern, handler, permission) in enumerate(fake.routes):
        if method == "POST" and handler == fake.add_comment:

            async def slow(request: web.Request, params: dict[str, str], data: Any) -> Any:
                answer = await fake.add_comment(request, params, data)
                await asyncio.sleep(delay)
                return answer

            fake.routes[index] = (method, pattern, slow, permission)
            return
    raise AssertionError("the fake GitHub has no comment route")


def replies(fake: FakeGitHub) -> list[int]:
    """The job id of every help reply on the PR (a reply's hidden marker names its job)."""
    found = []
    for comment in fake.comments_on(NUMBER):
        if HELP_TEXT in comment["body"]:
            marker = MARKER.search(comment["body"])
            assert marker, comment["body"]
            found.append(int(marker[1]))
    return found


def planning_processes(pid: int) -> list[int]:
    """The planning pool's processes among `pid`'s children (multiprocessing's spawn)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # it exited meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"--multiprocessing-fork" in command:
            found.append(int(entry.name))
    return found


async def planning_priorities(pid: int, expected: int) -> list[int]:
    """The niceness of `pid`'s planning processes, once they started (at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        found = [os.getpriority(os.PRIO_PROCESS, child) for child in planning_processes(pid)]
        if (found and all(value == expected for value in found)) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def jobs_table(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch("SELECT id, kind, state, worker, attempts FROM jobs"))
    finally:
        await conn.close()


async def test_two_webs_two_workers_one_killed(
    tmp_path: Path,
    postgres_database: str,
    fake_github: FakeGitHub,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    fake = fake_github
    slow_replies(fake, REPLY_DELAY)
    dsn = postgres_database.replace("postgresql+asyncpg://", "postgresql://")
    env = server_env()

    def start(name: str, args: list[str]) -> RoleServer:
        config = write_config(tmp_path / name, postgres_database, fake, manifest_repo.path)
        return RoleServer(args, config, env, tmp_path / f"{name}.log")

    webs = [start(f"web{n}", ["serve", "--role", "web"]) for n in (1, 2)]
    workers = [start("worker1", ["worker"]), start("worker2", ["serve", "--role", "worker"])]
    servers = [*webs, *workers]
    try:
        async with aiohttp.ClientSession() as session:
            for server in servers:
                await server.wait_ready(session)

            async def deliver(
                web_server: RoleServer, event: str, body: bytes, delivery: str
            ) -> str:
                headers = delivery_headers(event, body, delivery=delivery)
                url = f"{web_server.url}/github/webhook"
                async with session.post(url, data=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    return str((await response.json())["status"])

            # a worker serves only /healthz and /metrics: no webhook there
            async with session.post(f"{workers[0].url}/github/webhook", data=b"{}") as answer:
                assert answer.status == 404

            # 1. help commands through both webs, each redelivered through the other web
            bodies = [
                json.dumps(
                    payloads.issue_comment(number=NUMBER, body="/nixmox help", comment_id=900 + n)
                ).encode()
                for n in range(COMMANDS)
            ]
            ids = [str(uuid.uuid4()) for _ in bodies]
            first = await asyncio.gather(
                *(deliver(webs[n % 2], "issue_comment", b, i) for n, (b, i) in enumerate(
                    zip(bodies, ids, strict=True)))
            )  # fmt: skip
            assert first == ["accepted"] * COMMANDS
            again = await asyncio.gather(
                *(deliver(webs[(n + 1) % 2], "issue_comment", b, i) for n, (b, i) in enumerate(
                    zip(bodies, ids, strict=True))),
                *(deliver(webs[n % 2], "issue_comment", b, str(uuid.uuid4()))
                  for n, b in enumerate(bodies)),
            )  # fmt: skip
            assert again == ["duplicate"] * (2 * COMMANDS)

            # 2. SIGKILL a worker that holds a job whose reply GitHub already stored
            pids = {server.proc.pid: server for server in workers}
            victim: RoleServer | None = None
            deadline = time.monotonic() + 30
            while victim is None and time.monotonic() < deadline:
                posted = set(replies(fake))
                for job in await jobs_table(dsn):
                    pid = int(str(job["worker"]).split(":")[1]) if job["worker"] else None
                    if job["state"] == "running" and job["id"] in posted and pid in pids:
                        victim, victim_job = pids[pid], job["id"]
                        break
                else:
                    await asyncio.sleep(0.02)
            assert victim is not None, "no worker was caught after posting a reply"
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()  # reaped: its pid is gone, not a zombie
            killed_at = time.monotonic()
            survivor = next(server for server in workers if server is not victim)

            # 3. the survivor finishes everything within RECOVERY seconds of the kill
            while time.monotonic() - killed_at < RECOVERY:
                table = await jobs_table(dsn)
                if len(table) == COMMANDS and all(job["state"] == "done" for job in table):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"jobs not done {RECOVERY} s after the kill: {table}")
            assert survivor.proc.poll() is None
            by_id = {job["id"]: job for job in table}
            assert by_id[victim_job]["attempts"] == 2  # re-run by the survivor...
            assert str(by_id[victim_job]["worker"]).split(":")[1] == str(survivor.proc.pid)
            answered = replies(fake)
            assert sorted(answered) == sorted(by_id)  # ...and still one reply per delivery
            assert len(fake.comments_on(NUMBER)) == COMMANDS

            # 4. a merge push delivered through both webs (and replayed) deploys once
            base = manifest_repo.repo.heads.main.commit.hexsha
            manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
            merged = manifest_repo.merge("f")
            push = json.dumps(payloads.push(before=base, after=merged)).encode()
            delivery = str(uuid.uuid4())
            outcomes = await asyncio.gather(
                deliver(webs[0], "push", push, delivery),
                deliver(webs[1], "push", push, delivery),
                deliver(webs[1], "push", push, str(uuid.uuid4())),
            )
            assert sorted(outcomes) == ["accepted", "duplicate", "duplicate"]

            def deployed() -> str | None:
                found = fake.last_status(merged, "nixmox/deploy")
                return found["state"] if found and found["state"] != "pending" else None

            deadline = time.monotonic() + 30
            while deployed() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert deployed() == "success"
            assert len(fake.deployments) == 1
            conn = await asyncpg.connect(dsn)
            try:
                assert await conn.fetchval("SELECT count(*) FROM deployments") == 1
            finally:
                await conn.close()
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        log = server.log.read_text()
        assert "Traceback" not in log or server is victim, log
    assert f"reclaimed job(s) [{victim_job}" in survivor.log.read_text()


async def test_a_web_and_a_worker_share_one_sqlite_file(
    tmp_path: Path, fake_github: FakeGitHub, manifest_repo: ManifestRepo, payloads: Payloads
) -> None:
    """On one machine the two roles work on SQLite too (with a warning that says its limits)."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    env = server_env()

    def start(name: str, args: list[str]) -> RoleServer:
        config = write_config(tmp_path / name, database, fake_github, manifest_repo.path)
        return RoleServer(args, config, env, tmp_path / f"{name}.log")

    web_server = start("web", ["serve", "--role", "web"])
    servers = [web_server]
    try:
        async with aiohttp.ClientSession() as session:
            await web_server.wait_ready(session)  # the web made the schema
            servers.append(start("worker", ["worker"]))
            await servers[1].wait_ready(session)
            # the worker plans in a process that yields the cores (NIXMOX_WORKER_NICE, 10 by
            # default); the web and the worker themselves keep their priority
            own = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, web_server.proc.pid) == own
            assert os.getpriority(os.PRIO_PROCESS, servers[1].proc.pid) == own
            assert await planning_priorities(servers[1].proc.pid, min(19, own + 10)) == [
                min(19, own + 10)
            ]
            body = json.dumps(payloads.issue_comment(number=NUMBER, body="/nixmox help")).encode()
            headers = delivery_headers("issue_comment", body)
            url = f"{web_server.url}/github/webhook"
            async with session.post(url, data=body, headers=headers) as response:
                assert (await response.json())["status"] == "accepted"
            deadline = time.monotonic() + 20
            while not replies(fake_github) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(replies(fake_github)) == 1
    finally:
        for server in servers:
            server.stop()
    assert "--role web on SQLite" in web_server.log.read_text()
    assert "--role worker on SQLite" in servers[1].log.read_text()
