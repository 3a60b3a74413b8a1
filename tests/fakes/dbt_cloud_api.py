"""A local stand-in for dbt Cloud's Administrative API v2, the one test double CDME's tests use.

It implements the documented requests and responses the `cloud` runtime relies on, and runs each triggered
job's `steps_override` with the real dbt CLI against a real warehouse:

- `POST /api/v2/accounts/{account_id}/jobs/{job_id}/run/` (`cause`, `steps_override`) -> `{"status": {...},
  "data": {"id", "status": 1, "status_humanized": "Queued", "is_complete": false, ...}}`
- `GET /api/v2/accounts/{account_id}/runs/{run_id}/` -> the run; status 1 Queued, 3 Running, 10 Success,
  20 Error, 30 Cancelled, with `is_complete`, `is_success`, `is_error`, `is_cancelled`, `status_message`
- `POST /api/v2/accounts/{account_id}/runs/{run_id}/cancel/` -> the run, cancelled
- `GET /api/v2/accounts/{account_id}/runs/{run_id}/artifacts/{path}` -> the artifact file, 404 if absent

Requests authenticate with `Authorization: Token <token>` (or `Bearer`). Configured by environment:
`FAKE_DBT_CLOUD_TOKEN`, `FAKE_DBT_CLOUD_ACCOUNT_ID`, `FAKE_DBT_CLOUD_JOB_ID`, `FAKE_DBT_CLOUD_WAREHOUSE_URL`,
`FAKE_DBT_CLOUD_PROJECT_DIR`, `FAKE_DBT_CLOUD_WORK_DIR`. Run it with uvicorn: `tests.fakes.dbt_cloud_api:app`.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from services.core.dbt import first_failure, run_dbt

_NAMES = {1: "Queued", 2: "Starting", 3: "Running", 10: "Success", 20: "Error", 30: "Cancelled"}

app = FastAPI(title="fake dbt Cloud Administrative API v2")
_runs: dict[int, dict[str, Any]] = {}
_processes: dict[int, subprocess.Popen[str]] = {}
_ids = itertools.count(70_000_001)
_lock = threading.Lock()


def _env(name: str) -> str:
    return os.environ[f"FAKE_DBT_CLOUD_{name}"]


def _envelope(data: Any, code: int = 200, message: str = "Success!") -> JSONResponse:
    status = {"code": code, "is_success": code < 400, "user_message": message, "developer_message": ""}
    return JSONResponse({"status": status, "data": data}, status_code=code)


def _authorized(request: Request, account_id: int) -> JSONResponse | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme not in {"Token", "Bearer"} or token != _env("TOKEN"):
        return _envelope(None, 401, "Invalid token.")
    if account_id != int(_env("ACCOUNT_ID")):
        return _envelope(None, 404, "Account not found.")
    return None


def _set(run_id: int, status: int, message: str | None = None) -> None:
    with _lock:
        run = _runs[run_id]
        if run.get("status") == 30:
            return  # a cancelled run stays cancelled
        run.update(
            status=status,
            status_humanized=_NAMES[status],
            is_complete=status in {10, 20, 30},
            is_success=status == 10,
            is_error=status == 20,
            is_cancelled=status == 30,
            status_message=message,
            updated_at=datetime.now(UTC).isoformat(),
        )
        if status in {10, 20, 30}:
            run["finished_at"] = run["updated_at"]


def _execute(run_id: int, step: str) -> None:
    args = shlex.split(step)
    if not args or args[0] != "dbt":
        _set(run_id, 20, f"not a dbt command: {step}")
        return
    _set(run_id, 3)
    target = Path(_env("WORK_DIR")) / str(run_id)

    def remember(process: subprocess.Popen[str]) -> None:
        _processes[run_id] = process

    invocation = run_dbt(
        args[1:],
        project_dir=Path(_env("PROJECT_DIR")),
        target_path=target,
        warehouse_url=_env("WAREHOUSE_URL"),
        on_start=remember,
    )
    if invocation.succeeded:
        _set(run_id, 10)
    else:
        _set(run_id, 20, first_failure(invocation))


@app.post("/api/v2/accounts/{account_id}/jobs/{job_id}/run/")
async def trigger(account_id: int, job_id: int, request: Request) -> JSONResponse:
    if (denied := _authorized(request, account_id)) is not None:
        return denied
    if job_id != int(_env("JOB_ID")):
        return _envelope(None, 404, "Job not found.")
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("cause"), str):
        return _envelope(None, 400, "cause is required.")
    steps = body.get("steps_override") or ["dbt build"]
    run_id = next(_ids)
    now = datetime.now(UTC).isoformat()
    with _lock:
        _runs[run_id] = {
            "id": run_id,
            "account_id": account_id,
            "job_definition_id": job_id,
            "trigger": {"cause": body["cause"], "steps_override": steps},
            "created_at": now,
            "finished_at": None,
        }
    _set(run_id, 1)
    threading.Thread(target=_execute, args=(run_id, steps[0]), daemon=True).start()
    return _envelope(_runs[run_id])


@app.get("/api/v2/accounts/{account_id}/runs/{run_id}/")
async def get_run(account_id: int, run_id: int, request: Request) -> JSONResponse:
    if (denied := _authorized(request, account_id)) is not None:
        return denied
    if run_id not in _runs:
        return _envelope(None, 404, "Run not found.")
    return _envelope(_runs[run_id])


@app.post("/api/v2/accounts/{account_id}/runs/{run_id}/cancel/")
async def cancel_run(account_id: int, run_id: int, request: Request) -> JSONResponse:
    if (denied := _authorized(request, account_id)) is not None:
        return denied
    if run_id not in _runs:
        return _envelope(None, 404, "Run not found.")
    process = _processes.get(run_id)
    if process is not None and process.poll() is None:
        process.terminate()
    _set(run_id, 30, "Cancelled by user")
    return _envelope(_runs[run_id])


@app.get("/api/v2/accounts/{account_id}/runs/{run_id}/artifacts/{path:path}", response_model=None)
async def artifact(account_id: int, run_id: int, path: str, request: Request) -> JSONResponse | FileResponse:
    if (denied := _authorized(request, account_id)) is not None:
        return denied
    file = Path(_env("WORK_DIR")) / str(run_id) / path
    if run_id not in _runs or ".." in Path(path).parts or not file.is_file():
        return _envelope(None, 404, f"Artifact {path} not found.")
    return FileResponse(file, media_type="application/json")


@app.get("/livez")
async def livez() -> dict[str, str]:
    """Not part of dbt Cloud's API: lets the test harness know the server is up."""
    return {"status": "alive"}
