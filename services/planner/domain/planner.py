"""The planner: starts runs, drives each through its steps in a worker thread, resumes and cancels them.

Steps run in order (`ingest? -> validate -> dbt -> capture -> finalize`); each transition is committed before
the next begins, and a step that succeeded is never repeated, so a planner killed at any moment and started
again continues where the database says it stopped. Every step is keyed by the run id: the dbt step writes to
`<runs_dir>/<run_id>/`, capture and finalize are idempotent calls of the peer services under that id.

One run at a time per (project, target, epoch): the worker holds a session-level PostgreSQL advisory lock on
that key for the whole run, on a connection of its own, so a second planner process cannot start or resume
the same key, and a planner that dies releases the lock with its connection. A partial unique index on the
active runs is the database's half of the same rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine

from services.core.artifacts import load_manifest
from services.core.errors import (
    CdmeError,
    ConfigurationError,
    UpstreamServiceError,
    UsageError,
    WarehouseError,
    first_line,
)
from services.core.http import UpstreamHttpError
from services.core.ldm import load_project_config
from services.core.logs import log_context
from services.core.secrets import resolve_pepper
from services.core.settings import CdmeSettings
from services.core.warehouse import libpq_url, resolve_warehouse_url
from services.planner.domain.errors import RunConflictError, RunNotFoundError, StepFailedError
from services.planner.domain.ids import uuid7
from services.planner.domain.ingest import ingest
from services.planner.domain.model import DONE_STEPS, STEPS, TERMINAL, Run, RunRequest, StepName, StepStatus
from services.planner.domain.peers import Peers
from services.planner.domain.store import RunStore
from services.planner.runtimes import DbtCall, DbtOutcome, DbtRuntime, RuntimeContext, load_runtime

logger = logging.getLogger("cdme.planner")

# How often a worker looks for a cancel flagged by another planner replica.
_CANCEL_POLL_S = 1.0
# Pause between attempts of an idempotent peer call while the peer is down.
_PEER_RETRY_S = 1.0
# How many findings of a validation report a step keeps (the report itself stays with the validation service).
_FINDINGS_KEPT = 20
# How many SQL lint findings the validate step's output keeps; `lint.jsonl` in the run directory has them all.
_LINT_KEPT = 50
LINT_LOG = "lint.jsonl"


@dataclass(frozen=True)
class PlannerConfig:
    """What the planner runs against: the project, where artifacts go, the warehouse and the peers."""

    project_dir: Path
    runs_dir: Path
    warehouse_url: str
    pepper: str | None
    schema: str
    peers: Peers
    landing_dir: Path
    default_lineage_mode: str | None = None
    # How long capture and finalize wait for a peer that is down or answering 5xx before the step fails.
    peer_wait_s: float = 120.0
    # Lint the compiled SQL with sqlfluff after the validate step's compile (advisory; costs about 0.14 s a model).
    lint: bool = False

    @property
    def project_name(self) -> str:
        """The dbt project's name (`name` in dbt_project.yml)."""
        data = yaml.safe_load((self.project_dir / "dbt_project.yml").read_text())
        return str(data["name"])


class PlannerSettings(BaseSettings):
    """The planner's own settings (`CDME_PLANNER_` prefix), beside the shared `CdmeSettings`."""

    model_config = SettingsConfigDict(env_prefix="CDME_PLANNER_", extra="ignore", frozen=True)

    peer_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="How long capture and finalize wait for a peer that is down (seconds).",
    )
    peer_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Read timeout of one call to a peer: capturing a large epoch takes minutes.",
    )
    lint: bool = Field(
        default=False,
        description="Lint each run's compiled SQL with sqlfluff (advisory; off by default: about 0.14 s a model).",
    )


@dataclass(frozen=True)
class StepResult:
    """What a step produced: its output, a failure reason, and whether the run stops after it."""

    output: dict[str, Any]
    failure: str | None = None
    stop: bool = False


class _Shutdown(Exception):
    """The planner is stopping: leave the step as it is, to be resumed by the next start."""


@dataclass
class _Worker:
    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)


