"""Alembic migrations of the adjoint service's schema, `cdme_adjoint` (run by `services.core.migrations`)."""
