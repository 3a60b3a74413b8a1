"""Capture SQL derived from a model's compiled SQL: the adjoint's mapped and filtered relations.

For a model and one driving upstream, `derive` rewrites the compiled SQL with sqlglot so that it returns, instead
of the model's rows, the pairs (upstream key, output key) each output row came from ("keep FROM/JOIN/WHERE,
project the upstream key and the output key, drop the fold"):

- the driving table is found where its rows flow to the output (FROM or JOIN of a query whose rows reach the
  root through CTEs, derived tables and UNION [ALL] branches; a reference inside a WHERE subquery is not one);
- its key columns are projected there as `__cdme_s<i>` and carried up through every query on the way;
- a GROUP BY on the way keeps its rows: its aggregates become window aggregates over the same groups, so
  later predicates see the same values; its HAVING becomes a windowed column that the next query filters on
  (an explicit predicate, so the members of the groups it drops are filtered); the root's GROUP BY is
  dropped and the output key's expressions projected instead;
- other UNION branches are pruned (they carry other driving upstreams), except the other branch of a two-branch
  UNION below the root that reads the driving upstream in its FROM too (partitions of one upstream, `... where
  side = 'BUY' union ... where side = 'SELL'`): both carry the key, so the rows of either are mapped;
- a UNION (not ALL) or a SELECT DISTINCT below the root merges rows equal in the model's columns: the rewrite
  redoes that merge (`DISTINCT ON` those columns over the rows with their keys, the least key staying), so the
  keys it merged are mapped nowhere and stay unaccounted, as the rows they lost;
- where the root's HAVING, LIMIT/OFFSET or DISTINCT decide which output rows exist, the pairs are semi-joined
  with the model's built relation, so a group or row that did not make it is never "mapped".

The **filtered** relation comes from a second rewrite in which each explicit WHERE conjunct on the row path (and
the root's HAVING) becomes a flag column instead of a predicate; a key is filtered at the first condition its
rows fail. Capture then keeps only keys that are neither mapped nor errored, so error routing (a WHERE that
sends rows to a sink) is never counted as filtering, and anything else that loses rows (inner joins with no
match, de-duplication, LIMIT) stays unaccounted.

Examples:
    >>> d = derive("select id, v from s.src where v > 0", "m", Relation(None, "s", "src"), ["id"], ["id"])
    >>> d.filters[0].condition
    'v > 0'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from services.adjoint.domain.errors import DerivationError
from services.adjoint.domain.keys import key_sql
from services.validation.domain.analysis import nondeterministic_calls

logging.getLogger("sqlglot").setLevel(logging.ERROR)

DIALECT = "postgres"
_SRC = "__cdme_s"
_TGT = "__cdme_t"
_FLAG = "__cdme_f"
_HAVING = "__cdme_h"

InferredKind = Literal["iso", "filter", "enrich", "aggregate", "explode", "union"]


@dataclass(frozen=True)
class Relation:
    """A relation as dbt names it: database (may be absent), schema, identifier."""

    database: str | None
    schema: str
    identifier: str

    def matches(self, table: exp.Table) -> bool:
        """Whether a table reference in SQL names this relation (case-insensitive, database optional)."""
        if not table.db or table.name.lower() != self.identifier.lower():
            return False
        if table.db.lower() != self.schema.lower():
            return False
        return not (table.catalog and self.database and table.catalog.lower() != self.database.lower())

    def sql(self) -> str:
        """The relation rendered as a quoted PostgreSQL name (schema.identifier; one database per connection)."""
        return exp.table_(self.identifier, db=self.schema, quoted=True).sql(dialect=DIALECT)


@dataclass(frozen=True)
class FilterCondition:
    """An explicit predicate that makes a key filtered, with where it sits in the compiled SQL."""

    index: int
    condition: str
    line: int | None
    clause: Literal["where", "having", "join"]


@dataclass(frozen=True)
class Derivation:
    """The capture SQL of one (model, driving upstream) morphism.

    Attributes:
        mapped_sql: `SELECT source_key, target_key` (distinct `cdme-key/v1` pairs).
        prefilter_sql: `SELECT source_key, condition` over the model's rows with the explicit predicates
            turned into flags: `condition` is the index (in `filters`) of the first one the row fails, or NULL.
        filters: The explicit predicates on the row path, innermost first.
        output_checked: Whether pairs are semi-joined with the built relation (root HAVING/LIMIT/DISTINCT).
        inferred_kind: The kind the SQL's shape suggests (a declared kind wins).
        deduplicates: Whether DISTINCT or UNION on the row path merges rows; for a one-to-one kind, capture
            keeps one source key per output key (the least) and leaves the merged ones unaccounted (a UNION below
            the root is already merged in `mapped_sql`).
        mapped_rows_sql: `SELECT source_key, target_key`, one row per rewritten row (not distinct): what
            capture's digest check sums, so a source key that reaches the output twice shows up as a mismatch.
        passthrough: Per output key column, the index of the upstream key column it carries unchanged through
            every query of the row path (a bare column reference at each level), or None.
        nondeterministic: The calls in the derived SQL (the row path and its predicates, not the other columns)
            whose result differs between two runs on the same data (`now()`, `random()`, ...): evaluating it
            again later need not give the run's pairs.
    """

    mapped_sql: str
    prefilter_sql: str
    filters: tuple[FilterCondition, ...]
    output_checked: bool
    inferred_kind: InferredKind
    deduplicates: bool = False
    mapped_rows_sql: str = ""
    passthrough: tuple[int | None, ...] = ()
    nondeterministic: tuple[str, ...] = ()

    def is_identity(self, source_columns: int) -> bool:
        """Whether every output key is, column for column, the key of the upstream row it came from."""
        return self.passthrough == tuple(range(source_columns))

    def projects(self, source_columns: int) -> bool:
        """Whether every upstream key column is carried unchanged into the output key (source = a projection)."""
        return set(range(source_columns)) <= {i for i in self.passthrough if i is not None}


def _parse(sql: str) -> exp.Expr:
    try:
        tree = sqlglot.parse_one(sql, dialect=DIALECT)
    except SqlglotError as e:
        msg = f"cannot parse the compiled SQL: {str(e).splitlines()[0]}"
        raise DerivationError(msg) from e
    if not isinstance(tree, exp.Query):
        msg = f"the compiled SQL is a {tree.key.upper()}, not a query"
        raise DerivationError(msg)
    return tree


def _row_position(table: exp.Table) -> exp.Select | None:
    holder = table.parent
    if isinstance(holder, (exp.From, exp.Join)) and isinstance(holder.parent, exp.Select):
        return holder.parent
    return None


def _references(select: exp.Select, name: str) -> list[str]:
    """The aliases under which `select` reads the CTE `name` in its FROM/JOINs."""
    found = []
    sources = [select.args.get("from_"), *(select.args.get("joins") or [])]
    for source in sources:
        if source is None:
            continue
        table = source.this
        if isinstance(table, exp.Table) and not table.db and table.name.lower() == name.lower():
            found.append(table.alias_or_name)
    return found


@dataclass
class _Path:
    selects: list[exp.Select]
    refs: list[str]
    driving_alias: str
    root: exp.Expr
    through_union: bool
    union_distinct: bool = False
    # Other branches of the UNION above `selects[0]` that read the driving upstream too, with their aliases of it.
    branches: list[tuple[exp.Select, str]] = field(default_factory=list)
    # A UNION (not ALL) below the root on the row path, as the node now in its place, and its output columns.
    merge: tuple[exp.Query, list[exp.Identifier]] | None = None


def _row_path(tree: exp.Expr, upstream: Relation) -> _Path:
    candidates = [t for t in tree.find_all(exp.Table) if upstream.matches(t)]
    if not candidates:
        msg = f"the compiled SQL does not read {upstream.schema}.{upstream.identifier}"
        raise DerivationError(msg)
    problems = []
    for table in candidates:
        select = _row_position(table)
        if select is None:
            problems.append("it is read outside a FROM or JOIN")
            continue
        try:
            return _ascend(tree, select, table.alias_or_name, upstream)
        except DerivationError as e:
            problems.append(str(e))
    msg = f"the rows of {upstream.schema}.{upstream.identifier} do not reach the output: {problems[0]}"
    raise DerivationError(msg)


def _output_names(query: exp.Expr) -> list[exp.Identifier] | None:
    """The identifiers of a SELECT's output columns, or None when a star or an unnamed expression hides them."""
    if not isinstance(query, exp.Select):
        return None
    names = []
    for p in query.expressions:
        identifier = (
            p.args.get("alias") if isinstance(p, exp.Alias) else p.this if isinstance(p, exp.Column) else None
        )
        if not isinstance(identifier, exp.Identifier) or identifier.this == "*":
            return None
        names.append(identifier.copy())
    return names


