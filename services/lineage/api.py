"""The lineage service's routes: finalize a run; read its ledger, events, lineage and proof; query lineage.

`POST /runs/{run_id}/finalize` (idempotent), body
`{"epoch", "artifact_dir", "dbt": {"status": "success"|"error", "error"}, "validation_report_id", "trace",
"project", "target"}` -> `{"run_id", "status": "COMPLETE"|"FAILED", "reason", "ledger": {"status", "path",
...counts}, "events"}`. It fetches `GET {CDME_ADJOINT_URL}/runs/{run_id}/partitions` with `CDME_SERVICE_TOKEN`;
when dbt failed and the adjoint has no partitions (or cannot be reached), the run is still recorded FAILED with
its FAIL events. Every route needs a bearer token.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine

from services.core.errors import NotFoundError, UpstreamServiceError, UsageError
from services.core.http import ServiceClient
from services.core.settings import CdmeSettings
from services.core.webapp import (
    MAX_OFFSET,
    DatabaseGauge,
    PrincipalDep,
    ServiceContext,
    ServiceMetrics,
    context_dependency,
    problem_responses,
    refuse_nul,
)
from services.lineage.delivery import Deliverer, DeliveryLoop, transport_from_settings
from services.lineage.domain.partitions import Partitions
from services.lineage.finalize import FinalizeInput, Finalizer, adjoint_fetcher, upstream_columns
from services.lineage.store import LineageStore, RunRecord

# -- schemas ----------------------------------------------------------------------------------------------------


class DbtOutcome(BaseModel):
    """How dbt ended."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["success", "error"]
    error: str | None = Field(
        default=None, max_length=10_000, description="dbt's one-line error, when it failed."
    )


class TraceStep(BaseModel):
    """One step of the planner's execution of the run."""

    model_config = ConfigDict(extra="allow")

    step: str = Field(max_length=200)
    status: str = Field(max_length=100)
    started_at: str | None = None
    ended_at: str | None = None


class FinalizeRequest(BaseModel):
    """What the planner knows about a run once dbt and capture are done."""

    model_config = ConfigDict(extra="forbid")

    epoch: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$")
    artifact_dir: str = Field(min_length=1, max_length=4096, description="`<runs_dir>/<run_id>`, absolute.")
    dbt: DbtOutcome
    validation_report_id: uuid.UUID | None = None
    trace: list[TraceStep] = Field(default_factory=list, max_length=1000)
    project: str | None = Field(default=None, max_length=200)
    target: str | None = Field(default=None, max_length=200)


class LedgerSummary(BaseModel):
    """The ledger's status, where it is written, and its totals."""

    model_config = ConfigDict(extra="allow")

    status: Literal["BALANCED", "UNBALANCED"]
    path: str


class FinalizeResponse(BaseModel):
    """The gate's decision."""

    run_id: str
    status: Literal["COMPLETE", "FAILED"]
    reason: str | None
    ledger: LedgerSummary | None
    events: int


class RunSummary(BaseModel):
    """A recorded run."""

    run_id: str
    epoch: str | None
    project: str | None
    target: str | None
    status: str
    reason: str | None
    dbt_status: str
    created_at: str | None


class RunPage(BaseModel):
    """A page of runs, newest first."""

    runs: list[RunSummary]
    total: int
    limit: int
    offset: int
    next_offset: int | None


# -- state ------------------------------------------------------------------------------------------------------


@dataclass
class LineageState:
    """The lineage service's state: store, finalizer, delivery loop, telemetry metrics."""

    store: LineageStore
    finalizer: Finalizer
    deliverer: Deliverer
    settings: CdmeSettings
    telemetry: TelemetryMetrics


def _dataset_namespace(engine: Engine) -> str:
    url = engine.url
    return f"postgres://{url.host or 'localhost'}:{url.port or 5432}"


@asynccontextmanager
async def open_state(
    settings: CdmeSettings, engine: Engine, metrics: ServiceMetrics
) -> AsyncIterator[LineageState]:
    """Open the store and the transport, and run the delivery loop while the service is up."""
    metrics.database_gauges(
        engine,
        [
            DatabaseGauge(
                "outbox_backlog",
                "OpenLineage events queued and not yet delivered.",
                (),
                "select count(*) from cdme_lineage.events where delivered_at is null",
            ),
            DatabaseGauge(
                "ledgers",
                "Ledgers written, by status (BALANCED or UNBALANCED).",
                ("status",),
                "select status, count(*) from cdme_lineage.ledgers group by status",
            ),
            DatabaseGauge(
                "runs",
                "Finalized runs, by gate status (COMPLETE or FAILED).",
                ("status",),
                "select status, count(*) from cdme_lineage.runs group by status",
            ),
        ],
    )
    store = LineageStore(engine)
    deliverer = Deliverer(store, transport_from_settings(settings))
    finalizer = Finalizer(
        settings,
        store,
        deliverer,
        fetch_partitions=adjoint_fetcher(settings),
        dataset_namespace=_dataset_namespace(engine),
    )
    state = LineageState(store, finalizer, deliverer, settings, TelemetryMetrics.create(metrics))
    loop = DeliveryLoop(deliverer)
    loop.start()
    try:
        yield state
    finally:
        loop.stop()


