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
import multiprocessing
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
from services.validation.domain.findings import Coverage, Finding, Plan, PlanStep, Report
from services.validation.domain.volatility import nondeterministic_functions, reserved_keywords

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
    """The columns of a relation, whether that list is known to be complete, and which are personal data."""

    columns: dict[str, str | None]
    complete: bool
    origin: str
    personal: frozenset[str] = frozenset()


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
    principal: str | None = None
    hidden: dict[tuple[str, str, str], str] = field(default_factory=dict)
    any_personal: bool = False


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
    # A source that opted into CDME (it carries meta.cdme) documents its columns completely; others may list a
    # subset, which proves a column present but never absent.
    governed = bool(yaml) and bool(node.cdme)
    return RelationSchema(yaml, complete=governed, origin="yaml" if yaml else "unknown")


def _relation_key(table: exp.Table) -> tuple[str, str, str]:
    return _norm(table.catalog, table.db, table.name)


def topological_order(manifest: Manifest) -> list[str]:
    """Models, snapshots and seeds, each after everything it depends on."""
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


_PG_MAX_IDENTIFIER = 63
# Type families between which PostgreSQL converts implicitly and safely; anything else needs a cast.
_TYPE_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("timestamp", ("timestamp", "datetime")),
    ("date", ("date",)),
    ("time", ("time",)),
    ("interval", ("interval",)),
    ("boolean", ("bool",)),
    ("json", ("json",)),
    ("uuid", ("uuid",)),
    ("text", ("text", "varchar", "char", "character", "string", "citext", "name", "bpchar")),
    (
        "numeric",
        ("int", "bigint", "smallint", "numeric", "decimal", "real", "double", "float", "money", "number"),
    ),
)
_COMPATIBLE = {frozenset({"date", "timestamp"})}
_HASH_FUNCTIONS = tuple(
    cls
    for name in ("SHA", "SHA2", "SHA2Digest", "MD5", "MD5Digest")
    if isinstance(cls := getattr(exp, name, None), type)
)
_HASH_NAMES = frozenset({"sha224", "sha256", "sha384", "sha512", "digest", "hmac", "crypt"})


# sqlglot normalises functions into classes (`now()` is CurrentTimestamp); what PostgreSQL calls each class is
# rendered once per class, not once per call.
_FUNCTION_NAMES: dict[type, str] = {}


def _postgres_name(func: exp.Func) -> str:
    name = _FUNCTION_NAMES.get(type(func))
    if name is None:
        name = func.sql(dialect="postgres").split("(")[0].strip().lower()
        _FUNCTION_NAMES[type(func)] = name
    return name


def nondeterministic_calls(tree: exp.Expr) -> list[str]:
    """The PostgreSQL names of the calls in `tree` whose result differs between two runs on the same data."""
    volatile = nondeterministic_functions()
    names = (
        func.name.lower() if isinstance(func, exp.Anonymous) else _postgres_name(func)
        for func in tree.find_all(exp.Func)
    )
    return [name for name in names if name in volatile]


_DROPPING_CLAUSES = (
    ("where", "a WHERE filter"),
    ("group", "GROUP BY"),
    ("having", "a HAVING filter"),
    ("distinct", "DISTINCT"),
    ("limit", "LIMIT"),
)


def _dropping_clauses(query: exp.Expr) -> list[tuple[str, str]]:
    """What in one SELECT can leave an input row without an output row, with the keyword that shows where."""
    if not isinstance(query, exp.Select):
        return []
    found = [(what, clause) for clause, what in _DROPPING_CLAUSES if query.args.get(clause)]
    joins = query.args.get("joins") or []
    if any(
        (j.side or "").upper() not in {"LEFT", "FULL"} and (j.kind or "").upper() != "CROSS" for j in joins
    ):
        found.append(("an inner join that can drop rows", "join"))
    return found


def _type_family(data_type: str | None) -> str | None:
    if not data_type:
        return None
    text = data_type.lower().strip()
    if text.endswith("[]") or text.startswith(("_", "array")):
        return "array"
    for family, prefixes in _TYPE_FAMILIES:
        if text.startswith(prefixes):
            return family
    return None


def _families_compatible(left: str, right: str) -> bool:
    return left == right or frozenset({left, right}) in _COMPATIBLE


