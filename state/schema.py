"""The tables of the state database: one metadata, the head of the Alembic migrations.

A change here needs a new revision in `state/migrations/versions/` (tests compare the two).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; stored naive (UTC) on both backends."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


metadata = sa.MetaData()
NAME = sa.String(255)
STATE = sa.String(32)


# a Column belongs to one table: columns that several tables share are made by these functions
def serial_id() -> sa.Column[int]:
    """An auto-incremented integer key, for rows that are appended (a queue, a log)."""
    return sa.Column("id", sa.Integer, primary_key=True, autoincrement=True)


def check_result() -> list[sa.Column[Any]]:
    """What one health check found: the latest check and the history both hold it."""
    return [
        sa.Column("healthy", sa.Boolean, nullable=False),
        sa.Column("check_kind", STATE, nullable=False),
        sa.Column("output", sa.Text, nullable=False, default=""),
        sa.Column("source", STATE, nullable=False),
    ]


# the version table of nixmox before Alembic: kept so that an older nixmox refuses a database
# migrated past it ("newer than this nixmox"); Alembic's own table is alembic_version
LEGACY_VERSION = 3  # what the slack_messages revision writes here (older nixmox knew 1 and 2)
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", STATE, nullable=False),
    sa.Column("trigger", STATE, nullable=False),
    sa.Column("state", STATE, nullable=False),
    sa.Column("requested_by", NAME),
    sa.Column("approved_by", NAME),
    sa.Column("base", NAME),
    sa.Column("head", NAME),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("plan", sa.Text, nullable=False),
    # the manifest the deployment ran with: health checks and rollbacks need it later
    sa.Column("manifest", sa.Text),
    sa.Column("scope", NAME),
    sa.Column("holder", NAME),
    sa.Column("note", sa.Text),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_deployments_created", "created_at"),
    sa.Index("ix_deployments_state", "state"),
)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("deployment_id", sa.String(32), sa.ForeignKey("deployments.id"), primary_key=True),
    sa.Column("step_id", NAME, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("phase", STATE, nullable=False),
    sa.Column("service", NAME),
    sa.Column("state", STATE, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("output", sa.Text, nullable=False, default=""),
    sa.Column("reason", sa.Text),
    sa.Column("previous_system", sa.Text),
    sa.Column("new_system", sa.Text),
    sa.Column("commands", sa.JSON),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_steps_service", "service"),
)

services = sa.Table(
    "services",
    metadata,
    sa.Column("name", NAME, primary_key=True),
    sa.Column("revision", NAME),
    sa.Column("system_path", sa.Text),
    sa.Column("previous_system", sa.Text),
    sa.Column("last_deployment_id", sa.String(32)),
    sa.Column("last_health", STATE),
    sa.Column("health_at", UTCDateTime),
    sa.Column("updated_at", UTCDateTime),
)

locks = sa.Table(
    "locks",
    metadata,
    sa.Column("service", NAME, primary_key=True),
    sa.Column("holder", NAME, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("delivery_id", NAME, primary_key=True),
    sa.Column("received_at", UTCDateTime, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    serial_id(),
    sa.Column("kind", NAME, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("state", STATE, nullable=False),
    sa.Column("worker", NAME),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("error", sa.Text),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Index("ix_jobs_state", "state"),
)

# side effects a job already had, looked up when it is re-run after a crash (bot.jobs)
job_effects = sa.Table(
    "job_effects",
    metadata,
    sa.Column("job_id", sa.Integer, primary_key=True),
    sa.Column("step", NAME, primary_key=True),
    sa.Column("ref", sa.Text, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", STATE, nullable=False),
    sa.Column("requested_by", NAME, nullable=False),
    sa.Column("service", NAME),
    sa.Column("args", sa.JSON),
    sa.Column("digest", sa.String(128), nullable=False),
    sa.Column("plan", sa.Text),
    sa.Column("channel", NAME),
    sa.Column("ts", NAME),
    sa.Column("state", STATE, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("resolved_by", NAME),
    sa.Column("resolved_at", UTCDateTime),
    sa.Column("deployment_id", sa.String(32)),  # added by schema version 2
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    serial_id(),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("actor", NAME, nullable=False),
    sa.Column("action", NAME, nullable=False),
    sa.Column("detail", sa.JSON),
    sa.Index("ix_audit_at", "at"),
)


slack_messages = sa.Table(
    "slack_messages",
    metadata,
    # the Slack message that shows a deployment's progress (to edit it after a restart)
    sa.Column("deployment_id", sa.String(32), primary_key=True),
    sa.Column("channel", NAME, nullable=False),
    sa.Column("ts", NAME, nullable=False),
    sa.Column("title", sa.Text),
    sa.Column("origin", sa.Text),
    sa.Column("posted_at", UTCDateTime, nullable=False),
)

# health checks and drift findings (state.health)
health_latest = sa.Table(
    "health_latest",
    metadata,
    sa.Column("service", NAME, primary_key=True),
    *check_result(),
    sa.Column("checked_at", UTCDateTime, nullable=False),
    # when the service entered its current state (healthy or not)
    sa.Column("since", UTCDateTime, nullable=False),
)

health_history = sa.Table(
    "health_history",
    metadata,
    serial_id(),
    sa.Column("service", NAME, nullable=False),
    *check_result(),
    sa.Column("transition", sa.Boolean, nullable=False, default=False),
    sa.Column("checked_at", UTCDateTime, nullable=False),
    sa.Index("ix_health_history_service", "service", "checked_at"),
)

drift_findings = sa.Table(
    "drift_findings",
    metadata,
    serial_id(),
    # a service name, or a global scope (`pending`, `tf:infra`)
    sa.Column("subject", NAME, nullable=False),
    sa.Column("kind", STATE, nullable=False),
    sa.Column("expected", sa.Text),
    sa.Column("actual", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Column("first_seen", UTCDateTime, nullable=False),
    sa.Column("last_seen", UTCDateTime, nullable=False),
    sa.Column("cleared_at", UTCDateTime),
    sa.Index("ix_drift_active", "cleared_at"),
)
