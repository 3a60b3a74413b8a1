"""Build the LDM from a manifest, `cdme.yml` and (optionally) a catalog.

Every entity's `meta.cdme` is validated against the vocabulary and cross-checked against the project:
grains, types, roles and requirement keys must be declared in `cdme.yml`; `driving` and `lookups` must be real
upstreams; key, epoch and monoid columns must exist where the entity's columns are known. All problems are
collected, so one run reports every bad declaration, each with the entity and the field.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from services.core.artifacts import Catalog, Manifest, ManifestNode, SourceDefinition
from services.core.errors import LdmError, error_location
from services.core.ldm.config import LineageMode, ProjectConfig
from services.core.ldm.model import (
    ERROR_SINK_FIELDS,
    Column,
    ColumnDecl,
    Entity,
    EntityDecl,
    KeySource,
    Lookup,
    RecordKey,
)

_COMPOSITE_UNIQUE_TESTS = {"unique_combination_of_columns"}


@dataclass(frozen=True)
class LdmProblem:
    """One invalid declaration."""

    entity: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.entity}: meta.cdme.{self.field}: {self.message}"


class LdmDeclarationError(LdmError):
    """One or more `meta.cdme` declarations are invalid; `problems` lists them all."""

    def __init__(self, problems: list[LdmProblem]) -> None:
        self.problems = problems
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}")


@dataclass(frozen=True)
class Ldm:
    """The resolved logical data model of one dbt project."""

    config: ProjectConfig
    entities: Mapping[str, Entity]
    _by_id: Mapping[str, Entity] = field(repr=False)

    def __iter__(self) -> Iterator[Entity]:
        return iter(self.entities.values())

    def entity(self, name: str) -> Entity:
        """The entity called `name` (models by name, sources as `source_name.table`).

        Raises:
            LdmError: No entity has that name.
        """
        try:
            return self.entities[name]
        except KeyError:
            msg = f"unknown entity {name!r}"
            raise LdmError(msg) from None

    def by_unique_id(self, unique_id: str) -> Entity | None:
        """The entity of a dbt unique id, if it is one."""
        return self._by_id.get(unique_id)


def entity_name(node: ManifestNode | SourceDefinition, project: str | None = None) -> str:
    """How declarations refer to a node.

    Sources are `source_name.table`; versioned models `name.v2` (dbt's own spelling); anything else its name.
    Nodes of an installed package (not `project`) are prefixed with the package, so names stay unique.
    """
    if isinstance(node, SourceDefinition):
        name = f"{node.source_name}.{node.name}"
    elif node.version is not None:
        name = f"{node.name}.v{node.version}"
    else:
        name = node.name
    if project is not None and node.package_name != project:
        name = f"{node.package_name}.{name}"
    return name


def _columns(
    node: ManifestNode | SourceDefinition, catalog: Catalog | None, problems: list[LdmProblem], name: str
) -> dict[str, Column]:
    found: dict[str, Column] = {}
    catalog_cols = catalog.columns_of(node.unique_id) if catalog else {}
    for col_name, meta in catalog_cols.items():
        found[col_name] = Column(name=col_name, data_type=meta.type)
    for col in node.columns.values():
        key = col.name.lower()
        if (malformed := col.cdme_malformed) is not None:
            problems.append(LdmProblem(name, f"columns.{col.name}.cdme", malformed))
        try:
            decl = ColumnDecl.model_validate(col.cdme)
        except ValidationError as e:
            problems.extend(_problems_from(e, name, f"columns.{col.name}."))
            decl = ColumnDecl()
        existing = found.get(key)
        found[key] = Column(
            name=key,
            data_type=(existing.data_type if existing else None) or col.data_type,
            semantic_type=decl.type,
            sensitivity=decl.sensitivity,
            pseudonymized=decl.pseudonymized,
        )
    return found


def _problems_from(e: ValidationError, entity: str, prefix: str = "") -> list[LdmProblem]:
    problems = []
    for err in e.errors():
        where = error_location(err["loc"])
        text = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(LdmProblem(entity, prefix + where, text))
    return problems


def _inferred_key(
    node: ManifestNode | SourceDefinition, manifest: Manifest
) -> tuple[list[str], KeySource] | None:
    if isinstance(node, ManifestNode):
        for constraint in node.constraints:
            if constraint.type == "primary_key" and constraint.columns:
                return constraint.columns, "primary_key_constraint"
        for col in node.columns.values():
            if any(c.type == "primary_key" for c in col.constraints):
                return [col.name], "primary_key_constraint"
    for test in manifest.tests_on(node.unique_id):
        meta = test.test_metadata
        if meta is None:
            continue
        if meta.name == "unique" and test.column_name:
            return [test.column_name], "unique_test"
        if meta.name in _COMPOSITE_UNIQUE_TESTS:
            cols = meta.arguments.get("combination_of_columns")
            if isinstance(cols, list) and all(isinstance(c, str) for c in cols):
                return cols, "unique_test"
    if isinstance(node, ManifestNode) and node.primary_key:
        return node.primary_key, "dbt_primary_key"
    return None


def _validated_declaration(name: str, cdme: dict[str, Any], problems: list[LdmProblem]) -> EntityDecl:
    # Report an invalid field and keep checking the others: one typo must not hide the next problem.
    remaining = dict(cdme)
    while True:
        try:
            return EntityDecl.model_validate(remaining)
        except ValidationError as e:
            problems.extend(_problems_from(e, name))
            invalid = {err["loc"][0] for err in e.errors() if err["loc"]}
            if not invalid & remaining.keys():
                return EntityDecl()
            remaining = {k: v for k, v in remaining.items() if k not in invalid}


def _upstream_names(node: ManifestNode | SourceDefinition, manifest: Manifest) -> tuple[str, ...]:
    if isinstance(node, SourceDefinition):
        return ()
    names = []
    for uid in node.depends_on.nodes:
        upstream = manifest.nodes.get(uid) or manifest.sources.get(uid)
        if upstream is not None and upstream.resource_type in {"source", "seed", "snapshot", "model"}:
            names.append(entity_name(upstream, manifest.metadata.project_name))
    return tuple(names)


class _EntityCheck:
    """Validates one entity's declaration and accumulates its problems."""

    def __init__(self, name: str, config: ProjectConfig, problems: list[LdmProblem]) -> None:
        self.name = name
        self.problems = problems
        self.grains = [g.name for g in config.grains]
        self.types = {t.name for t in config.types}
        self.roles = {r.name for r in config.roles}
        self.requirements = set(config.requirements)

    def problem(self, fld: str, message: str) -> None:
        self.problems.append(LdmProblem(self.name, fld, message))

    def column_exists(self, fld: str, column: str, columns: Mapping[str, Column]) -> bool:
        if columns and column.lower() not in columns:
            known = ", ".join(sorted(columns))
            self.problem(fld, f"column {column!r} does not exist (known columns: {known})")
            return False
        return True

    def declared(self, fld: str, value: str, allowed: set[str] | list[str], what: str) -> None:
        if value not in allowed:
            self.problem(
                fld, f"unknown {what} {value!r} (declared in cdme.yml: {', '.join(sorted(allowed))})"
            )


def load_ldm(
    manifest: Manifest,
    config: ProjectConfig,
    catalog: Catalog | None = None,
    *,
    lineage_mode: LineageMode | None = None,
) -> Ldm:
    """Resolve every entity of `manifest` against `config`.

    Args:
        manifest: The project's parsed manifest.
        config: The project's `cdme.yml`.
        catalog: The catalog, when available: its columns complete the YAML-declared ones.
        lineage_mode: Replaces `cdme.yml`'s default lineage mode (`CDME_LINEAGE_MODE`); a model's own
            declaration still wins.

    Returns:
        The LDM, with every source, seed, snapshot and model of the manifest.

    Raises:
        LdmDeclarationError: At least one declaration is invalid; `problems` lists each with entity and field.
    """
    problems: list[LdmProblem] = []
    declarations: dict[str, tuple[ManifestNode | SourceDefinition, EntityDecl]] = {}
    for node in manifest.entities():
        name = entity_name(node, manifest.metadata.project_name)
        if (malformed := node.cdme_malformed) is not None:
            problems.append(LdmProblem(name, "cdme", malformed))
        declarations[name] = (node, _validated_declaration(name, node.cdme, problems))

    sinks = {decl.error_sink for _, decl in declarations.values() if decl.error_sink}
    entities: dict[str, Entity] = {}
    for name, (node, decl) in declarations.items():
        entity = _resolve(name, node, decl, manifest, config, catalog, declarations, sinks, problems)
        if decl.lineage_mode is None and lineage_mode is not None:
            entity = entity.model_copy(update={"lineage_mode": lineage_mode})
        entities[name] = entity

    if problems:
        order = {name: i for i, name in enumerate(declarations)}
        raise LdmDeclarationError(sorted(problems, key=lambda p: order.get(p.entity, len(order))))
    return Ldm(config=config, entities=entities, _by_id={e.unique_id: e for e in entities.values()})


def _resolve(
    name: str,
    node: ManifestNode | SourceDefinition,
    decl: EntityDecl,
    manifest: Manifest,
    config: ProjectConfig,
    catalog: Catalog | None,
    declarations: Mapping[str, tuple[Any, EntityDecl]],
    sinks: set[str],
    problems: list[LdmProblem],
) -> Entity:
    check = _EntityCheck(name, config, problems)
    columns = _columns(node, catalog, problems, name)
    upstreams = _upstream_names(node, manifest)
    is_model = node.resource_type == "model"

    if decl.grain is not None:
        check.declared("grain", decl.grain, check.grains, "grain")
    for col in columns.values():
        if col.semantic_type is not None:
            check.declared(f"columns.{col.name}.type", col.semantic_type, check.types, "semantic type")
    for role in decl.access:
        check.declared("access", role, check.roles, "role")
    for req in decl.req:
        check.declared("req", req, check.requirements, "requirement key")

    key: RecordKey | None = None
    if decl.key:
        verified = all([check.column_exists("key", c, columns) for c in decl.key])
        key = RecordKey(
            columns=tuple(c.lower() for c in decl.key), source="declared", verified=verified and bool(columns)
        )
    elif (inferred := _inferred_key(node, manifest)) is not None:
        cols, source = inferred
        key = RecordKey(
            columns=tuple(c.lower() for c in cols),
            source=source,
            verified=bool(columns) and all(c.lower() in columns for c in cols),
        )

    if not is_model:
        for fld, value in (("kind", decl.kind), ("driving", decl.driving), ("error_sink", decl.error_sink)):
            if value:
                check.problem(fld, f"only models are morphisms; a {node.resource_type} cannot declare {fld}")
    if decl.driving is not None and decl.driving not in upstreams:
        check.problem(
            "driving",
            f"{decl.driving!r} is not an upstream of {name} (upstreams: {', '.join(upstreams) or 'none'})",
        )
    # The driving upstream is declared, or it is the one upstream left once the lookups are set aside.
    # A union's upstreams all drive it, so it has no single driving one.
    candidates = [u for u in upstreams if u not in decl.lookups]
    driving = decl.driving
    if driving is None and is_model and decl.kind not in {None, "union"} and len(candidates) == 1:
        driving = candidates[0]
    if is_model and decl.kind not in {None, "union"}:
        if driving is None and len(candidates) > 1:
            check.problem(
                "driving",
                f"several upstreams could drive {name} ({', '.join(candidates)}); declare driving: <one of them> "
                "and the others as lookups with their version semantics",
            )
        elif driving is not None:
            for upstream in candidates:
                if upstream != driving:
                    check.problem(
                        f"lookups.{upstream}",
                        f"{upstream!r} is an upstream of {name} but neither its driving upstream nor a declared "
                        "lookup; declare its version semantics (as_of, latest, exact or var)",
                    )
    lookups = []
    for upstream, lookup in decl.lookups.items():
        if upstream not in upstreams:
            check.problem(f"lookups.{upstream}", f"{upstream!r} is not an upstream of {name}")
        if upstream == driving:
            check.problem(f"lookups.{upstream}", "the driving upstream cannot also be a lookup")
        if lookup.version == "as_of" and not lookup.as_of:
            check.problem(
                f"lookups.{upstream}.as_of",
                "as_of semantics need the driving column to compare (as_of: <column>)",
            )
        if lookup.version == "var" and not lookup.var:
            check.problem(f"lookups.{upstream}.var", "var semantics need the dbt var that names the version")
        lookups.append(Lookup(entity=upstream, version=lookup.version, as_of=lookup.as_of, var=lookup.var))
    if decl.kind == "enrich" and not decl.lookups:
        check.problem(
            "lookups", "an enrich morphism joins at least one lookup; declare it with its version semantics"
        )
    if decl.kind == "filter" and decl.filter is None:
        check.problem("filter", "a filter morphism declares its condition (filter: <SQL predicate>)")

    if decl.error_sink is not None:
        sink = declarations.get(decl.error_sink)
        if sink is None or sink[0].resource_type != "model":
            check.problem("error_sink", f"{decl.error_sink!r} is not a model of the project")
    if name in sinks and node.columns:
        missing = [f for f in ERROR_SINK_FIELDS if f not in columns]
        if missing:
            check.problem("error_sink", f"an error sink must have the columns {', '.join(missing)}")

    if decl.epoch_column is not None:
        check.column_exists("epoch_column", decl.epoch_column, columns)
    if decl.versioned is not None:
        check.column_exists("versioned.valid_from", decl.versioned.valid_from, columns)
    for col_name in decl.monoids:
        check.column_exists(f"monoids.{col_name}", col_name, columns)
    if decl.kind == "aggregate" and not decl.monoids:
        check.problem("monoids", "an aggregate declares the monoid (op and identity) of each folded column")

    relation_id = node.identifier if isinstance(node, SourceDefinition) else (node.alias or node.name)
    return Entity(
        unique_id=node.unique_id,
        name=name,
        resource_type=node.resource_type,
        database=node.database,
        schema_name=node.schema_,
        identifier=relation_id,
        materialized=None if isinstance(node, SourceDefinition) else node.config.materialized,
        upstreams=upstreams,
        columns=columns,
        key=key,
        grain=decl.grain,
        kind=decl.kind,
        driving=driving,
        lookups=tuple(lookups),
        filter=decl.filter,
        error_sink=decl.error_sink,
        is_error_sink=name in sinks,
        req=tuple(decl.req),
        access=tuple(decl.access),
        sensitivity=decl.sensitivity,
        monoids=decl.monoids,
        lineage_mode=decl.lineage_mode or config.defaults.lineage_mode,
        epoch_column=decl.epoch_column,
        versioned=decl.versioned,
        external=decl.external,
        owner=decl.owner,
    )
