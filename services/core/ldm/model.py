"""The LDM's vocabulary: what `meta.cdme` may declare, and the typed entities the loader builds from it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.core.artifacts.base import as_list
from services.core.ldm.config import LineageMode

MorphismKind = Literal["iso", "filter", "enrich", "aggregate", "explode", "union"]
VersionSemantics = Literal["as_of", "latest", "exact", "var"]
Sensitivity = Literal["public", "internal", "confidential", "personal"]
MonoidOp = Literal["sum", "count", "min", "max", "bool_and", "bool_or"]
KeySource = Literal["declared", "primary_key_constraint", "unique_test", "dbt_primary_key"]

# The structured fields every error sink carries (ARCHITECTURE.md, "Error domain").
ERROR_SINK_FIELDS = (
    "failure_type",
    "offending_values",
    "source_entity",
    "source_key",
    "source_epoch",
    "morphism_path",
)


class _Declaration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LookupDecl(_Declaration):
    """How a lookup upstream is versioned: `as_of` a column, `latest`, `exact` epoch, or a dbt `var`."""

    version: VersionSemantics
    as_of: str | None = Field(default=None, description="Driving column compared with the version interval.")
    var: str | None = Field(default=None, description="dbt var naming the version, for `var` semantics.")
    description: str = ""


class FilterDecl(_Declaration):
    """An explicit filter: the condition that makes a key 'filtered' rather than lost.

    `join` names an inner join on the model's row path (its alias, or the relation it reads) whose unmatched
    rows the model means to drop: capture counts them filtered by the join's ON condition instead of leaving
    them unaccounted, as it does for any other inner join that loses rows.
    """

    condition: str | None = None
    join: str | None = Field(default=None, min_length=1, max_length=200)
    reason: str = ""

    @model_validator(mode="after")
    def _says_what_filters(self) -> FilterDecl:
        if self.condition is None and self.join is None:
            msg = "a filter declares its condition, a join it filters by, or both"
            raise ValueError(msg)
        return self


class MonoidDecl(_Declaration):
    """The fold behind an aggregate column and its identity (what an empty group yields)."""

    op: MonoidOp
    identity: Any = None


class VersionedDecl(_Declaration):
    """A snapshot-grain source whose rows are versions of a key."""

    valid_from: str
    version_column: str | None = None


class IngestDecl(_Declaration):
    """Where a source's files arrive: the planner's ingest step loads the epoch's file into the source table.

    `location` is relative to the planner's landing directory and may hold `{epoch}` (the run's business date);
    personal-data columns are the columns declared `sensitivity: personal`, the owner is the entity's `owner`.
    """

    location: str = Field(min_length=1, max_length=500)
    format: Literal["csv", "parquet"] = "csv"


class EntityDecl(_Declaration):
    """Everything `meta.cdme` may say about a source, seed, snapshot or model."""

    key: list[str] | None = None
    grain: str | None = None
    kind: MorphismKind | None = None
    driving: str | None = None
    lookups: dict[str, LookupDecl] = Field(default_factory=dict)
    filter: FilterDecl | None = None
    error_sink: str | None = None
    req: list[str] = Field(default_factory=list)
    access: list[str] = Field(default_factory=list)
    sensitivity: Sensitivity | None = None
    monoids: dict[str, MonoidDecl] = Field(default_factory=dict)
    lineage_mode: LineageMode | None = None
    epoch_column: str | None = None
    versioned: VersionedDecl | None = None
    external: bool = False
    owner: str | None = None
    ingest: IngestDecl | None = None

    _key_list = field_validator("key", mode="before")(as_list)
    _req_list = field_validator("req", "access", mode="before")(as_list)

    @field_validator("filter", mode="before")
    @classmethod
    def _filter_shorthand(cls, value: Any) -> Any:
        return {"condition": value} if isinstance(value, str) else value


class ColumnDecl(_Declaration):
    """What a column's `meta.cdme` may say."""

    type: str | None = None
    sensitivity: Sensitivity | None = None
    pseudonymized: bool = False


class RecordKey(BaseModel):
    """The columns that identify a record, and where CDME learned them."""

    model_config = ConfigDict(frozen=True)

    columns: tuple[str, ...]
    source: KeySource
    verified: bool = Field(description="Whether every column was found among the entity's known columns.")


class Lookup(BaseModel):
    """A non-driving upstream with its version semantics."""

    model_config = ConfigDict(frozen=True)

    entity: str
    version: VersionSemantics
    as_of: str | None = None
    var: str | None = None


class Column(BaseModel):
    """A column CDME knows about, from YAML or the catalog."""

    model_config = ConfigDict(frozen=True)

    name: str
    data_type: str | None = None
    semantic_type: str | None = None
    sensitivity: Sensitivity | None = None
    pseudonymized: bool = False


class Entity(BaseModel):
    """A dbt source, seed, snapshot or model with its CDME declarations resolved."""

    model_config = ConfigDict(frozen=True)

    unique_id: str
    name: str = Field(description="Models, seeds, snapshots: their name; sources: `source_name.table`.")
    resource_type: Literal["source", "seed", "snapshot", "model"]
    database: str | None
    schema_name: str
    identifier: str
    materialized: str | None = None
    upstreams: tuple[str, ...] = ()
    columns: dict[str, Column] = Field(default_factory=dict)
    key: RecordKey | None = None
    grain: str | None = None
    kind: MorphismKind | None = None
    driving: str | None = None
    lookups: tuple[Lookup, ...] = ()
    filter: FilterDecl | None = None
    error_sink: str | None = None
    is_error_sink: bool = False
    req: tuple[str, ...] = ()
    access: tuple[str, ...] = ()
    sensitivity: Sensitivity | None = None
    monoids: dict[str, MonoidDecl] = Field(default_factory=dict)
    lineage_mode: LineageMode
    epoch_column: str | None = None
    versioned: VersionedDecl | None = None
    external: bool = False
    owner: str | None = None

    @property
    def relation(self) -> str:
        """`database.schema.identifier`, as OpenLineage names PostgreSQL datasets."""
        return ".".join(p for p in (self.database, self.schema_name, self.identifier) if p)

    def visible_to(self, roles: set[str]) -> bool:
        """Whether a principal holding `roles` may see this entity (no declared roles: everyone)."""
        return not self.access or bool(roles.intersection(self.access))
