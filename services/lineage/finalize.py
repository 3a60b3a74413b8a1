"""Finalize a run: fetch its partitions, build and write the ledger, gate it, queue and deliver its events.

This is the body of `POST /runs/{run_id}/finalize`, in plain Python. It is idempotent: a run already recorded
is answered from the record, never finalized twice.

Examples:
    >>> finalizer = Finalizer(settings, store, deliverer, fetch_partitions=adjoint_fetcher(settings))
    >>> finalizer.finalize(FinalizeInput(run_id=..., artifact_dir=Path(...), dbt_succeeded=True, ...))["status"]
    'COMPLETE'
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from services.core.artifacts import (
    Catalog,
    Manifest,
    RunResults,
    load_catalog,
    load_manifest,
    load_run_results,
)
from services.core.errors import UpstreamServiceError, UsageError
from services.core.http import ServiceClient, UpstreamHttpError
from services.core.settings import CdmeSettings
from services.lineage.delivery import Deliverer
from services.lineage.domain.columns import ModelLineage, project_column_lineage
from services.lineage.domain.events import RunContext, build_events
from services.lineage.domain.ledger import build_ledger, gate, write_json_atomically
from services.lineage.domain.partitions import Partitions, parse_partitions
from services.lineage.domain.versions import collect_versions
from services.lineage.store import LineageStore, RunRecord
from services.validation.domain.analysis import project_schemas

PartitionsFetcher = Callable[[str], Partitions | None]


@dataclass(frozen=True)
class FinalizeInput:
    """What the planner tells the lineage service about a run it executed."""

    run_id: str
    artifact_dir: Path
    dbt_succeeded: bool
    dbt_error: str | None = None
    epoch: str | None = None
    validation_report_id: str | None = None
    trace: list[dict[str, Any]] = field(default_factory=list)
    project: str | None = None
    target: str | None = None


def adjoint_fetcher(settings: CdmeSettings) -> PartitionsFetcher:
    """Fetch `GET {adjoint}/runs/{run_id}/partitions` with the service token; None when the run was never captured.

    Raises (from the fetcher):
        UpstreamServiceError: The adjoint service failed, could not be reached, or answered a malformed document.
    """
    token = settings.service_token.get_secret_value() if settings.service_token else None

    def fetch(run_id: str) -> Partitions | None:
        with ServiceClient.from_settings(settings.adjoint_url, settings, token=token) as client:
            try:
                response = client.get(f"/runs/{run_id}/partitions")
            except UpstreamHttpError as e:
                if e.status == 404:
                    return None
                raise
            return parse_partitions(response.json())

    return fetch


def normalise(run_id: str) -> str:
    """A run id in canonical UUID form (so `0193...` and `0193...` in upper case compare equal)."""
    try:
        return str(uuid.UUID(run_id))
    except ValueError:
        return run_id


def _load_optional(path: Path, loader: Callable[[Path], Any]) -> Any:
    return loader(path) if path.exists() else None


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def lineage_graph(
    manifest: Manifest | None, column_lineage: dict[str, ModelLineage], dataset_namespace: str
) -> dict[str, Any]:
    """The run's model graph (data nodes and their dependencies) with the column edges of each model."""
    if manifest is None:
        return {"namespace": dataset_namespace, "nodes": [], "edges": [], "columns": []}

    def name(uid: str) -> str | None:
        node = manifest.nodes.get(uid) or manifest.sources.get(uid)
        if node is None or (node.relation_name is None and node.resource_type != "source"):
            return None
        identifier = getattr(node, "identifier", None) if node.resource_type == "source" else None
        identifier = identifier or getattr(node, "alias", None) or node.name
        return ".".join(p for p in (node.database, node.schema_, identifier) if p)

    nodes = [
        {"unique_id": n.unique_id, "dataset": name(n.unique_id), "resource_type": n.resource_type}
        for n in manifest.entities()
        if name(n.unique_id)
    ]
    edges = [
        {"from": upstream, "to": n.unique_id}
        for n in manifest.nodes.values()
        if n.resource_type in {"model", "snapshot"}
        for upstream in dict.fromkeys(n.depends_on.nodes)
        if name(upstream)
    ]
    columns = []
    for uid, lineage in column_lineage.items():
        target = name(uid)
        if target is None:
            continue
        for column, inputs in lineage.fields.items():
            columns += [
                {
                    "dataset": target,
                    "column": column,
                    "input_dataset": name(e.unique_id),
                    "input_column": e.column,
                    "type": e.type,
                    "subtype": e.subtype,
                    "masking": e.masking,
                }
                for e in inputs
                if name(e.unique_id)
            ]
    return {"namespace": dataset_namespace, "nodes": nodes, "edges": edges, "columns": columns}


