"""The validation service's ASGI app: `create_app()` wires the routes, the lifespan and the error translation.

Run it (one process; the lifespan migrates `cdme_validation` before the first request is served):

    CDME_WAREHOUSE_URL=postgresql://user:password@host:5432/db uvicorn services.validation.app:app --port 8001

Without `CDME_WAREHOUSE_URL` the embedded PostgreSQL must be running (`cdme warehouse start`). Clients send
`Authorization: Bearer <token>` (tokens from `CDME_AUTH_TOKENS` or the tokens file; `cdme auth token` prints
the demo's). `/livez`, `/readyz` and `/docs` need no token. Every error is an RFC 9457 problem document, and
every response carries the `X-Request-ID` its log lines are bound to.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.auth import TokenAuthenticator
from services.core.errors import AuthenticationError, CdmeError, error_location
from services.core.logs import configure_logging, current_context, log_context
from services.core.migrations import migrate
from services.core.settings import CdmeSettings, get_settings
from services.core.warehouse import create_warehouse_engine, resolve_warehouse_url
from services.validation import api
from services.validation.store import ReportStore

SERVICE = "validation"
# A compiled manifest of a few thousand models is tens of MiB of JSON; anything beyond this is refused unread.
MAX_BODY_BYTES = 50 * 1024 * 1024
PROBLEM_JSON = "application/problem+json"

logger = logging.getLogger("cdme.validation")
access_logger = logging.getLogger("cdme.validation.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_QUIET_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


def problem(
    status: int,
    detail: str,
    *,
    instance: str,
    title: str | None = None,
    type_: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """An RFC 9457 problem response, carrying the request id bound to the current log context.

    Args:
        status: The HTTP status.
        detail: What went wrong in this request.
        instance: The request path.
        title: The kind of problem (default: the status's reason phrase, as `about:blank` requires).
        type_: A URI naming the kind of problem.
        headers: Extra response headers.
        **extensions: Extension members (e.g. `errors`).
    """
    body = api.Problem(
        type=type_,
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        request_id=current_context().get("request_id"),
        **extensions,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


async def _cdme_error(request: Request, exc: Exception) -> Response:
    error = cast(CdmeError, exc)  # registered for CdmeError only
    if error.http_status >= 500:
        logger.error("request failed: %s", error, extra={"error": type(error).__name__})
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(error, AuthenticationError) else None
    return problem(
        error.http_status,
        str(error),
        instance=request.url.path,
        title=error.title,
        type_=f"urn:cdme:problem:{_kebab(type(error).__name__)}",
        headers=headers,
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    error = cast(StarletteHTTPException, exc)  # registered for HTTPException only
    detail = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).description
    return problem(error.status_code, detail, instance=request.url.path, headers=error.headers)


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """Where a request validation error is and what it says (never echoing the offending input back)."""
    where = error_location(error.get("loc", ()))
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "json_invalid":
        loc = error.get("loc", ())
        position = loc[-1] if loc else "?"
        where = "body"
        message = f"malformed JSON at character {position}: {(error.get('ctx') or {}).get('error', message)}"
    return where, message


async def _request_validation_error(request: Request, exc: Exception) -> Response:
    error = cast(RequestValidationError, exc)  # registered for RequestValidationError only
    described = [_describe(e) for e in error.errors()] or [("request", "invalid request")]
    where, message = described[0]
    more = f" (and {len(described) - 1} more)" if len(described) > 1 else ""
    return problem(
        422,
        f"{where}: {message}{more}",
        instance=request.url.path,
        title="Invalid request",
        type_="urn:cdme:problem:invalid-request",
        errors=[{"location": w, "message": m} for w, m in described],
    )


class _BodyTooLarge(StarletteHTTPException):
    """The request body exceeds `MAX_BODY_BYTES` (raised from `receive`, so the routes see it as an HTTP error)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit // (1024 * 1024)} MiB")


@dataclass(frozen=True)
class _Metrics:
    registry: CollectorRegistry
    requests: Counter
    seconds: Histogram

    @classmethod
    def create(cls) -> _Metrics:
        # One registry per app, so several apps in one process (tests) do not collide on metric names.
        registry = CollectorRegistry(auto_describe=True)
        requests = Counter(
            "cdme_validation_requests",
            "HTTP requests served, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        seconds = Histogram(
            "cdme_validation_request_seconds",
            "Time to serve an HTTP request, by route template and method.",
            ["route", "method"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        return cls(registry, requests, seconds)


class RequestContextMiddleware:
    """Per request: bind `X-Request-ID` to the logs, cap the body, count and time it, and turn a crash into a 500.

    An unexpected exception is logged with its traceback and answered with a problem document that has none.
    """

    def __init__(self, app: ASGIApp, *, metrics: _Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (HTTP requests get the treatment; lifespan events pass through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        offered = headers.get("x-request-id", "")
        request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        status = 500
        started = False
        received = 0
        declared = headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_body_bytes

        async def receive_capped() -> Message:
            nonlocal received
            if too_large:
                raise _BodyTooLarge(self.max_body_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        begun = time.perf_counter()
        with log_context(request_id=request_id):
            try:
                await self.app(scope, receive_capped, send_with_id)
            except Exception:
                logger.exception("unhandled error serving %s %s", scope["method"], scope["path"])
                if started:
                    raise
                detail = f"unexpected error; the service log has it under request id {request_id}"
                await problem(500, detail, instance=scope["path"])(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - begun
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(route, scope["method"], str(status)).inc()
                self.metrics.seconds.labels(route, scope["method"]).observe(elapsed)
                access_logger.log(
                    logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO,
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={"status": status, "route": route, "duration_ms": round(elapsed * 1000, 1)},
                )


def _route_server_logs() -> None:
    # uvicorn's own lines go through the JSON handler too; its access log is replaced by ours, which carries
    # the request id.
    for name in ("uvicorn", "uvicorn.error"):
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.handlers.clear()
    uvicorn_access.propagate = False


def create_app(settings: CdmeSettings | None = None) -> FastAPI:
    """The validation service; nothing is read or connected until the lifespan starts.

    Args:
        settings: The settings to use (default: `get_settings()`, read when the app starts).

    Returns:
        The app. Its lifespan reads the tokens, builds the engine, migrates `cdme_validation`, and disposes
        the engine at shutdown.

    Examples:
        >>> app = create_app(CdmeSettings(warehouse_url="postgresql://u:p@db:5432/cdme", auth_tokens="t=ci:ops"))
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        resolved = settings or get_settings()
        configure_logging(SERVICE, resolved.log_level, resolved.log_format)
        _route_server_logs()
        authenticator = TokenAuthenticator.from_settings(resolved)
        engine = create_warehouse_engine(resolve_warehouse_url(resolved))
        try:
            revision = await anyio.to_thread.run_sync(migrate, engine, SERVICE)
            logger.info("validation service ready", extra={"schema_revision": revision})
            yield {"cdme": api.ServiceContext(resolved, authenticator, engine, ReportStore(engine))}
        finally:
            engine.dispose()

    metrics = _Metrics.create()
    app = FastAPI(
        title="CDME validation",
        summary="Is this dbt model safe to run? Static validation of a compiled project before dbt runs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics_registry = metrics.registry
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(CdmeError, _cdme_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.include_router(api.operations)
    app.include_router(api.router)
    return app


app = create_app()