def _co_branch(union: exp.SetOperation, node: exp.Expr, upstream: Relation) -> tuple[exp.Select, str] | None:
    """The other branch of a two-branch UNION when it is a plain SELECT that reads `upstream` in its FROM."""
    other = union.expression if union.this is node else union.this
    if not isinstance(union, exp.Union) or not isinstance(other, exp.Select) or other.args.get("with_"):
        return None
    source = other.args.get("from_")
    table = source.this if source is not None else None
    if not isinstance(table, exp.Table) or not upstream.matches(table):
        return None
    names, own = _output_names(other), _output_names(node)
    if names is None or own is None or len(names) != len(own):
        return None
    return other, table.alias_or_name


def _ascend(tree: exp.Expr, start: exp.Select, driving_alias: str, upstream: Relation) -> _Path:
    selects = [start]
    refs: list[str] = []
    node: exp.Expr = start
    through_union = False
    union_distinct = False
    branches: list[tuple[exp.Select, str]] = []
    merge: tuple[exp.Query, list[exp.Identifier]] | None = None
    while (parent := node.parent) is not None:
        if isinstance(parent, exp.SetOperation):
            through_union = True
            distinct = bool(parent.args.get("distinct"))
            union_distinct = union_distinct or distinct
            below_root = parent.parent is not None
            names = _output_names(node)
            # A UNION of two partitions of the driving upstream (`... where side = 'BUY' union ... where side =
            # 'SELL'`) keeps both branches: the rows of either reach the output.
            co_branch = _co_branch(parent, node, upstream) if node is start and below_root else None
            if co_branch is not None and names is not None:
                branches.append(co_branch)
                if distinct and merge is None:
                    merge = (parent, names)
                node = parent
                continue
            # Otherwise the other branches carry other driving upstreams; the pairs come from this one only.
            if distinct and below_root and names is not None and merge is None:
                merge = (node, names) if isinstance(node, exp.Query) else None
            with_ = parent.args.get("with_")
            if parent.parent is None:
                # The set operation is the whole query: this branch becomes the root.
                node.pop()
            else:
                parent.replace(node)
            if with_ is not None:
                node.set("with_", with_)
            continue
        if isinstance(parent, exp.Subquery):
            holder = parent.parent
            if isinstance(holder, (exp.From, exp.Join)) and isinstance(holder.parent, exp.Select):
                selects.append(holder.parent)
                refs.append(parent.alias_or_name)
                node = holder.parent
                continue
            if isinstance(holder, exp.SetOperation):
                node = parent
                continue
            msg = "they are read in a subquery that is not a FROM or JOIN source"
            raise DerivationError(msg)
        if isinstance(parent, exp.CTE):
            name = parent.alias
            consumers = [(s, alias) for s in tree.find_all(exp.Select) for alias in _references(s, name)]
            if len(consumers) != 1:
                msg = f"CTE {name} is read {len(consumers)} times; its rows cannot be followed to one output"
                raise DerivationError(msg)
            consumer, alias = consumers[0]
            selects.append(consumer)
            refs.append(alias)
            node = consumer
            continue
        if isinstance(parent, exp.With):
            node = parent
            continue
        msg = f"they pass through a {parent.key.upper()}"
        raise DerivationError(msg)
    root = node
    if not isinstance(root, exp.Select) or root is not selects[-1]:
        msg = "the query's root is not the SELECT the rows reach"
        raise DerivationError(msg)
    return _Path(selects, refs, driving_alias, root, through_union, union_distinct, branches, merge)


