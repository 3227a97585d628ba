"""The health runner (`verify` steps): a service's `startup`, then `liveness` command, on its host.

Each command is tried up to `retries` times (attempts, at least one), each attempt bounded by
`timeout` seconds, `interval` seconds apart. Values come from the service's
`interface.health`, else the manifest's top-level `health_check_timeout` / `retry_attempts` /
`retry_delay`, else the runner configuration.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass

from planner.models import Manifest
from planner.plan import Step
from runners.base import Context
from runners.config import HealthConfig
from runners.nixos import HostError, HostResolver
from runners.transport import CommandResult, Transport
from state.events import StepResult

CHECK_KINDS = ("startup", "liveness")
NO_CHECKS = "{service} defines no health checks (interface.health): nothing to verify"
PASSED = "{service} {kind} passed (attempt {attempt}/{attempts})"
FAILED = "{service} {kind} failed after {attempts} attempt(s)"


@dataclass(frozen=True)
class CheckPolicy:
    timeout: float
    attempts: int
    interval: float


def policy(service: str, manifest: Manifest, config: HealthConfig) -> CheckPolicy:
    """Timeout, attempts and interval of one service's checks, with the documented fallbacks."""
    svc = manifest.all_services().get(service)
    health = svc.interface.health if svc is not None else None

    def pick(own: float | None, top: float | None, default: float) -> float:
        return own if own is not None else top if top is not None else default

    own_timeout = health.timeout if health is not None else None
    own_retries = health.retries if health is not None else None
    own_interval = health.interval if health is not None else None
    return CheckPolicy(
        timeout=pick(own_timeout, manifest.health_check_timeout, config.timeout),
        attempts=max(1, int(pick(own_retries, manifest.retry_attempts, config.retries))),
        interval=pick(own_interval, manifest.retry_delay, config.interval),
    )


def checks(service: str, manifest: Manifest) -> list[tuple[str, str]]:
    """The service's health commands in order: (kind, command)."""
    svc = manifest.all_services().get(service)
    health = svc.interface.health if svc is not None else None
    if health is None:
        return []
    found = [(kind, getattr(health, kind)) for kind in CHECK_KINDS]
    return [(kind, command) for kind, command in found if command]


class HealthRunner:
    """Runs `verify` steps (and live checks for `nixmox status --check`)."""

    def __init__(
        self, config: HealthConfig, transport: Transport, hosts: HostResolver | None = None
    ) -> None:
        self.config = config
        self.transport = transport
        self.hosts = hosts or HostResolver()

    def commands(self, step: Step, ctx: Context) -> list[str]:
        if step.service is None:
            return []
        try:
            host = self.hosts.address(step.service, ctx.manifest)
        except HostError as exc:
            return [f"# {exc}"]
        return [self.transport.describe(host, cmd) for _, cmd in checks(step.service, ctx.manifest)]

    async def run(self, step: Step, ctx: Context) -> StepResult:
        if step.service is None:
            return StepResult(False, f"step {step.id} names no service")
        return await self.check(step.service, ctx.manifest)

    async def check(self, service: str, manifest: Manifest) -> StepResult:
        """Run the service's startup then liveness checks; ok when every one passes."""
        todo = checks(service, manifest)
        if not todo:
            return StepResult(True, NO_CHECKS.format(service=service))
        try:
            host = self.hosts.address(service, manifest)
        except HostError as exc:
            return StepResult(False, str(exc))
        rules = policy(service, manifest, self.config)
        lines: list[str] = []
        commands: list[str] = []
        for kind, command in todo:
            commands.append(self.transport.describe(host, command))
            if not await self._until_ok(service, kind, host, command, rules, lines):
                return StepResult(False, "\n".join(lines), commands=commands)
        return StepResult(True, "\n".join(lines), commands=commands)

    async def until_ok(self, service: str, kind: str, manifest: Manifest, lines: list[str]) -> bool:
        """Run one of the service's checks with its retries (as `verify` does); log to lines."""
        command = dict(checks(service, manifest)).get(kind)
        if command is None:
            return True
        host = self.hosts.address(service, manifest)
        rules = policy(service, manifest, self.config)
        return await self._until_ok(service, kind, host, command, rules, lines)

    async def check_once(self, service: str, kind: str, manifest: Manifest) -> CommandResult:
        """One attempt of one check, bounded by its timeout (the monitor counts the retries)."""
        command = dict(checks(service, manifest)).get(kind)
        if command is None:
            return CommandResult(0, NO_CHECKS.format(service=service), "")
        host = self.hosts.address(service, manifest)
        rules = policy(service, manifest, self.config)
        return await self.transport.run(host, command, timeout=rules.timeout)

    async def _until_ok(
        self,
        service: str,
        kind: str,
        host: str,
        command: str,
        rules: CheckPolicy,
        lines: list[str],
    ) -> bool:
        for attempt in range(1, rules.attempts + 1):
            result = await self.transport.run(host, command, timeout=rules.timeout)
            if result.ok:
                lines.append(
                    PASSED.format(
                        service=service, kind=kind, attempt=attempt, attempts=rules.attempts
                    )
                )
                return True
            detail = result.combined() or "no output"
            lines.append(
                f"{kind} attempt {attempt}/{rules.attempts}: exit status {result.rc}: {detail}"
            )
            if attempt < rules.attempts:
                await asyncio.sleep(rules.interval)
        lines.append(FAILED.format(service=service, kind=kind, attempts=rules.attempts))
        return False


SCRIPT = """#!/usr/bin/env bash
# Health check of {service}, generated by `nixmox render` from the service manifest:
# {kinds}, each tried up to {attempts} time(s), {timeout:g}s each, {interval:g}s apart.
set -u

check() {{
  local kind=$1 command=$2 attempt=1
  while true; do
    if timeout {timeout:g} sh -c "$command"; then
      echo "{service} $kind passed (attempt $attempt/{attempts})"
      return 0
    fi
    if [ "$attempt" -ge {attempts} ]; then
      echo "{service} $kind failed after {attempts} attempt(s)" >&2
      return 1
    fi
    attempt=$((attempt + 1))
    sleep {interval:g}
  done
}}

{calls}
echo "{service} is healthy"
"""


def health_check_script(service: str, manifest: Manifest, config: HealthConfig) -> str:
    """`<service>-health-check.sh`: the same checks and policy as the health runner."""
    rules = policy(service, manifest, config)
    todo = checks(service, manifest)
    calls = (
        "\n".join(f"check {kind} {shlex.quote(command)} || exit 1" for kind, command in todo)
        or f"echo {shlex.quote(NO_CHECKS.format(service=service))}"
    )
    return SCRIPT.format(
        service=service,
        kinds=" then ".join(kind for kind, _ in todo) or "no checks",
        attempts=rules.attempts,
        timeout=rules.timeout,
        interval=rules.interval,
        calls=calls,
    )
