"""Transports: how a command reaches a host (OpenSSH, or this machine)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from runners.config import SshConfig

log = logging.getLogger(__name__)

Command = str | Sequence[str]
# output kept per stream; a runaway command must not fill the bot's memory
MAX_OUTPUT_BYTES = 1_000_000
TIMEOUT_RC = 124
KILL_GRACE = 2.0
NOT_FOUND_RC = 127
# ControlPath `<dir>/%C` (40 characters) plus ssh's temporary suffix must fit a unix socket path
MAX_CONTROL_DIR = 50


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def combined(self) -> str:
        """stdout then stderr, as one text for logs."""
        parts = [part.rstrip("\n") for part in (self.stdout, self.stderr) if part.strip()]
        return "\n".join(parts)


@dataclass(frozen=True)
class Launch:
    """The local process that runs a command: its argv, and its own environment and directory."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


class Transport(ABC):
    """Runs a command on a host and says how it would run it."""

    async def run(
        self,
        host: str | None,
        command: Command,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> CommandResult:
        """Run `command` on `host` with `env` and in `cwd` there; a timeout kills it."""
        launch = self.launch(host, command, env, cwd)
        if isinstance(launch, CommandResult):
            return launch
        result = await run_process(launch.argv, timeout=timeout, env=launch.env, cwd=launch.cwd)
        return self.explain(host, result)

    @abstractmethod
    def launch(
        self, host: str | None, command: Command, env: Mapping[str, str] | None, cwd: Path | None
    ) -> Launch | CommandResult:
        """The process to start, or the result when there is nothing that could run."""

    def explain(self, host: str | None, result: CommandResult) -> CommandResult:
        """The result as the caller sees it (a transport's own failures say so)."""
        return result

    @abstractmethod
    def describe(self, host: str | None, command: Command) -> str:
        """The command line as it would run, for plans and logs."""

    async def close(self) -> None:
        """Let go of connections (nothing to do for most transports)."""
        return None


def as_shell(command: Command) -> str:
    """A command as one shell line (argv lists are quoted)."""
    return command if isinstance(command, str) else shlex.join(command)


def _decode(data: bytes) -> str:
    if len(data) > MAX_OUTPUT_BYTES:
        data = b"[output truncated]\n" + data[-MAX_OUTPUT_BYTES:]
    return data.decode("utf-8", errors="replace")


SECRET_ENV_PREFIX = "NIXMOX_"


def tool_environment() -> dict[str, str]:
    """The environment for the tools we run: ours, minus the bot's own settings.

    Deployed commands (health checks from a manifest, templates) must not be able to print
    the webhook secret or the Slack and GitHub tokens into a step's output.
    """
    return {
        name: value for name, value in os.environ.items() if not name.startswith(SECRET_ENV_PREFIX)
    }


async def run_process(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run argv locally in its own process group; on timeout the whole group is killed."""
    full_env = {**tool_environment(), **(env or {})}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError:
        return CommandResult(NOT_FOUND_RC, "", f"{argv[0]}: command not found")
    except PermissionError as exc:
        return CommandResult(NOT_FOUND_RC, "", f"{argv[0]}: {exc.strerror}")
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        _kill_group(proc)
        stdout, stderr = await _leftovers(proc)
        message = f"timed out after {timeout:g}s"
        return CommandResult(TIMEOUT_RC, _decode(stdout), _decode(stderr) + message, True)
    except asyncio.CancelledError:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    return CommandResult(proc.returncode or 0, _decode(stdout), _decode(stderr))


async def _leftovers(proc: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """What a killed command printed. Another process may still hold its pipes (an ssh
    master connection runs the remote side): read for a moment, then let go."""
    try:
        return await asyncio.wait_for(proc.communicate(), KILL_GRACE)
    except TimeoutError:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.feed_eof()
        await proc.wait()
        return b"", b""


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class LocalTransport(Transport):
    """Runs commands on this machine (tests, and a bot running on the host itself)."""

    def launch(
        self, host: str | None, command: Command, env: Mapping[str, str] | None, cwd: Path | None
    ) -> Launch:
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        return Launch(argv, env, cwd)

    def describe(self, host: str | None, command: Command) -> str:
        return as_shell(command)


class SshTransport(Transport):
    """OpenSSH in batch mode, one reused master connection per host (ControlMaster)."""

    def __init__(self, config: SshConfig | None = None) -> None:
        self.config = config or SshConfig()
        if (
            self.config.control_dir is not None
            and len(str(self.config.control_dir)) > MAX_CONTROL_DIR
        ):
            raise ValueError(
                f"ssh control_dir {self.config.control_dir} is too long for a socket path: "
                f"use a directory path of at most {MAX_CONTROL_DIR} characters"
            )
        self._control_dir: Path | None = self.config.control_dir
        self._own_control_dir = False
        self._hosts: set[str] = set()

    @property
    def control_dir(self) -> Path:
        if self._control_dir is None:
            # short path: a unix socket path must stay under ~100 bytes
            self._control_dir = Path(tempfile.mkdtemp(prefix="nixmox-ssh-"))
            self._own_control_dir = True
        return self._control_dir

    def base_argv(self) -> list[str]:
        """ssh and its options, without the destination."""
        cfg = self.config
        argv = [cfg.binary]
        if cfg.config_file is not None:
            argv += ["-F", str(cfg.config_file)]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={cfg.connect_timeout}"]
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C"]
        argv += ["-o", f"ControlPersist={cfg.control_persist}"]
        if cfg.identity_file is not None:
            argv += ["-i", str(cfg.identity_file)]
        if cfg.port is not None:
            argv += ["-p", str(cfg.port)]
        for option in cfg.options:
            argv += ["-o", option]
        return argv

    def destination(self, host: str) -> str:
        return f"{self.config.user}@{host}" if self.config.user else host

    def argv(
        self,
        host: str,
        command: Command,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> list[str]:
        remote = as_shell(command)
        if env:
            assignments = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
            remote = f"export {assignments}; {remote}"
        if cwd is not None:
            remote = f"cd {shlex.quote(str(cwd))} && {remote}"
        return [*self.base_argv(), self.destination(host), "--", remote]

    def ssh_options(self) -> str:
        """The options as one string, for tools that take them so (`NIX_SSHOPTS`)."""
        return shlex.join(self.base_argv()[1:])

    def launch(
        self, host: str | None, command: Command, env: Mapping[str, str] | None, cwd: Path | None
    ) -> Launch | CommandResult:
        if not host:
            return CommandResult(2, "", "ssh transport: no host to connect to")
        self._hosts.add(host)
        return Launch(self.argv(host, command, env, cwd))

    def explain(self, host: str | None, result: CommandResult) -> CommandResult:
        if result.rc == 255:
            # ssh's own failure (connection, authentication), not the remote command's
            detail = result.stderr.strip() or "connection failed"
            return CommandResult(
                255, result.stdout, f"ssh {self.destination(host or '')}: {detail}"
            )
        return result

    def describe(self, host: str | None, command: Command) -> str:
        return shlex.join(self.argv(host or "<host>", command))

    async def close(self) -> None:
        """Stop the master connections and remove their sockets."""
        for host in sorted(self._hosts):
            await run_process([*self.base_argv(), "-O", "exit", self.destination(host)], timeout=10)
        self._hosts.clear()
        if self._own_control_dir and self._control_dir is not None:
            shutil.rmtree(self._control_dir, ignore_errors=True)
            self._control_dir = None
            self._own_control_dir = False
