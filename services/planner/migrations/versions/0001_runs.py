"""Runs, their steps and the input checkpoints of the ingest step.

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
SCHEMA = "cdme_planner"


def upgrade() -> None:
    """Create `runs`, `steps` and `input_checkpoints`."""
    op.create_table(
        "runs",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("project", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Date(), nullable=False),
        sa.Column("vars", postgresql.JSONB(), nullable=False),
        sa.Column("select", postgresql.JSONB(), nullable=False),
        sa.Column("exclude", postgresql.JSONB(), nullable=False),
        sa.Column("selector", sa.Text(), nullable=True),
        sa.Column("lineage_mode", sa.Text(), nullable=True),
        sa.Column("validation", sa.Text(), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("ingest", sa.Boolean(), nullable=False),
        sa.Column("runtime", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("failed_step", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.CheckConstraint(
            "status in ('PENDING', 'RUNNING', 'COMPLETE', 'FAILED', 'CANCELLED')", name="runs_status_check"
        ),
        sa.CheckConstraint("validation in ('gating', 'advisory')", name="runs_validation_check"),
        schema=SCHEMA,
    )
    op.create_index("runs_created_at_idx", "runs", ["created_at"], schema=SCHEMA)
    # The database's half of "one active run per (project, target, epoch)"; the advisory lock is the other.
    op.create_index(
        "runs_one_active_idx",
        "runs",
        ["project", "target", "epoch"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("status in ('PENDING', 'RUNNING')"),
    )
    op.create_table(
        "steps",
        sa.Column(
            "run_id", sa.Uuid(), sa.ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("output", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.PrimaryKeyConstraint("run_id", "step"),
        sa.CheckConstraint(
            "status in ('pending', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')",
            name="steps_status_check",
        ),
        schema=SCHEMA,
    )
    op.create_table(
        "input_checkpoints",
        sa.Column(
            "run_id", sa.Uuid(), sa.ForeignKey(f"{SCHEMA}.runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("file", sa.Text(), nullable=False),
        sa.Column("format", sa.Text(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("run_id", "source"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    """Drop the planner's tables."""
    op.drop_table("input_checkpoints", schema=SCHEMA)
    op.drop_table("steps", schema=SCHEMA)
    op.drop_index("runs_one_active_idx", table_name="runs", schema=SCHEMA)
    op.drop_index("runs_created_at_idx", table_name="runs", schema=SCHEMA)
    op.drop_table("runs", schema=SCHEMA)
