"""Alembic environment of the adjoint service: `services.core.migrations.migrate(engine, "adjoint")`."""

from services.core.migrations import run_migrations

run_migrations()
