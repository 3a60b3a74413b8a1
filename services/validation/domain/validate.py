"""Validate a project: its declarations (the LDM) and its SQL, into one report of every finding."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.core.artifacts import Catalog, Manifest
from services.core.ldm import Ldm, LdmDeclarationError, ProjectConfig, load_ldm
from services.core.ldm.config import Budget, LineageMode
from services.validation.domain.analysis import analyze_project
from services.validation.domain.cost import TableStats, estimate_costs
from services.validation.domain.findings import Finding, Report


def validate_project(
    manifest: Manifest,
    *,
    config: ProjectConfig | None = None,
    catalog: Catalog | None = None,
    project_dir: Path | None = None,
    lineage_mode: LineageMode | None = None,
    principal: str | None = None,
    roles: frozenset[str] | None = None,
    stats: Mapping[tuple[str, str], TableStats] | None = None,
    budget: Budget | None = None,
    workers: int = 1,
) -> Report:
    """Every finding about a project, declarations first.

    Args:
        manifest: A manifest with compiled SQL.
        config: The project's `cdme.yml`; without it only the SQL is checked (a project that has not adopted
            CDME's declarations still gets existence and determinism checks).
        catalog: The warehouse's catalog, when there is one.
        project_dir: The project's directory (seed headers).
        lineage_mode: `CDME_LINEAGE_MODE`, passed to the LDM.
        principal: Who asks (named in access findings).
        roles: The principal's roles; models they do not allow do not exist for this validation.
        stats: The warehouse's planner statistics (`warehouse_stats`): given, cost is estimated and budgeted.
        budget: A budget from the request, over the ones `cdme.yml` declares.
        workers: Processes analysing independent models at once (forked; the CLI uses one per CPU, the
            service one, since forking a threaded server is unsafe).

    Returns:
        The report; `report.errors` empty means the project may run.
    """
    findings: list[Finding] = []
    ldm: Ldm | None = None
    if config is not None:
        try:
            ldm = load_ldm(manifest, config, catalog, lineage_mode=lineage_mode)
        except LdmDeclarationError as e:
            for problem in e.problems:
                rule = (
                    "lookups"
                    if problem.field == "driving" or problem.field.startswith("lookups")
                    else "declarations"
                )
                findings.append(
                    Finding.of(
                        rule, "VIOLATION", problem.entity, f"meta.cdme.{problem.field}: {problem.message}"
                    )
                )
    analysis = analyze_project(
        manifest,
        catalog=catalog,
        ldm=ldm,
        project_dir=project_dir,
        principal=principal,
        roles=roles,
        workers=workers,
    )
    report = Report(findings=findings + analysis.findings, coverage=analysis.coverage, plan=analysis.plan)
    if stats is not None:
        costs, over_budget = estimate_costs(manifest, stats, config, budget)
        report = report.model_copy(update={"costs": costs, "findings": report.findings + over_budget})
    return report
