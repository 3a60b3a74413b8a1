"""The validation app's error translation, in process and without its lifespan (so without a database)."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI  # noqa: TID251 - these tests are about the app, so they use its framework
from fastapi.testclient import TestClient  # noqa: TID251 - in process, without the lifespan

from services.core.errors import LdmError, WarehouseError
from services.core.settings import CdmeSettings
from services.validation.app import create_app


@pytest.fixture
def app() -> FastAPI:
    # Port 1 refuses connections: nothing here may connect, and without the lifespan nothing does.
    settings = CdmeSettings(warehouse_url="postgresql://nobody@127.0.0.1:1/none", auth_tokens="t=ci:ops")
    app = create_app(settings)

    async def crash() -> None:
        msg = "secret internal state"
        raise RuntimeError(msg)

    async def bad_declaration() -> None:
        msg = "cdme.yml: grains: Input should be a valid list"
        raise LdmError(msg)

    async def warehouse_down() -> None:
        msg = "cannot reach the warehouse at postgresql://nobody@127.0.0.1:1/none: connection refused"
        raise WarehouseError(msg)

    app.add_api_route("/crash", crash)
    app.add_api_route("/declaration", bad_declaration)
    app.add_api_route("/warehouse", warehouse_down)
    return app


def test_an_unexpected_error_is_a_500_problem_without_traceback_and_is_logged(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="cdme.validation"):
        response = TestClient(app).get("/crash", headers={"X-Request-ID": "req-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "req-1"
    assert response.json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "unexpected error; the service log has it under request id req-1",
        "instance": "/crash",
        "request_id": "req-1",
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    [record] = [r for r in caplog.records if r.name == "cdme.validation"]
    assert record.exc_info is not None and "secret internal state" in str(record.exc_info[1])


@pytest.mark.parametrize(
    ("path", "status", "title", "problem_type"),
    [
        ("/declaration", 422, "Invalid CDME declaration", "urn:cdme:problem:ldm-error"),
        ("/warehouse", 503, "Warehouse unavailable", "urn:cdme:problem:warehouse-error"),
    ],
)
def test_cdme_errors_become_problems_with_their_status(
    app: FastAPI, path: str, status: int, title: str, problem_type: str
) -> None:
    response = TestClient(app).get(path)
    assert response.status_code == status
    body = response.json()
    assert (body["type"], body["title"], body["status"], body["instance"]) == (
        problem_type,
        title,
        status,
        path,
    )
    assert body["request_id"] == response.headers["x-request-id"]


def test_unknown_routes_and_methods_are_problems(app: FastAPI) -> None:
    client = TestClient(app)
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["title"] == "Not Found"
    wrong_method = client.delete("/livez")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == "application/problem+json"
    assert wrong_method.headers["allow"] == "GET"


def test_the_openapi_document_describes_routes_from_their_docstrings(app: FastAPI) -> None:
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    assert "nothing is stored" in paths["/validate/mapping"]["post"]["description"]
    assert "or `project_dir` (with `vars`)" in paths["/validate"]["post"]["description"]
    assert set(paths["/cost-estimate/{model}"]["get"]["responses"]) >= {"200", "401", "404", "422", "503"}
    assert set(paths["/reports/{report_id}"]["get"]["responses"]) >= {"200", "401", "404", "422"}
