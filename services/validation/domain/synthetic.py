"""A synthetic dbt project's manifest for benchmarks: N models layered like a real project, valid by construction.

The project reads documented sources through staging models (explicit columns, renames and casts), builds
intermediate models from them (CTE chains with joins on keys, GROUP BY aggregates, CASE expressions, window
functions and filters) and joins intermediates into marts. Every column a model reads exists upstream, so a
correct validator reports no errors on it. The generator draws from one `random.Random(seed)`: the same seed
gives the same manifest, identical once serialised.

Examples:
    >>> manifest = parse_manifest(synthetic_manifest(models=300), "synthetic")
    >>> len(manifest.models())
    300
    >>> changed = parse_manifest(change_one_model(synthetic_manifest(models=300), seed=1), "changed")
"""

from __future__ import annotations

import copy
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["key", "num", "text", "time", "bool"]

PROJECT = "synthetic"
DATABASE = "synthetic"
# The column `change_one_model` adds.
EXTRA_COLUMN = "bench_extra"

_SYSTEMS = ("erp", "crm", "billing", "web", "logistics", "hr", "finance", "marketing")
_ENTITIES = (
    "customer", "order", "product", "invoice", "payment", "shipment", "supplier", "employee", "account",
    "store", "campaign", "ticket", "contract", "claim", "vendor", "region", "device", "session", "refund",
    "lead", "asset", "trade", "instrument", "ledger", "budget", "item", "visit", "review", "coupon", "carrier",
    "route", "plan", "member", "branch", "loan", "card", "transfer", "project", "task", "event",
)  # fmt: skip
# Staging name, the raw column it comes from, and how staging turns one into the other.
_NUMERIC = (
    ("amount", "amt", "cast({c} as numeric(18, 2))"),
    ("quantity", "qty", "cast({c} as integer)"),
    ("unit_price", "price", "cast({c} as numeric(18, 4))"),
    ("discount", "discount", "coalesce({c}, 0)"),
    ("tax", "tax_amt", "cast({c} as numeric(18, 2))"),
    ("fee", "fee", "coalesce({c}, 0)"),
    ("balance", "bal", "cast({c} as numeric(18, 2))"),
    ("weight_kg", "weight", "{c} / 1000.0"),
    ("score", "score", "cast({c} as double precision)"),
    ("cost", "cost", "cast({c} as numeric(18, 2))"),
)
_TEXT = (
    ("status", "status_cd", "lower({c})"),
    ("name", "nm", "trim({c})"),
    ("category", "category", "upper({c})"),
    ("channel", "channel", "lower({c})"),
    ("country_code", "country", "upper({c})"),
    ("currency", "ccy", "upper({c})"),
    ("description", "descr", "{c}"),
)
_TIME = (
    ("created_at", "created", "cast({c} as timestamp)"),
    ("updated_at", "updated", "cast({c} as timestamp)"),
    ("closed_at", "closed_ts", "{c}::timestamp"),
    ("effective_date", "eff_dt", "cast({c} as date)"),
)
_BOOL = (("is_active", "active_flag", "coalesce({c}, false)"), ("is_deleted", "deleted", "{c}"))
# Each kind's pool, and how many columns of it a source table has (at least, at most).
_POOLS: tuple[tuple[tuple[tuple[str, str, str], ...], Kind, int, int], ...] = (
    (_NUMERIC, "num", 2, 5),
    (_TEXT, "text", 1, 3),
    (_TIME, "time", 1, 2),
    (_BOOL, "bool", 0, 1),
)
_RAW_TYPES: dict[Kind, str] = {
    "key": "integer",
    "num": "text",
    "text": "character varying",
    "time": "text",
    "bool": "boolean",
}
_TYPES: dict[Kind, str] = {
    "key": "integer",
    "num": "numeric",
    "text": "text",
    "time": "timestamp without time zone",
    "bool": "boolean",
}
# Upper bounds that keep select lists the width real models have, however deep a chain gets.
_MAX_BASE_COLUMNS = 12
_MAX_PARTNER_COLUMNS = 3
_INDENT = "    "


