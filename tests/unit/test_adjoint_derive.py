"""The capture SQL derivation and the `cdme-key/v1` encoding, without a database."""

from __future__ import annotations

from typing import Any

import pytest
import sqlglot
from hypothesis import given
from hypothesis import strategies as st
from sqlglot import exp

from services.adjoint.domain.capture import volatile_views
from services.adjoint.domain.derive import Relation, derive
from services.adjoint.domain.errors import DerivationError
from services.adjoint.domain.keys import decode_key, encode_key, key_sql_text
from services.core.artifacts import parse_manifest
from tests.manifest_nodes import manifest_node

SRC = Relation("db", "s", "src")
OUT = Relation("db", "m", "out")


def _inner(sql: str) -> exp.Select:
    """The rewritten model query inside the capture SQL's `(...) AS q`."""
    tree = sqlglot.parse_one(sql, dialect="postgres")
    subquery = tree.find(exp.Subquery)
    assert subquery is not None and isinstance(subquery.this, exp.Select)
    return subquery.this


@given(st.lists(st.one_of(st.none(), st.text()), min_size=1, max_size=5))
def test_keys_round_trip(components: list[str | None]) -> None:
    assert decode_key(encode_key(components)) == components


def test_key_encoding_is_documented_text() -> None:
    assert encode_key(["2026-11-20", "FX|SPOT", "100%"]) == "2026-11-20|FX%7CSPOT|100%25"
    assert encode_key(["T1"]) == "T1"
    assert encode_key([None, ""]) == "%N|"
    assert "coalesce" in key_sql_text(["a", "b"], "r").lower()


def test_a_filter_projects_both_keys_and_records_its_condition_and_line() -> None:
    sql = 'select\n    id,\n    v\nfrom "db"."s"."src"\nwhere v > 0\n    and kind <> \'X\''
    d = derive(sql, "m", SRC, ["id"], ["id"])
    assert [(f.condition, f.line, f.clause) for f in d.filters] == [
        ("v > 0", 5, "where"),
        ("kind <> 'X'", 6, "where"),
    ]
    assert d.inferred_kind == "filter" and not d.output_checked
    inner = _inner(d.mapped_sql)
    assert [p.alias for p in inner.expressions] == ["__cdme_t0", "__cdme_s0"]
    assert inner.args.get("where") is not None
    # The prefilter keeps every row and turns each predicate into a flag.
    pre = _inner(d.prefilter_sql)
    assert pre.args.get("where") is None
    assert [p.alias for p in pre.expressions][-2:] == ["__cdme_f0", "__cdme_f1"]


def test_keys_are_carried_through_ctes_and_derived_tables() -> None:
    sql = """
        with a as (select t.id, t.g from s.src as t where t.ok),
             b as (select x.id, x.g, l.name from a as x left join s.lk as l on l.g = x.g)
        select y.id, y.name from (select * from b) as y where y.name is not null
    """
    d = derive(sql, "m", SRC, ["id"], ["id"])
    assert d.inferred_kind == "filter"
    assert [f.condition for f in d.filters] == ["t.ok", "y.name IS NOT NULL"]
    assert '"t"."id" AS __cdme_s0' in d.mapped_sql
    assert "x.__cdme_s0 AS __cdme_s0" in d.mapped_sql and "y.__cdme_s0 AS __cdme_s0" in d.mapped_sql


def test_an_aggregate_drops_the_fold_at_the_root_and_keeps_rows_below() -> None:
    sql = """
        with daily as (select d, g, sum(v) as total from s.src group by d, g)
        select date_trunc('month', d) as month, g, sum(total) as total from daily
        group by date_trunc('month', d), g having sum(total) > 0
    """
    d = derive(sql, "m", SRC, ["d", "g"], ["month", "g"], OUT)
    assert d.inferred_kind == "aggregate" and d.output_checked
    assert "SUM(v) OVER (PARTITION BY d, g)" in d.mapped_sql
    inner = _inner(d.mapped_sql)
    assert inner.args.get("group") is None and inner.args.get("having") is None
    assert [(f.condition, f.clause) for f in d.filters] == [("SUM(total) > 0", "having")]
    assert '"m"."out"' in d.mapped_sql and '"m"."out"' in d.prefilter_sql


def test_positional_group_by_partitions_by_the_projection() -> None:
    sql = "with c as (select upper(code) as k, count(*) as n from s.src group by 1) select k, n from c"
    d = derive(sql, "m", SRC, ["code"], ["k"])
    assert "COUNT(*) OVER (PARTITION BY UPPER(code))" in d.mapped_sql


def test_union_keeps_only_the_driving_branch() -> None:
    sql = "select id from s.other union all select id from s.src where id > 1"
    d = derive(sql, "m", SRC, ["id"], ["id"])
    assert d.inferred_kind == "union"
    assert "other" not in d.mapped_sql and "UNION" not in d.mapped_sql.upper()


