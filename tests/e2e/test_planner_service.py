"""The planner service over real HTTP while its peers are down: auth, problem documents, readiness.

The validation and planner services run as uvicorn processes on one fresh database; nothing listens where the
adjoint and lineage services should be. Runs through all four services are in `test_pipeline_e2e.py`, the
state machine with absent peers in `tests/integration/test_planner_runs.py`.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.core.net import free_port
from tests.conftest import PROJECT_DIR
from tests.service_process import ServiceProcess

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
        return self.planner.client(AUTH)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def stack(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = new_database()
    home = tmp_path_factory.mktemp("planner-service")
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
        "CDME_PLANNER_LINT": "true",
    }
    validation = ServiceProcess(
        url, home, service="validation", env=env, port=validation_port, log_name="validation.log"
    )
    planner = ServiceProcess(url, home, service="planner", env=env, port=planner_port, log_name="planner.log")
    validation.start()
    planner.start()
    try:
        yield Stack(url, home, validation, planner)
    finally:
        planner.stop()
        validation.stop()


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
        not_ready = _problem(anonymous.get("/readyz"), 503)
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


def test_sql_lint_findings_show_in_the_run_and_its_log_stream_without_failing_it(stack: Stack) -> None:
    with stack.api() as api:
        created = api.post("/runs", json={"epoch": EPOCH.isoformat(), "dry_run": True})
        assert created.status_code == 202, created.text
        run_id = created.json()["id"]
        deadline = time.monotonic() + 300
        while (run := api.get(f"/runs/{run_id}").json())["status"] not in {"COMPLETE", "FAILED", "CANCELLED"}:
            assert time.monotonic() < deadline, run
            time.sleep(0.5)
        assert run["status"] == "COMPLETE", run
        validate = next(s for s in run["steps"] if s["step"] == "validate")
        lint = validate["output"]["lint"]
        # The reference project's compiled models (generic tests left out), linted by the pinned sqlfluff.
        assert lint["available"] is True and lint["reason"] is None
        assert lint["files"] == len(list((PROJECT_DIR / "models").rglob("*.sql")))
        assert lint["total"] >= len(lint["findings"]) > 0
        assert all(set(f) == {"file", "line", "position", "code", "description"} for f in lint["findings"])
        assert all(f["file"].endswith(".sql") and f["line"] >= 1 for f in lint["findings"])

        with api.stream("GET", f"/runs/{run_id}/logs", params={"follow": "false"}) as stream:
            events = list(stream.iter_lines())
        linted = [
            json.loads(line.removeprefix("data: "))
            for prev, line in itertools.pairwise(events)
            if prev == "event: lint"
        ]
        assert len(linted) == lint["total"]
        assert linted[: len(lint["findings"])] == lint["findings"]