def _conjuncts(condition: exp.Expr) -> list[exp.Expr]:
    if isinstance(condition, exp.And):
        return _conjuncts(condition.left) + _conjuncts(condition.right)
    if isinstance(condition, exp.Paren) and isinstance(condition.this, exp.And):
        return _conjuncts(condition.this)
    return [condition]


def _line(condition: exp.Expr) -> int | None:
    lines = [i.meta["line"] for i in condition.find_all(exp.Identifier) if "line" in i.meta]
    lines += [lit.meta["line"] for lit in condition.find_all(exp.Literal) if "line" in lit.meta]
    return min(lines) if lines else None


def _group_expressions(select: exp.Select) -> list[exp.Expr]:
    group = select.args.get("group")
    if group is None:
        return []
    projections = select.expressions
    aliases = {p.alias.lower(): p.this for p in projections if isinstance(p, exp.Alias)}
    resolved = []
    for g in group.expressions:
        if isinstance(g, exp.Literal) and g.is_int and 0 < int(g.this) <= len(projections):
            target = projections[int(g.this) - 1]
            resolved.append((target.this if isinstance(target, exp.Alias) else target).copy())
        elif isinstance(g, exp.Column) and not g.table and g.name.lower() in aliases:
            resolved.append(aliases[g.name.lower()].copy())
        else:
            resolved.append(g.copy())
    return resolved


