"""The validation service's routes: validate a manifest, fetch a stored report, check a proposed model.

Routes parse the request, call the domain off the event loop and map its report; errors are `CdmeError`s that
`app.py` turns into problem documents. The service validates what the request carries (a compiled manifest,
optionally the catalog and `cdme.yml`); it never runs dbt and never reads a project directory.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.concurrency import run_in_threadpool
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from services.core.artifacts import Catalog, Manifest, parse_catalog, parse_manifest
from services.core.auth import Principal
from services.core.dbt import parse_project
from services.core.errors import ArtifactError, NotFoundError, UsageError, WarehouseError, first_line
from services.core.ldm import ProjectConfig, load_ldm, parse_project_config
from services.core.ldm.config import Budget, read_project_config
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
from services.validation.domain import Finding, Report, validate_project
from services.validation.domain.cost import TableStats, estimate_costs, relations_of, warehouse_stats
from services.validation.domain.findings import CostEstimate, Plan
from services.validation.domain.paths import PathResult, validate_path
from services.validation.domain.proposal import (
    MODEL_NAME,
    ModelProperties,
    ModelProposal,
    validate_proposed_model,
)
from services.validation.store import NewReport, ReportStatus, ReportStore

# The domain keeps a per-model cache in a plain dict shared by every thread. Validation is CPU-bound Python, so
# under the GIL running one at a time costs no throughput and keeps that cache consistent.
_DOMAIN_LOCK = threading.Lock()


# -- schemas ----------------------------------------------------------------------------------------------------


class ValidateRequest(BaseModel):
    """The project to validate: a compiled manifest, or a project directory the service compiles itself.

    With the manifest come the warehouse's catalog and the project's `cdme.yml` if there are; a project
    directory brings its own `cdme.yml` (unless `config` is given).
    """

    model_config = ConfigDict(extra="forbid")

    manifest: dict[str, Any] | None = Field(
        default=None, description="`manifest.json` (schema v7-v12) written by `dbt compile`."
    )
    project_dir: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description=(
            "Instead of `manifest`: a dbt project on the service's filesystem, compiled with "
            "`dbt compile --no-populate-cache` (no warehouse needed). Only `CDME_PROJECT_DIR` and directories "
            "under `CDME_HOME` are accepted."
        ),
    )
    vars: dict[str, Any] | None = Field(
        default=None,
        description='dbt `--vars` for compiling `project_dir` (e.g. `{"epoch_date": "2026-11-20"}`).',
    )
    catalog: dict[str, Any] | None = Field(
        default=None,
        description="`catalog.json` (v1): the warehouse's own columns, the most reliable schemas.",
    )
    config: dict[str, Any] | None = Field(
        default=None, description="`cdme.yml` as JSON; without it only the SQL is checked, not declarations."
    )

    @model_validator(mode="after")
    def _one_project(self) -> ValidateRequest:
        if (self.manifest is None) == (self.project_dir is None):
            msg = "give exactly one of `manifest` (a compiled manifest.json) or `project_dir`"
            raise ValueError(msg)
        if self.vars is not None and self.project_dir is None:
            msg = "`vars` compile a `project_dir`; a compiled manifest already has its vars applied"
            raise ValueError(msg)
        return self


class MappingRequest(ValidateRequest):
    """A model proposed for the project (e.g. by an AI assistant), checked against the project's manifest."""

    name: str = Field(pattern=MODEL_NAME.pattern, description="The model's name, as `ref()` would call it.")
    sql: str = Field(min_length=1, description="The model's compiled SQL (no Jinja).")
    yaml: ModelProperties | None = Field(
        default=None,
        description="The model's dbt YAML properties as JSON: description, columns, config.meta.",
    )


class PathRequest(ValidateRequest):
    """A symbolic path to resolve over the relationships the project declares."""

    path: str = Field(
        min_length=1,
        max_length=1000,
        description="`entity.relationship[.relationship...].attribute`, e.g. `orders.customer_id.customer_name`.",
    )


class Summary(BaseModel):
    """How many findings of each kind a report holds."""

    errors: int = Field(description="Violations that reject the run.")
    warnings: int = Field(description="Violations that do not reject the run.")
    unverifiable: int = Field(description="Checks that could not be made (a schema was unknown or partial).")


