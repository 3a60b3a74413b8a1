"""`mapped` is looked up by the 64-bit hash of a key instead of the key's text.

A full run's pairs number in the millions, and their two text indexes were most of its capture time: the integer
sort of a hash builds in a third of the time and writes a third of the bytes. Lookups compare the text too, so a
hash collision costs a row read, never a wrong answer. The backward index keeps each target's source keys in order,
which paged walks read the first of. It leaves out the pairs whose source key is the target key or its leading
components (identities, explodes): the forward index finds those from the target key's components.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"


def upgrade() -> None:
    """Replace the text indexes of `mapped` (and of every run's partition) by hashed ones."""
    op.execute(f"drop index {SCHEMA}.mapped_backward_idx")
    op.execute(f"drop index {SCHEMA}.mapped_forward_idx")
    op.execute(
        f"create index mapped_backward_idx on {SCHEMA}.mapped "
        "(morphism_id, hashtextextended(target_key, 0), source_key) "
        "where not (target_key = source_key or starts_with(target_key, source_key || '|'))"
    )
    op.execute(
        f"create index mapped_forward_idx on {SCHEMA}.mapped (morphism_id, hashtextextended(source_key, 0))"
    )


def downgrade() -> None:
    """Restore the text indexes of revision 0002."""
    op.execute(f"drop index {SCHEMA}.mapped_backward_idx")
    op.execute(f"drop index {SCHEMA}.mapped_forward_idx")
    op.execute(f"create index mapped_backward_idx on {SCHEMA}.mapped (morphism_id, target_key, source_key)")
    op.execute(f"create index mapped_forward_idx on {SCHEMA}.mapped (morphism_id, source_key, target_key)")
