"""Alembic migrations of the lineage service's schema, `cdme_lineage` (run by `services.core.migrations`)."""
