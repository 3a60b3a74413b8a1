"""Validate a proposed model (say, one an AI assistant wrote) as if it were already part of the project.

The proposal becomes a node of a copy of the manifest, shaped the way `dbt compile` would have written it: it
lives in the project's package and in the schema most of the project's models use, and it depends on every
source, seed, snapshot and model its SQL reads. The whole project is then validated as usual, and only what
concerns the proposal is kept. Nothing is written anywhere.

Examples:
    >>> checked = validate_proposed_model(
    ...     manifest, ModelProposal(name="big_orders", sql='select order_id from "db"."analytics"."orders"')
    ... )
    >>> [f.message for f in checked.report.errors]
    []
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import sqlglot
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlglot import exp
from sqlglot.errors import SqlglotError

from services.core.artifacts import Catalog, Manifest, ManifestNode, SourceDefinition
from services.core.artifacts.manifest import Constraint, NodeConfig
from services.core.errors import UsageError, describe_validation_error
from services.core.ldm import ProjectConfig, entity_name
from services.core.ldm.config import LineageMode
from services.validation.domain.analysis import sqlglot_dialect
from services.validation.domain.findings import Coverage, Report
from services.validation.domain.validate import validate_project

MODEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class ColumnProperties(BaseModel):
    """A column as dbt YAML documents it (`columns:` of a model's properties)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    data_type: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="Older projects put `meta` here.")
    config: dict[str, Any] = Field(default_factory=dict, description="`config.meta.cdme` holds declarations.")
    constraints: list[Constraint] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)


class ModelConfigProperties(NodeConfig):
    """A model's `config:` block; `meta.cdme` holds its CDME declarations."""

    contract: dict[str, Any] = Field(
        default_factory=dict, description="`enforced: true` makes columns a contract."
    )


class ModelProperties(BaseModel):
    """A model's dbt YAML properties, as JSON. Other keys dbt accepts (tests, docs, ...) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    description: str = ""
    columns: list[ColumnProperties] = Field(default_factory=list)
    config: ModelConfigProperties = Field(default_factory=ModelConfigProperties)
    meta: dict[str, Any] = Field(default_factory=dict, description="Older projects put `meta` here.")
    constraints: list[Constraint] = Field(default_factory=list)


@dataclass(frozen=True)
class ProposalReport:
    """The findings about a proposed model, and the unique id it was validated under."""

    unique_id: str
    report: Report


@dataclass(frozen=True)
class ModelProposal:
    """A model that is not in the project yet: its name, compiled SQL and YAML properties."""

    name: str
    sql: str
    properties: ModelProperties = field(default_factory=ModelProperties)


def _project_of(manifest: Manifest) -> str:
    if manifest.metadata.project_name:
        return manifest.metadata.project_name
    packages = Counter(m.package_name for m in manifest.models())
    if not packages:
        msg = "the manifest names no project (metadata.project_name) and has no model to take it from"
        raise UsageError(msg)
    return packages.most_common(1)[0][0]


def _home_of(manifest: Manifest, project: str) -> tuple[str | None, str]:
    """The database and schema most of the project's models are in (dbt's default for a new model)."""
    models = [m for m in manifest.models() if m.package_name == project] or manifest.models()
    if not models:
        msg = "the manifest has no model whose schema a proposed model could share"
        raise UsageError(msg)
    schema = Counter(m.schema_ for m in models).most_common(1)[0][0]
    database = Counter(m.database for m in models if m.schema_ == schema).most_common(1)[0][0]
    return database, schema


def _relations(manifest: Manifest) -> dict[tuple[str, str, str], str]:
    """Every relation of the project as (database, schema, identifier), lower case, with its unique id."""
    found: dict[tuple[str, str, str], str] = {}
    for node in manifest.entities():
        if isinstance(node, SourceDefinition):
            identifier = node.identifier
        elif node.relation_name is None:
            continue  # ephemeral: no relation to read
        else:
            identifier = node.alias or node.name
        key = ((node.database or "").lower(), node.schema_.lower(), identifier.lower())
        found[key] = node.unique_id
        # SQL may leave the database out; the schema and name still identify the relation.
        found.setdefault(("", key[1], key[2]), node.unique_id)
    return found


def _reads(manifest: Manifest, sql: str, dialect: str | None) -> list[str]:
    """The unique ids of the project's relations the SQL reads, in the order it first names them."""
    try:
        tree = sqlglot.parse_one(sql, dialect=dialect)
    except SqlglotError:
        return []  # validation reports the SQL that does not parse, with the parser's message
    relations = _relations(manifest)
    reads: dict[str, None] = {}
    for table in tree.find_all(exp.Table):
        if not table.name or not table.db:
            continue  # a CTE, or a relation outside the project's schemas
        key = (table.catalog.lower(), table.db.lower(), table.name.lower())
        uid = relations.get(key) or relations.get(("", key[1], key[2]))
        if uid is not None:
            reads[uid] = None
    return list(reads)