@dataclass(frozen=True)
class TelemetryMetrics:
    """Per-morphism telemetry of the latest finalized run, and finalized runs by status."""

    rows: Gauge
    latency: Gauge
    runs: Counter

    @classmethod
    def create(cls, metrics: ServiceMetrics) -> TelemetryMetrics:
        """Register the gauges and the counter in the service's registry (once, when the service opens)."""
        return cls(
            rows=metrics.gauge(
                "morphism_rows",
                "Rows per morphism of the latest finalized run, by partition (input, output, mapped, filtered, errored).",
                ["model", "req", "partition"],
            ),
            latency=metrics.gauge(
                "morphism_latency_seconds",
                "dbt's execution time of each morphism in the latest run.",
                ["model", "req"],
            ),
            runs=metrics.counter("runs_finalized", "Runs finalized, by status.", ["status"]),
        )


Context = ServiceContext[LineageState]
ContextDep = Annotated[Context, Depends(context_dependency(LineageState))]

router = APIRouter(tags=["lineage"], responses=problem_responses())


def _run_id(run_id: str) -> str:
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        msg = f"run id must be a UUID, got {run_id[:60]!r}"
        raise UsageError(msg) from None


def _record(context: Context, run_id: str) -> RunRecord:
    record = context.state.store.run(_run_id(run_id))
    if record is None:
        msg = f"run {run_id} was never finalized"
        raise NotFoundError(msg)
    return record


@router.post("/runs/{run_id}/finalize", responses=problem_responses(502, 503))
async def finalize(
    run_id: str, body: FinalizeRequest, context: ContextDep, _principal: PrincipalDep
) -> FinalizeResponse:
    """Build the run's ledger from the adjoint's partitions, gate the run, and queue and deliver its events.

    Idempotent: a run finalized before is answered from its record.
    """
    refuse_nul(body)
    state = context.state
    request = FinalizeInput(
        run_id=_run_id(run_id),
        artifact_dir=Path(body.artifact_dir),
        dbt_succeeded=body.dbt.status == "success",
        dbt_error=body.dbt.error,
        epoch=body.epoch,
        validation_report_id=str(body.validation_report_id) if body.validation_report_id else None,
        trace=[s.model_dump() for s in body.trace],
        project=body.project,
        target=body.target,
    )
    finalizer = state.finalizer
    if not request.dbt_succeeded:
        finalizer = _forgiving(finalizer)
    result = await run_in_threadpool(finalizer.finalize, request)
    record = await run_in_threadpool(state.store.run, request.run_id)
    if record is not None:
        _observe(state, record)
    return FinalizeResponse.model_validate(result)


def _forgiving(finalizer: Finalizer) -> Finalizer:
    # dbt already failed: the run is FAILED whatever the adjoint says, so an unreachable adjoint must not stop
    # the FAILED record and its FAIL events.
    fetch = finalizer.fetch_partitions

    def fetch_or_none(run_id: str) -> Partitions | None:
        try:
            return fetch(run_id)
        except UpstreamServiceError:
            return None

    return Finalizer(
        finalizer.settings,
        finalizer.store,
        finalizer.deliverer,
        fetch_partitions=fetch_or_none,
        dataset_namespace=finalizer.dataset_namespace,
    )


def _observe(state: LineageState, record: RunRecord) -> None:
    metrics = state.telemetry
    metrics.runs.labels(record.status).inc()
    for item in record.telemetry:
        req = ",".join(item["req"])
        for partition in ("input", "output", "mapped", "filtered", "errored"):
            metrics.rows.labels(item["model"], req, partition).set(item[partition])
        if item["latency_seconds"] is not None:
            metrics.latency.labels(item["model"], req).set(item["latency_seconds"])


