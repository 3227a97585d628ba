"""The NixOS runner: record the running system, activate the new one, roll back to the record.

With the `copy-closure` preset it builds first: every host's build starts when the deployment
starts (`runners.builds`), each nix step awaits its own, then copies the closure (unless the
transport is local) and switches; a host already running the built system is not switched.

Command lines come from templates (`runners.config.NixosConfig`): the default is
`nixos-rebuild switch --flake <export>#<service> --target-host root@<ip>` run here; presets
for a copy-closure sequence, colmena and deploy-rs, or any list of commands, each run here
(`on = "local"`, in the exported revision) or on the service's host (`on = "host"`, through
the transport).
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from planner.models import Manifest
from planner.plan import NIX_PHASES, Plan, Step
from runners.base import Context
from runners.builds import (
    BuildCache,
    BuildFailed,
    BuildResult,
    BuildScheduler,
    finish_deployment_builds,
    output_path,
)
from runners.config import CaptureFormat, CommandTemplate, NixosConfig, TransportConfig, Where
from runners.transport import (
    CommandResult,
    LocalTransport,
    SshTransport,
    Transport,
    run_process,
)
from state.events import StepResult

RECORD_TIMEOUT = 60.0
NO_SERVICE = "step {step} names no service"
NO_ADDRESS = "{service} has no ip in the manifest and no address is configured for it"
RECORD_FAILED = "could not record the running system of {service}: {detail}"
NO_RECORD = "no recorded system to roll {service} back to"
WRONG_SYSTEM = "after the rollback {service} runs {actual}, not {expected}"
ALREADY_RUNNING = "already running {system}"
CACHED_BUILD = "# built before: {path} (build cache)"
NO_BUILD_PATH = "the build printed no store path (nix build --json, or a path on its last line)"
BUILD_FAILED = "the build of {service} failed"


class HostError(LookupError):
    """A service's host cannot be determined."""


class HostResolver:
    """How a service's host is reached: configured address, else its manifest `ip`."""

    def __init__(self, config: TransportConfig | None = None) -> None:
        self.config = config or TransportConfig()

    def address(self, service: str, manifest: Manifest) -> str:
        if service in self.config.addresses:
            return self.config.addresses[service]
        if self.config.default_address:
            return self.config.default_address
        svc = manifest.all_services().get(service)
        if svc is None or svc.ip is None:
            raise HostError(NO_ADDRESS.format(service=service))
        return str(svc.ip)


class _Placeholders(dict[str, str]):
    """Template values; a missing one shows as `<name>` (dry-run) or raises (run)."""

    def __init__(self, values: Mapping[str, str], *, strict: bool) -> None:
        super().__init__(values)
        self.strict = strict

    def __missing__(self, key: str) -> str:
        if self.strict:
            raise KeyError(f"unknown placeholder {{{key}}} in a command template")
        return f"<{key}>"


def fill(template: str, values: Mapping[str, str], *, strict: bool = True) -> str:
    """Substitute `{name}` placeholders with shell-quoted values."""
    quoted = {key: shlex.quote(value) for key, value in values.items()}
    return string.Formatter().vformat(template, (), _Placeholders(quoted, strict=strict))