class CoverageSummary(BaseModel):
    """How much of the project validation could check for real (the domain's `Coverage`, with its shares)."""

    models: int = Field(description="Models validated.")
    models_fully_resolved: int = Field(description="Models whose every relation and column could be checked.")
    column_references: int = Field(description="Column references in the models' SQL.")
    column_references_resolved: int = Field(description="Column references checked against a known schema.")
    unresolved_models: list[str] = Field(
        default_factory=list,
        description="Models with at least one column or relation that could not be checked.",
    )
    model_share: float = Field(description="Share of models whose every column reference was resolved.")
    column_share: float = Field(description="Share of column references resolved against a known schema.")


class Outcome(BaseModel):
    """The verdict of a validation and everything behind it."""

    status: ReportStatus = Field(description="`passed` without error findings, else `rejected`.")
    summary: Summary
    findings: list[Finding]
    coverage: CoverageSummary


class ValidationResult(Outcome):
    """A stored validation report, with the execution plan the adjoint service's checkpoints follow."""

    id: uuid.UUID = Field(description="Fetch the report again at `/reports/{id}`.")
    plan: Plan = Field(default_factory=Plan, description="Each model lossless or lossy, and its checkpoints.")
    costs: list[CostEstimate] = Field(
        default_factory=list,
        description="Each model's estimate, when `estimate_cost` or `budget` asked for it.",
    )


class DryRunRequest(ValidateRequest):
    """A manifest to validate and cost against the warehouse's statistics, without running anything."""

    budget: Budget | None = Field(
        default=None,
        description="Ceilings over the ones `cdme.yml` declares: max_output_rows, max_join_depth, max_intermediate_rows.",
    )


class ValidateProjectRequest(DryRunRequest):
    """A project to validate and keep the report of; costs are estimated when asked for or budgeted."""

    estimate_cost: bool = Field(
        default=False,
        description="Estimate each model's size from the warehouse's planner statistics (implied by `budget`).",
    )


class DryRunResult(Outcome):
    """What a run would meet: the findings (budget findings included), the plan, and each model's estimate."""

    plan: Plan
    costs: list[CostEstimate]


class MappingResult(Outcome):
    """The verdict on a proposed model: only findings about it, and the coverage of that one model."""

    model: str = Field(description="The dbt unique id the proposal was validated under.")


def _outcome(report: Report) -> Outcome:
    coverage = report.coverage
    return Outcome(
        status="rejected" if report.errors else "passed",
        summary=Summary(
            errors=len(report.errors),
            warnings=len(report.warnings),
            unverifiable=sum(1 for f in report.findings if f.verdict == "UNVERIFIABLE"),
        ),
        findings=report.findings,
        coverage=CoverageSummary(
            **coverage.model_dump(), model_share=coverage.model_share, column_share=coverage.column_share
        ),
    )


# -- dependencies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationState:
    """The validation service's own state: where reports are kept, and the findings counter."""

    store: ReportStore
    findings: Counter


@asynccontextmanager
async def open_state(
    _settings: CdmeSettings, engine: Engine, metrics: ServiceMetrics
) -> AsyncIterator[ValidationState]:
    """The service's state, opened by the lifespan once `cdme_validation` is migrated."""
    findings = metrics.counter(
        "findings",
        "Findings of the validations this process stored, by rule, severity and verdict.",
        ["rule", "severity", "verdict"],
    )
    metrics.database_gauges(
        engine,
        [
            DatabaseGauge(
                "reports",
                "Stored validation reports, by status.",
                ("status",),
                "select status, count(*) from cdme_validation.reports group by status",
            )
        ],
    )
    yield ValidationState(ReportStore(engine), findings)


Context = ServiceContext[ValidationState]
ContextDep = Annotated[Context, Depends(context_dependency(ValidationState))]


# -- validation -------------------------------------------------------------------------------------------------

router = APIRouter(tags=["validation"], responses=problem_responses())


@dataclass(frozen=True)
class _Project:
    """A request's project, parsed, with the documents it came as (kept with the report)."""

    manifest: Manifest
    config: ProjectConfig | None
    catalog: Catalog | None
    documents: dict[str, Any]


def _allowed_project_dir(requested: str, settings: CdmeSettings) -> Path:
    # The path comes from the request: resolve links and `..` first, then accept only the configured project
    # or what lives under CDME_HOME (run copies), so a caller cannot make the service compile arbitrary files.
    path = Path(requested).resolve()
    allowed = [settings.project_dir.resolve(), settings.home.resolve()]
    if not any(path == root or path.is_relative_to(root) for root in allowed):
        msg = "body.project_dir: not a project this service may read; use CDME_PROJECT_DIR or a directory under CDME_HOME"
        raise UsageError(msg)
    if not (path / "dbt_project.yml").is_file():
        msg = f"body.project_dir: {path} has no dbt_project.yml"
        raise UsageError(msg)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_bytes())
    if not isinstance(document, dict):
        msg = f"{path}: expected a JSON object"
        raise ArtifactError(msg)
    return document