def upstream_columns(graph: dict[str, Any], dataset: str, column: str) -> list[dict[str, Any]]:
    """Every column `dataset.column` derives from, transitively, with its distance and the subtypes on the way.

    Args:
        graph: A run's lineage graph (`lineage_graph`).
        dataset: The dataset's name (`database.schema.table`).
        column: The column's name.

    Returns:
        One entry per upstream column, nearest first.
    """
    by_target: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for edge in graph.get("columns", []):
        by_target.setdefault((edge["dataset"].lower(), edge["column"].lower()), []).append(edge)
    found: dict[tuple[str, str], dict[str, Any]] = {}
    frontier = [(dataset.lower(), column.lower())]
    depth = 0
    while frontier:
        depth += 1
        following = []
        for key in frontier:
            for edge in by_target.get(key, []):
                upstream = (edge["input_dataset"].lower(), edge["input_column"].lower())
                if upstream in found or upstream == (dataset.lower(), column.lower()):
                    continue
                found[upstream] = {
                    "dataset": edge["input_dataset"],
                    "column": edge["input_column"],
                    "depth": depth,
                    "via": f"{edge['dataset']}.{edge['column']}",
                    "subtype": edge["subtype"],
                    "masking": edge["masking"],
                }
                following.append(upstream)
        frontier = following
    return sorted(found.values(), key=lambda e: (e["depth"], e["dataset"], e["column"]))


