"""The LDM loader on good and bad declarations, and on real public projects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from services.core.artifacts import Manifest, load_manifest, parse_manifest
from services.core.errors import LdmError
from services.core.ldm import (
    LdmDeclarationError,
    ProjectConfig,
    load_ldm,
    load_project_config,
    parse_project_config,
)
from services.core.ldm.model import EntityDecl, FilterDecl
from tests.conftest import PROJECT_DIR, RESEARCH_DATA
from tests.manifest_nodes import manifest_columns, manifest_node

CONFIG = parse_project_config(
    {
        "grains": [
            {"name": "Atomic"},
            {"name": "Reference"},
            {"name": "DailyAggregate", "coarsens": "Atomic"},
            {"name": "MonthlyAggregate", "coarsens": "DailyAggregate"},
        ],
        "types": [
            {"name": "Money", "base": "numeric"},
            {"name": "Notional", "parent": "Money"},
            {"name": "Date", "base": "date"},
        ],
        "roles": [{"name": "analyst"}, {"name": "ops"}],
        "requirements": {"REQ-1": "the first requirement"},
        "budgets": {
            "default": {"max_output_rows": 1000, "max_join_depth": 3},
            "models": {"big": {"max_output_rows": 10**6}},
        },
    }
)


def _test(name: str, on: str, test: str, column: str | None = None, **kwargs: Any) -> dict[str, Any]:
    return {
        "unique_id": f"test.p.{name}",
        "resource_type": "test",
        "name": name,
        "package_name": "p",
        "schema": "s",
        "column_name": column,
        "attached_node": on,
        "test_metadata": {"name": test, "kwargs": kwargs},
        "depends_on": {"nodes": [on], "macros": []},
    }


def _manifest(*nodes: dict[str, Any], sources: tuple[dict[str, Any], ...] = ()) -> Manifest:
    return parse_manifest(
        {
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
            "nodes": {n["unique_id"]: n for n in nodes},
            "sources": {s["unique_id"]: s for s in sources},
        }
    )


def _source(name: str, cdme: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    return {
        "unique_id": f"source.p.raw.{name}",
        "name": name,
        "source_name": "raw",
        "package_name": "p",
        "schema": "raw",
        "database": "db",
        "identifier": name,
        "columns": manifest_columns(*columns),
        "config": {"meta": {"cdme": cdme}},
    }


def _good_project() -> Manifest:
    trades = _source(
        "trades",
        {"key": "trade_id", "grain": "Atomic", "epoch_column": "epoch_date"},
        ("trade_id", "epoch_date", "cp_id"),
    )
    return _manifest(
        manifest_node(
            "stg",
            cdme={"kind": "iso", "grain": "Atomic"},
            columns=("trade_id", "cp_id"),
            depends=("source.p.raw.trades",),
        ),
        manifest_node("cps", resource_type="seed", cdme={"grain": "Reference"}, columns=("cp_id", "name")),
        manifest_node(
            "enriched",
            cdme={
                "kind": "enrich",
                "driving": "stg",
                "lookups": {"cps": {"version": "latest"}},
                "error_sink": "errors",
                "grain": "Atomic",
                "req": "REQ-1",
                "access": ["analyst"],
            },
            columns=("trade_id", "cp_id", "name"),
            depends=("model.p.stg", "seed.p.cps"),
        ),
        manifest_node(
            "errors",
            cdme={"grain": "Atomic", "key": ["source_entity", "source_key"]},
            columns=(
                "failure_type",
                "offending_values",
                "source_entity",
                "source_key",
                "source_epoch",
                "morphism_path",
            ),
            depends=("model.p.stg", "seed.p.cps"),
        ),
        manifest_node(
            "daily",
            cdme={
                "kind": "aggregate",
                "grain": "DailyAggregate",
                "monoids": {"n": {"op": "count", "identity": 0}},
            },
            columns=("day", "n"),
            depends=("model.p.enriched",),
            constraints=[{"type": "primary_key", "columns": ["day"]}],
        ),
        _test("unique_stg_trade_id", "model.p.stg", "unique", "trade_id"),
        _test(
            "ucc_enriched",
            "model.p.enriched",
            "unique_combination_of_columns",
            combination_of_columns=["trade_id", "cp_id"],
        ),
        sources=(trades,),
    )


def test_good_declarations_resolve_to_typed_entities() -> None:
    ldm = load_ldm(_good_project(), CONFIG)

    source = ldm.entity("raw.trades")
    assert source.key is not None and source.key.columns == ("trade_id",) and source.key.source == "declared"
    assert source.epoch_column == "epoch_date" and source.relation == "db.raw.trades"

    stg = ldm.entity("stg")
    assert stg.driving == "raw.trades", "a single upstream is the driving one"
    assert stg.key is not None and (stg.key.columns, stg.key.source, stg.key.verified) == (
        ("trade_id",),
        "unique_test",
        True,
    )

    enriched = ldm.entity("enriched")
    assert enriched.kind == "enrich" and enriched.driving == "stg"
    assert [(lk.entity, lk.version) for lk in enriched.lookups] == [("cps", "latest")]
    assert enriched.key is not None and enriched.key.columns == ("trade_id", "cp_id")
    assert enriched.req == ("REQ-1",) and enriched.access == ("analyst",)
    assert enriched.visible_to({"analyst"}) and not enriched.visible_to({"ops"})
    assert enriched.lineage_mode == "full"

    assert ldm.entity("errors").is_error_sink
    daily = ldm.entity("daily")
    assert daily.key is not None and daily.key.source == "primary_key_constraint"
    assert daily.monoids["n"].identity == 0
    assert ldm.by_unique_id("model.p.daily") == daily


def _problems(manifest: Manifest, config: ProjectConfig = CONFIG) -> list[tuple[str, str, str]]:
    with pytest.raises(LdmDeclarationError) as info:
        load_ldm(manifest, config)
    return [(p.entity, p.field, p.message) for p in info.value.problems]


@pytest.mark.parametrize(
    ("cdme", "field", "message"),
    [
        (
            {"grain": "Hourly"},
            "grain",
            "unknown grain 'Hourly' (declared in cdme.yml: Atomic, DailyAggregate, MonthlyAggregate, Reference)",
        ),
        (
            {"kind": "pivot"},
            "kind",
            "Input should be 'iso', 'filter', 'enrich', 'aggregate', 'explode' or 'union'",
        ),
        (
            {"key": ["trade_id", "trade_nm"]},
            "key",
            "column 'trade_nm' does not exist (known columns: cp_id, trade_id)",
        ),
        ({"grian": "Atomic"}, "grian", "unknown field"),
        ({"driving": "cps"}, "driving", "'cps' is not an upstream of m (upstreams: stg)"),
        (
            {"lookups": {"stg": {"version": "as_of"}}, "kind": "iso"},
            "lookups.stg.as_of",
            "as_of semantics need the driving column to compare (as_of: <column>)",
        ),
        (
            {"lookups": {"cps": {"version": "sometimes"}}},
            "lookups.cps.version",
            "Input should be 'as_of', 'latest', 'exact' or 'var'",
        ),
        ({"access": ["admin"]}, "access", "unknown role 'admin' (declared in cdme.yml: analyst, ops)"),
        ({"req": ["REQ-9"]}, "req", "unknown requirement key 'REQ-9' (declared in cdme.yml: REQ-1)"),
        (
            {"kind": "aggregate"},
            "monoids",
            "an aggregate declares the monoid (op and identity) of each folded column",
        ),
        ({"kind": "filter"}, "filter", "a filter morphism declares its condition (filter: <SQL predicate>)"),
        (
            {"kind": "enrich"},
            "lookups",
            "an enrich morphism joins at least one lookup; declare it with its version semantics",
        ),
        (
            {"monoids": {"amount": {"op": "sum", "identity": 0}}},
            "monoids.amount",
            "column 'amount' does not exist (known columns: cp_id, trade_id)",
        ),
        ({"error_sink": "nowhere"}, "error_sink", "'nowhere' is not a model of the project"),
        (
            {"sensitivity": "secret"},
            "sensitivity",
            "Input should be 'public', 'internal', 'confidential' or 'personal'",
        ),
    ],
)
def test_invalid_declaration_names_entity_and_field(cdme: dict[str, Any], field: str, message: str) -> None:
    manifest = _manifest(
        manifest_node("stg", columns=("trade_id",)),
        manifest_node("cps", resource_type="seed", columns=("cp_id",)),
        manifest_node("m", cdme=cdme, columns=("trade_id", "cp_id"), depends=("model.p.stg",)),
    )
    assert ("m", field, message) in _problems(manifest)


def test_error_sink_without_structured_fields() -> None:
    manifest = _manifest(
        manifest_node("stg", columns=("id",)),
        manifest_node("m", cdme={"error_sink": "sink"}, columns=("id",), depends=("model.p.stg",)),
        manifest_node("sink", columns=("id", "failure_type"), depends=("model.p.stg",)),
    )
    [problem] = _problems(manifest)
    assert problem[:2] == ("sink", "error_sink")
    assert "offending_values, source_entity, source_key, source_epoch, morphism_path" in problem[2]


def test_only_models_are_morphisms() -> None:
    manifest = _manifest(manifest_node("seed_x", resource_type="seed", cdme={"kind": "iso"}, columns=("a",)))
    assert _problems(manifest) == [
        ("seed_x", "kind", "only models are morphisms; a seed cannot declare kind")
    ]


def test_column_semantic_type_must_be_declared() -> None:
    node = manifest_node("m", columns=("amount",))
    node["columns"]["amount"]["meta"] = {"cdme": {"type": "Euros"}}
    assert _problems(_manifest(node)) == [
        (
            "m",
            "columns.amount.type",
            "unknown semantic type 'Euros' (declared in cdme.yml: Date, Money, Notional)",
        )
    ]


def test_every_problem_is_reported_and_the_message_counts_them() -> None:
    manifest = _manifest(
        manifest_node("a", cdme={"grain": "Nope"}, columns=("x",)),
        manifest_node("b", cdme={"kind": "nope", "key": "missing"}, columns=("x",)),
    )
    with pytest.raises(LdmDeclarationError) as info:
        load_ldm(manifest, CONFIG)
    assert len(info.value.problems) == 3
    assert str(info.value).startswith("a: meta.cdme.grain: unknown grain 'Nope'")
    assert str(info.value).endswith("(and 2 more problems)")


def test_key_of_an_undocumented_model_is_kept_but_not_verified() -> None:
    ldm = load_ldm(_manifest(manifest_node("m", cdme={"key": ["id"]})), CONFIG)
    key = ldm.entity("m").key
    assert key is not None and key.columns == ("id",) and not key.verified


def test_unknown_entity_is_an_error() -> None:
    ldm = load_ldm(_good_project(), CONFIG)
    with pytest.raises(LdmError, match="unknown entity 'nope'"):
        ldm.entity("nope")


# -- cdme.yml ---------------------------------------------------------------------------------------------------


def test_reference_project_config_loads() -> None:
    config = load_project_config(PROJECT_DIR / "cdme.yml")
    assert config.grain_chain("MonthlyAggregate") == ["MonthlyAggregate", "DailyAggregate", "Atomic"]
    assert config.is_subtype("Notional", "Money") and not config.is_subtype("Money", "Notional")
    assert not config.is_subtype("Date", "Money")
    assert config.base_type("BusinessDate") == "date"
    assert config.defaults.lineage_mode == "key_derivable"
    assert {"REQ-ACC-01", "REQ-PII-01"} <= set(config.requirements)


def test_budget_overrides_merge_over_the_default() -> None:
    assert CONFIG.budgets.for_model("big").max_output_rows == 10**6
    assert CONFIG.budgets.for_model("big").max_join_depth == 3
    assert CONFIG.budgets.for_model("other").max_output_rows == 1000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"grains": [{"name": "A", "coarsens": "B"}]}, "cdme.yml: grains[0].coarsens: unknown grain 'B'"),
        (
            {"grains": [{"name": "A", "coarsens": "B"}, {"name": "B", "coarsens": "A"}]},
            "cdme.yml: grains: cycle through 'A'",
        ),
        ({"grains": [{"name": "A"}, {"name": "A"}]}, "cdme.yml: grains: declared twice: A"),
        (
            {"grains": [], "types": [{"name": "T", "base": "int", "parent": "U"}]},
            "declare exactly one of base (a SQL type) or parent",
        ),
        (
            {"grains": [], "types": [{"name": "T", "parent": "U"}]},
            "cdme.yml: types[0].parent: unknown type 'U'",
        ),
        (
            {"grains": [], "budgets": {"default": {"max_output_rows": -1}}},
            "cdme.yml: budgets.default.max_output_rows: Input should be greater than 0",
        ),
        (
            {"grains": [], "defaults": {"lineage_mode": "everything"}},
            "cdme.yml: defaults.lineage_mode: Input should be 'full', 'key_derivable' or 'summary'",
        ),
        ({"grains": [], "grain_hierarchy": []}, "cdme.yml: grain_hierarchy: Extra inputs are not permitted"),
        ({"types": []}, "cdme.yml: grains: Field required"),
        ([], "cdme.yml: expected a mapping at the top level"),
    ],
)
def test_invalid_project_config(data: Any, message: str) -> None:
    with pytest.raises(LdmError) as info:
        parse_project_config(data)
    assert message in str(info.value)


def test_project_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LdmError, match=r"cdme\.yml: file not found"):
        load_project_config(tmp_path / "cdme.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("grains:\n  - name: A\n    coarsens: [unclosed\n")
    with pytest.raises(LdmError, match=r"bad\.yml: malformed YAML at line 4"):
        load_project_config(bad)


# -- real projects written by other people ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(RESEARCH_DATA.glob("*-manifest.json.gz")), ids=lambda p: p.name.split("-v12")[0]
)
def test_real_projects_without_declarations_load_with_inferred_keys(path: Path) -> None:
    manifest = load_manifest(path)
    ldm = load_ldm(manifest, CONFIG)
    assert len(ldm.entities) == len(manifest.entities())
    for entity in ldm:
        if entity.key is not None:
            assert entity.key.source in {"unique_test", "primary_key_constraint", "dbt_primary_key"}


def test_jaffle_shop_keys_come_from_its_unique_tests() -> None:
    ldm = load_ldm(
        load_manifest(RESEARCH_DATA / "jaffle-shop-v12-postgres-compiled-manifest.json.gz"), CONFIG
    )
    orders = ldm.entity("orders")
    assert (
        orders.key is not None and orders.key.columns == ("order_id",) and orders.key.source == "unique_test"
    )
    assert set(orders.upstreams) >= {"stg_orders"}


# -- driving upstreams and lookups ----------------------------------------------------------------------------------


def _three_upstreams(cdme: dict[str, Any]) -> Manifest:
    return _manifest(
        manifest_node("trades", columns=("id",)),
        manifest_node("cps", resource_type="seed", columns=("cp_id",)),
        manifest_node("fx", resource_type="seed", columns=("ccy",)),
        manifest_node("m", cdme=cdme, columns=("id",), depends=("model.p.trades", "seed.p.cps", "seed.p.fx")),
    )


def test_driving_is_inferred_as_the_upstream_that_is_not_a_lookup() -> None:
    ldm = load_ldm(
        _three_upstreams(
            {"kind": "enrich", "lookups": {"cps": {"version": "latest"}, "fx": {"version": "exact"}}}
        ),
        CONFIG,
    )
    assert ldm.entity("m").driving == "trades"


def test_several_candidate_drivers_must_be_disambiguated() -> None:
    problems = _problems(_three_upstreams({"kind": "enrich", "lookups": {"cps": {"version": "latest"}}}))
    assert problems == [
        (
            "m",
            "driving",
            "several upstreams could drive m (trades, fx); declare driving: <one of them> and the others as lookups "
            "with their version semantics",
        )
    ]


def test_an_upstream_that_is_neither_driving_nor_a_lookup_is_unversioned() -> None:
    problems = _problems(
        _three_upstreams({"kind": "enrich", "driving": "trades", "lookups": {"cps": {"version": "latest"}}})
    )
    assert problems == [
        (
            "m",
            "lookups.fx",
            "'fx' is an upstream of m but neither its driving upstream nor a declared lookup; declare its version "
            "semantics (as_of, latest, exact or var)",
        )
    ]


def test_a_union_is_driven_by_all_its_upstreams() -> None:
    entity = load_ldm(_three_upstreams({"kind": "union"}), CONFIG).entity("m")
    assert entity.kind == "union" and entity.driving is None


@pytest.mark.parametrize("value", ["grain: Atomic", ["grain", "Atomic"], 42])
def test_meta_cdme_that_is_not_a_mapping_is_an_error(value: Any) -> None:
    node = manifest_node("m", columns=("id",))
    node["config"]["meta"] = {"cdme": value}
    [(entity, field, message)] = _problems(_manifest(node))
    assert (entity, field) == ("m", "cdme")
    assert message.startswith(f"must be a mapping of declarations, found {type(value).__name__}")


def test_column_meta_cdme_that_is_not_a_mapping_is_an_error() -> None:
    node = manifest_node("m", columns=("amount",))
    node["columns"]["amount"]["meta"] = {"cdme": "Money"}
    assert _problems(_manifest(node)) == [
        ("m", "columns.amount.cdme", "must be a mapping of declarations, found str 'Money'")
    ]


def test_lineage_mode_override_replaces_the_project_default_but_not_a_declaration() -> None:
    manifest = _manifest(
        manifest_node("a", columns=("id",)),
        manifest_node("b", cdme={"lineage_mode": "summary"}, columns=("id",)),
    )
    ldm = load_ldm(manifest, CONFIG, lineage_mode="key_derivable")
    assert ldm.entity("a").lineage_mode == "key_derivable"
    assert ldm.entity("b").lineage_mode == "summary"


def test_versioned_models_and_package_nodes_get_distinct_names() -> None:
    v1 = manifest_node("dim", columns=("id",), version=1)
    v1["unique_id"] = "model.p.dim.v1"
    v2 = manifest_node("dim", columns=("id",), version=2)
    v2["unique_id"] = "model.p.dim.v2"
    foreign = manifest_node("dim", columns=("id",), package_name="other_pkg")
    foreign["unique_id"] = "model.other_pkg.dim"
    manifest = parse_manifest(
        {
            "metadata": {
                "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                "project_name": "p",
            },
            "nodes": {n["unique_id"]: n for n in (v1, v2, foreign)},
        }
    )
    assert sorted(load_ldm(manifest, CONFIG).entities) == ["dim.v1", "dim.v2", "other_pkg.dim"]


def test_a_filter_declares_a_condition_a_join_or_both() -> None:
    assert FilterDecl.model_validate({"join": "rf"}).join == "rf"
    assert EntityDecl.model_validate({"filter": "v > 0"}).filter == FilterDecl(condition="v > 0")
    with pytest.raises(
        ValidationError, match="a filter declares its condition, a join it filters by, or both"
    ):
        FilterDecl.model_validate({"reason": "no idea"})
