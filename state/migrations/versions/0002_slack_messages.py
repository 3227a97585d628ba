"""slack_messages: the Slack message of each deployment, filled from the audit log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Until now the Slack bot recorded a deployment's message as an audit entry
(`slack.deployment.message`, detail {deployment, channel, ts, title, origin}); the latest entry
of each deployment is copied here, so existing deployments keep their links. schema_version 3
is written so that a nixmox from before Alembic refuses this database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MESSAGE_ACTION = "slack.deployment.message"  # bot.slack.bot.Audit.MESSAGE, as it was
LEGACY_VERSION = 3
NAME = sa.String(255)

audit_log = sa.table(
    "audit_log",
    sa.column("id", sa.Integer),
    sa.column("at", sa.DateTime),
    sa.column("action", NAME),
    sa.column("detail", sa.JSON),
)
schema_version = sa.table(
    "schema_version", sa.column("version", sa.Integer), sa.column("applied_at", sa.DateTime)
)


def upgrade() -> None:
    messages = op.create_table(
        "slack_messages",
        sa.Column("deployment_id", sa.String(32), primary_key=True),
        sa.Column("channel", NAME, nullable=False),
        sa.Column("ts", NAME, nullable=False),
        sa.Column("title", sa.Text),
        sa.Column("origin", sa.Text),
        sa.Column("posted_at", sa.DateTime, nullable=False),
    )
    rows = recorded_messages(op.get_bind())
    if rows:
        op.bulk_insert(messages, rows)
    now = datetime.now(UTC).replace(tzinfo=None)
    op.execute(schema_version.insert().values(version=LEGACY_VERSION, applied_at=now))


def recorded_messages(bind: sa.Connection) -> list[dict[str, Any]]:
    """The latest recorded message of each deployment, from the audit log."""
    query = (
        sa.select(audit_log.c.at, audit_log.c.detail)
        .where(audit_log.c.action == MESSAGE_ACTION)
        .order_by(audit_log.c.id)
    )
    latest: dict[str, dict[str, Any]] = {}
    for at, detail in bind.execute(query):
        link = detail if isinstance(detail, dict) else {}
        deployment, channel, ts = link.get("deployment"), link.get("channel"), link.get("ts")
        if not (deployment and channel and ts):
            continue
        latest[str(deployment)] = {
            "deployment_id": str(deployment),
            "channel": str(channel),
            "ts": str(ts),
            "title": _text(link.get("title")),
            "origin": _text(link.get("origin")),
            "posted_at": at,
        }
    return list(latest.values())


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def downgrade() -> None:
    op.drop_table("slack_messages")
    op.execute(schema_version.delete().where(schema_version.c.version == LEGACY_VERSION))