def _compile(body: ValidateRequest, settings: CdmeSettings) -> tuple[dict[str, Any], dict[str, Any] | None]:
    assert body.project_dir is not None  # the request's validator makes it so
    directory = _allowed_project_dir(body.project_dir, settings)
    config_file = directory / "cdme.yml"
    config = read_project_config(config_file) if body.config is None and config_file.is_file() else None
    with tempfile.TemporaryDirectory(prefix="validate-") as target:
        parse_project(
            settings,
            Path(target),
            project_dir=directory,
            dbt_vars=json.dumps(body.vars) if body.vars is not None else None,
            compile_sql=True,
        )
        return _read_json(Path(target) / "manifest.json"), config


def _parse(body: ValidateRequest, settings: CdmeSettings) -> _Project:
    refuse_nul(body)
    config_document = body.config
    if body.manifest is not None:
        manifest_document, source = body.manifest, "body.manifest"
    else:
        manifest_document, config_document = _compile(body, settings)
        config_document = body.config if body.config is not None else config_document
        source = "the compiled project's manifest.json"
    documents = {"manifest": manifest_document, "config": config_document, "catalog": body.catalog}
    return _Project(
        manifest=parse_manifest(manifest_document, source),
        config=parse_project_config(config_document, "body.config") if config_document is not None else None,
        catalog=parse_catalog(body.catalog, "body.catalog") if body.catalog is not None else None,
        documents=documents,
    )


def _checksum(document: dict[str, Any]) -> str:
    # Canonical JSON: the same manifest gets the same checksum however its keys were ordered or spaced.
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"sha256:{hashlib.sha256(canonical.encode()).hexdigest()}"


def _validate_as(
    principal: Principal,
    context: Context,
    manifest: Manifest,
    config: ProjectConfig | None,
    catalog: Catalog | None,
    *,
    stats: dict[tuple[str, str], TableStats] | None = None,
    budget: Budget | None = None,
) -> Report:
    # The project as the caller sees it (its roles), with the service's settings, one validation at a time.
    with _DOMAIN_LOCK:
        return validate_project(
            manifest,
            config=config,
            catalog=catalog,
            lineage_mode=context.settings.lineage_mode,
            principal=principal.name,
            roles=principal.roles,
            stats=stats,
            budget=budget,
        )


def _validate_and_store(
    body: ValidateProjectRequest, principal: Principal, context: Context
) -> ValidationResult:
    project = _parse(body, context.settings)
    costed = body.estimate_cost or body.budget is not None
    report = _validate_as(
        principal,
        context,
        project.manifest,
        project.config,
        project.catalog,
        stats=_statistics(context, project.manifest) if costed else None,
        budget=body.budget,
    )
    outcome = _outcome(report)
    for finding in report.findings:
        context.state.findings.labels(finding.rule, finding.severity, finding.verdict).inc()
    report_id = context.state.store.save(
        NewReport(
            principal=principal.name,
            project=project.manifest.metadata.project_name,
            manifest_checksum=_checksum(project.documents["manifest"]),
            status=outcome.status,
            errors=outcome.summary.errors,
            warnings=outcome.summary.warnings,
            report=outcome.model_dump(mode="json", exclude={"status"})
            | {
                "plan": report.plan.model_dump(mode="json"),
                "costs": [c.model_dump(mode="json") for c in report.costs],
            },
            artifacts=project.documents,
        )
    )
    return ValidationResult(id=report_id, plan=report.plan, costs=report.costs, **outcome.model_dump())


@router.post("/validate", status_code=201)
async def validate(
    body: ValidateProjectRequest,
    principal: PrincipalDep,
    context: ContextDep,
    request: Request,
    response: Response,
) -> ValidationResult:
    """Validate a compiled dbt manifest before dbt runs, and store the report.

    The body carries the artifacts themselves: `manifest` (a compiled `manifest.json`), optionally `catalog`
    and `config` (`cdme.yml` as JSON); or `project_dir` (with `vars`), a project on the service's filesystem
    that it compiles without a warehouse and whose `cdme.yml` it reads. With `estimate_cost` or a `budget`,
    each model's size is estimated from the warehouse's planner statistics and checked against the budgets
    (`cdme.yml`'s, then the request's). The answer is `passed` when no finding is an error, `rejected`
    otherwise; every finding names its rule, the model and, where known, the line. The project is validated as
    the caller: with `config`, models whose `meta.cdme.access` the token's roles do not hold do not exist for
    it. The report is kept and can be fetched again at `/reports/{id}` (the `Location` header).
    """
    result = await run_in_threadpool(_validate_and_store, body, principal, context)
    response.headers["Location"] = request.url_for("get_report", report_id=str(result.id)).path
    return result


