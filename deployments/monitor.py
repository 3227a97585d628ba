"""The monitor of `nixmox serve`: liveness checks between deployments, and periodic drift.

Each deployed service's liveness check runs every `interface.health.interval` seconds with its
`timeout`; `retries` consecutive failures make it unhealthy, the first success healthy again.
A service being deployed (its lock held by a deployment) is not checked. Transitions (not
checks) are recorded and told to a `MonitorListener` (Slack, metrics), with at most one
reminder per `alert_repeat` while a service stays unhealthy. Drift runs every `drift_interval`
seconds; each new and each cleared finding is told once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from deployments.drift import DriftKind, DriftReport, detect_drift
from deployments.health import deployed_manifest, health_of, health_runner, tail
from deployments.periodic import repeat_forever
from planner.models import Manifest
from runners.config import RunnerConfig
from runners.health import checks, policy
from runners.nixos import HostError, NixosRunner
from runners.registry import RunnerSet
from state.events import utcnow
from state.health import DriftRecord, HealthCheck, HealthRepository
from state.store import Store

log = logging.getLogger(__name__)

MONITOR_SOURCE = "monitor"
DEPLOYMENT_HOLDER = "deployment "  # deployments.locks.holder_name: locks a deployment holds
REFRESH_SECONDS = 5.0  # how often the set of deployed services is read again
MIN_INTERVAL = 0.5
WATCHED_KINDS = ("liveness", "startup")  # liveness; a service with only a startup check: that


class ChangeKind(StrEnum):
    DOWN = "down"
    UP = "up"
    REMINDER = "reminder"


@dataclass(frozen=True)
class HealthChange:
    """A transition (or a reminder): the check that decided it, since when the state holds."""

    kind: ChangeKind
    check: HealthCheck
    since: datetime
    failures: int = 0


class MonitorListener(Protocol):
    """Told about checks and transitions; failures of a listener never stop the monitor."""

    async def checked(self, service: str, up: bool | None, at: datetime) -> None: ...

    async def health_changed(self, change: HealthChange) -> None: ...

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None: ...


RepoSource = Callable[[], Awaitable[tuple[Path, str] | None]]
"""The manifest repository and its default branch's head, fetched (None: not available)."""


@dataclass
class Watch:
    """What the monitor knows of one service between checks."""

    healthy: bool | None = None
    failures: int = 0
    since: datetime | None = None
    last_alert: datetime | None = None


@dataclass
class MonitorOptions:
    alert_repeat: timedelta = timedelta(hours=6)
    drift_interval: float = 15 * 60.0
    manifest_path: str = "nixos/service-manifest.nix"
    refresh: float = REFRESH_SECONDS
    drift: bool = True


def watched_check(service: str, manifest: Manifest) -> str | None:
    found = dict(checks(service, manifest))
    return next((kind for kind in WATCHED_KINDS if kind in found), None)


