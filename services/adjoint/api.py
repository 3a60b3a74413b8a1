"""The adjoint service's routes: capture a run, its accounting, backward, impact and reconciliation.

Contracts (BRIEF "Contracts between services"; every route needs a bearer token):

- `POST /runs/{run_id}/capture` `{"epoch", "lineage_mode", "manifest", "run_results"}` -> `{"run_id",
  "lineage_mode", "captured", "not_captured": [{"unique_id", "reason"}], "pairs", "seconds"}`; idempotent.
- `GET /runs/{run_id}/partitions` -> per morphism (model, driving upstream) input/mapped/filtered/errored/output,
  overlap and unaccounted keys with samples, partition locations, filter conditions with their line, REQ keys;
  per graph source the end-to-end fates of the epoch's keys; models not captured. 404 if never captured.
- `GET /backward/{model}/{key}?run_id=&to=&depth=&records=&limit=&cursor=` -> contributing records with paths.
- `POST /impact` `{"entity", "keys", "run_id"?, "depth"?}` -> downstream records per model and path.
- `POST /runs/{run_id}/reconcile` -> per morphism `exact` | `superset` | `violation` with sample keys.

Keys are `cdme-key/v1` text (`services.adjoint.domain.keys`): components joined by `|`, `%`/`|` escaped.
A principal without any of an entity's `meta.cdme.access` roles sees neither it nor anything through it.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine

from services.adjoint.domain import queries
from services.adjoint.domain.capture import capture, load_run_ldm, normalise_run_id, plan_capture
from services.core.artifacts import parse_manifest, parse_run_results
from services.core.ldm import ProjectConfig, load_project_config, parse_project_config
from services.core.settings import CdmeSettings
from services.core.webapp import (
    DatabaseGauge,
    PrincipalDep,
    ServiceContext,
    ServiceMetrics,
    context_dependency,
    problem_responses,
    refuse_nul,
)


@dataclass
class AdjointState:
    """The project's `cdme.yml` (declarations the manifest's `meta.cdme` refers to) and a capture lock."""

    config: ProjectConfig
    capture_lock: threading.Lock


@asynccontextmanager
async def open_state(
    settings: CdmeSettings, engine: Engine, metrics: ServiceMetrics
) -> AsyncIterator[AdjointState]:
    """Read the project's `cdme.yml` once for the service's life; expose what is captured as metrics."""
    queries.prefer_generic_plans(engine)
    metrics.database_gauges(
        engine,
        [
            DatabaseGauge(
                "captured_pairs",
                "Mapped pairs held for captured runs, by lineage mode.",
                ("mode",),
                "select lineage_mode, sum(pairs) from cdme_adjoint.runs group by lineage_mode",
            ),
            DatabaseGauge(
                "captured_runs",
                "Captured runs, by lineage mode.",
                ("mode",),
                "select lineage_mode, count(*) from cdme_adjoint.runs group by lineage_mode",
            ),
            DatabaseGauge(
                "last_capture_seconds",
                "How long the newest capture took, by lineage mode.",
                ("mode",),
                "select distinct on (lineage_mode) lineage_mode, seconds from cdme_adjoint.runs"
                " order by lineage_mode, captured_at desc",
            ),
        ],
    )
    yield AdjointState(load_project_config(settings.project_dir / "cdme.yml"), threading.Lock())


ContextDep = Annotated[ServiceContext[AdjointState], Depends(context_dependency(AdjointState))]
router = APIRouter(tags=["adjoint"], responses=problem_responses(401, 404, 422))

RunId = Annotated[str, Path(description="The run's id (a UUID, UUIDv7 for CDME runs).", max_length=64)]


class CaptureRequest(BaseModel):
    """A run's artifacts to capture."""

    model_config = ConfigDict(extra="forbid")

    epoch: date = Field(description="The run's business date (dbt var `epoch_date`).")
    lineage_mode: Literal["full", "key_derivable", "summary"] | None = Field(
        default=None, description="How much to store (default: cdme.yml's `defaults.lineage_mode`)."
    )
    manifest: dict[str, Any] = Field(description="The run's `manifest.json` (compiled SQL of every model).")
    run_results: dict[str, Any] = Field(
        description="The run's `run_results.json`; only `success` models count."
    )
    config: dict[str, Any] | None = Field(
        default=None, description="`cdme.yml` as JSON (default: the project's)."
    )


class NotCapturedModel(BaseModel):
    """A model of the run without adjoint metadata."""

    unique_id: str
    reason: str


class CaptureResponse(BaseModel):
    """What a capture wrote."""

    run_id: str
    lineage_mode: str
    captured: list[str]
    not_captured: list[NotCapturedModel]
    pairs: int
    seconds: float


