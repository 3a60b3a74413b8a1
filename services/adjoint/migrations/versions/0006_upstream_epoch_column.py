"""Morphisms record the epoch column of a source upstream, so a run's records of it are that epoch's rows.

A source that holds several epochs may hold a key in each. `?records=true` returned whichever row of the key it
met first; it now reads the rows of the run's epoch. Runs captured before this revision have none recorded, and
keep reading every row of the key.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"


def upgrade() -> None:
    """Add `morphisms.upstream_epoch_column`."""
    op.execute(f"alter table {SCHEMA}.morphisms add column upstream_epoch_column text")


def downgrade() -> None:
    """Drop `morphisms.upstream_epoch_column`."""
    op.execute(f"alter table {SCHEMA}.morphisms drop column upstream_epoch_column")
