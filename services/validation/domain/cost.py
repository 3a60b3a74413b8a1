"""Cost estimation: each model's output cardinality from the warehouse's own statistics, against its budget.

Statistics come from PostgreSQL's planner catalog, the same numbers its optimizer uses: `pg_class.reltuples`
(rows) and `pg_stats.n_distinct` (distinct values per column, negative meaning a fraction of the rows). They are
propagated through the DAG in topological order: a model's estimate becomes the input of the models reading it.
The rules are the planner's classic ones: an equality with a constant keeps 1/n_distinct of the rows (0.005
without statistics), a range a third, other predicates half; an equi-join multiplies by the right side's rows
per key; GROUP BY and DISTINCT keep at most the product of the grouping columns' distinct counts; LIMIT caps.
An estimate is an order of magnitude, and the report says which statistics it rests on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from services.core.artifacts import Manifest, SourceDefinition
from services.core.ldm import ProjectConfig, entity_name
from services.core.ldm.config import Budget
from services.validation.domain.analysis import sqlglot_dialect, topological_order
from services.validation.domain.findings import CostEstimate, Finding

_EQUALITY_DEFAULT = 0.005  # PostgreSQL's DEFAULT_EQ_SEL
_RANGE = 1 / 3  # DEFAULT_INEQ_SEL
_OTHER = 0.5
_GROUP_DEFAULT = 0.1  # grouping without statistics keeps a tenth of the rows


@dataclass(frozen=True)
class TableStats:
    """What the warehouse's planner knows about one relation."""

    rows: float
    distinct: Mapping[str, float] = field(default_factory=dict)


def warehouse_stats(
    conn: psycopg.Connection[Any], relations: list[tuple[str, str]]
) -> dict[tuple[str, str], TableStats]:
    """Read planner statistics for `(schema, table)` pairs with a psycopg connection.

    Relations that were never analysed (`reltuples < 0`) are left out: their size is unknown, not zero.
    """
    if not relations:
        return {}
    schemas = [s for s, _ in relations]
    tables = [t for _, t in relations]
    # One round trip for every relation and column, however large the project: a left join keeps tables that
    # were analysed but have no column statistics yet.
    rows = conn.execute(
        "select n.nspname, c.relname, c.reltuples, st.attname, st.n_distinct "
        "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "join unnest(%s::text[], %s::text[]) as r(s, t) on r.s = n.nspname and r.t = c.relname "
        "left join pg_stats st on st.schemaname = n.nspname and st.tablename = c.relname "
        "where c.reltuples >= 0",
        (schemas, tables),
    ).fetchall()
    collected: dict[tuple[str, str], tuple[float, dict[str, float]]] = {}
    for schema, table, reltuples, column, n_distinct in rows:
        _, distinct = collected.setdefault((str(schema), str(table)), (float(reltuples), {}))
        if column is not None and n_distinct is not None:
            distinct[str(column)] = (
                float(n_distinct) if n_distinct >= 0 else -float(n_distinct) * float(reltuples)
            )
    stats = {key: TableStats(rows=rows_, distinct=distinct) for key, (rows_, distinct) in collected.items()}
    return stats


def relations_of(manifest: Manifest) -> list[tuple[str, str]]:
    """The `(schema, table)` of every source, seed, snapshot and model: what to read statistics for."""
    return [
        (
            node.schema_.lower(),
            (node.identifier if isinstance(node, SourceDefinition) else node.alias or node.name).lower(),
        )
        for node in manifest.entities()
    ]


@dataclass
class _Estimate:
    rows: float
    distinct: dict[str, float]
    widest: float
    joins: int


