"""Alembic environment of the validation service: `services.core.migrations.migrate(engine, "validation")`."""

from services.core.migrations import run_migrations

run_migrations()