def _capture(run_id: str, body: CaptureRequest, context: ServiceContext[AdjointState]) -> CaptureResponse:
    refuse_nul(body)
    run_id = normalise_run_id(run_id)
    config = parse_project_config(body.config) if body.config is not None else context.state.config
    mode = body.lineage_mode or context.settings.lineage_mode or config.defaults.lineage_mode
    manifest = parse_manifest(body.manifest)
    results = parse_run_results(body.run_results)
    plan = plan_capture(load_run_ldm(manifest, config, mode), manifest, results)
    # One capture at a time per process: each rewrites whole partitions and competes for the same cores.
    with context.state.capture_lock:
        result = capture(
            context.engine,
            run_id,
            body.epoch,
            mode,
            plan,
            project=manifest.metadata.project_name,
            sample_rate=config.defaults.summary_sample_rate,
        )
    return CaptureResponse(
        run_id=result.run_id,
        lineage_mode=result.lineage_mode,
        captured=result.captured,
        not_captured=[NotCapturedModel(unique_id=n.unique_id, reason=n.reason) for n in result.not_captured],
        pairs=result.pairs,
        seconds=round(result.seconds, 3),
    )


@router.post("/runs/{run_id}/capture")
async def capture_run(
    run_id: RunId, body: CaptureRequest, _principal: PrincipalDep, context: ContextDep
) -> CaptureResponse:
    """Capture the run's adjoint metadata (replacing any earlier capture of the same run atomically).

    Only models whose run result is `success` are captured; the others, and models whose SQL the rewrite
    cannot follow, are listed in `not_captured` with the reason.
    """
    return await run_in_threadpool(_capture, run_id, body, context)


@router.get("/runs/{run_id}/partitions")
async def run_partitions(run_id: RunId, principal: PrincipalDep, context: ContextDep) -> dict[str, Any]:
    """The run's accounting: per morphism and per graph source (the lineage service's ledger input).

    Morphisms through a model or upstream the caller has no role for, and such sources, are left out.
    """
    return await run_in_threadpool(queries.partitions, context.engine, run_id, principal.roles)


@router.get("/backward/{model}/{key:path}")
async def backward(
    model: Annotated[str, Path(max_length=512)],
    key: Annotated[str, Path(max_length=4096, description="The record's cdme-key/v1 key (URL-encoded).")],
    principal: PrincipalDep,
    context: ContextDep,
    run_id: Annotated[
        str | None, Query(max_length=64, description="Default: latest run of the model.")
    ] = None,
    to: Annotated[
        str | None, Query(max_length=512, description="Only this upstream (e.g. a source).")
    ] = None,
    depth: Annotated[int | None, Query(ge=1, le=queries.MAX_DEPTH)] = None,
    records: Annotated[bool, Query(description="Return the contributing rows too.")] = False,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_LIMIT)] = queries.DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """The contributing records of every upstream of `model`'s record `key`, each with its morphism path."""
    return await run_in_threadpool(
        lambda: queries.backward(
            context.engine,
            model,
            key,
            roles=principal.roles,
            run_id=run_id,
            to=to,
            depth=depth,
            records=records,
            limit=limit,
            cursor=cursor,
        )
    )


class ImpactRequest(BaseModel):
    """Source records whose downstream effect to list."""

    model_config = ConfigDict(extra="forbid")

    entity: str = Field(max_length=512, description="A model or source (`raw_trading.trades`).")
    keys: list[Annotated[str, Field(max_length=4096)]] = Field(min_length=1, max_length=100_000)
    run_id: str | None = Field(default=None, max_length=64)
    depth: int | None = Field(default=None, ge=1, le=queries.MAX_DEPTH)
    keys_per_path: int = Field(
        default=queries.DEFAULT_LIMIT,
        ge=0,
        le=queries.MAX_LIMIT,
        description="Affected keys listed per path.",
    )


@router.post("/impact")
async def impact(body: ImpactRequest, principal: PrincipalDep, context: ContextDep) -> dict[str, Any]:
    """Every downstream record the keys affect, per model and path: exact counts, up to `keys_per_path` keys."""
    refuse_nul(body)
    return await run_in_threadpool(
        lambda: queries.impact(
            context.engine,
            body.entity,
            body.keys,
            roles=principal.roles,
            run_id=body.run_id,
            depth=body.depth,
            sample=body.keys_per_path,
        )
    )


@router.post("/runs/{run_id}/reconcile")
async def reconcile(run_id: RunId, principal: PrincipalDep, context: ContextDep) -> dict[str, Any]:
    """Per morphism: exact (iso verified), superset (lossy but complete) or violation, with sample keys.

    Only the morphisms the caller may see (as in the partitions) are reconciled.
    """
    return await run_in_threadpool(queries.reconcile, context.engine, run_id, principal.roles)
