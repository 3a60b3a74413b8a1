"""Morphisms record where a full run's identity pairs are implied from instead of stored.

An identity morphism into a model maps each key of the model to itself, so its pairs are the model's keys, and
those are the input keys of any morphism of the run reading the model: its mapped source keys, filtered keys and
errored keys, which the run stores anyway. A full run then stores no pairs for such an identity and records, in
`keys_from`, the morphisms whose stored input keys are the model's (the reader, and the readers the reader's own
keys come from when it is implied too). Runs captured before this revision have none, and keep their pairs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"


def upgrade() -> None:
    """Add `morphisms.keys_from`."""
    op.execute(f"alter table {SCHEMA}.morphisms add column keys_from integer[]")


def downgrade() -> None:
    """Drop `morphisms.keys_from`, unless a run depends on it (its answers would change without it)."""
    used = (
        op.get_bind()
        .exec_driver_sql(f"select count(distinct run_id) from {SCHEMA}.morphisms where keys_from is not null")
        .scalar()
    )
    if used:
        msg = (
            f"cannot downgrade: {used} full runs captured since imply identities' pairs, which they do not "
            "store: drop those runs first"
        )
        raise RuntimeError(msg)
    op.execute(f"alter table {SCHEMA}.morphisms drop column keys_from")
