"""Persistence of the lineage service in `cdme_lineage`: runs, ledgers and the OpenLineage events outbox.

The tables are declared here for the queries; `migrations/` creates them. A finalized run is saved in one
transaction with its ledger and its events, so the outbox never holds events of a run that is not recorded.
Events are keyed by `event_id` (run id, event type, event time): queuing the same event twice keeps one row.

Examples:
    >>> store = LineageStore(engine)
    >>> store.save_run(record, ledger, ledger_path, events)
    >>> store.pending(limit=100)[0].event_id
    '0193.../START/2026-11-20T06:00:00Z'
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.exc import OperationalError

from services.core.errors import WarehouseError, first_line
from services.lineage.domain.events import event_id

SCHEMA = "cdme_lineage"
metadata = MetaData(schema=SCHEMA)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("epoch", Text),
    Column("project", Text),
    Column("target", Text),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("dbt_status", Text, nullable=False),
    Column("artifact_dir", Text, nullable=False),
    Column("validation_report_id", Text),
    Column("trace", JSONB, nullable=False),
    Column("versions", JSONB, nullable=False),
    Column("lineage", JSONB, nullable=False),
    Column("telemetry", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("status in ('COMPLETE', 'FAILED')", name="runs_status_check"),
    Index("runs_status_created_idx", "status", "created_at"),
)

ledgers = Table(
    "ledgers",
    metadata,
    Column("run_id", Text, ForeignKey(f"{SCHEMA}.runs.run_id"), primary_key=True),
    Column("status", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("ledger", JSONB, nullable=False),
    CheckConstraint("status in ('BALANCED', 'UNBALANCED')", name="ledgers_status_check"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("run_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("job_name", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("queued_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("delivered_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("last_error", Text),
    Index("events_run_idx", "run_id", "id"),
    Index("events_pending_idx", "id", postgresql_where=text("delivered_at is null")),
)


@dataclass(frozen=True)
class RunRecord:
    """A finalized run as stored."""

    run_id: str
    epoch: str | None
    project: str | None
    target: str | None
    status: str
    reason: str | None
    dbt_status: str
    artifact_dir: str
    validation_report_id: str | None
    trace: list[dict[str, Any]]
    versions: dict[str, Any]
    lineage: dict[str, Any]
    telemetry: list[dict[str, Any]]
    created_at: datetime | None = None


@dataclass(frozen=True)
class PendingEvent:
    """An event of the outbox not yet delivered."""

    id: int
    event_id: str
    attempts: int
    payload: dict[str, Any]
    next_attempt_at: datetime


# Advisory lock key of the outbox's sender (any constant; this one spells "cdmeLNG" in ASCII).
_OUTBOX_LOCK = 0x63646D654C4E47


class LineageStore:
    """Runs, ledgers and the outbox, in `cdme_lineage`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save_run(
        self,
        record: RunRecord,
        ledger: dict[str, Any] | None,
        ledger_path: str | None,
        new_events: list[dict[str, Any]],
    ) -> bool:
        """Record a finalized run, its ledger and its events in one transaction.

        Returns:
            False when the run was already recorded (finalize is idempotent: the first record stands).

        Raises:
            WarehouseError: The database cannot be reached.
        """
        values = {k: v for k, v in record.__dict__.items() if k != "created_at"}
        try:
            with self.engine.begin() as conn:
                inserted = conn.execute(
                    insert(runs)
                    .values(**values)
                    .on_conflict_do_nothing(index_elements=["run_id"])
                    .returning(runs.c.run_id)
                ).first()
                if inserted is None:
                    return False
                if ledger is not None and ledger_path is not None:
                    conn.execute(
                        insert(ledgers).values(
                            run_id=record.run_id, status=ledger["status"], path=ledger_path, ledger=ledger
                        )
                    )
                if new_events:
                    conn.execute(
                        insert(events)
                        .values(
                            [
                                {
                                    "event_id": event_id(e),
                                    "run_id": record.run_id,
                                    "event_type": e["eventType"],
                                    "job_name": e["job"]["name"],
                                    "payload": e,
                                }
                                for e in new_events
                            ]
                        )
                        .on_conflict_do_nothing(index_elements=["event_id"])
                    )
        except OperationalError as e:
            msg = f"cannot record run {record.run_id}: {first_line(e)}"
            raise WarehouseError(msg) from e
        return True

    def run(self, run_id: str) -> RunRecord | None:
        """A recorded run, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.run_id == run_id)).mappings().first()
        return RunRecord(**dict(row)) if row is not None else None

    def runs(self, *, status: str | None, limit: int, offset: int) -> tuple[list[RunRecord], int]:
        """Recorded runs, newest first, optionally of one status, and how many there are in all."""
        query = select(runs).order_by(runs.c.created_at.desc(), runs.c.run_id.desc())
        count = select(func.count()).select_from(runs)
        if status is not None:
            query = query.where(runs.c.status == status)
            count = count.where(runs.c.status == status)
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit).offset(offset)).mappings().all()
            total = conn.execute(count).scalar_one()
        return [RunRecord(**dict(r)) for r in rows], int(total)

    def latest_lineage(self) -> list[tuple[str, dict[str, Any]]]:
        """The lineage graph of the newest run of each project, newest first."""
        query = (
            select(runs.c.run_id, runs.c.lineage)
            .distinct(runs.c.project)
            .order_by(runs.c.project, runs.c.created_at.desc())
        )
        with self.engine.connect() as conn:
            return [(r.run_id, r.lineage) for r in conn.execute(query)]

    def ledger(self, run_id: str) -> tuple[str, dict[str, Any]] | None:
        """A run's ledger path and document, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(ledgers.c.path, ledgers.c.ledger).where(ledgers.c.run_id == run_id)
            ).first()
        return (row.path, row.ledger) if row is not None else None

    def events_of(self, run_id: str, *, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """A run's events in the order they were queued, with their delivery state (a page of them if asked)."""
        query = (
            select(events.c.event_id, events.c.payload, events.c.delivered_at, events.c.attempts)
            .where(events.c.run_id == run_id)
            .order_by(events.c.id)
            .limit(limit)
            .offset(offset)
        )
        with self.engine.connect() as conn:
            return [
                {
                    "event_id": r.event_id,
                    "delivered_at": r.delivered_at.isoformat() if r.delivered_at else None,
                    "attempts": r.attempts,
                    "event": r.payload,
                }
                for r in conn.execute(query)
            ]

    def pending(self, *, limit: int) -> list[PendingEvent]:
        """Undelivered events, oldest first (each with when it may next be tried)."""
        query = (
            select(
                events.c.id, events.c.event_id, events.c.attempts, events.c.payload, events.c.next_attempt_at
            )
            .where(events.c.delivered_at.is_(None))
            .order_by(events.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                PendingEvent(r.id, r.event_id, r.attempts, r.payload, r.next_attempt_at)
                for r in conn.execute(query)
            ]

    def pending_count(self) -> int:
        """How many events wait for delivery."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(events).where(events.c.delivered_at.is_(None))
                ).scalar_one()
            )

    @contextmanager
    def delivery_lock(self) -> Iterator[bool]:
        """Hold the outbox's delivery lock for a pass, across replicas; yields False when another holds it.

        Two replicas sending the same pending row would deliver it twice: one sender at a time keeps it once.
        """
        with self.engine.connect() as conn:
            held = bool(
                conn.execute(text("select pg_try_advisory_lock(:key)"), {"key": _OUTBOX_LOCK}).scalar()
            )
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("select pg_advisory_unlock(:key)"), {"key": _OUTBOX_LOCK})
                conn.commit()

    def mark_delivered(self, row_id: int) -> None:
        """Record that the transport accepted an event."""
        with self.engine.begin() as conn:
            conn.execute(
                update(events)
                .where(events.c.id == row_id)
                .values(delivered_at=func.now(), attempts=events.c.attempts + 1, last_error=None)
            )

    def mark_failed(self, row_id: int, error: str, retry_in: timedelta) -> None:
        """Record a failed attempt and when to try again."""
        with self.engine.begin() as conn:
            conn.execute(
                update(events)
                .where(events.c.id == row_id)
                .values(
                    attempts=events.c.attempts + 1,
                    last_error=error[:1000],
                    next_attempt_at=func.now() + retry_in,
                )
            )
