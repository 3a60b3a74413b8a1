"""The dbt runtimes on the reference project: `local` and `inprocess` with real dbt, `cloud` against a local
implementation of dbt Cloud's Administrative API v2 (a uvicorn process running the steps with real dbt)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.core.errors import DbtError
from services.planner.runtimes import DbtCall, RuntimeContext, load_runtime
from services.planner.runtimes.cloud import CloudRuntime, DbtCloudSettings
from tests.conftest import PROJECT_DIR
from tests.service_process import ServiceProcess

pytestmark = pytest.mark.integration

CLOUD_TOKEN = "dbtc_fake_service_token"
ACCOUNT, JOB = 4242, 77
VARS = {"epoch_date": "2026-11-20"}


@pytest.fixture(scope="module")
def warehouse(new_database: Callable[[], str]) -> str:
    return new_database()


@pytest.fixture(scope="module")
def context(warehouse: str) -> RuntimeContext:
    return RuntimeContext(
        project_dir=PROJECT_DIR, warehouse_url=warehouse, pepper=None, schema="analytics", target="dev"
    )


@pytest.fixture(scope="module")
def cloud_api(warehouse: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("dbt-cloud")
    server = ServiceProcess(
        warehouse,
        work,
        app="tests.fakes.dbt_cloud_api:app",
        env={
            "FAKE_DBT_CLOUD_TOKEN": CLOUD_TOKEN,
            "FAKE_DBT_CLOUD_ACCOUNT_ID": str(ACCOUNT),
            "FAKE_DBT_CLOUD_JOB_ID": str(JOB),
            "FAKE_DBT_CLOUD_WAREHOUSE_URL": warehouse,
            "FAKE_DBT_CLOUD_PROJECT_DIR": str(PROJECT_DIR),
            "FAKE_DBT_CLOUD_WORK_DIR": str(work),
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _cloud(context: RuntimeContext, api: ServiceProcess, token: str = CLOUD_TOKEN) -> CloudRuntime:
    settings = DbtCloudSettings(
        url=api.base_url, account_id=ACCOUNT, job_id=JOB, token=SecretStr(token), poll_s=0.2, timeout_s=300
    )
    return CloudRuntime(context, settings)


def _events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_local_runtime_compiles_into_the_run_directory_with_json_logs(
    context: RuntimeContext, tmp_path: Path
) -> None:
    runtime = load_runtime("local", context)
    outcome = runtime.compile(DbtCall(target_path=tmp_path / "run", vars=VARS))
    assert outcome.succeeded, outcome.error
    assert set(runtime.fetch_artifacts(outcome)) >= {"manifest.json", "run_results.json"}
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["metadata"]["project_name"] == "cdme_trading"
    assert all("info" in e for e in _events(tmp_path / "run" / "compile.log.jsonl"))
    assert runtime.metadata()["name"] == "local" and runtime.supports_parallel


def test_local_runtime_reports_the_failing_node_in_one_line(context: RuntimeContext, tmp_path: Path) -> None:
    # The database is empty: the first model that reads a source fails.
    outcome = load_runtime("local", context).run(
        DbtCall(target_path=tmp_path / "run", vars=VARS, selection=["--select", "stg_trades"])
    )
    assert not outcome.succeeded
    assert outcome.error is not None and "stg_trades" in outcome.error and "\n" not in outcome.error


def test_local_runtime_stops_dbt_when_the_call_is_cancelled(context: RuntimeContext, tmp_path: Path) -> None:
    call = DbtCall(target_path=tmp_path / "run", vars=VARS)
    call.cancel.set()
    outcome = load_runtime("local", context).compile(call)
    assert outcome.cancelled and not outcome.succeeded


def test_inprocess_runtime_runs_dbt_in_this_process_one_call_at_a_time(
    context: RuntimeContext, tmp_path: Path
) -> None:
    runtime = load_runtime("inprocess", context)
    assert not runtime.supports_parallel
    outcome = runtime.compile(DbtCall(target_path=tmp_path / "run", vars=VARS))
    assert outcome.succeeded, outcome.error
    assert json.loads(outcome.manifest_path.read_text())["metadata"]["project_name"] == "cdme_trading"
    names = {e["info"]["name"] for e in _events(tmp_path / "run" / "compile.log.jsonl")}  # type: ignore[index]
    assert "MainReportVersion" in names


def test_cloud_runtime_triggers_polls_and_downloads_artifacts(
    context: RuntimeContext, cloud_api: ServiceProcess, tmp_path: Path
) -> None:
    progress: list[str] = []
    call = DbtCall(target_path=tmp_path / "run", vars=VARS, on_progress=progress.append)
    outcome = _cloud(context, cloud_api).compile(call)
    assert outcome.succeeded, outcome.error
    manifest = json.loads(outcome.manifest_path.read_text())
    assert manifest["metadata"]["project_name"] == "cdme_trading"
    results = json.loads(outcome.run_results_path.read_text())
    assert results["args"]["vars"] == VARS
    assert progress[-1].endswith("Success")
    messages = [e["info"]["msg"] for e in _events(tmp_path / "run" / "compile.log.jsonl")]  # type: ignore[index]
    assert any("triggered: dbt compile --vars" in str(m) for m in messages)


def test_cloud_runtime_reports_a_failed_job_run_with_dbt_s_reason(
    context: RuntimeContext, cloud_api: ServiceProcess, tmp_path: Path
) -> None:
    outcome = _cloud(context, cloud_api).run(
        DbtCall(target_path=tmp_path / "run", vars=VARS, selection=["--select", "stg_trades"])
    )
    assert not outcome.succeeded and not outcome.cancelled
    assert outcome.error is not None and "stg_trades" in outcome.error


def test_cloud_runtime_cancels_the_job_run(
    context: RuntimeContext, cloud_api: ServiceProcess, tmp_path: Path
) -> None:
    call = DbtCall(target_path=tmp_path / "run", vars=VARS)
    threading.Timer(0.3, call.cancel.set).start()
    started = time.monotonic()
    outcome = _cloud(context, cloud_api).compile(call)
    assert outcome.cancelled and outcome.error == "cancelled"
    assert time.monotonic() - started < 30


def test_cloud_runtime_with_a_wrong_token_fails_with_the_api_s_answer(
    context: RuntimeContext, cloud_api: ServiceProcess, tmp_path: Path
) -> None:
    with pytest.raises(DbtError, match="401"):
        _cloud(context, cloud_api, token="wrong").compile(DbtCall(target_path=tmp_path / "run", vars=VARS))
