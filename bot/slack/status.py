"""`/nixmox status` and `/nixmox history` as Slack text, mirroring `nixmox status` / `history`."""

from __future__ import annotations

from bot.slack.blocks import escape, format_time, mention
from bot.status_text import STATUS_TITLE, short, step_counts
from planner.render import summary
from runners.store import DeploymentRecord, LockRecord, ServiceRecord, Store

HISTORY_LIMIT = 10
NOTHING_DEPLOYED = "No deployment recorded yet."


def deployment_line(record: DeploymentRecord) -> str:
    """`d-… deploy succeeded (slack by @x) at …, revision abc`."""
    by = f" by {mention(record.requested_by)}" if record.requested_by else ""
    at = record.started_at or record.created_at
    when = f" at {format_time(at)}" if at else ""
    return (
        f"`{escape(record.id)}` {record.kind.value} *{record.state.value}* "
        f"({escape(str(record.trigger))}{by}){when}, revision `{short(record.head)}`"
    )


def service_status_line(name: str, record: ServiceRecord | None, lock: LockRecord | None) -> str:
    """SERVICE, REVISION, HEALTH, SYSTEM, DEPLOYMENT, LOCKED BY — as one line."""
    health = record.last_health if record is not None and record.last_health else "unknown"
    parts = [
        f"*{escape(name)}*",
        f"revision `{short(record.revision if record else None)}`",
        escape(health),
    ]
    if record is not None and record.system_path:
        parts.append(f"`{escape(record.system_path)}`")
    if record is not None and record.last_deployment_id:
        parts.append(f"deployment `{escape(record.last_deployment_id)}`")
    if lock is not None:
        reason = f" ({escape(lock.reason)})" if lock.reason else ""
        parts.append(f":lock: locked by {mention(lock.holder)}{reason}")
    return " · ".join(parts)


async def status_text(store: Store, service: str | None = None) -> str:
    """The last deployment, then per service its revision, health, system and lock."""
    last = await store.last_deployment(finished=False)
    services = await store.services()
    locks = {lock.service: lock for lock in await store.locks()}
    lines = [f"*{STATUS_TITLE}*"]
    if last is None:
        lines.append(NOTHING_DEPLOYED)
    else:
        lines.append(f"Last deployment: {deployment_line(last)}")
        lines.append(f"plan: {escape(summary(last.plan))}; steps: {step_counts(last)}")
        if last.note:
            lines.append(escape(last.note))
    names = sorted(set(services) | set(locks))
    if service is not None:
        if service not in names:
            lines.append(f"`{escape(service)}` has never been deployed and is not locked.")
            return "\n".join(lines)
        names = [service]
    lines += [f"• {service_status_line(n, services.get(n), locks.get(n))}" for n in names]
    return "\n".join(lines)


async def history_text(store: Store, service: str | None = None) -> str:
    """The newest deployments first (only those touching `service`)."""
    records = await store.history(service, limit=HISTORY_LIMIT)
    if not records:
        return "No deployments recorded" + (f" for {escape(service)}." if service else ".")
    title = f"*Recent deployments{f' of {escape(service)}' if service else ''}*"
    lines = [title]
    for record in records:
        took = ""
        if record.started_at and record.finished_at:
            took = f", took {(record.finished_at - record.started_at).total_seconds():.0f}s"
        lines.append(f"• {deployment_line(record)}{took}; {step_counts(record)}")
    return "\n".join(lines)