@dataclass
class _Relation:
    """A source table or model as its consumers see it: where it is and which columns it has."""

    name: str
    unique_id: str
    layer: str
    entity: str
    columns: dict[str, Kind]
    raw_ref: str
    compiled_ref: str

    def key_columns(self) -> list[str]:
        return [c for c, k in self.columns.items() if k == "key"]


@dataclass
class _Sql:
    """A model's SQL under construction: CTEs in order, then a final select; relations are placeholders."""

    ctes: list[tuple[str, str]] = field(default_factory=list)
    upstream: list[_Relation] = field(default_factory=list)

    def read(self, relation: _Relation) -> str:
        self.upstream.append(relation)
        return f"__rel_{len(self.upstream) - 1}__"

    def render(self, final: str) -> tuple[str, str]:
        body = ",\n\n".join(f"{name} as (\n\n{_indent(sql)}\n\n)" for name, sql in self.ctes)
        template = f"with\n\n{body}\n\n{final}\n" if self.ctes else f"{final}\n"
        raw, compiled = template, template
        # Highest index first, so `__rel_1__` is never replaced inside `__rel_12__`.
        for index in reversed(range(len(self.upstream))):
            relation = self.upstream[index]
            raw = raw.replace(f"__rel_{index}__", relation.raw_ref)
            compiled = compiled.replace(f"__rel_{index}__", relation.compiled_ref)
        return raw, compiled


def _indent(sql: str) -> str:
    return "\n".join(_INDENT + line if line else line for line in sql.splitlines())


def _select(items: list[str], source: str, tail: str = "") -> str:
    lines = ",\n".join(f"{_INDENT}{item}" for item in items)
    return f"select\n{lines}\nfrom {source}{tail}"


def _fresh(name: str, taken: dict[str, Kind] | set[str]) -> str:
    # PostgreSQL truncates identifiers at 63 bytes; two names that only differ after that would collide.
    name = name[:55]
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _stem(column: str) -> str:
    # Re-aggregating `total_amount` gives `max_amount`, as a person would name it, not `max_total_amount`.
    prefixes = ("total_", "avg_", "max_", "min_", "first_", "last_", "any_", "previous_")
    while column.startswith(prefixes):
        column = column.split("_", 1)[1]
    return column


def _quoted(*parts: str) -> str:
    return ".".join(f'"{p}"' for p in parts)


