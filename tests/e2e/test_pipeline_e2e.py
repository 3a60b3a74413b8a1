"""The whole pipeline: the four services as real processes, the reference project run through the planner over HTTP.

One fresh database and one CDME home for all four services (so the lineage service finds the run's artifacts
under the shared runs directory). Checked: a clean epoch ends COMPLETE with a balanced ledger; an epoch with
injected silent loss ends FAILED at finalize; a hallucinated column is rejected before dbt; a dry run writes
nothing; a planner killed with SIGKILL mid-run completes the run after a restart with the same ledger and no
duplicated adjoint metadata.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from services.datagen.trading import GenerateRequest, currency_codes, generate
from tests.conftest import PROJECT_DIR
from tests.e2e.service_process import ServiceProcess, free_port

pytestmark = pytest.mark.integration

for _service in ("adjoint", "lineage"):
    pytest.importorskip(
        f"services.{_service}.app", reason=f"the {_service} service is not in this checkout yet"
    )

TOKEN = "pipeline-e2e-token"
EPOCH = date(2026, 11, 20)
TRADES = 3000
NAMES = ("validation", "adjoint", "lineage", "planner")


@dataclass
class Pipeline:
    url: str
    home: Path
    env: dict[str, str]
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def api(self, name: str = "planner") -> httpx.Client:
        return self.services[name].client(TOKEN, timeout=120)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()

    def run(self, body: dict[str, Any], planner: str = "planner") -> dict[str, Any]:
        with self.api(planner) as api:
            created = api.post("/runs", json=body)
            assert created.status_code == 202, created.text
            return wait(api, created.json()["id"])


def wait(api: httpx.Client, run_id: str, timeout: float = 400) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = api.get(f"/runs/{run_id}").json()
        if run["status"] in {"COMPLETE", "FAILED", "CANCELLED"}:
            return run
        time.sleep(0.3)
    pytest.fail(f"run {run_id} did not end within {timeout}s")


@pytest.fixture(scope="module")
def pipeline(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    url = new_database()
    home = tmp_path_factory.mktemp("pipeline")
    generate(
        url,
        GenerateRequest(trades=TRADES, epoch=EPOCH, seed=9, counterparties=300),
        currency_codes(PROJECT_DIR / "seeds" / "currencies.csv"),
    )
    ports = {name: free_port() for name in NAMES}
    env = {
        "CDME_WAREHOUSE_URL": url,
        "CDME_AUTH_TOKENS": f"{TOKEN}=pipeline:data_engineer,auditor,service",
        "CDME_SERVICE_TOKEN": TOKEN,
        "CDME_HOME": str(home),
        "CDME_PEPPER": "pipeline-pepper-0123456789abcdef",
        **{f"CDME_{name.upper()}_URL": f"http://127.0.0.1:{port}" for name, port in ports.items()},
    }
    running = Pipeline(url, home, env)
    try:
        for name in NAMES:
            running.services[name] = ServiceProcess(name, env, home, port=ports[name])
            running.services[name].start()
        yield running
    finally:
        for service in reversed(list(running.services.values())):
            service.stop()


def _adjoint_row_counts(pipeline: Pipeline, run_id: str) -> dict[str, int]:
    """Rows each adjoint table holds for the run (tables with a run_id column)."""
    # Parents only: a run's rows live in its own partition, which the parent's count includes.
    tables = pipeline.rows(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "join pg_attribute a on a.attrelid = c.oid and a.attname = 'run_id' "
        "where n.nspname = 'cdme_adjoint' and c.relkind in ('r', 'p') and not c.relispartition"
    )
    counts = {}
    for (table,) in tables:
        counts[table] = pipeline.rows(
            f'select count(*) from cdme_adjoint."{table}" where run_id::text = %s', run_id
        )[0][0]
    return counts


def _ledger_counts(run: dict[str, Any]) -> dict[str, Any]:
    ledger = dict(next(s for s in run["steps"] if s["step"] == "finalize")["output"]["ledger"])
    ledger.pop("path", None)
    return ledger


def test_a_clean_epoch_completes_with_a_balanced_ledger(pipeline: Pipeline) -> None:
    run = pipeline.run({"epoch": EPOCH.isoformat()})
    assert run["status"] == "COMPLETE", run["reason"]
    assert [s["status"] for s in run["steps"]] == [
        "skipped",
        "succeeded",
        "succeeded",
        "succeeded",
        "succeeded",
    ]
    assert _ledger_counts(run)["status"] == "BALANCED"
    with pipeline.api("lineage") as lineage:
        for link in ("ledger", "proof", "events"):
            assert lineage.get(run["links"][link]).status_code == 200, link
    with pipeline.api("adjoint") as adjoint:
        partitions = adjoint.get(f"/runs/{run['id']}/partitions").json()
    trades = next(s for s in partitions["sources"] if s["source"] == "raw_trading.trades")
    assert trades["input"] == TRADES and trades["fates"]["unaccounted"] == 0


def test_a_planner_killed_mid_run_completes_it_after_restart_with_the_same_ledger(pipeline: Pipeline) -> None:
    reference = pipeline.run({"epoch": EPOCH.isoformat()})
    assert reference["status"] == "COMPLETE", reference["reason"]
    with pipeline.api() as api:
        run_id = api.post("/runs", json={"epoch": EPOCH.isoformat()}).json()["id"]
        deadline = time.monotonic() + 120
        while api.get(f"/runs/{run_id}").json()["steps"][2]["status"] != "running":
            assert time.monotonic() < deadline, "dbt never started"
            time.sleep(0.1)
    pipeline.services["planner"].kill()
    pipeline.services["planner"].start()
    with pipeline.api() as api:
        run = wait(api, run_id)
    assert run["status"] == "COMPLETE", run["reason"]
    assert _ledger_counts(run) == _ledger_counts(reference)
    captured = _adjoint_row_counts(pipeline, reference["id"])
    assert sum(captured.values()) > 0, captured
    assert _adjoint_row_counts(pipeline, run_id) == captured
    assert pipeline.rows("select count(*) from cdme_planner.steps where run_id::text = %s", run_id) == [(5,)]


def test_a_dry_run_validates_and_writes_nothing_to_the_warehouse(pipeline: Pipeline) -> None:
    xid = int(pipeline.rows("select txid_current()")[0][0])
    run = pipeline.run({"epoch": "2026-11-24", "dry_run": True})
    assert run["status"] == "COMPLETE", run["reason"]
    assert run["steps"][1]["output"]["costs"]
    assert [s["status"] for s in run["steps"][2:]] == ["skipped"] * 3
    changed = pipeline.rows(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where "
        "n.nspname not like 'cdme\\_%%' and n.nspname not like 'pg\\_%%' and c.xmin::text::bigint > %s",
        xid,
    )
    assert changed == []


def _planner_on(pipeline: Pipeline, project: Path, name: str) -> str:
    """A second planner process running `project` (same database, peers and home)."""
    service = ServiceProcess("planner", pipeline.env | {"CDME_PROJECT_DIR": str(project)}, pipeline.home)
    service.log = pipeline.home / f"{name}.log"
    service.start()
    pipeline.services[name] = service
    return name


def _project_copy(pipeline: Pipeline, name: str, file: str, old: str, new: str) -> Path:
    project = pipeline.home / name
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    path = project / file
    sql = path.read_text()
    assert old in sql
    path.write_text(sql.replace(old, new, 1))
    return project


def test_a_hallucinated_column_is_rejected_before_dbt_runs(pipeline: Pipeline) -> None:
    project = _project_copy(
        pipeline,
        "hallucinated",
        "models/intermediate/int_trades_active.sql",
        "trade_status\n",
        "trade_risk_score\n",
    )
    planner = _planner_on(pipeline, project, "planner-hallucinated")
    run = pipeline.run({"epoch": EPOCH.isoformat()}, planner)
    assert run["status"] == "FAILED" and run["failed_step"] == "validate"
    assert "trade_risk_score" in run["reason"]
    assert run["steps"][2]["status"] == "skipped" and run["steps"][2]["attempt"] == 0


def test_silent_loss_fails_the_run_at_finalize(pipeline: Pipeline) -> None:
    # Trades whose counterparty is unknown vanish in an inner join instead of reaching the error sink; validation
    # is advisory so that dbt runs and the ledger has to find the loss.
    project = _project_copy(
        pipeline,
        "silent_loss",
        "macros/trade_enrichment.sql",
        "left join {{ ref('snap_counterparties') }}",
        "inner join {{ ref('snap_counterparties') }}",
    )
    planner = _planner_on(pipeline, project, "planner-loss")
    run = pipeline.run({"epoch": EPOCH.isoformat(), "validation": "advisory"}, planner)
    assert run["status"] == "FAILED" and run["failed_step"] == "finalize", run["reason"]
    ledger = _ledger_counts(run)
    assert ledger["status"] == "UNBALANCED" and ledger["unaccounted"] > 0, ledger


def _kill_during(pipeline: Pipeline, step: str, service: str) -> dict[str, Any]:
    """Start a run, SIGKILL `service` once `step` is running, start it again, and return the ended run."""
    index = ["ingest", "validate", "dbt", "capture", "finalize"].index(step)
    with pipeline.api() as api:
        run_id = api.post("/runs", json={"epoch": EPOCH.isoformat()}).json()["id"]
        deadline = time.monotonic() + 180
        while (status := api.get(f"/runs/{run_id}").json()["steps"][index]["status"]) == "pending":
            assert time.monotonic() < deadline, f"{step} never started"
            time.sleep(0.05)
        assert status == "running", f"{step} ended before {service} could be killed"
        pipeline.services[service].kill()
        time.sleep(1)
        pipeline.services[service].start()
        return wait(api, run_id)


def test_an_adjoint_killed_during_capture_delays_the_run_but_it_completes(pipeline: Pipeline) -> None:
    run = _kill_during(pipeline, "capture", "adjoint")
    assert run["status"] == "COMPLETE", run["reason"]
    assert _ledger_counts(run)["status"] == "BALANCED"


def test_a_lineage_service_killed_during_finalize_delays_the_run_but_it_completes(pipeline: Pipeline) -> None:
    run = _kill_during(pipeline, "finalize", "lineage")
    assert run["status"] == "COMPLETE", run["reason"]
    assert _ledger_counts(run)["status"] == "BALANCED"