class _Estimator:
    def __init__(self, stats: Mapping[tuple[str, str], TableStats]) -> None:
        self.stats = dict(stats)
        self.ctes: dict[str, _Estimate] = {}

    def query(self, node: exp.Expr) -> _Estimate | None:
        if isinstance(node, exp.Subquery):
            return self.query(node.this)
        if isinstance(node, exp.SetOperation):
            left, right = self.query(node.left), self.query(node.right)
            if left is None or right is None:
                return None
            rows = left.rows + right.rows
            return _Estimate(rows, {}, max(left.widest, right.widest, rows), max(left.joins, right.joins))
        if not isinstance(node, exp.Select):
            return None
        with_ = node.args.get("with_") or node.args.get("with")
        for cte in with_.expressions if with_ is not None else []:
            estimate = self.query(cte.this)
            if estimate is not None:
                self.ctes[cte.alias_or_name.lower()] = estimate
        source = node.args.get("from_") or node.args.get("from")
        current = self.relation(source.this) if source is not None else _Estimate(1.0, {}, 1.0, 0)
        if current is None:
            return None
        joins = current.joins
        widest = current.widest
        for join in node.args.get("joins") or []:
            right = self.relation(join.this)
            if right is None:
                if (join.side or "").upper() != "LEFT":
                    return None
                # A left join keeps every left row whatever the right side holds: read it as a 1:1 lookup.
                right = _Estimate(current.rows, {}, current.rows, 0)
            current = self._join(current, right, join)
            joins += 1 + right.joins
            widest = max(widest, current.rows, right.widest)
        rows = current.rows * self._selectivity(node.args.get("where"), current)
        group = node.args.get("group")
        keys = list(group.expressions) if group is not None else []
        if node.args.get("distinct") and not keys:
            keys = list(node.selects)
        if keys:
            rows = min(rows, self._groups(keys, current, rows))
        if (limit := node.args.get("limit")) is not None and isinstance(limit.expression, exp.Literal):
            rows = min(rows, float(limit.expression.this))
        distinct = _projected_distinct(node, current.distinct, rows)
        return _Estimate(max(rows, 1.0), distinct, max(widest, rows), joins)

    def relation(self, node: exp.Expr) -> _Estimate | None:
        if isinstance(node, exp.Table):
            if not node.db and node.name.lower() in self.ctes:
                return self.ctes[node.name.lower()]
            stats = self.stats.get((node.db.lower(), node.name.lower()))
            if stats is None:
                return None
            return _Estimate(stats.rows, dict(stats.distinct), stats.rows, 0)
        if isinstance(node, exp.Subquery):
            return self.query(node.this)
        return None

    def _join(self, left: _Estimate, right: _Estimate, join: exp.Join) -> _Estimate:
        condition = join.args.get("on")
        if condition is None or (join.kind or "").upper() == "CROSS":
            rows = left.rows * right.rows
        else:
            fanout = 1.0
            for eq in condition.find_all(exp.EQ):
                if isinstance(eq.right, exp.Column) and isinstance(eq.left, exp.Column):
                    ndv = right.distinct.get(eq.right.name.lower()) or right.distinct.get(
                        eq.left.name.lower()
                    )
                    fanout = right.rows / ndv if ndv else 1.0
                    break
            rows = left.rows * max(fanout, 1.0 if (join.side or "").upper() == "LEFT" else 0.0)
        return _Estimate(rows, {**right.distinct, **left.distinct}, max(left.widest, right.widest, rows), 0)

    def _selectivity(self, where: exp.Expr | None, current: _Estimate) -> float:
        if where is None:
            return 1.0
        factor = 1.0
        for predicate in _conjuncts(where.this):
            constant = isinstance(predicate.args.get("expression"), exp.Literal | exp.Cast)
            left = predicate.args.get("this")
            ndv = current.distinct.get(left.name.lower()) if isinstance(left, exp.Column) else None
            if isinstance(predicate, exp.EQ) and constant:
                factor *= 1 / ndv if ndv else _EQUALITY_DEFAULT
            elif isinstance(predicate, exp.NEQ) and constant:
                factor *= 1 - (1 / ndv if ndv else _EQUALITY_DEFAULT)
            elif isinstance(predicate, exp.GT | exp.GTE | exp.LT | exp.LTE | exp.Between):
                factor *= _RANGE
            else:
                factor *= _OTHER
        return factor

    def _groups(self, keys: list[exp.Expr], current: _Estimate, rows: float) -> float:
        product = 1.0
        for key in keys:
            column = key if isinstance(key, exp.Column) else key.find(exp.Column)
            ndv = current.distinct.get(column.name.lower()) if column is not None else None
            if not ndv:
                return rows * _GROUP_DEFAULT
            product *= ndv
        return product