def _under_hash(column: exp.Expr, stop: exp.Expr) -> bool:
    node = column.parent
    while node is not None and node is not stop.parent:
        if isinstance(node, _HASH_FUNCTIONS) or (
            isinstance(node, exp.Anonymous) and node.name.lower() in _HASH_NAMES
        ):
            return True
        node = node.parent
    return False


def _is_mart(node: ManifestNode) -> bool:
    return (
        "marts" in node.fqn[1:-1]
        or node.schema_.lower() in {"mart", "marts"}
        or node.name.startswith(("fct_", "dim_"))
    )


def _equates_epochs(join: exp.Join, side: tuple[str, str], others: list[tuple[str, str, str]]) -> bool:
    """Whether the join's ON holds `side.epoch = other.epoch` for one of the relations joined before it."""
    condition = join.args.get("on")
    if condition is None:
        return False
    wanted = {(alias, column) for alias, _, column in others}
    for eq in condition.find_all(exp.EQ):
        left, right = eq.this, eq.expression
        if not (isinstance(left, exp.Column) and isinstance(right, exp.Column)):
            continue
        ends = {(left.table.lower(), left.name.lower()), (right.table.lower(), right.name.lower())}
        if side in ends and ends - {side} <= wanted and len(ends) == 2:
            return True
    return False


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
        self.plan: PlanStep | None = None
        self._personal_memo: dict[int, frozenset[str]] = {}
        # Every column reference asks for its source's columns: compute them once per scope and alias.
        self._scope_columns_memo: dict[tuple[int, str], list[str] | None] = {}

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
        self._check_folds(tree)
        self._check_postgres(tree)
        self.plan = self._plan_step(tree)
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
        scopes = list(traverse_scope(qualified))
        for scope in scopes:
            self._check_scope(scope)
            self._check_types(scope)
        self._check_grain(qualified)
        self._check_epochs(qualified)
        schema = self._output_schema(qualified, scopes[-1] if scopes else None)
        self._check_governance(schema)
        return schema

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
        if key in self.ctx.hidden or ("", key[1], key[2]) in self.ctx.hidden:
            # Worded as for a relation that does not exist: the principal must not learn that it does.
            message = f"relation `{table.db}.{table.name}` is unknown to principal `{self.ctx.principal}`"
            self._violation("access", message, at=table.name)
            return
        if not table.db or key[1] not in self.ctx.project_schemas:
            return  # a table outside the project's schemas is external, not a hallucination
        known = [k[2] for k in self.ctx.by_relation if k[1] == key[1]]
        message = (
            f"relation `{table.db}.{table.name}` is not a source, seed, snapshot or model of the project"
            f"{_did_you_mean(key[2], known)}"
        )
        self._violation("existence.relation", message, at=table.name)

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
        key = (id(source), alias)
        if key not in self._scope_columns_memo:
            self._scope_columns_memo[key] = self._compute_scope_columns(source, alias)
        return self._scope_columns_memo[key]

    def _compute_scope_columns(self, source: Scope, alias: str) -> list[str] | None:
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
        if name in _BARE_KEYWORDS or name in {a.lower() for a in scope.sources}:
            return "OK"
        if name in selects:
            # An output name may be referenced where PostgreSQL allows it (ORDER BY, GROUP BY, HAVING); inside
            # the select list it would be the column naming itself. Dialects with lateral aliases stay unproven.
            if column.find_ancestor(exp.Order, exp.Group, exp.Having) is not None:
                return "OK"
            if self.ctx.dialect != "postgres":
                return "UNVERIFIABLE"
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
        message = f"column `{column.name}` does not exist in `{relation}`{_did_you_mean(name, candidates)}"
        self._violation("existence.column", message, at=column.name, qualifier=column.table or None)

    def _output_schema(self, qualified: exp.Expr, root_scope: Scope | None) -> RelationSchema:
        root = qualified
        while isinstance(root, exp.SetOperation):
            root = root.left
        selects = getattr(root, "selects", [])
        names = [s.alias_or_name.lower() for s in selects]
        reads_uncertain = bool(self.tainted) and any(
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
        columns: dict[str, str | None] = {}
        for select, name in zip(selects, names, strict=True):
            if name and name != "*":
                columns[name] = yaml.get(name) or self._projection_type(select, root_scope)
        if self.node.resource_type == "snapshot":
            columns.update(dict.fromkeys(_SNAPSHOT_COLUMNS))
        if not complete:
            columns = {**yaml, **columns}
        personal = (
            self._personal_outputs(root_scope)
            if root_scope is not None and self.ctx.any_personal
            else frozenset()
        )
        declared = self._declared_columns()
        personal = (personal | {c for c, (_, sens, _) in declared.items() if sens == "personal"}) - {
            c for c, (_, _, pseudo) in declared.items() if pseudo
        }
        return RelationSchema(
            columns, complete=complete, origin="inferred" if complete else "yaml", personal=personal
        )

    def _projection_type(self, select: exp.Expr, scope: Scope | None) -> str | None:
        inner = select.this if isinstance(select, exp.Alias) else select
        if isinstance(inner, exp.Cast):
            return inner.to.sql(dialect=self.ctx.dialect).lower()
        if (
            isinstance(inner, exp.Column)
            and scope is not None
            and (origin := self._origin(scope, inner)) is not None
        ):
            return self._type_of(origin)
        return None

    # -- column origins, types and semantic types ---------------------------------------------------------

    def _origin(self, scope: Scope, column: exp.Column, depth: int = 0) -> tuple[str, str] | None:
        """The (relation, column) a column reads, through CTEs and subqueries that pass it on unchanged."""
        if not column.table or depth > 32:
            return None
        source = self._source_of(scope, column.table)
        name = column.name.lower()
        if isinstance(source, exp.Table):
            uid = self._uid(source)
            return (uid, name) if uid is not None else None
        if isinstance(source, Scope) and isinstance(source.expression, exp.Select):
            for projection in source.expression.selects:
                if projection.alias_or_name.lower() != name:
                    continue
                inner = projection.this if isinstance(projection, exp.Alias) else projection
                return self._origin(source, inner, depth + 1) if isinstance(inner, exp.Column) else None
        return None

    def _uid(self, table: exp.Table) -> str | None:
        return self.ctx.by_relation.get(_relation_key(table)) or self.ctx.by_relation.get(
            ("", table.db.lower(), table.name.lower())
        )

    def _type_of(self, origin: tuple[str, str]) -> str | None:
        schema = self.ctx.schemas.get(origin[0])
        return schema.columns.get(origin[1]) if schema is not None else None

    def _semantic_type_of(self, origin: tuple[str, str]) -> str | None:
        entity = self.ctx.ldm.by_unique_id(origin[0]) if self.ctx.ldm else None
        column = entity.columns.get(origin[1]) if entity is not None else None
        return column.semantic_type if column is not None else None

    def _check_types(self, scope: Scope) -> None:
        for comparison in scope.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE):
            self._check_operands(scope, comparison, "is compared with")
        if self.ctx.ldm is not None:
            for arithmetic in scope.find_all(exp.Add, exp.Sub):
                self._check_operands(scope, arithmetic, "is combined with", physical=False)

    def _check_operands(self, scope: Scope, node: exp.Expr, verb: str, *, physical: bool = True) -> None:
        left, right = node.args.get("this"), node.args.get("expression")
        if not (isinstance(left, exp.Column) and isinstance(right, exp.Column)):
            return
        lo, ro = self._origin(scope, left), self._origin(scope, right)
        if lo is None or ro is None:
            return
        lt, rt = self._type_of(lo), self._type_of(ro)
        lf, rf = _type_family(lt), _type_family(rt)
        if physical and lf and rf and not _families_compatible(lf, rf):
            message = (
                f"`{left.sql()}` ({lt}) {verb} `{right.sql()}` ({rt}): there is no implicit cast between "
                f"{lf} and {rf}; cast one side explicitly"
            )
            self._violation("types", message, at=left.name)
            return
        ls, rs = self._semantic_type_of(lo), self._semantic_type_of(ro)
        config = self.ctx.ldm.config if self.ctx.ldm else None
        if ls and rs and config is not None and not (config.is_subtype(ls, rs) or config.is_subtype(rs, ls)):
            message = f"`{left.sql()}` ({ls}) {verb} `{right.sql()}` ({rs}): semantic types {ls} and {rs} do not unify"
            self._violation("types", message, at=left.name)

    # -- grain ------------------------------------------------------------------------------------------------

    def _check_grain(self, qualified: exp.Expr) -> None:
        ldm = self.ctx.ldm
        entity = ldm.by_unique_id(self.node.unique_id) if ldm else None
        if ldm is None or entity is None or entity.grain is None:
            return
        lookups = {lk.entity for lk in entity.lookups}
        grains: dict[str, str] = {}
        for table in qualified.find_all(exp.Table):
            uid = self._uid(table) if table.db else None
            upstream = ldm.by_unique_id(uid) if uid else None
            if upstream is not None and upstream.grain is not None and upstream.name not in lookups:
                grains[upstream.name] = upstream.grain
        root = qualified
        while isinstance(root, exp.SetOperation):
            root = root.left
        aggregated = entity.kind == "aggregate" or bool(
            isinstance(root, exp.Select) and root.args.get("group")
        )
        if not aggregated:
            mixed = {name: g for name, g in grains.items() if g != entity.grain}
            if mixed:
                listed = ", ".join(f"{name} ({g})" for name, g in sorted(mixed.items()))
                message = (
                    f"grain {entity.grain} reads {listed} without aggregating; aggregate to {entity.grain} first "
                    "or declare the upstream a lookup"
                )
                self.findings.append(Finding.of("grain", "VIOLATION", self.name, message))
            return
        chain = ldm.config.grain_chain(entity.grain)
        for name, grain in sorted(grains.items()):
            if grain == entity.grain or (len(chain) > 1 and chain[1] == grain):
                continue
            if grain in chain:
                skipped = ", ".join(chain[1 : chain.index(grain)])
                message = f"aggregates {name} ({grain}) straight to {entity.grain}, skipping {skipped}"
            else:
                message = f"aggregates {name} ({grain}) to {entity.grain}, which does not coarsen {grain} in cdme.yml"
            self.findings.append(Finding.of("grain", "VIOLATION", self.name, message))

    # -- epochs -----------------------------------------------------------------------------------------------

    def _epoch_of(self, table: exp.Table) -> tuple[str, str] | None:
        """The entity name and epoch column of a relation that declares one (`meta.cdme.epoch_column`)."""
        ldm = self.ctx.ldm
        uid = self._uid(table) if table.db and ldm is not None else None
        upstream = ldm.by_unique_id(uid) if ldm is not None and uid else None
        if upstream is None or upstream.epoch_column is None:
            return None
        return upstream.name, upstream.epoch_column.lower()

    def _check_epochs(self, qualified: exp.Expr) -> None:
        """A join of two epoch-partitioned relations either matches their epochs or declares how they relate."""
        ldm = self.ctx.ldm
        entity = ldm.by_unique_id(self.node.unique_id) if ldm else None
        if ldm is None or entity is None:
            return
        # as_of and var say which version of the other side applies; latest and exact do not relate two epochs.
        temporal = {lk.entity for lk in entity.lookups if lk.version in {"as_of", "var"}}
        for select in qualified.find_all(exp.Select):
            source = select.args.get("from_")
            seen: list[tuple[str, str, str]] = []  # alias, entity, epoch column of each epoch relation so far
            if source is not None and isinstance(source.this, exp.Table):
                found = self._epoch_of(source.this)
                if found is not None:
                    seen.append((source.this.alias_or_name.lower(), *found))
            for join in select.args.get("joins") or []:
                if not isinstance(join.this, exp.Table):
                    continue
                found = self._epoch_of(join.this)
                if found is None:
                    continue
                alias, name, column = join.this.alias_or_name.lower(), *found
                if seen and name not in temporal and not _equates_epochs(join, (alias, column), seen):
                    other_alias, other, other_column = seen[0]
                    message = (
                        f"joins {name} to {other} across epochs: the join does not match `{alias}.{column}` "
                        f"with `{other_alias}.{other_column}`; join on the epoch, or declare the temporal "
                        f"semantics (meta.cdme.lookups.{name}: version as_of or var)"
                    )
                    self._violation("lookups", message, at=join.this.name)
                seen.append((alias, name, column))

    # -- governance -------------------------------------------------------------------------------------------

    def _declared_columns(self) -> dict[str, tuple[str | None, str | None, bool]]:
        entity = self.ctx.ldm.by_unique_id(self.node.unique_id) if self.ctx.ldm else None
        if entity is None:
            return {}
        return {n: (c.semantic_type, c.sensitivity, c.pseudonymized) for n, c in entity.columns.items()}

    def _personal_outputs(self, scope: Scope) -> frozenset[str]:
        """Output columns of `scope` that carry personal data not passed through a hash."""
        key = id(scope)
        if key in self._personal_memo:
            return self._personal_memo[key]
        self._personal_memo[key] = frozenset()  # a recursive reference resolves to "not personal"
        expression = scope.expression
        while isinstance(expression, exp.SetOperation):
            expression = expression.left
        personal = set()
        for projection in getattr(expression, "selects", []):
            for column in projection.find_all(exp.Column):
                if not _under_hash(column, projection) and self._is_personal(scope, column):
                    personal.add(projection.alias_or_name.lower())
                    break
        result = frozenset(personal)
        self._personal_memo[key] = result
        return result

    def _is_personal(self, scope: Scope, column: exp.Column) -> bool:
        if not column.table:
            return False
        source = self._source_of(scope, column.table)
        if isinstance(source, exp.Table):
            uid = self._uid(source)
            schema = self.ctx.schemas.get(uid) if uid else None
            return schema is not None and column.name.lower() in schema.personal
        if isinstance(source, Scope):
            return column.name.lower() in self._personal_outputs(source)
        return False

    def _check_governance(self, schema: RelationSchema) -> None:
        if not schema.personal or not _is_mart(self.node):
            return
        for name in sorted(schema.personal):
            message = (
                f"column `{name}` carries personal data into a mart; pseudonymize it "
                "(cdme_pseudonymize) or leave it out"
            )
            self._violation("governance", message, at=name)

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
        for fname in nondeterministic_calls(tree):
            message = (
                f"`{fname}` is non-deterministic: two runs on the same data differ; pass the value in "
                "(e.g. the epoch var) or declare the model an external morphism (meta.cdme.external: true)"
            )
            # A model that has not opted into CDME's contract gets the advice, not a rejection.
            self._violation("determinism", message, at=fname, advisory=not governed)

    def _check_iso(self, tree: exp.Expr) -> None:
        _, kind, _ = self._declared()
        if kind != "iso":
            return
        # WHERE is left out: an iso model may scope its input to the epoch, which is not a row it drops.
        problems = [(what, at) for what, at in _dropping_clauses(tree) if at not in {"where", "having"}]
        if isinstance(tree, exp.SetOperation):
            problems.insert(0, ("a set operation (UNION/INTERSECT/EXCEPT)", "union"))
        for problem, keyword in problems:
            message = (
                f"declared `kind: iso` (1:1) but the SQL has {problem}; declare the kind it is or remove it"
            )
            self._violation("morphism.iso", message, at=keyword)

    def _violation(
        self,
        rule: str,
        message: str,
        *,
        at: str | None = None,
        qualifier: str | None = None,
        advisory: bool = False,
    ) -> None:
        """Record a violation, located where the user wrote `at`; an advisory one is a warning, not an error."""
        line, col = _source_line(self.node, at, qualifier) if at else (None, None)
        finding = Finding.of(rule, "VIOLATION", self.name, message, line=line, column=col)
        self.findings.append(finding.model_copy(update={"severity": "warning"}) if advisory else finding)

    def _check_folds(self, tree: exp.Expr) -> None:
        governed, _, _ = self._declared()
        for fold in tree.find_all(exp.GroupConcat, exp.ArrayAgg, exp.FirstValue, exp.LastValue, exp.NthValue):
            if isinstance(fold, exp.GroupConcat | exp.ArrayAgg):
                ordered = isinstance(fold.this, exp.Order) or fold.find_ancestor(exp.WithinGroup) is not None
            else:
                window = fold.find_ancestor(exp.Window)
                ordered = window is not None and window.args.get("order") is not None
            if ordered:
                continue
            fname = fold.sql(dialect="postgres").split("(")[0].strip().lower()
            message = (
                f"`{fname}` without ORDER BY folds rows in whatever order the database reads them, so its result "
                "is not reproducible; add ORDER BY"
            )
            self._violation("morphism.fold", message, at=fname, advisory=not governed)

    def _check_postgres(self, tree: exp.Expr) -> None:
        if self.ctx.dialect != "postgres":
            return
        relation = self.node.alias or self.node.name
        names = [("relation", relation)] + [
            ("column", a.alias)
            for a in tree.find_all(exp.Alias)
            if a.find_ancestor(exp.CTE, exp.Subquery) is None
        ]
        for what, name in names:
            size = len(name.encode())
            if size > _PG_MAX_IDENTIFIER:
                message = (
                    f"{what} name `{name}` is {size} bytes; PostgreSQL truncates identifiers to "
                    f"{_PG_MAX_IDENTIFIER}, so it would collide with any other name sharing that prefix"
                )
                self.findings.append(Finding.of("postgres", "VIOLATION", self.name, message))
        reserved = reserved_keywords()
        for alias in tree.find_all(exp.Alias):
            identifier = alias.args.get("alias")
            if (
                isinstance(identifier, exp.Identifier)
                and not identifier.quoted
                and identifier.name.lower() in reserved
            ):
                message = (
                    f"`{identifier.name}` is a reserved word in PostgreSQL; quote it or choose another name"
                )
                self._violation("postgres", message, at=identifier.name)

    def _plan_step(self, tree: exp.Expr) -> PlanStep:
        _, declared_kind, _ = self._declared()
        # Every select counts, CTEs included: dbt models filter and fold inside their CTE chains. Counting a
        # lookup's WHERE too over-approximates, which only costs the adjoint service an extra checkpoint.
        reasons: list[str] = []
        if any(op.args.get("distinct") for op in tree.find_all(exp.Union)):
            reasons.append("UNION removes duplicates")
        selects = list(tree.find_all(exp.Select))
        for select in selects:
            reasons += [what for what, _ in _dropping_clauses(select) if what not in reasons]
        joins = [join for select in selects for join in select.args.get("joins") or []]
        if declared_kind is not None:
            kind = declared_kind
        elif "GROUP BY" in reasons:
            kind = "aggregate"
        elif "a WHERE filter" in reasons or "a HAVING filter" in reasons:
            kind = "filter"
        elif isinstance(tree, exp.SetOperation):
            kind = "union"
        elif joins:
            kind = "enrich"
        else:
            kind = "iso"
        lossy = bool(reasons) or kind in {"filter", "aggregate"}
        return PlanStep(
            model=self.name,
            kind=kind,
            declared=declared_kind is not None,
            lossy=lossy,
            reasons=reasons,
            checkpoint_after=lossy,
        )


