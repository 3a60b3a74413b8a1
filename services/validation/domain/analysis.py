"""Static analysis of a dbt project's compiled SQL against the whole project's topology.

Schemas are resolved in topological order, each from the best source there is: the catalog (what the warehouse
says), an enforced contract, the model's own SQL qualified against its upstreams (complete when every `*`
expanded), then YAML-documented columns, which may be a subset and so never prove a column absent. A column
is a VIOLATION only when it is missing from a schema known to be complete; where the schema is partial or
unknown the reference is UNVERIFIABLE, never reported as a hallucination.

Examples:
    >>> report = analyze_project(load_manifest(path), catalog=None, ldm=None)
    >>> [f.message for f in report.errors]
    ['column `counterparty_nm` does not exist in `stg_counterparties`; did you mean `counterparty_name`?']
"""

from __future__ import annotations

import csv
import difflib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope
from sqlglot.schema import MappingSchema

from services.core.artifacts import Catalog, Manifest, ManifestNode, SourceDefinition
from services.core.ldm import Ldm, entity_name
from services.validation.domain.findings import Coverage, Finding, Report
from services.validation.domain.volatility import nondeterministic_functions

# sqlglot warns on every construct its scope walker skips; the analysis reports those as UNVERIFIABLE itself.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

# dbt adapter names that sqlglot spells differently.
_DIALECTS = {
    "sqlserver": "tsql",
    "synapse": "tsql",
    "fabric": "tsql",
    "spark": "spark",
    "databricks": "databricks",
}
# Columns dbt adds to every snapshot.
_SNAPSHOT_COLUMNS = ("dbt_scd_id", "dbt_updated_at", "dbt_valid_from", "dbt_valid_to")
# Names PostgreSQL resolves without a table, which sqlglot parses as columns.
_BARE_KEYWORDS = frozenset(
    {"current_user", "session_user", "user", "current_role", "current_catalog", "current_schema"}
)


@dataclass
class RelationSchema:
    """The columns of a relation and whether that list is known to be complete."""

    columns: dict[str, str | None]
    complete: bool
    origin: str


@dataclass
class _Stats:
    references: int = 0
    resolved: int = 0


@dataclass
class _Context:
    manifest: Manifest
    dialect: str | None
    ldm: Ldm | None
    project: str | None
    by_relation: dict[tuple[str, str, str], str] = field(default_factory=dict)
    project_schemas: set[str] = field(default_factory=set)
    schemas: dict[str, RelationSchema] = field(default_factory=dict)


def _norm(*parts: str | None) -> tuple[str, str, str]:
    catalog, db, name = (p.lower() if p else "" for p in parts)
    return catalog, db, name


def sqlglot_dialect(adapter_type: str | None) -> str | None:
    """The sqlglot dialect of a dbt adapter (None: sqlglot's generic SQL)."""
    if not adapter_type:
        return None
    name = _DIALECTS.get(adapter_type, adapter_type)
    return name if name in sqlglot.Dialect.classes else None


def _yaml_columns(node: ManifestNode | SourceDefinition) -> dict[str, str | None]:
    return {c.name.lower(): c.data_type for c in node.columns.values()}


def _seed_header(node: ManifestNode, project_dir: Path | None) -> list[str] | None:
    if project_dir is None:
        return None
    try:
        with (project_dir / node.original_file_path).open(newline="") as handle:
            return next(csv.reader(handle), None)
    except OSError:
        return None


def _base_schema(
    node: ManifestNode | SourceDefinition, catalog: Catalog | None, project_dir: Path | None
) -> RelationSchema | None:
    """The schema of a node that does not depend on its SQL, or None if the SQL must be analysed."""
    if catalog is not None and (warehouse := catalog.columns_of(node.unique_id)):
        return RelationSchema({k: v.type for k, v in warehouse.items()}, complete=True, origin="catalog")
    yaml = _yaml_columns(node)
    if isinstance(node, ManifestNode):
        if node.resource_type == "seed":
            header = _seed_header(node, project_dir)
            if header:
                columns = {h.strip().lower(): yaml.get(h.strip().lower()) for h in header}
                return RelationSchema(columns, complete=True, origin="seed file")
            return RelationSchema(yaml, complete=False, origin="yaml")
        if node.contract.get("enforced") and yaml:
            return RelationSchema(yaml, complete=True, origin="contract")
        return None
    return RelationSchema(yaml, complete=False, origin="yaml" if yaml else "unknown")


def _relation_key(table: exp.Table) -> tuple[str, str, str]:
    return _norm(table.catalog, table.db, table.name)


