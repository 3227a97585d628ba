"""job_effects: the side effects a job already had (a Slack message's ts, a deployment's id).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

A job re-run after its worker died looks its side effects up here before repeating one
(`bot.jobs.JobContext`), so a crash never posts the same message or runs the same deployment
twice. Rows go with their job (no foreign key: jobs are never deleted while they run).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "job_effects",
        sa.Column("job_id", sa.Integer, primary_key=True),
        sa.Column("step", NAME, primary_key=True),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_effects")
