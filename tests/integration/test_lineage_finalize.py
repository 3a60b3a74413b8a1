"""Finalize on a real dbt build of the reference project, with partitions derived from the warehouse's rows.

The partitions document is computed here with SQL over the tables dbt built (the shape of the adjoint's
`GET /runs/{run_id}/partitions`), so the ledger, gate and events are checked without the adjoint service;
`tests/e2e/test_lineage_adjoint.py` runs both services.
"""

from __future__ import annotations

import json
import secrets
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from services.core.dbt import first_failure, run_dbt
from services.core.migrations import migrate
from services.core.settings import CdmeSettings
from services.core.warehouse import create_warehouse_engine
from services.datagen.trading import GenerateRequest, generate
from services.lineage.delivery import Deliverer, FileTransport
from services.lineage.domain.ledger import LEDGER_SCHEMA
from services.lineage.domain.partitions import parse_partitions
from services.lineage.domain.spec import EventValidator
from services.lineage.finalize import FinalizeInput, Finalizer
from services.lineage.store import LineageStore
from tests.conftest import PROJECT_DIR
from tests.integration.test_reference_project import COUNTERPARTIES, CURRENCIES, FIRST_EPOCH, SEED

pytestmark = pytest.mark.integration

PROJECT = "cdme_trading"


@dataclass
class Built:
    url: str
    target: Path
    runs: Path

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def run_dir(
        self, run_id: str, *, artifacts: tuple[str, ...] = ("manifest.json", "run_results.json")
    ) -> Path:
        directory = self.runs / run_id
        directory.mkdir(parents=True)
        for name in artifacts:
            shutil.copy(self.target / name, directory / name)
        return directory


