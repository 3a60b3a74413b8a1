"""ServiceClient against a real HTTP server on loopback: retries, Retry-After, errors, headers and timeouts."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from services.core import http as http_module
from services.core.errors import UpstreamServiceError
from services.core.http import ServiceClient, UpstreamHttpError
from services.core.logs import log_context

pytestmark = pytest.mark.integration


def _client(
    base_url: str, *, retries: int = 3, token: str | None = None, backoff: float = 0.01, timeout: float = 2.0
) -> ServiceClient:
    """A client with a tiny backoff, so retries cost milliseconds."""
    return ServiceClient(base_url, token=token, retries=retries, backoff=backoff, timeout=timeout)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering
    drop: bool = False  # close the connection without answering


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw_headers: list[tuple[str, str]]  # as sent, repeats included


class Server:
    """Answers each path from a script of replies (the last one repeats) and records every request."""

    def __init__(self) -> None:
        self._scripts: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        self.release = threading.Event()  # set at teardown to cut delayed replies short
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[path] = list(replies)

    def calls(self, path: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == path]

    def raw_headers(self, path: str) -> list[list[tuple[str, str]]]:
        return [c.raw_headers for c in self.calls(path)]

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            script = self._scripts.get(seen.path.split("?")[0])
            if not script:
                return Reply(404, {"title": "Not Found", "detail": f"no script for {seen.path}"})
            return script.pop(0) if len(script) > 1 else script[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as separate writes

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers = {k.lower(): v for k, v in self.headers.items()}
                raw = list(self.headers.items())
                seen = Seen(self.command, self.path, headers, self.rfile.read(length), raw)
                reply = server._next(seen)
                if reply.delay and server.release.wait(reply.delay):
                    return
                if reply.drop:
                    self.close_connection = True
                    return
                body = reply.body
                content_type = "application/octet-stream"
                if isinstance(body, dict | list):
                    body, content_type = json.dumps(body).encode(), "application/problem+json"
                elif isinstance(body, str):
                    body, content_type = body.encode(), "text/plain"
                with contextlib.suppress(OSError):  # the client may have given up already
                    self.send_response(reply.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours proxy variables; these tests must only ever talk to loopback directly.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the client waits between attempts, recorded instead of slept."""
    delays: list[float] = []
    monkeypatch.setattr(http_module, "time", types.SimpleNamespace(sleep=delays.append))
    return delays


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- retries ------------------------------------------------------------------------------------------


def test_get_is_retried_after_503s_then_succeeds(server: Server) -> None:
    server.script("/status", Reply(503), Reply(503), Reply(200, {"ok": True}))

    with _client(server.url, retries=3) as client:
        response = client.get("/status")

    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert len(server.calls("/status")) == 3


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_every_retryable_status_is_retried(server: Server, status: int) -> None:
    server.script("/x", Reply(status), Reply(200, "fine"))

    with _client(server.url, retries=1) as client:
        assert client.get("/x").text == "fine"

    assert len(server.calls("/x")) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 409, 422, 500, 501])
def test_other_error_statuses_are_not_retried(server: Server, status: int) -> None:
    server.script("/x", Reply(status), Reply(200))

    with _client(server.url, retries=3) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.get("/x")

    assert excinfo.value.status == status
    assert len(server.calls("/x")) == 1


def test_get_that_keeps_failing_raises_the_last_status_after_all_retries(server: Server) -> None:
    server.script("/down", Reply(503))

    with _client(server.url, retries=2) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.get("/down")

    assert excinfo.value.status == 503
    assert excinfo.value.problem is None
    assert str(excinfo.value) == f"GET {server.url}/down answered 503: Service Unavailable"
    assert len(server.calls("/down")) == 3


def test_retries_zero_makes_a_single_attempt(server: Server) -> None:
    server.script("/x", Reply(503), Reply(200))

    with _client(server.url, retries=0) as client, pytest.raises(UpstreamHttpError):
        client.get("/x")

    assert len(server.calls("/x")) == 1


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "OPTIONS"])
def test_idempotent_methods_are_retried(server: Server, method: str) -> None:
    server.script("/x", Reply(503), Reply(200))

    with _client(server.url, retries=1) as client:
        assert client.request(method.lower(), "/x").status_code == 200

    assert [c.method for c in server.calls("/x")] == [method, method]


