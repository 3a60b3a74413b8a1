"""Alembic environment of the planner service: `services.core.migrations.migrate(engine, "planner")`."""

from services.core.migrations import run_migrations

run_migrations()
