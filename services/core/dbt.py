"""Run dbt as a subprocess with an explicit environment and read what it wrote.

Each invocation gets its own target directory, JSON logs (kept in `dbt.log.jsonl` beside the artifacts), no
anonymous usage stats, and the connection and pepper of the warehouse it runs against. dbt's own flags
(`--select`, `--exclude`, `--selector`, `--vars`, `--target`) pass through unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.artifacts import Manifest, RunResults, load_manifest, load_run_results
from services.core.errors import DbtError
from services.core.settings import CdmeSettings
from services.core.warehouse import dbt_connection_env

# Parsing and compiling without the relation cache open no connection, but dbt's profile still needs a URL.
PARSE_ONLY_URL = "postgresql://postgres@127.0.0.1:5432/cdme"

# dbt event names whose human message is worth echoing as progress.
_PROGRESS_EVENTS = frozenset(
    {"LogModelResult", "LogTestResult", "LogSeedResult", "LogSnapshotResult", "EndOfRunSummary"}
)


@dataclass(frozen=True)
class DbtInvocation:
    """The outcome of one dbt command."""

    args: tuple[str, ...]
    returncode: int
    target_path: Path
    errors: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        """Dbt exited 0."""
        return self.returncode == 0

    def manifest(self) -> Manifest:
        """The manifest this invocation wrote."""
        return load_manifest(self.target_path / "manifest.json")

    def run_results(self) -> RunResults | None:
        """The run results, or None when dbt stopped before writing them."""
        path = self.target_path / "run_results.json"
        return load_run_results(path) if path.exists() else None


def dbt_executable() -> str:
    """The `dbt` of this environment (beside the running interpreter), else the one on PATH.

    Raises:
        DbtError: dbt is not installed.
    """
    beside = Path(sys.executable).with_name("dbt")
    if beside.exists():
        return str(beside)
    found = shutil.which("dbt")
    if found is None:
        msg = "dbt is not installed in this environment; run ./run_cdme.sh to bootstrap it"
        raise DbtError(msg)
    return found


def dbt_environment(
    project_dir: Path,
    target_path: Path,
    warehouse_url: str,
    *,
    pepper: str | None,
    schema: str,
    target: str,
    partial_parse: bool = False,
) -> dict[str, str]:
    """The complete environment of a dbt subprocess (style: explicit, never inherited by accident)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DBT_", "CDME_"))}
    env.update(dbt_connection_env(warehouse_url))
    env.update(
        {
            "DBT_PROJECT_DIR": str(project_dir),
            "DBT_PROFILES_DIR": str(project_dir),
            "DBT_TARGET_PATH": str(target_path),
            "DBT_LOG_PATH": str(target_path),
            "DBT_LOG_FORMAT": "json",
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            # Off by default so that every invocation reads the project as it is now; a build that follows
            # its own parse in the same target directory turns it on to reuse that parse.
            "DBT_PARTIAL_PARSE": "true" if partial_parse else "false",
            "DBT_USE_COLORS": "false",
            "DBT_SCHEMA": schema,
            "DBT_TARGET": target,
        }
    )
    if pepper is not None:
        # A session setting, not a dbt var: vars end up in the manifest and compiled SQL, settings do not.
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} -c cdme.pepper={pepper}".strip()
    return env


