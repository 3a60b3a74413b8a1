"""Persistence of validation reports in the service's schema, `cdme_validation` (plain SQLAlchemy Core).

The tables are declared here for the queries; `migrations/` creates them. `tests/integration/test_migrations.py`
checks the two agree.

Examples:
    >>> store = ReportStore(engine)
    >>> report_id = store.save(NewReport(principal="ci", project="jaffle_shop", manifest_checksum="sha256:…",
    ...                                  status="passed", errors=0, warnings=1, report={...}))
    >>> store.get(report_id).status
    'passed'
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import OperationalError

from services.core.errors import WarehouseError, first_line

SCHEMA = "cdme_validation"
ReportStatus = Literal["passed", "rejected"]

metadata = MetaData(schema=SCHEMA)

reports = Table(
    "reports",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("principal", Text, nullable=False),
    Column("project", Text, nullable=True),
    Column("manifest_checksum", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("warnings", Integer, nullable=False),
    Column("report", JSONB, nullable=False),
    # The request's manifest, cdme.yml and catalog, zlib-compressed JSON: what later estimates are made from.
    Column("artifacts", LargeBinary, nullable=True),
    CheckConstraint("status in ('passed', 'rejected')", name="reports_status_check"),
    Index("reports_created_at_idx", "created_at"),
)


@dataclass(frozen=True, kw_only=True)
class NewReport:
    """A report to store: who asked, about which manifest, the verdict, and the report itself as JSON."""

    principal: str
    project: str | None
    manifest_checksum: str
    status: ReportStatus
    errors: int
    warnings: int
    report: dict[str, Any]
    artifacts: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class StoredReport(NewReport):
    """A stored report, with the id and time the store gave it."""

    id: uuid.UUID
    created_at: datetime


class ReportStore:
    """Saves and fetches validation reports; every method is blocking (call it off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        """Use `engine`, whose database `migrate(engine, "validation")` has prepared."""
        self._engine = engine

    def save(self, new: NewReport) -> uuid.UUID:
        """Store a report and return its new id.

        Raises:
            WarehouseError: The database cannot be reached.
        """
        report_id = uuid.uuid4()
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(reports).values(
                        id=report_id,
                        principal=new.principal,
                        project=new.project,
                        manifest_checksum=new.manifest_checksum,
                        status=new.status,
                        errors=new.errors,
                        warnings=new.warnings,
                        report=new.report,
                        artifacts=_compress(new.artifacts) if new.artifacts is not None else None,
                    )
                )
        except OperationalError as e:
            msg = f"cannot store the report: {first_line(e)}"
            raise WarehouseError(msg) from e
        return report_id

    def get(self, report_id: uuid.UUID) -> StoredReport | None:
        """The report stored under `report_id`, or None if there is none.

        Raises:
            WarehouseError: The database cannot be reached.
        """
        try:
            with self._engine.connect() as conn:
                columns = [c for c in reports.c if c.name != "artifacts"]
                row = conn.execute(select(*columns).where(reports.c.id == report_id)).mappings().one_or_none()
        except OperationalError as e:
            msg = f"cannot read report {report_id}: {first_line(e)}"
            raise WarehouseError(msg) from e
        if row is None:
            return None
        return StoredReport(
            id=row["id"],
            created_at=row["created_at"],
            principal=row["principal"],
            project=row["project"],
            manifest_checksum=row["manifest_checksum"],
            status=row["status"],
            errors=row["errors"],
            warnings=row["warnings"],
            report=row["report"],
        )

    def artifacts(self, report_id: uuid.UUID | None = None) -> tuple[uuid.UUID, dict[str, Any]] | None:
        """The documents a report was made from: `report_id`'s, or the newest report's that kept them.

        Returns:
            The report's id and its `manifest`, `config` and `catalog` documents, or None if there is none.

        Raises:
            WarehouseError: The database cannot be reached.
        """
        query = select(reports.c.id, reports.c.artifacts).where(reports.c.artifacts.is_not(None))
        if report_id is not None:
            query = query.where(reports.c.id == report_id)
        query = query.order_by(reports.c.created_at.desc()).limit(1)
        try:
            with self._engine.connect() as conn:
                row = conn.execute(query).one_or_none()
        except OperationalError as e:
            msg = f"cannot read the artifacts of report {report_id or '(newest)'}: {first_line(e)}"
            raise WarehouseError(msg) from e
        if row is None:
            return None
        return row.id, json.loads(zlib.decompress(row.artifacts))


def _compress(documents: dict[str, Any]) -> bytes:
    # Manifests compress about tenfold; level 1 keeps a multi-MiB manifest's save in milliseconds.
    return zlib.compress(json.dumps(documents, separators=(",", ":")).encode(), 1)
