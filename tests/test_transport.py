"""Transports: the local one, and OpenSSH against a real sshd on loopback."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from runners.config import HealthConfig, SshConfig, TransportConfig
from runners.health import HealthRunner
from runners.nixos import HostResolver
from runners.transport import LocalTransport, SshTransport
from tests.fixtures_manifests import lab_manifest
from tests.fixtures_sshd import SshServer


def test_a_too_long_control_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long for a socket path"):
        SshTransport(SshConfig(control_dir=tmp_path / ("x" * 60)))


async def test_local_runs_shell_lines_and_argv_with_env_and_cwd(tmp_path: Path) -> None:
    local = LocalTransport()
    result = await local.run(None, "echo out; echo err >&2; exit 3")
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    argv = await local.run(None, ["printf", "%s|", "a b", "c'd"])
    assert argv.ok and argv.stdout == "a b|c'd|"
    here = await local.run(None, "pwd; echo $GREETING", env={"GREETING": "hi"}, cwd=tmp_path)
    assert here.stdout == f"{tmp_path}\nhi\n"
    assert local.describe("10.0.0.9", ["echo", "a b"]) == "echo 'a b'"


async def test_local_timeout_kills_the_whole_process_group() -> None:
    started = time.monotonic()
    result = await LocalTransport().run(None, "sleep 30 & sleep 30; wait", timeout=0.5)
    assert result.timed_out and result.rc == 124
    assert result.stderr.endswith("timed out after 0.5s")
    assert time.monotonic() - started < 10


async def test_local_missing_program_is_exit_127() -> None:
    result = await LocalTransport().run(None, ["no-such-program-here"])
    assert (result.rc, result.stderr) == (127, "no-such-program-here: command not found")


async def test_ssh_runs_commands_and_reuses_one_connection(sshd: SshServer, control: Path) -> None:
    ssh = SshTransport(sshd.client_config(control))
    logins_before = sshd.log.read_text().count("Accepted publickey")
    try:
        result = await ssh.run(sshd.host, "echo out; echo err >&2; exit 3", timeout=30)
        assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
        quoted = await ssh.run(sshd.host, ["printf", "%s|", "a b", "c'd"], timeout=30)
        assert quoted.ok and quoted.stdout == "a b|c'd|"
        env = await ssh.run(sshd.host, "echo $X; pwd", env={"X": "y z"}, cwd=Path("/tmp"))
        assert env.stdout == "y z\n/tmp\n"

        # one master connection, reused by every command
        sockets = list(control.iterdir())
        assert len(sockets) == 1 and sockets[0].is_socket()
        check = [*ssh.base_argv(), "-O", "check", ssh.destination(sshd.host)]
        assert subprocess.run(check, capture_output=True).returncode == 0
        assert sshd.log.read_text().count("Accepted publickey") == logins_before + 1
    finally:
        await ssh.close()
    assert subprocess.run(check, capture_output=True).returncode != 0


async def test_ssh_timeout_and_refused_key_are_clear_failures(
    sshd: SshServer, tmp_path: Path, control: Path
) -> None:
    ssh = SshTransport(sshd.client_config(control))
    try:
        slow = await ssh.run(sshd.host, "sleep 30", timeout=1)
        assert slow.timed_out and slow.rc == 124
    finally:
        await ssh.close()

    other_key = tmp_path / "other"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True
    )
    refused = SshTransport(sshd.client_config(control, identity_file=other_key))
    started = time.monotonic()
    result = await refused.run(sshd.host, "true", timeout=30)
    await refused.close()
    assert result.rc == 255
    assert result.stderr.startswith("ssh root@127.0.0.1: ")
    assert "Permission denied" in result.stderr
    assert time.monotonic() - started < 15  # BatchMode: no password prompt waits


async def test_health_checks_over_ssh(sshd: SshServer, control: Path) -> None:
    manifest = lab_manifest(
        {
            "web": {
                "ip": "10.20.0.3",
                "interface": {"health": {"startup": "test -d /", "liveness": "whoami"}},
            }
        }
    )
    ssh = SshTransport(sshd.client_config(control))
    # the manifest's address is never contacted: the host is overridden to loopback
    hosts = HostResolver(TransportConfig(addresses={"web": sshd.host}))
    try:
        result = await HealthRunner(HealthConfig(), ssh, hosts).check("web", manifest)
    finally:
        await ssh.close()
    assert result.ok, result.output
    assert result.commands[0].endswith("root@127.0.0.1 -- 'test -d /'")


async def test_local_commands_do_not_see_the_bots_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIXMOX_SLACK_BOT_TOKEN", "xoxb-secret-token")
    monkeypatch.setenv("NIXMOX_GITHUB_WEBHOOK_SECRET", "hook-secret")
    result = await LocalTransport().run("127.0.0.1", "env", timeout=10)
    assert result.rc == 0
    assert "PATH=" in result.stdout
    assert "xoxb-secret-token" not in result.stdout
    assert "hook-secret" not in result.stdout