def run_dbt(
    command: Sequence[str],
    *,
    project_dir: Path,
    target_path: Path,
    warehouse_url: str,
    pepper: str | None = None,
    schema: str = "analytics",
    target: str = "dev",
    partial_parse: bool = False,
    on_progress: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
    log_name: str = "dbt.log.jsonl",
) -> DbtInvocation:
    """Run `dbt <command>` and wait for it.

    Args:
        command: The dbt command and its flags, e.g. `["build", "--vars", "{epoch_date: 2026-11-20}"]`.
        project_dir: The dbt project (its `profiles.yml` lives there too).
        target_path: Where this invocation writes artifacts and its JSON log; created if missing.
        warehouse_url: The warehouse to connect to.
        pepper: The pseudonymization pepper, passed as a session setting.
        schema: The target schema (`DBT_SCHEMA`).
        target: The profile target (`DBT_TARGET`).
        partial_parse: Reuse a parse left in `target_path` by an earlier invocation with the same inputs.
        on_progress: Called with dbt's message for each node result and the run summary.
        on_start: Called with the dbt process once it started (a caller may terminate it to cancel).
        log_name: The file in `target_path` that receives dbt's JSON log lines.

    Returns:
        The invocation; it did not necessarily succeed: check `succeeded` and `errors`.

    Raises:
        DbtError: dbt could not be started at all.
    """
    target_path.mkdir(parents=True, exist_ok=True)
    env = dbt_environment(
        project_dir,
        target_path,
        warehouse_url,
        pepper=pepper,
        schema=schema,
        target=target,
        partial_parse=partial_parse,
    )
    args = (dbt_executable(), *command)
    errors: list[str] = []
    try:
        proc = subprocess.Popen(
            args, env=env, cwd=project_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    except OSError as e:
        msg = f"cannot start dbt: {e}"
        raise DbtError(msg) from e
    assert proc.stdout is not None
    if on_start is not None:
        on_start(proc)
    with (target_path / log_name).open("w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()  # readers tail the log while dbt runs
            event = _parse_event(line)
            if event is None:
                if line.strip():
                    errors.append(line.strip())  # not JSON: dbt failed before its logger started
                continue
            info = event.get("info", {})
            if info.get("level") == "error" and info.get("msg"):
                errors.append(str(info["msg"]).strip())
            if on_progress is not None and info.get("name") in _PROGRESS_EVENTS and info.get("msg"):
                on_progress(str(info["msg"]).strip())
    returncode = proc.wait()
    return DbtInvocation(args=tuple(command), returncode=returncode, target_path=target_path, errors=errors)


def _parse_event(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def first_failure(invocation: DbtInvocation) -> str:
    """One line naming what failed: the first failing node and its message, else dbt's first error."""
    results = invocation.run_results()
    if results is not None:
        for result in results.results:
            if result.status in {"error", "fail", "runtime error"}:
                return f"{result.unique_id}: {_one_line(result.message or result.status)}"
    for error in invocation.errors:
        if text := _one_line(error):
            return text
    return f"dbt exited with code {invocation.returncode}"


# Lines dbt puts above the actual message, which say nothing on their own.
_BARE_HEADERS = frozenset(
    {"Encountered an error:", "Runtime Error", "Compilation Error", "Database Error", "Parsing Error"}
)


def _one_line(message: str) -> str:
    # dbt writes "Database Error in model x (path)" and the database's own words on the next line.
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    while len(lines) > 1 and lines[0] in _BARE_HEADERS:
        lines = lines[1:]
    if not lines:
        return ""
    if len(lines) > 1 and lines[0].endswith(")") and " Error in " in lines[0]:
        return f"{lines[0]}: {lines[1]}"
    return lines[0]


def parse_project(
    settings: CdmeSettings,
    target_path: Path,
    *,
    project_dir: Path | None = None,
    warehouse_url: str | None = None,
    dbt_vars: str | None = None,
    compile_sql: bool = False,
) -> Manifest:
    """`dbt parse` (or `dbt compile --no-populate-cache`) of a project, without touching the warehouse.

    Args:
        settings: Target, schema and (default) project of the invocation.
        target_path: Where dbt writes `manifest.json`; a partial parse left there is reused.
        project_dir: The project (default: `settings.project_dir`).
        warehouse_url: The URL put in the profile (default: the settings', else a placeholder).
        dbt_vars: dbt `--vars`, as YAML or JSON text.
        compile_sql: Compile every model's SQL too (validation needs it; the LDM does not).

    Returns:
        The manifest dbt wrote (`target_path / "manifest.json"`).

    Raises:
        DbtError: dbt failed; the message is its first error.
    """
    command = ["compile", "--no-populate-cache"] if compile_sql else ["parse"]
    if dbt_vars:
        command += ["--vars", dbt_vars]
    invocation = run_dbt(
        command,
        project_dir=project_dir or settings.project_dir,
        target_path=target_path,
        warehouse_url=warehouse_url or settings.warehouse_url or PARSE_ONLY_URL,
        schema=settings.dbt_schema,
        target=settings.dbt_target,
        partial_parse=True,
    )
    if not invocation.succeeded:
        msg = f"dbt {command[0]} failed: {first_failure(invocation)}"
        raise DbtError(msg)
    return invocation.manifest()
