"""The `cloud` runtime: dbt Cloud's Administrative API v2 runs the command as a job run.

A command triggers the configured job with the command as its only step
(`POST /api/v2/accounts/{account_id}/jobs/{job_id}/run/` with `cause` and `steps_override`), polls the run
(`GET /api/v2/accounts/{account_id}/runs/{run_id}/`) until `is_complete`, and downloads `manifest.json` and
`run_results.json` (`GET .../runs/{run_id}/artifacts/{path}`) into the run's target directory. Cancelling a
call cancels the job run (`POST .../runs/{run_id}/cancel/`). The job's environment, not the planner, decides
the warehouse dbt Cloud connects to. Configuration (environment):

- `CDME_DBT_CLOUD_URL` (default `https://cloud.getdbt.com`), `CDME_DBT_CLOUD_ACCOUNT_ID`,
  `CDME_DBT_CLOUD_JOB_ID`, `CDME_DBT_CLOUD_TOKEN` (a service token), `CDME_DBT_CLOUD_POLL_S` (default 5),
  `CDME_DBT_CLOUD_TIMEOUT_S` (default 3600).

The job run's status transitions are written to the run's JSON log as `CloudRunStatus` events.
"""

from __future__ import annotations

import json
import shlex
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.errors import ConfigurationError, DbtError, UpstreamServiceError
from services.core.http import ServiceClient
from services.planner.runtimes.base import DbtCall, DbtCommand, DbtOutcome, DbtRuntime, RuntimeContext
from services.planner.runtimes.local import log_file

# dbt Cloud's run status codes (Administrative API v2, "Get run").
_STATUS_NAMES = {1: "Queued", 2: "Starting", 3: "Running", 10: "Success", 20: "Error", 30: "Cancelled"}
_SUCCESS, _ERROR, _CANCELLED = 10, 20, 30
_ARTIFACTS = ("manifest.json", "run_results.json")


class DbtCloudSettings(BaseSettings):
    """Where the dbt Cloud job lives and how to reach it."""

    model_config = SettingsConfigDict(env_prefix="CDME_DBT_CLOUD_", extra="ignore", frozen=True)

    url: str = "https://cloud.getdbt.com"
    account_id: int | None = None
    job_id: int | None = None
    token: SecretStr | None = None
    poll_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=3600.0, gt=0)


class CloudRuntime(DbtRuntime):
    """dbt commands as dbt Cloud job runs."""

    name = "cloud"
    supports_parallel = True

    def __init__(self, context: RuntimeContext, settings: DbtCloudSettings | None = None) -> None:
        super().__init__(context)
        self.settings = settings or DbtCloudSettings()

    def _client(self) -> tuple[ServiceClient, str]:
        s = self.settings
        if s.account_id is None or s.job_id is None or s.token is None:
            msg = (
                "the cloud runtime needs CDME_DBT_CLOUD_ACCOUNT_ID, CDME_DBT_CLOUD_JOB_ID and "
                "CDME_DBT_CLOUD_TOKEN"
            )
            raise ConfigurationError(msg)
        client = ServiceClient(s.url.rstrip("/"), token=s.token.get_secret_value(), timeout=60, retries=3)
        return client, f"/api/v2/accounts/{s.account_id}"

    def execute(self, command: DbtCommand, call: DbtCall) -> DbtOutcome:
        """Trigger the job with `dbt <command> ...` as its step, wait for it and download its artifacts."""
        call.target_path.mkdir(parents=True, exist_ok=True)
        client, account = self._client()
        step = shlex.join(["dbt", *call.args(command)])
        with client, (call.target_path / log_file(command)).open("w") as log:
            try:
                triggered = client.post(
                    f"{account}/jobs/{self.settings.job_id}/run/",
                    json={"cause": f"CDME run {call.target_path.name}", "steps_override": [step]},
                ).json()
                cloud_run = int(_data(triggered)["id"])
                _log(log, "info", f"dbt Cloud run {cloud_run} triggered: {step}")
                final = self._wait(client, account, cloud_run, call, log)
                for name in _ARTIFACTS:
                    self._download(client, f"{account}/runs/{cloud_run}/artifacts/{name}", call, name)
            except UpstreamServiceError as e:
                msg = f"dbt Cloud: {e}"
                raise DbtError(msg) from e
        status = int(final.get("status", 0))
        if status == _SUCCESS:
            return DbtOutcome(command, True, call.target_path)
        if status == _CANCELLED:
            return DbtOutcome(
                command, False, call.target_path, error="cancelled", cancelled=call.cancel.is_set()
            )
        message = (
            final.get("status_message") or f"dbt Cloud run {cloud_run} ended {final.get('status_humanized')}"
        )
        return DbtOutcome(command, False, call.target_path, error=str(message).strip().splitlines()[0])

    def _wait(
        self, client: ServiceClient, account: str, cloud_run: int, call: DbtCall, log: TextIO
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self.settings.timeout_s
        seen: int | None = None
        cancelled = False
        while True:
            data = _data(client.get(f"{account}/runs/{cloud_run}/").json())
            status = int(data.get("status", 0))
            if status != seen:
                seen = status
                name = data.get("status_humanized") or _STATUS_NAMES.get(status, str(status))
                _log(log, "error" if status == _ERROR else "info", f"dbt Cloud run {cloud_run}: {name}")
                if call.on_progress is not None:
                    call.on_progress(f"dbt Cloud run {cloud_run}: {name}")
            if data.get("is_complete") or status in {_SUCCESS, _ERROR, _CANCELLED}:
                return data
            if call.cancel.is_set() and not cancelled:
                client.post(f"{account}/runs/{cloud_run}/cancel/", idempotent=True)
                cancelled = True
            if time.monotonic() > deadline:
                msg = f"dbt Cloud run {cloud_run} did not complete within {self.settings.timeout_s:.0f}s"
                raise DbtError(msg)
            time.sleep(self.settings.poll_s)

    def _download(self, client: ServiceClient, path: str, call: DbtCall, name: str) -> None:
        try:
            response = client.get(path)
        except UpstreamServiceError as e:
            # A run that failed early has no run_results.json; the planner reports what is missing.
            if getattr(e, "status", None) == 404:
                return
            raise
        (call.target_path / name).write_bytes(response.content)

    def metadata(self) -> dict[str, Any]:
        """The runtime's name, parallelism, and the account and job it triggers."""
        return {
            **super().metadata(),
            "url": self.settings.url,
            "account_id": self.settings.account_id,
            "job_id": self.settings.job_id,
        }


def _data(body: Any) -> dict[str, Any]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        msg = "dbt Cloud answered without a `data` object"
        raise DbtError(msg)
    return data


def _log(log: TextIO, level: str, message: str) -> None:
    # The same envelope as dbt's own JSON log lines, so one reader serves every runtime.
    event = {
        "info": {
            "name": "CloudRunStatus",
            "level": level,
            "msg": message,
            "ts": datetime.now(UTC).isoformat(),
        }
    }
    log.write(json.dumps(event) + "\n")
    log.flush()
