"""The declaration-driven rules on projects other people wrote: adopt CDME on a real model, then break it.

The research corpora carry no `meta.cdme`, so grain, lookup, iso, personal-data and access mistakes cannot be
planted in them as they are. Each test here declares what a team adopting CDME would declare on one of their
models and its upstream, checks the adopted project is still clean, then plants one mistake and expects exactly
that rule to catch it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from services.core.artifacts import Manifest, ManifestNode, load_manifest
from services.core.artifacts.manifest import ColumnInfo
from services.core.ldm import entity_name, parse_project_config
from services.validation.domain import Report, validate_project
from services.validation.domain.analysis import project_schemas, sqlglot_dialect
from tests.conftest import RESEARCH_DATA

CORPORA = sorted(RESEARCH_DATA.glob("*-manifest.json.gz"))
CONFIG = parse_project_config(
    {
        "grains": [
            {"name": "Atomic"},
            {"name": "Reference"},
            {"name": "DailyAggregate", "coarsens": "Atomic"},
        ],
        "roles": [{"name": "data_engineer"}, {"name": "auditor"}],
    },
    "test cdme.yml",
)


def _name(path: Path) -> str:
    return path.name.split("-v12")[0]


@dataclass(frozen=True)
class Adopted:
    """A corpus with one model M and its single upstream P declared, and M's parsed SQL."""

    manifest: Manifest
    model: ManifestNode
    upstream: ManifestNode
    upstream_relation: str
    tree: exp.Expr
    root: exp.Select
    upstream_columns: list[str]


def _validate(manifest: Manifest, roles: frozenset[str] | None = None) -> Report:
    return validate_project(manifest, config=CONFIG, principal="tester", roles=roles)


def _replace(manifest: Manifest, node: ManifestNode, **changes: Any) -> Manifest:
    nodes = dict(manifest.nodes)
    nodes[node.unique_id] = node.model_copy(update=changes)
    return manifest.model_copy(update={"nodes": nodes})


def _declare(manifest: Manifest, uid: str, cdme: dict[str, Any]) -> Manifest:
    node = manifest.nodes[uid]
    meta = {**node.config.meta, "cdme": cdme}
    return _replace(manifest, node, config=node.config.model_copy(update={"meta": meta}))


def _adopt(path: Path) -> Adopted:
    """Declare the first fully resolved model that reads exactly one upstream model, and that upstream."""
    manifest = load_manifest(path)
    report = validate_project(manifest)
    schemas = project_schemas(manifest)
    dialect = sqlglot_dialect(manifest.metadata.adapter_type)
    project = manifest.metadata.project_name
    for node in manifest.models():
        parents = [p for p in node.depends_on.nodes if p.startswith("model.")]
        if len(parents) != 1 or node.name in report.coverage.unresolved_models or not node.compiled_code:
            continue
        upstream = manifest.nodes[parents[0]]
        upstream_schema = schemas.get(upstream.unique_id)
        tree = sqlglot.parse_one(node.compiled_code, dialect=dialect)
        root = tree if isinstance(tree, exp.Select) else None
        source = root.args.get("from_") if root is not None else None
        if (
            root is None
            or source is None
            or not isinstance(source.this, exp.Table)
            or root.args.get("group")
            or root.args.get("distinct")
            or upstream_schema is None
            or not upstream_schema.complete
            or upstream.relation_name is None
        ):
            continue
        adopted = _declare(
            manifest,
            upstream.unique_id,
            {"grain": "Atomic", "access": ["data_engineer", "auditor"]},
        )
        adopted = _declare(
            adopted,
            node.unique_id,
            {"driving": entity_name(upstream, project), "grain": "Atomic"},
        )
        return Adopted(
            adopted,
            adopted.nodes[node.unique_id],
            adopted.nodes[upstream.unique_id],
            upstream.relation_name,
            tree,
            root,
            sorted(upstream_schema.columns),
        )
    pytest.fail(f"{path.name}: no model reads exactly one upstream model with a resolved schema")


@pytest.fixture(scope="module", params=[_name(p) for p in CORPORA])
def adopted(request: pytest.FixtureRequest) -> Adopted:
    [path] = [p for p in CORPORA if _name(p) == request.param]
    return _adopt(path)


def _with_sql(adopted: Adopted, tree: exp.Expr) -> Manifest:
    dialect = adopted.manifest.metadata.adapter_type
    return _replace(adopted.manifest, adopted.model, compiled_code=tree.sql(dialect=dialect))


def _errors_of(report: Report, model: ManifestNode) -> set[str]:
    return {f.rule for f in report.errors if f.model == model.name}


def test_adopting_the_declarations_keeps_the_project_clean(adopted: Adopted) -> None:
    report = _validate(adopted.manifest, roles=frozenset({"data_engineer"}))
    assert report.errors == [], [f.message for f in report.errors]