def _aggregates_in(expression: exp.Expr) -> list[exp.AggFunc]:
    """Aggregate calls of `expression` itself: not already windowed, not inside a nested query."""
    found = []
    for node in expression.walk():
        if not isinstance(node, exp.AggFunc) or isinstance(node.parent, exp.Window):
            continue
        ancestor = node.parent if node is not expression else None
        nested = False
        while ancestor is not None and ancestor is not expression:
            if isinstance(ancestor, (exp.Select, exp.Subquery)):
                nested = True
                break
            ancestor = ancestor.parent
        if not nested:
            found.append(node)
    return found


def _inside(node: exp.Expr, ancestor: exp.Expr) -> bool:
    parent = node.parent
    while parent is not None:
        if parent is ancestor:
            return True
        parent = parent.parent
    return node is ancestor


def _keep_rows(select: exp.Select, passing: exp.Expr | None = None) -> exp.Expr | None:
    """Turn an intermediate GROUP BY into window aggregates, so the query keeps one row per input row.

    `passing`, when predicates below became flag columns instead of dropping rows, says whether a row passes
    them all: the windows then fold the passing rows apart, so their aggregates are the ones the model saw.

    Returns:
        The query's HAVING condition over the same windows (a per-row predicate that its consumer applies), or
        None without one. The HAVING itself is removed: a window cannot be filtered in the query computing it.
    """
    groups = _group_expressions(select)
    if passing is not None:
        groups.append(passing)

    def windowed(expression: exp.Expr) -> None:
        for agg in _aggregates_in(expression):
            # PostgreSQL has no DISTINCT, ORDER BY or WITHIN GROUP in a window aggregate.
            if agg.find(exp.Distinct, exp.Order) or isinstance(agg.parent, exp.WithinGroup):
                msg = f"the aggregate {agg.sql(dialect=DIALECT)} in a GROUP BY on the row path has no window form"
                raise DerivationError(msg)
            agg.replace(exp.Window(this=agg.copy(), partition_by=[g.copy() for g in groups]))

    having_node = select.args.get("having")
    having: exp.Expr | None = None
    if having_node is not None:
        having = exp.paren(having_node.this.copy())
        windowed(having)
    for projection in select.expressions:
        windowed(projection)
    for arg in ("group", "having", "order"):
        select.set(arg, None)
    return having


def _having_filter(select: exp.Select, index: int) -> FilterCondition | None:
    having = select.args.get("having")
    if having is None:
        return None
    return FilterCondition(index, having.this.sql(dialect=DIALECT), _line(having.this), "having")


def _target_expressions(root: exp.Select, target_key: Sequence[str]) -> list[exp.Expr]:
    by_name = {p.alias_or_name.lower(): p for p in root.expressions}
    has_star = any(
        isinstance(p, exp.Star) or (isinstance(p, exp.Column) and p.is_star) for p in root.expressions
    )
    found: list[exp.Expr] = []
    for column in target_key:
        projection = by_name.get(column.lower())
        if projection is None:
            if not has_star:
                msg = f"the output key column {column!r} is not among the model's select list"
                raise DerivationError(msg)
            found.append(exp.column(column, quoted=True))
            continue
        expression = projection.this if isinstance(projection, exp.Alias) else projection
        if _aggregates_in(expression):
            msg = f"the output key column {column!r} is an aggregate"
            raise DerivationError(msg)
        found.append(expression.copy())
    return found


def _infer_kind(path: _Path) -> InferredKind:
    if path.through_union:
        return "union"
    if any(s.args.get("group") is not None for s in path.selects):
        return "aggregate"
    joins = [j for s in path.selects for j in (s.args.get("joins") or [])]
    if any((j.side or "").upper() not in {"LEFT", "FULL"} for j in joins):
        return "explode"
    if any(s.args.get("where") is not None for s in path.selects):
        return "filter"
    return "enrich" if joins else "iso"


