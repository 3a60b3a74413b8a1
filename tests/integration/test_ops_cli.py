"""`cdme migrate` and `cdme serve`: the commands the container image runs, against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from services.cli.main import migratable_services
from services.core.migrations import migrations_dir
from services.core.net import free_port
from tests.conftest import CliResult
from tests.service_process import AUTH, TOKEN

pytestmark = pytest.mark.integration


def _schemas(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("select nspname from pg_namespace where nspname like 'cdme\\_%'").fetchall()
    return {row[0] for row in rows}


def _head(service: str) -> str:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir(service)))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def test_migrate_all_brings_every_services_schema_to_head_and_is_idempotent(
    cli: Callable[..., CliResult], new_database: Callable[[], str]
) -> None:
    url = new_database()
    first = cli("migrate", "--all", env={"CDME_WAREHOUSE_URL": url})
    again = cli("migrate", "--all", env={"CDME_WAREHOUSE_URL": url})

    services = migratable_services()
    assert "validation" in services
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"cdme_{s}: at revision {_head(s)}" for s in services]
    assert again.returncode == 0 and again.stdout == first.stdout
    assert _schemas(url) == {f"cdme_{s}" for s in services}
    with psycopg.connect(url) as conn:
        for service in services:
            [(revision,)] = conn.execute(f"select version_num from cdme_{service}.alembic_version").fetchall()
            assert revision == _head(service)


def test_migrate_one_service(cli: Callable[..., CliResult], new_database: Callable[[], str]) -> None:
    url = new_database()
    result = cli("migrate", "--service", "validation", env={"CDME_WAREHOUSE_URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"cdme_validation: at revision {_head('validation')}\n"
    assert _schemas(url) == {"cdme_validation"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "cdme: error: name the services with --service, or pass --all (one of the two)"),
        (
            ("--all", "--service", "validation"),
            "cdme: error: name the services with --service, or pass --all",
        ),
        (("--service", "nosuch"), "cdme: error: unknown service 'nosuch'; choose one of validation, adjoint"),
    ],
)
def test_migrate_usage_errors_are_one_line(
    cli: Callable[..., CliResult], args: tuple[str, ...], message: str
) -> None:
    result = cli("migrate", *args, env={"CDME_WAREHOUSE_URL": "postgresql://u:p@127.0.0.1:1/db"})
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_migrate_against_an_unreachable_warehouse_fails_in_one_line_without_the_password(
    cli: Callable[..., CliResult],
) -> None:
    port = free_port()
    result = cli("migrate", "--all", env={"CDME_WAREHOUSE_URL": f"postgresql://u:s3cret@127.0.0.1:{port}/db"})
    assert result.returncode != 0
    assert result.stderr.startswith("cdme: error: cannot migrate schema cdme_validation at ")
    assert result.stderr.count("\n") == 1 and "s3cret" not in result.stderr


def test_serve_runs_a_service_on_the_given_port_until_terminated(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDME_")}
    env |= {
        "CDME_WAREHOUSE_URL": new_database(),
        "CDME_AUTH_TOKENS": f"{TOKEN}=tester:data_engineer",
        "CDME_HOME": str(tmp_path),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "serve", "validation", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert ready is not None and ready.status_code == 200, log.read_text()
        unauthenticated = httpx.get(f"http://127.0.0.1:{port}/reports/00000000-0000-0000-0000-000000000000")
        assert unauthenticated.status_code == 401
        found = httpx.get(
            f"http://127.0.0.1:{port}/reports/00000000-0000-0000-0000-000000000000", headers=AUTH
        )
        assert found.status_code == 404
    finally:
        process.terminate()
        returncode = process.wait(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (a container reports 143).
    assert returncode in (0, -signal.SIGTERM), log.read_text()
    # One JSON object per line, uvicorn's own lines included: the app's logging configuration took over.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {line["service"] for line in lines} == {"validation"}
    assert "Application shutdown complete." in [line["msg"] for line in lines]


def test_serve_refuses_an_unknown_service(cli: Callable[..., CliResult]) -> None:
    result = cli("serve", "warehouse")
    assert result.returncode == 2
    assert (
        result.stderr
        == "cdme: error: unknown service 'warehouse'; choose one of validation, adjoint, lineage, planner\n"
    )
