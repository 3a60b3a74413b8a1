"""Adjoint capture and queries on a real dbt build of the reference trading project (one build per module)."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from services.adjoint.domain import capture as capture_module
from services.adjoint.domain import queries
from services.adjoint.domain.capture import CaptureResult, capture, load_run_ldm, plan_capture
from services.adjoint.domain.errors import NotReconstructableError
from services.core.artifacts import parse_manifest, parse_run_results
from services.core.dbt import first_failure, run_dbt
from services.core.errors import NotFoundError
from services.core.ldm import load_project_config
from services.core.ldm.config import LineageMode
from services.core.migrations import migrate
from services.core.warehouse import create_warehouse_engine
from services.datagen.trading import GenerateReport, GenerateRequest, generate
from tests.conftest import PROJECT_DIR
from tests.integration.test_reference_project import COUNTERPARTIES, CURRENCIES, FIRST_EPOCH, SEED

pytestmark = pytest.mark.integration

TRADES = 3000


@dataclass
class Built:
    url: str
    engine: Engine
    manifest: dict[str, Any]
    run_results: dict[str, Any]
    report: GenerateReport

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()

    def capture(self, mode: LineageMode = "full", run_results: dict[str, Any] | None = None) -> CaptureResult:
        run_id = str(uuid.uuid4())
        return capture_run(self, run_id, mode, run_results)


def capture_run(
    built: Built, run_id: str, mode: LineageMode = "full", run_results: dict[str, Any] | None = None
) -> CaptureResult:
    manifest = parse_manifest(built.manifest)
    results = parse_run_results(run_results or built.run_results)
    ldm = load_run_ldm(manifest, load_project_config(PROJECT_DIR / "cdme.yml"), mode)
    return capture(built.engine, run_id, FIRST_EPOCH, mode, plan_capture(ldm, manifest, results))


def build_project(
    url: str,
    project_dir: Path,
    target: Path,
    prepare: Callable[[str], None] | None = None,
    *,
    epoch: date = FIRST_EPOCH,
    trades: int = TRADES,
) -> tuple[dict[str, Any], dict[str, Any], GenerateReport]:
    """Generate an epoch's trades (the first) and `dbt build` `project_dir` into `url`; the run's artifacts.

    `prepare(url)`, if given, runs between the two (to shape the raw data a test needs).
    """
    report = generate(
        url,
        GenerateRequest(trades=trades, epoch=epoch, seed=SEED, counterparties=COUNTERPARTIES),
        CURRENCIES,
    )
    if prepare is not None:
        prepare(url)
    invocation = run_dbt(
        ["build", "--vars", json.dumps({"epoch_date": str(epoch)})],
        project_dir=project_dir,
        target_path=target,
        warehouse_url=url,
        pepper=secrets.token_hex(16),
    )
    assert invocation.succeeded, first_failure(invocation)
    manifest = json.loads((target / "manifest.json").read_text())
    results = json.loads((target / "run_results.json").read_text())
    return manifest, results, report


def accepted_trades(url: str, epoch: date, book: str, currency: str) -> set[str]:
    """The trades of `epoch` the pipeline accepts into `book`/`currency`, written against the raw tables alone."""
    start = f"(date '{epoch}'::timestamp at time zone 'UTC')"
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"""
            select t.trade_id from raw_trading.trades t
            where t.epoch_date = %(epoch)s and t.status <> 'CANCELLED' and t.notional > 0
              and upper(t.currency) in (select currency_code from raw_reference.currencies)
              and exists (
                  select 1 from raw_trading.counterparties c
                  where c.counterparty_id = t.counterparty_id and c.valid_from <= {start}
                    and t.trade_ts >= c.valid_from
                    and c.version = (select max(v.version) from raw_trading.counterparties v
                                     where v.counterparty_id = c.counterparty_id and v.valid_from <= {start}))
              and t.book = %(book)s and upper(t.currency) = %(currency)s
            """,
            {"epoch": epoch, "book": book, "currency": currency},
        ).fetchall()
    return {r[0] for r in rows}


@pytest.fixture(scope="module")
def built(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    url = new_database()
    manifest, results, report = build_project(url, PROJECT_DIR, tmp_path_factory.mktemp("adjoint-build"))
    engine = create_warehouse_engine(url)
    migrate(engine, "adjoint")
    yield Built(url, engine, manifest, results, report)
    engine.dispose()


@pytest.fixture(scope="module")
def full_run(built: Built) -> str:
    return built.capture("full").run_id


def _by_model(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in report["morphisms"]}


def test_every_morphism_balances_and_every_trade_has_one_fate(built: Built, full_run: str) -> None:
    report = queries.partitions(built.engine, full_run)
    assert report["key_encoding"] == "cdme-key/v1" and report["epoch"] == str(FIRST_EPOCH)
    assert report["not_captured"] == []
    for m in report["morphisms"]:
        assert m["input"] == m["mapped"] + m["filtered"] + m["errored"], m["model"]
        assert m["unaccounted"] == {"count": 0, "samples": []}, m["model"]
        assert m["overlap"]["count"] == 0, m["model"]
    models = _by_model(report)
    anomalies = built.report.anomalies
    assert models["int_trades_active"]["filtered"] == anomalies["cancelled"]
    assert models["int_trades_active"]["filters"][0]["condition"] == "trade_status <> 'CANCELLED'"
    assert models["int_trades_active"]["filters"][0]["line"] == 15
    errors = (
        anomalies["missing_counterparty"] + anomalies["non_positive_notional"] + anomalies["unknown_currency"]
    )
    assert models["int_trades_enriched"]["errored"] == errors
    assert models["int_trades_enriched"]["filtered"] == 0
    assert models["stg_trades"]["input"] == TRADES
    trades = next(s for s in report["sources"] if s["source"] == "raw_trading.trades")
    assert trades["input"] == TRADES
    assert trades["fates"] == {
        "reached_output": TRADES - anomalies["cancelled"] - errors,
        "filtered": anomalies["cancelled"],
        "errored": errors,
        "unaccounted": 0,
    }
    assert models["int_trades_enriched"]["locations"]["mapped"].startswith(
        f"cdme_adjoint.mapped#run={full_run}&"
    )


def test_backward_from_a_monthly_key_equals_a_hand_written_query_over_raw_tables(
    built: Built, full_run: str
) -> None:
    month, book, currency = built.rows(
        "select month_start, book, currency_code from marts.fct_monthly_positions order by trade_count desc limit 1"
    )[0]
    assert month == FIRST_EPOCH.replace(day=1)
    expected = accepted_trades(built.url, FIRST_EPOCH, book, currency)
    assert len(expected) > 1
    key = f"{month}|{book}|{currency}"
    contributions = _every_page(built, key, limit=7)
    assert all(
        c["path"][0] == "fct_monthly_positions" and c["path"][-1] == "raw_trading.trades"
        for c in contributions
    )
    assert {c["key"] for c in contributions} == expected


def _every_page(built: Built, key: str, *, limit: int, depth: int | None = None) -> list[dict[str, Any]]:
    """The contributions of a monthly position's backward to raw trades, followed page by page."""
    contributions: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = queries.backward(
            built.engine,
            "fct_monthly_positions",
            key,
            roles=None,
            to="raw_trading.trades",
            depth=depth,
            limit=limit,
            cursor=cursor,
        )
        contributions += page["contributions"]
        cursor = page["next"]
        if cursor is None:
            return contributions


