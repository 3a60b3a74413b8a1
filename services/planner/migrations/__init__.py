"""Alembic migrations of the planner service's schema, `cdme_planner` (run by `services.core.migrations`)."""
