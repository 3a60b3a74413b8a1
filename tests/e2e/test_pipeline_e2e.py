"""The whole pipeline: the four services as real processes, the reference project run through the planner over HTTP.

Also the planner's HTTP contract on the way (the 409 naming the active run, the log stream, pagination,
`cdme run`); `test_planner_service.py` covers the contract when the peers are down.

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

from services.core.net import free_port
from services.datagen.trading import GenerateRequest, currency_codes, generate
from tests.conftest import PROJECT_DIR
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

for _service in ("adjoint", "lineage"):
    pytest.importorskip(
        f"services.{_service}.app", reason=f"the {_service} service is not in this checkout yet"
    )

TOKEN = "pipeline-e2e-token"
EPOCH = date(2026, 11, 20)
TRADES = 2000
NAMES = ("validation", "adjoint", "lineage", "planner")


@dataclass
class Pipeline:
    url: str
    home: Path
    env: dict[str, str]
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)

    def api(self, name: str = "planner") -> httpx.Client:
        return self.services[name].client({"Authorization": f"Bearer {TOKEN}"}, timeout=120)

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
            running.services[name] = ServiceProcess(
                url, home, service=name, env=env, port=ports[name], log_name=f"{name}.log"
            )
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


@pytest.fixture(scope="module")
def clean_run(pipeline: Pipeline) -> dict[str, Any]:
    """One uninterrupted run of the epoch, followed from the side: the 409 and the log stream while it runs."""
    with pipeline.api() as api:
        created = api.post("/runs", json={"epoch": EPOCH.isoformat()})
        assert created.status_code == 202, created.text
        run_id = created.json()["id"]
        assert created.headers["location"] == f"/runs/{run_id}"
        conflict = api.post("/runs", json={"epoch": EPOCH.isoformat()})
        assert conflict.status_code == 409 and run_id in conflict.json()["detail"]
        with api.stream("GET", f"/runs/{run_id}/logs") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            pipeline.log_lines = list(stream.iter_lines())
        return wait(api, run_id)


def test_a_clean_epoch_completes_with_a_balanced_ledger(
    pipeline: Pipeline, clean_run: dict[str, Any]
) -> None:
    run = clean_run
    assert run["status"] == "COMPLETE", run["reason"]
    assert [s["status"] for s in run["steps"]] == [
        "skipped",
        "succeeded",
        "succeeded",
        "succeeded",
        "succeeded",
    ]
    assert all(s["duration_seconds"] > 0 for s in run["steps"][1:])
    assert _ledger_counts(run)["status"] == "BALANCED"
    with pipeline.api("lineage") as lineage:
        for link in ("ledger", "proof", "events"):
            assert lineage.get(run["links"][link]).status_code == 200, link
    with pipeline.api("validation") as validation:
        assert validation.get(run["links"]["validation_report"]).json()["status"] == "passed"
    with pipeline.api("adjoint") as adjoint:
        partitions = adjoint.get(f"/runs/{run['id']}/partitions").json()
    trades = next(s for s in partitions["sources"] if s["source"] == "raw_trading.trades")
    assert trades["input"] == TRADES and trades["fates"]["unaccounted"] == 0
    events = [line for line in pipeline.log_lines if line.startswith("event: ")]
    assert events.count("event: dbt") > 10 and events[-1] == "event: end"
    assert any('"LogModelResult"' in line for line in pipeline.log_lines)
    with pipeline.api() as api:
        page = api.get("/runs", params={"status": "COMPLETE", "limit": 1}).json()
        assert page["total"] >= 1 and len(page["runs"]) == 1
        assert api.post(f"/runs/{run['id']}/cancel").status_code == 409
        assert api.post(f"/runs/{run['id']}/resume").status_code == 409
        assert api.get("/readyz").json() == {"status": "ready"}


def _metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    assert values, f"no sample {prefix.strip()} in:\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(name)
    )
    return values[0]


def test_every_service_exposes_what_the_run_did_as_metrics_without_a_token(
    pipeline: Pipeline, clean_run: dict[str, Any]
) -> None:
    assert clean_run["status"] == "COMPLETE"
    scraped = {
        name: httpx.get(f"{service.base_url}/metrics", timeout=10).text
        for name, service in pipeline.services.items()
    }
    assert _metric(scraped["planner"], "cdme_planner_steps_finished", step="dbt", status="succeeded") >= 1
    assert (
        _metric(scraped["planner"], "cdme_planner_step_seconds_sum", step="capture", status="succeeded") > 0
    )
    assert _metric(scraped["planner"], "cdme_planner_runs", status="COMPLETE") >= 1
    assert _metric(scraped["adjoint"], "cdme_adjoint_captured_runs", mode="key_derivable") >= 1
    assert _metric(scraped["lineage"], "cdme_lineage_ledgers", status="BALANCED") >= 1
    assert _metric(scraped["lineage"], "cdme_lineage_outbox_backlog") >= 0
    assert _metric(scraped["validation"], "cdme_validation_reports", status="passed") >= 1
    # Label sets stay bounded: no run ids or keys in any metric.
    for text in scraped.values():
        assert clean_run["id"] not in text


def test_a_planner_killed_mid_run_completes_it_after_restart_with_the_same_ledger(
    pipeline: Pipeline, clean_run: dict[str, Any]
) -> None:
    reference = clean_run
    assert reference["status"] == "COMPLETE", reference["reason"]
    with pipeline.api() as api:
        # Full lineage, so the restarted run has pairs to duplicate if a step were not idempotent.
        run_id = api.post("/runs", json={"epoch": EPOCH.isoformat(), "lineage_mode": "full"}).json()["id"]
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
    restarted = _adjoint_row_counts(pipeline, run_id)
    # The same metadata as the uninterrupted (key-derivable) run, plus its pairs: each once, as many as it mapped.
    assert {t: n for t, n in restarted.items() if t != "mapped"} == {
        t: n for t, n in captured.items() if t != "mapped"
    }
    ((stored, pairs),) = pipeline.rows(
        "select sum(pairs) filter (where keys_from is null), sum(pairs) from cdme_adjoint.morphisms "
        "where run_id = %s",
        run_id,
    )
    # Identities whose model another morphism reads store none: their pairs are that reader's input keys.
    assert restarted["mapped"] == stored > 0 and pairs > stored
    assert pipeline.rows(
        "select count(*) from (select 1 from cdme_adjoint.mapped where run_id = %s "
        "group by morphism_id, source_key, target_key having count(*) > 1) d",
        run_id,
    ) == [(0,)]
    assert pipeline.rows("select count(*) from cdme_planner.steps where run_id::text = %s", run_id) == [(5,)]


def test_cdme_run_dry_run_validates_and_writes_nothing_to_the_warehouse(
    pipeline: Pipeline, cli: Callable[..., Any]
) -> None:
    xid = int(pipeline.rows("select txid_current()")[0][0])
    env = {
        "CDME_PLANNER_URL": pipeline.services["planner"].base_url,
        "CDME_SERVICE_TOKEN": TOKEN,
        "CDME_LOG_LEVEL": "WARNING",
    }
    done = cli("run", "--epoch", "2026-11-24", "--dry-run", "--summary", env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("run ") and lines[0].endswith("epoch 2026-11-24 (dry run)")
    assert any(line.split()[:2] == ["validate", "succeeded"] for line in lines)
    assert any(line.endswith(" COMPLETE") for line in lines)
    assert "validation: passed" in done.stdout and done.stderr == ""
    changed = pipeline.rows(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where "
        "n.nspname not like 'cdme\\_%%' and n.nspname not like 'pg\\_%%' and c.xmin::text::bigint > %s",
        xid,
    )
    assert changed == []
    with pipeline.api() as api:
        run = api.get("/runs", params={"limit": 1}).json()["runs"][0]
    assert run["request"]["dry_run"] and run["steps"][1]["output"]["costs"]
    assert [s["status"] for s in run["steps"][2:]] == ["skipped"] * 3

    refused = cli("run", "--epoch", "2026-11-24", "--runtime", "spark", env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "cdme: error: the planner refused the run: unknown dbt runtime 'spark'; installed: cloud, inprocess, local"
    ]


def _planner_on(pipeline: Pipeline, project: Path, name: str) -> str:
    """A second planner process running `project` (same database, peers and home)."""
    env = pipeline.env | {"CDME_PROJECT_DIR": str(project)}
    service = ServiceProcess(pipeline.url, pipeline.home, service="planner", env=env, log_name=f"{name}.log")
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


def _wait_for_step(api: httpx.Client, run_id: str, step: str) -> None:
    index = ["ingest", "validate", "dbt", "capture", "finalize"].index(step)
    deadline = time.monotonic() + 180
    while (status := api.get(f"/runs/{run_id}").json()["steps"][index]["status"]) == "pending":
        assert time.monotonic() < deadline, f"{step} never started"
        time.sleep(0.05)
    assert status == "running", f"{step} ended before its service could be killed"


def test_adjoint_and_lineage_killed_mid_step_delay_the_run_but_it_completes(pipeline: Pipeline) -> None:
    with pipeline.api() as api:
        run_id = api.post("/runs", json={"epoch": EPOCH.isoformat()}).json()["id"]
        for step, service in (("capture", "adjoint"), ("finalize", "lineage")):
            _wait_for_step(api, run_id, step)
            pipeline.services[service].kill()
            time.sleep(1)
            pipeline.services[service].start()
        run = wait(api, run_id)
    assert run["status"] == "COMPLETE", run["reason"]
    assert _ledger_counts(run)["status"] == "BALANCED"