def test_a_page_read_through_an_identity_tail_equals_the_same_page_of_the_whole_walk(
    built: Built, full_run: str
) -> None:
    # Backward to raw trades reads the first keys of each daily position from the index and copies them down the
    # identity chain (enriched <- active <- stg <- raw); the same page must come out of walking everything.
    (key,) = built.rows(
        "select month_start || '|' || book || '|' || currency_code from marts.fct_monthly_positions "
        "order by trade_count desc limit 1"
    )[0]
    whole = queries.backward(built.engine, "fct_monthly_positions", key, roles=None, limit=queries.MAX_LIMIT)
    assert whole["next"] is None
    expected = [c for c in whole["contributions"] if c["entity"] == "raw_trading.trades"]
    for depth in (None, 5, 4):
        assert _every_page(built, key, limit=4, depth=depth) == ([] if depth == 4 else expected), depth


def test_backward_returns_records_and_respects_depth(built: Built, full_run: str) -> None:
    trade = built.rows("select trade_id from intermediate.int_trades_enriched order by trade_id limit 1")[0][
        0
    ]
    answer = queries.backward(built.engine, "int_trades_enriched", trade, roles=None, records=True)
    assert [(c["entity"], c["depth"]) for c in answer["contributions"]] == [
        ("int_trades_active", 1),
        ("stg_trades", 2),
        ("raw_trading.trades", 3),
    ]
    raw = answer["contributions"][-1]["record"]
    assert raw["trade_id"] == trade and raw["epoch_date"] == str(FIRST_EPOCH)
    one_hop = queries.backward(built.engine, "int_trades_enriched", trade, roles=None, depth=1)
    assert [c["entity"] for c in one_hop["contributions"]] == ["int_trades_active"]
    with pytest.raises(NotFoundError):
        queries.backward(built.engine, "int_trades_enriched", "no-such-trade", roles=None)