def test_put_and_delete_helpers_are_retried(server: Server) -> None:
    server.script("/x", Reply(503), Reply(200), Reply(503), Reply(204))

    with _client(server.url, retries=1) as client:
        assert client.put("/x", json={"a": 1}).status_code == 200
        assert client.delete("/x").status_code == 204

    assert [c.method for c in server.calls("/x")] == ["PUT", "PUT", "DELETE", "DELETE"]


def test_a_dropped_connection_is_retried(server: Server) -> None:
    server.script("/flaky", Reply(drop=True), Reply(200, "back"))

    with _client(server.url, retries=1) as client:
        assert client.get("/flaky").text == "back"

    assert len(server.calls("/flaky")) == 2


# --- Retry-After and backoff --------------------------------------------------------------------------


def test_retry_after_zero_is_honoured_and_the_retry_succeeds(server: Server) -> None:
    server.script("/busy", Reply(503, headers={"Retry-After": "0"}), Reply(200, "done"))

    with _client(server.url, retries=1) as client:
        assert client.get("/busy").text == "done"

    assert len(server.calls("/busy")) == 2


def test_retry_after_seconds_set_the_wait(server: Server, sleeps: list[float]) -> None:
    server.script(
        "/busy",
        Reply(429, headers={"Retry-After": "3"}),
        Reply(503, headers={"Retry-After": "0.5"}),
        Reply(200),
    )

    with ServiceClient(server.url, retries=2, backoff=0.01, timeout=2.0) as client:
        client.get("/busy")

    assert sleeps == [3.0, 0.5]


def test_retry_after_is_capped_at_thirty_seconds(server: Server, sleeps: list[float]) -> None:
    server.script("/busy", Reply(503, headers={"Retry-After": "3600"}), Reply(200))

    with _client(server.url, retries=1) as client:
        client.get("/busy")

    assert sleeps == [30.0]


def test_retry_after_never_shortens_the_backoff(server: Server, sleeps: list[float]) -> None:
    server.script("/busy", Reply(503, headers={"Retry-After": "0"}), Reply(200))

    with ServiceClient(server.url, retries=1, backoff=0.01, timeout=2.0) as client:
        client.get("/busy")

    assert len(sleeps) == 1
    assert 0 <= sleeps[0] <= 0.01


@pytest.mark.parametrize("value", ["Wed, 21 Oct 2015 07:28:00 GMT", "soon", ""])
def test_unparseable_retry_after_falls_back_to_the_backoff(
    server: Server, sleeps: list[float], value: str
) -> None:
    server.script("/busy", Reply(503, headers={"Retry-After": value}), Reply(200))

    with ServiceClient(server.url, retries=1, backoff=0.01, timeout=2.0) as client:
        assert client.get("/busy").status_code == 200

    assert len(sleeps) == 1
    assert 0 <= sleeps[0] <= 0.01


def test_backoff_grows_exponentially_with_full_jitter(server: Server, sleeps: list[float]) -> None:
    server.script("/x", Reply(503))

    client = ServiceClient(server.url, retries=4, backoff=0.01, timeout=2.0)
    with client, pytest.raises(UpstreamHttpError):
        client.get("/x")

    assert len(sleeps) == 4
    for attempt, delay in enumerate(sleeps):
        assert 0 <= delay <= 0.01 * 2**attempt


# --- POST ---------------------------------------------------------------------------------------------


def test_post_is_not_retried_on_503(server: Server) -> None:
    server.script("/runs", Reply(503), Reply(201))

    with _client(server.url, retries=3) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.post("/runs", json={"model": "orders"})

    assert excinfo.value.status == 503
    assert str(excinfo.value) == f"POST {server.url}/runs answered 503: Service Unavailable"
    assert len(server.calls("/runs")) == 1


