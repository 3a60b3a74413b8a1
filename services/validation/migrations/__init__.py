"""Alembic migrations of the validation service's schema, `cdme_validation` (run by `services.core.migrations`)."""
