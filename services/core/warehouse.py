"""Warehouse access: which PostgreSQL to use, a SQLAlchemy engine on it, and the dbt environment for it."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from services.core.embedded_pg import EmbeddedPostgres
from services.core.errors import WarehouseError, first_line
from services.core.settings import CdmeSettings, normalize_postgres_url


def embedded_server(settings: CdmeSettings) -> EmbeddedPostgres:
    """The embedded PostgreSQL that `settings` describe (it may not be running)."""
    return EmbeddedPostgres(settings.home, port=settings.embedded_port, database=settings.database)


def resolve_warehouse_url(settings: CdmeSettings, *, start_embedded: bool = False) -> str:
    """Return the warehouse URL: `CDME_WAREHOUSE_URL` if set, else the embedded server's.

    Args:
        settings: The settings to read.
        start_embedded: Start the embedded server if it is not running (otherwise that is an error).

    Raises:
        WarehouseError: No URL is configured and the embedded server is not running.
    """
    if settings.warehouse_url:
        return settings.warehouse_url
    server = embedded_server(settings)
    status = server.start() if start_embedded else server.status()
    if not status.running or status.url is None:
        msg = "no warehouse: CDME_WAREHOUSE_URL is unset and the embedded PostgreSQL is stopped; run `cdme warehouse start`"
        raise WarehouseError(msg)
    return status.url


def create_warehouse_engine(url: str, *, pool_size: int = 5) -> Engine:
    """A pooled engine for `url`, with a connect timeout so a dead warehouse fails fast."""
    return create_engine(
        normalize_postgres_url(url),
        pool_size=pool_size,
        pool_pre_ping=True,
        connect_args={"connect_timeout": 10, "application_name": "cdme"},
    )


def check_connection(engine: Engine) -> None:
    """Run `select 1`, turning any failure into one line that names the server.

    Raises:
        WarehouseError: The warehouse cannot be reached or rejected the login.
    """
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except SQLAlchemyError as e:
        where = engine.url.render_as_string(hide_password=True)
        msg = f"cannot reach the warehouse at {where}: {first_line(e)}"
        raise WarehouseError(msg) from e


def libpq_url(url: str, database: str | None = None) -> str:
    """`url` as libpq spells it (`postgresql://`, password included), optionally for another database."""
    parsed = make_url(normalize_postgres_url(url)).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def dbt_connection_env(url: str) -> dict[str, str]:
    """The `DBT_*` variables the reference project's `profiles.yml` reads, derived from one URL.

    The password goes under `DBT_ENV_SECRET_PASSWORD`, which dbt scrubs from its logs and artifacts; the URL's
    `sslmode` reaches dbt as `DBT_SSLMODE`, so dbt connects the way psycopg does.
    """
    parsed: URL = make_url(normalize_postgres_url(url))
    sslmode = parsed.query.get("sslmode", "prefer")
    return {
        "DBT_HOST": parsed.host or "127.0.0.1",
        "DBT_PORT": str(parsed.port or 5432),
        "DBT_USER": parsed.username or "postgres",
        "DBT_ENV_SECRET_PASSWORD": parsed.password or "",
        "DBT_DATABASE": parsed.database or "postgres",
        "DBT_SSLMODE": sslmode if isinstance(sslmode, str) else sslmode[0],
    }
