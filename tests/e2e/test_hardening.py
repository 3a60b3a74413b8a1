"""Hostile-input hardening of every CDME service, over real HTTP against its real process.

Two parts, per service:
- schemathesis generates requests from the service's own OpenAPI document (a valid bearer token on each) and
  checks every response: never a 5xx, the status code, content type, headers and body as documented, a bounded
  number of cases per operation;
- targeted hostile inputs: SQL-injection strings as keys and model names, path traversal, huge bodies, deeply
  nested JSON, bytes that are not UTF-8, hostile headers. Each must end in a 4xx problem document (or a normal
  answer where the input is legitimate data), never a 5xx or a traceback, and leave the service healthy.

A service joins by an entry in `SERVICES`: its name (`services.<name>.app:app`) and any environment it needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.result import Ok

from services.core.webapp import PROBLEM_JSON, Problem
from tests.service_process import AUTH, TOKEN, ServiceProcess

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class ServiceUnderTest:
    """A service to harden: its name, the extra environment its process needs, the request fields naming files."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    location_fields: tuple[str, ...] = ()
    # A 5xx found and reported but not fixed yet: (operation label, what is wrong). The generated test then
    # xfails on exactly that operation, fails on any other, and fails once the operation passes.
    known_5xx: tuple[str, str] | None = None


# Nothing listens at these peer URLs: a planner run submitted by a generated request fails at its first step
# instead of running dbt, and the planner is alive but, as its readiness says, not ready.
DEAD_PEERS = {
    "CDME_SERVICE_TOKEN": TOKEN,
    "CDME_HTTP_RETRIES": "0",
    "CDME_VALIDATION_URL": "http://127.0.0.1:9",
    "CDME_ADJOINT_URL": "http://127.0.0.1:9",
    "CDME_LINEAGE_URL": "http://127.0.0.1:9",
}
# Services whose readiness needs peers that these tests do not run.
NOT_READY = frozenset({"planner"})
SERVICES = [
    ServiceUnderTest("validation", location_fields=("project_dir",)),
    ServiceUnderTest("adjoint"),
    # Nothing listens at its adjoint URL: the hostile requests never get as far as a successful finalize.
    ServiceUnderTest(
        "lineage",
        env={
            "CDME_SERVICE_TOKEN": TOKEN,
            "CDME_HTTP_RETRIES": "0",
            "CDME_ADJOINT_URL": "http://127.0.0.1:9",
            "CDME_VALIDATION_URL": "http://127.0.0.1:9",
        },
        location_fields=("artifact_dir",),
    ),
    ServiceUnderTest("planner", env={**DEAD_PEERS, "CDME_PLANNER_PEER_WAIT_S": "0"}),
]
# Generated cases per operation: enough to reach every branch of the request models, small enough for CI.
MAX_EXAMPLES = 30


