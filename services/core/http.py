"""The HTTP client services use to call each other: timeouts always, retries only where they are safe.

A call is retried on a transport error (refused, reset, timed out) or a 429/502/503/504 answer, with
exponential backoff and full jitter, honouring `Retry-After`, but only when repeating it cannot do harm:
GET, HEAD, OPTIONS, PUT and DELETE, or a POST the caller marks `idempotent=True` (CDME's run-keyed POSTs such
as capture and finalize are). Any other failure becomes an `UpstreamServiceError` with the peer's problem
detail, so callers never see a raw httpx exception.

Examples:
    >>> with ServiceClient("http://127.0.0.1:8002", token=token) as adjoint:
    ...     adjoint.post(f"/runs/{run_id}/capture", json=body, idempotent=True).json()
"""

from __future__ import annotations

import contextlib
import random
import time
from types import TracebackType
from typing import Any

import httpx

from services.core.errors import UpstreamServiceError
from services.core.logs import current_context
from services.core.settings import CdmeSettings

_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_MAX_RETRY_AFTER_S = 30.0


class UpstreamHttpError(UpstreamServiceError):
    """A peer answered with an error status; `status` and `problem` carry what it said."""

    def __init__(self, message: str, status: int, problem: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.status = status
        self.problem = problem


def _problem(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class ServiceClient:
    """A client for one CDME service (or any JSON API) at `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Configure the client.

        Args:
            base_url: Scheme, host and port of the service.
            token: Bearer token sent on every request.
            timeout: Seconds for connect, read, write and pool each.
            retries: Retries after the first attempt, for calls that may be retried.
            backoff: Base delay in seconds; attempt n waits up to `backoff * 2**n`.
            transport: An httpx transport (e.g. to mount an ASGI app in-process).
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        self._retries = retries
        self._backoff = backoff

    @classmethod
    def from_settings(
        cls, base_url: str, settings: CdmeSettings, *, token: str | None = None
    ) -> ServiceClient:
        """A client with the timeout and retries of `CDME_HTTP_TIMEOUT_S` and `CDME_HTTP_RETRIES`."""
        return cls(base_url, token=token, timeout=settings.http_timeout_s, retries=settings.http_retries)

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send a request, retrying where safe, and return a 2xx/3xx response.

        Args:
            method: HTTP method.
            path: Path relative to the base URL.
            idempotent: Whether repeating the call is harmless; defaults from the method.
            **kwargs: Passed to httpx (`json`, `params`, `headers`, ...).

        Raises:
            UpstreamHttpError: The service answered 4xx/5xx (after retries, for retryable statuses).
            UpstreamServiceError: The service could not be reached after retries.
        """
        method = method.upper()
        retryable = method in _IDEMPOTENT_METHODS if idempotent is None else idempotent
        attempts = 1 + (self._retries if retryable else 0)
        # Case-insensitive, so a caller's own `x-request-id` is not sent alongside the bound one.
        headers = httpx.Headers(kwargs.pop("headers", None))
        if (request_id := current_context().get("request_id")) is not None:
            headers.setdefault("X-Request-ID", request_id)
        where = f"{method} {self._client.base_url.join(path)}"
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._client.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as e:
                if last:
                    msg = f"{where} failed after {attempt + 1} attempt(s): {type(e).__name__}: {e}"
                    raise UpstreamServiceError(msg) from e
                self._sleep(attempt, None)
                continue
            except httpx.HTTPError as e:
                # Not a transport fault (e.g. a body that does not decode): repeating it would not help.
                msg = f"{where} failed: {type(e).__name__}: {e}"
                raise UpstreamServiceError(msg) from e
            if response.status_code in _RETRY_STATUSES and not last:
                self._sleep(attempt, response.headers.get("Retry-After"))
                continue
            if response.status_code >= 400:
                problem = _problem(response)
                detail = (
                    (problem or {}).get("detail") or (problem or {}).get("title") or response.reason_phrase
                )
                msg = f"{where} answered {response.status_code}: {detail}"
                raise UpstreamHttpError(msg, response.status_code, problem)
            return response
        msg = f"{where}: no attempt was made"  # unreachable: attempts >= 1
        raise UpstreamServiceError(msg)

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = random.uniform(0, self._backoff * 2**attempt)
        if retry_after is not None:
            # An HTTP-date Retry-After does not parse as seconds: keep the computed backoff then.
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), _MAX_RETRY_AFTER_S))
        time.sleep(delay)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """GET (retried)."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, *, idempotent: bool = False, **kwargs: Any) -> httpx.Response:
        """POST (retried only if `idempotent`)."""
        return self.request("POST", path, idempotent=idempotent, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        """PUT (retried)."""
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        """DELETE (retried)."""
        return self.request("DELETE", path, **kwargs)
