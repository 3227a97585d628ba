"""Health checks now: each service's `startup` then `liveness` command, through the configured
transport and the health runner `verify` uses (`runners.health.HealthRunner`); recorded in the
store (the services table's health, and `state.health`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from planner.models import Manifest
from runners.health import HealthRunner, checks
from runners.nixos import HostError
from runners.redact import Redactor
from runners.registry import RunnerSet
from state.events import utcnow
from state.health import HealthCheck
from state.services import Health
from state.store import Store

COMMAND_WIDTH = 40  # characters of a check's command shown in a one-line summary
TAIL_LINES = 20
CANNOT_RUN = "health check failed to run: {error}"


@dataclass(frozen=True)
class Checked:
    """A check's outcome with the command that decided it (for summaries)."""

    result: HealthCheck
    command: str

    @property
    def last_line(self) -> str:
        """The failing command's last output line (not the runner's closing summary)."""
        summary = f"{self.result.service} {self.result.check} failed after "
        lines = [
            line.strip()
            for line in self.result.output.splitlines()
            if line.strip() and not line.startswith(summary)
        ]
        return lines[-1] if lines else "no output"


def health_runner(runners: RunnerSet) -> HealthRunner:
    """The runner set's `verify` runner: health checks run exactly as a deployment runs them."""
    runner = runners.verify
    if not isinstance(runner, HealthRunner):
        raise TypeError(f"the verify phase runs {type(runner).__name__}, not health checks")
    return runner


def checked_services(manifest: Manifest, only: str | None = None) -> list[str]:
    """The enabled services that define health checks (or just `only`)."""
    names = sorted(manifest.enabled()) if only is None else [only]
    return [name for name in names if checks(name, manifest)]


def shorten(command: str, width: int = COMMAND_WIDTH) -> str:
    command = " ".join(command.split())
    return command if len(command) <= width else command[: width - 1].rstrip() + " …"


def tail(text: str, redactor: Redactor) -> str:
    return "\n".join(redactor.text(text).strip().splitlines()[-TAIL_LINES:])


async def check_service(
    runner: HealthRunner, redactor: Redactor, service: str, manifest: Manifest, source: str
) -> Checked:
    """Startup then liveness with their retries; the first failing check decides."""
    kind, command = "startup", ""
    lines: list[str] = []
    healthy = True
    try:
        for found in checks(service, manifest):
            kind, command = found
            if not await runner.until_ok(service, kind, manifest, lines):
                healthy = False
                break
    except HostError as exc:
        healthy, lines = False, [str(exc)]
    except Exception as exc:  # a transport that cannot even start: unhealthy, said plainly
        healthy, lines = False, [CANNOT_RUN.format(error=exc)]
    result = HealthCheck(service, healthy, kind, tail("\n".join(lines), redactor), utcnow(), source)
    return Checked(result, redactor.text(command))


async def run_health_checks(
    manifest: Manifest,
    services: Iterable[str],
    runners: RunnerSet,
    *,
    parallel: int = 4,
    source: str = "cli",
) -> dict[str, Checked]:
    """Check the services now, at most `parallel` at once."""
    runner = health_runner(runners)
    limit = asyncio.Semaphore(max(parallel, 1))

    async def one(service: str) -> tuple[str, Checked]:
        async with limit:
            return service, await check_service(runner, runners.redactor, service, manifest, source)

    return dict(await asyncio.gather(*(one(name) for name in sorted(services))))


async def record_checks(store: Store, results: Iterable[HealthCheck]) -> list[HealthCheck]:
    """The latest check per service, its history, and the status table's health column."""
    repo = store.health
    stored = []
    for result in results:
        stored.append(await repo.record(result))
        await store.services.set_health(
            result.service, health_of(result.healthy), at=result.checked_at
        )
    return stored


def health_of(healthy: bool) -> Health:
    return Health.HEALTHY if healthy else Health.UNHEALTHY


async def deployed_manifest(store: Store) -> Manifest | None:
    """The manifest of the newest finished deployment that recorded one."""
    for record in await store.deployments.history(limit=20):
        if record.manifest is not None and record.finished_at is not None:
            return record.manifest
    return None
