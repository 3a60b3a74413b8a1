"""Alembic revisions of `cdme_adjoint`."""
