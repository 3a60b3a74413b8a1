"""The planner service over real HTTP, with the real validation service; adjoint and lineage are down.

Both services run as uvicorn processes on one fresh database. Runs then end FAILED at capture with a
one-line reason, which is enough to check the HTTP contract, the 409 of a second active run, the log stream,
and what a planner killed with SIGKILL in the middle of dbt does when it starts again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.datagen.trading import GenerateRequest, currency_codes, generate
from tests.conftest import PROJECT_DIR
from tests.e2e.service_process import ServiceProcess, free_port

pytestmark = pytest.mark.integration

TOKEN = "planner-e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EPOCH = date(2026, 11, 20)


@dataclass
class Stack:
    url: str
    home: Path
    validation: ServiceProcess
    planner: ServiceProcess

    def api(self) -> httpx.Client:
        return self.planner.client(TOKEN)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def stack(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = new_database()
    home = tmp_path_factory.mktemp("planner-service")
    generate(
        url,
        GenerateRequest(trades=1500, epoch=EPOCH, seed=5, counterparties=200),
        currency_codes(PROJECT_DIR / "seeds" / "currencies.csv"),
    )
    validation_port, planner_port = free_port(), free_port()
    env = {
        "CDME_WAREHOUSE_URL": url,
        "CDME_AUTH_TOKENS": f"{TOKEN}=planner:data_engineer,auditor,service",
        "CDME_SERVICE_TOKEN": TOKEN,
        "CDME_HOME": str(home),
        "CDME_PEPPER": "e2e-pepper-0123456789abcdef",
        "CDME_VALIDATION_URL": f"http://127.0.0.1:{validation_port}",
        "CDME_ADJOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "CDME_LINEAGE_URL": f"http://127.0.0.1:{free_port()}",
        "CDME_HTTP_RETRIES": "0",
        "CDME_PLANNER_PEER_WAIT_S": "0",
    }
    validation = ServiceProcess("validation", env, home, port=validation_port)
    planner = ServiceProcess("planner", env, home, port=planner_port)
    validation.start()
    planner.start()
    try:
        yield Stack(url, home, validation, planner)
    finally:
        planner.stop()
        validation.stop()


def _wait(api: httpx.Client, run_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = api.get(f"/runs/{run_id}").json()
        if run["status"] in {"COMPLETE", "FAILED", "CANCELLED"}:
            return run
        time.sleep(0.3)
    pytest.fail(f"run {run_id} did not end within {timeout}s")


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in response.text
    body: dict[str, Any] = response.json()
    return body


def test_runs_need_a_token_and_bad_requests_are_problems(stack: Stack) -> None:
    with stack.planner.client() as anonymous:
        _problem(anonymous.get("/runs"), 401)
        _problem(anonymous.post("/runs", json={"epoch": "2026-11-20"}), 401)
        assert anonymous.get("/livez").status_code == 200
        # Adjoint and lineage are down: the planner is alive but not ready.
        not_ready = _problem(anonymous.get("/readyz"), 502)
        assert "adjoint not ready" in not_ready["detail"] and "lineage not ready" in not_ready["detail"]
    with stack.api() as api:
        assert "epoch" in _problem(api.post("/runs", json={"epoch": "20-11-2026"}), 422)["detail"]
        extra = _problem(api.post("/runs", json={"epoch": "2026-11-20", "x": 1}), 422)
        assert extra["errors"][0]["location"] == "body.x"
        assert (
            "not 'other'"
            in _problem(api.post("/runs", json={"epoch": "2026-11-20", "project": "other"}), 422)["detail"]
        )
        assert (
            "unknown dbt runtime"
            in _problem(api.post("/runs", json={"epoch": "2026-11-20", "runtime": "spark"}), 422)["detail"]
        )
        _problem(api.get("/runs/01a20000-0000-7000-8000-000000000000"), 404)
        _problem(api.get("/runs/not-a-uuid"), 422)
        _problem(api.post("/runs/01a20000-0000-7000-8000-000000000000/resume"), 404)


def test_a_run_over_http_fails_at_capture_with_one_line_and_streams_its_log(stack: Stack) -> None:
    with stack.api() as api:
        created = api.post("/runs", json={"epoch": EPOCH.isoformat()})
        assert created.status_code == 202, created.text
        run_id = created.json()["id"]
        assert created.headers["location"] == f"/runs/{run_id}"

        conflict = _problem(api.post("/runs", json={"epoch": EPOCH.isoformat()}), 409)
        assert run_id in conflict["detail"]

        with api.stream("GET", f"/runs/{run_id}/logs") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = list(stream.iter_lines())
        run = _wait(api, run_id)

        assert run["status"] == "FAILED" and run["failed_step"] == "capture"
        assert run["reason"].startswith("capture: POST http://127.0.0.1:") and "\n" not in run["reason"]
        steps = {s["step"]: s for s in run["steps"]}
        assert steps["dbt"]["status"] == "succeeded" and steps["dbt"]["duration_seconds"] > 0
        assert run["links"]["validation_report"].endswith(
            f"/reports/{steps['validate']['output']['report_id']}"
        )
        with stack.validation.client(TOKEN) as validation:
            assert validation.get(run["links"]["validation_report"]).json()["status"] == "passed"
        events = [line for line in lines if line.startswith("event: ")]
        assert events.count("event: dbt") > 10 and events[-1] == "event: end"
        assert any('"MainReportVersion"' in line for line in lines)

        page = api.get("/runs", params={"status": "FAILED", "limit": 1}).json()
        assert page["total"] >= 1 and len(page["runs"]) == 1 and page["limit"] == 1
        assert api.get("/runs", params={"status": "COMPLETE"}).json()["total"] == 0
        _problem(api.post(f"/runs/{run_id}/cancel"), 409)


def test_a_planner_killed_during_dbt_resumes_the_run_when_it_starts_again(stack: Stack) -> None:
    epoch = "2026-11-23"
    with stack.api() as api:
        run_id = api.post("/runs", json={"epoch": epoch}).json()["id"]
        deadline = time.monotonic() + 120
        while api.get(f"/runs/{run_id}").json()["steps"][2]["status"] != "running":
            assert time.monotonic() < deadline, "dbt never started"
            time.sleep(0.1)
    stack.planner.kill()
    stored = stack.rows("select status from cdme_planner.runs where id = %s", run_id)
    assert stored == [("RUNNING",)]

    stack.planner.start()
    with stack.api() as api:
        run = _wait(api, run_id)
    steps = {s["step"]: s for s in run["steps"]}
    assert steps["validate"]["attempt"] == 1, "a step that succeeded is not repeated"
    assert steps["dbt"]["attempt"] == 2 and steps["dbt"]["status"] == "succeeded"
    assert run["failed_step"] == "capture"
    assert stack.rows("select count(*) from cdme_planner.steps where run_id = %s", run_id) == [(5,)]
    assert stack.rows(
        "select count(*) from cdme_planner.runs where epoch = %s", date.fromisoformat(epoch)
    ) == [(1,)]


def test_cdme_run_follows_a_run_over_http_and_exits_by_its_status(
    stack: Stack, cli: Callable[..., Any]
) -> None:
    env = {
        "CDME_PLANNER_URL": stack.planner.base_url,
        "CDME_SERVICE_TOKEN": TOKEN,
        "CDME_LOG_LEVEL": "WARNING",
    }
    done = cli("run", "--epoch", "2026-11-25", "--dry-run", "--summary", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("run ") and lines[0].endswith("epoch 2026-11-25 (dry run)")
    assert any(line.split()[:2] == ["validate", "succeeded"] for line in lines)
    assert any(line.endswith(" COMPLETE") for line in lines)
    assert "validation: passed" in done.stdout and done.stderr == ""

    refused = cli("run", "--epoch", "2026-11-25", "--runtime", "spark", env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "cdme: error: the planner refused the run: unknown dbt runtime 'spark'; installed: cloud, inprocess, local"
    ]

    listed = cli("runs", "--limit", "1", env=env)
    assert listed.returncode == 0 and "COMPLETE" in listed.stdout.splitlines()[0]