def lock_key(project: str, target: str, epoch: date) -> int:
    """The advisory lock key of (project, target, epoch): 64 bits of a hash, in a CDME-specific namespace."""
    digest = hashlib.sha256(f"cdme.planner.run\0{project}\0{target}\0{epoch.isoformat()}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RunLock:
    """A session-level advisory lock on a run's key, on a connection of its own (released by `release`)."""

    def __init__(self, warehouse_url: str, key: int) -> None:
        self._url = libpq_url(warehouse_url)
        self._key = key
        self._conn: psycopg.Connection[Any] | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another session holds it.

        Raises:
            WarehouseError: The database cannot be reached.
        """
        try:
            conn = psycopg.connect(
                self._url, autocommit=True, connect_timeout=10, application_name="cdme-planner"
            )
            row = conn.execute("select pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        except psycopg.Error as e:
            msg = f"cannot take the run lock: {first_line(e)}"
            raise WarehouseError(msg) from e
        if row is None or not row[0]:
            conn.close()
            return False
        self._conn = conn
        return True

    def release(self) -> None:
        """Release the lock by closing its session (which also releases it if the unlock itself fails)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Planner:
    """Starts, resumes, cancels and executes runs; one instance per planner process."""

    def __init__(
        self,
        store: RunStore,
        config: PlannerConfig,
        *,
        runtime_factory: Callable[[str, RuntimeContext], DbtRuntime] = load_runtime,
    ) -> None:
        self.store = store
        self.config = config
        self._runtime_factory = runtime_factory
        self._runtimes: dict[tuple[str, str], DbtRuntime] = {}
        self._workers: dict[uuid.UUID, _Worker] = {}
        self._lock = threading.Lock()
        self._shutdown = threading.Event()

    # -- commands ---------------------------------------------------------------------------------------------

    def submit(self, principal: str, request: RunRequest) -> Run:
        """Store a new run and start executing it in a worker thread.

        Raises:
            UsageError: The request names another project or an unknown runtime, or bad selection flags.
            RunConflictError: A run of the same (project, target, epoch) is active (409, with its id).
        """
        if request.project != self.config.project_name:
            msg = f"this planner runs project {self.config.project_name!r}, not {request.project!r}"
            raise UsageError(msg)
        try:
            request.selection_args()
        except ValueError as e:
            raise UsageError(str(e)) from e
        self._runtime(request.runtime, request.target)
        lock = RunLock(self.config.warehouse_url, lock_key(request.project, request.target, request.epoch))
        if not lock.try_acquire():
            active = self.store.active_run(request.project, request.target, request.epoch)
            msg = (
                f"run {active or '(starting in another planner)'} of project {request.project}, target "
                f"{request.target}, epoch {request.epoch} is active; wait for it, resume it or cancel it"
            )
            raise RunConflictError(msg, active)
        run_id = uuid7()
        try:
            self.store.create(run_id, principal, request)
        except BaseException:
            lock.release()
            raise
        self._start(run_id, lock)
        return self.get(run_id)

    def resume(self, run_id: uuid.UUID) -> Run:
        """Continue a run that failed, was cancelled or was interrupted, from its first unfinished step.

        Raises:
            RunNotFoundError: No such run.
            RunConflictError: It is complete, executing, or another run of its key is active.
        """
        run = self.get(run_id)
        if run.status == "COMPLETE":
            msg = f"run {run_id} is already COMPLETE"
            raise RunConflictError(msg)
        with self._lock:
            if self._alive(run_id):
                msg = f"run {run_id} is executing in this planner"
                raise RunConflictError(msg, run_id)
        lock = RunLock(self.config.warehouse_url, lock_key(*run.key))
        if not lock.try_acquire():
            active = self.store.active_run(*run.key)
            msg = f"run {active or run_id} holds the lock of project {run.request.project}, epoch {run.request.epoch}"
            raise RunConflictError(msg, active)
        try:
            self.store.set_status(run_id, "PENDING")
            self.store.reopen_steps(run_id)
        except BaseException:
            lock.release()
            raise
        self._start(run_id, lock)
        return self.get(run_id)

    def cancel(self, run_id: uuid.UUID) -> Run:
        """Cancel an active run: its worker stops dbt and the remaining steps; an orphaned run ends at once.

        Raises:
            RunNotFoundError: No such run.
            RunConflictError: The run has already ended.
        """
        run = self.get(run_id)
        if run.status in TERMINAL:
            msg = f"run {run_id} has already ended {run.status}"
            raise RunConflictError(msg)
        self.store.request_cancel(run_id)
        with self._lock:
            worker = self._workers.get(run_id)
            if worker is not None and worker.thread.is_alive():
                worker.cancel.set()
                return self.get(run_id)
        # Nobody in this process executes it: cancel it here unless another planner holds its lock.
        lock = RunLock(self.config.warehouse_url, lock_key(*run.key))
        if lock.try_acquire():
            try:
                self._cancel_steps(self.get(run_id))
                self.store.set_status(run_id, "CANCELLED", reason="cancelled on request")
            finally:
                lock.release()
        return self.get(run_id)

    def get(self, run_id: uuid.UUID) -> Run:
        """The run as stored.

        Raises:
            RunNotFoundError: No such run.
        """
        run = self.store.get(run_id)
        if run is None:
            msg = f"no run has id {run_id}"
            raise RunNotFoundError(msg)
        return run

    def resume_unfinished(self) -> list[uuid.UUID]:
        """Resume every `PENDING`/`RUNNING` run whose lock is free (what a starting planner does)."""
        resumed: list[uuid.UUID] = []
        for run_id in self.store.unfinished():
            run = self.store.get(run_id)
            if run is None:
                continue
            with self._lock:
                if self._alive(run_id):
                    continue
            lock = RunLock(self.config.warehouse_url, lock_key(*run.key))
            if not lock.try_acquire():
                continue  # another planner process executes it
            self.store.reopen_steps(run_id)
            self._start(run_id, lock)
            resumed.append(run_id)
        if resumed:
            logger.info("resumed unfinished runs", extra={"runs": [str(r) for r in resumed]})
        return resumed

    def wait(self, run_id: uuid.UUID, timeout: float | None = None) -> Run:
        """Block until this process's worker of the run has stopped, then return the run."""
        with self._lock:
            worker = self._workers.get(run_id)
        if worker is not None:
            worker.thread.join(timeout)
        return self.get(run_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the workers at their next step boundary (or stop dbt), leaving their runs resumable."""
        self._shutdown.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.cancel.set()
        for worker in workers:
            worker.thread.join(timeout)

    def executing(self) -> list[uuid.UUID]:
        """Runs with a live worker in this process."""
        with self._lock:
            return [run_id for run_id in self._workers if self._alive(run_id)]

    # -- execution --------------------------------------------------------------------------------------------

    def _alive(self, run_id: uuid.UUID) -> bool:
        worker = self._workers.get(run_id)
        return worker is not None and worker.thread.is_alive()

    def _runtime(self, name: str, target: str) -> DbtRuntime:
        with self._lock:
            if (name, target) not in self._runtimes:
                context = RuntimeContext(
                    project_dir=self.config.project_dir,
                    warehouse_url=self.config.warehouse_url,
                    pepper=self.config.pepper,
                    schema=self.config.schema,
                    target=target,
                )
                self._runtimes[name, target] = self._runtime_factory(name, context)
            return self._runtimes[name, target]

    def _start(self, run_id: uuid.UUID, lock: RunLock) -> None:
        with self._lock:
            thread = threading.Thread(
                target=self._execute, args=(run_id, lock), name=f"run-{run_id}", daemon=True
            )
            self._workers[run_id] = _Worker(thread)
        thread.start()

    def _execute(self, run_id: uuid.UUID, lock: RunLock) -> None:
        done = threading.Event()
        with self._lock:
            cancel = self._workers[run_id].cancel
        threading.Thread(
            target=self._watch_cancel, args=(run_id, cancel, done), name=f"cancel-{run_id}", daemon=True
        ).start()
        with log_context(run_id=str(run_id)):
            try:
                self._drive(run_id)
            except _Shutdown:
                logger.info("planner stopping; the run resumes at the next start")
            except Exception:
                # A failure of the planner's own database: the run stays as stored and is resumed later.
                logger.exception("run interrupted")
            finally:
                done.set()
                lock.release()

    def _watch_cancel(self, run_id: uuid.UUID, cancel: threading.Event, done: threading.Event) -> None:
        # A cancel may arrive at another planner replica, which can only flag the run: this one stops dbt.
        while not done.wait(_CANCEL_POLL_S):
            try:
                if self.store.cancel_requested(run_id):
                    cancel.set()
                    return
            except CdmeError:
                continue  # the database is briefly unreachable: the worker notices too

    def _drive(self, run_id: uuid.UUID) -> None:
        with self._lock:
            cancel = self._workers[run_id].cancel
        run = self.get(run_id)
        self.store.set_status(run_id, "RUNNING")
        run_dir = self.config.runs_dir / str(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        dbt_failure: str | None = None
        for name in STEPS:
            run = self.get(run_id)
            if run.step(name).status in DONE_STEPS:
                continue
            if self._shutdown.is_set():
                raise _Shutdown
            if cancel.is_set() or self.store.cancel_requested(run_id):
                self._cancel_steps(run)
                self.store.set_status(run_id, "CANCELLED", reason="cancelled on request", failed_step=name)
                logger.info("run cancelled", extra={"step": name})
                return
            if not self._applies(name, run, dbt_failure):
                self.store.finish_step(run_id, name, "skipped")
                continue
            attempt = self.store.start_step(run_id, name)
            logger.info("step started", extra={"step": name, "attempt": attempt})
            try:
                result = self._step(name, run, run_dir, cancel, dbt_failure)
            except _Shutdown:
                raise
            except CdmeError as e:
                result = StepResult(output={}, failure=str(e))
            except Exception as e:
                if self._shutdown.is_set():
                    raise _Shutdown from e
                logger.exception("step %s crashed", name)
                result = StepResult(output={}, failure=f"internal error: {type(e).__name__}: {e}")
            if self._shutdown.is_set() and result.failure is not None:
                raise _Shutdown  # the failure is the shutdown stopping dbt; the step is retried on restart
            if result.failure is not None and cancel.is_set():
                self._cancel_steps(self.get(run_id))
                self.store.set_status(run_id, "CANCELLED", reason="cancelled on request", failed_step=name)
                return
            status: StepStatus = "failed" if result.failure is not None else "succeeded"
            self.store.finish_step(run_id, name, status, output=result.output, error=result.failure)
            logger.info("step ended", extra={"step": name, "status": status, "reason": result.failure})
            if result.failure is not None and name == "dbt":
                # The lineage service still records the failed run and emits its FAIL events.
                dbt_failure = result.failure
                continue
            if result.failure is not None:
                self._skip_rest(run_id, name)
                self.store.set_status(run_id, "FAILED", reason=f"{name}: {result.failure}", failed_step=name)
                return
            if result.stop:
                self._skip_rest(run_id, name)
                break
        if dbt_failure is not None:
            self.store.set_status(run_id, "FAILED", reason=f"dbt: {dbt_failure}", failed_step="dbt")
            return
        self.store.set_status(run_id, "COMPLETE")
        logger.info("run complete")

    @staticmethod
    def _applies(name: StepName, run: Run, dbt_failure: str | None) -> bool:
        request = run.request
        if name == "ingest":
            return request.ingest and not request.dry_run
        if name == "validate":
            return True
        if name == "capture":
            return not request.dry_run and dbt_failure is None
        return not request.dry_run

    def _skip_rest(self, run_id: uuid.UUID, after: StepName) -> None:
        for later in STEPS[STEPS.index(after) + 1 :]:
            self.store.finish_step(run_id, later, "skipped")

    def _cancel_steps(self, run: Run) -> None:
        for step in run.steps:
            if step.status not in DONE_STEPS and step.status != "failed":
                self.store.finish_step(run.id, step.name, "cancelled", error="cancelled on request")

    def _step(
        self, name: StepName, run: Run, run_dir: Path, cancel: threading.Event, dbt_failure: str | None
    ) -> StepResult:
        if name == "ingest":
            return self._ingest(run, run_dir, cancel)
        if name == "validate":
            return self._validate(run, run_dir, cancel)
        if name == "dbt":
            return self._dbt(run, run_dir, cancel)
        if name == "capture":
            return self._capture(run, run_dir, cancel)
        return self._finalize(run, run_dir, dbt_failure, cancel)

    def _call(self, run: Run, run_dir: Path, cancel: threading.Event) -> DbtCall:
        return DbtCall(
            target_path=run_dir,
            vars=run.request.dbt_vars(),
            selection=run.request.selection_args(),
            cancel=cancel,
            on_progress=lambda line: logger.info("dbt: %s", line),
        )

    def _ingest(self, run: Run, run_dir: Path, cancel: threading.Event) -> StepResult:
        # The sources' declarations come from the project as dbt parses it for this run.
        compiled = self._runtime(run.request.runtime, run.request.target).compile(
            self._call(run, run_dir, cancel)
        )
        if not compiled.succeeded:
            return StepResult(output={}, failure=f"dbt compile failed: {compiled.error}")
        manifest = load_manifest(compiled.manifest_path)
        output = ingest(
            manifest, self.config.landing_dir, self.config.warehouse_url, run.id, run.request.epoch
        )
        return StepResult(output=output)

    def _validate(self, run: Run, run_dir: Path, cancel: threading.Event) -> StepResult:
        runtime = self._runtime(run.request.runtime, run.request.target)
        compiled = runtime.compile(self._call(run, run_dir, cancel))
        if not compiled.succeeded:
            return StepResult(output={}, failure=f"dbt compile failed: {compiled.error}")
        manifest = json.loads(compiled.manifest_path.read_text())
        config_path = self.config.project_dir / "cdme.yml"
        body: dict[str, Any] = {"manifest": manifest}
        if config_path.is_file():
            body["config"] = yaml.safe_load(config_path.read_text())
        answer = self.config.peers.validate(body, dry_run=run.request.dry_run)
        findings = answer.get("findings") or []
        errors = [f for f in findings if f.get("severity") == "error"]
        output: dict[str, Any] = {
            "report_id": answer.get("id"),
            "status": answer.get("status"),
            "summary": answer.get("summary"),
            "findings": (errors + [f for f in findings if f.get("severity") != "error"])[:_FINDINGS_KEPT],
        }
        if run.request.dry_run:
            output["costs"] = answer.get("costs") or []
        if self.config.lint:
            output["lint"] = self._lint(runtime, compiled, run_dir)
        rejected = answer.get("status") == "rejected"
        if rejected and run.request.validation == "gating":
            return StepResult(output=output, failure=_rejection(answer, errors))
        return StepResult(output=output, stop=run.request.dry_run)

    @staticmethod
    def _lint(runtime: DbtRuntime, compiled: DbtOutcome, run_dir: Path) -> dict[str, Any]:
        """Lint the compiled SQL (advisory): findings go to the step's output and to `lint.jsonl`, never fail."""
        report = runtime.lint(compiled)
        lines = [json.dumps(asdict(f), sort_keys=True) for f in report.findings]
        (run_dir / LINT_LOG).write_text("".join(f"{line}\n" for line in lines))
        if not report.available:
            logger.info("sql lint unavailable: %s", report.reason)
        else:
            logger.info(
                "sql lint: %d findings in %d files (%.1f s)%s",
                len(report.findings),
                report.files,
                report.seconds,
                f"; {report.reason}" if report.reason else "",
            )
        return report.as_output(_LINT_KEPT)

    def _dbt(self, run: Run, run_dir: Path, cancel: threading.Event) -> StepResult:
        runtime = self._runtime(run.request.runtime, run.request.target)
        outcome = runtime.build(self._call(run, run_dir, cancel))
        artifacts = {name: str(path) for name, path in runtime.fetch_artifacts(outcome).items()}
        output = {
            "status": "success" if outcome.succeeded else "error",
            "runtime": runtime.metadata(),
            "artifacts": artifacts,
            "log": str(run_dir / "dbt.log.jsonl"),
        }
        if outcome.cancelled:
            msg = "cancelled"
            raise StepFailedError(msg)
        return StepResult(output=output, failure=None if outcome.succeeded else outcome.error or "dbt failed")

    def _lineage_mode(self, run: Run) -> str:
        if run.request.lineage_mode is not None:
            return run.request.lineage_mode
        if self.config.default_lineage_mode is not None:
            return self.config.default_lineage_mode
        config_path = self.config.project_dir / "cdme.yml"
        return load_project_config(config_path).defaults.lineage_mode if config_path.is_file() else "full"

    def _patiently(
        self, call: Callable[[], dict[str, Any]], step: str, cancel: threading.Event
    ) -> dict[str, Any]:
        """Repeat an idempotent peer call while the peer is down or failing (5xx), up to `peer_wait_s`.

        A peer restarting (or killed and started again) costs a delay, not a failed run; a 4xx answer, or a
        peer still down after the wait, fails the step with the peer's own words.
        """
        deadline = time.monotonic() + self.config.peer_wait_s
        while True:
            try:
                return call()
            except UpstreamHttpError as e:
                if e.status < 500 or time.monotonic() >= deadline:
                    raise
                error: UpstreamServiceError = e
            except UpstreamServiceError as e:
                if time.monotonic() >= deadline:
                    raise
                error = e
            logger.warning("%s: peer unavailable, retrying: %s", step, first_line(error))
            if cancel.wait(_PEER_RETRY_S):
                if self._shutdown.is_set():
                    raise _Shutdown
                msg = "cancelled"
                raise StepFailedError(msg)

    def _capture(self, run: Run, run_dir: Path, cancel: threading.Event) -> StepResult:
        manifest_path, results_path = run_dir / "manifest.json", run_dir / "run_results.json"
        if not manifest_path.is_file() or not results_path.is_file():
            msg = f"the dbt step left no manifest.json and run_results.json in {run_dir}"
            raise ConfigurationError(msg)
        body = {
            "epoch": run.request.epoch.isoformat(),
            "lineage_mode": self._lineage_mode(run),
            "manifest": json.loads(manifest_path.read_text()),
            "run_results": json.loads(results_path.read_text()),
        }
        answer = self._patiently(lambda: self.config.peers.capture(run.id, body), "capture", cancel)
        output = {
            "lineage_mode": answer.get("lineage_mode"),
            "captured": len(answer.get("captured") or []),
            "not_captured": answer.get("not_captured") or [],
            "pairs": answer.get("pairs"),
            "seconds": answer.get("seconds"),
        }
        return StepResult(output=output)

    def _finalize(
        self, run: Run, run_dir: Path, dbt_failure: str | None, cancel: threading.Event
    ) -> StepResult:
        current = self.get(run.id)
        trace = [
            {
                "step": s.name,
                "status": s.status,
                "started_at": s.started_at.isoformat() if s.started_at else None,
                "ended_at": s.ended_at.isoformat() if s.ended_at else None,
            }
            for s in current.steps
            if s.name != "finalize"
        ]
        validate = current.step("validate").output
        body = {
            "epoch": run.request.epoch.isoformat(),
            "artifact_dir": str(run_dir.resolve()),
            "dbt": {"status": "error", "error": dbt_failure} if dbt_failure else {"status": "success"},
            "validation_report_id": validate.get("report_id"),
            "trace": trace,
            "project": run.request.project,
            "target": run.request.target,
        }
        answer = self._patiently(lambda: self.config.peers.finalize(run.id, body), "finalize", cancel)
        output = {
            "status": answer.get("status"),
            "reason": answer.get("reason"),
            "ledger": answer.get("ledger"),
            "events": answer.get("events"),
        }
        if dbt_failure is None and answer.get("status") != "COMPLETE":
            return StepResult(
                output=output, failure=str(answer.get("reason") or "the lineage gate failed the run")
            )
        return StepResult(output=output)


def _rejection(answer: dict[str, Any], errors: list[dict[str, Any]]) -> str:
    count = (answer.get("summary") or {}).get("errors", len(errors))
    if not errors:
        return f"validation rejected the project with {count} error(s)"
    first = errors[0]
    where = first.get("model") or "?"
    if first.get("line"):
        where = f"{where}:{first['line']}"
    return (
        f"validation rejected the project with {count} error(s); first: {first.get('code')} "
        f"{where}: {first.get('message')}"
    )


def planner_from_settings(settings: CdmeSettings, engine: Engine) -> Planner:
    """The planner the service runs: the project, runs directory, warehouse, pepper and peers of `settings`.

    Raises:
        ConfigurationError: The pepper is invalid, or the project has no dbt_project.yml.
        WarehouseError: No warehouse is configured or running.
    """
    if not (settings.project_dir / "dbt_project.yml").is_file():
        msg = f"no dbt project at {settings.project_dir} (CDME_PROJECT_DIR)"
        raise ConfigurationError(msg)
    token = settings.service_token.get_secret_value() if settings.service_token else None
    planner_settings = PlannerSettings()
    config = PlannerConfig(
        project_dir=settings.project_dir,
        runs_dir=settings.run_artifacts_root,
        warehouse_url=resolve_warehouse_url(settings),
        pepper=resolve_pepper(settings),
        schema=settings.dbt_schema,
        peers=Peers(
            validation_url=settings.validation_url,
            adjoint_url=settings.adjoint_url,
            lineage_url=settings.lineage_url,
            token=token,
            timeout_s=planner_settings.peer_timeout_s,
            retries=settings.http_retries,
        ),
        landing_dir=settings.home / "landing",
        default_lineage_mode=settings.lineage_mode,
        peer_wait_s=planner_settings.peer_wait_s,
        lint=planner_settings.lint,
    )
    return Planner(RunStore(engine), config)
