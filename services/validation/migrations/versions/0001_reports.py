"""Reports: one row per validation the service ran, the full report kept as JSON.

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
SCHEMA = "cdme_validation"


def upgrade() -> None:
    """Create `reports` and its index on `created_at`."""
    op.create_table(
        "reports",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("project", sa.Text(), nullable=True),
        sa.Column("manifest_checksum", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("warnings", sa.Integer(), nullable=False),
        sa.Column("report", postgresql.JSONB(), nullable=False),
        sa.CheckConstraint("status in ('passed', 'rejected')", name="reports_status_check"),
        schema=SCHEMA,
    )
    op.create_index("reports_created_at_idx", "reports", ["created_at"], schema=SCHEMA)


def downgrade() -> None:
    """Drop `reports`."""
    op.drop_index("reports_created_at_idx", table_name="reports", schema=SCHEMA)
    op.drop_table("reports", schema=SCHEMA)
