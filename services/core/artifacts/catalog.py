"""The fields of dbt's `catalog.json` (schema v1) that CDME reads: the warehouse's own column types."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from services.core.artifacts.base import ArtifactModel


class CatalogMetadata(ArtifactModel):
    """`metadata` of `dbt docs generate`."""

    dbt_schema_version: str
    dbt_version: str | None = None
    generated_at: str | None = None
    invocation_id: str | None = None


class TableMetadata(ArtifactModel):
    """Where the relation lives and what it is (`BASE TABLE`, `VIEW`, ...)."""

    type: str
    schema_: str = Field(alias="schema")
    name: str
    database: str | None = None
    comment: str | None = None
    owner: str | None = None


class ColumnMetadata(ArtifactModel):
    """A column as the warehouse reports it."""

    type: str
    index: int
    name: str
    comment: str | None = None


class CatalogTable(ArtifactModel):
    """One relation of the catalog."""

    metadata: TableMetadata
    columns: dict[str, ColumnMetadata] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    unique_id: str | None = None


class Catalog(ArtifactModel):
    """A dbt `catalog.json`."""

    metadata: CatalogMetadata
    nodes: dict[str, CatalogTable] = Field(default_factory=dict)
    sources: dict[str, CatalogTable] = Field(default_factory=dict)
    errors: list[str] | None = None

    def columns_of(self, unique_id: str) -> dict[str, ColumnMetadata]:
        """Columns of a node or source, keyed by lower-cased name (PostgreSQL folds unquoted names)."""
        table = self.nodes.get(unique_id) or self.sources.get(unique_id)
        return {name.lower(): col for name, col in table.columns.items()} if table else {}
