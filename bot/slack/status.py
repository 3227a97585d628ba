"""`/nixmox status` and `/nixmox history` as Slack text, mirroring `nixmox status` / `history`."""

from __future__ import annotations

from bot.slack.blocks import format_time, mention
from bot.status_text import STATUS_TITLE, short, step_counts
from planner.escape import slack_code, slack_lines, slack_text
from planner.render import summary
from state.deployments import DeploymentRecord
from state.locks import LockRecord
from state.services import ServiceRecord
from state.store import Store

HISTORY_LIMIT = 10
NOTHING_DEPLOYED = "No deployment recorded yet."


def deployment_line(record: DeploymentRecord) -> str:
    """`d-… deploy succeeded (slack by @x) at …, revision abc`."""
    by = f" by {mention(record.requested_by)}" if record.requested_by else ""
    at = record.started_at or record.created_at
    when = f" at {format_time(at)}" if at else ""
    return (
        f"{slack_code(record.id)} {record.kind.value} *{record.state.value}* "
        f"({slack_text(str(record.trigger))}{by}){when}, revision {slack_code(short(record.head))}"
    )


def service_status_line(name: str, record: ServiceRecord | None, lock: LockRecord | None) -> str:
    """SERVICE, REVISION, HEALTH, SYSTEM, DEPLOYMENT, LOCKED BY — as one line."""
    health = record.last_health if record is not None and record.last_health else "unknown"
    parts = [
        f"*{slack_text(name)}*",
        f"revision {slack_code(short(record.revision if record else None))}",
        slack_text(health),
    ]
    if record is not None and record.system_path:
        parts.append(slack_code(record.system_path))
    if record is not None and record.last_deployment_id:
        parts.append(f"deployment {slack_code(record.last_deployment_id)}")
    if lock is not None:
        reason = f" ({slack_text(lock.reason)})" if lock.reason else ""
        parts.append(f":lock: locked by {mention(lock.holder)}{reason}")
    return " · ".join(parts)


async def status_text(store: Store, service: str | None = None) -> str:
    """The last deployment, then per service its revision, health, system and lock."""
    last = await store.deployments.last(finished=False)
    services = await store.services.all()
    locks = {lock.service: lock for lock in await store.locks.all()}
    lines = [f"*{STATUS_TITLE}*"]
    if last is None:
        lines.append(NOTHING_DEPLOYED)
    else:
        lines.append(f"Last deployment: {deployment_line(last)}")
        lines.append(f"plan: {slack_text(summary(last.plan))}; steps: {step_counts(last)}")
        if last.note:
            lines.append(slack_lines(last.note))
    names = sorted(set(services) | set(locks))
    if service is not None:
        if service not in names:
            lines.append(f"{slack_code(service)} has never been deployed and is not locked.")
            return "\n".join(lines)
        names = [service]
    lines += [f"• {service_status_line(n, services.get(n), locks.get(n))}" for n in names]
    return "\n".join(lines)


async def history_text(store: Store, service: str | None = None) -> str:
    """The newest deployments first (only those touching `service`)."""
    records = await store.deployments.history(service, limit=HISTORY_LIMIT)
    if not records:
        return "No deployments recorded" + (f" for {slack_text(service)}." if service else ".")
    title = f"*Recent deployments{f' of {slack_text(service)}' if service else ''}*"
    lines = [title]
    for record in records:
        took = ""
        if record.started_at and record.finished_at:
            took = f", took {(record.finished_at - record.started_at).total_seconds():.0f}s"
        lines.append(f"• {deployment_line(record)}{took}; {step_counts(record)}")
    return "\n".join(lines)