def _carried_from(path: _Path, projection: exp.Expr, source_key: Sequence[str]) -> int | None:
    """The upstream key column a root projection carries unchanged down the row path, if it does."""
    lowered = [c.lower() for c in source_key]
    expression = projection.this if isinstance(projection, exp.Alias) else projection
    level = len(path.selects) - 1
    while True:
        if not isinstance(expression, exp.Column) or isinstance(expression.this, exp.Star):
            return None
        select = path.selects[level]
        qualifier = expression.table.lower()
        # An unqualified column names the one source only when the query reads a single one.
        alone = not select.args.get("joins")
        reads = path.driving_alias if level == 0 else path.refs[level - 1]
        if qualifier != reads.lower() and (qualifier or not alone):
            return None
        name = expression.name.lower()
        if level == 0:
            return lowered.index(name) if name in lowered else None
        below = [p for p in path.selects[level - 1].expressions if p.alias_or_name.lower() == name]
        if len(below) != 1:
            return None
        expression = below[0].this if isinstance(below[0], exp.Alias) else below[0]
        level -= 1


def _passthrough(path: _Path, source_key: Sequence[str], target_key: Sequence[str]) -> tuple[int | None, ...]:
    by_name = {p.alias_or_name.lower(): p for p in path.selects[-1].expressions}
    return tuple(
        _carried_from(path, by_name[c.lower()], source_key) if c.lower() in by_name else None
        for c in target_key
    )


def _where_flags(
    select: exp.Select, first: int, *, flags: bool
) -> tuple[list[FilterCondition], list[exp.Expr]]:
    """The WHERE conjuncts of `select` as filters numbered from `first`; with `flags`, as flag columns instead."""
    where = select.args.get("where")
    if where is None:
        return [], []
    conditions: list[FilterCondition] = []
    columns: list[exp.Expr] = []
    for condition in _conjuncts(where.this):
        index = first + len(conditions)
        conditions.append(FilterCondition(index, condition.sql(dialect=DIALECT), _line(condition), "where"))
        columns.append(
            exp.alias_(exp.func("coalesce", exp.paren(condition.copy()), exp.false()), f"{_FLAG}{index}")
        )
    if flags:
        select.set("where", None)
    return conditions, columns


def _join_flags(
    select: exp.Select, first: int, names: set[str], *, flags: bool
) -> tuple[list[FilterCondition], list[exp.Expr]]:
    """The inner joins of `select` declared as filters (by alias or relation), numbered from `first`.

    With `flags` each becomes a LEFT JOIN and its ON condition a flag column: an unmatched row survives with
    the flag false, so its key is filtered by the join instead of vanishing.

    Raises:
        DerivationError: A declared join is not an inner join with an ON condition.
    """
    conditions: list[FilterCondition] = []
    columns: list[exp.Expr] = []
    for join in select.args.get("joins") or []:
        table = join.this
        labels = {table.alias_or_name.lower()} | (
            {table.name.lower()} if isinstance(table, exp.Table) else set()
        )
        if not labels & names:
            continue
        on = join.args.get("on")
        if join.side or (join.kind or "INNER").upper() != "INNER" or on is None:
            msg = f"the join {table.alias_or_name} declared as a filter is not an inner join with an ON condition"
            raise DerivationError(msg)
        index = first + len(conditions)
        text = f"join {table.alias_or_name} on {on.sql(dialect=DIALECT)}"
        conditions.append(FilterCondition(index, text, _line(on), "join"))
        columns.append(exp.alias_(exp.func("coalesce", exp.paren(on.copy()), exp.false()), f"{_FLAG}{index}"))
        if flags:
            join.set("side", "LEFT")
            join.set("kind", None)
    return conditions, columns


def _row_flags(
    select: exp.Select, first: int, joins: set[str], *, flags: bool
) -> tuple[list[FilterCondition], list[exp.Expr]]:
    """The explicit predicates of one query, in the order SQL applies them: declared joins, then WHERE."""
    by_join, join_columns = _join_flags(select, first, joins, flags=flags)
    by_where, where_columns = _where_flags(select, first + len(by_join), flags=flags)
    return by_join + by_where, join_columns + where_columns