def test_a_union_of_two_partitions_of_the_driving_upstream_keeps_both_and_merges_as_the_model_did() -> None:
    sql = """
        with legs as (
            select g, amount from s.src where side = 'BUY'
            union
            select g, amount from s.src as b where b.side = 'SELL'
        )
        select g, count(*) as n, sum(amount) as total from legs group by g
    """
    d = derive(sql, "m", SRC, ["id"], ["g"], OUT)
    # Both branches' rows reach the output: a SELL trade is mapped, never "filtered" by the BUY branch.
    assert [f.condition for f in d.filters] == ["side = 'BUY'", "b.side = 'SELL'"]
    assert '"src"."id" AS __cdme_s0' in d.mapped_sql and '"b"."id" AS __cdme_s0' in d.mapped_sql
    # The carried key makes every row distinct, so the UNION's merging is redone over the model's columns:
    # one row per (g, amount), the least key's; the merged keys are mapped nowhere.
    assert "UNION ALL" in d.mapped_sql
    assert "DISTINCT ON (g, amount) * FROM (" in d.mapped_sql
    assert "ORDER BY g, amount, __cdme_s0" in d.mapped_sql
    assert d.deduplicates and d.passthrough == (None,)
    # Each branch flags its own condition and passes the other's, so flags line up across the UNION.
    pre = d.prefilter_sql
    assert "COALESCE((side = 'BUY'), FALSE) AS __cdme_f0, TRUE AS __cdme_f1" in pre
    assert "TRUE AS __cdme_f0, COALESCE((b.side = 'SELL'), FALSE) AS __cdme_f1" in pre
    assert "DISTINCT ON" not in pre
    # A key is filtered only when every row of it fails (the other branch always fails its own condition).
    assert "CASE WHEN BOOL_AND(NOT condition IS NULL) THEN MIN(condition) END" in pre


def test_a_union_with_another_upstream_merges_the_driving_branch_rows() -> None:
    sql = "with u as (select g from s.src union select g from s.other) select g from u"
    d = derive(sql, "m", SRC, ["id"], ["g"])
    assert "other" not in d.mapped_sql and "DISTINCT ON (g) * FROM (SELECT g" in d.mapped_sql


def test_limit_and_distinct_are_checked_against_the_built_relation() -> None:
    d = derive("select distinct id from s.src limit 5", "m", SRC, ["id"], ["id"], OUT)
    assert d.output_checked and "LIMIT" not in d.mapped_sql.upper()
    with pytest.raises(DerivationError, match="built relation"):
        derive("select id from s.src limit 5", "m", SRC, ["id"], ["id"])


def test_an_explode_join_keeps_the_join() -> None:
    sql = "select s.id, x.n from s.src as s cross join lateral unnest(s.arr) as x(n)"
    d = derive(sql, "m", SRC, ["id"], ["id", "n"])
    assert d.inferred_kind == "explode" and "UNNEST" in d.mapped_sql.upper()


@pytest.mark.parametrize(
    ("sql", "target", "message"),
    [
        ("select id from s.other", "id", "does not read s.src"),
        ("select id from s.other where id in (select id from s.src)", "id", "not a FROM or JOIN source"),
        (
            "with c as (select id from s.src) select a.id from c as a join c as b on a.id = b.id",
            "id",
            "read 2 times",
        ),
        ("select sum(v) as total from s.src", "total", "is an aggregate"),
        ("select v from s.src", "w", "not among the model's select list"),
        ("select from where", "id", "cannot parse"),
        (
            "with c as (select id, v from s.src where v > 0 union "
            "select id, v from s.src group by id, v having count(*) > 1) select id, v from c",
            "id",
            "HAVING clause in one branch of a UNION",
        ),
        (
            "with g as (select distinct acct, sum(v) as total from s.src group by acct) select acct, total from g",
            "acct",
            "DISTINCT over the result of a GROUP BY",
        ),
        (
            "with u as (select acct, sum(v) as total from s.src group by acct union select acct, 0 from s.other) "
            "select acct, total from u",
            "acct",
            "UNION over the result of a GROUP BY",
        ),
        ("with d as (select distinct * from s.src) select g, sum(v) as t from d group by g", "g", "star"),
        (
            "with g as (select acct, count(distinct t) as n from s.src group by acct) select acct, n from g",
            "acct",
            "has no window form",
        ),
    ],
)
def test_what_the_rewrite_cannot_follow_is_an_error_naming_the_model(
    sql: str, target: str, message: str
) -> None:
    with pytest.raises(DerivationError, match=message) as raised:
        derive(sql, "my_model", SRC, ["id"], [target], OUT)
    assert str(raised.value).startswith("my_model: ")


def test_a_star_projection_takes_the_key_by_name() -> None:
    d = derive("select * from s.src where ok", "m", SRC, ["id"], ["id"])
    assert '"id" AS __cdme_t0' in d.mapped_sql


def test_only_a_non_deterministic_call_on_the_row_path_makes_the_derivation_so() -> None:
    # A load timestamp on a non-key column leaves the pairs reproducible; a clock in the filter does not.
    stamped = derive('select id, now() as loaded_at from "db"."s"."src"', "m", SRC, ["id"], ["id"])
    assert stamped.nondeterministic == ()
    recent = derive(
        'select id from "db"."s"."src" where ts > now() - interval \'1 day\' and random() < 2',
        "m",
        SRC,
        ["id"],
        ["id"],
    )
    # sqlglot reads `now()` as CURRENT_TIMESTAMP, the PostgreSQL name the volatility list also holds.
    assert set(recent.nondeterministic) == {"current_timestamp", "random"}


def test_a_model_reading_a_non_deterministic_view_through_other_views_is_flagged() -> None:
    def node(name: str, materialized: str, sql: str, *depends: str) -> dict[str, Any]:
        return manifest_node(
            name, materialized=materialized, depends=tuple(f"model.p.{d}" for d in depends), compiled_code=sql
        )

    manifest = parse_manifest(
        {
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json"},
            "nodes": {
                n["unique_id"]: n
                for n in (
                    node("aged", "view", "select id, now() - ts as age from s.src"),
                    node("recent", "view", "select id from s.aged where age < interval '1 day'", "aged"),
                    node("kept", "table", "select id from s.recent", "recent"),
                    node("copied", "table", "select id from s.kept", "kept"),
                )
            },
        }
    )
    # A table's rows were fixed by its build: reading it is reproducible, whatever built it.
    assert volatile_views(manifest) == {"model.p.recent": ("aged",), "model.p.kept": ("aged",)}