def _projected_distinct(select: exp.Select, inputs: dict[str, float], rows: float) -> dict[str, float]:
    # Distinct counts follow a column through renames (`currency as currency_code`), so joins and groups
    # downstream still find them; `*` passes every input column on.
    out: dict[str, float] = {}
    for projection in select.selects:
        if isinstance(projection, exp.Star) or (
            isinstance(projection, exp.Column) and isinstance(projection.this, exp.Star)
        ):
            out.update(inputs)
            continue
        inner = projection.this if isinstance(projection, exp.Alias) else projection
        if isinstance(inner, exp.Column) and (ndv := inputs.get(inner.name.lower())):
            out[projection.alias_or_name.lower()] = ndv
    return {name: min(ndv, rows) for name, ndv in out.items()}


def _conjuncts(condition: exp.Expr) -> list[exp.Expr]:
    if isinstance(condition, exp.And):
        return _conjuncts(condition.left) + _conjuncts(condition.right)
    if isinstance(condition, exp.Paren):
        return _conjuncts(condition.this)
    return [condition]


def estimate_costs(
    manifest: Manifest,
    stats: Mapping[tuple[str, str], TableStats],
    config: ProjectConfig | None = None,
    budget_override: Budget | None = None,
) -> tuple[list[CostEstimate], list[Finding]]:
    """Estimate every model's output, intermediate size and join depth, and check them against budgets.

    Args:
        manifest: A compiled manifest.
        stats: Planner statistics of the relations that exist (`warehouse_stats`), keyed by (schema, table).
        config: `cdme.yml`, whose budgets apply per model.
        budget_override: A budget from the request, applied over `cdme.yml`'s.

    Returns:
        One estimate per model (rows None where an input has no statistics) and a `cost` finding per budget
        an estimate exceeds.
    """
    dialect = sqlglot_dialect(manifest.metadata.adapter_type)
    known = dict(stats)
    estimates: list[CostEstimate] = []
    findings: list[Finding] = []
    project = manifest.metadata.project_name
    for uid in topological_order(manifest):
        node = manifest.nodes[uid]
        if node.resource_type != "model" or not node.compiled_code:
            continue
        name = entity_name(node, project)
        tree: exp.Expr | None = None
        try:
            tree = sqlglot.parse_one(node.compiled_code, dialect=dialect)
            estimate = _Estimator(known).query(tree)
        except (SqlglotError, RecursionError, ValueError, ZeroDivisionError):
            estimate = None
        if estimate is not None:
            # What this model will hold feeds the models that read it, as if it were analysed.
            known[(node.schema_.lower(), (node.alias or node.name).lower())] = TableStats(
                estimate.rows, estimate.distinct
            )
        joins = (
            sum(len(select.args.get("joins") or []) for select in tree.find_all(exp.Select)) if tree else None
        )
        result = CostEstimate(
            model=name,
            rows=round(estimate.rows) if estimate is not None else None,
            intermediate_rows=round(estimate.widest) if estimate is not None else None,
            join_depth=joins,
        )
        estimates.append(result)
        budget = config.budgets.for_model(node.name) if config is not None else Budget()
        if budget_override is not None:
            budget = budget.model_copy(update=budget_override.model_dump(exclude_none=True))
        findings += _over_budget(result, budget)
    return estimates, findings


def _over_budget(estimate: CostEstimate, budget: Budget) -> list[Finding]:
    checks = (
        ("output rows", estimate.rows, budget.max_output_rows),
        ("intermediate rows", estimate.intermediate_rows, budget.max_intermediate_rows),
        ("join depth", estimate.join_depth, budget.max_join_depth),
    )
    findings = []
    for what, value, limit in checks:
        if value is None or limit is None or value <= limit:
            continue
        message = f"estimated {what} {value:,} exceed the budget of {limit:,} (x{value / limit:.1f})"
        findings.append(Finding.of("cost", "VIOLATION", estimate.model, message))
    return findings
