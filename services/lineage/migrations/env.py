"""Alembic environment of the lineage service: `services.core.migrations.migrate(engine, "lineage")`."""

from services.core.migrations import run_migrations

run_migrations()