class _Generator:
    def __init__(self, models: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.staging_count = max(1, round(models * 0.25))
        self.mart_count = max(1, round(models * 0.15))
        self.intermediate_count = models - self.staging_count - self.mart_count
        self.nodes: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self.relations: list[_Relation] = []
        # Models by each key column they output: who can be joined on that key.
        self.by_key: dict[str, list[_Relation]] = {}
        self.names: set[str] = set()

    # -- sources and staging ---------------------------------------------------------------------------------

    def _entities(self) -> list[tuple[str, str]]:
        """(entity, table) pairs: `customer` and `customers`, then `customer_2` and `customers_2`."""
        names = []
        for i in range(self.staging_count):
            word, cycle = _ENTITIES[i % len(_ENTITIES)], i // len(_ENTITIES)
            suffix = "" if cycle == 0 else f"_{cycle + 1}"
            names.append((f"{word}{suffix}", f"{word}s{suffix}"))
        return names

    def build_staging(self) -> None:
        entities = self._entities()
        for i, (entity, table) in enumerate(entities):
            system = _SYSTEMS[i % len(_SYSTEMS)]
            others = [e for e, _ in entities if e != entity]
            fks = self.rng.sample(others, k=min(len(others), self.rng.randint(1, 3)))
            # (staging name, raw name, staging expression, kind)
            spec: list[tuple[str, str, str, Kind]] = [(f"{entity}_id", "id", "{c}", "key")]
            spec += [(f"{fk}_id", f"{fk}_id", "{c}", "key") for fk in fks]
            for pool, kind, low, high in _POOLS:
                for name, raw, expression in self.rng.sample(pool, k=self.rng.randint(low, high)):
                    spec.append((name, raw, expression, kind))
            source = self._source(system, entity, table, spec)
            self._staging(system, entity, source, spec)

    def _source(
        self, system: str, entity: str, table: str, spec: list[tuple[str, str, str, Kind]]
    ) -> _Relation:
        unique_id = f"source.{PROJECT}.{system}.{table}"
        schema = f"raw_{system}"
        columns = {
            raw: _column(
                raw, f"{name.replace('_', ' ').capitalize()} as the {system} system records it.", kind
            )
            for name, raw, _, kind in spec
        }
        for info, (_, _, _, kind) in zip(columns.values(), spec, strict=True):
            info["data_type"] = _RAW_TYPES[kind]
        self.sources[unique_id] = {
            "database": DATABASE,
            "schema": schema,
            "name": table,
            "resource_type": "source",
            "package_name": PROJECT,
            "path": f"models/staging/{system}/_{system}__sources.yml",
            "original_file_path": f"models/staging/{system}/_{system}__sources.yml",
            "unique_id": unique_id,
            "fqn": [PROJECT, "staging", system, system, table],
            "source_name": system,
            "source_description": f"Tables the {system} system loads nightly.",
            "loader": "fivetran",
            "identifier": table,
            "quoting": {"database": None, "schema": None, "identifier": None, "column": None},
            "loaded_at_field": "_loaded_at",
            "freshness": {
                "warn_after": {"count": 24, "period": "hour"},
                "error_after": {"count": None, "period": None},
                "filter": None,
            },
            "external": None,
            "description": f"One row per {entity.replace('_', ' ')} in {system}.",
            "columns": columns,
            "meta": {},
            "source_meta": {},
            "tags": [],
            "config": {"enabled": True, "meta": {}, "tags": []},
            "patch_path": None,
            "unrendered_config": {},
            "relation_name": _quoted(DATABASE, schema, table),
            "created_at": 1767225600.0,
        }
        return _Relation(
            table,
            unique_id,
            "source",
            table,
            {raw: kind for _, raw, _, kind in spec},
            f"{{{{ source('{system}', '{table}') }}}}",
            _quoted(DATABASE, schema, table),
        )

    def _staging(
        self, system: str, entity: str, source: _Relation, spec: list[tuple[str, str, str, Kind]]
    ) -> None:
        sql = _Sql()
        # Qualified on purpose: a source's documented columns may be a subset, so only `alias.column` is checkable.
        alias = source.name
        sql.ctes.append(
            ("source", _select([f"{alias}.{raw}" for _, raw, _, _ in spec], f"{sql.read(source)} as {alias}"))
        )
        renamed = []
        for name, raw, expression, _ in spec:
            value = expression.format(c=raw)
            renamed.append(value if value == name else f"{value} as {name}")
        sql.ctes.append(("renamed", _select(renamed, "source")))
        columns: dict[str, Kind] = {name: kind for name, _, _, kind in spec}
        self._model(
            f"stg_{system}__{source.name}", "staging", system, entity, sql, "select * from renamed", columns
        )

    # -- intermediate models and marts -----------------------------------------------------------------------

    def _partners(self, base: _Relation, layers: tuple[str, ...], count: int) -> list[tuple[_Relation, str]]:
        chosen: list[tuple[_Relation, str]] = []
        keys = base.key_columns()
        self.rng.shuffle(keys)
        for key in keys:
            if len(chosen) == count:
                break
            taken = {r.name for r, _ in chosen} | {base.name}
            candidates = [r for r in self.by_key.get(key, []) if r.layer in layers and r.name not in taken]
            if candidates:
                chosen.append((self.rng.choice(candidates), key))
        return chosen

    def _join(self, sql: _Sql, base: _Relation, partners: list[tuple[_Relation, str]]) -> dict[str, Kind]:
        for relation in [base, *(p for p, _ in partners)]:
            sql.ctes.append((relation.name, f"select * from {sql.read(relation)}"))
        keys = base.key_columns()
        others = [c for c in base.columns if c not in keys]
        if len(others) > _MAX_BASE_COLUMNS - len(keys):
            kept = set(self.rng.sample(others, k=_MAX_BASE_COLUMNS - len(keys)))
            others = [c for c in others if c in kept]
        columns: dict[str, Kind] = {c: base.columns[c] for c in base.columns if c in keys or c in others}
        items = [f"{base.name}.{c}" for c in columns]
        joins = []
        for partner, key in partners:
            extra = [c for c in partner.columns if c != key]
            for c in self.rng.sample(extra, k=min(len(extra), self.rng.randint(1, _MAX_PARTNER_COLUMNS))):
                name = c if c not in columns else _fresh(f"{partner.entity}_{c}", columns)
                columns[name] = partner.columns[c]
                items.append(f"{partner.name}.{c}" if name == c else f"{partner.name}.{c} as {name}")
            side = "left join" if self.rng.random() < 0.7 else "inner join"
            joins.append(f"\n{side} {partner.name}\n{_INDENT}on {base.name}.{key} = {partner.name}.{key}")
        sql.ctes.append(("joined" if joins else "selected", _select(items, base.name, "".join(joins))))
        return columns

    def _case(self, sql: _Sql, prev: str, columns: dict[str, Kind]) -> None:
        nums, texts = (
            [c for c, k in columns.items() if k == "num"],
            [c for c, k in columns.items() if k == "text"],
        )
        items = ["*"]
        if nums:
            c = self.rng.choice(nums)
            low, high = sorted(self.rng.sample(range(10, 10_000, 10), k=2))
            name = _fresh(f"{c}_band", columns)
            items.append(
                f"case\n{_INDENT * 2}when {c} >= {high} then 'high'\n{_INDENT * 2}when {c} >= {low} then 'medium'\n"
                f"{_INDENT * 2}else 'low'\n{_INDENT}end as {name}"
            )
            columns[name] = "text"
        if texts:
            c = self.rng.choice(texts)
            name = _fresh(f"is_{c}_known", columns)
            items.append(f"case when {c} is null or {c} = '' then false else true end as {name}")
            columns[name] = "bool"
        if len(items) == 1:
            name = _fresh("row_source", columns)
            items.append(
                f"case when {next(iter(columns))} is null then 'orphan' else 'matched' end as {name}"
            )
            columns[name] = "text"
        sql.ctes.append((f"banded_{len(sql.ctes)}", _select(items, prev)))

    def _window(self, sql: _Sql, prev: str, columns: dict[str, Kind], entity: str) -> None:
        keys = [c for c, k in columns.items() if k == "key"]
        times = [c for c, k in columns.items() if k == "time"]
        nums = [c for c, k in columns.items() if k == "num"]
        key = self.rng.choice(keys)
        order = self.rng.choice(times) if times else key
        rank = _fresh(f"{entity}_recency_rank", columns)
        items = ["*", f"row_number() over (partition by {key} order by {order} desc) as {rank}"]
        columns[rank] = "num"
        if nums:
            c = self.rng.choice(nums)
            running = _fresh(f"{_stem(c)}_per_{key.removesuffix('_id')}", columns)
            items.append(f"sum({c}) over (partition by {key}) as {running}")
            columns[running] = "num"
            previous = _fresh(f"previous_{_stem(c)}", columns)
            items.append(f"lag({c}) over (partition by {key} order by {order}) as {previous}")
            columns[previous] = "num"
        sql.ctes.append((f"ranked_{len(sql.ctes)}", _select(items, prev)))

    def _filter(self, sql: _Sql, prev: str, columns: dict[str, Kind]) -> None:
        conditions = [f"{c} > 0" for c, k in columns.items() if k == "num"]
        conditions += [f"{c} is not null" for c, k in columns.items() if k in {"text", "time"}]
        conditions += [f"not {c}" for c, k in columns.items() if k == "bool" and c == "is_deleted"]
        chosen = self.rng.sample(conditions, k=min(len(conditions), self.rng.randint(1, 2))) or ["true"]
        sql.ctes.append((f"filtered_{len(sql.ctes)}", f"select * from {prev}\nwhere {' and '.join(chosen)}"))

    def _aggregate(self, sql: _Sql, prev: str, columns: dict[str, Kind]) -> dict[str, Kind]:
        key = self.rng.choice([c for c, k in columns.items() if k == "key"])
        out: dict[str, Kind] = {key: "key"}
        items = [key]
        texts = [c for c, k in columns.items() if k == "text"]
        group = [key]
        if texts and self.rng.random() < 0.3:
            text = self.rng.choice(texts)
            out[text] = "text"
            items.append(text)
            group.append(text)
        count = _fresh(f"{key.removesuffix('_id')}_rows", out)
        items.append(f"count(*) as {count}")
        out[count] = "num"
        for c in [c for c, k in columns.items() if k == "num"][:4]:
            function = self.rng.choice(("sum", "avg", "max", "min"))
            name = _fresh(f"{'total' if function == 'sum' else function}_{_stem(c)}", out)
            items.append(f"{function}({c}) as {name}")
            out[name] = "num"
        for c in [c for c, k in columns.items() if k == "time"][:2]:
            for function, prefix in (("min", "first"), ("max", "last")):
                name = _fresh(f"{prefix}_{_stem(c)}", out)
                items.append(f"{function}({c}) as {name}")
                out[name] = "time"
        for c in [c for c, k in columns.items() if k == "bool"][:1]:
            name = _fresh(f"any_{_stem(c)}", out)
            items.append(f"bool_or({c}) as {name}")
            out[name] = "bool"
        sql.ctes.append(
            (f"aggregated_{len(sql.ctes)}", _select(items, prev, f"\ngroup by {', '.join(group)}"))
        )
        return out

    def build_intermediate(self) -> None:
        verbs = ("enriched", "joined", "summary", "ranked", "filtered", "by_day", "rollup", "scored")
        for _ in range(self.intermediate_count):
            earlier = [r for r in self.relations if r.layer == "intermediate"]
            pool = (
                earlier
                if earlier and self.rng.random() < 0.5
                else [r for r in self.relations if r.layer == "staging"]
            )
            base = self.rng.choice(pool)
            count = 0 if self.rng.random() < 0.15 else self.rng.randint(1, 3)
            self._derived(base, ("staging", "intermediate"), count, "intermediate", verbs)

    def build_marts(self) -> None:
        intermediates = [r for r in self.relations if r.layer == "intermediate"]
        pool = intermediates or [r for r in self.relations if r.layer == "staging"]
        for _ in range(self.mart_count):
            base = self.rng.choice(pool)
            layers = ("intermediate",) if intermediates else ("staging",)
            partners = self._partners(base, layers, self.rng.randint(1, 3)) or self._partners(
                base, ("staging",), 1
            )
            self._derived(base, layers, len(partners), "marts", ("fct", "dim"), partners)

    def _derived(
        self,
        base: _Relation,
        layers: tuple[str, ...],
        count: int,
        layer: str,
        words: tuple[str, ...],
        partners: list[tuple[_Relation, str]] | None = None,
    ) -> None:
        sql = _Sql()
        if partners is None:
            partners = self._partners(base, layers, count) if count else []
        columns = self._join(sql, base, partners)
        steps = ["case", "window", "filter"] if layer == "intermediate" else ["case"]
        for step in self.rng.sample(steps, k=self.rng.randint(1, len(steps))):
            prev = sql.ctes[-1][0]
            if step == "case":
                self._case(sql, prev, columns)
            elif step == "window":
                self._window(sql, prev, columns, base.entity)
            else:
                self._filter(sql, prev, columns)
        if self.rng.random() < (0.4 if layer == "intermediate" else 0.25):
            columns = self._aggregate(sql, sql.ctes[-1][0], columns)
        sql.ctes.append(("final", f"select * from {sql.ctes[-1][0]}"))
        word = self.rng.choice(words)
        name = f"int_{base.entity}_{word}" if layer == "intermediate" else f"{word}_{base.entity}"
        self._model(name, layer, None, base.entity, sql, _select(list(columns), "final"), columns)

    # -- nodes -----------------------------------------------------------------------------------------------

    def _model(
        self,
        name: str,
        layer: str,
        system: str | None,
        entity: str,
        sql: _Sql,
        final: str,
        columns: dict[str, Kind],
    ) -> None:
        name = _fresh(name, self.names)
        self.names.add(name)
        raw, compiled = sql.render(final)
        unique_id = f"model.{PROJECT}.{name}"
        folder = [layer, system] if system else [layer]
        path = "/".join([*folder, f"{name}.sql"])
        documented = layer == "marts" or self.rng.random() < 0.25
        upstream = list(dict.fromkeys(r.unique_id for r in sql.upstream))
        refs = [
            {"name": r.name, "package": None, "version": None} for r in sql.upstream if r.layer != "source"
        ]
        materialized = {"staging": "view", "intermediate": "view", "marts": "table"}[layer]
        self.nodes[unique_id] = {
            "database": DATABASE,
            "schema": layer,
            "name": name,
            "resource_type": "model",
            "package_name": PROJECT,
            "path": path,
            "original_file_path": f"models/{path}",
            "unique_id": unique_id,
            "fqn": [PROJECT, *folder, name],
            "alias": name,
            "checksum": {"name": "sha256", "checksum": hashlib.sha256(raw.encode()).hexdigest()},
            "config": {
                "enabled": True,
                "alias": None,
                "schema": layer,
                "database": None,
                "tags": [layer],
                "meta": {},
                "materialized": materialized,
                "persist_docs": {},
                "on_schema_change": "ignore",
                "contract": {"enforced": False, "alias_types": True},
                "access": "protected",
            },
            "tags": [layer],
            "description": f"{layer.capitalize()} model over {entity.replace('_', ' ')} records."
            if documented
            else "",
            "columns": {c: _column(c, f"{c.replace('_', ' ').capitalize()}.", k) for c, k in columns.items()}
            if documented
            else {},
            "meta": {},
            "group": None,
            "docs": {"show": True, "node_color": None},
            "patch_path": f"{PROJECT}://models/{'/'.join(folder)}/_{layer}__models.yml"
            if documented
            else None,
            "build_path": None,
            "unrendered_config": {"materialized": materialized, "schema": layer},
            "created_at": 1767225600.0,
            "relation_name": _quoted(DATABASE, layer, name),
            "raw_code": raw,
            "doc_blocks": [],
            "language": "sql",
            "refs": list({r["name"]: r for r in refs}.values()),
            "sources": [[r.unique_id.split(".")[2], r.name] for r in sql.upstream if r.layer == "source"],
            "metrics": [],
            "functions": [],
            "depends_on": {"macros": [], "nodes": upstream},
            "compiled_path": f"target/compiled/{PROJECT}/models/{path}",
            "compiled": True,
            "compiled_code": compiled,
            "extra_ctes_injected": True,
            "extra_ctes": [],
            "contract": {"enforced": False, "alias_types": True, "checksum": None},
            "access": "protected",
            "constraints": [],
            "version": None,
            "latest_version": None,
            "deprecation_date": None,
            "primary_key": [],
            "time_spine": None,
        }
        relation = _Relation(
            name,
            unique_id,
            layer,
            entity,
            columns,
            f"{{{{ ref('{name}') }}}}",
            _quoted(DATABASE, layer, name),
        )
        self.relations.append(relation)
        for key in relation.key_columns():
            self.by_key.setdefault(key, []).append(relation)

    def manifest(self) -> dict[str, Any]:
        parent_map = {uid: list(node["depends_on"]["nodes"]) for uid, node in self.nodes.items()}
        parent_map.update({uid: [] for uid in self.sources})
        child_map: dict[str, list[str]] = {uid: [] for uid in parent_map}
        for uid, parents in parent_map.items():
            for parent in parents:
                child_map[parent].append(uid)
        invocation = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        return {
            "metadata": {
                "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                "dbt_version": "1.11.16",
                "generated_at": "2026-01-01T00:00:00.000000Z",
                "invocation_id": str(invocation),
                "env": {},
                "project_name": PROJECT,
                "project_id": hashlib.md5(PROJECT.encode(), usedforsecurity=False).hexdigest(),
                "user_id": None,
                "send_anonymous_usage_stats": False,
                "adapter_type": "postgres",
                "quoting": {"database": True, "schema": True, "identifier": True, "column": None},
            },
            "nodes": self.nodes,
            "sources": self.sources,
            "macros": {},
            "docs": {},
            "exposures": {},
            "metrics": {},
            "groups": {},
            "selectors": {},
            "disabled": {},
            "parent_map": parent_map,
            "child_map": child_map,
            "group_map": {},
            "saved_queries": {},
            "semantic_models": {},
            "unit_tests": {},
            "functions": {},
        }


def _column(name: str, description: str, kind: Kind) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "meta": {},
        "data_type": _TYPES[kind],
        "constraints": [],
        "quote": None,
        "config": {"meta": {}, "tags": []},
        "tags": [],
        "granularity": None,
        "doc_blocks": [],
    }


