"""Column lineage of a dbt project from its compiled SQL, with OpenLineage transformation types.

Each model's SQL is qualified by sqlglot against the schemas validation resolves for the whole project
(`services.validation.domain.analysis.project_schemas`), so `select *` expands and every column names its
table; each output column is then traced through CTEs, subqueries and set operations to base relations.
Output columns get DIRECT edges (subtype IDENTITY, TRANSFORMATION or AGGREGATION; `masking` under a hash);
columns that only decide which rows exist (WHERE, JOIN, GROUP BY, ORDER BY, window partitions) are INDIRECT
dataset-level edges.

Examples:
    >>> lineage = project_column_lineage(manifest)
    >>> lineage["model.cdme_trading.stg_trades"].fields["notional"][0]
    Edge(unique_id='source.cdme_trading.raw_trading.trades', column='notional', type='DIRECT', subtype='IDENTITY', masking=False)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, build_scope
from sqlglot.schema import MappingSchema

from services.core.artifacts import Catalog, Manifest, ManifestNode, SourceDefinition

# One notion of "under a hash" for validation (personal data) and lineage (masking).
from services.validation.domain.analysis import (
    RelationSchema,
    _under_hash,
    project_schemas,
    sqlglot_dialect,
)

logging.getLogger("sqlglot").setLevel(logging.ERROR)

# Ranking of DIRECT subtypes along a path: the strongest transformation met on the way wins.
_RANK = {"IDENTITY": 0, "TRANSFORMATION": 1, "AGGREGATION": 2}
_MAX_DEPTH = 64


@dataclass(frozen=True)
class Edge:
    """One input column of an output column (or of the whole dataset, for INDIRECT edges)."""

    unique_id: str
    column: str
    type: str
    subtype: str
    masking: bool = False


@dataclass
class ModelLineage:
    """The column lineage of one model: per output column its inputs, and the dataset-level INDIRECT inputs."""

    fields: dict[str, list[Edge]] = field(default_factory=dict)
    dataset: list[Edge] = field(default_factory=list)
    error: str | None = None

    @property
    def edges(self) -> int:
        """How many column edges the model has (DIRECT and INDIRECT)."""
        return sum(len(v) for v in self.fields.values()) + len(self.dataset)


def _norm(*parts: str | None) -> tuple[str, str, str]:
    a, b, c = ((p or "").lower() for p in parts)
    return a, b, c


def _subtype(projection: exp.Expr) -> str:
    inner = projection.this if isinstance(projection, exp.Alias) else projection
    if isinstance(inner, exp.Column):
        return "IDENTITY"
    if any(isinstance(n, exp.AggFunc) and not n.find_ancestor(exp.Window) for n in inner.walk()):
        return "AGGREGATION"
    return "TRANSFORMATION"


class _Tracer:
    """Traces columns of one qualified query to base relations."""

    def __init__(self, by_relation: dict[tuple[str, str, str], str]) -> None:
        self.by_relation = by_relation

    def _table_uid(self, table: exp.Table) -> str | None:
        key = _norm(table.catalog, table.db, table.name)
        return self.by_relation.get(key) or self.by_relation.get(("", key[1], key[2]))

    def projection(self, scope: Scope, name: str) -> exp.Expr | None:
        for select in scope.expression.selects if isinstance(scope.expression, exp.Query) else []:
            if select.alias_or_name.lower() == name.lower():
                return select
        return None

    def trace_column(
        self, scope: Scope, column: exp.Column, subtype: str, masking: bool, depth: int
    ) -> list[tuple[str, str, str, bool]]:
        """Base (unique id, column, subtype, masking) of a column referenced in `scope`."""
        if depth > _MAX_DEPTH:
            return []
        source = scope.sources.get(column.table) if column.table else None
        if source is None and not column.table and len(scope.sources) == 1:
            source = next(iter(scope.sources.values()))
        if isinstance(source, exp.Table):
            uid = self._table_uid(source)
            return [(uid, column.name, subtype, masking)] if uid else []
        if isinstance(source, Scope):
            return self.trace_output(source, column.name, subtype, masking, depth + 1)
        return []

    def trace_output(
        self, scope: Scope, name: str, subtype: str, masking: bool, depth: int
    ) -> list[tuple[str, str, str, bool]]:
        """Base columns an output column `name` of `scope` reads, each with the strongest transformation."""
        if scope.set_operation_scopes:
            found: list[tuple[str, str, str, bool]] = []
            position = self._position(scope, name)
            for branch in scope.set_operation_scopes:
                branch_name = self._name_at(branch, position) if position is not None else name
                if branch_name is not None:
                    found += self.trace_output(branch, branch_name, subtype, masking, depth + 1)
            return found
        projection = self.projection(scope, name)
        if projection is None:
            # `select *` over a relation of unknown columns stays unexpanded: the name passes through it.
            selects = scope.expression.selects if isinstance(scope.expression, exp.Query) else []
            star = any(isinstance(s, exp.Star) or (isinstance(s, exp.Column) and s.is_star) for s in selects)
            if star and len(scope.sources) == 1:
                alias = next(iter(scope.sources))
                return self.trace_column(scope, exp.column(name, table=alias), subtype, masking, depth)
            return []
        here = _subtype(projection)
        combined = here if _RANK[here] > _RANK[subtype] else subtype
        found = []
        for column in projection.find_all(exp.Column):
            if column.find_ancestor(exp.Select) is not projection.find_ancestor(exp.Select):
                continue  # a scalar subquery's own columns belong to its own scope
            masked = masking or _under_hash(column, projection)
            found += self.trace_column(scope, column, combined, masked, depth)
        return found

    def _position(self, scope: Scope, name: str) -> int | None:
        left = scope.set_operation_scopes[0]
        while left.set_operation_scopes:
            left = left.set_operation_scopes[0]
        selects = left.expression.selects if isinstance(left.expression, exp.Query) else []
        for i, select in enumerate(selects):
            if select.alias_or_name.lower() == name.lower():
                return i
        return None

    @staticmethod
    def _name_at(scope: Scope, position: int) -> str | None:
        while scope.set_operation_scopes:
            scope = scope.set_operation_scopes[0]
        selects = scope.expression.selects if isinstance(scope.expression, exp.Query) else []
        return selects[position].alias_or_name if position < len(selects) else None

    def indirect(self, root: Scope) -> list[tuple[str, str, str, bool]]:
        """Columns that decide which rows exist or how they group, in every scope of the query."""
        found: list[tuple[str, str, str, bool]] = []
        for scope in root.traverse():
            query = scope.expression
            clauses: list[tuple[str, exp.Expr | None]] = [
                ("FILTER", query.args.get("where")),
                ("FILTER", query.args.get("having")),
                ("GROUP_BY", query.args.get("group")),
                ("SORT", query.args.get("order")),
            ]
            clauses += [("JOIN", join.args.get("on")) for join in query.args.get("joins") or []]
            clauses += [("WINDOW", w.args.get("partition_by") and w) for w in query.find_all(exp.Window)]
            for subtype, clause in clauses:
                if not isinstance(clause, exp.Expr):
                    continue
                for column in clause.find_all(exp.Column):
                    for uid, name, _, _ in self.trace_column(scope, column, "IDENTITY", False, 0):
                        found.append((uid, name, subtype, False))
        return found


def _mapping(
    tree: exp.Expr, tracer: _Tracer, schemas: dict[str, RelationSchema], dialect: str | None
) -> MappingSchema:
    nested: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for table in tree.find_all(exp.Table):
        if not table.name or (not table.db and table.name.lower() in ctes):
            continue
        uid = tracer._table_uid(table)
        schema = schemas.get(uid) if uid else None
        if schema is None or not schema.columns:
            continue
        columns = {c: (t or "unknown") for c, t in schema.columns.items()}
        nested.setdefault(table.catalog or "", {}).setdefault(table.db or "", {})[table.name] = columns
    try:
        return MappingSchema(cast(dict[str, object], nested), dialect=dialect, normalize=True)
    except SqlglotError:
        return MappingSchema(dialect=dialect)


def model_column_lineage(
    node: ManifestNode,
    *,
    by_relation: dict[tuple[str, str, str], str],
    schemas: dict[str, RelationSchema],
    dialect: str | None,
) -> ModelLineage:
    """The column lineage of one model's compiled SQL (an `error` instead when it cannot be derived)."""
    if not node.compiled_code:
        return ModelLineage(error="no compiled SQL")
    tracer = _Tracer(by_relation)
    try:
        tree = sqlglot.parse_one(node.compiled_code, dialect=dialect)
        qualified = qualify(
            tree,
            schema=_mapping(tree, tracer, schemas, dialect),
            dialect=dialect,
            validate_qualify_columns=False,
            allow_partial_qualification=True,
            quote_identifiers=False,
            identify=False,
        )
        root = build_scope(qualified)
    except (SqlglotError, RecursionError, KeyError, ValueError) as e:
        return ModelLineage(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if root is None:
        return ModelLineage(error="the SQL has no query")
    result = ModelLineage()
    outputs = [s.alias_or_name for s in _outer_selects(root)]
    for name in outputs:
        seen: dict[tuple[str, str], Edge] = {}
        for uid, column, subtype, masking in tracer.trace_output(root, name, "IDENTITY", False, 0):
            edge = Edge(uid, column.lower(), "DIRECT", subtype, masking)
            previous = seen.get((uid, edge.column))
            if previous is None or _RANK[subtype] > _RANK[previous.subtype]:
                seen[(uid, edge.column)] = edge
        result.fields[name.lower()] = list(seen.values())
    indirect: dict[tuple[str, str, str], Edge] = {}
    for uid, column, subtype, _ in tracer.indirect(root):
        indirect.setdefault((uid, column.lower(), subtype), Edge(uid, column.lower(), "INDIRECT", subtype))
    result.dataset = list(indirect.values())
    return result


def _outer_selects(root: Scope) -> list[exp.Expr]:
    scope = root
    while scope.set_operation_scopes:
        scope = scope.set_operation_scopes[0]
    query = scope.expression
    return list(query.selects) if isinstance(query, exp.Query) else []


def relation_index(manifest: Manifest) -> dict[tuple[str, str, str], str]:
    """Unique id of every data node by (database, schema, identifier), lower-cased, also without database."""
    index: dict[tuple[str, str, str], str] = {}
    for node in manifest.entities():
        if isinstance(node, ManifestNode) and node.relation_name is None:
            continue
        identifier = node.identifier if isinstance(node, SourceDefinition) else (node.alias or node.name)
        key = _norm(node.database, node.schema_, identifier)
        index[key] = node.unique_id
        index.setdefault(("", key[1], key[2]), node.unique_id)
    return index


def project_column_lineage(
    manifest: Manifest,
    *,
    catalog: Catalog | None = None,
    project_dir: Path | None = None,
    schemas: dict[str, RelationSchema] | None = None,
) -> dict[str, ModelLineage]:
    """The column lineage of every model and snapshot of `manifest`, by unique id.

    Args:
        manifest: A manifest with compiled SQL.
        catalog: The catalog, when there is one (the most reliable schemas).
        project_dir: The project's directory, for seed headers when there is no catalog.
        schemas: The project's resolved schemas, when the caller already has them (`project_schemas`).

    Returns:
        Per model: output column -> DIRECT input edges, and the INDIRECT dataset-level edges.
    """
    if schemas is None:
        schemas = project_schemas(manifest, catalog=catalog, project_dir=project_dir)
    index = relation_index(manifest)
    dialect = sqlglot_dialect(manifest.metadata.adapter_type)
    return {
        node.unique_id: model_column_lineage(node, by_relation=index, schemas=schemas, dialect=dialect)
        for node in manifest.nodes.values()
        if node.resource_type in {"model", "snapshot"} and node.config.enabled
    }
