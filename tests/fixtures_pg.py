"""A real PostgreSQL server for the test session: started on first use, stopped at the end."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest

PG_USER = "postgres"
START_TIMEOUT = 60
MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
    "/usr/lib/postgresql/*/bin: install them (Debian: apt-get install -y postgresql)"
)


def find_pg_bin() -> Path:
    """The directory holding initdb and pg_ctl; a missing PostgreSQL fails the test run."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    pytest.fail(MISSING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_server_user(command: list[str]) -> list[str]:
    """postgres refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.fail("running the tests as root needs `runuser` to start PostgreSQL as postgres")
    return [runuser, "-u", PG_USER, "--", *command]


def _run(command: list[str], what: str) -> None:
    proc = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, timeout=START_TIMEOUT
    )
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """An asyncpg URL of a fresh PostgreSQL cluster listening on 127.0.0.1 only."""
    bin_dir = find_pg_bin()
    # as root the server runs as `postgres`, which must reach the directory: use /tmp then
    parent = "/tmp" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="nixmox-pg-", dir=parent))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, user=PG_USER, group=None)
    os.chmod(root, 0o700)
    port = free_port()
    _run(
        [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"],
        "initdb",
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    log_file = str(root / "log")
    start = ["-o", options, "-l", log_file, "-w", "-t", str(START_TIMEOUT), "start"]
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), *start], "pg_ctl start")
    try:
        yield f"postgresql+asyncpg://{PG_USER}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, so tests do not see each other's rows."""
    name = "t_" + os.urandom(6).hex()
    _psql(postgres_url, f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + "/" + name
    _psql(postgres_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _psql(url: str, sql: str) -> None:
    """Run one statement as the superuser through asyncpg (no psql binary needed).

    It runs in its own thread so that its event loop never replaces the test's.
    """
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, run()).result(timeout=START_TIMEOUT)