def test_post_marked_idempotent_is_retried_with_the_same_body(server: Server) -> None:
    server.script("/runs/r1/capture", Reply(503), Reply(502), Reply(200, {"captured": 2}))

    with _client(server.url, retries=3) as client:
        response = client.post("/runs/r1/capture", json={"rows": [1, 2]}, idempotent=True)

    assert response.json() == {"captured": 2}
    calls = server.calls("/runs/r1/capture")
    assert [c.method for c in calls] == ["POST"] * 3
    assert [json.loads(c.body) for c in calls] == [{"rows": [1, 2]}] * 3


def test_request_idempotent_false_disables_retries_of_a_get(server: Server) -> None:
    server.script("/x", Reply(503), Reply(200))

    with _client(server.url, retries=3) as client, pytest.raises(UpstreamHttpError):
        client.request("GET", "/x", idempotent=False)

    assert len(server.calls("/x")) == 1


def test_post_that_cannot_connect_is_tried_once(closed_port: int) -> None:
    client = _client(f"http://127.0.0.1:{closed_port}", retries=3)
    with client, pytest.raises(UpstreamServiceError) as excinfo:
        client.post("/runs", json={})

    assert str(excinfo.value).startswith(
        f"POST http://127.0.0.1:{closed_port}/runs failed after 1 attempt(s): ConnectError: "
    )


# --- error responses ----------------------------------------------------------------------------------


def test_404_problem_detail_is_in_the_message_and_problem_is_the_body(server: Server) -> None:
    problem = {"title": "Not Found", "detail": "no run 42", "status": 404}
    server.script("/runs/42", Reply(404, problem))

    with _client(server.url, retries=3) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.get("/runs/42")

    assert excinfo.value.status == 404
    assert excinfo.value.problem == problem
    assert str(excinfo.value) == f"GET {server.url}/runs/42 answered 404: no run 42"
    assert isinstance(excinfo.value, UpstreamServiceError)
    assert len(server.calls("/runs/42")) == 1


def test_problem_without_detail_uses_its_title(server: Server) -> None:
    server.script("/x", Reply(409, {"title": "Run already finalized"}))

    with _client(server.url) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.get("/x")

    assert str(excinfo.value) == f"GET {server.url}/x answered 409: Run already finalized"
    assert excinfo.value.problem == {"title": "Run already finalized"}


@pytest.mark.parametrize("body", ["<html>oops</html>", b"", [1, 2]])
def test_error_without_a_json_object_uses_the_reason_phrase(
    server: Server, body: bytes | str | list[Any]
) -> None:
    server.script("/x", Reply(500, body))

    with _client(server.url) as client, pytest.raises(UpstreamHttpError) as excinfo:
        client.get("/x")

    assert str(excinfo.value) == f"GET {server.url}/x answered 500: Internal Server Error"
    assert excinfo.value.problem is None


def test_redirects_are_returned_not_followed(server: Server) -> None:
    server.script("/old", Reply(307, headers={"Location": "/new"}))

    with _client(server.url) as client:
        response = client.get("/old")

    assert response.status_code == 307
    assert server.calls("/new") == []


def test_a_body_that_does_not_decode_is_an_upstream_service_error(server: Server) -> None:
    server.script("/x", Reply(200, b"not gzip at all", headers={"Content-Encoding": "gzip"}))

    with (
        _client(server.url, retries=2) as client,
        pytest.raises(UpstreamServiceError) as excinfo,
    ):
        client.get("/x")

    assert str(excinfo.value).startswith(f"GET {server.url}/x failed: DecodingError: ")
    assert not isinstance(excinfo.value, UpstreamHttpError)
    assert len(server.calls("/x")) == 1


def test_a_gzip_body_is_decoded(server: Server) -> None:
    server.script("/x", Reply(200, gzip.compress(b'{"a": 1}'), headers={"Content-Encoding": "gzip"}))

    with _client(server.url) as client:
        assert client.get("/x").json() == {"a": 1}


# --- unreachable peers and timeouts -------------------------------------------------------------------


def test_connection_refused_raises_upstream_service_error_after_retries(closed_port: int) -> None:
    base = f"http://127.0.0.1:{closed_port}"

    with _client(base, retries=2) as client, pytest.raises(UpstreamServiceError) as excinfo:
        client.get("/health")

    assert type(excinfo.value) is UpstreamServiceError
    assert str(excinfo.value).startswith(f"GET {base}/health failed after 3 attempt(s): ConnectError: ")
    assert isinstance(excinfo.value.__cause__, httpx.ConnectError)