def synthetic_manifest(models: int = 2000, seed: int = 7) -> dict[str, Any]:
    """A compiled dbt manifest (v12, PostgreSQL) of a synthetic project with `models` models.

    A quarter of the models are staging models (one per documented source table), 15 % are marts and the
    rest intermediate models, each reading only columns its upstreams have.

    Args:
        models: How many models; at least 3, one per layer.
        seed: The seed of the one random generator; the same seed gives the same manifest.

    Returns:
        The manifest as decoded JSON (`parse_manifest` reads it).

    Raises:
        ValueError: Fewer than 3 models.

    Examples:
        >>> synthetic_manifest(models=300) == synthetic_manifest(models=300)
        True
    """
    if models < 3:
        msg = f"a synthetic project needs at least 3 models (one per layer), got {models}"
        raise ValueError(msg)
    generator = _Generator(models, seed)
    generator.build_staging()
    generator.build_intermediate()
    generator.build_marts()
    return generator.manifest()


def change_one_model(manifest: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of a synthetic manifest where one mid-graph model gained one computed column.

    The model is an intermediate model with downstream models and a documented numeric column; its final
    select gains `, <that column> * 2 as bench_extra`, in both its raw and its compiled SQL, as an edit of
    the model's file followed by `dbt compile` would.

    Args:
        manifest: A manifest from `synthetic_manifest`; it is not modified.
        seed: Picks the model; the same seed picks the same one.

    Returns:
        The changed copy.

    Raises:
        ValueError: No model of the manifest qualifies.
    """
    child_map = manifest.get("child_map") or {}
    candidates = sorted(
        uid
        for uid, node in manifest["nodes"].items()
        if node.get("resource_type") == "model"
        and node.get("schema") == "intermediate"
        and child_map.get(uid)
        and _numeric_column(node) is not None
    )
    if not candidates:
        msg = "no intermediate model with downstream models and a documented numeric column to change"
        raise ValueError(msg)
    uid = random.Random(seed).choice(candidates)
    changed = copy.deepcopy(manifest)
    node = changed["nodes"][uid]
    column = _numeric_column(node)
    addition = f",\n{_INDENT}{column} * 2 as {EXTRA_COLUMN}"
    for field_name in ("raw_code", "compiled_code"):
        code: str = node[field_name]
        # The generator ends every intermediate model with `select <columns>\nfrom final`.
        at = code.rindex("\nfrom ")
        node[field_name] = code[:at] + addition + code[at:]
    node["checksum"] = {"name": "sha256", "checksum": hashlib.sha256(node["raw_code"].encode()).hexdigest()}
    return changed


def _numeric_column(node: dict[str, Any]) -> str | None:
    for name, info in (node.get("columns") or {}).items():
        if info.get("data_type") == _TYPES["num"]:
            return str(name)
    return None
