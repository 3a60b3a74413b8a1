"""The validation service over real HTTP: uvicorn in a subprocess, a fresh PostgreSQL database, httpx."""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PROJECT_DIR, RESEARCH_DATA
from tests.service_process import AUTH, TOKEN
from tests.service_process import ServiceProcess as Service

pytestmark = pytest.mark.integration

PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}


@pytest.fixture(scope="module")
def service(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = Service(new_database(), tmp_path_factory.mktemp("validation-service"))
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
def jaffle() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        gzip.decompress((RESEARCH_DATA / "jaffle-shop-v12-postgres-compiled-manifest.json.gz").read_bytes())
    )
    return data


def _rows(service: Service, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(service.database_url) as conn:
        return conn.execute(query, params).fetchall()


def _report_count(service: Service) -> int:
    return int(_rows(service, "select count(*) from cdme_validation.reports")[0][0])


def _assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in response.text and 'File "' not in response.text
    body: dict[str, Any] = response.json()
    assert set(body) >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# -- authentication and the operational surface --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/validate"),
        ("POST", "/validate/mapping"),
        ("GET", f"/reports/{uuid.uuid4()}"),
        ("POST", "/dry-run"),
    ],
)
@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing bearer token: send 'Authorization: Bearer <token>'"),
        ({"Authorization": "Bearer not-the-token"}, "unknown bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token: send 'Authorization: Bearer <token>'"),
    ],
)
def test_every_endpoint_but_health_needs_a_known_bearer_token(
    service: Service, method: str, path: str, headers: dict[str, str], detail: str
) -> None:
    with service.client(headers) as client:
        response = client.request(method, path, json={"manifest": {}})
    body = _assert_problem(response, 401)
    assert body["detail"] == detail
    assert body["title"] == "Unauthenticated"
    assert body["instance"] == path.split("?")[0]
    assert response.headers["www-authenticate"] == "Bearer"