def _merge_as_union_does(node: exp.Query, names: list[exp.Identifier], source_columns: int) -> None:
    """Make a UNION (not ALL) or a DISTINCT on the row path keep one row per distinct output row, as the model's did.

    The carried keys make every row distinct, so the rewrite would keep rows the model merged. Of the rows equal
    in the model's columns, the one of the least upstream key stays; the others' keys are mapped nowhere and
    capture reports them unaccounted. `node` is the UNION (made ALL) or the one branch left in its place.
    """
    if isinstance(node, exp.Union):
        node.set("distinct", False)
    columns = [exp.Column(this=n.copy()) for n in names]
    keys = [exp.column(f"{_SRC}{j}") for j in range(source_columns)]
    holder = exp.Subquery(this=exp.select("1"), alias=exp.TableAlias(this=exp.to_identifier("__cdme_u")))
    merged = exp.select(exp.Star()).from_(holder).distinct(*columns).order_by(*columns, *keys)
    node.replace(merged)
    placeholder = merged.find(exp.Subquery)
    assert placeholder is not None
    placeholder.set("this", node)


@dataclass
class _Rewrite:
    root: exp.Select
    filters: list[FilterCondition]
    having: exp.Expr | None
    output_checked: bool
    kind: InferredKind
    deduplicates: bool
    passthrough: tuple[int | None, ...] = ()
    branched: bool = False