def test_impact_of_a_trade_reaches_both_marts(built: Built, full_run: str) -> None:
    trade, book, currency = built.rows(
        "select trade_id, book, currency_code from intermediate.int_trades_enriched order by trade_id limit 1"
    )[0]
    answer = queries.impact(built.engine, "raw_trading.trades", [trade], roles=None)
    affected = {a["model"]: a for a in answer["affected"]}
    assert affected["fct_monthly_positions"]["keys"] == [f"{FIRST_EPOCH.replace(day=1)}|{book}|{currency}"]
    factors = built.rows(
        "select count(*) from intermediate.int_trade_risk_sensitivities where trade_id = %s", (trade,)
    )[0][0]
    assert affected["int_trade_risk_sensitivities"]["count"] == factors


def test_a_principal_cannot_traverse_models_it_may_not_see(built: Built, full_run: str) -> None:
    month, book, currency = built.rows(
        "select month_start, book, currency_code from marts.fct_monthly_positions limit 1"
    )[0]
    key = f"{month}|{book}|{currency}"
    analyst = queries.backward(built.engine, "fct_monthly_positions", key, roles=frozenset({"risk_analyst"}))
    # int_trades_active and the raw trades are for data engineers and auditors only: the walk stops before them.
    assert {c["entity"] for c in analyst["contributions"]} == {"fct_daily_positions", "int_trades_enriched"}
    with pytest.raises(NotFoundError):
        queries.backward(built.engine, "fct_monthly_positions", key, roles=frozenset({"trading_ops"}))
    with pytest.raises(NotFoundError):
        queries.backward(
            built.engine,
            "fct_monthly_positions",
            key,
            roles=frozenset({"risk_analyst"}),
            to="raw_trading.trades",
        )


def test_capture_is_idempotent_and_reconciles(built: Built, caplog: pytest.LogCaptureFixture) -> None:
    run_id = str(uuid.uuid4())
    with caplog.at_level(logging.INFO, logger="cdme.adjoint.capture"):
        first = capture_run(built, run_id)
    # Each morphism's log line carries the requirement keys its model declares.
    logged = {r.model: r.req for r in caplog.records if r.getMessage() == "morphism captured"}  # type: ignore[attr-defined]
    assert logged["int_trades_active"] == ["REQ-FLT-01", "REQ-ACC-01"]
    again = capture_run(built, run_id)
    assert first.pairs == again.pairs > 0
    assert _stored_pairs(built, run_id) == first.pairs
    partitions = built.rows(
        "select count(*) from pg_inherits where inhparent = 'cdme_adjoint.mapped'::regclass "
        "and inhrelid::regclass::text like %s",
        (f"%{uuid.UUID(run_id).hex}%",),
    )[0][0]
    assert partitions == 1
    result = queries.reconcile(built.engine, run_id)
    statuses = {m["model"]: m["status"] for m in result["morphisms"]}
    assert result["status"] == "reconciled"
    assert statuses["stg_trades"] == "exact" and statuses["int_trades_active"] == "superset"


