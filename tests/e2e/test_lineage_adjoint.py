"""Adjoint and lineage services as real uvicorn processes on real builds of the reference project.

Clean data gives BALANCED and COMPLETE; a silent inner-join drop (the currency lookup made an inner join in a
copy of the project) and a de-duplicating UNION (daily positions folded from a UNION, not UNION ALL, of the buy
and sell legs) give UNBALANCED and FAILED at the right model with the lost keys, and a FAIL event.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.core.ldm.config import LineageMode
from services.lineage.domain.spec import EventValidator
from tests.conftest import PROJECT_DIR
from tests.e2e.test_lineage_service import AppService, lineage_service
from tests.integration.test_adjoint_reference import build_project
from tests.integration.test_reference_project import FIRST_EPOCH
from tests.service_process import AUTH

pytestmark = pytest.mark.integration


@dataclass
class Pipeline:
    url: str
    adjoint: AppService
    lineage: AppService
    manifest: dict[str, Any]
    run_results: dict[str, Any]

    def run(self, lineage_mode: LineageMode = "full") -> tuple[str, dict[str, Any]]:
        """Capture then finalize one run of the build, as the planner would; the finalize answer."""
        run_id = str(uuid.uuid4())
        directory = self.lineage.home / "runs" / run_id
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text(json.dumps(self.manifest))
        (directory / "run_results.json").write_text(json.dumps(self.run_results))
        body = {
            "epoch": str(FIRST_EPOCH),
            "lineage_mode": lineage_mode,
            "manifest": self.manifest,
            "run_results": self.run_results,
        }
        with self.adjoint.client(AUTH) as adjoint:
            captured = adjoint.post(f"/runs/{run_id}/capture", json=body, timeout=300)
            assert captured.status_code == 200, captured.text
        finalize: dict[str, Any] = {
            "epoch": str(FIRST_EPOCH),
            "artifact_dir": str(directory),
            "dbt": {"status": "success"},
            "validation_report_id": None,
            "trace": [],
            "project": "cdme_trading",
            "target": "dev",
        }
        with self.lineage.client(AUTH) as lineage:
            response = lineage.post(f"/runs/{run_id}/finalize", json=finalize, timeout=300)
            assert response.status_code == 200, response.text
        return run_id, response.json()

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query).fetchall()


def _pipeline(
    url: str, project_dir: Path, home: Path, prepare: Callable[[str], None] | None = None
) -> Iterator[Pipeline]:
    manifest, results, _report = build_project(url, project_dir, home / "target", prepare)
    adjoint = AppService(url, home / "adjoint", "services.adjoint.app:app")
    (home / "adjoint").mkdir()
    (home / "lineage").mkdir()
    adjoint.start()
    lineage = lineage_service(url, home / "lineage", adjoint.base_url, "http://127.0.0.1:1")
    try:
        lineage.start()
        yield Pipeline(url, adjoint, lineage, manifest, results)
    finally:
        lineage.stop()
        adjoint.stop()


def _copy_project(home: Path) -> Path:
    project = home / "dbt_project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    return project


@pytest.fixture(scope="module")
def clean(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    yield from _pipeline(new_database(), PROJECT_DIR, tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def inner_join(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("inner-join")
    project = _copy_project(home)
    macro = project / "macros" / "trade_enrichment.sql"
    text = macro.read_text()
    assert "left join {{ ref('currencies') }}" in text
    macro.write_text(text.replace("left join {{ ref('currencies') }}", "join {{ ref('currencies') }}"))
    yield from _pipeline(new_database(), project, home)


# The daily fold reads a UNION of the buy and sell legs: UNION where UNION ALL was meant, so two trades of a book
# with the same currency, side and notional on the day count once. dbt builds it and its tests pass.
LEGS = """with legs as (
    select business_date, book, currency_code, notional, notional_usd, signed_notional_usd
    from {{ ref('int_trades_enriched') }}
    where side = 'BUY'
    union
    select business_date, book, currency_code, notional, notional_usd, signed_notional_usd
    from {{ ref('int_trades_enriched') }}
    where side = 'SELL'
)

"""


def _allocate_child_trades(url: str) -> None:
    """Book a few orders as two child trades with the same economics (same book, side, notional, time)."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "insert into raw_trading.trades select trade_id || '-2', epoch_date, trade_ts, book, counterparty_id, "
            "instrument_type, side, notional, currency, status, source_system from raw_trading.trades "
            "where epoch_date = %s and status <> 'CANCELLED' order by trade_id limit 8",
            (FIRST_EPOCH,),
        )


