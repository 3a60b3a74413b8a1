"""Runs, their ledgers, and the OpenLineage events outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# Migrations name their schema: they are frozen history and must not follow later changes to the service's code.
SCHEMA = "cdme_lineage"


def upgrade() -> None:
    """Create `runs`, `ledgers` and `events` (the outbox) with their indexes."""
    op.create_table(
        "runs",
        sa.Column("run_id", sa.Text(), primary_key=True),
        sa.Column("epoch", sa.Text(), nullable=True),
        sa.Column("project", sa.Text(), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("dbt_status", sa.Text(), nullable=False),
        sa.Column("artifact_dir", sa.Text(), nullable=False),
        sa.Column("validation_report_id", sa.Text(), nullable=True),
        sa.Column("trace", postgresql.JSONB(), nullable=False),
        sa.Column("versions", postgresql.JSONB(), nullable=False),
        sa.Column("lineage", postgresql.JSONB(), nullable=False),
        sa.Column("telemetry", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("status in ('COMPLETE', 'FAILED')", name="runs_status_check"),
        schema=SCHEMA,
    )
    op.create_index("runs_status_created_idx", "runs", ["status", "created_at"], schema=SCHEMA)
    op.create_table(
        "ledgers",
        sa.Column("run_id", sa.Text(), sa.ForeignKey(f"{SCHEMA}.runs.run_id"), primary_key=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("ledger", postgresql.JSONB(), nullable=False),
        sa.CheckConstraint("status in ('BALANCED', 'UNBALANCED')", name="ledgers_status_check"),
        schema=SCHEMA,
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("event_id", sa.Text(), nullable=False, unique=True),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("job_name", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        schema=SCHEMA,
    )
    op.create_index("events_run_idx", "events", ["run_id", "id"], schema=SCHEMA)
    op.create_index(
        "events_pending_idx",
        "events",
        ["id"],
        schema=SCHEMA,
        postgresql_where=sa.text("delivered_at is null"),
    )


def downgrade() -> None:
    """Drop the outbox, the ledgers and the runs."""
    op.drop_table("events", schema=SCHEMA)
    op.drop_table("ledgers", schema=SCHEMA)
    op.drop_table("runs", schema=SCHEMA)
