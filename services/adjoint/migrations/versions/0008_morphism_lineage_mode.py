"""Morphisms record a lineage mode of their own where it differs from their run's.

A key_derivable run stores no pairs and answers by evaluating each morphism's derived SQL again. For a model whose
SQL calls a non-deterministic function (`now()`, `random()`, ...) that need not give the run's pairs, so such a
morphism's pairs are stored as a full run stores them, and `lineage_mode` says `full`; it is null where the
morphism follows its run.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"


def upgrade() -> None:
    """Add `morphisms.lineage_mode`."""
    op.execute(f"alter table {SCHEMA}.morphisms add column lineage_mode text")


def downgrade() -> None:
    """Drop `morphisms.lineage_mode`, unless a run depends on it (its answers would change without it)."""
    used = (
        op.get_bind()
        .exec_driver_sql(
            f"select count(distinct run_id) from {SCHEMA}.morphisms where lineage_mode is not null"
        )
        .scalar()
    )
    if used:
        msg = (
            f"cannot downgrade: {used} key_derivable runs captured since store pairs their SQL need not give "
            "again: drop those runs first"
        )
        raise RuntimeError(msg)
    op.execute(f"alter table {SCHEMA}.morphisms drop column lineage_mode")
