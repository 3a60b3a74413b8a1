"""`migrate()` on a real PostgreSQL: idempotent, its version table in the service's schema, safe under races."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.core.errors import ConfigurationError, WarehouseError
from services.core.migrations import migrate
from services.core.warehouse import create_warehouse_engine
from services.validation import store

pytestmark = pytest.mark.integration


def _tables(url: str, schema: str) -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select table_name from information_schema.tables where table_schema = %s order by table_name",
            (schema,),
        ).fetchall()
    return [r[0] for r in rows]


def test_migrate_twice_is_idempotent_and_keeps_alembic_in_the_service_schema(
    new_database: Callable[[], str],
) -> None:
    url = new_database()
    assert migrate(url, "validation") == "0002"
    with psycopg.connect(url) as conn:
        conn.execute(
            "insert into cdme_validation.reports (id, principal, manifest_checksum, status, errors, warnings, report)"
            " values (gen_random_uuid(), 'p', 'sha256:x', 'passed', 0, 0, '{}')"
        )

    assert migrate(url, "validation") == "0002"

    assert _tables(url, "cdme_validation") == ["alembic_version", "reports"]
    with psycopg.connect(url) as conn:
        assert conn.execute("select version_num from cdme_validation.alembic_version").fetchall() == [
            ("0002",)
        ]
        assert conn.execute("select count(*) from cdme_validation.reports").fetchone() == (1,)
        # Nothing of Alembic's leaks into the default schema.
        assert conn.execute(
            "select count(*) from information_schema.tables where table_name = 'alembic_version'"
        ).fetchone() == (1,)
        indexes = conn.execute(
            "select indexname from pg_indexes where schemaname = 'cdme_validation' and tablename = 'reports'"
        ).fetchall()
    assert {"reports_created_at_idx", "reports_pkey"} == {i[0] for i in indexes}


def test_the_migrated_schema_matches_the_store_tables(new_database: Callable[[], str]) -> None:
    url = new_database()
    engine = create_warehouse_engine(url, pool_size=1)
    try:
        migrate(engine, "validation")
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_schemas": True, "version_table_schema": store.SCHEMA}
            )
            # Alembic leaves its own version table out of the comparison.
            differences = compare_metadata(context, store.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_concurrent_migrations_apply_once(new_database: Callable[[], str]) -> None:
    url = new_database()
    with ThreadPoolExecutor(max_workers=4) as pool:
        revisions = list(pool.map(lambda _: migrate(url, "validation"), range(4)))
    assert revisions == ["0002"] * 4
    assert _tables(url, "cdme_validation") == ["alembic_version", "reports"]


def test_unknown_service_and_unreachable_database_fail_with_one_line() -> None:
    with pytest.raises(ConfigurationError, match="service 'nosuch' has no migrations"):
        migrate("postgresql://nobody@127.0.0.1:1/none", "nosuch")
    with pytest.raises(ConfigurationError, match="not a lower-case identifier"):
        migrate("postgresql://nobody@127.0.0.1:1/none", "../core")
    with pytest.raises(WarehouseError, match=r"cannot migrate schema cdme_validation at .*127\.0\.0\.1:1"):
        migrate("postgresql://nobody@127.0.0.1:1/none", "validation")