@router.get("/reports/{report_id}", responses=problem_responses(404))
async def get_report(report_id: uuid.UUID, _principal: PrincipalDep, context: ContextDep) -> ValidationResult:
    """A report stored by an earlier `POST /validate`."""
    stored = await run_in_threadpool(context.state.store.get, report_id)
    if stored is None:
        raise HTTPException(status_code=404, detail=f"no validation report has id {report_id}")
    return ValidationResult(id=stored.id, status=stored.status, **stored.report)


def _validate_proposal(body: MappingRequest, principal: Principal, context: Context) -> MappingResult:
    project = _parse(body, context.settings)
    manifest, config, catalog = project.manifest, project.config, project.catalog
    proposal = ModelProposal(name=body.name, sql=body.sql, properties=body.yaml or ModelProperties())
    with _DOMAIN_LOCK:
        checked = validate_proposed_model(
            manifest,
            proposal,
            config=config,
            catalog=catalog,
            lineage_mode=context.settings.lineage_mode,
            principal=principal.name,
            roles=principal.roles,
        )
    return MappingResult(model=checked.unique_id, **_outcome(checked.report).model_dump())


@router.post("/validate/mapping")
async def validate_mapping(
    body: MappingRequest, principal: PrincipalDep, context: ContextDep
) -> MappingResult:
    """Check a proposed model as if it were already part of the project; nothing is stored.

    The model (`name`, its compiled `sql`, and optionally its dbt YAML properties in `yaml`) is added to a copy
    of the manifest the way dbt would place it: in the project's package and most used schema, depending on
    every relation of the project its SQL reads. The whole project is then validated and only the findings
    about the proposed model are returned, with the coverage of that one model. A model of the same name is
    replaced, so a change to an existing model is checked in place. As for `/validate`, relations the caller's
    roles do not allow do not exist for the proposal.
    """
    return await run_in_threadpool(_validate_proposal, body, principal, context)


def _resolve_path(body: PathRequest, principal: Principal, context: Context) -> PathResult:
    project = _parse(body, context.settings)
    manifest, config, catalog = project.manifest, project.config, project.catalog
    ldm = load_ldm(manifest, config, catalog, lineage_mode=context.settings.lineage_mode) if config else None
    with _DOMAIN_LOCK:
        return validate_path(
            manifest, body.path, catalog=catalog, ldm=ldm, principal=principal.name, roles=principal.roles
        )


@router.post("/validate/path")
async def validate_symbolic_path(
    body: PathRequest, principal: PrincipalDep, context: ContextDep
) -> PathResult:
    """Resolve a symbolic path `entity.relationship.attribute` over the project's declared relationships.

    Relationships are the ones dbt declares: `relationships` tests and foreign-key constraints. Each middle
    segment names a relationship by its foreign-key column or by the entity it leads to; the last segment is
    an attribute of the entity reached, checked against the columns validation resolves for it. With `config`,
    entities the caller's roles do not allow do not exist for the path. Nothing is stored; a broken path is
    `valid: false` with a finding naming the step.
    """
    return await run_in_threadpool(_resolve_path, body, principal, context)


def _statistics(context: Context, manifest: Manifest) -> dict[tuple[str, str], TableStats]:
    try:
        with context.engine.connect() as conn:
            # Planner statistics only (pg_class, pg_stats): estimating reads the catalog and writes nothing.
            driver = conn.connection.driver_connection
            if not isinstance(driver, psycopg.Connection):
                msg = "the warehouse is not reached through psycopg 3; cost estimation reads PostgreSQL's catalog"
                raise WarehouseError(msg)
            return warehouse_stats(driver, relations_of(manifest))
    except (SQLAlchemyError, psycopg.Error) as e:
        msg = f"the warehouse's statistics could not be read: {first_line(e)}"
        raise WarehouseError(msg) from e


def _dry_run(body: DryRunRequest, principal: Principal, context: Context) -> DryRunResult:
    project = _parse(body, context.settings)
    manifest, config, catalog = project.manifest, project.config, project.catalog
    stats = _statistics(context, manifest)
    report = _validate_as(principal, context, manifest, config, catalog, stats=stats, budget=body.budget)
    return DryRunResult(**_outcome(report).model_dump(), plan=report.plan, costs=report.costs)


