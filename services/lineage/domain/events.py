"""OpenLineage events of one CDME run, from dbt's artifacts, the adjoint's partitions and the ledger.

One parent run (job `<project>.<target>`, run id = the CDME run id) gets START and COMPLETE or FAIL; every
model, seed, snapshot and test dbt executed gets START and COMPLETE, FAIL or ABORT (skipped) (a model dbt
built whose accounting the ledger finds unbalanced ends with FAIL and the discrepancies as its error), its run id
derived from the parent's and the node's id so that finalizing twice yields the same events. Datasets are
named per the OpenLineage naming spec for PostgreSQL: namespace `postgres://host:port`, name
`database.schema.table`.

Beyond the standard facets, CDME adds its own (JSON Schemas in `schemas/facets/`):
- run facet `cdme_ledger`: where the ledger is, its status, the gate's decision;
- run facet `cdme_accounting`: per morphism input/mapped/filtered/errored/output counts and latency;
- run facet `cdme_adjoint`: the lineage mode, key encoding and locations of each partition's adjoint metadata;
- job facet `cdme_requirements`: the REQ keys a model implements.

Examples:
    >>> events = build_events(RunContext(run_id=..., manifest=manifest, run_results=results, ...))
    >>> [e["eventType"] for e in events][:2]
    ['START', 'START']
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services.core.artifacts import Catalog, Manifest, ManifestNode, NodeResult, RunResults, SourceDefinition
from services.lineage.domain.columns import ModelLineage
from services.lineage.domain.ledger import MORPHISM_CHECKS
from services.lineage.domain.partitions import Partitions
from services.lineage.domain.versions import cdme_version
from services.validation.domain.analysis import RelationSchema

PRODUCER = "https://github.com/cdme/cdme/tree/main/services/lineage"
SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
_OL_FACETS = "https://openlineage.io/spec/facets"
CDME_FACETS_URL = "https://cdme.dev/spec/facets/1-0-0"
CDME_FACET_SCHEMAS = Path(__file__).with_name("schemas") / "facets"
# Standard facet schema versions: exactly those of the local spec copy (../shared/openlineage-spec).
_FACET_VERSIONS = {
    "ColumnLineageDatasetFacet": "1-2-0",
    "DataQualityAssertionsDatasetFacet": "1-1-0",
    "DatasourceDatasetFacet": "1-0-1",
    "DocumentationDatasetFacet": "1-1-0",
    "DocumentationJobFacet": "1-1-0",
    "ErrorMessageRunFacet": "1-0-1",
    "InputStatisticsInputDatasetFacet": "1-0-0",
    "JobTypeJobFacet": "2-0-4",
    "NominalTimeRunFacet": "1-0-1",
    "OutputStatisticsOutputDatasetFacet": "1-0-2",
    "OwnershipDatasetFacet": "1-0-1",
    "OwnershipJobFacet": "1-0-1",
    "ParentRunFacet": "1-2-0",
    "ProcessingEngineRunFacet": "1-1-1",
    "SQLJobFacet": "1-1-0",
    "SchemaDatasetFacet": "1-2-0",
    "TagsDatasetFacet": "1-0-0",
    "TagsJobFacet": "1-0-0",
    "TagsRunFacet": "1-0-0",
    "TestRunFacet": "1-0-1",
}
_JOB_TYPES = {"model": "MODEL", "seed": "SEED", "snapshot": "SNAPSHOT", "test": "TEST"}
_SUCCESS = frozenset({"success", "pass", "warn"})
_FAILURE = frozenset({"error", "fail", "runtime error"})
# Run ids of node runs are UUIDv5 of the parent run id and node id: stable across finalize retries.
_NODE_RUN_NAMESPACE = uuid.UUID("6f0d1c2e-8f3a-5b7e-9a41-2c3d4e5f6a7b")


def facet(facet_type: str, /, **fields: Any) -> dict[str, Any]:
    """A standard OpenLineage facet with `_producer` and the `_schemaURL` of the local spec's version."""
    version = _FACET_VERSIONS[facet_type]
    url = f"{_OL_FACETS}/{version}/{facet_type}.json#/$defs/{facet_type}"
    return {"_producer": PRODUCER, "_schemaURL": url, **{k: v for k, v in fields.items() if v is not None}}


