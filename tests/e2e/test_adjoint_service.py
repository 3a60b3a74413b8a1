"""The adjoint service over real HTTP: uvicorn in a subprocess on a dbt-built reference project, httpx, and the CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

from services.lineage.domain.partitions import parse_partitions
from tests.conftest import PROJECT_DIR, CliResult
from tests.e2e.test_validation_service import PROBLEM_KEYS
from tests.integration.test_adjoint_reference import build_project
from tests.service_process import AUTH, TOKEN
from tests.service_process import ServiceProcess as Service

pytestmark = pytest.mark.integration

ANALYST = "analyst-token"


@pytest.fixture(scope="module")
def built(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    url = new_database()
    manifest, results, _ = build_project(url, PROJECT_DIR, tmp_path_factory.mktemp("adjoint-e2e-build"))
    return url, manifest, results


@pytest.fixture(scope="module")
def service(
    built: tuple[str, dict[str, Any], dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    running = Service(
        built[0],
        tmp_path_factory.mktemp("adjoint-service"),
        app="services.adjoint.app:app",
        tokens=f"{TOKEN}=tester:data_engineer,auditor;{ANALYST}=analyst:risk_analyst",
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def api(service: Service) -> Iterator[httpx.Client]:
    with service.client(AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def run_id(service: Service, built: tuple[str, dict[str, Any], dict[str, Any]]) -> str:
    run = str(uuid.uuid4())
    body = {"epoch": "2026-11-20", "lineage_mode": "full", "manifest": built[1], "run_results": built[2]}
    with service.client(AUTH) as client:
        first = client.post(f"/runs/{run}/capture", json=body)
        assert first.status_code == 200, first.text
        again = client.post(f"/runs/{run}/capture", json=body)
    assert again.status_code == 200
    assert again.json()["pairs"] == first.json()["pairs"] > 0
    assert first.json()["not_captured"] == [] and first.json()["lineage_mode"] == "full"
    return run


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body.keys() >= PROBLEM_KEYS
    return body


def _month_key(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "select month_start, book, currency_code from marts.fct_monthly_positions limit 1"
        ).fetchone()
    assert row is not None
    return f"{row[0]}|{row[1]}|{row[2]}"


def test_partitions_follow_the_contract(api: httpx.Client, run_id: str) -> None:
    body = api.get(f"/runs/{run_id}/partitions").json()
    assert set(body) == {
        "run_id",
        "epoch",
        "lineage_mode",
        "key_encoding",
        "morphisms",
        "sources",
        "not_captured",
    }
    enriched = next(m for m in body["morphisms"] if m["model"] == "int_trades_enriched")
    assert enriched["relation"].endswith(".intermediate.int_trades_enriched")
    for field in (
        "unique_id",
        "kind",
        "upstream",
        "upstream_unique_id",
        "upstream_relation",
        "source_key_fields",
        "target_key_fields",
        "input",
        "mapped",
        "filtered",
        "errored",
        "output",
        "overlap",
        "unaccounted",
        "locations",
        "filters",
        "req",
    ):
        assert field in enriched
    assert enriched["kind"] == "enrich" and enriched["upstream"] == "int_trades_active"
    assert set(enriched["locations"]) == {"mapped", "filtered", "errored"}
    assert "REQ-ERR-01" in enriched["req"]
    trades = next(s for s in body["sources"] if s["source"] == "raw_trading.trades")
    assert sum(trades["fates"].values()) == trades["input"] and trades["fates"]["unaccounted"] == 0
    # The lineage service's own parser of this contract accepts it as it is.
    parsed = parse_partitions(body)
    assert parsed.run_id == run_id and len(parsed.morphisms) == len(body["morphisms"])
    missing = _problem(api.get(f"/runs/{uuid.uuid4()}/partitions"), 404)
    assert "has not been captured" in missing["detail"]


def test_backward_pages_with_a_cursor_and_access_control_hides_models(
    service: Service, api: httpx.Client, built: tuple[str, dict[str, Any], dict[str, Any]], run_id: str
) -> None:
    key = quote(_month_key(built[0]), safe="")
    whole = api.get(f"/backward/fct_monthly_positions/{key}", params={"to": "raw_trading.trades"}).json()
    assert whole["next"] is None and whole["contributions"]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"to": "raw_trading.trades", "limit": 5}
        if cursor:
            params["cursor"] = cursor
        page = api.get(f"/backward/fct_monthly_positions/{key}", params=params).json()
        seen += [c["key"] for c in page["contributions"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [c["key"] for c in whole["contributions"]]
    with service.client({"Authorization": f"Bearer {ANALYST}"}) as analyst:
        visible = analyst.get(f"/backward/fct_monthly_positions/{key}").json()
        assert {c["entity"] for c in visible["contributions"]} == {
            "fct_daily_positions",
            "int_trades_enriched",
        }
        _problem(
            analyst.get(f"/backward/fct_monthly_positions/{key}", params={"to": "raw_trading.trades"}), 404
        )
        # Partitions and reconciliation hide the same morphisms and sources: the analyst's view of the run.
        everything = api.get(f"/runs/{run_id}/partitions").json()
        seen_by_analyst = analyst.get(f"/runs/{run_id}/partitions").json()
        assert {m["model"] for m in seen_by_analyst["morphisms"]} == {
            "stg_risk_factors",
            "int_trade_risk_sensitivities",
            "fct_daily_positions",
            "fct_daily_risk_sensitivities",
            "fct_monthly_positions",
        }
        assert [s["source"] for s in seen_by_analyst["sources"]] == ["raw_risk.risk_factors"]
        assert seen_by_analyst["morphisms"] == [
            m
            for m in everything["morphisms"]
            if m["model"] in {x["model"] for x in seen_by_analyst["morphisms"]}
        ]
        reconciled = analyst.post(f"/runs/{run_id}/reconcile").json()
        assert [m["model"] for m in reconciled["morphisms"]] == [
            m["model"] for m in seen_by_analyst["morphisms"]
        ]
    _problem(api.get(f"/backward/fct_monthly_positions/{key}", params={"cursor": "garbage"}), 422)
    _problem(api.get(f"/backward/fct_monthly_positions/{key}", params={"depth": 0}), 422)
    _problem(api.get("/backward/no_such_model/x"), 404)
    # A key is data: quotes and SQL in it find nothing and break nothing.
    _problem(
        api.get(f"/backward/fct_monthly_positions/{quote(chr(39) + '; drop table x; --', safe='')}"), 404
    )


def test_impact_and_reconcile(
    api: httpx.Client, run_id: str, built: tuple[str, dict[str, Any], dict[str, Any]]
) -> None:
    with psycopg.connect(built[0]) as conn:
        trade = conn.execute("select trade_id from intermediate.int_trades_enriched limit 1").fetchone()
    assert trade is not None
    body = api.post(
        "/impact", json={"entity": "raw_trading.trades", "keys": [trade[0]], "run_id": run_id}
    ).json()
    assert {"fct_daily_positions", "fct_monthly_positions", "fct_daily_risk_sensitivities"} <= {
        a["model"] for a in body["affected"]
    }
    _problem(api.post("/impact", json={"entity": "raw_trading.trades", "keys": []}), 422)
    # keys_per_path lists fewer keys, never fewer records: the counts stay exact.
    with psycopg.connect(built[0]) as conn:
        several = conn.execute(
            "select trade_id from intermediate.int_trade_risk_sensitivities group by 1 having count(*) > 2 limit 1"
        ).fetchone()
    assert several is not None
    request = {"entity": "raw_trading.trades", "keys": [several[0]], "run_id": run_id}
    every = api.post("/impact", json=request).json()["affected"]
    two = api.post("/impact", json={**request, "keys_per_path": 2}).json()["affected"]
    assert [(a["path"], a["count"], a["keys"][:2]) for a in every] == [
        (a["path"], a["count"], a["keys"]) for a in two
    ]
    assert max(a["count"] for a in two) > 2
    result = api.post(f"/runs/{run_id}/reconcile").json()
    assert result["status"] == "reconciled"
    assert {m["model"]: m["status"] for m in result["morphisms"]}["stg_trades"] == "exact"
    _problem(api.post("/runs/not-a-run/reconcile"), 422)


def test_every_route_needs_a_token(service: Service, run_id: str) -> None:
    with service.client() as anonymous:
        _problem(anonymous.get(f"/runs/{run_id}/partitions"), 401)
        _problem(anonymous.post("/impact", json={"entity": "x", "keys": ["y"]}), 401)
        assert anonymous.get("/livez").status_code == 200


def test_bad_capture_requests_are_problems(
    api: httpx.Client, built: tuple[str, dict[str, Any], dict[str, Any]]
) -> None:
    run = str(uuid.uuid4())
    body = {"epoch": "2026-11-20", "manifest": {"metadata": {}}, "run_results": built[2]}
    _problem(api.post(f"/runs/{run}/capture", json=body), 422)
    _problem(api.post(f"/runs/{run}/capture", json={**body, "epoch": "20-11-2026"}), 422)
    _problem(api.get(f"/runs/{run}/partitions"), 404)


def test_cli_wraps_the_routes(
    cli: Callable[..., CliResult],
    service: Service,
    built: tuple[str, dict[str, Any], dict[str, Any]],
    run_id: str,
    tmp_path: Path,
) -> None:
    env = {"CDME_ADJOINT_URL": service.base_url, "CDME_SERVICE_TOKEN": TOKEN}
    key = _month_key(built[0])
    backward = cli(
        "backward", "fct_monthly_positions", key, "--to", "raw_trading.trades", "--format", "json", env=env
    )
    assert backward.returncode == 0, backward.stderr
    assert json.loads(backward.stdout)["contributions"]
    reconcile = cli("reconcile", run_id, env=env)
    assert reconcile.returncode == 0 and "reconciled" in reconcile.stdout
    missing = cli("backward", "no_such_model", "x", env=env)
    assert missing.returncode != 0 and "404" in missing.stderr and "Traceback" not in missing.stderr
    impact = cli("impact", "raw_trading.trades", "no-such-trade", "--format", "json", env=env)
    assert impact.returncode == 0 and json.loads(impact.stdout)["affected"] == []
