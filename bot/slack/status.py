"""`/nixmox status` and `/nixmox history` as Slack text: the deployment core's views
(`deployments.views`) with the CLI's columns and words."""

from __future__ import annotations

from bot.slack.blocks import format_time, mention
from deployments.views import (
    NOTHING_DEPLOYED,
    STATUS_TITLE,
    DeploymentRow,
    HistoryView,
    ServiceRow,
    StatusView,
    history_view,
    status_view,
)
from planner.escape import slack_code, slack_lines, slack_text
from state.store import Store

HISTORY_LIMIT = 10


def deployment_line(row: DeploymentRow) -> str:
    """`d-… deploy succeeded (slack by @x) at …, revision abc`."""
    by = f" by {mention(row.requested_by)}" if row.requested_by else ""
    when = f" at {format_time(row.started)}" if row.started else ""
    return (
        f"{slack_code(row.id)} {row.kind} *{row.state}* "
        f"({slack_text(row.trigger)}{by}){when}, revision {slack_code(row.revision)}"
    )


def service_status_line(row: ServiceRow) -> str:
    """SERVICE, REVISION, HEALTH, SYSTEM, DEPLOYMENT, LOCKED BY — as one line."""
    parts = [
        f"*{slack_text(row.service)}*",
        f"revision {slack_code(row.revision)}",
        slack_text(row.health),
    ]
    if row.system != "-":
        parts.append(f"{slack_code(row.system)}")
    if row.deployment != "-":
        parts.append(f"deployment {slack_code(row.deployment)}")
    if row.locked_by:
        reason = f" ({slack_text(row.lock_reason)})" if row.lock_reason else ""
        parts.append(f":lock: locked by {mention(row.locked_by)}{reason}")
    return " · ".join(parts)


def status_slack(view: StatusView) -> str:
    """The last deployment, then per service its revision, health, system and lock."""
    lines = [f"*{STATUS_TITLE}*"]
    if view.last is None:
        lines.append(NOTHING_DEPLOYED)
    else:
        lines.append(f"Last deployment: {deployment_line(view.last.row)}")
        lines.append(
            f"plan: {slack_text(view.last.plan)}; steps: {slack_text(view.last.row.steps)}"
        )
        if view.last.note:
            lines.append(slack_lines(view.last.note))
    if view.service is not None and not view.rows:
        lines.append(slack_text(view.empty_text or ""))
    lines += [f"• {service_status_line(row)}" for row in view.rows]
    return "\n".join(lines)


def history_slack(view: HistoryView) -> str:
    """The newest deployments first (only those touching `service`)."""
    if view.empty_text is not None:
        return slack_text(view.empty_text)
    lines = [f"*{slack_text(view.title)}*"]
    for row in view.rows:
        took = f", took {row.took}" if row.took != "-" else ""
        lines.append(f"• {deployment_line(row)}{took}; {slack_text(row.steps)}")
    return "\n".join(lines)


async def status_text(store: Store, service: str | None = None) -> str:
    return status_slack(await status_view(store, service))


async def history_text(store: Store, service: str | None = None) -> str:
    return history_slack(await history_view(store, service, HISTORY_LIMIT))