def cdme_facet(facet_type: str, /, **fields: Any) -> dict[str, Any]:
    """A CDME custom facet; its `_schemaURL` names the schema in `schemas/facets/<facet_type>.json`."""
    url = f"{CDME_FACETS_URL}/{facet_type}.json#/$defs/{facet_type}"
    return {"_producer": PRODUCER, "_schemaURL": url, **fields}


@dataclass
class RunContext:
    """Everything the events of one run are built from."""

    run_id: str
    project: str
    target: str
    job_namespace: str
    dataset_namespace: str
    manifest: Manifest | None
    run_results: RunResults | None
    catalog: Catalog | None = None
    partitions: Partitions | None = None
    ledger: dict[str, Any] | None = None
    ledger_path: str | None = None
    status: str = "COMPLETE"
    reason: str | None = None
    epoch: str | None = None
    column_lineage: dict[str, ModelLineage] = field(default_factory=dict)
    schemas: dict[str, RelationSchema] = field(default_factory=dict)
    started_at: datetime | None = None
    ended_at: datetime | None = None


def _iso(value: datetime | None) -> str:
    return (value or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")


def node_run_id(parent_run_id: str, unique_id: str) -> str:
    """The run id of one node's execution within a CDME run (stable: finalize may run twice)."""
    return str(uuid.uuid5(_NODE_RUN_NAMESPACE, f"{parent_run_id}/{unique_id}"))


class _Builder:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.manifest = ctx.manifest
        self.by_morphism = {m.unique_id: m for m in ctx.partitions.morphisms} if ctx.partitions else {}
        self.by_source = {s.unique_id: s for s in ctx.partitions.sources} if ctx.partitions else {}
        self.results = ctx.run_results.by_id() if ctx.run_results else {}
        self.dialect = (ctx.manifest.metadata.adapter_type if ctx.manifest else None) or "postgres"
        self.exposures: dict[str, list[dict[str, Any]]] = {}
        for exposure in ctx.manifest.exposures.values() if ctx.manifest else []:
            for upstream in exposure.depends_on.nodes:
                item = {"unique_id": exposure.unique_id, "name": exposure.name}
                if exposure.type:
                    item["type"] = exposure.type
                self.exposures.setdefault(upstream, []).append(item)

    # -- naming ----------------------------------------------------------------------------------------------

    def node(self, unique_id: str) -> ManifestNode | SourceDefinition | None:
        if self.manifest is None:
            return None
        return self.manifest.nodes.get(unique_id) or self.manifest.sources.get(unique_id)

    @staticmethod
    def dataset_name(node: ManifestNode | SourceDefinition) -> str:
        identifier = node.identifier if isinstance(node, SourceDefinition) else (node.alias or node.name)
        return ".".join(p for p in (node.database, node.schema_, identifier) if p)

    def parent_facet(self) -> dict[str, Any]:
        job = {"namespace": self.ctx.job_namespace, "name": self.parent_job_name}
        run = {"runId": self.ctx.run_id}
        return facet("ParentRunFacet", run=run, job=job, root={"run": run, "job": job})

    @property
    def parent_job_name(self) -> str:
        return f"{self.ctx.project}.{self.ctx.target}"

    # -- datasets --------------------------------------------------------------------------------------------

    def schema_facet(self, node: ManifestNode | SourceDefinition) -> dict[str, Any] | None:
        columns: list[dict[str, Any]] = []
        catalog = self.ctx.catalog
        entry = None
        if catalog is not None:
            entry = (catalog.sources if isinstance(node, SourceDefinition) else catalog.nodes).get(
                node.unique_id
            )
        if entry is not None:
            for name, column in sorted(entry.columns.items(), key=lambda kv: kv[1].index or 0):
                documented = node.columns.get(name)
                columns.append(
                    {
                        "name": name,
                        "type": column.type,
                        **(
                            {"description": documented.description}
                            if documented and documented.description
                            else {}
                        ),
                        **({"ordinal_position": column.index} if column.index else {}),
                    }
                )
        else:
            resolved = self.ctx.schemas.get(node.unique_id)
            types = resolved.columns if resolved is not None else {}
            for position, name in enumerate(types or node.columns, start=1):
                documented = node.columns.get(name)
                item: dict[str, Any] = {"name": name, "ordinal_position": position}
                data_type = types.get(name) or (documented.data_type if documented is not None else None)
                if data_type:
                    item["type"] = data_type
                if documented is not None and documented.description:
                    item["description"] = documented.description
                columns.append(item)
        return facet("SchemaDatasetFacet", fields=columns) if columns else None

    def dataset_facets(self, node: ManifestNode | SourceDefinition, *, rich: bool) -> dict[str, Any]:
        facets: dict[str, Any] = {
            "dataSource": facet(
                "DatasourceDatasetFacet", name=self.ctx.dataset_namespace, uri=self.ctx.dataset_namespace
            )
        }
        schema = self.schema_facet(node)
        if schema is not None:
            facets["schema"] = schema
        if not rich:
            return facets
        facets |= _described_and_owned(node, "Dataset")
        tags = [{"key": t, "value": "true", "source": "DBT"} for t in _tags(node)]
        tags += [
            {"key": tag, "value": "true", "source": "DBT", "field": column.name}
            for column in node.columns.values()
            for tag in column.tags
        ]
        if tags:
            facets["tags"] = facet("TagsDatasetFacet", tags=tags)
        return facets

    def input_dataset(self, consumer: str, upstream: str) -> dict[str, Any] | None:
        node = self.node(upstream)
        if node is None or (isinstance(node, ManifestNode) and node.resource_type not in _DATA_TYPES):
            return None
        dataset: dict[str, Any] = {
            "namespace": self.ctx.dataset_namespace,
            "name": self.dataset_name(node),
            "facets": self.dataset_facets(node, rich=False),
        }
        rows = self.input_rows(consumer, upstream)
        if rows is not None:
            dataset["inputFacets"] = {
                "inputStatistics": facet("InputStatisticsInputDatasetFacet", rowCount=rows)
            }
        return dataset

    def input_rows(self, consumer: str, upstream: str) -> int | None:
        morphism = self.by_morphism.get(consumer)
        if morphism is not None and morphism.upstream_unique_id == upstream:
            return morphism.input
        source = self.by_source.get(upstream)
        if source is not None:
            return source.input
        produced = self.by_morphism.get(upstream)
        return produced.output if produced is not None else None

    def output_dataset(self, node: ManifestNode, result: NodeResult | None) -> dict[str, Any]:
        facets = self.dataset_facets(node, rich=True)
        config = {
            "materialized": node.config.materialized,
            "access": node.config.access or node.access,
            "incremental_strategy": node.config.incremental_strategy,
            "unique_key": node.config.unique_key or None,
        }
        if any(config.values()):
            facets["dbt_model"] = cdme_facet(
                "DbtModelDatasetFacet", config={k: v for k, v in config.items() if v}
            )
        exposures = self.exposures.get(node.unique_id)
        if exposures:
            facets["dbt_exposures"] = cdme_facet("DbtExposuresDatasetFacet", exposures=exposures)
        lineage = self.ctx.column_lineage.get(node.unique_id)
        if lineage is not None and lineage.error is None and (lineage.fields or lineage.dataset):
            facets["columnLineage"] = self.column_lineage_facet(lineage)
        dataset: dict[str, Any] = {
            "namespace": self.ctx.dataset_namespace,
            "name": self.dataset_name(node),
            "facets": facets,
        }
        morphism = self.by_morphism.get(node.unique_id)
        rows = morphism.output if morphism is not None and morphism.output is not None else None
        if rows is None and morphism is not None:
            rows = morphism.mapped
        if rows is None and result is not None:
            rows = result.rows_affected
        if rows is not None:
            dataset["outputFacets"] = {
                "outputStatistics": facet("OutputStatisticsOutputDatasetFacet", rowCount=rows)
            }
        return dataset

    def edge(
        self, unique_id: str, column: str, kind: str, subtype: str, masking: bool
    ) -> dict[str, Any] | None:
        node = self.node(unique_id)
        if node is None:
            return None
        transformation: dict[str, Any] = {"type": kind, "subtype": subtype}
        if masking:
            transformation["masking"] = True
        return {
            "namespace": self.ctx.dataset_namespace,
            "name": self.dataset_name(node),
            "field": column,
            "transformations": [transformation],
        }

    def column_lineage_facet(self, lineage: ModelLineage) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for column, edges in lineage.fields.items():
            inputs = [
                e
                for e in (self.edge(x.unique_id, x.column, x.type, x.subtype, x.masking) for x in edges)
                if e
            ]
            fields[column] = {"inputFields": inputs}
        dataset = [
            e
            for e in (self.edge(x.unique_id, x.column, x.type, x.subtype, False) for x in lineage.dataset)
            if e
        ]
        return facet("ColumnLineageDatasetFacet", fields=fields, dataset=dataset)

    # -- jobs and runs ---------------------------------------------------------------------------------------

    def job(self, node: ManifestNode) -> dict[str, Any]:
        facets: dict[str, Any] = {
            "jobType": facet(
                "JobTypeJobFacet",
                processingType="BATCH",
                integration="DBT",
                jobType=_JOB_TYPES.get(node.resource_type, node.resource_type.upper()),
            )
        }
        if node.compiled_code:
            facets["sql"] = facet("SQLJobFacet", query=node.compiled_code, dialect=self.dialect)
        facets |= _described_and_owned(node, "Job")
        tags = _tags(node)
        if tags:
            facets["tags"] = facet(
                "TagsJobFacet", tags=[{"key": t, "value": "true", "source": "DBT"} for t in tags]
            )
        req = _req(node)
        if req:
            facets["cdme_requirements"] = cdme_facet("CdmeRequirementsJobFacet", req=req)
        facets["dbt_node"] = cdme_facet(
            "DbtNodeJobFacet",
            original_file_path=node.original_file_path or None,
            database=node.database,
            schema=node.schema_,
            alias=node.alias,
            unique_id=node.unique_id,
        )
        return {"namespace": self.ctx.job_namespace, "name": node.unique_id, "facets": facets}

    def engine_facet(self) -> dict[str, Any]:
        dbt_version = self.manifest.metadata.dbt_version if self.manifest else None
        return facet(
            "ProcessingEngineRunFacet",
            name="dbt",
            version=dbt_version or "unknown",
            openlineageAdapterVersion=cdme_version(),
        )

    def dbt_version_facet(self) -> dict[str, Any]:
        version = self.manifest.metadata.dbt_version if self.manifest else None
        return cdme_facet("DbtVersionRunFacet", version=version or "unknown")

    @staticmethod
    def tags_run_facet(node: ManifestNode) -> dict[str, Any] | None:
        tags = [{"key": t, "value": "true", "source": "DBT"} for t in _tags(node)]
        for key, value in {**node.meta, **node.config.meta}.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            tags.append({"key": key, "value": text, "source": "DBT_META"})
        return facet("TagsRunFacet", tags=tags) if tags else None

    @staticmethod
    def test_run_facet(
        node: ManifestNode, result: NodeResult, assertion: dict[str, Any] | None
    ) -> dict[str, Any]:
        execution: dict[str, Any] = {
            "name": node.unique_id,
            "status": "pass"
            if result.status in {"pass", "warn"}
            else ("skip" if result.status == "skipped" else "fail"),
            "severity": (node.config.severity or "error").lower(),
            "type": node.test_metadata.name if node.test_metadata else "singular",
            "contentType": "sql",
        }
        if result.failures is not None:
            execution["actual"] = str(result.failures)
            execution["expected"] = "0"
        if node.compiled_code:
            execution["content"] = node.compiled_code
        if assertion is not None and "params" in assertion:
            execution["params"] = assertion["params"]
        if node.description:
            execution["description"] = node.description
        return facet("TestRunFacet", tests=[execution])

    def accounting_facet(self, node: ManifestNode, result: NodeResult | None) -> dict[str, Any] | None:
        morphism = self.by_morphism.get(node.unique_id)
        if morphism is None:
            return None
        balanced = None
        if self.ctx.ledger is not None:
            balanced = next(
                (m["balanced"] for m in self.ctx.ledger["morphisms"] if m["unique_id"] == node.unique_id),
                None,
            )
        return cdme_facet(
            "CdmeAccountingRunFacet",
            model=morphism.model,
            upstream=morphism.upstream_unique_id,
            input=morphism.input,
            mapped=morphism.mapped,
            filtered=morphism.filtered,
            errored=morphism.errored,
            output=morphism.output,
            overlap=morphism.overlap.count,
            unaccounted=morphism.unaccounted.count,
            balanced=balanced,
            latencySeconds=result.execution_time if result is not None else None,
            req=sorted(set(morphism.req) | set(_req(node))),
        )

    def accounting_failure(self, unique_id: str) -> str | None:
        """The ledger's discrepancies at a model, as one message; None when its accounting balanced."""
        found = [
            d
            for d in (self.ctx.ledger or {}).get("discrepancies", [])
            if d["unique_id"] == unique_id and d["check"] in MORPHISM_CHECKS
        ]
        if not found:
            return None
        return "CDME accounting: " + "; ".join(d["message"] for d in found)

    def adjoint_facet(self, unique_id: str) -> dict[str, Any] | None:
        morphism = self.by_morphism.get(unique_id)
        if morphism is None or self.ctx.partitions is None:
            return None
        return cdme_facet(
            "CdmeAdjointRunFacet",
            lineageMode=self.ctx.partitions.lineage_mode,
            keyEncoding=self.ctx.partitions.key_encoding,
            sourceKeyFields=morphism.source_key_fields,
            targetKeyFields=morphism.target_key_fields,
            locations=morphism.locations,
        )

    def ledger_facet(self) -> dict[str, Any] | None:
        ledger = self.ctx.ledger
        return cdme_facet(
            "CdmeLedgerRunFacet",
            path=self.ctx.ledger_path,
            status=ledger["status"] if ledger else None,
            runStatus=self.ctx.status,
            reason=self.ctx.reason,
            totals=ledger["totals"] if ledger else None,
            discrepancies=[
                {k: d[k] for k in ("check", "model", "count", "sample_keys")} for d in ledger["discrepancies"]
            ]
            if ledger
            else [],
            versions={k: v for k, v in ledger["versions"].items() if k != "compiled_sql"} if ledger else None,
        )

    # -- events ----------------------------------------------------------------------------------------------

    def event(
        self,
        event_type: str,
        when: datetime | None,
        run: dict[str, Any],
        job: dict[str, Any],
        inputs: list[dict[str, Any]],
        outputs: list[dict[str, Any]],
    ) -> dict[str, Any]:
        return {
            "eventType": event_type,
            "eventTime": _iso(when),
            "run": run,
            "job": job,
            "inputs": inputs,
            "outputs": outputs,
            "producer": PRODUCER,
            "schemaURL": SCHEMA_URL,
        }

    def node_events(self, node: ManifestNode, result: NodeResult) -> list[dict[str, Any]]:
        started, ended = _timings(result)
        started = started or self.ctx.started_at
        ended = ended or started
        failure = result.message or f"dbt reported {result.status}"
        if result.status in _SUCCESS:
            final = "COMPLETE"
        elif result.status == "skipped":
            final = "ABORT"
        else:
            final = "FAIL"
        if final == "COMPLETE" and (lost := self.accounting_failure(node.unique_id)) is not None:
            # dbt built the model, but records went missing in it: the run's gate failed here, so does its job.
            final, failure = "FAIL", lost
        run_id = node_run_id(self.ctx.run_id, node.unique_id)
        base_facets = {
            "parent": self.parent_facet(),
            "processing_engine": self.engine_facet(),
            "dbt_version": self.dbt_version_facet(),
        }
        tags = self.tags_run_facet(node)
        if tags is not None:
            base_facets["tags"] = tags
        job = self.job(node)
        inputs: list[dict[str, Any]] = []
        outputs: list[dict[str, Any]] = []
        if node.resource_type == "test":
            inputs = self.test_inputs(node, result)
            assertion = inputs[0]["inputFacets"]["dataQualityAssertions"]["assertions"][0] if inputs else None
            end_test = self.test_run_facet(node, result, assertion)
        else:
            attached = (
                self.input_dataset(node.unique_id, uid) for uid in dict.fromkeys(node.depends_on.nodes)
            )
            inputs = [d for d in attached if d is not None]
            outputs = [self.output_dataset(node, result)]
        end_facets = dict(base_facets)
        if node.resource_type == "test":
            end_facets["test"] = end_test
        if final == "FAIL":
            end_facets["errorMessage"] = facet(
                "ErrorMessageRunFacet", message=failure, programmingLanguage="sql"
            )
        for key, value in (
            ("cdme_accounting", self.accounting_facet(node, result)),
            ("cdme_adjoint", self.adjoint_facet(node.unique_id)),
        ):
            if value is not None:
                end_facets[key] = value
        start = self.event("START", started, {"runId": run_id, "facets": base_facets}, job, inputs, outputs)
        end = self.event(final, ended, {"runId": run_id, "facets": end_facets}, job, inputs, outputs)
        return [start, end]

    def test_inputs(self, node: ManifestNode, result: NodeResult) -> list[dict[str, Any]]:
        tested = node.tested_node
        target = self.node(tested) if tested else None
        if target is None:
            return []
        metadata = node.test_metadata
        assertion: dict[str, Any] = {
            "assertion": metadata.name if metadata else node.name,
            "name": node.name,
            "success": result.status == "pass",
            "severity": (node.config.severity or "error").lower(),
            "contentType": "sql",
        }
        column = node.column_name or (metadata.arguments.get("column_name") if metadata else None)
        if isinstance(column, str):
            assertion["column"] = column
        if result.failures is not None:
            assertion["actual"] = str(result.failures)
            assertion["expected"] = "0"
        if node.compiled_code:
            assertion["content"] = node.compiled_code
        if metadata is not None:
            params = {k: v for k, v in metadata.arguments.items() if k != "model"}
            if params:
                assertion["params"] = params
        return [
            {
                "namespace": self.ctx.dataset_namespace,
                "name": self.dataset_name(target),
                "facets": self.dataset_facets(target, rich=False),
                "inputFacets": {
                    "dataQualityAssertions": facet(
                        "DataQualityAssertionsDatasetFacet", assertions=[assertion]
                    )
                },
            }
        ]

    def parent_events(self) -> tuple[dict[str, Any], dict[str, Any]]:
        job = {
            "namespace": self.ctx.job_namespace,
            "name": self.parent_job_name,
            "facets": {
                "jobType": facet("JobTypeJobFacet", processingType="BATCH", integration="DBT", jobType="JOB"),
            },
        }
        start_facets: dict[str, Any] = {"processing_engine": self.engine_facet()}
        if self.ctx.epoch:
            start_facets["nominalTime"] = facet(
                "NominalTimeRunFacet", nominalStartTime=f"{self.ctx.epoch}T00:00:00Z"
            )
        end_facets = dict(start_facets)
        ledger = self.ledger_facet()
        if ledger is not None:
            end_facets["cdme_ledger"] = ledger
        if self.ctx.status == "FAILED":
            end_facets["errorMessage"] = facet(
                "ErrorMessageRunFacet",
                message=self.ctx.reason or "the run failed",
                programmingLanguage="python",
            )
        run_start = {"runId": self.ctx.run_id, "facets": start_facets}
        run_end = {"runId": self.ctx.run_id, "facets": end_facets}
        final = "COMPLETE" if self.ctx.status == "COMPLETE" else "FAIL"
        return (
            self.event("START", self.ctx.started_at, run_start, job, [], []),
            self.event(final, self.ctx.ended_at, run_end, job, [], []),
        )


_DATA_TYPES = frozenset({"model", "seed", "snapshot", "source"})


def _timings(result: NodeResult) -> tuple[datetime | None, datetime | None]:
    starts = [t.started_at for t in result.timing if t.started_at is not None]
    ends = [t.completed_at for t in result.timing if t.completed_at is not None]
    return (min(starts) if starts else None, max(ends) if ends else None)


def _described_and_owned(
    node: ManifestNode | SourceDefinition, facet_of: Literal["Dataset", "Job"]
) -> dict[str, Any]:
    """A node's documentation and ownership facets, for its dataset or its job (the facet types differ)."""
    facets: dict[str, Any] = {}
    if node.description:
        facets["documentation"] = facet(
            f"Documentation{facet_of}Facet", description=node.description, contentType="text/markdown"
        )
    owners = _owners(node)
    if owners:
        facets["ownership"] = facet(f"Ownership{facet_of}Facet", owners=[{"name": o} for o in owners])
    return facets


def _owners(node: ManifestNode | SourceDefinition) -> list[str]:
    owner = node.cdme.get("owner") or node.meta.get("owner") or node.config.meta.get("owner")
    if isinstance(owner, str):
        return [owner]
    if isinstance(owner, list):
        return [str(o) for o in owner]
    return []


def _tags(node: ManifestNode | SourceDefinition) -> list[str]:
    return list(dict.fromkeys([*node.tags, *node.config.tags]))


def _req(node: ManifestNode | SourceDefinition) -> list[str]:
    value = node.cdme.get("req")
    return [str(v) for v in value] if isinstance(value, list) else []


def build_events(ctx: RunContext) -> list[dict[str, Any]]:
    """Every OpenLineage event of a run, parent first, in event-time order per run.

    Args:
        ctx: The run's artifacts, partitions, ledger and decision. Without run results (dbt failed before
            writing them) only the parent's START and FAIL are built, the FAIL carrying the reason.

    Returns:
        The events as JSON-ready dictionaries (`RunEvent` of the OpenLineage spec 2-0-2).
    """
    builder = _Builder(ctx)
    if ctx.started_at is None and ctx.run_results is not None:
        starts = [s for r in ctx.run_results.results if (s := _timings(r)[0]) is not None]
        ctx.started_at = min(starts) if starts else ctx.run_results.metadata.generated_at
    if ctx.ended_at is None:
        ctx.ended_at = datetime.now(UTC)
    ctx.started_at = ctx.started_at or ctx.ended_at
    parent_start, parent_end = builder.parent_events()
    events = [parent_start]
    if ctx.run_results is not None and ctx.manifest is not None:
        for result in ctx.run_results.results:
            node = ctx.manifest.nodes.get(result.unique_id)
            if node is None or node.resource_type not in _JOB_TYPES:
                continue
            events += builder.node_events(node, result)
    events.append(parent_end)
    return events


def event_id(event: dict[str, Any]) -> str:
    """The identity of an event for exactly-once delivery: run id, event type and event time."""
    return f"{event['run']['runId']}/{event['eventType']}/{event['eventTime']}"