@dataclass
class _Log:
    """The commands a step ran and their output, in order."""

    commands: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def extend(self, other: BuildResult) -> None:
        self.commands.extend(other.commands)
        if other.output:
            self.lines.append(other.output)

    def add(self, line: str, result: CommandResult) -> None:
        self.commands.append(line)
        self.lines.append(f"$ {line}")
        if text := result.combined():
            self.lines.append(text)
        if not result.ok:
            self.lines.append(f"exit status {result.rc}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


CommandLog = _Log  # for the previews, which run templates through this runner


class NixosRunner:
    """`nix:core` and `nix:service-config` steps, and rollback of a service."""

    def __init__(
        self,
        config: NixosConfig,
        transport: Transport,
        hosts: HostResolver | None = None,
        *,
        ssh: TransportConfig | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.hosts = hosts or HostResolver(ssh)
        self.cache = BuildCache(config.build_cache)
        self.schedulers: dict[str, BuildScheduler] = {}  # by deployment id
        self.builds_run = 0  # build commands really run (not answered from the cache)

    def values(self, service: str, ctx: Context, **extra: str) -> dict[str, str]:
        """The placeholders every template may use."""
        address = self.hosts.address(service, ctx.manifest)
        svc = ctx.manifest.all_services().get(service)
        return {
            "service": service,
            "export": str(ctx.workdir),
            "ip": str(svc.ip) if svc is not None and svc.ip else address,
            "hostname": (svc.hostname if svc is not None else None) or service,
            "host": address,
            "target": f"{self.config.user}@{address}" if self.config.user else address,
            "user": self.config.user,
            # `{service}` in these paths: one profile and link per host (emulated hosts, tests)
            "system_profile": self.config.system_profile.replace("{service}", service),
            "current_system": self.config.current_system.replace("{service}", service),
            "build_host": self.config.build_host or "",
            "revision": ctx.revision or "",
            **extra,
        }

    def local_env(self) -> dict[str, str]:
        """Environment of local commands: configured values, and the ssh options for Nix tools."""
        env = dict(self.config.env)
        if isinstance(self.transport, SshTransport) and "NIX_SSHOPTS" not in env:
            env["NIX_SSHOPTS"] = self.transport.ssh_options()
        return env

    def _line(self, command: CommandTemplate, values: Mapping[str, str], strict: bool) -> str:
        text = fill(command.run, values, strict=strict)
        if command.on is Where.HOST:
            return self.transport.describe(values["host"], text)
        return text

    def commands(self, step: Step, ctx: Context) -> list[str]:
        """Record, activate, record again: the exact lines (captured values show as `<name>`)."""
        if step.service is None:
            return []
        try:
            values = self.values(step.service, ctx)
        except HostError as exc:
            return [f"# {exc}"]
        record = CommandTemplate(run=self.config.record, on=Where.HOST)
        lines = [self._line(record, values, False)]
        deploy = self.build_first_commands() if self.config.builds_first else None
        lines += [self._line(cmd, values, False) for cmd in deploy or self.config.deploy_commands()]
        return [*lines, lines[0]]

    def build_command(self) -> CommandTemplate:
        return CommandTemplate(
            run=self.config.build_template(),
            capture="new",
            capture_format=CaptureFormat.NIX_BUILD_JSON,
        )

    def copies(self) -> bool:
        """The closure is copied to the host, unless the host is this machine."""
        return not isinstance(self.transport, LocalTransport)

    def build_first_commands(self) -> list[CommandTemplate]:
        """Build, copy (unless local), then the profile and the switch."""
        copy = [CommandTemplate(run=self.config.copy_template())] if self.copies() else []
        return [self.build_command(), *copy, *self.config.switch_commands()]

    # --- builds ----------------------------------------------------------------------------

    def start_builds(self, plan: Plan, ctx: Context) -> None:
        """Start the build of every host the plan switches (copy-closure preset only)."""
        if not self.config.builds_first:
            return
        services = [s.service for s in plan.steps if s.phase in NIX_PHASES and s.service]
        self.start_preview_builds(services, ctx)

    def start_preview_builds(self, services: list[str], ctx: Context) -> None:
        """Start these hosts' builds (`build_parallel` at once), whatever the preset."""
        scheduler = self.schedulers.get(ctx.deployment_id)
        if scheduler is None:
            scheduler = BuildScheduler(
                lambda service: self.build(service, ctx), self.config.build_parallel
            )
            self.schedulers[ctx.deployment_id] = scheduler
        scheduler.start(services)

    async def finish_builds(self, ctx: Context) -> None:
        await finish_deployment_builds(self.schedulers, ctx.deployment_id)

    async def built(self, service: str, ctx: Context) -> BuildResult:
        """The service's build in this deployment (its scheduler's, else built now)."""
        scheduler = self.schedulers.get(ctx.deployment_id)
        if scheduler is None:
            return await self.build(service, ctx)
        return await scheduler.result(service)

    async def build(self, service: str, ctx: Context) -> BuildResult:
        """Build the service's system here (or on the build host); the cache answers repeats."""
        template = self.config.build_template()
        if cached := self.cache.get(ctx.revision, service, template):
            return BuildResult(True, cached, CACHED_BUILD.format(path=cached), cached=True)
        log = _Log()
        try:
            values = self.values(service, ctx)
            self.builds_run += 1
            result = await self._exec(self.build_command(), values, ctx, log)
        except (HostError, KeyError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            return BuildResult(False, None, _join(log.output, message), log.commands)
        path = values.get("new") if result.ok else None
        if not path:
            failure = BUILD_FAILED.format(service=service) if not result.ok else NO_BUILD_PATH
            return BuildResult(False, None, _join(log.output, failure), log.commands)
        self.cache.put(ctx.revision, service, template, path)
        return BuildResult(True, path, log.output, log.commands)

    def rollback_commands(self, service: str, ctx: Context, target: str) -> list[str]:
        values = self.values(service, ctx, prev=target)
        return [self._line(cmd, values, False) for cmd in self.config.rollback]

    async def execute(
        self, command: CommandTemplate, values: dict[str, str], ctx: Context, log: _Log
    ) -> CommandResult:
        """Run one template here or on the host; its line and output go to `log`."""
        return await self._exec(command, values, ctx, log)

    async def _exec(
        self, command: CommandTemplate, values: dict[str, str], ctx: Context, log: _Log
    ) -> CommandResult:
        text = fill(command.run, values)
        if command.on is Where.HOST:
            line = self.transport.describe(values["host"], text)
            result = await self.transport.run(values["host"], text, timeout=self.config.timeout)
        else:
            line = text
            result = await run_process(
                ["/bin/sh", "-c", text],
                timeout=self.config.timeout,
                env=self.local_env(),
                cwd=ctx.workdir if ctx.workdir.is_dir() else None,
            )
        log.add(line, result)
        if result.ok and command.capture:
            values[command.capture] = _captured(command, result.stdout)
        return result

    async def record(self, service: str, ctx: Context, log: _Log | None = None) -> str:
        """The running system of the service's host (`readlink -e /run/current-system`)."""
        log = log or _Log()
        values = self.values(service, ctx)
        record = CommandTemplate(run=self.config.record, on=Where.HOST)
        result = await self._exec(record, values, ctx, log)
        path = result.stdout.strip().splitlines()[-1].strip() if result.stdout.strip() else ""
        if not result.ok or not path:
            detail = result.combined() or f"exit status {result.rc}"
            raise RecordError(RECORD_FAILED.format(service=service, detail=detail))
        return path

    async def run(self, step: Step, ctx: Context) -> StepResult:
        if step.service is None:
            return StepResult(False, NO_SERVICE.format(step=step.id))
        service, log = step.service, _Log()
        try:
            values = self.values(service, ctx)
            previous = await self.record(service, ctx, log)
        except (HostError, RecordError) as exc:
            return StepResult(False, _join(log.output, str(exc)), commands=log.commands)
        # the first record of this deployment is what a rollback returns to
        ctx.previous_systems.setdefault(service, previous)
        if self.config.builds_first:
            return await self._build_first(service, values, previous, ctx, log)
        commands = self.config.deploy_commands()
        return await self._switch(service, commands, values, previous, ctx, log)

    async def _build_first(
        self, service: str, values: dict[str, str], previous: str, ctx: Context, log: _Log
    ) -> StepResult:
        """Await the build; skip a no-op switch; else copy, set the profile, switch, record."""
        build = await self.built(service, ctx)
        log.extend(build)
        if not build.ok or build.path is None:
            return BuildFailed(False, log.output, previous, None, log.commands)
        if build.path == previous:
            log.lines.append(ALREADY_RUNNING.format(system=previous))
            return StepResult(True, log.output, previous, previous, log.commands)
        values["new"] = build.path
        copy = [CommandTemplate(run=self.config.copy_template())] if self.copies() else []
        commands = [*copy, *self.config.switch_commands()]
        return await self._switch(service, commands, values, previous, ctx, log)

    async def _switch(
        self,
        service: str,
        commands: list[CommandTemplate],
        values: dict[str, str],
        previous: str,
        ctx: Context,
        log: _Log,
    ) -> StepResult:
        """Run the commands in order, stopping at the first failure; then record the new system."""
        try:
            for command in commands:
                result = await self._exec(command, values, ctx, log)
                if not result.ok:
                    return StepResult(False, log.output, previous, None, log.commands)
            new = await self.record(service, ctx, log)
        except (KeyError, RecordError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            return StepResult(False, _join(log.output, message), previous, None, log.commands)
        return StepResult(True, log.output, previous, new, log.commands)

    async def rollback(self, service: str, ctx: Context) -> StepResult:
        """Activate the recorded system of `service` (ctx.previous_systems) on its host."""
        target = ctx.previous_systems.get(service)
        if not target:
            return StepResult(False, NO_RECORD.format(service=service))
        log = _Log()
        try:
            current = await self.record(service, ctx, log)
            values = self.values(service, ctx, prev=target)
            for command in self.config.rollback:
                result = await self._exec(command, values, ctx, log)
                if not result.ok:
                    return StepResult(False, log.output, current, None, log.commands)
            now = await self.record(service, ctx, log)
        except (HostError, RecordError, KeyError) as exc:
            message = exc.args[0] if exc.args else str(exc)
            return StepResult(False, _join(log.output, message), commands=log.commands)
        if now != target:
            wrong = WRONG_SYSTEM.format(service=service, actual=now, expected=target)
            return StepResult(False, _join(log.output, wrong), current, now, log.commands)
        return StepResult(True, log.output, current, now, log.commands)


class RecordError(RuntimeError):
    """The running system could not be read."""


def _captured(command: CommandTemplate, stdout: str) -> str:
    """A captured value: the last line printed, or the out path of `nix build --json`."""
    if command.capture_format is CaptureFormat.NIX_BUILD_JSON:
        return output_path(stdout) or ""
    captured = [line for line in stdout.splitlines() if line.strip()]
    return captured[-1].strip() if captured else ""


def _join(*parts: Any) -> str:
    return "\n".join(str(part) for part in parts if part)