def test_health_probes_and_metrics_need_no_token_and_metrics_count_requests(
    service: Service, api: httpx.Client
) -> None:
    with service.client() as anonymous:
        assert anonymous.get("/livez").json() == {"status": "alive"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        assert anonymous.get("/openapi.json").json()["info"]["title"] == "CDME validation"
        api.get(f"/reports/{uuid.uuid4()}")
        # Scrapers carry no token: metrics hold counts by route template, never keys, ids or tokens.
        metrics = anonymous.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'cdme_validation_requests_total{method="GET",route="/readyz",status="200"}' in text
    # Route templates, not paths, so the label set stays bounded.
    assert 'cdme_validation_requests_total{method="GET",route="/reports/{report_id}",status="404"}' in text
    assert 'cdme_validation_request_seconds_count{method="GET",route="/livez"}' in text


def test_request_ids_are_echoed_or_generated(api: httpx.Client) -> None:
    assert api.get("/livez", headers={"X-Request-ID": "ci-run-42"}).headers["x-request-id"] == "ci-run-42"
    generated = api.get("/livez").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    # An id that could forge log lines or headers is replaced, not echoed.
    assert api.get("/livez", headers={"X-Request-ID": "a b"}).headers["x-request-id"] != "a b"


# -- POST /validate and GET /reports/{id} ---------------------------------------------------------------------


def test_a_real_project_passes_and_its_report_is_stored(
    service: Service, api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    response = api.post("/validate", json={"manifest": jaffle})
    assert response.status_code == 201, response.text
    report = response.json()
    assert set(report) == {"id", "status", "summary", "findings", "coverage", "plan", "costs"}
    assert len(report["plan"]["steps"]) == 13
    assert report["status"] == "passed"
    assert report["summary"]["errors"] == 0
    assert report["coverage"]["models"] == 13
    assert 0 < report["coverage"]["column_share"] <= 1
    assert response.headers["location"] == f"/reports/{report['id']}"

    fetched = api.get(f"/reports/{report['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == report

    rows = _rows(
        service,
        "select principal, project, status, errors, warnings, manifest_checksum, report"
        " from cdme_validation.reports where id = %s",
        uuid.UUID(report["id"]),
    )
    assert len(rows) == 1
    principal, project, status, errors, warnings, checksum, stored = rows[0]
    assert (principal, project, status, errors) == ("tester", "jaffle_shop", "passed", 0)
    assert warnings == report["summary"]["warnings"]
    assert checksum.startswith("sha256:") and len(checksum) == len("sha256:") + 64
    assert stored["findings"] == report["findings"]


def test_a_hallucinated_column_rejects_the_project(
    service: Service, api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    manifest = copy.deepcopy(jaffle)
    orders = manifest["nodes"]["model.jaffle_shop.orders"]
    assert "order_items_summary.count_food_items > 0" in orders["compiled_code"]
    orders["compiled_code"] = orders["compiled_code"].replace(
        "order_items_summary.count_food_items > 0", "order_items_summary.count_food_itms > 0", 1
    )

    report = api.post("/validate", json={"manifest": manifest}).json()

    assert report["status"] == "rejected"
    assert report["summary"]["errors"] == 1
    [finding] = [f for f in report["findings"] if f["severity"] == "error"]
    assert finding["rule"] == "existence.column" and finding["code"] == "CDME-V002"
    assert finding["model"] == "orders" and finding["verdict"] == "VIOLATION"
    assert finding["message"] == (
        "column `count_food_itms` does not exist in `order_items_summary`; did you mean `count_food_items`?"
    )
    status = _rows(
        service, "select status from cdme_validation.reports where id = %s", uuid.UUID(report["id"])
    )
    assert status == [("rejected",)]


def _unsupported_version(jaffle: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(jaffle)
    manifest["metadata"]["dbt_schema_version"] = "https://schemas.getdbt.com/dbt/manifest/v5.json"
    return {"manifest": manifest}


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (
            _unsupported_version,
            "body.manifest: manifest schema v5 is not supported; supported: manifest v7-v12",
        ),
        (lambda _: {"manifest": 42}, "body.manifest: Input should be a valid dictionary"),
        (
            lambda j: {"manifest": j, "config": {"grains": "Atomic"}},
            "body.config: grains: Input should be a valid list",
        ),
    ],
    ids=["manifest-v5", "manifest-not-an-object", "bad-cdme-yml"],
)
def test_malformed_input_is_a_precise_422_problem(
    service: Service,
    api: httpx.Client,
    jaffle: dict[str, Any],
    body: Callable[[dict[str, Any]], dict[str, Any]],
    detail: str,
) -> None:
    before = _report_count(service)
    problem = _assert_problem(api.post("/validate", json=body(jaffle)), 422)
    assert problem["detail"] == detail
    assert problem["instance"] == "/validate"
    assert _report_count(service) == before


def test_a_body_that_is_not_json_is_a_422_problem(api: httpx.Client) -> None:
    response = api.post("/validate", content=b'{"manifest": ', headers={"Content-Type": "application/json"})
    problem = _assert_problem(response, 422)
    assert problem["detail"].startswith("body: malformed JSON at character 13: ")


def test_unknown_and_malformed_report_ids(api: httpx.Client) -> None:
    missing = uuid.uuid4()
    problem = _assert_problem(api.get(f"/reports/{missing}"), 404)
    assert problem["detail"] == f"no validation report has id {missing}"
    assert problem["title"] == "Not Found"

    problem = _assert_problem(api.get("/reports/not-a-uuid"), 422)
    assert problem["detail"].startswith("path.report_id: Input should be a valid UUID")


def test_an_oversized_body_is_refused_with_413(service: Service, api: httpx.Client) -> None:
    before = _report_count(service)
    oversized = b'{"manifest": {"x": "' + b"x" * (50 * 1024 * 1024) + b'"}}'
    declared = api.post("/validate", content=oversized, headers={"Content-Type": "application/json"})
    assert _assert_problem(declared, 413)["detail"] == "the request body exceeds the limit of 50 MiB"

    def chunks() -> Iterator[bytes]:
        # No Content-Length: the service has to count what it reads.
        for start in range(0, len(oversized), 1 << 20):
            yield oversized[start : start + (1 << 20)]

    streamed = api.post("/validate", content=chunks(), headers={"Content-Type": "application/json"})
    assert _assert_problem(streamed, 413)["detail"] == "the request body exceeds the limit of 50 MiB"
    assert _report_count(service) == before


# -- POST /validate/mapping -------------------------------------------------------------------------------------


def test_a_proposed_model_is_checked_against_the_project_and_nothing_is_written(
    service: Service, api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    customers = jaffle["nodes"]["model.jaffle_shop.customers"]["relation_name"]
    before = _report_count(service)

    hallucinated = api.post(
        "/validate/mapping",
        json={
            "manifest": jaffle,
            "name": "top_customers",
            "sql": f"select c.customer_id, c.customer_nme\nfrom {customers} as c\nwhere c.lifetime_spend > 100",
            "yaml": {"description": "Customers who spent over 100.", "columns": [{"name": "customer_id"}]},
        },
    )
    correct = api.post(
        "/validate/mapping",
        json={
            "manifest": jaffle,
            "name": "top_customers",
            "sql": f"select c.customer_id, c.customer_name\nfrom {customers} as c\nwhere c.lifetime_spend > 100",
        },
    )

    assert hallucinated.status_code == 200, hallucinated.text
    result = hallucinated.json()
    assert result["model"] == "model.jaffle_shop.top_customers"
    assert result["status"] == "rejected"
    assert [(f["rule"], f["model"], f["line"]) for f in result["findings"]] == [
        ("existence.column", "top_customers", 1)
    ]
    assert result["findings"][0]["message"] == (
        "column `customer_nme` does not exist in `customers`; did you mean `customer_name`?"
    )
    assert result["coverage"]["models"] == 1
    assert result["coverage"]["unresolved_models"] == ["top_customers"]
    assert result["coverage"]["column_references"] == 3

    assert correct.status_code == 200, correct.text
    assert correct.json()["status"] == "passed"
    assert correct.json()["findings"] == []
    assert correct.json()["coverage"]["column_references_resolved"] == 3

    assert _report_count(service) == before


def test_a_proposal_reading_a_relation_outside_the_project_schemas_is_a_finding(
    api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    result = api.post(
        "/validate/mapping",
        json={"manifest": jaffle, "name": "orders_v2", "sql": 'select * from "research"."analytics"."order"'},
    ).json()
    assert [f["rule"] for f in result["findings"]] == ["existence.relation"]
    assert "did you mean `orders`?" in result["findings"][0]["message"]


def test_a_proposal_with_an_invalid_name_is_a_422_problem(api: httpx.Client, jaffle: dict[str, Any]) -> None:
    response = api.post("/validate/mapping", json={"manifest": jaffle, "name": "1; drop", "sql": "select 1"})
    assert _assert_problem(response, 422)["detail"].startswith("body.name: String should match pattern")


def test_models_the_callers_roles_do_not_allow_do_not_exist_for_it(
    api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    manifest = copy.deepcopy(jaffle)
    stg_orders = manifest["nodes"]["model.jaffle_shop.stg_orders"]
    stg_orders["config"]["meta"] = {"cdme": {"access": ["auditor"]}}  # the test token holds data_engineer
    config = {"grains": [{"name": "Atomic"}], "roles": [{"name": "data_engineer"}, {"name": "auditor"}]}
    unknown = "relation `analytics.stg_orders` is unknown to principal `tester`"

    report = api.post("/validate", json={"manifest": manifest, "config": config}).json()
    proposal = api.post(
        "/validate/mapping",
        json={
            "manifest": manifest,
            "config": config,
            "name": "order_ids",
            "sql": f"select o.order_id from {stg_orders['relation_name']} as o",
        },
    ).json()

    assert report["status"] == "rejected"
    assert {
        (f["rule"], f["model"], f["message"]) for f in report["findings"] if f["severity"] == "error"
    } == {
        ("access", "orders", unknown),
        ("access", "order_items", unknown),
    }
    assert [(f["rule"], f["message"]) for f in proposal["findings"]] == [("access", unknown)]


# -- restarts -------------------------------------------------------------------------------------------------


def test_a_restarted_service_keeps_its_reports(service: Service, jaffle: dict[str, Any]) -> None:
    with service.client(AUTH) as client:
        report = client.post("/validate", json={"manifest": jaffle}).json()
    count = _report_count(service)

    service.stop()
    service.start()

    with service.client(AUTH) as client:
        assert client.get(f"/reports/{report['id']}").json() == report
    assert _report_count(service) == count
    assert _rows(service, "select version_num from cdme_validation.alembic_version") == [("0002",)]


# -- POST /validate/path --------------------------------------------------------------------------------------------


def test_a_symbolic_path_resolves_over_declared_relationships(
    service: Service, api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    before = _report_count(service)
    good = api.post("/validate/path", json={"manifest": jaffle, "path": "orders.customer_id.customer_name"})
    assert good.status_code == 200, good.text
    assert good.json()["valid"] is True
    assert good.json()["attribute"] == "stg_customers.customer_name"
    assert good.json()["steps"] == [
        {
            "from_entity": "orders",
            "via": "customer_id",
            "to_entity": "stg_customers",
            "to_column": "customer_id",
        }
    ]

    broken = api.post("/validate/path", json={"manifest": jaffle, "path": "orders.store_id.name"}).json()
    assert broken["valid"] is False
    [finding] = broken["findings"]
    assert (finding["rule"], finding["code"], finding["model"]) == ("path", "CDME-V100", "orders")
    assert (
        finding["message"]
        == "`orders` has no declared relationship `store_id` (declared: customer_id -> stg_customers)"
    )
    assert _report_count(service) == before, "path validation stores nothing"

    unauthenticated = httpx.post(
        f"{service.base_url}/validate/path", json={"manifest": jaffle, "path": "a.b"}
    )
    assert unauthenticated.status_code == 401
    empty = api.post("/validate/path", json={"manifest": jaffle, "path": ""})
    _assert_problem(empty, 422)


# -- POST /dry-run --------------------------------------------------------------------------------------------------


def test_a_dry_run_estimates_costs_against_budgets_and_stores_nothing(
    service: Service, api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    before = _report_count(service)
    response = api.post("/dry-run", json={"manifest": jaffle, "budget": {"max_join_depth": 1}})
    assert response.status_code == 200, response.text
    result = response.json()
    costs = {c["model"]: c for c in result["costs"]}
    assert len(costs) == 13 and len(result["plan"]["steps"]) == 13
    # This database holds none of jaffle-shop's tables: sizes of models reading them are unknown, while the
    # time spine, generated from literals alone, has a size; join depth always comes from the SQL.
    assert costs["metricflow_time_spine"]["rows"] == 455
    assert all(c["rows"] is None for name, c in costs.items() if name != "metricflow_time_spine")
    over = {f["model"] for f in result["findings"] if f["rule"] == "cost"}
    assert over == {name for name, c in costs.items() if (c["join_depth"] or 0) > 1}
    assert over and result["status"] == "rejected"
    assert _report_count(service) == before, "a dry run stores nothing"

    unknown_budget = api.post("/dry-run", json={"manifest": jaffle, "budget": {"max_rows": 5}})
    _assert_problem(unknown_budget, 422)


# -- GET /cost-estimate/{model} ---------------------------------------------------------------------------------


def test_a_cost_estimate_is_made_from_a_stored_reports_project_against_its_budget(
    api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    manifest = copy.deepcopy(jaffle)
    manifest["nodes"]["model.jaffle_shop.stg_orders"]["config"]["meta"] = {"cdme": {"access": ["auditor"]}}
    config = {
        "grains": [{"name": "Atomic"}],
        "roles": [{"name": "data_engineer"}, {"name": "auditor"}],
        "budgets": {"models": {"metricflow_time_spine": {"max_output_rows": 400}}},
    }
    report_id = api.post("/validate", json={"manifest": manifest, "config": config}).json()["id"]

    spine = api.get("/cost-estimate/metricflow_time_spine", params={"report_id": report_id})
    assert spine.status_code == 200, spine.text
    body = spine.json()
    # The spine is generated from literals: 455 rows whatever the warehouse holds, over cdme.yml's 400.
    assert body["report_id"] == report_id and body["estimate"]["rows"] == 455
    assert body["budget"]["max_output_rows"] == 400 and body["within_budget"] is False
    assert [f["message"] for f in body["findings"]] == [
        "estimated output rows 455 exceed the budget of 400 (x1.1)"
    ]
    relaxed = api.get(
        "/cost-estimate/metricflow_time_spine", params={"report_id": report_id, "max_output_rows": 1000}
    ).json()
    assert relaxed["within_budget"] is True and relaxed["findings"] == []
    # The newest stored report is the default project.
    assert api.get("/cost-estimate/metricflow_time_spine").json()["report_id"] == report_id

    # A model the caller's roles deny reads exactly like one that does not exist.
    hidden = _assert_problem(api.get("/cost-estimate/stg_orders", params={"report_id": report_id}), 404)
    absent = _assert_problem(api.get("/cost-estimate/stg_orderz", params={"report_id": report_id}), 404)
    assert hidden["detail"] == absent["detail"].replace("stg_orderz", "stg_orders")
    missing = _assert_problem(api.get("/cost-estimate/orders", params={"report_id": str(uuid.uuid4())}), 404)
    assert "POST /validate first" in missing["detail"]
    _assert_problem(api.get("/cost-estimate/not a model"), 422)
    _assert_problem(api.get("/cost-estimate/orders", params={"max_output_rows": -1}), 422)


# -- POST /validate with a project directory --------------------------------------------------------------------


def test_a_project_directory_is_compiled_and_validated_with_its_own_cdme_yml(
    service: Service, api: httpx.Client
) -> None:
    response = api.post(
        "/validate", json={"project_dir": str(PROJECT_DIR), "vars": {"epoch_date": "2026-11-20"}}
    )
    assert response.status_code == 201, response.text
    report = response.json()
    assert report["status"] == "passed" and report["summary"]["errors"] == 0
    # cdme.yml was read from the project: the execution plan knows the error sink and the declared filter.
    steps = {s["model"]: s for s in report["plan"]["steps"]}
    assert steps["int_trades_active"]["lossy"] is True and steps["int_trades_active"]["declared"] is True
    stored = _rows(service, "select project from cdme_validation.reports where id = %s", report["id"])
    assert stored == [("cdme_trading",)]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"project_dir": "/etc"}, "body.project_dir: not a project this service may read"),
        (
            {"project_dir": f"{PROJECT_DIR}/../../../../etc"},
            "body.project_dir: not a project this service may read",
        ),
        ({"project_dir": str(PROJECT_DIR / "models")}, "has no dbt_project.yml"),
        ({"manifest": {}, "project_dir": str(PROJECT_DIR)}, "give exactly one of `manifest`"),
        ({}, "give exactly one of `manifest`"),
        ({"manifest": {}, "vars": {"a": 1}}, "`vars` compile a `project_dir`"),
    ],
)
def test_project_directories_outside_the_allowed_roots_or_ambiguous_bodies_are_422(
    api: httpx.Client, body: dict[str, Any], detail: str
) -> None:
    problem = _assert_problem(api.post("/validate", json=body), 422)
    assert detail in problem["detail"]


def test_validate_estimates_costs_when_budgeted_and_keeps_them_with_the_report(
    api: httpx.Client, jaffle: dict[str, Any]
) -> None:
    plain = api.post("/validate", json={"manifest": jaffle}).json()
    assert plain["costs"] == [] and plain["status"] == "passed"
    budgeted = api.post("/validate", json={"manifest": jaffle, "budget": {"max_output_rows": 100}})
    assert budgeted.status_code == 201, budgeted.text
    report = budgeted.json()
    costs = {c["model"]: c["rows"] for c in report["costs"]}
    assert costs["metricflow_time_spine"] == 455
    assert [f["model"] for f in report["findings"] if f["rule"] == "cost"] == ["metricflow_time_spine"]
    assert report["status"] == "rejected"
    assert api.get(f"/reports/{report['id']}").json()["costs"] == report["costs"]
    metrics = api.get("/metrics").text
    assert 'cdme_validation_findings_total{rule="cost",severity="error",verdict="VIOLATION"}' in metrics
    assert 'cdme_validation_reports{status="rejected"}' in metrics


# -- U+0000 -------------------------------------------------------------------------------------------------------


def test_a_nul_character_anywhere_is_a_located_422(service: Service, api: httpx.Client) -> None:
    # PostgreSQL stores U+0000 in neither text nor jsonb: refused up front, with where it is.
    before = _report_count(service)
    manifest = {"metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"}}
    keyed = api.post("/validate", json={"manifest": {**manifest, "nodes": {"model.p.a\x00b": {}}}})
    assert _assert_problem(keyed, 422)["detail"] == (
        "body.manifest.nodes: a key contains a NUL character (\\u0000), which CDME cannot store"
    )
    valued = api.post("/validate", json={"manifest": {**manifest, "nodes": {"n": {"name": ["ok", "a\x00"]}}}})
    assert _assert_problem(valued, 422)["detail"] == (
        "body.manifest.nodes.n.name[1]: contains a NUL character (\\u0000), which CDME cannot store"
    )
    sql = api.post("/validate/mapping", json={"manifest": manifest, "name": "m", "sql": "select '\x00'"})
    assert _assert_problem(sql, 422)["detail"] == (
        "body.sql: contains a NUL character (\\u0000), which CDME cannot store"
    )
    assert _report_count(service) == before


def test_a_project_directory_with_a_malformed_cdme_yml_is_a_422_naming_the_line(
    service: Service, api: httpx.Client
) -> None:
    project = service.home / "broken-project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs"), dirs_exist_ok=True)
    (project / "cdme.yml").write_text("grains: [Atomic\nroles: x\n")
    problem = _assert_problem(api.post("/validate", json={"project_dir": str(project)}), 422)
    assert "cdme.yml: malformed YAML at line" in problem["detail"]
