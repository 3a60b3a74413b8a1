"""The planner service's routes: start, list, inspect, cancel and resume runs, and stream their dbt logs.

Routes parse the request, call the planner off the event loop and map its runs; errors are `CdmeError`s that
the shared scaffolding turns into problem documents (409 names the active run's id in its detail).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Engine

from services.core.errors import UpstreamServiceError
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
from services.planner.domain.model import TERMINAL, Run, RunRequest, RunStatus, StepName, StepStatus
from services.planner.domain.planner import LINT_LOG, Planner, planner_from_settings
from services.planner.runtimes.local import log_file

# -- schemas ----------------------------------------------------------------------------------------------------


class StepView(BaseModel):
    """One step of a run."""

    step: StepName
    status: StepStatus
    attempt: int = Field(description="How many times the step was started (more than 1 after a resume).")
    started_at: datetime | None
    ended_at: datetime | None
    duration_seconds: float | None
    error: str | None = Field(description="Why the step failed (one line).")
    output: dict[str, Any] = Field(description="What the step produced (report id, counts, ledger, ...).")


class RunView(BaseModel):
    """A run: what was asked, where it stands, each step, and links to what the peers recorded."""

    id: uuid.UUID
    status: RunStatus
    reason: str | None = Field(description="Why the run failed or was cancelled (one line).")
    failed_step: StepName | None
    request: RunRequest
    principal: str
    created_at: datetime
    ended_at: datetime | None
    cancel_requested: bool
    steps: list[StepView]
    links: dict[str, str] = Field(
        description="validation_report, ledger, proof, events, lineage (peer URLs), logs (this service)."
    )


class RunPage(BaseModel):
    """A page of runs, newest first."""

    runs: list[RunView]
    total: int
    limit: int
    offset: int


# -- dependencies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerState:
    """The planner service's own state: the planner and its workers."""

    planner: Planner


@asynccontextmanager
async def open_state(
    settings: CdmeSettings, engine: Engine, metrics: ServiceMetrics
) -> AsyncIterator[PlannerState]:
    """The planner, opened once `cdme_planner` is migrated; unfinished runs resume, workers stop at shutdown."""
    metrics.database_gauges(
        engine,
        [
            DatabaseGauge(
                "step_seconds_sum",
                "Total duration of finished run steps, by step and status.",
                ("step", "status"),
                "select step, status, sum(extract(epoch from ended_at - started_at)) from cdme_planner.steps"
                " where ended_at is not null and started_at is not null group by step, status",
            ),
            DatabaseGauge(
                "steps_finished",
                "Finished run steps, by step and status.",
                ("step", "status"),
                "select step, status, count(*) from cdme_planner.steps"
                " where ended_at is not null group by step, status",
            ),
            DatabaseGauge(
                "runs",
                "Runs, by status.",
                ("status",),
                "select status, count(*) from cdme_planner.runs group by status",
            ),
        ],
    )
    planner = await run_in_threadpool(planner_from_settings, settings, engine)
    await run_in_threadpool(planner.resume_unfinished)
    try:
        yield PlannerState(planner)
    finally:
        await run_in_threadpool(planner.shutdown)


def peers_ready(context: ServiceContext[Any]) -> None:
    """Readiness of the three peers (validation, adjoint, lineage): each must answer its `/readyz`.

    Raises:
        UpstreamServiceError: A peer is not ready; the message names it and why.
    """
    state = context.state
    if not isinstance(state, PlannerState):
        return
    states = state.planner.config.peers.ready()
    failing = {name: why for name, why in states.items() if why != "ready"}
    if failing:
        msg = "; ".join(f"{name} not ready: {why}" for name, why in failing.items())
        raise UpstreamServiceError(msg)


Context = ServiceContext[PlannerState]
ContextDep = Annotated[Context, Depends(context_dependency(PlannerState))]


def _view(run: Run, context: Context, request: Request) -> RunView:
    settings = context.settings
    links: dict[str, str] = {"logs": str(request.url_for("run_logs", run_id=str(run.id)))}
    report_id = run.step("validate").output.get("report_id")
    if report_id:
        links["validation_report"] = f"{settings.validation_url.rstrip('/')}/reports/{report_id}"
    if run.step("finalize").status in {"succeeded", "failed"} and run.step("finalize").output:
        base = f"{settings.lineage_url.rstrip('/')}/runs/{run.id}"
        links |= {
            "ledger": f"{base}/ledger",
            "proof": f"{base}/proof",
            "events": f"{base}/events",
            "lineage": f"{base}/lineage",
        }
    return RunView(
        id=run.id,
        status=run.status,
        reason=run.reason,
        failed_step=run.failed_step,
        request=run.request,
        principal=run.principal,
        created_at=run.created_at,
        ended_at=run.ended_at,
        cancel_requested=run.cancel_requested,
        steps=[
            StepView(
                step=s.name,
                status=s.status,
                attempt=s.attempt,
                started_at=s.started_at,
                ended_at=s.ended_at,
                duration_seconds=s.seconds,
                error=s.error,
                output=s.output,
            )
            for s in run.steps
        ],
        links=links,
    )


# -- runs -------------------------------------------------------------------------------------------------------

router = APIRouter(tags=["runs"], responses=problem_responses())