@pytest.fixture(scope="module")
def union_merge(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    home = tmp_path_factory.mktemp("union-merge")
    project = _copy_project(home)
    model = project / "models" / "marts" / "fct_daily_positions.sql"
    text = model.read_text()
    fold, source = text.index("select\n    business_date,"), "from {{ ref('int_trades_enriched') }}\ngroup by"
    assert source in text
    model.write_text(text[:fold] + LEGS + text[fold:].replace(source, "from legs\ngroup by"))
    yield from _pipeline(new_database(), project, home, _allocate_child_trades)


def _events(pipeline: Pipeline, run_id: str) -> list[dict[str, Any]]:
    with pipeline.lineage.client(AUTH) as lineage:
        return [e["event"] for e in lineage.get(f"/runs/{run_id}/events").json()["events"]]


def test_clean_data_is_balanced_and_complete(clean: Pipeline) -> None:
    run_id, result = clean.run()
    assert (result["status"], result["reason"]) == ("COMPLETE", None)
    assert result["ledger"]["status"] == "BALANCED"
    (raw,) = clean.rows(f"select count(*) from raw_trading.trades where epoch_date = '{FIRST_EPOCH}'")[0]
    assert result["ledger"]["unaccounted"] == 0
    ledger = json.loads(Path(result["ledger"]["path"]).read_text())
    trades = next(s for s in ledger["sources"] if s["unique_id"] == "source.cdme_trading.raw_trading.trades")
    assert trades["input"] == raw and trades["balanced"]
    assert {m["model"] for m in ledger["morphisms"]} >= {"int_trades_active", "int_trades_enriched"}
    assert all(
        m["partitions"]["mapped"]["location"].startswith("cdme_adjoint.mapped#run=")
        for m in ledger["morphisms"]
    )
    events = _events(clean, run_id)
    assert events[-1]["eventType"] == "COMPLETE"
    enriched = next(
        e
        for e in events
        if e["job"]["name"] == "model.cdme_trading.int_trades_enriched" and e["eventType"] == "COMPLETE"
    )
    assert enriched["run"]["facets"]["cdme_accounting"]["balanced"] is True
    assert enriched["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] > 0
    with clean.lineage.client(AUTH) as lineage:
        metrics = lineage.get("/metrics").text
    assert 'cdme_lineage_morphism_rows{model="int_trades_enriched"' in metrics


def test_a_silent_inner_join_drop_is_unbalanced_and_failed_with_the_keys(inner_join: Pipeline) -> None:
    dropped = {
        r[0]
        for r in inner_join.rows(
            "select trade_id from intermediate.int_trades_active where currency_code not in "
            "(select currency_code from raw_reference.currencies)"
        )
    }
    assert dropped
    run_id, result = inner_join.run()
    assert result["status"] == "FAILED" and result["ledger"]["status"] == "UNBALANCED"
    assert "int_trades_enriched" in result["reason"]
    with inner_join.lineage.client(AUTH) as lineage:
        ledger = lineage.get(f"/runs/{run_id}/ledger").json()["ledger"]
    found = [d for d in ledger["discrepancies"] if d["model"] == "int_trades_enriched"]
    assert found, ledger["discrepancies"]
    samples = {k for d in found for k in d["sample_keys"]}
    assert samples and all(any(key.endswith(t) for t in dropped) for key in samples), samples
    events = _events(inner_join, run_id)
    assert events[-1]["eventType"] == "FAIL"
    assert events[-1]["run"]["facets"]["cdme_ledger"]["status"] == "UNBALANCED"


def test_rows_deleted_after_the_build_and_before_capture_are_unbalanced(clean: Pipeline) -> None:
    deleted = {
        r[0]
        for r in clean.rows(
            "delete from intermediate.int_trades_enriched where trade_id in "
            "(select trade_id from intermediate.int_trades_enriched order by trade_id limit 5) returning trade_id"
        )
    }
    run_id, result = clean.run()
    assert result["status"] == "FAILED" and result["ledger"]["status"] == "UNBALANCED"
    assert result["ledger"]["unaccounted"] == len(deleted)
    with clean.lineage.client(AUTH) as lineage:
        ledger = lineage.get(f"/runs/{run_id}/ledger").json()["ledger"]
    # int_trades_enriched's key is its upstream's, so its mapped keys are read from the table dbt built: the
    # deleted trades are missing at that model, and end to end the raw trades have no terminal fate.
    at_model = [d for d in ledger["discrepancies"] if d["model"] == "int_trades_enriched"]
    assert {d["check"] for d in at_model} >= {"completeness"}
    (missing,) = [d for d in at_model if d["check"] == "completeness"]
    assert missing["count"] == len(deleted)
    assert {k.rsplit(":", 1)[-1] for k in missing["sample_keys"]} == deleted
    (found,) = [
        d for d in ledger["discrepancies"] if d["unique_id"] == "source.cdme_trading.raw_trading.trades"
    ]
    assert found["check"] == "end_to_end" and found["count"] == len(deleted)
    assert {k.rsplit(":", 1)[-1] for k in found["sample_keys"]} == deleted
    events = _events(clean, run_id)
    assert events[-1]["eventType"] == "FAIL"
    # The model's own job run fails too, with the ledger's words, although dbt built it.
    (model_end,) = [
        e
        for e in events
        if e["job"]["name"] == "model.cdme_trading.int_trades_enriched" and e["eventType"] != "START"
    ]
    assert model_end["eventType"] == "FAIL"
    assert model_end["run"]["facets"]["errorMessage"]["message"].startswith(
        "CDME accounting: int_trades_enriched"
    )


@pytest.mark.parametrize("mode", ["key_derivable", "full"])
def test_a_deduplicating_union_is_unbalanced_and_failed_with_the_merged_keys(
    union_merge: Pipeline, mode: LineageMode
) -> None:
    # The trades the UNION merged, from the raw trades and dbt's own tables: of the accepted trades equal in
    # every column the legs project (book, currency, side and notional on the day), all but one. The one that
    # stays is the least trade id (the adjoint's convention for merged rows).
    lost = {
        r[0]
        for r in union_merge.rows(
            "select trade_id from (select t.trade_id, row_number() over (partition by t.book, upper(t.currency), "
            "t.side, t.notional order by t.trade_id) as n from raw_trading.trades t "
            f"where t.epoch_date = '{FIRST_EPOCH}' "
            "and t.trade_id in (select trade_id from intermediate.int_trades_enriched)) r where n > 1"
        )
    }
    assert lost and all(key.endswith("-2") for key in lost)
    ((accepted, counted),) = union_merge.rows(
        "select (select count(*) from intermediate.int_trades_enriched), "
        "(select sum(trade_count) from marts.fct_daily_positions)"
    )
    assert counted == accepted - len(lost)  # the fault is real, and dbt's build and tests passed
    run_id, result = union_merge.run(mode)
    assert result["status"] == "FAILED" and result["ledger"]["status"] == "UNBALANCED"
    assert "fct_daily_positions" in result["reason"]
    with union_merge.lineage.client(AUTH) as lineage:
        ledger = lineage.get(f"/runs/{run_id}/ledger").json()["ledger"]
    assert {d["model"] for d in ledger["discrepancies"]} == {"fct_daily_positions"}, ledger["discrepancies"]
    (completeness,) = [d for d in ledger["discrepancies"] if d["check"] == "completeness"]
    assert completeness["count"] == len(lost)
    assert {k.rsplit(":", 1)[-1] for k in completeness["sample_keys"]} == lost
    positions = next(m for m in ledger["morphisms"] if m["model"] == "fct_daily_positions")
    # The sell leg's trades reach the fold: none is "filtered" by the buy leg's WHERE.
    assert positions["partitions"]["filtered"]["count"] == 0
    assert positions["partitions"]["mapped"]["count"] == accepted - len(lost)
    events = _events(union_merge, run_id)
    validator = EventValidator.from_directory()
    assert [e for e in events if validator.errors(e)] == []
    assert events[-1]["eventType"] == "FAIL"
    assert "fct_daily_positions" in events[-1]["run"]["facets"]["errorMessage"]["message"]
    assert events[-1]["run"]["facets"]["cdme_ledger"]["status"] == "UNBALANCED"
    positions_end = next(
        e
        for e in events
        if e["job"]["name"] == "model.cdme_trading.fct_daily_positions" and e["eventType"] != "START"
    )
    assert positions_end["eventType"] == "FAIL"
    accounting = positions_end["run"]["facets"]["cdme_accounting"]
    assert accounting["balanced"] is False and accounting["unaccounted"] == len(lost)
