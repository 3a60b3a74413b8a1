"""The `inprocess` runtime: dbt's programmatic `dbtRunner`, one call at a time.

dbt keeps global state (flags, adapters, the event manager) per process, so concurrent invocations are not
supported (docs.getdbt.com, "Programmatic invocations"): every call holds one process-wide lock, and the
environment a subprocess would get is set around it. dbt's events are written as JSON lines to the same log
files the `local` runtime writes. Cancelling takes effect before the call starts, not during it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from services.core.dbt import dbt_environment
from services.core.errors import DbtError
from services.planner.runtimes.base import DbtCall, DbtCommand, DbtOutcome, DbtRuntime
from services.planner.runtimes.local import log_file

_DBT_LOCK = threading.Lock()
_PROGRESS_EVENTS = frozenset({"LogModelResult", "LogTestResult", "LogSeedResult", "LogSnapshotResult"})


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    # Only called under _DBT_LOCK: the process environment is global.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class InProcessRuntime(DbtRuntime):
    """dbt inside the planner process, serialized."""

    name = "inprocess"
    supports_parallel = False

    def execute(self, command: DbtCommand, call: DbtCall) -> DbtOutcome:
        """Invoke `dbtRunner().invoke(...)` under the process-wide lock."""
        try:
            from dbt.cli.main import dbtRunner
            from dbt_common.events.base_types import EventMsg
            from dbt_common.events.functions import msg_to_json
        except ImportError as e:
            msg = f"dbt-core is not importable in the planner's environment: {e}"
            raise DbtError(msg) from e
        ctx = self.context
        call.target_path.mkdir(parents=True, exist_ok=True)
        env = dbt_environment(
            ctx.project_dir,
            call.target_path,
            ctx.warehouse_url,
            pepper=ctx.pepper,
            schema=ctx.schema,
            target=ctx.target,
            partial_parse=command != "compile",
        )
        with _DBT_LOCK:
            if call.cancel.is_set():
                return DbtOutcome(command, False, call.target_path, error="cancelled", cancelled=True)
            errors: list[str] = []
            with (call.target_path / log_file(command)).open("w") as log, _environment(env):

                def on_event(event: EventMsg) -> None:
                    log.write(msg_to_json(event) + "\n")
                    log.flush()
                    info = event.info
                    text = str(getattr(info, "msg", "") or "").strip()
                    if info.level == "error" and text:
                        errors.append(text)
                    if call.on_progress is not None and info.name in _PROGRESS_EVENTS and text:
                        call.on_progress(text)

                args = [*call.args(command), "--project-dir", str(ctx.project_dir)]
                args += ["--profiles-dir", str(ctx.project_dir), "--target-path", str(call.target_path)]
                result = dbtRunner(callbacks=[on_event]).invoke(args)
        if result.success:
            return DbtOutcome(command, True, call.target_path)
        return DbtOutcome(command, False, call.target_path, error=_failure(result, errors))

    def metadata(self) -> dict[str, Any]:
        """The runtime's name, parallelism and dbt-core's version."""
        from importlib.metadata import version

        return {**super().metadata(), "dbt_core": version("dbt-core")}


def _failure(result: Any, errors: list[str]) -> str:
    for node in getattr(result.result, "results", None) or []:
        status = str(getattr(node, "status", ""))
        if status in {"error", "fail", "runtime error"}:
            message = (getattr(node, "message", None) or status).strip().splitlines()
            return f"{node.node.unique_id}: {message[-1] if message else status}"
    if result.exception is not None:
        return str(result.exception).strip().splitlines()[0]
    return errors[0] if errors else "dbt reported a failure without a message"
