"""The monitor in `nixmox serve`: Prometheus gauges, Slack alerts and the Redeploy button.

`setup_monitoring(app, ctx)` starts `deployments.monitor.Monitor` once the store is open (when
`NIXMOX_MONITOR` is true, the default, and the runner is real: the simulated runner has no
hosts to watch). Transitions and drift changes become Slack messages in `NIXMOX_SLACK_CHANNEL`
through the Slack bot's client (escaped and redacted); a drift message carries a "Redeploy"
button that asks for a deployment through the usual approval flow.
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
from deployments.drift import DriftKind, DriftReport
from deployments.monitor import ChangeKind, HealthChange, Monitor, MonitorOptions
from runners.registry import RunnerKind, build_runners
from state.health import DriftRecord

log = logging.getLogger(__name__)

MONITOR = "monitor"  # ctx.extras key of the running monitor
OUTPUT_CHARS = 1500
DOWN = (
    ":red_circle: *{service}* is unhealthy: its {check} check failed {failures} time(s) "
    "in a row (since {since})."
)
REMINDER = ":red_circle: *{service}* is still unhealthy (since {since}): its {check} check fails."
UP = (
    ":large_green_circle: *{service}* is healthy again: its {check} check passes "
    "(it was unhealthy since {since})."
)
DRIFT_NEW = {
    DriftKind.SYSTEM: (
        ":warning: Drift on *{subject}*: the host runs `{actual}`, not the deployed "
        "`{expected}` (rebuilt or rolled back by hand?)."
    ),
    DriftKind.PENDING: (
        ":warning: Pending: `{actual_short}` on the default branch is not deployed "
        "({detail} to deploy it)."
    ),
    DriftKind.TERRAFORM: ":warning: Terraform drift in *{subject}*: resources would change.",
}
DRIFT_CLEARED = ":white_check_mark: Drift cleared: {kind} on *{subject}*."
REPORT_ONLY = "Nothing is changed by itself: Redeploy asks for a deployment, approved as usual."
REDEPLOY_LABEL = "Redeploy"
ALL = "all"


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


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


class BotListener:
    """Gauges for every check; a Slack message for every transition and drift change."""

    def __init__(self, ctx: BotContext, metrics: MonitorMetrics) -> None:
        self.ctx = ctx
        self.metrics = metrics

    @property
    def slack(self) -> Any:
        return self.ctx.extras.get("slack")

    async def checked(self, service: str, up: bool | None, at: datetime) -> None:
        self.metrics.checked.labels(service).set(at.timestamp())
        if up is not None:
            self.metrics.up.labels(service).set(1 if up else 0)

    async def health_changed(self, change: HealthChange) -> None:
        from bot.slack.blocks import code_block, escape, section

        slack = self.slack
        channel = self.ctx.settings.slack_channel
        if slack is None or not channel:
            log.info("monitor: %s is %s (Slack not configured)", change.check.service, change.kind)
            return
        template = {ChangeKind.DOWN: DOWN, ChangeKind.REMINDER: REMINDER, ChangeKind.UP: UP}
        text = template[change.kind].format(
            service=escape(change.check.service),
            check=escape(change.check.check),
            failures=change.failures,
            since=_when(change.since),
        )
        blocks = [section(text)]
        if change.kind is not ChangeKind.UP and change.check.output:
            output = slack.redactor.text(change.check.output)[-OUTPUT_CHARS:]
            blocks.append(section(code_block(output)))
        await slack.api("chat.postMessage", channel=channel, text=text, blocks=blocks)

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None:
        for record in new:
            self.metrics.drift.labels(record.subject, record.kind).set(1)
        for record in cleared:
            self.metrics.drift.labels(record.subject, record.kind).set(0)
        slack = self.slack
        channel = self.ctx.settings.slack_channel
        if slack is None or not channel:
            return
        for record in new:
            await self._post_new(slack, channel, record, report)
        for record in cleared:
            from bot.slack.blocks import escape

            text = DRIFT_CLEARED.format(kind=record.kind, subject=escape(record.subject))
            await slack.api("chat.postMessage", channel=channel, text=text)

    async def _post_new(
        self, slack: Any, channel: str, record: DriftRecord, report: DriftReport
    ) -> None:
        from bot.slack.blocks import ActionId, actions, button, code_block, context, escape, section

        redact = slack.redactor.text
        text = DRIFT_NEW[DriftKind(record.kind)].format(
            subject=escape(record.subject),
            actual=escape(redact(record.actual or "")),
            expected=escape(redact(record.expected or "")),
            actual_short=escape((record.actual or "")[:12]),
            detail=escape(record.detail or ""),
        )
        blocks = [section(text)]
        if record.kind == DriftKind.TERRAFORM and record.detail:
            blocks.append(section(code_block(redact(record.detail)[-OUTPUT_CHARS:])))
        notes = [escape(redact(note)) for note in report.notes]
        blocks.append(context(REPORT_ONLY, *notes))
        target = record.subject if record.kind == DriftKind.SYSTEM else ALL
        value = f"{record.kind} {target}"
        blocks.append(
            actions(
                "nixmox_drift",
                button(REDEPLOY_LABEL, ActionId.REDEPLOY, value, style="primary"),
            )
        )
        await slack.api("chat.postMessage", channel=channel, text=text, blocks=blocks)


def redeploy_ask(kind: str, target: str) -> Any:
    """What Redeploy asks for: a drifted host's service in full (its revision is deployed, so a
    diff plan would be empty), the whole homelab in full for terraform drift, and the usual
    plan from the deployed revision for pending changes."""
    from bot.slack.backend import Ask
    from runners.base import DeploymentKind

    service = None if target == ALL else target
    return Ask(DeploymentKind.DEPLOY, service, redeploy=kind != DriftKind.PENDING)


def register_redeploy(ctx: BotContext) -> None:
    """The drift message's Redeploy button: a deploy request, like `/nixmox deploy SERVICE`."""
    slack = ctx.extras.get("slack")
    if slack is None:
        return
    from bot.slack.approvals import REFUSAL_TEXT, request_refusal, slack_actor
    from bot.slack.blocks import ActionId

    async def on_redeploy(
        ack: Any, body: dict[str, Any], action: dict[str, Any], respond: Any
    ) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id", ""))
        channel = str((body.get("channel") or {}).get("id", ""))
        refusal = request_refusal(slack.policy, user)
        if refusal is not None:
            await slack.ephemeral(channel, user, REFUSAL_TEXT[refusal])
            await slack.audit(slack_actor(user), "slack.request.refused", {"redeploy": True})
            return
        kind, _, target = str(action.get("value") or "").partition(" ")
        ask = redeploy_ask(kind, target or ALL)
        target_channel = ctx.settings.slack_channel or channel
        slack.spawn(slack.post_request(ask, user, target_channel, respond))

    slack.bolt.action(str(ActionId.REDEPLOY))(on_redeploy)


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
    ctx.extras["monitor_metrics"] = metrics
    register_redeploy(ctx)

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
            BotListener(ctx, metrics),
            MonitorOptions(
                alert_repeat=settings.alert_repeat,
                drift_interval=settings.drift_interval.total_seconds(),
                manifest_path=settings.manifest_path,
            ),
            repo_source=repo_source(ctx),
        )
        ctx.extras[MONITOR] = monitor
        await monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            await runners.close()

    app.cleanup_ctx.append(lifecycle)


def monitor_of(app: web.Application) -> Monitor | None:
    """The running monitor (None: off, or the application has not started)."""
    found = app[CONTEXT].extras.get(MONITOR)
    return found if isinstance(found, Monitor) else None


__all__ = ["CONTEXT", "MONITOR", "BotListener", "MonitorMetrics", "monitor_of", "setup_monitoring"]
