"""Validation on real projects other people wrote: no false errors, and every planted mistake caught."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from services.core.artifacts import Manifest, ManifestNode, load_manifest, parse_manifest
from services.validation.domain import Report, validate_project
from services.validation.domain.analysis import sqlglot_dialect
from services.validation.domain.volatility import nondeterministic_functions, shipped_volatility
from tests.conftest import RESEARCH_DATA

CORPORA = sorted(RESEARCH_DATA.glob("*-manifest.json.gz"))
# Models per corpus that a mutation is planted in (every fully resolved one would take longer for no more signal).
MUTANTS_PER_CORPUS = 12


def _name(path: Path) -> str:
    return path.name.split("-v12")[0]


@pytest.fixture(scope="module")
def corpora() -> dict[str, tuple[Manifest, Report]]:
    return {_name(p): (m := load_manifest(p), validate_project(m)) for p in CORPORA}


@pytest.mark.parametrize("corpus", [_name(p) for p in CORPORA])
def test_real_projects_have_no_error_findings(
    corpora: dict[str, tuple[Manifest, Report]], corpus: str
) -> None:
    _, report = corpora[corpus]
    assert report.errors == [], [f.message for f in report.errors]
    assert report.coverage.models > 0
    assert report.coverage.column_share > 0.5, report.coverage
    # What is left are warnings a reviewer should see: clocks in time spines, unordered string_agg and the like.
    assert {f.rule for f in report.warnings} <= {"determinism", "morphism.fold"}


def test_warnings_on_real_projects_are_the_clock_reads_they_contain(
    corpora: dict[str, tuple[Manifest, Report]],
) -> None:
    warned = {(corpus, f.model) for corpus, (_, r) in corpora.items() for f in r.warnings}
    assert ("jaffle-shop", "metricflow_time_spine") in warned
    assert ("dbt-synthea", "cdm_source") in warned


def _with_sql(manifest: Manifest, node: ManifestNode, sql: str) -> Manifest:
    nodes = dict(manifest.nodes)
    nodes[node.unique_id] = node.model_copy(update={"compiled_code": sql})
    return manifest.model_copy(update={"nodes": nodes})


def _root_select(tree: exp.Expr) -> exp.Select | None:
    while isinstance(tree, exp.SetOperation):
        tree = tree.left
    return tree if isinstance(tree, exp.Select) else None


def _mutable_models(
    manifest: Manifest, report: Report, limit: int = MUTANTS_PER_CORPUS
) -> list[tuple[ManifestNode, exp.Select, Any]]:
    chosen = []
    for node in manifest.models():
        if node.name in report.coverage.unresolved_models or not node.compiled_code:
            continue
        dialect = sqlglot_dialect(manifest.metadata.adapter_type)
        tree = sqlglot.parse_one(node.compiled_code, dialect=dialect)
        root = _root_select(tree)
        source = root.args.get("from_") if root is not None else None
        if root is None or source is None or not isinstance(source.this, exp.Table):
            continue
        chosen.append((node, root, tree))
        if len(chosen) == limit:
            break
    return chosen


@pytest.mark.parametrize("corpus", [_name(p) for p in CORPORA])
def test_a_hallucinated_column_is_caught_in_every_resolved_model(
    corpora: dict[str, tuple[Manifest, Report]], corpus: str
) -> None:
    manifest, report = corpora[corpus]
    mutants = _mutable_models(manifest, report)
    assert mutants
    for node, root, tree in mutants:
        source = root.args["from_"].this
        root.select(exp.column("hallucinated_amount", table=source.alias_or_name), copy=False)
        mutated = validate_project(_with_sql(manifest, node, tree.sql(dialect="postgres")))
        caught = [
            f for f in mutated.errors if f.rule == "existence.column" and "hallucinated_amount" in f.message
        ]
        assert caught, (node.name, [f.message for f in mutated.findings])
        assert caught[0].code == "CDME-V002" and caught[0].model == node.name


@pytest.mark.parametrize("corpus", [_name(p) for p in CORPORA])
def test_a_misspelled_relation_is_caught_with_a_suggestion(
    corpora: dict[str, tuple[Manifest, Report]], corpus: str
) -> None:
    manifest, report = corpora[corpus]
    for node, root, tree in _mutable_models(manifest, report):
        table = root.args["from_"].this
        if not table.db:
            continue  # reads a CTE: no relation to misspell
        original = table.name
        table.set("this", exp.to_identifier(original + "s_v2"))
        mutated = validate_project(_with_sql(manifest, node, tree.sql(dialect="postgres")))
        caught = [f for f in mutated.errors if f.rule == "existence.relation"]
        assert caught, node.name
        assert f"did you mean `{original.lower()}`?" in caught[0].message


@pytest.mark.parametrize("corpus", [_name(p) for p in CORPORA])
def test_random_is_reported_in_every_model(corpora: dict[str, tuple[Manifest, Report]], corpus: str) -> None:
    manifest, report = corpora[corpus]
    for node, root, tree in _mutable_models(manifest, report):
        root.select(exp.func("random").as_("noise"), copy=False)
        mutated = validate_project(_with_sql(manifest, node, tree.sql(dialect="postgres")))
        found = [
            f
            for f in mutated.findings
            if f.rule == "determinism" and f.model == node.name and "`random`" in f.message
        ]
        # Without CDME declarations the model has not opted in: advice (warning), not a rejection.
        assert found and found[0].severity == "warning", node.name


# -- the analysis itself ------------------------------------------------------------------------------------------


def _project(*models: tuple[str, str], sources: dict[str, list[str]] | None = None) -> Manifest:
    nodes = {}
    for name, sql in models:
        nodes[f"model.p.{name}"] = {
            "unique_id": f"model.p.{name}",
            "resource_type": "model",
            "name": name,
            "package_name": "p",
            "database": "db",
            "schema": "s",
            "alias": name,
            "relation_name": f'"db"."s"."{name}"',
            "raw_code": sql,
            "compiled_code": sql,
            "depends_on": {"nodes": [f"model.p.{n}" for n, _ in models if f'"s"."{n}"' in sql]},
        }
    srcs = {
        f"source.p.raw.{t}": {
            "unique_id": f"source.p.raw.{t}",
            "name": t,
            "source_name": "raw",
            "package_name": "p",
            "database": "db",
            "schema": "raw",
            "identifier": t,
            "relation_name": f'"db"."raw"."{t}"',
            "columns": {c: {"name": c} for c in cols},
        }
        for t, cols in (sources or {}).items()
    }
    return parse_manifest(
        {
            "metadata": {
                "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                "adapter_type": "postgres",
                "project_name": "p",
            },
            "nodes": nodes,
            "sources": srcs,
        }
    )


def test_a_column_missing_from_an_inferred_upstream_is_named_with_a_suggestion() -> None:
    manifest = _project(
        ("stg_counterparties", "select 1 as counterparty_id, 'x' as counterparty_name"),
        ("m", 'select c.counterparty_nm\nfrom "db"."s"."stg_counterparties" as c'),
    )
    [finding] = validate_project(manifest).errors
    assert finding.message == (
        "column `counterparty_nm` does not exist in `stg_counterparties`; did you mean `counterparty_name`?"
    )
    assert (finding.model, finding.line, finding.column) == ("m", 1, 8)
    assert finding.verdict == "VIOLATION" and finding.severity == "error" and finding.req == "REQ-VAL-EXIST"


def test_documented_source_columns_prove_presence_but_never_absence() -> None:
    manifest = _project(
        ("m", 'select t.id, t.undocumented from "db"."raw"."trades" as t'),
        sources={"trades": ["id"]},
    )
    report = validate_project(manifest)
    assert report.errors == []
    assert report.coverage.column_references == 2 and report.coverage.column_references_resolved == 1
    assert report.coverage.unresolved_models == ["m"]


def test_select_star_from_an_undocumented_source_is_unverifiable_downstream() -> None:
    manifest = _project(
        ("stg", 'select * from "db"."raw"."events"'),
        ("m", 'select s.anything from "db"."s"."stg" as s'),
        sources={"events": []},
    )
    report = validate_project(manifest)
    assert report.errors == []
    assert set(report.coverage.unresolved_models) == {"stg", "m"}


def test_every_finding_is_reported_not_only_the_first() -> None:
    manifest = _project(
        ("a", "select 1 as id, 2 as amount"),
        ("b", 'select x.idd, x.amont, x.id from "db"."s"."a" as x'),
    )
    messages = sorted(f.message for f in validate_project(manifest).errors)
    assert messages == [
        "column `amont` does not exist in `a`; did you mean `amount`?",
        "column `idd` does not exist in `a`; did you mean `id`?",
    ]


def test_ctes_aliases_and_order_by_output_names_resolve() -> None:
    manifest = _project(
        ("a", "select 1 as id, 2 as amount"),
        (
            "b",
            'with t as (select id, amount * 2 as doubled from "db"."s"."a") '
            "select t.id, sum(t.doubled) as total from t group by t.id order by total",
        ),
        ("c", 'with t as (select id from "db"."s"."a") select t.amount from t'),
    )
    [finding] = validate_project(manifest).errors
    assert (finding.model, finding.message) == ("c", "column `amount` does not exist in `t`")


def test_a_table_outside_the_projects_schemas_is_external_not_hallucinated() -> None:
    manifest = _project(("m", "select c.relname from pg_catalog.pg_class as c"))
    assert validate_project(manifest).errors == []


def test_unparseable_sql_is_unverifiable_not_an_error() -> None:
    manifest = _project(("m", "select from where ((("))
    [finding] = validate_project(manifest).findings
    assert (finding.rule, finding.verdict, finding.severity) == ("parse", "UNVERIFIABLE", "info")


def test_union_relations_placeholders_do_not_produce_false_errors() -> None:
    manifest = _project(
        ("a", "select 1 as id, 2 as only_in_a"),
        ("b", "select 1 as id, 2 as x, 3 as only_in_b"),
        (
            "u",
            'with unioned as ((select * from "db"."s"."a") union all (select * from "db"."s"."b")) '
            "select unioned.only_in_b from unioned",
        ),
    )
    report = validate_project(manifest)
    assert report.errors == []
    assert "u" in report.coverage.unresolved_models


def test_the_shipped_volatility_list_is_postgres_own() -> None:
    data = shipped_volatility()
    assert data["postgres_version"].startswith("18.")
    names = nondeterministic_functions()
    assert {"random", "clock_timestamp", "gen_random_uuid", "nextval", "now", "current_date"} <= names
    assert not {"md5", "sum", "coalesce", "upper"} & names


def _typed_columns(manifest: Manifest, uid: str) -> dict[str, str]:
    node = manifest.nodes.get(uid) or manifest.sources.get(uid)
    return {c.name.lower(): c.data_type.lower() for c in node.columns.values() if c.data_type} if node else {}


def test_a_numeric_to_text_comparison_is_caught_wherever_types_are_documented(
    corpora: dict[str, tuple[Manifest, Report]],
) -> None:
    exercised = 0
    for manifest, report in corpora.values():
        by_relation = {
            (n.relation_name or "").replace('"', "").lower(): n.unique_id for n in manifest.entities()
        }
        for node, root, tree in _mutable_models(manifest, report, limit=len(manifest.nodes)):
            table = root.args["from_"].this
            uid = by_relation.get(".".join(p for p in (table.catalog, table.db, table.name) if p).lower())
            typed = _typed_columns(manifest, uid) if uid else {}
            numeric = next(
                (c for c, t in typed.items() if t.startswith(("int", "bigint", "numeric", "decimal"))), None
            )
            text = next((c for c, t in typed.items() if t.startswith(("text", "varchar", "character"))), None)
            if numeric is None or text is None:
                continue  # no catalog and no documented types: the comparison cannot be typed statically
            alias = table.alias_or_name
            root.where(
                exp.EQ(this=exp.column(numeric, table=alias), expression=exp.column(text, table=alias)),
                copy=False,
            )
            mutated = validate_project(_with_sql(manifest, node, tree.sql(dialect="postgres")))
            caught = [f for f in mutated.errors if f.rule == "types" and f.model == node.name]
            assert caught, (node.name, numeric, text)
            exercised += 1
    # dbt-synthea documents its columns' types; the other corpora document none and have no catalog.
    assert exercised >= 5


def test_an_unqualified_misspelled_column_in_the_select_list_is_caught() -> None:
    manifest = _project(
        ("customers", "select 1 as customer_id, 'x' as customer_name"),
        ("m", 'select customer_nme from "db"."s"."customers"'),
        ("n", 'select customer_name as label from "db"."s"."customers" order by label'),
    )
    [finding] = validate_project(manifest).errors
    assert (finding.model, finding.message) == (
        "m",
        "column `customer_nme` does not exist in `customers`; did you mean `customer_name`?",
    )


def test_a_governed_sources_documented_columns_are_complete() -> None:
    manifest = _project(
        ("m", 'select t.id, t.undocumented from "db"."raw"."trades" as t'), sources={"trades": ["id"]}
    )
    source = manifest.sources["source.p.raw.trades"]
    governed = manifest.model_copy(
        update={
            "sources": {source.unique_id: source.model_copy(update={"meta": {"cdme": {"grain": "Atomic"}}})}
        }
    )
    [finding] = validate_project(governed).errors
    assert finding.message == "column `undocumented` does not exist in `raw.trades`"
    assert validate_project(manifest).errors == [], "ungoverned: YAML may list a subset"