def _rewrite(
    sql: str,
    upstream: Relation,
    source_key: Sequence[str],
    target_key: Sequence[str],
    *,
    flags: bool,
    filter_joins: Sequence[str] = (),
) -> _Rewrite:
    tree = _parse(sql)
    path = _row_path(tree, upstream)
    joins = {j.lower() for j in filter_joins}
    readers = [path.selects[0], *(source for source, _alias in path.branches), *path.selects[1:]]
    labels = {
        label
        for select in readers
        for join in select.args.get("joins") or []
        for label in (join.this.alias_or_name.lower(), join.this.name.lower())
    }
    if missing := sorted(joins - labels):
        msg = f"filter.join {missing[0]!r} names no join on the row path"
        raise DerivationError(msg)
    kind = _infer_kind(path)
    root = path.selects[-1]
    passthrough = _passthrough(path, source_key, target_key)
    if path.branches:
        # Only the first branch's key projection was followed; the others may compute the output key differently.
        passthrough = tuple(None for _ in target_key)
    deduplicates = path.union_distinct or any(s.args.get("distinct") is not None for s in path.selects)
    filters: list[FilterCondition] = []
    # Indexes of HAVING conditions computed as columns one level down, for the next level to apply.
    held: list[int] = []
    # Queries below the root whose DISTINCT the rewrite redoes over the model's own columns.
    merges: list[tuple[exp.Query, list[exp.Identifier]]] = []
    # Queries on the row path whose GROUP BY became windows.
    windowed: list[exp.Select] = []
    for i, select in enumerate(path.selects):
        is_root = select is root
        if i == 0:
            # The driving upstream's rows enter here, in every branch of a UNION that reads it. All branches
            # project the same flag columns, in the same places: their own conditions, TRUE for the others'.
            sources = [(select, path.driving_alias), *path.branches]
            read: list[tuple[list[FilterCondition], list[exp.Expr]]] = []
            for source, _alias in sources:
                first = len(filters) + sum(len(conditions) for conditions, _ in read)
                read.append(_row_flags(source, first, joins, flags=flags))
            new_flags = [f for conditions, _ in read for f in conditions]
            level: list[list[exp.Expr]] = []
            for (_source, alias), (conditions, columns) in zip(sources, read, strict=True):
                own = {f.index: c for f, c in zip(conditions, columns, strict=True)}
                level.append(
                    [
                        exp.alias_(exp.column(c, table=alias, quoted=True), f"{_SRC}{j}")
                        for j, c in enumerate(source_key)
                    ]
                    + [own.get(f.index, exp.alias_(exp.true(), f"{_FLAG}{f.index}")) for f in new_flags]
                )
            for (source, _alias), columns in list(zip(sources, level, strict=True))[1:]:
                if source.args.get("having") is not None:
                    msg = "a HAVING clause in one branch of a UNION on the row path is not supported"
                    raise DerivationError(msg)
                if source.args.get("group") is not None:
                    _keep_rows(source)
                source.set(
                    "expressions", [*source.expressions, *(columns if flags else columns[: len(source_key)])]
                )
            carried = level[0]
        else:
            carried = [
                exp.alias_(exp.column(f"{_SRC}{j}", table=path.refs[i - 1]), f"{_SRC}{j}")
                for j in range(len(source_key))
            ]
            carried += [
                exp.alias_(exp.column(f"{_FLAG}{f.index}", table=path.refs[i - 1]), f"{_FLAG}{f.index}")
                for f in filters
            ]
            new_flags, columns = _row_flags(select, len(filters), joins, flags=flags)
            carried += columns
            if not flags:
                # The rows a HAVING below dropped are dropped here, where its windowed value is a column.
                for index in held:
                    select.where(
                        exp.column(f"{_HAVING}{index}", table=path.refs[i - 1]), append=True, copy=False
                    )
            held = []
        filters.extend(new_flags)
        if not flags:
            # Without flag columns nothing is carried for the filters; only keys travel.
            carried = [c for c in carried if not c.alias.startswith(_FLAG)]
        if is_root:
            targets = [
                exp.alias_(e, f"{_TGT}{j}") for j, e in enumerate(_target_expressions(select, target_key))
            ]
            select.set("expressions", targets + carried)
        else:
            dropped = _having_filter(select, len(filters))
            flagged = [c.this.copy() for c in carried if c.alias.startswith(_FLAG)]
            passing = exp.paren(exp.and_(*flagged)) if flagged else None
            model_columns = _output_names(select)
            if select.args.get("group") is not None:
                windowed.append(select)
            if (
                select.args.get("group") is not None
                and (condition := _keep_rows(select, passing)) is not None
            ):
                assert dropped is not None
                filters.append(dropped)
                if flags:
                    carried.append(
                        exp.alias_(exp.func("coalesce", condition, exp.false()), f"{_FLAG}{dropped.index}")
                    )
                else:
                    carried.append(exp.alias_(condition, f"{_HAVING}{dropped.index}"))
                    held.append(dropped.index)
            select.set("expressions", [*select.expressions, *carried])
            distinct = select.args.get("distinct")
            if not flags and distinct is not None and not distinct.args.get("on"):
                # The carried keys would keep apart the rows this DISTINCT merged: merge them as it did. A GROUP
                # BY at or below it keeps one row per input row now, which such a merge would collapse.
                if windowed:
                    msg = "a DISTINCT over the result of a GROUP BY on the row path is not supported"
                    raise DerivationError(msg)
                if model_columns is None or len({n.this.lower() for n in model_columns}) != len(
                    model_columns
                ):
                    msg = "a DISTINCT on the row path over a star or unnamed or repeated columns is not supported"
                    raise DerivationError(msg)
                select.set("distinct", None)
                merges.append((select, model_columns))
    for query, names in merges:
        _merge_as_union_does(query, names, len(source_key))
    if path.merge is not None and not flags:
        node = path.merge[0]
        if any(_inside(w, node) for w in windowed):
            msg = "a UNION over the result of a GROUP BY on the row path is not supported"
            raise DerivationError(msg)
        _merge_as_union_does(*path.merge, len(source_key))
    having_node = root.args.get("having")
    having = having_node.this.copy() if having_node is not None else None
    output_checked = any(root.args.get(a) is not None for a in ("having", "limit", "offset", "distinct"))
    if having is not None:
        filters.append(FilterCondition(len(filters), having.sql(dialect=DIALECT), _line(having), "having"))
    for arg in ("group", "having", "order", "limit", "offset", "distinct", "qualify"):
        root.set(arg, None)
    return _Rewrite(
        root, filters, having, output_checked, kind, deduplicates, passthrough, branched=bool(path.branches)
    )


def nondeterministic_sql(sql: str) -> tuple[str, ...]:
    """The calls in `sql` whose result differs between two runs on the same data (`now()`, `random()`, ...).

    Raises:
        DerivationError: The SQL cannot be parsed.
    """
    return _distinct_calls(_parse(sql))


def _distinct_calls(*trees: exp.Expr) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for tree in trees for name in nondeterministic_calls(tree)))


