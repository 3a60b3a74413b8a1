"""Outbox delivery to a real HTTP collector that refuses connections for a while: all events arrive, none twice."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.core.migrations import migrate
from services.core.net import free_port
from services.core.warehouse import create_warehouse_engine
from services.lineage.delivery import Deliverer, DeliveryLoop, HttpTransport
from services.lineage.store import LineageStore, RunRecord

pytestmark = pytest.mark.integration


class Collector:
    """A minimal OpenLineage collector (`POST /api/v1/lineage`) on a fixed port, started and stopped at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/api/v1/lineage":
                    self.send_response(404)
                    self.end_headers()
                    return
                received.append(json.loads(body))
                self.send_response(201)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector(free_port())
    yield running
    running.stop()


def _events(run_id: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "eventType": "START" if i % 2 == 0 else "COMPLETE",
            "eventTime": f"2026-11-22T06:00:{i // 2:02d}.000000Z",
            "run": {"runId": run_id},
            "job": {"namespace": "cdme", "name": f"model.p.m{i // 2}"},
            "producer": "https://example.com/cdme",
            "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        }
        for i in range(count)
    ]


def test_a_collector_down_for_a_while_gets_every_event_exactly_once_from_two_replicas(
    new_database: Callable[[], str], collector: Collector
) -> None:
    engine = create_warehouse_engine(new_database(), pool_size=2)
    migrate(engine, "lineage")
    store = LineageStore(engine)
    run_id = str(uuid.uuid4())
    record = RunRecord(
        run_id, "2026-11-20", "p", "dev", "COMPLETE", None, "success", "/x", None, [], {}, {}, []
    )
    events = _events(run_id, 40)
    assert store.save_run(record, None, None, events)
    assert not store.save_run(record, None, None, events)  # finalize twice: one set of events

    transport = HttpTransport(f"http://127.0.0.1:{collector.port}/api/v1/lineage", timeout=2)
    deliverer = Deliverer(store, transport, backoff_s=0.1, max_backoff_s=0.4)
    assert deliverer.deliver_pending() == 0  # refused: nothing is lost, nothing is marked
    assert store.pending_count() == 40
    # A second replica (own engine, own transport) delivers from the same outbox at the same time.
    replica_engine = create_warehouse_engine(
        str(engine.url.render_as_string(hide_password=False)), pool_size=2
    )
    replica_transport = HttpTransport(transport.url, timeout=2)
    replica = Deliverer(LineageStore(replica_engine), replica_transport, backoff_s=0.1, max_backoff_s=0.4)
    loops = [DeliveryLoop(deliverer, interval_s=0.05), DeliveryLoop(replica, interval_s=0.05)]
    for loop in loops:
        loop.start()
    try:
        time.sleep(1.5)  # the loop keeps retrying against a closed port
        assert collector.received == []
        assert store.pending_count() == 40
        collector.start()
        deadline = time.monotonic() + 20
        while store.pending_count() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # any duplicate would arrive now
    finally:
        for loop in loops:
            loop.stop()
        transport.close()
        replica_transport.close()
        replica_engine.dispose()
    assert store.pending_count() == 0
    received = [(e["run"]["runId"], e["eventType"], e["eventTime"]) for e in collector.received]
    assert len(received) == len(set(received)) == 40
    assert received == [(e["run"]["runId"], e["eventType"], e["eventTime"]) for e in events]  # in queue order
    attempts = [row["attempts"] for row in store.events_of(run_id)]
    assert attempts[0] > 1 and all(a >= 1 for a in attempts)


def test_the_migrated_schema_matches_the_store_tables(new_database: Callable[[], str]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from services.lineage import store

    engine = create_warehouse_engine(new_database(), pool_size=1)
    try:
        assert migrate(engine, "lineage") == "0001"
        assert migrate(engine, "lineage") == "0001"
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_schemas": True, "version_table_schema": store.SCHEMA}
            )
            differences = compare_metadata(context, store.metadata)
    finally:
        engine.dispose()
    assert differences == []
