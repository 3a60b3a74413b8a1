"""The lineage service over real HTTP: uvicorn in a subprocess on a fresh database, finalize and the queries."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.core.net import free_port as _free_port
from tests.conftest import RESEARCH_DATA
from tests.e2e.test_validation_service import _assert_problem
from tests.service_process import AUTH
from tests.service_process import ServiceProcess as Service

pytestmark = pytest.mark.integration


class AppService(Service):
    """`uvicorn <app>` with extra environment and the service role, ready once `/readyz` answers."""

    def __init__(self, database_url: str, home: Path, app: str, env: dict[str, str] | None = None) -> None:
        super().__init__(database_url, home, app, "test-token=tester:data_engineer,service", env=env)

    def start(self, timeout: float = 60, path: str = "/readyz") -> None:
        super().start(timeout, path)


def lineage_service(database_url: str, home: Path, adjoint_url: str, validation_url: str) -> AppService:
    """The lineage service with its runs directory under `home` and the file transport (the default)."""
    return AppService(
        database_url,
        home,
        "services.lineage.app:app",
        {
            "CDME_RUNS_DIR": str(home / "runs"),
            "CDME_ADJOINT_URL": adjoint_url,
            "CDME_VALIDATION_URL": validation_url,
            "CDME_SERVICE_TOKEN": "test-token",
            "CDME_HTTP_RETRIES": "0",
        },
    )


@pytest.fixture(scope="module")
def validation(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    running = Service(new_database(), tmp_path_factory.mktemp("validation-service"))
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def service(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory, validation: Service
) -> Iterator[AppService]:
    # Nothing listens on the adjoint's port: a run whose dbt failed is recorded without the adjoint.
    running = lineage_service(
        new_database(),
        tmp_path_factory.mktemp("lineage-service"),
        f"http://127.0.0.1:{_free_port()}",
        validation.base_url,
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _run_dir(service: AppService) -> tuple[str, Path]:
    run_id = str(uuid.uuid4())
    directory = service.home / "runs" / run_id
    directory.mkdir(parents=True)
    manifest = gzip.decompress(
        (RESEARCH_DATA / "jaffle-shop-v12-postgres-compiled-manifest.json.gz").read_bytes()
    )
    (directory / "manifest.json").write_bytes(manifest)
    return run_id, directory


def _body(directory: Path, **extra: Any) -> dict[str, Any]:
    return {
        "epoch": "2026-11-20",
        "artifact_dir": str(directory),
        "dbt": {"status": "error", "error": "Database Error in model orders: relation does not exist"},
        "validation_report_id": None,
        "trace": [
            {
                "step": "dbt build",
                "status": "failed",
                "started_at": "2026-11-22T06:00:00Z",
                "ended_at": "2026-11-22T06:00:03Z",
            }
        ],
        "project": "jaffle_shop",
        "target": "dev",
        **extra,
    }


def test_a_failed_dbt_run_is_finalized_failed_with_its_fail_event_and_queryable(
    service: AppService,
) -> None:
    run_id, directory = _run_dir(service)
    with service.client(AUTH) as api:
        response = api.post(f"/runs/{run_id}/finalize", json=_body(directory))
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["status"] == "FAILED" and result["ledger"] is None and result["events"] == 2
        assert "relation does not exist" in result["reason"]
        assert api.post(f"/runs/{run_id}/finalize", json=_body(directory)).json() == result  # idempotent
        events = api.get(f"/runs/{run_id}/events").json()["events"]
        assert [e["event"]["eventType"] for e in events] == ["START", "FAIL"]
        first = api.get(f"/runs/{run_id}/events", params={"limit": 1}).json()
        assert [e["event"]["eventType"] for e in first["events"]] == ["START"] and first["next_offset"] == 1
        last = api.get(f"/runs/{run_id}/events", params={"limit": 1, "offset": 1}).json()
        assert [e["event"]["eventType"] for e in last["events"]] == ["FAIL"] and last["next_offset"] is None
        page = api.get("/runs", params={"status": "FAILED", "limit": 1}).json()
        assert page["runs"][0]["run_id"] == run_id and page["limit"] == 1
        proof = api.get(f"/runs/{run_id}/proof").json()
        assert (
            proof["versions"]["manifest_checksum"].startswith("sha256:")
            and proof["trace"][0]["step"] == "dbt build"
        )
        graph = api.get(f"/runs/{run_id}/lineage").json()
        assert graph["columns"] and graph["namespace"].startswith("postgres://")
        orders = next(n["dataset"] for n in graph["nodes"] if n["dataset"].endswith(".orders"))
        upstream = api.get("/lineage/columns", params={"dataset": orders, "column": "order_total"}).json()[
            "upstream"
        ]
        assert any(u["dataset"].endswith(".raw_orders") for u in upstream)
        _assert_problem(api.get(f"/runs/{run_id}/ledger"), 404)
    deadline = time.monotonic() + 10
    events_file = service.home / "openlineage" / "events.jsonl"
    while not events_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [json.loads(line)["eventType"] for line in events_file.read_text().splitlines()] == [
        "START",
        "FAIL",
    ]


def test_bad_requests_get_problems(service: AppService) -> None:
    run_id, directory = _run_dir(service)
    assert httpx.post(f"{service.base_url}/runs/{run_id}/finalize", json=_body(directory)).status_code == 401
    with service.client(AUTH) as api:
        _assert_problem(api.post("/runs/not-a-uuid/finalize", json=_body(directory)), 422)
        _assert_problem(api.post(f"/runs/{run_id}/finalize", json=_body(Path("/etc"))), 422)
        _assert_problem(api.post(f"/runs/{run_id}/finalize", json={"artifact_dir": "x"}), 422)
        _assert_problem(api.get(f"/runs/{uuid.uuid4()}/events"), 404)
        _assert_problem(api.get("/runs", params={"status": "DONE"}), 422)
        _assert_problem(api.get("/runs", params={"offset": 2**63}), 422)
        # dbt succeeded but the adjoint is unreachable: the run stays unfinalized (the planner retries).
        ok = _body(directory, dbt={"status": "success"})
        _assert_problem(api.post(f"/runs/{run_id}/finalize", json=ok), 502)
        assert api.get(f"/runs/{run_id}/events").status_code == 404


def test_the_proof_bundle_carries_the_validation_report(service: AppService, validation: Service) -> None:
    run_id, directory = _run_dir(service)
    manifest = json.loads((directory / "manifest.json").read_text())
    with validation.client(AUTH) as client:
        created = client.post("/validate", json={"manifest": manifest})
        assert created.status_code == 201, created.text
        report_id = created.json()["id"]
    with service.client(AUTH) as api:
        body = _body(directory, validation_report_id=report_id)
        assert api.post(f"/runs/{run_id}/finalize", json=body).status_code == 200
        proof = api.get(f"/runs/{run_id}/proof").json()
        assert proof["validation_report"]["id"] == report_id
        assert proof["lineage"]["nodes"] and proof["status"] == "FAILED"
        assert "cdme_lineage_requests" in httpx.get(f"{service.base_url}/metrics").text
