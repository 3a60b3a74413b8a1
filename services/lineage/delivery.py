"""Delivery of the outbox to an OpenLineage transport: `file` (JSON lines), `http` (any collector), `console`.

The contract of a transport is one method, `send(event)`, that returns once the destination has accepted the
event and raises `DeliveryError` otherwise. The `Deliverer` takes undelivered events in queue order, sends each
and marks it delivered only after the transport accepted it; a failed attempt is retried with exponential
backoff, and a batch stops at the first failure so a collector that is down receives events in order when it
returns. Each event is sent until it is accepted once, and never after: the outbox row is the record.

Examples:
    >>> deliverer = Deliverer(store, transport_from_settings(settings))
    >>> deliverer.deliver_pending()
    42
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx

from services.core.errors import CdmeError
from services.core.settings import CdmeSettings
from services.lineage.store import LineageStore

logger = logging.getLogger("cdme.lineage.delivery")


class DeliveryError(CdmeError):
    """A transport could not deliver an event (the collector is down or refused it); it will be retried."""

    exit_code = 69
    http_status = 502
    title = "OpenLineage delivery failed"


class Transport(Protocol):
    """Where events go; `send` returns only when the destination accepted the event."""

    name: str

    def send(self, event: dict[str, Any]) -> None:
        """Deliver one event or raise `DeliveryError`."""


class FileTransport:
    """Appends each event as one JSON line and fsyncs it (the embedded default)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, event: dict[str, Any]) -> None:
        """Append `event` to the file."""
        line = json.dumps(event, separators=(",", ":")) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as e:
            msg = f"cannot append to {self.path}: {e}"
            raise DeliveryError(msg) from e


class ConsoleTransport:
    """Writes each event as one JSON line to standard output."""

    name = "console"

    def send(self, event: dict[str, Any]) -> None:
        """Write `event` to stdout."""
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()


class HttpTransport:
    """POSTs each event to an OpenLineage collector (e.g. Marquez's `/api/v1/lineage`); 2xx means accepted."""

    name = "http"

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.url = url
        self._client = httpx.Client(timeout=timeout, headers=headers)

    def send(self, event: dict[str, Any]) -> None:
        """POST `event`."""
        try:
            response = self._client.post(self.url, content=json.dumps(event))
        except httpx.HTTPError as e:
            msg = f"POST {self.url}: {type(e).__name__}: {e}"
            raise DeliveryError(msg) from e
        if not 200 <= response.status_code < 300:
            msg = f"POST {self.url} answered {response.status_code}: {response.text[:200]}"
            raise DeliveryError(msg)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def transport_from_settings(settings: CdmeSettings) -> Transport:
    """The transport `CDME_OPENLINEAGE_TRANSPORT` names.

    Raises:
        ConfigurationError: `http` without `CDME_OPENLINEAGE_URL`.
    """
    from services.core.errors import ConfigurationError

    if settings.openlineage_transport == "http":
        if not settings.openlineage_url:
            msg = "CDME_OPENLINEAGE_TRANSPORT=http needs CDME_OPENLINEAGE_URL (e.g. http://marquez:5000/api/v1/lineage)"
            raise ConfigurationError(msg)
        key = settings.openlineage_api_key.get_secret_value() if settings.openlineage_api_key else None
        return HttpTransport(settings.openlineage_url, api_key=key, timeout=settings.http_timeout_s)
    if settings.openlineage_transport == "console":
        return ConsoleTransport()
    return FileTransport(settings.openlineage_events_file)


class Deliverer:
    """Sends the outbox's pending events through a transport, exactly once each."""

    def __init__(
        self,
        store: LineageStore,
        transport: Transport,
        *,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        batch: int = 500,
    ) -> None:
        self.store = store
        self.transport = transport
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch = batch
        # One delivery at a time per process: finalize and the background loop must not send the same row.
        self._lock = threading.Lock()
        self.delivered_total = 0

    def deliver_pending(self) -> int:
        """Send every due event, oldest first, stopping at the first failure.

        Returns:
            How many events were delivered (0 too when another replica is delivering).
        """
        delivered = 0
        with self._lock, self.store.delivery_lock() as held:
            while held:
                batch = self.store.pending(limit=self.batch)
                # Events go out in queue order: while the oldest waits for its retry, everything waits.
                if not batch or batch[0].next_attempt_at > datetime.now(UTC):
                    return delivered
                for event in batch:
                    try:
                        self.transport.send(event.payload)
                    except DeliveryError as e:
                        delay = min(self.max_backoff_s, self.backoff_s * 2**event.attempts)
                        self.store.mark_failed(event.id, str(e), timedelta(seconds=delay))
                        logger.warning(
                            "OpenLineage delivery failed; retrying in %.1fs",
                            delay,
                            extra={
                                "event_id": event.event_id,
                                "error": str(e),
                                "transport": self.transport.name,
                            },
                        )
                        return delivered
                    self.store.mark_delivered(event.id)
                    delivered += 1
                    self.delivered_total += 1
            return delivered


class DeliveryLoop:
    """A background thread that delivers the outbox every `interval_s` until stopped."""

    def __init__(self, deliverer: Deliverer, *, interval_s: float = 1.0) -> None:
        self.deliverer = deliverer
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdme-lineage-delivery", daemon=True)

    def start(self) -> None:
        """Start delivering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current attempt."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.deliverer.deliver_pending()
            except Exception:  # the loop must outlive a database hiccup; the next tick retries
                logger.exception("OpenLineage delivery loop error")