def test_a_full_runs_pair_indexes_are_the_partitions_of_the_parents(built: Built, full_run: str) -> None:
    # Built on the loaders' connections and renamed: ATTACH adopts them only if they match the parent's
    # definitions exactly, and would otherwise build a second pair, unnoticed.
    part = f"mapped_r{uuid.UUID(full_run).hex}"
    assert built.rows(
        "select i.relname, p.relname from pg_index x join pg_class i on i.oid = x.indexrelid "
        "left join pg_inherits h on h.inhrelid = i.oid left join pg_class p on p.oid = h.inhparent "
        "where x.indrelid = %s::regclass order by 1",
        (f"cdme_adjoint.{part}",),
    ) == [(f"{part}_backward", "mapped_backward_idx"), (f"{part}_forward", "mapped_forward_idx")]


def _stray_tables(built: Built, run_id: str) -> list[str]:
    """The tables named after the run's partition of `mapped` that are not attached to `mapped`."""
    return [
        r[0]
        for r in built.rows(
            "select relname from pg_class where relnamespace = 'cdme_adjoint'::regnamespace and relkind = 'r' "
            "and not relispartition and starts_with(relname, %s)",
            (f"mapped_r{uuid.UUID(run_id).hex}_",),
        )
    ]


def _stored_pairs(built: Built, run_id: str) -> int:
    """The run's pairs: its stored rows, and as many for the identities it implies as they map."""
    stored = built.rows("select count(*) from cdme_adjoint.mapped where run_id = %s", (run_id,))[0][0]
    implied = built.rows(
        "select coalesce(sum(pairs), 0) from cdme_adjoint.morphisms where run_id = %s and keys_from is not null",
        (run_id,),
    )[0][0]
    return int(stored + implied)


