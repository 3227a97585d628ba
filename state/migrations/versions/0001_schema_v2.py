"""The schema of nixmox before Alembic (schema_version 2), frozen.

Revision ID: 0001
Revises:
Create Date: 2026-12-01

A fresh database gets every table. A pre-Alembic database at version 2 is stamped with this
revision instead (see `state.migrate`); one at version 1 runs it: the tables it lacks are
created and `approvals.deployment_id` (schema 2) is added.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SCHEMA_VERSION = 2
NAME = sa.String(255)
STATE = sa.String(32)


def frozen_tables() -> sa.MetaData:
    """Today's tables as they were at schema_version 2 (never change them: add a revision)."""
    meta = sa.MetaData()
    sa.Table(
        "schema_version",
        meta,
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("applied_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "deployments",
        meta,
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
        sa.Column("manifest", sa.Text),
        sa.Column("scope", NAME),
        sa.Column("holder", NAME),
        sa.Column("note", sa.Text),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Index("ix_deployments_created", "created_at"),
        sa.Index("ix_deployments_state", "state"),
    )
    sa.Table(
        "steps",
        meta,
        sa.Column(
            "deployment_id", sa.String(32), sa.ForeignKey("deployments.id"), primary_key=True
        ),
        sa.Column("step_id", NAME, primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("phase", STATE, nullable=False),
        sa.Column("service", NAME),
        sa.Column("state", STATE, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("previous_system", sa.Text),
        sa.Column("new_system", sa.Text),
        sa.Column("commands", sa.JSON),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Index("ix_steps_service", "service"),
    )
    sa.Table(
        "services",
        meta,
        sa.Column("name", NAME, primary_key=True),
        sa.Column("revision", NAME),
        sa.Column("system_path", sa.Text),
        sa.Column("previous_system", sa.Text),
        sa.Column("last_deployment_id", sa.String(32)),
        sa.Column("last_health", STATE),
        sa.Column("health_at", sa.DateTime),
        sa.Column("updated_at", sa.DateTime),
    )
    sa.Table(
        "locks",
        meta,
        sa.Column("service", NAME, primary_key=True),
        sa.Column("holder", NAME, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("acquired_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime),
    )
    sa.Table(
        "deliveries",
        meta,
        sa.Column("delivery_id", NAME, primary_key=True),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    sa.Table(
        "jobs",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", NAME, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("worker", NAME),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
        sa.Index("ix_jobs_state", "state"),
    )
    sa.Table(
        "approvals",
        meta,
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
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("resolved_by", NAME),
        sa.Column("resolved_at", sa.DateTime),
        sa.Column("deployment_id", sa.String(32)),
    )
    sa.Table(
        "audit_log",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", NAME, nullable=False),
        sa.Column("action", NAME, nullable=False),
        sa.Column("detail", sa.JSON),
        sa.Index("ix_audit_at", "at"),
    )
    return meta


def upgrade() -> None:
    bind = op.get_bind()
    meta = frozen_tables()
    meta.create_all(bind, checkfirst=True)  # a version 1 database keeps its tables
    columns = {column["name"] for column in sa.inspect(bind).get_columns("approvals")}
    if "deployment_id" not in columns:  # schema_version 1
        op.add_column("approvals", sa.Column("deployment_id", sa.String(32)))
    versions = meta.tables["schema_version"]
    found = bind.execute(sa.select(sa.func.max(versions.c.version))).scalar()
    if found is None or found < SCHEMA_VERSION:
        now = datetime.now(UTC).replace(tzinfo=None)
        bind.execute(versions.insert().values(version=SCHEMA_VERSION, applied_at=now))


def downgrade() -> None:
    bind = op.get_bind()
    frozen_tables().drop_all(bind)
