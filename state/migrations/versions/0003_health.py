"""health and drift: the latest health check per service, its history, and drift findings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Written by `nixmox health`, the monitor in `nixmox serve` and `nixmox drift` (`state.health`).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NAME = sa.String(255)
STATE = sa.String(32)


def check_result() -> list[sa.Column[object]]:
    """The columns of one health check, in both health tables (a Column fits one table)."""
    return [
        sa.Column("healthy", sa.Boolean, nullable=False),
        sa.Column("check_kind", STATE, nullable=False),
        sa.Column("output", sa.Text, nullable=False),
        sa.Column("source", STATE, nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "health_latest",
        sa.Column("service", NAME, primary_key=True),
        *check_result(),
        sa.Column("checked_at", sa.DateTime, nullable=False),
        sa.Column("since", sa.DateTime, nullable=False),
    )
    op.create_table(
        "health_history",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("service", NAME, nullable=False),
        *check_result(),
        sa.Column("transition", sa.Boolean, nullable=False),
        sa.Column("checked_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_health_history_service", "health_history", ["service", "checked_at"])
    op.create_table(
        "drift_findings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", NAME, nullable=False),
        sa.Column("kind", STATE, nullable=False),
        sa.Column("expected", sa.Text),
        sa.Column("actual", sa.Text),
        sa.Column("detail", sa.Text),
        sa.Column("first_seen", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("cleared_at", sa.DateTime),
    )
    op.create_index("ix_drift_active", "drift_findings", ["cleared_at"])


def downgrade() -> None:
    op.drop_table("drift_findings")
    op.drop_table("health_history")
    op.drop_table("health_latest")