def test_a_failed_capture_keeps_the_previous_one_and_leaves_no_table_behind(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = str(uuid.uuid4())
    first = capture_run(built, run_id)
    # A table a crashed capture committed and never attached.
    stray = f"mapped_r{uuid.UUID(run_id).hex}_deadbeef_1"
    with psycopg.connect(built.url) as conn:
        conn.execute(f"create table cdme_adjoint.{stray} (source_key text)")
    original = capture_module.Morphism.accounted_pairs_sql

    def failing(self: capture_module.Morphism, *, single_driver: bool) -> str:
        pairs = original(self, single_driver=single_driver)
        if self.model.name == "int_trade_risk_sensitivities":
            # A load still running when another fails: cancelled, not waited for.
            return f"select source_key, target_key from ({pairs}) p, pg_sleep(120)"
        if self.model.name == "fct_daily_positions":
            # Fails in the worker that loads this morphism's pairs, while another loads its own.
            return f"select source_key, target_key from ({pairs}) p where 1 / (length(source_key) * 0) = 0"
        return pairs

    monkeypatch.setattr(capture_module.Morphism, "accounted_pairs_sql", failing)
    begun = time.monotonic()
    with pytest.raises(psycopg.errors.DivisionByZero):
        capture_run(built, run_id)
    assert time.monotonic() - begun < 60
    assert _stray_tables(built, run_id) == [stray]
    assert built.rows("select pairs from cdme_adjoint.runs where run_id = %s", (run_id,)) == [(first.pairs,)]
    assert _stored_pairs(built, run_id) == first.pairs
    assert queries.reconcile(built.engine, run_id)["status"] == "reconciled"
    monkeypatch.undo()
    # The next capture of the run sweeps what the crash left.
    assert capture_run(built, run_id).pairs == first.pairs
    assert _stray_tables(built, run_id) == []


def test_a_partial_run_captures_only_the_models_that_succeeded(built: Built) -> None:
    results = json.loads(json.dumps(built.run_results))
    for r in results["results"]:
        if r["unique_id"] == "model.cdme_trading.fct_monthly_positions":
            r["status"] = "error"
        if r["unique_id"] == "model.cdme_trading.fct_daily_risk_sensitivities":
            r["status"] = "skipped"
    result = built.capture("full", results)
    assert {n.unique_id: n.reason for n in result.not_captured} == {
        "model.cdme_trading.fct_monthly_positions": "dbt status error",
        "model.cdme_trading.fct_daily_risk_sensitivities": "dbt status skipped",
    }
    assert "model.cdme_trading.fct_daily_positions" in result.captured
    report = queries.partitions(built.engine, result.run_id)
    assert "fct_monthly_positions" not in _by_model(report)


def test_summary_mode_keeps_counts_and_samples_pairs(built: Built, full_run: str) -> None:
    summary = built.capture("summary")
    full = _by_model(queries.partitions(built.engine, full_run))
    sampled = _by_model(queries.partitions(built.engine, summary.run_id))
    assert summary.lineage_mode == "summary" and 0 < summary.pairs < sum(m["pairs"] for m in full.values())
    for name, m in full.items():
        assert {k: sampled[name][k] for k in ("input", "mapped", "filtered", "errored")} == {
            k: m[k] for k in ("input", "mapped", "filtered", "errored")
        }
    fates = {s["source"]: s["fates"] for s in queries.partitions(built.engine, full_run)["sources"]}
    assert {
        s["source"]: s["fates"] for s in queries.partitions(built.engine, summary.run_id)["sources"]
    } == fates


def test_key_derivable_answers_like_full_until_the_data_changes(built: Built, full_run: str) -> None:
    derived = built.capture("key_derivable")
    assert derived.pairs == 0
    trade, daily = built.rows(
        "select trade_id, business_date || '|' || book || '|' || currency_code "
        "from intermediate.int_trades_enriched order by trade_id limit 1"
    )[0]

    def keys(run_id: str) -> set[tuple[str, str]]:
        answer = queries.backward(built.engine, "fct_daily_positions", daily, roles=None, run_id=run_id)
        return {(c["entity"], c["key"]) for c in answer["contributions"]}

    assert keys(derived.run_id) == keys(full_run)
    sources = {s["source"]: s["fates"] for s in queries.partitions(built.engine, derived.run_id)["sources"]}
    assert sources == {s["source"]: s["fates"] for s in queries.partitions(built.engine, full_run)["sources"]}
    assert ("raw_trading.trades", trade) in keys(derived.run_id)
    built.rows(
        "update raw_trading.trades set trade_id = trade_id || '-x' where trade_id = %s returning 1", (trade,)
    )
    try:
        with pytest.raises(NotReconstructableError):
            keys(derived.run_id)
        # Full mode stored the pairs, so the same question is still answered.
        assert ("raw_trading.trades", trade) in keys(full_run)
    finally:
        built.rows(
            "update raw_trading.trades set trade_id = %s where trade_id = %s returning 1",
            (trade, f"{trade}-x"),
        )


def test_an_inner_join_replacing_the_error_routed_join_shows_as_unaccounted(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    macro = project / "macros" / "trade_enrichment.sql"
    text = macro.read_text()
    assert "left join {{ ref('snap_counterparties') }}" in text
    macro.write_text(
        text.replace(
            "left join {{ ref('snap_counterparties') }}", "inner join {{ ref('snap_counterparties') }}"
        )
    )
    url = new_database()
    manifest, results, report = build_project(url, project, tmp_path / "target")
    engine = create_warehouse_engine(url)
    try:
        migrate(engine, "adjoint")
        run = Built(url, engine, manifest, results, report).capture("full")
        partitions = queries.partitions(engine, run.run_id)
    finally:
        engine.dispose()
    enriched = _by_model(partitions)["int_trades_enriched"]
    missing = report.anomalies["missing_counterparty"]
    assert missing > 0
    assert enriched["unaccounted"]["count"] == missing
    assert enriched["filtered"] == 0 and len(enriched["unaccounted"]["samples"]) == min(missing, 10)
    assert enriched["input"] == enriched["mapped"] + enriched["errored"] + missing
    trades = next(s for s in partitions["sources"] if s["source"] == "raw_trading.trades")
    assert trades["fates"]["unaccounted"] == missing
    assert set(trades["unaccounted_samples"]) <= set(enriched["unaccounted"]["samples"]) | set(
        trades["unaccounted_samples"]
    )


def test_unknown_runs_are_not_found(built: Built) -> None:
    with pytest.raises(NotFoundError):
        queries.partitions(built.engine, str(uuid.uuid4()))
    assert (
        date.fromisoformat(queries.partitions(built.engine, built.capture().run_id)["epoch"]) == FIRST_EPOCH
    )


def test_an_implied_identity_answers_as_its_stored_pairs_would(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    implied = capture_run(built, str(uuid.uuid4()))
    keys_from = dict(
        built.rows(
            "select model, keys_from from cdme_adjoint.morphisms where run_id = %s and keys_from is not null",
            (implied.run_id,),
        )
    )
    # The staging-to-enriched chain reads its keys from the explode out of its end, which stores its pairs.
    ids = dict(
        built.rows(
            "select model, morphism_id from cdme_adjoint.morphisms where run_id = %s", (implied.run_id,)
        )
    )
    chain = [ids["int_trades_active"], ids["int_trades_enriched"], ids["int_trade_risk_sensitivities"]]
    assert keys_from == {
        "stg_trades": chain,
        "int_trades_active": chain[1:],
        "int_trades_enriched": chain[2:],
    }
    # The exact path stores every pair: the same questions, answered from stored pairs.
    monkeypatch.setattr(capture_module._Capture, "accounted", lambda _self, _plan: False)
    stored = capture_run(built, str(uuid.uuid4()))
    monkeypatch.undo()
    assert built.rows(
        "select count(*) from cdme_adjoint.morphisms where run_id = %s and keys_from is not null",
        (stored.run_id,),
    ) == [(0,)]
    # Trades filtered at the active model, errored at the enriched one, mapped all the way, and one never loaded.
    filtered = built.rows(
        "select source_key from cdme_adjoint.filtered where run_id = %s and morphism_id = %s order by 1 limit 3",
        (implied.run_id, ids["int_trades_active"]),
    )
    errored = built.rows(
        "select source_key from cdme_adjoint.errored where run_id = %s and morphism_id = %s order by 1 limit 3",
        (implied.run_id, ids["int_trades_enriched"]),
    )
    mapped = built.rows(
        "select source_key from cdme_adjoint.mapped where run_id = %s and morphism_id = %s order by 1 limit 3",
        (implied.run_id, ids["int_trade_risk_sensitivities"]),
    )
    assert len(filtered) == len(errored) == len(mapped) == 3
    trades = [r[0] for r in [*filtered, *errored, *mapped]] + ["no-such-trade"]
    for entity in ("raw_trading.trades", "stg_trades", "int_trades_active"):
        answers = [
            queries.impact(built.engine, entity, trades, roles=None, run_id=run.run_id)
            for run in (implied, stored)
        ]
        assert answers[0]["affected"] == answers[1]["affected"]
        reached = {a["model"]: a for a in answers[0]["affected"] if len(a["path"]) == 2}
        assert reached, entity
    from_active = {a["model"]: set(a["keys"]) for a in answers[0]["affected"]}
    assert from_active["int_trades_enriched"] == {r[0] for r in mapped}
    for run in (implied, stored):
        # A key is in the run at a model an implied identity produces exactly when it is one of the model's keys.
        for model in ("stg_trades", "int_trades_active", "int_trades_enriched"):
            with pytest.raises(NotFoundError):
                queries.backward(built.engine, model, "no-such-trade", roles=None, run_id=run.run_id)
        assert queries.backward(
            built.engine, "int_trades_enriched", mapped[0][0], roles=None, run_id=run.run_id
        )["contributions"]
        with pytest.raises(NotFoundError):
            queries.backward(
                built.engine, "int_trades_enriched", filtered[0][0], roles=None, run_id=run.run_id
            )
        assert queries.backward(
            built.engine, "int_trades_active", errored[0][0], roles=None, run_id=run.run_id
        )["contributions"]