class Finalizer:
    """Finalizes runs against one store, transport and adjoint service."""

    def __init__(
        self,
        settings: CdmeSettings,
        store: LineageStore,
        deliverer: Deliverer,
        *,
        fetch_partitions: PartitionsFetcher,
        dataset_namespace: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.deliverer = deliverer
        self.fetch_partitions = fetch_partitions
        self.dataset_namespace = dataset_namespace

    def _artifact_dir(self, given: Path) -> Path:
        root = self.settings.run_artifacts_root.resolve()
        resolved = given.resolve()
        if not given.is_absolute() or not resolved.is_relative_to(root):
            msg = f"artifact_dir must be an absolute path inside the runs directory {root}"
            raise UsageError(msg)
        if not resolved.is_dir():
            msg = f"artifact_dir {resolved} does not exist"
            raise UsageError(msg)
        return resolved

    def response(self, record: RunRecord) -> dict[str, Any]:
        """The finalize answer for a recorded run."""
        stored = self.store.ledger(record.run_id)
        ledger: dict[str, Any] | None = None
        if stored is not None:
            path, document = stored
            ledger = {"status": document["status"], "path": path, **document["totals"]}
        return {
            "run_id": record.run_id,
            "status": record.status,
            "reason": record.reason,
            "ledger": ledger,
            "events": len(self.store.events_of(record.run_id)),
        }

    def finalize(self, request: FinalizeInput) -> dict[str, Any]:
        """Finalize one run (see the module docstring); answered from the record if it was finalized before.

        Raises:
            UsageError: The artifact directory is not inside the runs directory, or is missing.
            ArtifactError: An artifact that exists is malformed.
            UpstreamServiceError: The adjoint service failed (the run is left unfinalized, to be retried).
        """
        existing = self.store.run(request.run_id)
        if existing is not None:
            return self.response(existing)
        directory = self._artifact_dir(request.artifact_dir)
        manifest: Manifest | None = _load_optional(directory / "manifest.json", load_manifest)
        results: RunResults | None = _load_optional(directory / "run_results.json", load_run_results)
        catalog: Catalog | None = _load_optional(directory / "catalog.json", load_catalog)
        partitions = self.fetch_partitions(request.run_id)
        if partitions is not None and normalise(partitions.run_id) != normalise(request.run_id):
            msg = f"the adjoint answered the partitions of run {partitions.run_id[:60]} for run {request.run_id}"
            raise UpstreamServiceError(msg)
        built = build_run(
            self.settings, self.dataset_namespace, request, directory, manifest, results, catalog, partitions
        )
        self.store.save_run(*built)
        # Delivery is retried by the background loop: a failure here must not change finalize's answer.
        with contextlib.suppress(Exception):
            self.deliverer.deliver_pending()
        stored = self.store.run(request.run_id)
        return self.response(stored if stored is not None else built[0])


def build_run(
    settings: CdmeSettings,
    dataset_namespace: str,
    request: FinalizeInput,
    directory: Path,
    manifest: Manifest | None,
    results: RunResults | None,
    catalog: Catalog | None,
    partitions: Partitions | None,
) -> tuple[RunRecord, dict[str, Any] | None, str | None, list[dict[str, Any]]]:
    """Everything finalize records, from artifacts and partitions already at hand (no fetch, no database).

    Returns:
        The run record, the ledger, its path and the events.
    """
    versions = collect_versions(directory, manifest, settings.project_dir)
    ledger = build_ledger(partitions, versions=versions, epoch=request.epoch) if partitions else None
    dbt_error = request.dbt_error
    if request.dbt_succeeded and results is not None:
        failed = [r for r in results.results if r.status in {"error", "fail", "runtime error"}]
        if failed:
            dbt_error = f"{failed[0].unique_id}: {failed[0].message or failed[0].status}"
    succeeded = request.dbt_succeeded and dbt_error is None
    status, reason = gate(ledger, dbt_succeeded=succeeded, dbt_error=dbt_error)
    ledger_path: str | None = None
    if ledger is not None:
        ledger["run"] = {
            "status": status,
            "reason": reason,
            "dbt_status": "success" if succeeded else "error",
        }
        ledger_path = str(directory / "ledger.json")
        write_json_atomically(Path(ledger_path), ledger)
    schemas = project_schemas(manifest, catalog=catalog, project_dir=settings.project_dir) if manifest else {}
    columns = project_column_lineage(manifest, schemas=schemas) if manifest else {}
    times = [
        t
        for step in request.trace
        for t in (_parse_time(step.get("started_at")), _parse_time(step.get("ended_at")))
        if t
    ]
    ended = max(times) if times else (results.metadata.generated_at if results else None)
    context = RunContext(
        run_id=request.run_id,
        project=request.project or (manifest.metadata.project_name if manifest else None) or "dbt",
        target=request.target or settings.dbt_target,
        job_namespace=settings.openlineage_namespace,
        dataset_namespace=dataset_namespace,
        manifest=manifest,
        run_results=results,
        catalog=catalog,
        partitions=partitions,
        ledger=ledger,
        ledger_path=ledger_path,
        status=status,
        reason=reason,
        epoch=request.epoch or (partitions.epoch if partitions else None),
        column_lineage=columns,
        schemas=schemas,
        started_at=min(times) if times else None,
        ended_at=ended,
    )
    events = build_events(context)
    record = RunRecord(
        run_id=request.run_id,
        epoch=context.epoch,
        project=context.project,
        target=context.target,
        status=status,
        reason=reason,
        dbt_status="success" if succeeded else "error",
        artifact_dir=str(directory),
        validation_report_id=request.validation_report_id,
        trace=request.trace,
        versions=versions,
        lineage=lineage_graph(manifest, columns, dataset_namespace),
        telemetry=telemetry(partitions, results, manifest),
    )
    return record, ledger, ledger_path, events


def telemetry(
    partitions: Partitions | None, results: RunResults | None, manifest: Manifest | None
) -> list[dict[str, Any]]:
    """Per morphism: input, output and error counts, latency (dbt's execution time) and REQ keys."""
    if partitions is None:
        return []
    by_id = results.by_id() if results else {}
    out = []
    for m in partitions.morphisms:
        node = manifest.nodes.get(m.unique_id) if manifest else None
        declared = node.cdme.get("req") if node is not None else None
        req = sorted(set(m.req) | ({str(r) for r in declared} if isinstance(declared, list) else set()))
        result = by_id.get(m.unique_id)
        out.append(
            {
                "model": m.model,
                "unique_id": m.unique_id,
                "req": req,
                "input": m.input,
                "mapped": m.mapped,
                "filtered": m.filtered,
                "errored": m.errored,
                "output": m.output if m.output is not None else m.mapped,
                "latency_seconds": result.execution_time if result is not None else None,
            }
        )
    return out
