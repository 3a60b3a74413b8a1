"""Shared fixtures: a real PostgreSQL for the session, fresh databases on it, and the `cdme` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from services.core.embedded_pg import EmbeddedPostgres
from services.core.settings import PROJECT_ROOT
from services.core.warehouse import libpq_url

RESEARCH_DATA = PROJECT_ROOT.parent / "shared" / "research-data"
PROJECT_DIR = PROJECT_ROOT / "dbt_project"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests are unit tests unless they say otherwise, so `-m unit` is always the fast, I/O-free subset.
    for item in items:
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL: `CDME_TEST_DATABASE_URL`, else an embedded server for this session."""
    configured = os.environ.get("CDME_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("embedded"), database="cdme_test")
    status = server.start()
    assert status.url is not None
    try:
        yield status.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def new_database(server_url: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the test server (dropped at the end of the session)."""
    created: list[str] = []

    def make() -> str:
        name = f"cdme_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(libpq_url(server_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        created.append(name)
        return libpq_url(server_url, name)

    yield make
    with psycopg.connect(libpq_url(server_url, "postgres"), autocommit=True) as conn:
        for name in created:
            conn.execute(f'drop database if exists "{name}" with (force)')


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run the installed `cdme` console script with a private CDME_HOME and the given environment."""
    script = Path(sys.executable).with_name("cdme")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "services.cli.main"]

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliResult:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CDME_")}
        full_env.update({"CDME_HOME": str(tmp_path / "cdme-home"), **(env or {})})
        proc = subprocess.run(
            [*base, *args], env=full_env, capture_output=True, text=True, timeout=timeout, check=False
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run
