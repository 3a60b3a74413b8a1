"""The fields of dbt's `manifest.json` (schema v7 to v12) that CDME reads.

Between v7 (dbt 1.3) and v12 (dbt 1.8+) the fields CDME reads kept their names; what changed is handled here:
`refs` went from lists of strings to objects (v9), `attached_node` (v8), `constraints`/`contract`/`access`
(v9) and `primary_key` (v12) were added and default to empty when absent.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from services.core.artifacts.base import ArtifactModel, as_list


class ManifestMetadata(ArtifactModel):
    """`metadata`: who wrote the manifest and with which schema."""

    dbt_schema_version: str
    dbt_version: str | None = None
    generated_at: str | None = None
    invocation_id: str | None = None
    project_name: str | None = None
    project_id: str | None = None
    adapter_type: str | None = None


class DependsOn(ArtifactModel):
    """`depends_on`: upstream node and macro ids."""

    nodes: list[str] = Field(default_factory=list)
    macros: list[str] = Field(default_factory=list)


class Constraint(ArtifactModel):
    """A model or column constraint (`primary_key`, `unique`, `not_null`, `foreign_key`, ...)."""

    type: str
    name: str | None = None
    columns: list[str] = Field(default_factory=list)
    expression: str | None = None


class ColumnInfo(ArtifactModel):
    """A column documented in YAML."""

    name: str
    description: str = ""
    data_type: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)

    @property
    def cdme(self) -> dict[str, Any]:
        """The column's `meta.cdme` (from `meta` or `config.meta`)."""
        return _cdme_meta(self.meta, self.config.get("meta"))

    @property
    def cdme_malformed(self) -> str | None:
        """Why the column's `meta.cdme` is unusable, if it is not a mapping."""
        return _malformed_cdme(self.meta, self.config.get("meta"))


class TestMetadata(ArtifactModel):
    """Which generic test a test node instantiates, with its arguments."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict, alias="kwargs")
    namespace: str | None = None


class Checksum(ArtifactModel):
    """A file checksum."""

    name: str
    checksum: str


class RefArgs(ArtifactModel):
    """One `ref()` call of a node."""

    name: str
    package: str | None = None
    version: str | int | float | None = None


class NodeConfig(ArtifactModel):
    """The subset of a node's resolved `config` that CDME reads."""

    enabled: bool = True
    materialized: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    unique_key: list[str] = Field(default_factory=list)
    incremental_strategy: str | None = None
    access: str | None = None
    severity: str | None = None
    strategy: str | None = None
    updated_at: str | None = None

    _tags_list = field_validator("tags", mode="before")(as_list)
    _unique_key_list = field_validator("unique_key", mode="before")(as_list)


def _cdme_values(*metas: Any) -> list[Any]:
    return [meta["cdme"] for meta in metas if isinstance(meta, dict) and "cdme" in meta]


def _cdme_meta(*metas: Any) -> dict[str, Any]:
    # dbt >= 1.10 wants meta under config; older projects put it top-level. config wins where both exist.
    merged: dict[str, Any] = {}
    for value in _cdme_values(*metas):
        if isinstance(value, dict):
            merged.update(value)
    return merged


def _malformed_cdme(*metas: Any) -> str | None:
    for value in _cdme_values(*metas):
        if not isinstance(value, dict):
            return f"must be a mapping of declarations, found {type(value).__name__} {value!r:.40}"
    return None