def _topological(manifest: Manifest) -> list[str]:
    graph = {
        uid: [d for d in node.depends_on.nodes if d in manifest.nodes]
        for uid, node in manifest.nodes.items()
        if node.resource_type in {"model", "snapshot", "seed"}
    }
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError:
        return list(graph)


def _source_line(node: ManifestNode, name: str, qualifier: str | None) -> tuple[int | None, int | None]:
    """Where the user wrote `name` in the model's own file: the first whole-word match, qualified if possible."""
    patterns = [rf"\b{re.escape(qualifier)}\s*\.\s*\"?{re.escape(name)}\b"] if qualifier else []
    patterns.append(rf"\b{re.escape(name)}\b")
    # The model's own file first; the compiled SQL when the name only appears after rendering (a macro's).
    for code in (node.raw_code, node.compiled_code or ""):
        lines = code.splitlines()
        for pattern in patterns:
            regex = re.compile(pattern, re.IGNORECASE)
            for number, text in enumerate(lines, start=1):
                if (match := regex.search(text)) is not None:
                    return number, match.start() + 1
    return None, None


def _did_you_mean(name: str, candidates: Iterator[str] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class _ModelAnalysis:
    """Analyses one model's compiled SQL: existence of relations and columns, determinism, morphism."""

    def __init__(self, ctx: _Context, node: ManifestNode) -> None:
        self.ctx = ctx
        self.node = node
        self.name = entity_name(node, ctx.project)
        self.findings: list[Finding] = []
        self.stats = _Stats()
        self.unknown_relations = False
        self.tainted: set[str] = set()

    def run(self) -> RelationSchema:
        sql = self.node.compiled_code
        if not sql:
            self.findings.append(
                Finding.of(
                    "parse", "UNVERIFIABLE", self.name, "no compiled SQL in the manifest; run `dbt compile`"
                )
            )
            return RelationSchema({}, complete=False, origin="unknown")
        try:
            tree = sqlglot.parse_one(sql, dialect=self.ctx.dialect)
        except SqlglotError as e:
            message = f"the compiled SQL does not parse as {self.ctx.dialect or 'generic'} SQL: {str(e).splitlines()[0]}"
            self.findings.append(Finding.of("parse", "UNVERIFIABLE", self.name, message))
            return RelationSchema({}, complete=False, origin="unknown")
        self._check_determinism(tree)
        self._check_iso(tree)
        mapping = self._mapping_schema(tree)
        try:
            qualified = qualify(
                tree,
                schema=mapping,
                dialect=self.ctx.dialect,
                validate_qualify_columns=False,
                allow_partial_qualification=True,
                quote_identifiers=False,
                identify=False,
            )
        except (SqlglotError, RecursionError, KeyError, ValueError) as e:
            message = f"could not resolve the model's columns ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self.findings.append(Finding.of("parse", "UNVERIFIABLE", self.name, message))
            return RelationSchema({}, complete=False, origin="unknown")
        self.tainted = _uncertain_ctes(qualified)
        for scope in traverse_scope(qualified):
            self._check_scope(scope)
        return self._output_schema(qualified)

    # -- relations -------------------------------------------------------------------------------------------

    def _mapping_schema(self, tree: exp.Expr) -> MappingSchema:
        ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
        nested: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
        for table in tree.find_all(exp.Table):
            if not table.name or (not table.db and table.name.lower() in ctes):
                continue
            key = _relation_key(table)
            uid = self.ctx.by_relation.get(key) or self.ctx.by_relation.get(("", key[1], key[2]))
            if uid is None:
                self._unknown_relation(table, key)
                continue
            schema = self.ctx.schemas.get(uid)
            # A partial schema would expand `*` to a subset and resolve wrongly: leave such tables unknown.
            if schema is None or not schema.complete or not schema.columns:
                continue
            columns = {c: (t or "unknown") for c, t in schema.columns.items()}
            catalog_name = table.catalog or ""
            nested.setdefault(catalog_name, {}).setdefault(table.db or "", {})[table.name] = columns
        try:
            return MappingSchema(cast(dict[str, object], nested), dialect=self.ctx.dialect, normalize=True)
        except SqlglotError:
            return MappingSchema(dialect=self.ctx.dialect)

    def _unknown_relation(self, table: exp.Table, key: tuple[str, str, str]) -> None:
        self.unknown_relations = True
        if not table.db or key[1] not in self.ctx.project_schemas:
            return  # a table outside the project's schemas is external, not a hallucination
        known = [k[2] for k in self.ctx.by_relation if k[1] == key[1]]
        line, col = _source_line(self.node, table.name, None)
        message = (
            f"relation `{table.db}.{table.name}` is not a source, seed, snapshot or model of the project"
            f"{_did_you_mean(key[2], known)}"
        )
        self.findings.append(
            Finding.of("existence.relation", "VIOLATION", self.name, message, line=line, column=col)
        )

    def _relation_label(self, uid: str) -> str:
        node = self.ctx.manifest.nodes.get(uid) or self.ctx.manifest.sources.get(uid)
        return entity_name(node, self.ctx.project) if node is not None else uid

    # -- columns ---------------------------------------------------------------------------------------------

    def _check_scope(self, scope: Scope) -> None:
        selects = set(getattr(scope.expression, "named_selects", []) or [])
        selects_lower = {s.lower() for s in selects}
        for column in scope.columns:
            if isinstance(column.this, exp.Star):
                continue
            name = column.name.lower()
            if not name:
                continue
            self.stats.references += 1
            verdict = self._resolve(scope, column, name, selects_lower)
            if verdict == "OK":
                self.stats.resolved += 1

    def _source_of(self, scope: Scope, alias: str) -> exp.Expr | Scope | None:
        current: Scope | None = scope
        while current is not None:
            if alias in current.sources:
                source: exp.Expr | Scope = current.sources[alias]
                return source
            current = current.parent
        return None

    def _scope_columns(self, source: Scope, alias: str) -> list[str] | None:
        if alias.lower() in self.tainted:
            return None
        expression = source.expression
        if any(
            isinstance(s, exp.Star) or (isinstance(s, exp.Column) and isinstance(s.this, exp.Star))
            for s in getattr(expression, "selects", [])
        ):
            return None
        names = getattr(expression, "named_selects", None)
        return [n.lower() for n in names] if names else None

    def _resolve(self, scope: Scope, column: exp.Column, name: str, selects: set[str]) -> str:
        table = column.table
        if not table:
            return self._resolve_unqualified(scope, column, name, selects)
        source = self._source_of(scope, table)
        if isinstance(source, exp.Table):
            uid = self.ctx.by_relation.get(_relation_key(source)) or self.ctx.by_relation.get(
                ("", source.db.lower(), source.name.lower())
            )
            schema = self.ctx.schemas.get(uid) if uid else None
            if schema is None:
                return "UNVERIFIABLE"
            if name in schema.columns:
                return "OK"
            if not schema.complete:
                return "UNVERIFIABLE"
            self._missing(column, name, self._relation_label(uid or ""), list(schema.columns))
            return "VIOLATION"
        if isinstance(source, Scope):
            columns = self._scope_columns(source, table)
            if columns is None:
                return "UNVERIFIABLE"
            if name in columns:
                return "OK"
            self._missing(column, name, table, columns)
            return "VIOLATION"
        return "UNVERIFIABLE"

    def _resolve_unqualified(self, scope: Scope, column: exp.Column, name: str, selects: set[str]) -> str:
        if name in selects or name in _BARE_KEYWORDS or name in {a.lower() for a in scope.sources}:
            return "OK"
        candidates: list[str] = []
        labels: list[str] = []
        for alias, source in scope.sources.items():
            if isinstance(source, exp.Table):
                uid = self.ctx.by_relation.get(_relation_key(source))
                schema = self.ctx.schemas.get(uid) if uid else None
                if schema is None or not schema.complete:
                    return "UNVERIFIABLE"
                candidates += list(schema.columns)
                labels.append(self._relation_label(uid or ""))
            elif isinstance(source, Scope):
                columns = self._scope_columns(source, alias)
                if columns is None:
                    return "UNVERIFIABLE"
                candidates += columns
                labels.append(alias)
            else:
                return "UNVERIFIABLE"
        if not labels or scope.parent is not None or name in candidates:
            # Inside a subquery an unqualified name may be an outer column; qualify resolved what it could.
            return "UNVERIFIABLE" if name not in candidates else "OK"
        self._missing(column, name, " or ".join(f"{label}" for label in labels), candidates)
        return "VIOLATION"

    def _missing(self, column: exp.Column, name: str, relation: str, candidates: list[str]) -> None:
        line, col = _source_line(self.node, column.name, column.table or None)
        message = f"column `{column.name}` does not exist in `{relation}`{_did_you_mean(name, candidates)}"
        self.findings.append(
            Finding.of("existence.column", "VIOLATION", self.name, message, line=line, column=col)
        )

    def _output_schema(self, qualified: exp.Expr) -> RelationSchema:
        root = qualified
        while isinstance(root, exp.SetOperation):
            root = root.left
        selects = getattr(root, "selects", [])
        names = [s.alias_or_name.lower() for s in selects]
        reads_uncertain = any(
            not t.db and t.name.lower() in self.tainted
            for t in root.find_all(exp.Table)
            if t.find_ancestor(exp.CTE) is None
        )
        complete = (
            bool(names)
            and not reads_uncertain
            and not any(
                isinstance(s, exp.Star) or (isinstance(s, exp.Column) and isinstance(s.this, exp.Star))
                for s in selects
            )
        )
        yaml = _yaml_columns(self.node)
        columns: dict[str, str | None] = {n: yaml.get(n) for n in names if n and n != "*"}
        if self.node.resource_type == "snapshot":
            columns.update(dict.fromkeys(_SNAPSHOT_COLUMNS))
        if not complete:
            columns = {**yaml, **columns}
        return RelationSchema(columns, complete=complete, origin="inferred" if complete else "yaml")

    # -- determinism and morphism ----------------------------------------------------------------------------

    def _declared(self) -> tuple[bool, str | None, bool]:
        entity = self.ctx.ldm.by_unique_id(self.node.unique_id) if self.ctx.ldm else None
        if entity is None:
            return False, None, False
        governed = bool(self.node.cdme)
        return governed, entity.kind, entity.external

    def _check_determinism(self, tree: exp.Expr) -> None:
        governed, _, external = self._declared()
        if external:
            return
        volatile = nondeterministic_functions()
        for func in tree.find_all(exp.Func):
            rendered = func.name if isinstance(func, exp.Anonymous) else func.sql(dialect="postgres")
            fname = rendered.split("(")[0].strip().lower()
            if fname not in volatile:
                continue
            line, col = _source_line(self.node, fname, None)
            message = (
                f"`{fname}` is non-deterministic: two runs on the same data differ; pass the value in "
                "(e.g. the epoch var) or declare the model an external morphism (meta.cdme.external: true)"
            )
            finding = Finding.of("determinism", "VIOLATION", self.name, message, line=line, column=col)
            if not governed:
                # A model that has not opted into CDME's contract gets the advice, not a rejection.
                finding = finding.model_copy(update={"severity": "warning"})
            self.findings.append(finding)

    def _check_iso(self, tree: exp.Expr) -> None:
        _, kind, _ = self._declared()
        if kind != "iso":
            return
        problems: list[tuple[str, str]] = []  # what the SQL does, and the keyword that shows where
        if isinstance(tree, exp.SetOperation):
            problems.append(("a set operation (UNION/INTERSECT/EXCEPT)", "union"))
        if isinstance(tree, exp.Select):
            if tree.args.get("group"):
                problems.append(("GROUP BY", "group"))
            if tree.args.get("distinct"):
                problems.append(("DISTINCT", "distinct"))
            if tree.args.get("limit"):
                problems.append(("LIMIT", "limit"))
            for join in tree.args.get("joins") or []:
                if (join.side or "").upper() not in {"LEFT", "FULL"} and (join.kind or "").upper() != "CROSS":
                    problems.append(("an inner join that can drop rows", "join"))
                    break
        for problem, keyword in problems:
            line, col = _source_line(self.node, keyword, None)
            message = (
                f"declared `kind: iso` (1:1) but the SQL has {problem}; declare the kind it is or remove it"
            )
            self.findings.append(
                Finding.of("morphism.iso", "VIOLATION", self.name, message, line=line, column=col)
            )


@dataclass(frozen=True)
class _Analysed:
    name: str
    schema: RelationSchema
    findings: tuple[Finding, ...]
    stats: _Stats
    unknown_relations: bool


# Per-model results keyed by everything they depend on: the compiled SQL, the dialect, the model's declarations
# and the schemas of its upstreams. Revalidating after one model changes re-analyses that model and whatever
# its new schema affects; everything else comes from here.
_CACHE: OrderedDict[int, _Analysed] = OrderedDict()
_CACHE_SIZE = 20_000


def _schema_fingerprint(schema: RelationSchema | None) -> object:
    return None if schema is None else (tuple(schema.columns.items()), schema.complete)


def _analysis_of(ctx: _Context, node: ManifestNode, relations_fingerprint: int) -> _Analysed:
    declared = None
    if ctx.ldm is not None and (entity := ctx.ldm.by_unique_id(node.unique_id)) is not None:
        declared = (bool(node.cdme), entity.kind, entity.external)
    key = hash(
        (
            node.unique_id,
            node.compiled_code,
            node.raw_code,
            ctx.dialect,
            declared,
            relations_fingerprint,
            tuple(sorted(_yaml_key(node))),
            tuple((uid, _schema_fingerprint(ctx.schemas.get(uid))) for uid in node.depends_on.nodes),
        )
    )
    cached = _CACHE.get(key)
    if cached is not None:
        _CACHE.move_to_end(key)
        return cached
    analysis = _ModelAnalysis(ctx, node)
    schema = analysis.run()
    result = _Analysed(
        analysis.name, schema, tuple(analysis.findings), analysis.stats, analysis.unknown_relations
    )
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _yaml_key(node: ManifestNode) -> list[tuple[str, str | None]]:
    return list(_yaml_columns(node).items())


def _width(expression: exp.Expr) -> int | None:
    while isinstance(expression, exp.SetOperation):
        expression = expression.left
    selects = getattr(expression, "selects", None)
    return len(selects) if selects is not None else None


def _uncertain_ctes(tree: exp.Expr) -> set[str]:
    """CTEs whose columns cannot be trusted.

    Those are a set operation whose branches differ in width, and every CTE that reads from one: `dbt compile`
    without a warehouse leaves such unions behind (`union_relations` emits `*` placeholders).
    """
    tainted: set[str] = set()
    for setop in tree.find_all(exp.SetOperation):
        if _width(setop.left) != _width(setop.right):
            cte = setop.find_ancestor(exp.CTE)
            if cte is not None:
                tainted.add(cte.alias_or_name.lower())
    ctes = list(tree.find_all(exp.CTE))
    changed = bool(tainted)
    while changed:
        changed = False
        for cte in ctes:
            name = cte.alias_or_name.lower()
            if name not in tainted and any(
                not t.db and t.name.lower() in tainted for t in cte.find_all(exp.Table)
            ):
                tainted.add(name)
                changed = True
    return tainted


def analyze_project(
    manifest: Manifest,
    *,
    catalog: Catalog | None = None,
    ldm: Ldm | None = None,
    project_dir: Path | None = None,
) -> Report:
    """Validate every model of `manifest`; every finding is reported, not only the first.

    Args:
        manifest: A manifest with compiled SQL (`dbt compile` or `dbt build` wrote it).
        catalog: The catalog, when available: the warehouse's own columns, the most reliable schemas.
        ldm: The project's LDM, for the rules that depend on declarations (determinism, morphism kinds).
        project_dir: The project's directory, to read seed headers when there is no catalog.

    Returns:
        The findings and the coverage of the analysis.
    """
    ctx = _Context(
        manifest=manifest,
        dialect=sqlglot_dialect(manifest.metadata.adapter_type),
        ldm=ldm,
        project=manifest.metadata.project_name,
    )
    for node in manifest.entities():
        if node.relation_name is None and isinstance(node, ManifestNode):
            continue
        key = _norm(
            node.database,
            node.schema_,
            node.identifier if isinstance(node, SourceDefinition) else (node.alias or node.name),
        )
        ctx.by_relation[key] = node.unique_id
        ctx.by_relation.setdefault(("", key[1], key[2]), node.unique_id)
        ctx.project_schemas.add(key[1])
    for source in manifest.sources.values():
        base = _base_schema(source, catalog, project_dir)
        if base is not None:
            ctx.schemas[source.unique_id] = base

    relations_fingerprint = hash(frozenset(ctx.by_relation.items()))
    findings: list[Finding] = []
    models = 0
    unresolved: list[str] = []
    totals = _Stats()
    for uid in _topological(manifest):
        node = manifest.nodes[uid]
        if not node.config.enabled:
            continue
        base = _base_schema(node, catalog, project_dir)
        if node.resource_type == "seed":
            ctx.schemas[uid] = base or RelationSchema(_yaml_columns(node), complete=False, origin="yaml")
            continue
        analysis = _analysis_of(ctx, node, relations_fingerprint)
        inferred = analysis.schema
        ctx.schemas[uid] = base or inferred
        if node.resource_type != "model":
            continue
        models += 1
        # The same function or column at the same place is one finding, however often the SQL repeats it.
        findings += list(dict.fromkeys(analysis.findings))
        totals.references += analysis.stats.references
        totals.resolved += analysis.stats.resolved
        if (
            analysis.stats.references != analysis.stats.resolved
            or not inferred.complete
            or analysis.unknown_relations
            or any(f.rule == "parse" for f in analysis.findings)
        ):
            unresolved.append(analysis.name)
    coverage = Coverage(
        models=models,
        models_fully_resolved=models - len(unresolved),
        column_references=totals.references,
        column_references_resolved=totals.resolved,
        unresolved_models=unresolved,
    )
    return Report(findings=findings, coverage=coverage)
