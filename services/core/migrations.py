"""Each service migrates its own PostgreSQL schema with Alembic, programmatically: no `alembic.ini` at runtime.

A service keeps its migrations in `services/<service>/migrations/` (`env.py`, `script.py.mako`, `versions/`) and
owns the schema `cdme_<service>`, where Alembic's version table lives too. `migrate` creates the schema, takes a
PostgreSQL advisory lock and upgrades to head in one transaction, so two replicas starting at once migrate
once and a failed migration leaves the schema as it was.

The contract for a service's `env.py` is one call:

Examples:
    >>> # services/<service>/migrations/env.py
    >>> from services.core.migrations import run_migrations
    >>> run_migrations()

    >>> migrate(engine, "validation")  # in the service's lifespan
    '0001'
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from alembic import command, context
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from services.core.errors import ConfigurationError, WarehouseError, first_line
from services.core.warehouse import create_warehouse_engine

logger = logging.getLogger("cdme.migrations")

_SERVICES_DIR = Path(__file__).resolve().parents[1]
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]{0,40}")
# Keys of `Config.attributes` through which `migrate` hands its connection and schema to `env.py`.
_CONNECTION = "cdme.connection"
_SCHEMA = "cdme.schema"


def service_schema(service: str) -> str:
    """The schema a service owns: `cdme_<service>`.

    Raises:
        ConfigurationError: `service` is not a lower-case identifier.
    """
    if not _SERVICE_NAME.fullmatch(service):
        msg = f"service name {service!r} is not a lower-case identifier (e.g. 'validation')"
        raise ConfigurationError(msg)
    return f"cdme_{service}"


def migrations_dir(service: str) -> Path:
    """The directory of a service's Alembic migrations, `services/<service>/migrations/`.

    Raises:
        ConfigurationError: The service has no migrations directory with an `env.py`.
    """
    service_schema(service)
    path = _SERVICES_DIR / service / "migrations"
    if not (path / "env.py").is_file():
        msg = f"service {service!r} has no migrations: {path / 'env.py'} does not exist"
        raise ConfigurationError(msg)
    return path


def _lock_key(schema: str) -> int:
    # Advisory locks share one bigint namespace per database; hashing a CDME-specific string keeps ours apart.
    return int.from_bytes(hashlib.sha256(f"cdme.migrate.{schema}".encode()).digest()[:8], "big", signed=True)


def _alembic_config(service: str, connection: Connection, schema: str) -> Config:
    config = Config()
    # ConfigParser interpolates `%`, which a checkout path may contain.
    config.set_main_option("script_location", str(migrations_dir(service)).replace("%", "%%"))
    config.attributes[_CONNECTION] = connection
    config.attributes[_SCHEMA] = schema
    return config


def migrate(engine_or_url: Engine | str, service: str) -> str | None:
    """Upgrade a service's schema to the newest migration; a schema already there is left untouched.

    Args:
        engine_or_url: An engine on the service's database, or its URL (an engine is made and disposed).
        service: The service whose `services/<service>/migrations/` to run against schema `cdme_<service>`.

    Returns:
        The revision the schema is at afterwards (None only for a service without any migration yet).

    Raises:
        ConfigurationError: The service has no migrations directory.
        WarehouseError: The database cannot be reached, or refused the schema or a migration.
    """
    schema = service_schema(service)
    migrations_dir(service)
    engine = (
        create_warehouse_engine(engine_or_url, pool_size=1)
        if isinstance(engine_or_url, str)
        else engine_or_url
    )
    try:
        with engine.begin() as conn:
            # A transaction-scoped lock: released by the commit or the rollback, even if this process dies.
            conn.execute(text("select pg_advisory_xact_lock(:key)"), {"key": _lock_key(schema)})
            conn.execute(
                text(f"create schema if not exists {conn.dialect.identifier_preparer.quote(schema)}")
            )
            # Alembic joins the transaction it is given, so the whole upgrade commits or rolls back at once.
            command.upgrade(_alembic_config(service, conn, schema), "head")
            revision = MigrationContext.configure(
                conn, opts={"version_table_schema": schema}
            ).get_current_revision()
    except SQLAlchemyError as e:
        where = engine.url.render_as_string(hide_password=True)
        msg = f"cannot migrate schema {schema} at {where}: {first_line(e)}"
        raise WarehouseError(msg) from e
    finally:
        if isinstance(engine_or_url, str):
            engine.dispose()
    logger.info("schema migrated", extra={"schema": schema, "revision": revision})
    return revision


def migration_lag(engine: Engine, service: str) -> str | None:
    """Check that a service's schema is at the newest migration the code ships (readiness).

    Args:
        engine: An engine on the service's database.
        service: The service whose schema `cdme_<service>` to check.

    Returns:
        The schema's revision.

    Raises:
        WarehouseError: The database cannot be reached, or the schema is behind (or ahead of) the code's head.
    """
    schema = service_schema(service)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir(service)).replace("%", "%%"))
    head = ScriptDirectory.from_config(config).get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(
                conn, opts={"version_table_schema": schema}
            ).get_current_revision()
    except SQLAlchemyError as e:
        msg = f"cannot read the migration state of {schema}: {first_line(e)}"
        raise WarehouseError(msg) from e
    if current != head:
        msg = f"schema {schema} is at revision {current or 'none'}, this code needs {head}"
        raise WarehouseError(msg)
    return current


def run_migrations() -> None:
    """Run the pending migrations on the connection `migrate` passed in; the body of every service's `env.py`.

    Raises:
        ConfigurationError: Alembic was started some other way (its command line, or offline `--sql` mode);
            only `migrate` knows the connection and the schema.
    """
    config = context.config
    connection = config.attributes.get(_CONNECTION)
    schema = config.attributes.get(_SCHEMA)
    if context.is_offline_mode() or not isinstance(connection, Connection) or not isinstance(schema, str):
        msg = "CDME migrations run through services.core.migrations.migrate(engine, service), not the alembic CLI"
        raise ConfigurationError(msg)
    context.configure(connection=connection, version_table_schema=schema, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