def test_an_iso_model_with_group_by_is_a_morphism_error(adopted: Adopted) -> None:
    iso = _declare(
        adopted.manifest,
        adopted.model.unique_id,
        {**adopted.model.config.meta["cdme"], "kind": "iso"},
    )
    assert _errors_of(_validate(iso), adopted.model) == set(), "declared iso, SQL still 1:1"
    grouped = adopted.tree.copy()
    root = grouped if isinstance(grouped, exp.Select) else None
    assert root is not None
    root.group_by(*[exp.column(c) for c in adopted.upstream_columns[:1]], copy=False)
    mutated = _replace(iso, iso.nodes[adopted.model.unique_id], compiled_code=grouped.sql())
    assert "morphism.iso" in _errors_of(_validate(mutated), adopted.model)


def _join_source(
    manifest: Manifest, model: ManifestNode, tree: exp.Select, source_id: str
) -> tuple[Manifest, exp.Select]:
    """`tree` cross-joined to a source, as `{{ source() }}` would add it: SQL and depends_on both gain it."""
    source = manifest.sources[source_id]
    joined = tree.copy()
    joined.join(f"{source.relation_name} as {source.name}_lookup", join_type="cross", copy=False)
    depends_on = model.depends_on.model_copy(update={"nodes": [*model.depends_on.nodes, source_id]})
    sql = joined.sql(dialect=manifest.metadata.adapter_type)
    return _replace(manifest, model, compiled_code=sql, depends_on=depends_on), joined


def test_a_lookup_without_version_semantics_is_an_error(adopted: Adopted) -> None:
    manifest, model = adopted.manifest, adopted.model
    project = manifest.metadata.project_name
    first, second = [uid for uid, s in manifest.sources.items() if s.relation_name][:2]
    assert isinstance(adopted.tree, exp.Select)
    enriched, tree = _join_source(manifest, model, adopted.tree, first)
    declared = {
        **model.config.meta["cdme"],
        "kind": "enrich",
        "lookups": {entity_name(manifest.sources[first], project): {"version": "latest"}},
    }
    enriched = _declare(enriched, model.unique_id, declared)
    assert _errors_of(_validate(enriched), model) == set(), "a declared lookup with its version semantics"

    mutated, _ = _join_source(enriched, enriched.nodes[model.unique_id], tree, second)
    caught = [f for f in _validate(mutated).errors if f.rule == "lookups" and f.model == model.name]
    unversioned = entity_name(manifest.sources[second], project)
    assert caught and f"{unversioned!r} is an upstream of {model.name}" in caught[0].message


def test_reading_another_grain_without_aggregating_is_a_grain_error(adopted: Adopted) -> None:
    daily = _declare(
        adopted.manifest,
        adopted.upstream.unique_id,
        {**adopted.upstream.config.meta["cdme"], "grain": "DailyAggregate"},
    )
    assert "grain" in _errors_of(_validate(daily), adopted.model)


def test_a_personal_column_reaching_a_mart_is_a_governance_error(adopted: Adopted) -> None:
    column = adopted.upstream_columns[0]
    upstream = adopted.upstream
    columns = dict(upstream.columns)
    documented = columns.get(column)
    meta = {"cdme": {"sensitivity": "personal"}}
    columns[column] = (
        documented.model_copy(update={"meta": meta})
        if documented is not None
        else ColumnInfo.model_validate({"name": column, "meta": meta})
    )
    personal = _replace(adopted.manifest, upstream, columns=columns)
    leaking = adopted.tree.copy()
    assert isinstance(leaking, exp.Select)
    leaking.join(f"{adopted.upstream_relation} as pii_source", join_type="cross", copy=False)
    leaking.select(exp.column(column, table="pii_source").as_("leaked_value"), copy=False)
    model = personal.nodes[adopted.model.unique_id]
    as_mart = _replace(personal, model, compiled_code=leaking.sql(), fqn=[model.fqn[0], "marts", model.name])
    caught = [f for f in _validate(as_mart).errors if f.rule == "governance"]
    # Other marts reading the column unhashed are caught too; the planted leak must be among them.
    assert any(
        f.model == adopted.model.name and "`leaked_value` carries personal data into a mart" in f.message
        for f in caught
    ), [f.message for f in caught]


def test_an_upstream_the_principals_roles_deny_does_not_exist_for_it(adopted: Adopted) -> None:
    restricted = _declare(
        adopted.manifest,
        adopted.upstream.unique_id,
        {**adopted.upstream.config.meta["cdme"], "access": ["auditor"]},
    )
    report = _validate(restricted, roles=frozenset({"data_engineer"}))
    caught = [f for f in report.errors if f.rule == "access" and f.model == adopted.model.name]
    assert caught and "is unknown to principal `tester`" in caught[0].message
    assert _errors_of(_validate(restricted, roles=frozenset({"auditor"})), adopted.model) == set()


def test_random_in_a_declared_model_is_an_error_not_advice(adopted: Adopted) -> None:
    noisy = adopted.tree.copy()
    assert isinstance(noisy, exp.Select)
    noisy.select(exp.func("random").as_("noise"), copy=False)
    assert "determinism" in _errors_of(_validate(_with_sql(adopted, noisy)), adopted.model)