def test_connection_refused_is_retried_with_backoff(closed_port: int, sleeps: list[float]) -> None:
    client = ServiceClient(f"http://127.0.0.1:{closed_port}", retries=3, backoff=0.01, timeout=2.0)
    with client, pytest.raises(UpstreamServiceError, match=r"failed after 4 attempt\(s\)"):
        client.get("/health")

    assert len(sleeps) == 3


def test_read_timeout_becomes_upstream_service_error(server: Server) -> None:
    server.script("/slow", Reply(200, "late", delay=2.0))
    started = time.monotonic()

    client = ServiceClient(server.url, retries=1, backoff=0.01, timeout=0.1)
    with client, pytest.raises(UpstreamServiceError) as excinfo:
        client.get("/slow")

    assert time.monotonic() - started < 1.5
    assert str(excinfo.value).startswith(f"GET {server.url}/slow failed after 2 attempt(s): ReadTimeout")
    assert isinstance(excinfo.value.__cause__, httpx.ReadTimeout)
    assert len(server.calls("/slow")) == 2


def test_a_read_timeout_is_retried_and_a_prompt_answer_then_succeeds(server: Server) -> None:
    server.script("/slow", Reply(200, "late", delay=2.0), Reply(200, "prompt"))

    with ServiceClient(server.url, retries=1, backoff=0.01, timeout=0.1) as client:
        assert client.get("/slow").text == "prompt"


# --- headers ------------------------------------------------------------------------------------------


def test_bearer_token_is_sent_on_every_attempt(server: Server) -> None:
    server.script("/x", Reply(503), Reply(200))

    with _client(server.url, token="s3cret", retries=1) as client:
        client.get("/x")

    assert [c.headers.get("authorization") for c in server.calls("/x")] == ["Bearer s3cret"] * 2


def test_no_authorization_header_without_a_token(server: Server) -> None:
    server.script("/x", Reply(200))

    with _client(server.url) as client:
        client.get("/x")

    assert "authorization" not in server.calls("/x")[0].headers


def test_request_id_from_the_log_context_is_propagated(server: Server) -> None:
    server.script("/x", Reply(503), Reply(200))

    with (
        _client(server.url, retries=1) as client,
        log_context(request_id="req-123", run_id="r"),
    ):
        client.get("/x")

    assert [c.headers.get("x-request-id") for c in server.calls("/x")] == ["req-123"] * 2


def test_no_request_id_header_outside_a_log_context(server: Server) -> None:
    server.script("/x", Reply(200))

    with _client(server.url) as client, log_context(run_id="r"):
        client.get("/x")

    assert "x-request-id" not in server.calls("/x")[0].headers


def test_an_explicit_request_id_header_wins_over_the_context(server: Server) -> None:
    server.script("/x", Reply(200))

    with _client(server.url) as client, log_context(request_id="from-context"):
        client.get("/x", headers={"X-Request-ID": "explicit", "X-Extra": "1"})

    seen = server.calls("/x")[0].headers
    assert seen["x-request-id"] == "explicit"
    assert seen["x-extra"] == "1"


def test_params_and_json_are_passed_through(server: Server) -> None:
    server.script("/search", Reply(200, {"hits": []}))

    with _client(server.url) as client:
        client.post("/search", params={"q": "orders", "n": 2}, json={"filter": None})

    call = server.calls("/search")[0]
    assert call.path == "/search?q=orders&n=2"
    assert call.headers["content-type"] == "application/json"
    assert json.loads(call.body) == {"filter": None}


def test_an_explicit_request_id_header_in_any_case_is_sent_once(server: Server) -> None:
    server.script("/x", Reply(200))

    with _client(server.url) as client, log_context(request_id="from-context"):
        client.get("/x", headers={"x-request-id": "explicit"})

    raw = server.raw_headers("/x")[0]
    assert [v for k, v in raw if k.lower() == "x-request-id"] == ["explicit"]
