"""The `local` runtime (the default): the dbt CLI as a subprocess, via `services.core.dbt.run_dbt`.

Each command runs with an explicit environment (JSON logs, usage stats off, the run's own target directory);
`compile` logs to `compile.log.jsonl`, every other command to `dbt.log.jsonl`, both beside the artifacts. A
build that follows the run's compile in the same directory reuses its parse. Separate runs are separate
processes, so they may overlap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil

from services.core.dbt import dbt_executable, first_failure, run_dbt
from services.planner.runtimes.base import DbtCall, DbtCommand, DbtOutcome, DbtRuntime

logger = logging.getLogger("cdme.planner")

# How often the cancel watcher looks at the process when nobody cancels.
_WATCH_INTERVAL_S = 0.2


def log_file(command: DbtCommand) -> str:
    """The JSON log file a command writes in its target directory."""
    return "compile.log.jsonl" if command == "compile" else "dbt.log.jsonl"


def stop_leftovers(target_path: Path, timeout: float = 15) -> list[int]:
    """Terminate dbt processes still writing into `target_path` (left by a planner that was killed).

    A planner killed with SIGKILL cannot stop the dbt it started; before the resumed run starts dbt again in
    the same directory, the orphan is found by the `DBT_TARGET_PATH` its environment names, and stopped.
    """
    wanted = str(target_path)
    found: list[psutil.Process] = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.pid != os.getpid() and process.environ().get("DBT_TARGET_PATH") == wanted:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for process in found:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(found, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [p.pid for p in found]


class LocalRuntime(DbtRuntime):
    """dbt as a subprocess of the planner."""

    name = "local"
    supports_parallel = True

    def execute(self, command: DbtCommand, call: DbtCall) -> DbtOutcome:
        """Run `dbt <command>` for the call, terminating it if the call is cancelled."""
        ctx = self.context
        if stopped := stop_leftovers(call.target_path):
            logger.warning("stopped dbt left running in %s", call.target_path, extra={"pids": stopped})
        watchers: list[threading.Thread] = []

        def watch(proc: subprocess.Popen[str]) -> None:
            def stop_on_cancel() -> None:
                while proc.poll() is None:
                    if call.cancel.wait(_WATCH_INTERVAL_S):
                        proc.terminate()
                        return

            watcher = threading.Thread(target=stop_on_cancel, name="dbt-cancel-watch", daemon=True)
            watcher.start()
            watchers.append(watcher)

        invocation = run_dbt(
            call.args(command),
            project_dir=ctx.project_dir,
            target_path=call.target_path,
            warehouse_url=ctx.warehouse_url,
            pepper=ctx.pepper,
            schema=ctx.schema,
            target=ctx.target,
            # The run's compile parsed the same project with the same vars in this directory.
            partial_parse=command != "compile",
            on_progress=call.on_progress,
            on_start=watch,
            log_name=log_file(command),
        )
        for watcher in watchers:
            watcher.join()
        if call.cancel.is_set() and not invocation.succeeded:
            return DbtOutcome(command, False, call.target_path, error="cancelled", cancelled=True)
        return DbtOutcome(
            command,
            invocation.succeeded,
            call.target_path,
            error=None if invocation.succeeded else first_failure(invocation),
        )

    def metadata(self) -> dict[str, Any]:
        """The runtime's name, parallelism and the dbt executable it runs."""
        return {**super().metadata(), "executable": dbt_executable()}
