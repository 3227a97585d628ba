"""The monitor in `nixmox serve`: Prometheus gauges, and the front ends' listeners.

`setup_monitoring(app, ctx)` runs `deployments.monitor.Monitor` once the store is open (when
`NIXMOX_MONITOR` is true, the default, and the runner is real: the simulated runner has no
hosts to watch), in one process at a time: every worker contends for the store lock
`MONITOR_LOCK` (`bot.leadership`), and only its holder runs the monitor, so several workers
on one database alert once. Every check sets the gauges (the leader's only: a standby exports
none of them, and `nixmox_monitor_leader` 0); transitions and drift changes also go to each
front end's `monitor_listener()` (Slack: `bot.slack.alerts`, messages with a "Redeploy" button
that asks for a deployment through the usual approval flow).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from bot.context import CONTEXT, BotContext
from bot.gitcache import GitFetchError
from bot.leadership import Leadership
from deployments.drift import DriftReport
from deployments.monitor import (
    HealthChange,
    Monitor,
    MonitorListener,
    MonitorOptions,
    RepoSource,
    stop_quietly,
)
from runners.registry import RunnerKind, RunnerSet, build_runners
from state.health import DriftRecord

log = logging.getLogger(__name__)

# the store lock whose holder runs the monitor (a service name cannot contain ":")
MONITOR_LOCK = "leader:monitor"


class MonitorMetrics:
    """The monitor's gauges, on the application's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "nixmox_service_up",
            "1 when the service's last health checks pass, 0 when it is unhealthy",
            ["service"],
            registry=registry,
        )
        self.checked = Gauge(
            "nixmox_service_health_checked_timestamp_seconds",
            "When the service's health was last checked (Unix time)",
            ["service"],
            registry=registry,
        )
        self.drift = Gauge(
            "nixmox_drift",
            "1 while a drift of this kind is found for the service (or global scope)",
            ["service", "kind"],
            registry=registry,
        )
        self.leader = Gauge(
            "nixmox_monitor_leader",
            "1 in the one process running the monitor, 0 in those standing by",
            registry=registry,
        )

    def forget(self) -> None:
        """A process that stops running the monitor exports none of its (aging) values."""
        for gauge in (self.up, self.checked, self.drift):
            gauge.clear()


class GaugeListener:
    """The gauges: every check's time and outcome, every drift found or cleared."""

    def __init__(self, metrics: MonitorMetrics) -> None:
        self.metrics = metrics

    async def checked(self, service: str, up: bool | None, at: datetime) -> None:
        self.metrics.checked.labels(service).set(at.timestamp())
        if up is not None:
            self.metrics.up.labels(service).set(1 if up else 0)

    async def health_changed(self, change: HealthChange) -> None:
        log.info("monitor: %s is %s", change.check.service, change.kind)

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None:
        for record in new:
            self.metrics.drift.labels(record.subject, record.kind).set(1)
        for record in cleared:
            self.metrics.drift.labels(record.subject, record.kind).set(0)


class Listeners:
    """One listener telling several (the gauges, then each front end's, e.g. Slack's)."""

    def __init__(self, listeners: list[MonitorListener]) -> None:
        self.listeners = listeners

    async def checked(self, service: str, up: bool | None, at: datetime) -> None:
        for listener in self.listeners:
            await listener.checked(service, up, at)

    async def health_changed(self, change: HealthChange) -> None:
        for listener in self.listeners:
            await listener.health_changed(change)

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None:
        for listener in self.listeners:
            await listener.drift_changed(new, cleared, report)


def listeners_of(ctx: BotContext, metrics: MonitorMetrics) -> Listeners:
    found: list[MonitorListener] = [GaugeListener(metrics)]
    for front_end in ctx.front_ends:
        listener = front_end.monitor_listener()
        if listener is not None:
            found.append(listener)
    return Listeners(found)


def repo_source(ctx: BotContext) -> RepoSource | None:
    """The manifest repository's default branch head, fetched into the bot's Git cache."""
    settings = ctx.settings
    if not (settings.git_remote or settings.repo):
        return None
    access = ctx.manifest_git()

    async def source() -> tuple[Path, str] | None:
        try:
            head = await access.default_branch()
        except GitFetchError as exc:
            log.warning("monitor: cannot fetch the default branch for drift: %s", exc)
            return None
        return access.cache.path, head

    return source


def setup_monitoring(app: web.Application, ctx: BotContext) -> None:
    """Contend for the monitor with the application (after the store opened); stop with it."""
    metrics = MonitorMetrics(ctx.metrics.registry)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        settings = ctx.settings
        if settings.runner != RunnerKind.REAL:
            log.info("monitor off: the %s runner has no hosts to watch", settings.runner)
            yield
            return
        runners = build_runners(RunnerKind.REAL, ctx.runner_config)
        leadership = monitor_leadership(ctx, runners, metrics)
        await leadership.start()
        try:
            yield
        finally:
            await leadership.stop()
            await runners.close()

    app.cleanup_ctx.append(lifecycle)


def monitor_leadership(ctx: BotContext, runners: RunnerSet, metrics: MonitorMetrics) -> Leadership:
    """The monitor, started whenever this process becomes the leader, stopped when it stops."""
    settings = ctx.settings
    store = ctx.require_store()
    metrics.leader.set(0)

    async def lead() -> None:
        monitor = Monitor(
            store,
            runners,
            ctx.runner_config,
            listeners_of(ctx, metrics),
            MonitorOptions(
                alert_repeat=settings.alert_repeat,
                drift_interval=settings.drift_interval.total_seconds(),
                manifest_path=settings.manifest_path,
            ),
            repo_source=repo_source(ctx),
        )
        await monitor.start()  # reads who is unhealthy (alerted) from the store: no repeats
        ctx.tasks.monitor = monitor
        metrics.leader.set(1)

    async def lose() -> None:
        monitor, ctx.tasks.monitor = ctx.tasks.monitor, None
        await stop_quietly(monitor)
        metrics.leader.set(0)
        metrics.forget()

    return Leadership(
        store.locks, MONITOR_LOCK, lease=settings.monitor_lease, on_lead=lead, on_lose=lose
    )


def monitor_of(app: web.Application) -> Monitor | None:
    """The running monitor (None: off, not started, or another process leads it)."""
    return app[CONTEXT].tasks.monitor


__all__ = [
    "MONITOR_LOCK",
    "GaugeListener",
    "Listeners",
    "MonitorMetrics",
    "monitor_of",
    "setup_monitoring",
]
