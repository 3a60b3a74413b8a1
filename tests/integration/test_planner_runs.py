"""The planner's state machine against real PostgreSQL, real dbt and the real validation service over HTTP.

The adjoint and lineage services are absent here (nothing listens on their ports): a run then fails at
capture with a one-line reason, and the tests check what was persisted, what a resume repeats (nothing that
succeeded), the advisory lock, cancellation, dry runs and a rejected validation. `tests/e2e/test_planner_e2e.py`
runs the whole pipeline with all four services.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.core.migrations import migrate
from services.core.net import free_port
from services.core.warehouse import create_warehouse_engine
from services.datagen.trading import GenerateRequest, currency_codes, generate
from services.planner.domain.errors import RunConflictError
from services.planner.domain.model import RunRequest
from services.planner.domain.peers import Peers
from services.planner.domain.planner import Planner, PlannerConfig, lock_key
from services.planner.domain.store import RunStore
from tests.conftest import PROJECT_DIR
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

TOKEN = "planner-test-token"
EPOCH = date(2026, 11, 20)
OTHER_EPOCH = date(2026, 11, 23)
TIMEOUT = 300


@dataclass
class Env:
    url: str
    validation: ServiceProcess
    tmp: Path

    def planner(self, project_dir: Path = PROJECT_DIR, name: str = "runs") -> Planner:
        engine = create_warehouse_engine(self.url, pool_size=2)
        migrate(engine, "planner")
        # Nothing listens on these ports: the adjoint and lineage services are down.
        peers = Peers(
            validation_url=self.validation.base_url,
            adjoint_url=f"http://127.0.0.1:{free_port()}",
            lineage_url=f"http://127.0.0.1:{free_port()}",
            token=TOKEN,
            retries=0,
        )
        config = PlannerConfig(
            project_dir=project_dir,
            runs_dir=self.tmp / name,
            warehouse_url=self.url,
            pepper="integration-test-pepper-0123456789",
            schema="analytics",
            peers=peers,
            landing_dir=self.tmp / "landing",
            peer_wait_s=0,
        )
        return Planner(RunStore(engine), config)

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(query, params).fetchall()


@pytest.fixture(scope="module")
def env(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    url = new_database()
    tmp = tmp_path_factory.mktemp("planner")
    generate(
        url,
        GenerateRequest(trades=1500, epoch=EPOCH, seed=3, counterparties=200),
        currency_codes(PROJECT_DIR / "seeds" / "currencies.csv"),
    )
    (tmp / "home").mkdir()
    validation = ServiceProcess(
        url, tmp / "home", tokens=f"{TOKEN}=planner:data_engineer,auditor,service", service="validation"
    )
    validation.start()
    try:
        yield Env(url, validation, tmp)
    finally:
        validation.stop()


def test_run_fails_at_capture_without_adjoint_and_resume_repeats_no_finished_step(env: Env) -> None:
    planner = env.planner()
    run = planner.submit("tester", RunRequest(epoch=EPOCH))
    assert isinstance(run.id, uuid.UUID) and run.id.version == 7
    run = planner.wait(run.id, TIMEOUT)

    assert run.status == "FAILED"
    assert run.failed_step == "capture"
    assert run.reason is not None and run.reason.startswith("capture: POST ")
    assert planner.config.peers.adjoint_url in run.reason and "\n" not in run.reason
    statuses = {s.name: s.status for s in run.steps}
    assert statuses == {
        "ingest": "skipped",
        "validate": "succeeded",
        "dbt": "succeeded",
        "capture": "failed",
        "finalize": "skipped",
    }
    assert run.step("validate").output["report_id"]
    run_dir = planner.config.runs_dir / str(run.id)
    for artifact in ("manifest.json", "run_results.json", "dbt.log.jsonl", "compile.log.jsonl"):
        assert (run_dir / artifact).is_file(), artifact
    assert all(s.started_at and s.ended_at for s in run.steps if s.status in {"succeeded", "failed"})
    built = env.rows("select count(*) from marts.fct_daily_positions where business_date = %s", EPOCH)
    assert built[0][0] > 0

    resumed = planner.wait(planner.resume(run.id).id, TIMEOUT)
    assert resumed.status == "FAILED" and resumed.failed_step == "capture"
    attempts = {s.name: s.attempt for s in resumed.steps}
    assert attempts == {"ingest": 0, "validate": 1, "dbt": 1, "capture": 2, "finalize": 0}
    # One row per run and step, however often it was resumed.
    assert env.rows("select count(*) from cdme_planner.steps where run_id = %s", run.id)[0][0] == 5


def test_one_active_run_per_key_and_cancel_from_another_planner(env: Env) -> None:
    planner = env.planner(name="cancel")
    first = planner.submit("tester", RunRequest(epoch=EPOCH))
    with pytest.raises(RunConflictError) as conflict:
        planner.submit("tester", RunRequest(epoch=EPOCH))
    assert conflict.value.active_run_id == first.id
    assert str(first.id) in str(conflict.value)
    # Another replica sees the run active (its lock is held) and can only flag it; the worker stops dbt.
    other = env.planner(name="cancel")
    with pytest.raises(RunConflictError):
        other.submit("tester", RunRequest(epoch=EPOCH))

    assert other.cancel(first.id).status in {"PENDING", "RUNNING"}
    cancelled = planner.wait(first.id, TIMEOUT)
    assert cancelled.status == "CANCELLED"
    assert not any(s.status in {"running", "pending"} for s in cancelled.steps)
    with pytest.raises(RunConflictError):
        planner.cancel(first.id)


def test_advisory_lock_held_elsewhere_refuses_the_key(env: Env) -> None:
    planner = env.planner(name="locked")
    with psycopg.connect(env.url, autocommit=True) as other:
        other.execute("select pg_advisory_lock(%s)", (lock_key("cdme_trading", "dev", OTHER_EPOCH),))
        with pytest.raises(RunConflictError, match="another planner"):
            planner.submit("tester", RunRequest(epoch=OTHER_EPOCH, dry_run=True))
    assert (
        env.rows(
            "select count(*) from cdme_planner.runs where epoch = %s and status = 'PENDING'", OTHER_EPOCH
        )[0][0]
        == 0
    )


def test_a_starting_planner_resumes_an_interrupted_run(env: Env) -> None:
    planner = env.planner(name="interrupted")
    run_id = uuid.uuid4()
    # What a planner killed mid-validation leaves behind: the run RUNNING, the step running, no worker.
    planner.store.create(run_id, "tester", RunRequest(epoch=OTHER_EPOCH, dry_run=True))
    planner.store.set_status(run_id, "RUNNING")
    planner.store.start_step(run_id, "validate")

    assert planner.resume_unfinished() == [run_id]
    run = planner.wait(run_id, TIMEOUT)
    assert run.status == "COMPLETE", run.reason
    assert run.step("validate").attempt == 2