def add_proposed_model(manifest: Manifest, proposal: ModelProposal) -> tuple[Manifest, ManifestNode]:
    """A copy of `manifest` with the proposal as a model node (replacing a model of the same name).

    Args:
        manifest: The project's manifest, with compiled SQL.
        proposal: The model to add.

    Returns:
        The new manifest and the proposal's node in it (`model.<project>.<name>`).

    Raises:
        UsageError: The name is not a model name, or the manifest has no project or model to place it in.
    """
    if not MODEL_NAME.fullmatch(proposal.name):
        msg = f"model name {proposal.name!r} must be letters, digits and underscores (not starting with a digit)"
        raise UsageError(msg)
    project = _project_of(manifest)
    database, schema = _home_of(manifest, project)
    unique_id = f"model.{project}.{proposal.name}"
    dialect = sqlglot_dialect(manifest.metadata.adapter_type)
    props = proposal.properties
    relation = exp.table_(proposal.name, db=schema, catalog=database, quoted=True).sql(dialect=dialect)
    node_data: dict[str, Any] = {
        "unique_id": unique_id,
        "resource_type": "model",
        "name": proposal.name,
        "package_name": project,
        "path": f"{proposal.name}.sql",
        "original_file_path": f"models/{proposal.name}.sql",
        "database": database,
        "schema": schema,
        "alias": proposal.name,
        "relation_name": relation,
        "fqn": [project, proposal.name],
        "config": props.config.model_copy(update={"enabled": True}).model_dump(),
        "meta": props.meta,
        "description": props.description,
        "columns": {c.name: c.model_dump() for c in props.columns},
        "constraints": [c.model_dump() for c in props.constraints],
        "contract": props.config.contract,
        "depends_on": {"nodes": [u for u in _reads(manifest, proposal.sql, dialect) if u != unique_id]},
        "raw_code": proposal.sql,
        "compiled_code": proposal.sql,
        "language": "sql",
    }
    try:
        node = ManifestNode.model_validate(node_data)
    except ValidationError as e:
        msg = f"the proposed model's properties: {describe_validation_error(e)}"
        raise UsageError(msg) from e
    return manifest.model_copy(update={"nodes": {**manifest.nodes, unique_id: node}}), node


def _downstream_of(manifest: Manifest, unique_id: str) -> set[str]:
    children: dict[str, list[str]] = {}
    for uid, node in manifest.nodes.items():
        for parent in node.depends_on.nodes:
            children.setdefault(parent, []).append(uid)
    found: set[str] = set()
    pending = list(children.get(unique_id, []))
    while pending:
        uid = pending.pop()
        if uid not in found:
            found.add(uid)
            pending += children.get(uid, [])
    return found


def _enabled(manifest: Manifest, unique_ids: set[str], enabled: bool) -> Manifest:
    nodes = dict(manifest.nodes)
    for uid in unique_ids:
        node = nodes[uid]
        nodes[uid] = node.model_copy(update={"config": node.config.model_copy(update={"enabled": enabled})})
    return manifest.model_copy(update={"nodes": nodes})


def validate_proposed_model(
    manifest: Manifest,
    proposal: ModelProposal,
    *,
    config: ProjectConfig | None = None,
    catalog: Catalog | None = None,
    lineage_mode: LineageMode | None = None,
    principal: str | None = None,
    roles: frozenset[str] | None = None,
) -> ProposalReport:
    """Validate a proposed model exactly like a model of the project; report only what concerns it.

    Args:
        manifest: The project's manifest, with compiled SQL.
        proposal: The model to check.
        config: The project's `cdme.yml`, for declaration checks.
        catalog: The warehouse's catalog, when there is one.
        lineage_mode: `CDME_LINEAGE_MODE`, passed to the LDM.
        principal: Who asks (named in access findings).
        roles: The principal's roles; relations they do not allow do not exist for the proposal either.

    Returns:
        The proposal's unique id, its findings, and the coverage of that one model.

    Raises:
        UsageError: The proposal cannot be placed in the project (see `add_proposed_model`).
    """
    proposed, node = add_proposed_model(manifest, proposal)
    label = entity_name(node, proposed.metadata.project_name)
    # Models downstream of a replaced model would be re-checked against the new schema; they are not the
    # question here. Disabled, they are skipped by the analysis but keep their declarations in the LDM.
    isolated = _enabled(proposed, _downstream_of(proposed, node.unique_id), enabled=False)
    options: dict[str, Any] = {
        "config": config,
        "catalog": catalog,
        "lineage_mode": lineage_mode,
        "principal": principal,
        "roles": roles,
    }
    report = validate_project(isolated, **options)
    # Everything else is identical with the proposal disabled, so the difference is the proposal's own share.
    others = validate_project(_enabled(isolated, {node.unique_id}, enabled=False), **options).coverage
    resolved = label not in report.coverage.unresolved_models
    coverage = Coverage(
        models=1,
        models_fully_resolved=int(resolved),
        column_references=report.coverage.column_references - others.column_references,
        column_references_resolved=report.coverage.column_references_resolved
        - others.column_references_resolved,
        unresolved_models=[] if resolved else [label],
    )
    findings = [f for f in report.findings if f.model == label]
    return ProposalReport(node.unique_id, Report(findings=findings, coverage=coverage))