def _build(url: str, tmp_path_factory: pytest.TempPathFactory) -> Built:
    generate(
        url,
        GenerateRequest(trades=4000, epoch=FIRST_EPOCH, seed=SEED, counterparties=COUNTERPARTIES),
        CURRENCIES,
    )
    target = tmp_path_factory.mktemp("lineage-build")
    dbt_vars = ["--vars", json.dumps({"epoch_date": str(FIRST_EPOCH)})]
    pepper = secrets.token_hex(16)
    invocation = run_dbt(
        ["build", *dbt_vars], project_dir=PROJECT_DIR, target_path=target, warehouse_url=url, pepper=pepper
    )
    assert invocation.succeeded, first_failure(invocation)
    # The catalog in its own target: `docs generate` writes run results of its own.
    docs = tmp_path_factory.mktemp("lineage-docs")
    invocation = run_dbt(
        ["docs", "generate", *dbt_vars],
        project_dir=PROJECT_DIR,
        target_path=docs,
        warehouse_url=url,
        pepper=pepper,
    )
    assert invocation.succeeded, first_failure(invocation)
    shutil.copy(docs / "catalog.json", target / "catalog.json")
    return Built(url, target, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def built(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Built:
    return _build(new_database(), tmp_path_factory)


def _keys(built: Built, sql: str) -> list[str]:
    return [f"cdme-key/v1:{r[0]}" for r in built.rows(sql)]


def partitions_from_warehouse(built: Built, run_id: str) -> dict[str, Any]:
    """The partitions of the epoch as the adjoint defines them, computed from the rows dbt left."""
    active = "select trade_id from intermediate.int_trades_active"
    ((staged, cancelled, n_active),) = built.rows(
        "select count(*), count(*) filter (where trade_status = 'CANCELLED'), "
        "count(*) filter (where trade_status <> 'CANCELLED') from staging.stg_trades"
    )
    ((mapped, errored, overlap),) = built.rows(
        f"select (select count(*) from intermediate.int_trades_enriched where trade_id in ({active})), "
        f"(select count(*) from errors.err_trades_enrichment where source_key in ({active})), "
        f"(select count(*) from intermediate.int_trades_enriched e join errors.err_trades_enrichment x "
        f"on x.source_key = e.trade_id)"
    )
    lost_sql = (
        f"select trade_id from ({active}) a where trade_id not in "
        "(select trade_id from intermediate.int_trades_enriched) and trade_id not in "
        "(select source_key from errors.err_trades_enrichment) order by trade_id"
    )
    lost = _keys(built, lost_sql)
    ((raw,),) = built.rows("select count(*) from raw_trading.trades where epoch_date = %s", (FIRST_EPOCH,))

    def morphism(model: str, upstream: str, **counts: Any) -> dict[str, Any]:
        return {
            "model": model,
            "unique_id": f"model.{PROJECT}.{model}",
            "relation": f"cdme.intermediate.{model}",
            "kind": counts.pop("kind"),
            "upstream": upstream,
            "upstream_unique_id": f"model.{PROJECT}.{upstream}",
            "source_key_fields": ["trade_id"],
            "target_key_fields": ["trade_id"],
            "locations": {
                p: f"cdme_adjoint.{p}#run={run_id}&morphism=model.{PROJECT}.{model}"
                for p in ("mapped", "filtered", "errored")
            },
            **counts,
        }

    return {
        "run_id": run_id,
        "epoch": str(FIRST_EPOCH),
        "lineage_mode": "full",
        "key_encoding": "cdme-key/v1",
        "morphisms": [
            morphism(
                "int_trades_active",
                "stg_trades",
                kind="filter",
                input=staged,
                mapped=n_active,
                filtered=cancelled,
                errored=0,
                output=n_active,
                req=["REQ-FLT-01"],
            ),
            morphism(
                "int_trades_enriched",
                "int_trades_active",
                kind="enrich",
                input=n_active,
                mapped=mapped,
                filtered=0,
                errored=errored,
                output=mapped,
                overlap={"count": overlap, "samples": []},
                unaccounted={"count": len(lost), "samples": lost[:10]},
                req=["REQ-ERR-01", "REQ-REF-01"],
            ),
        ],
        "sources": [
            {
                "source": "raw_trading.trades",
                "unique_id": f"source.{PROJECT}.raw_trading.trades",
                "relation": "cdme.raw_trading.trades",
                "key_fields": ["trade_id"],
                "input": raw,
                "fates": {
                    "reached_output": mapped,
                    "filtered": cancelled,
                    "errored": errored,
                    "unaccounted": len(lost),
                },
                "unaccounted_samples": lost[:10],
            }
        ],
        "not_captured": [],
    }


@pytest.fixture
def lineage(built: Built, tmp_path: Path) -> tuple[Finalizer, LineageStore, Path, dict[str, Any]]:
    settings = CdmeSettings(home=tmp_path, runs_dir=built.runs, warehouse_url=built.url)
    engine = create_warehouse_engine(settings.warehouse_url or "", pool_size=2)
    migrate(engine, "lineage")
    store = LineageStore(engine)
    events_file = tmp_path / "events.jsonl"
    documents: dict[str, Any] = {}
    finalizer = Finalizer(
        settings,
        store,
        Deliverer(store, FileTransport(events_file)),
        fetch_partitions=lambda run_id: parse_partitions(documents[run_id]) if run_id in documents else None,
        dataset_namespace="postgres://127.0.0.1:5432",
    )
    return finalizer, store, events_file, documents


LEDGER = Draft202012Validator(json.loads(LEDGER_SCHEMA.read_text()))


def _finalize(
    finalizer: Finalizer, directory: Path, run_id: str, *, ok: bool = True, error: str | None = None
) -> dict[str, Any]:
    return finalizer.finalize(
        FinalizeInput(
            run_id=run_id,
            artifact_dir=directory,
            dbt_succeeded=ok,
            dbt_error=error,
            epoch=str(FIRST_EPOCH),
            trace=[
                {
                    "step": "dbt",
                    "status": "succeeded" if ok else "failed",
                    "started_at": "2026-11-22T06:00:00Z",
                    "ended_at": "2026-11-22T06:00:05Z",
                }
            ],
            project=PROJECT,
            target="dev",
        )
    )


def test_a_clean_run_is_balanced_complete_and_its_events_are_valid_and_delivered(
    built: Built, lineage: Any
) -> None:
    finalizer, store, events_file, documents = lineage
    run_id = str(uuid.uuid4())
    documents[run_id] = partitions_from_warehouse(built, run_id)
    directory = built.run_dir(run_id, artifacts=("manifest.json", "run_results.json", "catalog.json"))
    result = _finalize(finalizer, directory, run_id)
    assert (result["status"], result["reason"]) == ("COMPLETE", None)
    assert result["ledger"]["status"] == "BALANCED" and result["ledger"]["input"] == 4000
    ledger = json.loads((directory / "ledger.json").read_text())
    assert not list(LEDGER.iter_errors(ledger))
    assert ledger["run"]["status"] == "COMPLETE"
    assert ledger["versions"]["compiled_sql"][f"model.{PROJECT}.int_trades_enriched"].startswith("sha256:")
    delivered = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert len(delivered) == result["events"] > 100
    validator = EventValidator.from_directory()
    assert [e for e in delivered if validator.errors(e)] == []
    enriched = next(
        e
        for e in delivered
        if e["job"]["name"] == f"model.{PROJECT}.int_trades_enriched" and e["eventType"] == "COMPLETE"
    )
    accounting = enriched["run"]["facets"]["cdme_accounting"]
    assert accounting["errored"] == ledger["morphisms"][1]["partitions"]["errored"]["count"] > 0
    assert {"REQ-ERR-01", "REQ-REF-01", "REQ-PII-01"} <= set(accounting["req"])  # declared in meta.cdme too
    (output,) = enriched["outputs"]
    database = built.url.rsplit("/", 1)[1]
    assert output["name"] == f"{database}.intermediate.int_trades_enriched"
    assert output["outputFacets"]["outputStatistics"]["rowCount"] == accounting["mapped"]
    # With a catalog, the schema is the warehouse's own: every column, its type and position.
    fields = {f["name"]: f for f in output["facets"]["schema"]["fields"]}
    assert fields["trade_id"]["type"] == "text" and fields["notional_usd"]["type"] == "numeric"
    assert sorted(f["ordinal_position"] for f in fields.values()) == list(range(1, len(fields) + 1))
    assert set(fields) == set(output["facets"]["columnLineage"]["fields"])
    masked = output["facets"]["columnLineage"]["fields"]["counterparty_contact_sk"]["inputFields"][0]
    assert masked["transformations"][0]["masking"] is True
    assert {i["name"] for i in enriched["inputs"]} >= {
        f"{database}.intermediate.int_trades_active",
        f"{database}.snapshots.snap_counterparties",
    }
    assert (
        delivered[-1]["eventType"] == "COMPLETE"
        and delivered[-1]["run"]["facets"]["cdme_ledger"]["status"] == "BALANCED"
    )
    # Idempotent: the same answer, no new event.
    assert _finalize(finalizer, directory, run_id) == result
    assert len(events_file.read_text().splitlines()) == len(delivered)
    assert store.pending_count() == 0


def test_rows_deleted_after_the_build_are_unbalanced_with_the_model_and_keys(
    built: Built, lineage: Any
) -> None:
    finalizer, _store, events_file, documents = lineage
    deleted = _keys(
        built,
        "delete from intermediate.int_trades_enriched where trade_id in (select trade_id from intermediate.int_trades_enriched order by trade_id limit 7) returning trade_id",
    )
    try:
        run_id = str(uuid.uuid4())
        documents[run_id] = partitions_from_warehouse(built, run_id)
        result = _finalize(finalizer, built.run_dir(run_id), run_id)
    finally:
        built.rows(
            "select 1"
        )  # the fixture's build is module-wide: later tests see the deletion; none follows
    assert result["status"] == "FAILED" and result["ledger"]["status"] == "UNBALANCED"
    assert "int_trades_enriched" in result["reason"]
    ledger = json.loads(Path(result["ledger"]["path"]).read_text())
    completeness = next(d for d in ledger["discrepancies"] if d["check"] == "completeness")
    assert completeness["model"] == "int_trades_enriched" and completeness["count"] == 7
    assert sorted(completeness["sample_keys"]) == sorted(deleted)
    last = json.loads(events_file.read_text().splitlines()[-1])
    assert last["eventType"] == "FAIL"
    assert "int_trades_enriched" in last["run"]["facets"]["errorMessage"]["message"]
    assert last["run"]["facets"]["cdme_ledger"]["status"] == "UNBALANCED"


def test_dbt_failing_before_run_results_still_records_failed_and_a_fail_event(
    built: Built, lineage: Any
) -> None:
    finalizer, store, events_file, _documents = lineage
    run_id = str(uuid.uuid4())
    directory = built.run_dir(run_id, artifacts=("manifest.json",))
    result = _finalize(finalizer, directory, run_id, ok=False, error="Compilation Error in model stg_trades")
    assert result["status"] == "FAILED" and result["ledger"] is None
    assert result["reason"].startswith("dbt failed: Compilation Error in model stg_trades")
    delivered = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in delivered] == ["START", "FAIL"]
    assert "Compilation Error" in delivered[1]["run"]["facets"]["errorMessage"]["message"]
    record = store.run(run_id)
    assert record is not None and record.dbt_status == "error"


def test_an_artifact_dir_outside_the_runs_directory_is_refused(lineage: Any, tmp_path: Path) -> None:
    from services.core.errors import UsageError

    finalizer = lineage[0]
    with pytest.raises(UsageError, match="inside the runs directory"):
        _finalize(finalizer, tmp_path, str(uuid.uuid4()))
