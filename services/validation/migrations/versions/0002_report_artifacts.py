"""Reports keep the documents they were made from, so cost estimates can be asked for later.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_validation"


def upgrade() -> None:
    """Add `reports.artifacts` (zlib-compressed JSON; null for reports stored before it existed)."""
    op.add_column("reports", sa.Column("artifacts", sa.LargeBinary(), nullable=True), schema=SCHEMA)


def downgrade() -> None:
    """Drop `reports.artifacts`."""
    op.drop_column("reports", "artifacts", schema=SCHEMA)
