"""The embedded PostgreSQL manager: a real server from the wheel, started, restarted and stopped by pid."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from services.core.embedded_pg import EmbeddedPostgres
from services.core.errors import EmbeddedPostgresError
from services.core.warehouse import libpq_url
from tests.conftest import CliResult

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path / "home", database="demo")
    try:
        yield pg
    finally:
        pg.stop()


def _query(url: str, sql: str) -> object:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        cur = conn.execute(sql)
        row = cur.fetchone() if cur.description else None
        return row[0] if row else None


def test_start_is_idempotent_and_serves_tcp_with_a_password(server: EmbeddedPostgres) -> None:
    assert not server.status().running

    first = server.start()
    assert first.running and first.pid and first.port and first.url
    assert (
        first.url.startswith("postgresql+psycopg://postgres:")
        and f"@127.0.0.1:{first.port}/demo" in first.url
    )
    assert _query(first.url, "select current_database()") == "demo"
    assert str(_query(first.url, "show server_version")).startswith("18.")

    again = server.start()
    assert (again.pid, again.port) == (first.pid, first.port), "a running server is reused, not restarted"

    wrong_password = first.url.replace(first.url.split(":")[2].split("@")[0], "wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _query(wrong_password, "select 1")
    assert oct((server.root / "password").stat().st_mode & 0o777) == "0o600"


def test_data_and_port_survive_a_restart(server: EmbeddedPostgres) -> None:
    status = server.start()
    assert status.url is not None
    _query(status.url, "create table kept (x int); insert into kept values (42)")

    assert server.stop() is True
    assert not server.status().running
    assert (
        not psutil.pid_exists(status.pid or -1) or psutil.Process(status.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert server.stop() is False, "stopping a stopped server is a no-op"

    restarted = server.start()
    assert restarted.port == status.port, "the recorded port is reused when free"
    assert restarted.url is not None
    assert _query(restarted.url, "select x from kept") == 42


def test_recovers_after_the_server_was_killed(server: EmbeddedPostgres) -> None:
    status = server.start()
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.status().running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.status().running, "a stale postmaster.pid is not mistaken for a running server"

    recovered = server.start()
    assert recovered.running and recovered.pid != status.pid
    assert recovered.url is not None
    assert _query(recovered.url, "select 1") == 1


def test_a_taken_port_is_a_clear_error(tmp_path: Path, server: EmbeddedPostgres) -> None:
    status = server.start()
    assert status.port is not None
    other = EmbeddedPostgres(tmp_path / "other", port=status.port)
    with pytest.raises(
        EmbeddedPostgresError, match=rf"port {status.port} on 127.0.0.1 is taken; set CDME_EMBEDDED_PORT"
    ):
        other.start()
    assert not (other.root / "data" / "postmaster.pid").exists()


def test_url_before_first_start_is_a_clear_error(server: EmbeddedPostgres) -> None:
    with pytest.raises(EmbeddedPostgresError, match="embedded PostgreSQL has never been started"):
        server.url()


def test_warehouse_cli_start_status_url_stop(cli: Callable[..., CliResult]) -> None:
    stopped = cli("warehouse", "status")
    assert stopped.returncode == 3 and stopped.stdout.startswith("stopped")

    started = cli("warehouse", "start")
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("running pid=") and "***" in started.stdout

        status = cli("warehouse", "status")
        assert status.returncode == 0 and status.stdout.startswith("running pid=")

        url = cli("warehouse", "url")
        assert url.returncode == 0 and url.stdout.startswith("postgresql://postgres:")
        assert _query(url.stdout.strip(), "select 1") == 1
    finally:
        stop = cli("warehouse", "stop")
    assert stop.returncode == 0 and stop.stdout.strip() == "stopped"
    assert cli("warehouse", "stop").stdout.strip() == "not running"


def test_warehouse_url_without_a_server_is_one_line(cli: Callable[..., CliResult]) -> None:
    result = cli("warehouse", "url")
    assert result.returncode == 69
    assert result.stderr == (
        "cdme: error: no warehouse: CDME_WAREHOUSE_URL is unset and the embedded PostgreSQL is stopped; "
        "run `cdme warehouse start`\n"
    )