@router.post("/runs", status_code=202, responses=problem_responses(409, 503))
async def create_run(
    body: RunRequest, principal: PrincipalDep, context: ContextDep, request: Request, response: Response
) -> RunView:
    """Start a run of the project for an epoch: ingest? -> validate -> dbt build -> capture -> finalize.

    The run executes in the background; poll `GET /runs/{id}` (the `Location` header) or stream
    `GET /runs/{id}/logs`. Only one run per (project, target, epoch) may be active: another request for the same
    key is a 409 whose detail names the active run's id. A `gating` run (the default) whose validation is
    rejected stops before dbt; an `advisory` one carries on. A `dry_run` stops after validation and cost
    estimation and writes nothing to the warehouse.
    """
    refuse_nul(body)
    run = await run_in_threadpool(context.state.planner.submit, principal.name, body)
    response.headers["Location"] = request.url_for("get_run", run_id=str(run.id)).path
    return _view(run, context, request)


@router.get("/runs")
async def list_runs(
    _principal: PrincipalDep,
    context: ContextDep,
    request: Request,
    status: Annotated[RunStatus | None, Query(description="Only runs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> RunPage:
    """Runs, newest first, a page at a time."""
    runs, total = await run_in_threadpool(
        context.state.planner.store.list_runs, status=status, limit=limit, offset=offset
    )
    return RunPage(runs=[_view(r, context, request) for r in runs], total=total, limit=limit, offset=offset)


@router.get("/runs/{run_id}", responses=problem_responses(404))
async def get_run(
    run_id: uuid.UUID, _principal: PrincipalDep, context: ContextDep, request: Request
) -> RunView:
    """A run with each step's status, start, end and duration, and links to what the peers recorded."""
    run = await run_in_threadpool(context.state.planner.get, run_id)
    return _view(run, context, request)


@router.post("/runs/{run_id}/cancel", status_code=202, responses=problem_responses(404, 409))
async def cancel_run(
    run_id: uuid.UUID, _principal: PrincipalDep, context: ContextDep, request: Request
) -> RunView:
    """Cancel an active run: dbt is stopped and the remaining steps do not run (409 if it has ended)."""
    run = await run_in_threadpool(context.state.planner.cancel, run_id)
    return _view(run, context, request)


@router.post("/runs/{run_id}/resume", status_code=202, responses=problem_responses(404, 409))
async def resume_run(
    run_id: uuid.UUID, _principal: PrincipalDep, context: ContextDep, request: Request
) -> RunView:
    """Continue a failed, cancelled or interrupted run from its first unfinished step.

    Steps that succeeded are not repeated; the steps are idempotent, so a resumed run ends as an uninterrupted
    one would. 409 if the run is complete, executing, or another run of its key is active.
    """
    run = await run_in_threadpool(context.state.planner.resume, run_id)
    return _view(run, context, request)


# How often the log stream looks for new lines while the run is active.
_POLL_S = 0.25


@router.get(
    "/runs/{run_id}/logs",
    response_class=StreamingResponse,
    responses=problem_responses(404)
    | {
        200: {
            "content": {"text/event-stream": {}},
            "description": "dbt's JSON log lines (and SQL lint findings) as events.",
        }
    },
)
async def run_logs(
    run_id: uuid.UUID,
    _principal: PrincipalDep,
    context: ContextDep,
    follow: Annotated[bool, Query(description="Keep streaming until the run ends.")] = True,
) -> StreamingResponse:
    """Dbt's structured log lines of the run as server-sent events (`event: dbt`, one JSON line per event).

    The compile's lines come first, then the SQL lint findings when the planner lints (`event: lint`, one
    finding each: file, line, position, code, description), then the build's. With `follow` the stream stays open while the run is
    active and ends with an `end` event carrying the run's final status.
    """
    planner = context.state.planner
    await run_in_threadpool(planner.get, run_id)  # 404 before the stream starts
    run_dir = planner.config.runs_dir / str(run_id)
    return StreamingResponse(
        _log_events(planner, run_id, run_dir, follow),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _log_events(planner: Planner, run_id: uuid.UUID, run_dir: Path, follow: bool) -> AsyncIterator[str]:
    # In the order the steps write them: the validate step's compile and SQL lint, then the dbt step's build.
    files = {
        run_dir / log_file("compile"): "dbt",
        run_dir / LINT_LOG: "lint",
        run_dir / log_file("build"): "dbt",
    }
    offsets = dict.fromkeys(files, 0)
    while True:
        run = await run_in_threadpool(planner.get, run_id)
        ended = run.status in TERMINAL or not follow
        for path, event in files.items():
            lines, offsets[path] = await run_in_threadpool(_read_from, path, offsets[path])
            for line in lines:
                yield f"event: {event}\ndata: {line}\n\n"
        if ended:
            yield f"event: end\ndata: {json.dumps({'status': run.status, 'reason': run.reason})}\n\n"
            return
        await asyncio.sleep(_POLL_S)


def _read_from(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines of `path` after byte `offset`, and the offset after the last complete one."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    chunk = data[: end + 1].decode("utf-8", errors="replace")
    return [line for line in chunk.splitlines() if line.strip()], offset + end + 1