@router.get("/runs/{run_id}/ledger", responses=problem_responses(404))
async def get_ledger(run_id: str, context: ContextDep, _principal: PrincipalDep) -> dict[str, Any]:
    """The run's ledger (`ledger.schema.json`), as written to its artifact directory."""
    record = await run_in_threadpool(_record, context, run_id)
    stored = await run_in_threadpool(context.state.store.ledger, record.run_id)
    if stored is None:
        msg = f"run {run_id} has no ledger: {record.reason}"
        raise NotFoundError(msg)
    return {"path": stored[0], "ledger": stored[1]}


@router.get("/runs/{run_id}/events", responses=problem_responses(404))
async def get_events(
    run_id: str,
    context: ContextDep,
    _principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    """The run's OpenLineage events in queue order, each with its delivery state, a page at a time.

    `next_offset` is the offset of the next page, null on the last one.
    """
    record = await run_in_threadpool(_record, context, run_id)
    # One more than the page says whether another page follows, without counting the whole run.
    events = await run_in_threadpool(
        lambda: context.state.store.events_of(record.run_id, limit=limit + 1, offset=offset)
    )
    more = len(events) > limit
    return {
        "run_id": record.run_id,
        "events": events[:limit],
        "offset": offset,
        "next_offset": offset + limit if more else None,
    }


@router.get("/runs/{run_id}/lineage", responses=problem_responses(404))
async def get_lineage(run_id: str, context: ContextDep, _principal: PrincipalDep) -> dict[str, Any]:
    """The run's model graph (datasets and dependencies) with its column edges and their transformation types."""
    record = await run_in_threadpool(_record, context, run_id)
    return {"run_id": record.run_id, **record.lineage}


@router.get("/runs/{run_id}/proof", responses=problem_responses(404, 502))
async def get_proof(run_id: str, context: ContextDep, _principal: PrincipalDep) -> dict[str, Any]:
    """Everything an auditor needs to check the run without CDME.

    The lineage graph, the execution trace, the validation report (fetched from the validation service), the
    ledger and the versions of what produced the run.
    """
    record = await run_in_threadpool(_record, context, run_id)
    stored = await run_in_threadpool(context.state.store.ledger, record.run_id)
    report = None
    if record.validation_report_id:
        report = await run_in_threadpool(
            _validation_report, context.state.settings, record.validation_report_id
        )
    return {
        "run_id": record.run_id,
        "status": record.status,
        "reason": record.reason,
        "epoch": record.epoch,
        "versions": record.versions,
        "trace": record.trace,
        "validation_report": report,
        "ledger": stored[1] if stored else None,
        "ledger_path": stored[0] if stored else None,
        "telemetry": record.telemetry,
        "lineage": record.lineage,
    }


def _validation_report(settings: CdmeSettings, report_id: str) -> dict[str, Any]:
    token = settings.service_token.get_secret_value() if settings.service_token else None
    with ServiceClient.from_settings(settings.validation_url, settings, token=token) as client:
        document: dict[str, Any] = client.get(f"/reports/{report_id}").json()
    return document


@router.get("/lineage/columns", responses=problem_responses(404))
async def get_upstream_columns(
    context: ContextDep,
    _principal: PrincipalDep,
    dataset: Annotated[str, Query(min_length=1, max_length=400, description="`database.schema.table`.")],
    column: Annotated[str, Query(min_length=1, max_length=200)],
) -> dict[str, Any]:
    """The columns `dataset.column` derives from, transitively, per the newest run that knows the dataset."""
    graphs = await run_in_threadpool(context.state.store.latest_lineage)
    for run_id, graph in graphs:
        if any(n["dataset"] and n["dataset"].lower() == dataset.lower() for n in graph.get("nodes", [])):
            return {
                "run_id": run_id,
                "dataset": dataset,
                "column": column,
                "upstream": upstream_columns(graph, dataset, column),
            }
    msg = f"no finalized run knows the dataset {dataset[:100]!r}"
    raise NotFoundError(msg)


@router.get("/runs")
async def list_runs(
    context: ContextDep,
    _principal: PrincipalDep,
    status: Annotated[Literal["COMPLETE", "FAILED"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> RunPage:
    """Finalized runs, newest first, optionally of one status."""
    records, total = await run_in_threadpool(
        context.state.store.runs, status=status, limit=limit, offset=offset
    )
    return RunPage(
        runs=[
            RunSummary(
                run_id=r.run_id,
                epoch=r.epoch,
                project=r.project,
                target=r.target,
                status=r.status,
                reason=r.reason,
                dbt_status=r.dbt_status,
                created_at=r.created_at.isoformat() if r.created_at else None,
            )
            for r in records
        ],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
    )
