"""A real OpenSSH server on a free loopback port, for the ssh transport's tests.

Listens on 127.0.0.1 only, accepts one generated client key for root, and is stopped at the
end of the session. A missing `sshd` is a clear failure (`./dev test` installs openssh-server).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runners.config import SshConfig
from tests.processes import stop_process

START_TIMEOUT = 10.0


@dataclass(frozen=True)
class SshServer:
    host: str
    port: int
    client_key: Path
    log: Path

    def client_config(self, control_dir: Path, **overrides: object) -> SshConfig:
        """Client settings that reach this server (its host key is throwaway: not checked)."""
        values: dict[str, object] = {
            "user": "root",
            "port": self.port,
            "identity_file": self.client_key,
            "options": [
                "StrictHostKeyChecking=no",
                "UserKnownHostsFile=/dev/null",
                "LogLevel=ERROR",
            ],
            "config_file": Path("/dev/null"),
            "control_dir": control_dir,
            **overrides,
        }
        return SshConfig.model_validate(values)


def _sshd_binary() -> str:
    found = shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).exists()), None
    )
    assert found, "sshd is missing: install openssh-server (./dev test does)"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A running sshd on 127.0.0.1 that lets root in with `client_key`."""
    binary = _sshd_binary()
    root = tmp_path_factory.mktemp("sshd")
    _keygen(root / "host_key")
    _keygen(root / "client_key")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "UsePAM no\n"
        f"PidFile {root / 'sshd.pid'}\n"
        "MaxStartups 100\n"
        "MaxSessions 100\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    log = root / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=out, stderr=out)
    try:
        _wait_listening(port, proc, log)
        yield SshServer("127.0.0.1", port, root / "client_key", log)
    finally:
        stop_process(proc, timeout=5)


@pytest.fixture
def control() -> Iterator[Path]:
    """A short directory for ssh control sockets (socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