# Errors are problem documents (content type, schema, request id) on top of schemathesis's own checks.
@schemathesis.check
def problem_documents(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Any
) -> bool | None:
    """Every error is an RFC 9457 problem document carrying the response's request id."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type") == [PROBLEM_JSON], response.headers.get("content-type")
    body = response.json()
    assert set(body) <= set(Problem.model_fields), body
    Problem.model_validate(body)
    assert body["status"] == response.status_code
    assert body["request_id"] == response.headers["x-request-id"][0]
    assert "Traceback" not in response.text
    return None


CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    problem_documents,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
]
SQL_INJECTIONS = [
    "'; drop table cdme_validation.reports; --",
    '" or 1=1 --',
    "x' union select pg_read_file('/etc/passwd') --",
    "$$; select pg_sleep(10); $$",
    "\\x00\u0000nul",
    "robert'); drop schema public cascade;--",
]
PEPPER = "hardening-pepper-7f3a9c1e5b"
SOME_RUN_ID = "01936f1e-7c4a-7b2e-9a3d-5f6e7d8c9b0a"  # a UUIDv7, unknown to every service
TRAVERSALS = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "/etc/shadow",
    "..\\..\\windows\\win.ini",
]


@pytest.fixture(scope="module", params=SERVICES, ids=lambda s: s.name)
def spec(request: pytest.FixtureRequest) -> ServiceUnderTest:
    under_test: ServiceUnderTest = request.param
    return under_test


@pytest.fixture(scope="module")
def running(
    spec: ServiceUnderTest, new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        new_database(),
        tmp_path_factory.mktemp(f"{spec.name}-hardening"),
        service=spec.name,
        env={"CDME_PEPPER": PEPPER, "CDME_LOG_LEVEL": "DEBUG", **spec.env},
    )
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture
def api(running: ServiceProcess) -> Iterator[httpx.Client]:
    with running.client(AUTH) as client:
        yield client


def _takes_input(operation: Any) -> bool:
    return bool(operation.body or list(operation.iter_parameters()))


def test_generated_requests_get_documented_responses_and_no_5xx(
    spec: ServiceUnderTest, running: ServiceProcess
) -> None:
    # schemathesis's own pytest plugin does not follow a parametrized fixture onto pytest 9, so each operation's
    # strategy is driven by Hypothesis here: valid requests and requests that break the schema, per operation.
    schema = schemathesis.openapi.from_url(f"{running.base_url}/openapi.json")
    failures: list[str] = []
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "an operation of the OpenAPI document cannot be tested"
    if running.service in NOT_READY:
        # Its documented 503 is the right answer here, and _assert_healthy checks it is given.
        operations = [o for o in operations if o.path != "/readyz"]
    assert operations
    for operation in operations:
        # Invalid requests exist only for operations that take something (a body or parameters).
        takes_input = operation.body or list(operation.iter_parameters())
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,)
        )
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: schemathesis.Case[Any]) -> None:
                case.call_and_validate(base_url=running.base_url, headers=AUTH, checks=CHECKS, timeout=60)

            try:
                exercise()
            except (
                Exception,
                BaseExceptionGroup,
            ) as e:  # collected, so one run reports every operation that fails
                failures.append(f"{operation.label} ({mode.value}): {type(e).__name__}: {str(e)[:2000]}")
    if spec.known_5xx is not None:
        label = spec.known_5xx[0]
        known = [f for f in failures if f.startswith(f"{label} (")]
        assert known, f"{label} passes now: remove known_5xx from {spec.name}'s entry"
        failures = [f for f in failures if f not in known]
    assert not failures, "\n\n".join(failures)
    _assert_healthy(running)
    # Not vacuous: the service counted the generated requests of every operation (metrics are per route).
    metrics = httpx.get(f"{running.base_url}/metrics").text
    for operation in operations:
        served = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(f"cdme_{running.service}_requests_total{{")
            # Route templates may carry a converter (`{key:path}`) that the OpenAPI path does not show.
            and re.sub(r":\w+}", "}", line).count(f'route="{operation.path}"') == 1
            and f'method="{operation.method.upper()}"' in line
        ]
        # An operation without input has one possible request, which Hypothesis sends and stops.
        assert sum(served) >= (MAX_EXAMPLES / 2 if _takes_input(operation) else 1), (operation.label, served)
    if spec.known_5xx is not None:
        pytest.xfail(f"{spec.known_5xx[0]}: {spec.known_5xx[1]}")


def _assert_problem(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in response.text and 'File "' not in response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def _assert_healthy(running: ServiceProcess) -> None:
    with running.client() as anonymous:
        assert anonymous.get("/livez").status_code == 200
        assert anonymous.get("/readyz").status_code == (503 if running.service in NOT_READY else 200)


def _post_templates(client: httpx.Client) -> list[tuple[str, str]]:
    """(path template, a concrete path) of every POST operation that takes a body; path parameters get a run id.

    An operation without a request body never reads one, so body attacks do not apply to it.
    """
    document = client.get("/openapi.json").json()
    return [
        (template, re.sub(r"\{[^}]+\}", SOME_RUN_ID, template))
        for template, item in document["paths"].items()
        if "requestBody" in item.get("post", {})
    ]


def _post_operations(client: httpx.Client) -> list[str]:
    return [concrete for _, concrete in _post_templates(client)]


def _get_operations_with_one_parameter(client: httpx.Client) -> list[str]:
    document = client.get("/openapi.json").json()
    return [path for path, item in document["paths"].items() if "get" in item and path.count("{") == 1]


def test_hostile_strings_in_path_parameters_are_4xx_problems(
    running: ServiceProcess, api: httpx.Client
) -> None:
    templates = _get_operations_with_one_parameter(api)
    assert templates, "no GET operation with a path parameter to attack"
    for template in templates:
        # Quoted values, plus raw ones that are already percent-encoded (invalid UTF-8, encoded slashes).
        segments = [quote(v, safe="") for v in [*SQL_INJECTIONS, *TRAVERSALS, "a" * 10_000]]
        for segment in [*segments, "%ff%fe", "..%2f..%2fetc%2fpasswd", "%00"]:
            prefix, _, rest = template.partition("{")
            path = prefix + segment + rest.partition("}")[2]
            response = api.get(path)
            value = segment
            assert response.status_code < 500, (template, value, response.text[:300])
            if response.status_code >= 400:
                _assert_problem(response, response.status_code)
    _assert_healthy(running)


def test_sql_injection_as_model_names_and_keys_is_data(running: ServiceProcess, api: httpx.Client) -> None:
    for hostile in SQL_INJECTIONS:
        manifest = {
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
            "nodes": {
                f"model.p.{hostile}": {
                    "unique_id": f"model.p.{hostile}",
                    "resource_type": "model",
                    "name": hostile,
                    "package_name": "p",
                    "schema": hostile,
                    "database": hostile,
                    "alias": hostile,
                    "relation_name": f'"{hostile}"."{hostile}"',
                    "compiled_code": f'select 1 as "{hostile}" from {hostile}',
                    "config": {"meta": {"cdme": {"key": [hostile]}}},
                    "depends_on": {"nodes": [hostile]},
                }
            },
            "sources": {},
        }
        for path in _post_operations(api):
            body: dict[str, Any] = {"manifest": manifest}
            if path == "/validate/mapping":
                body |= {"name": hostile, "sql": f"select '{hostile}'"}
            elif path == "/validate/path":
                body |= {"path": f"{hostile}.{hostile}.x"}
            response = api.post(path, json=body)
            assert response.status_code < 500, (path, hostile, response.text[:500])
            if response.status_code >= 400:
                _assert_problem(response, 400, 404, 409, 413, 422)
    _assert_healthy(running)


def test_nul_characters_are_refused_not_a_5xx(running: ServiceProcess, api: httpx.Client) -> None:
    # PostgreSQL stores U+0000 in neither text nor jsonb: a service that passes one on answers 500.
    document = api.get("/openapi.json").json()
    schemas = document.get("components", {}).get("schemas", {})
    for template, path in _post_templates(api):
        content = document["paths"][template]["post"].get("requestBody", {}).get("content", {})
        ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
        properties = schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
        body = {name: "a\x00b" for name in properties} | {"extra\x00key": {"k\x00": "v\x00"}}
        for sent in (body, {name: {"n\x00": ["\x00"]} for name in properties}):
            response = api.post(path, json=sent)
            assert response.status_code < 500, (path, response.text[:300])
            _assert_problem(response, response.status_code)
    for path in _get_operations_with_one_parameter(api):
        response = api.get(path.split("{")[0] + "a%00b" + path.split("}")[1], params={"q": "\x00"})
        assert response.status_code < 500, (path, response.text[:300])
    _assert_healthy(running)


def _location_fields(client: httpx.Client) -> list[tuple[str, str, dict[str, Any]]]:
    """(POST path, property, other required properties) for every request property naming a file or directory."""
    document = client.get("/openapi.json").json()
    schemas = document.get("components", {}).get("schemas", {})
    found = []
    for template, path in _post_templates(client):
        content = document["paths"][template]["post"].get("requestBody", {}).get("content", {})
        ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
        schema = schemas.get(ref.rsplit("/", 1)[-1], {})
        # Plain values for the other required strings, so that the location is what the service looks at.
        required = {name: "m" for name in schema.get("required", [])}
        for name in schema.get("properties", {}):
            if re.search(r"dir|path|file|location", name):
                found.append((path, name, {k: v for k, v in required.items() if k != name}))
    return found


def test_path_traversal_in_file_locations_is_refused(
    spec: ServiceUnderTest, running: ServiceProcess, api: httpx.Client
) -> None:
    # A link inside the service's own home that leads out of it must not count as inside.
    escape = running.home / "escape"
    escape.symlink_to("/etc", target_is_directory=True)
    fields = _location_fields(api)
    assert {name for _, name, _ in fields} >= set(spec.location_fields)
    for path, name, required in fields:
        for location in [*TRAVERSALS, str(escape), f"{running.home}/../../etc"]:
            response = api.post(path, json={**required, name: location})
            assert response.status_code < 500, (path, name, location, response.text[:300])
            body = _assert_problem(response, 400, 403, 404, 422)
            assert "root:" not in response.text, "a file outside the service was read"
            if name == "project_dir":
                assert "not a project this service may read" in body["detail"], body
    _assert_healthy(running)


def test_deeply_nested_json_is_a_4xx_not_a_crash(running: ServiceProcess, api: httpx.Client) -> None:
    depth = 100_000
    nested = '{"manifest": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    arrays = '{"manifest": {"nodes": ' + "[" * depth + "]" * depth + "}}"
    for path in _post_operations(api):
        for body in (nested, arrays):
            response = api.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
            _assert_problem(response, 400, 413, 422)
    _assert_healthy(running)


def test_bytes_that_are_not_utf8_are_a_4xx(running: ServiceProcess, api: httpx.Client) -> None:
    bodies = [
        b'{"manifest": {"nodes": "\xff\xfe\xfd"}}',
        b"\xc3\x28\xa0\xa1",
        '{"manifest": {}}'.encode("utf-16"),
        b'{"manifest": {"x": "\\ud800"}}',  # a lone surrogate, valid JSON escaping but not valid Unicode
    ]
    for path in _post_operations(api):
        for body in bodies:
            response = api.post(path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code < 500, (path, body, response.text[:300])
            if response.status_code >= 400:
                _assert_problem(response, 400, 422)
    _assert_healthy(running)


def test_wrong_content_types_and_empty_bodies_are_4xx(running: ServiceProcess, api: httpx.Client) -> None:
    for path in _post_operations(api):
        for content, content_type in [
            (b"", "application/json"),
            (b"manifest=1", "application/x-www-form-urlencoded"),
            (b"<manifest/>", "application/xml"),
            (b"null", "application/json"),
            (b"[]", "application/json"),
            (json.dumps({"manifest": None}).encode(), "application/json"),
        ]:
            response = api.post(path, content=content, headers={"Content-Type": content_type})
            _assert_problem(response, 400, 415, 422)
    _assert_healthy(running)


def test_a_huge_body_is_refused_before_it_is_read(running: ServiceProcess, api: httpx.Client) -> None:
    huge = b'{"manifest": {"nodes": {' + b'"n": 1, ' * (8 * 1024 * 1024) + b'"end": 1}}}'
    for path in _post_operations(api):
        response = api.post(path, content=huge, headers={"Content-Type": "application/json"})
        _assert_problem(response, 413)
    _assert_healthy(running)


def test_hostile_headers_do_not_leak_into_responses(running: ServiceProcess) -> None:
    injected = "Bearer ' or 1=1 --"
    with httpx.Client(base_url=running.base_url, timeout=30) as client:
        for path in ["/livez", "/openapi.json"]:
            response = client.get(path, headers={"X-Request-ID": "a" * 10_000})
            assert response.status_code == 200
            assert response.headers["x-request-id"] != "a" * 10_000
        [first, *_] = _post_operations(client)
        response = client.post(first, json={}, headers={"Authorization": injected})
        body = _assert_problem(response, 401)
        assert "or 1=1" not in json.dumps(body)
        response = client.get("/metrics", headers={"Authorization": "Bearer " + "x" * 100_000})
        assert response.status_code < 500
        assert "set-cookie" not in response.headers
    _assert_healthy(running)


def test_the_token_and_the_pepper_reach_neither_logs_nor_documents(running: ServiceProcess) -> None:
    # Runs after the hostile traffic above (same module-scoped process), with every log line at DEBUG.
    with running.client(AUTH) as client:
        client.post("/validate", json={"manifest": {"pepper": PEPPER}, "config": {"token": TOKEN}})
        documents = [client.get("/openapi.json").text, client.get("/metrics").text]
    for text in [*documents, running.log.read_text(errors="replace")]:
        assert TOKEN not in text
        assert PEPPER not in text


# -- the OpenAPI document tells the truth about errors ---------------------------------------------------------------


def _error_responses(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    yield f"{method.upper()} {path} {status}", status, response


def test_the_openapi_document_declares_problem_bodies_as_problem_json(api: httpx.Client) -> None:
    wrong = [
        where
        for where, _status, response in _error_responses(api.get("/openapi.json").json())
        if set(response.get("content", {})) != {PROBLEM_JSON}
    ]
    assert not wrong, wrong


def test_an_undecodable_body_gets_a_documented_status(api: httpx.Client) -> None:
    document = api.get("/openapi.json").json()
    templates = _post_templates(api)
    assert templates
    for template, path in templates:
        response = api.post(path, content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
        assert str(response.status_code) in document["paths"][template]["post"]["responses"], (
            path,
            response.text,
        )
        _assert_problem(response, 422)