class ManifestNode(ArtifactModel):
    """A model, seed, snapshot, test, analysis or operation."""

    unique_id: str
    resource_type: str
    name: str
    package_name: str
    path: str = ""
    original_file_path: str = ""
    database: str | None = None
    schema_: str = Field(alias="schema")
    alias: str | None = None
    relation_name: str | None = None
    fqn: list[str] = Field(default_factory=list)
    config: NodeConfig = Field(default_factory=NodeConfig)
    meta: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    description: str = ""
    columns: dict[str, ColumnInfo] = Field(default_factory=dict)
    depends_on: DependsOn = Field(default_factory=DependsOn)
    refs: list[RefArgs] = Field(default_factory=list)
    sources: list[list[str]] = Field(default_factory=list)
    raw_code: str = ""
    compiled_code: str | None = None
    language: str = "sql"
    checksum: Checksum | None = None
    test_metadata: TestMetadata | None = None
    column_name: str | None = None
    attached_node: str | None = None
    constraints: list[Constraint] = Field(default_factory=list)
    contract: dict[str, Any] = Field(default_factory=dict)
    access: str | None = None
    version: str | int | float | None = None
    primary_key: list[str] = Field(default_factory=list)

    @field_validator("refs", mode="before")
    @classmethod
    def _refs_as_objects(cls, value: Any) -> Any:
        # v7/v8 wrote refs as ["name"] or ["package", "name"]; v9+ as {"name", "package", "version"}.
        if not isinstance(value, list):
            return value
        return [
            {"name": ref[-1], "package": ref[0] if len(ref) > 1 else None} if isinstance(ref, list) else ref
            for ref in value
        ]

    @property
    def cdme(self) -> dict[str, Any]:
        """The node's `meta.cdme` declarations."""
        return _cdme_meta(self.meta, self.config.meta)

    @property
    def cdme_malformed(self) -> str | None:
        """Why the node's `meta.cdme` is unusable, if it is not a mapping."""
        return _malformed_cdme(self.meta, self.config.meta)

    @property
    def tested_node(self) -> str | None:
        """For a test: the node it is attached to (derived from `depends_on` before v8)."""
        if self.attached_node:
            return self.attached_node
        parents = [n for n in self.depends_on.nodes if not n.startswith("test.")]
        return parents[0] if len(parents) == 1 else None


class SourceDefinition(ArtifactModel):
    """A `sources:` table."""

    unique_id: str
    name: str
    source_name: str
    package_name: str
    database: str | None = None
    schema_: str = Field(alias="schema")
    identifier: str
    relation_name: str | None = None
    loaded_at_field: str | None = None
    fqn: list[str] = Field(default_factory=list)
    columns: dict[str, ColumnInfo] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)
    source_meta: dict[str, Any] = Field(default_factory=dict)
    config: NodeConfig = Field(default_factory=NodeConfig)
    tags: list[str] = Field(default_factory=list)
    description: str = ""
    resource_type: str = "source"

    @property
    def cdme(self) -> dict[str, Any]:
        """The table's `meta.cdme`, layered over the source-level one."""
        return _cdme_meta(self.source_meta, self.meta, self.config.meta)

    @property
    def cdme_malformed(self) -> str | None:
        """Why the table's (or its source's) `meta.cdme` is unusable, if it is not a mapping."""
        return _malformed_cdme(self.source_meta, self.meta, self.config.meta)


class Exposure(ArtifactModel):
    """An exposure (a dashboard or application downstream of models)."""

    unique_id: str
    name: str
    type: str | None = None
    depends_on: DependsOn = Field(default_factory=DependsOn)


class Manifest(ArtifactModel):
    """A dbt `manifest.json`."""

    metadata: ManifestMetadata
    nodes: dict[str, ManifestNode] = Field(default_factory=dict)
    sources: dict[str, SourceDefinition] = Field(default_factory=dict)
    exposures: dict[str, Exposure] = Field(default_factory=dict)
    parent_map: dict[str, list[str]] | None = None
    child_map: dict[str, list[str]] | None = None

    def models(self) -> list[ManifestNode]:
        """The enabled SQL models, in manifest order."""
        return [n for n in self.nodes.values() if n.resource_type == "model" and n.config.enabled]

    def entities(self) -> list[ManifestNode | SourceDefinition]:
        """Every node that holds data: sources, seeds, snapshots and models."""
        data_nodes: list[ManifestNode | SourceDefinition] = [
            n for n in self.nodes.values() if n.resource_type in {"model", "seed", "snapshot"}
        ]
        return [*self.sources.values(), *data_nodes]

    def tests_on(self, unique_id: str) -> list[ManifestNode]:
        """The data tests attached to `unique_id`."""
        return [n for n in self.nodes.values() if n.resource_type == "test" and n.tested_node == unique_id]
