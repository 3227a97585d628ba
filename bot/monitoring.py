"""The monitor in `nixmox serve`: Prometheus gauges, and the front ends' listeners.

`setup_monitoring(app, ctx)` starts `deployments.monitor.Monitor` once the store is open (when
`NIXMOX_MONITOR` is true, the default, and the runner is real: the simulated runner has no
hosts to watch). Every check sets the gauges; transitions and drift changes also go to each
front end's `monitor_listener()` (Slack: `bot.slack.alerts`, messages with a "Redeploy" button
that asks for a deployment through the usual approval flow).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from bot.context import CONTEXT, BotContext
from deployments.drift import DriftReport
from deployments.monitor import HealthChange, Monitor, MonitorListener, MonitorOptions
from runners.registry import RunnerKind, build_runners
from state.health import DriftRecord

log = logging.getLogger(__name__)


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


def repo_source(ctx: BotContext) -> Any:
    """The manifest repository's default branch head, fetched into the bot's Git cache."""
    settings = ctx.settings
    if not (settings.git_remote or settings.repo):
        return None
    from bot.slack.backend import RepoBackend

    backend = RepoBackend(ctx)

    async def source() -> tuple[Path, str] | None:
        try:
            head = await backend.fetch(None)
        except Exception as exc:
            log.warning("monitor: cannot fetch the default branch for drift: %s", exc)
            return None
        return backend.git.path, head

    return source


def setup_monitoring(app: web.Application, ctx: BotContext) -> None:
    """Start the monitor with the application (after the store opened), stop it with it."""
    metrics = MonitorMetrics(ctx.metrics.registry)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        settings = ctx.settings
        if settings.runner != RunnerKind.REAL:
            log.info("monitor off: the %s runner has no hosts to watch", settings.runner)
            yield
            return
        runners = build_runners(RunnerKind.REAL, ctx.runner_config)
        monitor = Monitor(
            ctx.require_store(),
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
        ctx.tasks.monitor = monitor
        await monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            await runners.close()

    app.cleanup_ctx.append(lifecycle)


def monitor_of(app: web.Application) -> Monitor | None:
    """The running monitor (None: off, or the application has not started)."""
    return app[CONTEXT].tasks.monitor


__all__ = ["GaugeListener", "Listeners", "MonitorMetrics", "monitor_of", "setup_monitoring"]
