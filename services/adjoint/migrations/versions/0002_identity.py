"""Morphisms record whether they are the identity on keys (every pair is (k, k)), so backward skips their lookups.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"


def upgrade() -> None:
    """Add `morphisms.identity`."""
    op.execute(f"alter table {SCHEMA}.morphisms add column identity boolean not null default false")


def downgrade() -> None:
    """Drop `morphisms.identity`."""
    op.execute(f"alter table {SCHEMA}.morphisms drop column identity")