def derive(
    compiled_sql: str,
    model: str,
    upstream: Relation,
    source_key: Sequence[str],
    target_key: Sequence[str],
    output: Relation | None = None,
    filter_joins: Sequence[str] = (),
) -> Derivation:
    """Derive the capture SQL of one morphism from the model's compiled SQL.

    Args:
        compiled_sql: The model's compiled SQL (manifest `compiled_code`).
        model: The model's name (for messages).
        upstream: The driving upstream's relation.
        source_key: The driving upstream's key columns.
        target_key: The model's key columns (names in its select list).
        output: The model's built relation; needed when the root's HAVING/LIMIT/DISTINCT decide which rows exist.
        filter_joins: Inner joins the model declares as filters (`meta.cdme.filter.join`), by alias or relation.

    Returns:
        The derivation.

    Raises:
        DerivationError: The SQL cannot be parsed, does not read the upstream where its rows reach the output,
            or uses a construct the rewrite does not follow; the message says which.
    """
    if not source_key or not target_key:
        msg = f"{model}: both the upstream and the model need a record key"
        raise DerivationError(msg)
    try:
        mapped = _rewrite(
            compiled_sql, upstream, source_key, target_key, flags=False, filter_joins=filter_joins
        )
        prefilter = _rewrite(
            compiled_sql, upstream, source_key, target_key, flags=True, filter_joins=filter_joins
        )
    except DerivationError as e:
        msg = f"{model}: {e}"
        raise DerivationError(msg) from e
    q = "q"
    source = key_sql([exp.column(f"{_SRC}{j}", table=q) for j in range(len(source_key))])
    target = key_sql([exp.column(f"{_TGT}{j}", table=q) for j in range(len(target_key))])
    subquery = exp.Subquery(this=mapped.root, alias=exp.TableAlias(this=exp.to_identifier(q)))
    select = (
        exp.select(exp.alias_(source, "source_key"), exp.alias_(target, "target_key"))
        .from_(subquery)
        .distinct()
    )
    rows = exp.select(exp.alias_(source.copy(), "source_key"), exp.alias_(target.copy(), "target_key")).from_(
        subquery.copy()
    )
    in_output: exp.Expr | None = None
    if mapped.output_checked:
        if output is None:
            msg = f"{model}: its HAVING/LIMIT/DISTINCT needs the built relation to tell which rows exist"
            raise DerivationError(msg)
        built = exp.select(key_sql([exp.column(c, quoted=True) for c in target_key])).from_(
            exp.table_(output.identifier, db=output.schema, quoted=True)
        )
        in_output = exp.In(this=target.copy(), query=exp.Subquery(this=built))
        select = select.where(in_output.copy())
        rows = rows.where(in_output.copy())
    # The root's HAVING is the last filter; it decides which output rows exist, so the built relation tells.
    root_having = prefilter.filters[-1] if prefilter.having is not None else None
    cases = [
        (exp.Not(this=exp.column(f"{_FLAG}{f.index}", table=q)), exp.Literal.number(f.index))
        for f in prefilter.filters
        if f is not root_having
    ]
    if root_having is not None and in_output is not None:
        cases.append((exp.Not(this=in_output.copy()), exp.Literal.number(root_having.index)))
    case = exp.Case(ifs=[exp.If(this=c, true=v) for c, v in cases]) if cases else exp.Null()
    pre_subquery = exp.Subquery(this=prefilter.root, alias=exp.TableAlias(this=exp.to_identifier(q)))
    pre_select = exp.select(exp.alias_(source.copy(), "source_key"), exp.alias_(case, "condition")).from_(
        pre_subquery
    )
    if prefilter.branched:
        # Every branch of the UNION sees every upstream row and fails the other branches' conditions, so a key
        # is filtered only when all its rows fail one (at the first such condition), never when one passes.
        pre_select = (
            exp.select(
                "source_key",
                exp.alias_(
                    exp.Case(
                        ifs=[
                            exp.If(
                                this=exp.func("bool_and", exp.column("condition").is_(exp.null()).not_()),
                                true=exp.func("min", exp.column("condition")),
                            )
                        ]
                    ),
                    "condition",
                ),
            )
            .from_(exp.Subquery(this=pre_select, alias=exp.TableAlias(this=exp.to_identifier("b"))))
            .group_by("source_key")
        )
    return Derivation(
        mapped_sql=select.sql(dialect=DIALECT),
        prefilter_sql=pre_select.sql(dialect=DIALECT),
        filters=tuple(prefilter.filters),
        output_checked=mapped.output_checked,
        inferred_kind=mapped.kind,
        deduplicates=mapped.deduplicates,
        mapped_rows_sql=rows.sql(dialect=DIALECT),
        passthrough=mapped.passthrough,
        nondeterministic=_distinct_calls(select, pre_select),
    )