@dataclass
class Monitor:
    """Runs until stopped; `check(service, manifest)` is one check (tests call it directly)."""

    store: Store
    runners: RunnerSet
    config: RunnerConfig
    listener: MonitorListener
    options: MonitorOptions = field(default_factory=MonitorOptions)
    repo_source: RepoSource | None = None
    clock: Callable[[], datetime] = utcnow
    watches: dict[str, Watch] = field(default_factory=dict)
    current: Manifest | None = None
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _loops: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def repo(self) -> HealthRepository:
        return self.store.health

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._restore()
        self._loops.append(asyncio.create_task(self._supervise(), name="nixmox-monitor"))
        if self.options.drift:
            self._loops.append(asyncio.create_task(self._drift_loop(), name="nixmox-drift"))

    async def stop(self) -> None:
        tasks = [*self._loops, *self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        self._tasks.clear()

    async def _restore(self) -> None:
        """A restarted bot knows who was unhealthy (and alerted): no second alert for it."""
        for service, latest in (await self.repo.latest()).items():
            if latest.source == MONITOR_SOURCE and not latest.healthy:
                since = latest.since or latest.checked_at
                self.watches[service] = Watch(False, 0, since, latest.checked_at)

    # --- health ------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep one checking task per deployed service with a check."""
        failure = "monitor: could not read the deployed services"
        await repeat_forever(self._refresh, self.options.refresh, log, failure)

    async def _refresh(self) -> None:
        """Follow the services of the deployed manifest (a task each, started or stopped)."""
        self._follow(await deployed_manifest(self.store))

    def _follow(self, manifest: Manifest | None) -> None:
        wanted = {}
        if manifest is not None:
            wanted = {
                name: manifest
                for name in sorted(manifest.enabled())
                if watched_check(name, manifest) is not None
            }
        for name in list(self._tasks):
            if name not in wanted or self._tasks[name].done():
                self._tasks.pop(name).cancel()
        for name, found in wanted.items():
            if name not in self._tasks:
                self._tasks[name] = asyncio.create_task(
                    self._watch(name, found), name=f"nixmox-monitor-{name}"
                )
        self.current = manifest

    async def _watch(self, service: str, manifest: Manifest) -> None:
        interval = max(policy(service, manifest, self.config.health).interval, MIN_INTERVAL)
        await repeat_forever(
            lambda: self.check(service, self.current or manifest),
            interval,
            log,
            "monitor: checking %s failed",
            service,
        )

    async def deploying(self, service: str) -> bool:
        """Whether a deployment holds the service's lock right now."""
        return any(
            lock.service == service and lock.holder.startswith(DEPLOYMENT_HOLDER)
            for lock in await self.store.locks.all()
        )

    async def check(self, service: str, manifest: Manifest) -> HealthChange | None:
        """One liveness check and what it changes; None while a deployment runs."""
        kind = watched_check(service, manifest)
        if kind is None or await self.deploying(service):
            return None
        runner = health_runner(self.runners)
        try:
            result = await runner.check_once(service, kind, manifest)
            ok, output = result.ok, result.combined() or f"exit status {result.rc}"
        except HostError as exc:
            ok, output = False, str(exc)
        except Exception as exc:
            ok, output = False, f"health check failed to run: {exc}"
        at = self.clock()
        check = HealthCheck(
            service, ok, kind, tail(output, self.runners.redactor), at, MONITOR_SOURCE
        )
        attempts = policy(service, manifest, self.config.health).attempts
        return await self._judge(service, check, attempts)

    async def _judge(self, service: str, check: HealthCheck, attempts: int) -> HealthChange | None:
        watch = self.watches.setdefault(service, Watch())
        change: HealthChange | None = None
        if check.healthy:
            watch.failures = 0
            if watch.healthy is False:
                change = HealthChange(ChangeKind.UP, check, watch.since or check.checked_at)
            if watch.healthy is not True:
                watch.since, watch.last_alert = check.checked_at, None
            watch.healthy = True
        else:
            watch.failures += 1
            if watch.failures < attempts and watch.healthy is not False:
                return None  # not yet: `retries` consecutive failures make it unhealthy
            if watch.healthy is not False:
                watch.healthy, watch.since = False, check.checked_at
                change = HealthChange(ChangeKind.DOWN, check, check.checked_at, watch.failures)
            elif self._remind_due(watch, check.checked_at):
                change = HealthChange(
                    ChangeKind.REMINDER, check, watch.since or check.checked_at, watch.failures
                )
            if change is not None:
                watch.last_alert = check.checked_at
        await self._record(check, change)
        await self._tell(self.listener.checked(service, watch.healthy, check.checked_at))
        if change is not None:
            await self._tell(self.listener.health_changed(change))
        return change

    def _remind_due(self, watch: Watch, now: datetime) -> bool:
        last = watch.last_alert or watch.since
        return last is None or now - last >= self.options.alert_repeat

    async def _record(self, check: HealthCheck, change: HealthChange | None) -> None:
        transition = change is not None and change.kind is not ChangeKind.REMINDER
        stored = HealthCheck(
            check.service,
            check.healthy,
            check.check,
            check.output,
            check.checked_at,
            check.source,
            transition=transition,
        )
        await self.repo.record(stored, history=transition)
        await self.store.services.set_health(check.service, health_of(check.healthy))

    @staticmethod
    async def _tell(call: Awaitable[None]) -> None:
        try:
            await call
        except Exception:
            log.exception("monitor: a listener failed")

    # --- drift -------------------------------------------------------------------------------

    async def _drift_loop(self) -> None:
        every = max(self.options.drift_interval, MIN_INTERVAL)
        await repeat_forever(self.drift_round, every, log, "monitor: drift detection failed")

    async def drift_round(self) -> DriftReport | None:
        """Detect drift once and tell what is new and what cleared (skipped mid-deployment)."""
        if any(lock.holder.startswith(DEPLOYMENT_HOLDER) for lock in await self.store.locks.all()):
            return None
        manifest = await deployed_manifest(self.store)
        if manifest is None:
            return None
        source = await self.repo_source() if self.repo_source is not None else None
        nixos = self.runners.rollback
        assert isinstance(nixos, NixosRunner)
        report = await detect_drift(
            self.store,
            manifest,
            self.config,
            nixos,
            self.runners.redactor,
            repo_dir=source[0] if source else None,
            head=source[1] if source else "HEAD",
            manifest_path=self.options.manifest_path,
        )
        kinds = {DriftKind.SYSTEM.value}
        if source is not None:
            kinds |= {DriftKind.PENDING.value, DriftKind.TERRAFORM.value}
        new, cleared = await self.repo.replace_drift(
            report.findings(), at=self.clock(), kinds=kinds
        )
        if new or cleared:
            await self._tell(self.listener.drift_changed(new, cleared, report))
        return report


async def stop_quietly(monitor: Monitor | None) -> None:
    if monitor is not None:
        with contextlib.suppress(Exception):
            await monitor.stop()