@dataclass(frozen=True)
class _Analysed:
    name: str
    schema: RelationSchema
    findings: tuple[Finding, ...]
    stats: _Stats
    unknown_relations: bool
    plan: PlanStep | None


# Per-model results keyed by everything they depend on: the compiled SQL, the dialect, the model's declarations
# and the schemas of its upstreams. Revalidating after one model changes re-analyses that model and whatever
# its new schema affects; everything else comes from here.
_CACHE: OrderedDict[int, _Analysed] = OrderedDict()
_CACHE_SIZE = 20_000


def _schema_fingerprint(schema: RelationSchema | None) -> object:
    return None if schema is None else (tuple(schema.columns.items()), schema.complete, schema.personal)


def _cache_key(ctx: _Context, node: ManifestNode, relations_fingerprint: int) -> int:
    declared = None
    if ctx.ldm is not None and (entity := ctx.ldm.by_unique_id(node.unique_id)) is not None:
        declared = (bool(node.cdme), entity.model_dump_json())
    return hash(
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


def _run_analysis(ctx: _Context, node: ManifestNode) -> _Analysed:
    analysis = _ModelAnalysis(ctx, node)
    schema = analysis.run()
    return _Analysed(
        analysis.name,
        schema,
        tuple(analysis.findings),
        analysis.stats,
        analysis.unknown_relations,
        analysis.plan,
    )


def _remember(key: int, result: _Analysed) -> None:
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def _analysis_of(
    ctx: _Context, node: ManifestNode, relations_fingerprint: int, key: int | None = None
) -> _Analysed:
    key = _cache_key(ctx, node, relations_fingerprint) if key is None else key
    cached = _CACHE.get(key)
    if cached is not None:
        _CACHE.move_to_end(key)
        return cached
    result = _run_analysis(ctx, node)
    _remember(key, result)
    return result


# What forked workers analyse against: set just before the fork, so children inherit it without pickling.
_FORKED_CONTEXT: _Context | None = None
# Below this many uncached models in one level, forking costs more than it saves.
_PARALLEL_MIN_MODELS = 100


def _analyse_in_worker(uid: str) -> _Analysed:
    assert _FORKED_CONTEXT is not None  # set by _prefetch before the pool forks
    return _run_analysis(_FORKED_CONTEXT, _FORKED_CONTEXT.manifest.nodes[uid])


def _levels(manifest: Manifest, order: list[str]) -> list[list[str]]:
    """`order` split into levels: every node's upstreams are in earlier levels, so a level runs in parallel."""
    depth: dict[str, int] = {}
    levels: list[list[str]] = []
    for uid in order:
        level = 1 + max((depth[d] for d in manifest.nodes[uid].depends_on.nodes if d in depth), default=-1)
        depth[uid] = level
        while len(levels) <= level:
            levels.append([])
        levels[level].append(uid)
    return levels


def _prefetch(ctx: _Context, uids: list[str], relations_fingerprint: int, workers: int) -> dict[str, int]:
    """Analyse a level's uncached models in `workers` forked processes and cache the results.

    Returns the cache key of each model of the level, so resolving them does not compute it again.

    SQL parsing and qualification are CPU-bound Python, so threads would not help; forked children inherit the
    context (every upstream schema is already resolved) and send back only each model's small result.
    """
    # A module global is the one way to hand a forked child its context without pickling it.
    global _FORKED_CONTEXT
    keys = {
        uid: _cache_key(ctx, ctx.manifest.nodes[uid], relations_fingerprint)
        for uid in uids
        if ctx.manifest.nodes[uid].resource_type != "seed"
    }
    pending = {uid: key for uid, key in keys.items() if key not in _CACHE}
    if len(pending) < _PARALLEL_MIN_MODELS:
        return keys
    _FORKED_CONTEXT = ctx
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunk = max(1, len(pending) // (workers * 8))
            results = pool.map(_analyse_in_worker, list(pending), chunksize=chunk)
    finally:
        _FORKED_CONTEXT = None
    for key, result in zip(pending.values(), results, strict=True):
        _remember(key, result)
    return keys


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
    setops = list(tree.find_all(exp.SetOperation))
    if not setops:
        return tainted
    for setop in setops:
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


def project_schemas(
    manifest: Manifest,
    *,
    catalog: Catalog | None = None,
    ldm: Ldm | None = None,
    project_dir: Path | None = None,
) -> dict[str, RelationSchema]:
    """Every relation's resolved schema, by unique id: what validation knows each model produces."""
    return _analyze(manifest, catalog=catalog, ldm=ldm, project_dir=project_dir)[1]


def analyze_project(
    manifest: Manifest,
    *,
    catalog: Catalog | None = None,
    ldm: Ldm | None = None,
    project_dir: Path | None = None,
    principal: str | None = None,
    roles: frozenset[str] | None = None,
    workers: int = 1,
) -> Report:
    """Validate every model of `manifest`; every finding is reported, not only the first.

    Args:
        manifest: A manifest with compiled SQL (`dbt compile` or `dbt build` wrote it).
        catalog: The catalog, when available: the warehouse's own columns, the most reliable schemas.
        ldm: The project's LDM, for the rules that depend on declarations (grain, governance, morphisms).
        project_dir: The project's directory, to read seed headers when there is no catalog.
        principal: Who asks; with `roles`, entities their roles do not allow do not exist for the analysis.
        roles: The principal's roles (None: no access control applied).
        workers: Processes that analyse the models of one topological level at once (forked: use more than
            one only from a single-threaded process, such as the CLI).

    Returns:
        The findings, the coverage of the analysis, and the execution plan; the same whatever `workers`.
    """
    return _analyze(
        manifest,
        catalog=catalog,
        ldm=ldm,
        project_dir=project_dir,
        principal=principal,
        roles=roles,
        workers=workers,
    )[0]


def _analyze(
    manifest: Manifest,
    *,
    catalog: Catalog | None = None,
    ldm: Ldm | None = None,
    project_dir: Path | None = None,
    principal: str | None = None,
    roles: frozenset[str] | None = None,
    workers: int = 1,
) -> tuple[Report, dict[str, RelationSchema]]:
    ctx = _Context(
        manifest=manifest,
        dialect=sqlglot_dialect(manifest.metadata.adapter_type),
        ldm=ldm,
        project=manifest.metadata.project_name,
        principal=principal,
    )
    hidden_ids = (
        {e.unique_id for e in ldm if not e.visible_to(set(roles))}
        if ldm is not None and roles is not None
        else set()
    )
    for node in manifest.entities():
        if node.relation_name is None and isinstance(node, ManifestNode):
            continue
        identifier = node.identifier if isinstance(node, SourceDefinition) else (node.alias or node.name)
        key = _norm(node.database, node.schema_, identifier)
        index = ctx.hidden if node.unique_id in hidden_ids else ctx.by_relation
        index[key] = node.unique_id
        index.setdefault(("", key[1], key[2]), node.unique_id)
        ctx.project_schemas.add(key[1])
    for source in manifest.sources.values():
        base = _base_schema(source, catalog, project_dir)
        if base is not None:
            base.personal = _declared_personal(ldm, source.unique_id)
            ctx.schemas[source.unique_id] = base

    ctx.any_personal = ldm is not None and any(
        c.sensitivity == "personal" for e in ldm for c in e.columns.values()
    )
    ldm_fingerprint = hash(tuple((e.unique_id, e.grain, e.kind, tuple(e.lookups)) for e in ldm)) if ldm else 0
    # Source schemas are part of every model's inputs whether or not a manifest lists them in depends_on.
    sources_fingerprint = hash(
        tuple(sorted((uid, _schema_fingerprint(ctx.schemas.get(uid))) for uid in manifest.sources))
    )
    relations_fingerprint = hash(
        (
            frozenset(ctx.by_relation.items()),
            frozenset(ctx.hidden.items()),
            principal,
            ldm_fingerprint,
            sources_fingerprint,
        )
    )
    findings: list[Finding] = []
    steps: list[PlanStep] = []
    models = 0
    unresolved: list[str] = []
    totals = _Stats()
    analysed: dict[str, tuple[_Analysed, RelationSchema]] = {}

    def resolve(uid: str, key: int | None) -> None:
        node = manifest.nodes[uid]
        base = _base_schema(node, catalog, project_dir)
        if node.resource_type == "seed":
            seed = base or RelationSchema(_yaml_columns(node), complete=False, origin="yaml")
            seed.personal = _declared_personal(ldm, uid)
            ctx.schemas[uid] = seed
            return
        analysis = _analysis_of(ctx, node, relations_fingerprint, key)
        if base is not None:
            base.personal = analysis.schema.personal | _declared_personal(ldm, uid)
        ctx.schemas[uid] = base or analysis.schema
        if node.resource_type == "model":
            analysed[uid] = (analysis, analysis.schema)

    order = [
        uid
        for uid in topological_order(manifest)
        if manifest.nodes[uid].config.enabled and uid not in hidden_ids
    ]
    for level in _levels(manifest, order) if workers > 1 else [order]:
        keys = _prefetch(ctx, level, relations_fingerprint, workers) if workers > 1 else {}
        for uid in level:
            resolve(uid, keys.get(uid))
    # In topological order whatever the parallelism, so a report reads the same with one worker or several.
    for uid in order:
        if uid not in analysed:
            continue
        analysis, inferred = analysed[uid]
        models += 1
        if analysis.plan is not None:
            steps.append(analysis.plan)
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
    return Report(findings=findings, coverage=coverage, plan=_plan(manifest, steps, hidden_ids)), ctx.schemas


def _declared_personal(ldm: Ldm | None, uid: str) -> frozenset[str]:
    entity = ldm.by_unique_id(uid) if ldm else None
    if entity is None:
        return frozenset()
    return frozenset(
        n for n, c in entity.columns.items() if c.sensitivity == "personal" and not c.pseudonymized
    )


def _plan(manifest: Manifest, steps: list[PlanStep], hidden: set[str]) -> Plan:
    visible_models = {n.unique_id for n in manifest.models() if n.unique_id not in hidden}
    read_sources: set[str] = set()
    has_children: set[str] = set()
    readers = [
        n
        for n in manifest.nodes.values()
        if n.resource_type in {"model", "snapshot"} and n.unique_id not in hidden
    ]
    for reader in readers:
        for upstream in reader.depends_on.nodes:
            has_children.add(upstream)
            if upstream in manifest.sources and reader.resource_type == "model":
                read_sources.add(upstream)
    project = manifest.metadata.project_name
    return Plan(
        steps=steps,
        inputs=sorted(entity_name(manifest.sources[s], project) for s in read_sources),
        outputs=sorted(entity_name(manifest.nodes[m], project) for m in visible_models - has_children),
    )
