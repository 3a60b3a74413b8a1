"""Backward across epochs: an incremental mart keeps earlier epochs' rows, whose lineage earlier runs captured.

Two epochs of the reference project are built one after the other in one database, each captured as its own
run. The monthly mart folds both days of the daily (incremental) mart, so a monthly key's raw trades come from
both runs: the walk follows the first day's daily keys into the run that produced them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from services.adjoint.domain import queries
from services.adjoint.domain.capture import capture, load_run_ldm, plan_capture
from services.core.artifacts import parse_manifest, parse_run_results
from services.core.ldm import load_project_config
from services.core.ldm.config import LineageMode
from services.core.migrations import migrate
from services.core.warehouse import create_warehouse_engine
from tests.conftest import PROJECT_DIR
from tests.integration.test_adjoint_reference import accepted_trades, build_project
from tests.integration.test_reference_project import FIRST_EPOCH

pytestmark = pytest.mark.integration

TRADES = 1500
SECOND_EPOCH = FIRST_EPOCH + timedelta(days=1)


def _build(url: str, epoch: date, target: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    manifest, results, _report = build_project(url, PROJECT_DIR, target, epoch=epoch, trades=TRADES)
    return manifest, results


def _capture(
    engine: Engine, epoch: date, artifacts: tuple[dict[str, Any], dict[str, Any]], mode: LineageMode
) -> str:
    manifest, results = parse_manifest(artifacts[0]), parse_run_results(artifacts[1])
    ldm = load_run_ldm(manifest, load_project_config(PROJECT_DIR / "cdme.yml"), mode)
    run_id = str(uuid.uuid4())
    capture(engine, run_id, epoch, mode, plan_capture(ldm, manifest, results))
    return run_id


def _walk(engine: Engine, run_id: str, key: str, *, records: bool = False) -> dict[str, Any]:
    contributions: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = queries.backward(
            engine,
            "fct_monthly_positions",
            key,
            roles=None,
            run_id=run_id,
            to="raw_trading.trades",
            records=records,
            limit=50,
            cursor=cursor,
        )
        contributions += page["contributions"]
        cursor = page["next"]
        if cursor is None:
            return {**page, "contributions": contributions}


def test_backward_from_a_monthly_key_follows_earlier_epochs_into_the_runs_that_built_them(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    url = new_database()
    engine = create_warehouse_engine(url)
    migrate(engine, "adjoint")
    try:
        first = _build(url, FIRST_EPOCH, tmp_path / "first")
        first_run = _capture(engine, FIRST_EPOCH, first, "full")
        second = _build(url, SECOND_EPOCH, tmp_path / "second")
        with psycopg.connect(url) as conn:
            month, book, currency = conn.execute(
                "select month_start, book, currency_code from marts.fct_monthly_positions "
                "where days_reported = 2 order by trade_count desc limit 1"
            ).fetchone() or pytest.fail("no monthly position spans both epochs")
        key = f"{month}|{book}|{currency}"
        earlier = accepted_trades(url, FIRST_EPOCH, book, currency)
        later = accepted_trades(url, SECOND_EPOCH, book, currency)
        assert earlier and later

        for mode in ("full", "key_derivable"):
            second_run = _capture(engine, SECOND_EPOCH, second, mode)
            answer = _walk(engine, second_run, key, records=True)
            by_run: dict[str, set[str]] = {}
            epochs = {first_run: str(FIRST_EPOCH), second_run: str(SECOND_EPOCH)}
            for c in answer["contributions"]:
                by_run.setdefault(c["run_id"], set()).add(c["key"])
                assert c["path"][0] == "fct_monthly_positions" and c["path"][-1] == "raw_trading.trades"
                # The trade's row of the epoch of the run that found it.
                assert (c["record"]["trade_id"], c["record"]["epoch_date"]) == (c["key"], epochs[c["run_id"]])
            assert by_run == {second_run: later, first_run: earlier}, mode
            assert answer["unresolved"] == []

        # Without the run that built the first day, its daily key is named, not silently dropped.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("delete from cdme_adjoint.runs where run_id = %s", (first_run,))
        answer = _walk(engine, second_run, key)
        assert {c["key"] for c in answer["contributions"]} == later
        assert [(u["entity"], u["key"]) for u in answer["unresolved"]] == [
            ("fct_daily_positions", f"{FIRST_EPOCH}|{book}|{currency}")
        ]
    finally:
        engine.dispose()