@router.post("/dry-run", responses=problem_responses(503))
async def dry_run(body: DryRunRequest, principal: PrincipalDep, context: ContextDep) -> DryRunResult:
    """Validate a compiled manifest and estimate what running it would cost; nothing is stored or run.

    Each model's output rows, largest intermediate step and join depth are estimated from the warehouse's
    planner statistics (`pg_class.reltuples`, `pg_stats.n_distinct`) and checked against the budgets of
    `cdme.yml` and `budget`; an estimate over budget is a `cost` finding stating estimate and budget. The plan
    classifies every model lossless or lossy, with the checkpoints the adjoint service would take.
    """
    return await run_in_threadpool(_dry_run, body, principal, context)


class CostEstimateResult(BaseModel):
    """One model's estimated size now, from the warehouse's statistics, against its budget."""

    report_id: uuid.UUID = Field(description="The stored report whose manifest and `cdme.yml` were used.")
    estimate: CostEstimate
    budget: Budget = Field(
        description="The budget that applies: `cdme.yml`'s for the model, then the query's."
    )
    within_budget: bool
    findings: list[Finding] = Field(description="A `cost` finding per budget the estimate exceeds.")


def _cost_estimate(
    model: str, report_id: uuid.UUID | None, override: Budget, principal: Principal, context: Context
) -> CostEstimateResult:
    stored = context.state.store.artifacts(report_id)
    if stored is None:
        which = f"report {report_id}" if report_id is not None else "any report"
        msg = f"no manifest to estimate from: {which} was not stored with its artifacts; POST /validate first"
        raise NotFoundError(msg)
    found_id, documents = stored
    manifest = parse_manifest(documents["manifest"], f"report {found_id}")
    config_document = documents.get("config")
    config = parse_project_config(config_document, f"report {found_id}") if config_document else None
    ldm = load_ldm(manifest, config, lineage_mode=context.settings.lineage_mode) if config else None
    entity = ldm.entities.get(model) if ldm is not None else None
    # A model the caller may not see is reported exactly like one that does not exist.
    hidden = entity is not None and not entity.visible_to(set(principal.roles))
    if hidden or not any(n.name == model for n in manifest.models()):
        msg = f"model `{model}` is not in the project of report {found_id}"
        raise NotFoundError(msg)
    with _DOMAIN_LOCK:
        estimates, findings = estimate_costs(manifest, _statistics(context, manifest), config, override)
    estimate = next((e for e in estimates if e.model == model), None)
    if estimate is None:
        msg = f"model `{model}` has no compiled SQL in report {found_id}; validate a compiled manifest"
        raise NotFoundError(msg)
    budget = config.budgets.for_model(model) if config is not None else Budget()
    budget = budget.model_copy(update=override.model_dump(exclude_none=True))
    own = [f for f in findings if f.model == model]
    return CostEstimateResult(
        report_id=found_id, estimate=estimate, budget=budget, within_budget=not own, findings=own
    )


@router.get("/cost-estimate/{model}", responses=problem_responses(404, 503))
async def cost_estimate(
    model: Annotated[str, FastApiPath(pattern=MODEL_NAME.pattern, max_length=256)],
    principal: PrincipalDep,
    context: ContextDep,
    report_id: uuid.UUID | None = None,
    max_output_rows: Annotated[int | None, Query(gt=0)] = None,
    max_intermediate_rows: Annotated[int | None, Query(gt=0)] = None,
    max_join_depth: Annotated[int | None, Query(gt=0)] = None,
) -> CostEstimateResult:
    """Estimate one model's output rows, largest intermediate step and join depth from the warehouse's statistics.

    The project is the one a stored report was made from (`report_id`, default the newest report): its manifest
    and `cdme.yml` are kept with the report. Statistics are read now (`pg_class.reltuples`,
    `pg_stats.n_distinct`, join fan-out), upstream models estimated first. The budget is `cdme.yml`'s for the
    model, overridden by the `max_*` query parameters; each excess is a `cost` finding stating estimate and
    budget. A model the caller's roles do not allow is unknown, as if it did not exist.
    """
    override = Budget(
        max_output_rows=max_output_rows,
        max_intermediate_rows=max_intermediate_rows,
        max_join_depth=max_join_depth,
    )
    return await run_in_threadpool(_cost_estimate, model, report_id, override, principal, context)
