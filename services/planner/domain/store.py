"""Runs and steps persisted in `cdme_planner`, one committed write per transition (plain SQLAlchemy Core).

Every transition commits on its own, so whatever instant the planner dies at, the database says which steps
finished; `migrations/` creates the tables.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from services.core.errors import WarehouseError, first_line
from services.planner.domain.errors import RunConflictError
from services.planner.domain.model import (
    STEPS,
    Run,
    RunRequest,
    RunStatus,
    Step,
    StepName,
    StepStatus,
)

SCHEMA = "cdme_planner"

_RUN_COLUMNS = (
    'id, principal, project, target, epoch, vars, "select", exclude, selector, lineage_mode, validation, '
    "dry_run, ingest, runtime, status, reason, failed_step, cancel_requested, created_at, updated_at, ended_at"
)


class RunStore:
    """Reads and writes runs; every method is blocking (call it off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        """Use `engine`, whose database `migrate(engine, "planner")` has prepared."""
        self._engine = engine

    @contextmanager
    def _begin(self, what: str) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as e:
            msg = f"cannot {what}: {first_line(e)}"
            raise WarehouseError(msg) from e

    def create(self, run_id: uuid.UUID, principal: str, request: RunRequest) -> None:
        """Store a new `PENDING` run with all its steps `pending`.

        Raises:
            RunConflictError: A run of the same (project, target, epoch) is still active.
            WarehouseError: The database cannot be reached.
        """
        try:
            with self._begin("store the run") as conn:
                conn.execute(
                    text(
                        f"insert into {SCHEMA}.runs (id, principal, project, target, epoch, vars, "
                        '"select", exclude, selector, lineage_mode, validation, dry_run, ingest, runtime, status) '
                        "values (:id, :principal, :project, :target, :epoch, cast(:vars as jsonb), "
                        "cast(:select as jsonb), cast(:exclude as jsonb), :selector, :lineage_mode, :validation, "
                        ":dry_run, :ingest, :runtime, 'PENDING')"
                    ),
                    {
                        "id": run_id,
                        "principal": principal,
                        "project": request.project,
                        "target": request.target,
                        "epoch": request.epoch,
                        "vars": _json(request.vars),
                        "select": _json(request.select),
                        "exclude": _json(request.exclude),
                        "selector": request.selector,
                        "lineage_mode": request.lineage_mode,
                        "validation": request.validation,
                        "dry_run": request.dry_run,
                        "ingest": request.ingest,
                        "runtime": request.runtime,
                    },
                )
                conn.execute(
                    text(
                        f"insert into {SCHEMA}.steps (run_id, step, position, status) "
                        "values (:run_id, :step, :position, 'pending')"
                    ),
                    [{"run_id": run_id, "step": s, "position": i} for i, s in enumerate(STEPS)],
                )
        except IntegrityError as e:
            active = self.active_run(request.project, request.target, request.epoch)
            msg = (
                f"run {active} of project {request.project}, target {request.target}, epoch {request.epoch} "
                "is still active; wait for it, resume it or cancel it"
            )
            raise RunConflictError(msg, active) from e

    def active_run(self, project: str, target: str, epoch: date) -> uuid.UUID | None:
        """The id of the unfinished run of (project, target, epoch), if any."""
        with self._begin("read the active run") as conn:
            value = conn.execute(
                text(
                    f"select id from {SCHEMA}.runs where project = :p and target = :t and epoch = :e "
                    "and status in ('PENDING', 'RUNNING')"
                ),
                {"p": project, "t": target, "e": epoch},
            ).scalar_one_or_none()
        return value if isinstance(value, uuid.UUID) else None

    def get(self, run_id: uuid.UUID) -> Run | None:
        """The run with its steps, or None."""
        with self._begin("read the run") as conn:
            row = (
                conn.execute(text(f"select {_RUN_COLUMNS} from {SCHEMA}.runs where id = :id"), {"id": run_id})
                .mappings()
                .one_or_none()
            )
            if row is None:
                return None
            steps = (
                conn.execute(
                    text(
                        "select step, status, attempt, started_at, ended_at, error, output "
                        f"from {SCHEMA}.steps where run_id = :id order by position"
                    ),
                    {"id": run_id},
                )
                .mappings()
                .all()
            )
        return _run(row, steps)

    def list_runs(self, *, status: RunStatus | None, limit: int, offset: int) -> tuple[list[Run], int]:
        """A page of runs, newest first, and how many runs match in all."""
        where = "where status = :status" if status else ""
        with self._begin("list runs") as conn:
            total = int(
                conn.execute(
                    text(f"select count(*) from {SCHEMA}.runs {where}"), {"status": status}
                ).scalar_one()
            )
            ids: list[uuid.UUID] = list(
                conn.execute(
                    text(
                        f"select id from {SCHEMA}.runs {where} order by id desc limit :limit offset :offset"
                    ),
                    {"status": status, "limit": limit, "offset": offset},
                )
                .scalars()
                .all()
            )
        runs = [run for run_id in ids if (run := self.get(run_id)) is not None]
        return runs, total

    def unfinished(self) -> list[uuid.UUID]:
        """Ids of runs that are `PENDING` or `RUNNING`, oldest first (what a restarted planner resumes)."""
        with self._begin("list unfinished runs") as conn:
            return list(
                conn.execute(
                    text(f"select id from {SCHEMA}.runs where status in ('PENDING', 'RUNNING') order by id")
                )
                .scalars()
                .all()
            )

    def set_status(
        self,
        run_id: uuid.UUID,
        status: RunStatus,
        *,
        reason: str | None = None,
        failed_step: StepName | None = None,
    ) -> None:
        """Move the run to `status` (a terminal status records when it ended; `RUNNING` clears the reason).

        Raises:
            RunConflictError: Re-activating the run collides with another active run of its key.
        """
        ended = "now()" if status in {"COMPLETE", "FAILED", "CANCELLED"} else "null"
        try:
            with self._begin("update the run") as conn:
                conn.execute(
                    text(
                        f"update {SCHEMA}.runs set status = :status, reason = :reason, failed_step = :failed, "
                        f"updated_at = now(), ended_at = {ended}, "
                        "cancel_requested = cancel_requested and :status in ('PENDING', 'RUNNING') "
                        "where id = :id"
                    ),
                    {"id": run_id, "status": status, "reason": reason, "failed": failed_step},
                )
        except IntegrityError as e:
            msg = f"run {run_id} cannot be resumed: another run of its project, target and epoch is active"
            raise RunConflictError(msg) from e

    def request_cancel(self, run_id: uuid.UUID) -> None:
        """Flag the run for cancellation; its worker stops at the next opportunity."""
        with self._begin("flag the run for cancellation") as conn:
            conn.execute(
                text(f"update {SCHEMA}.runs set cancel_requested = true, updated_at = now() where id = :id"),
                {"id": run_id},
            )

    def cancel_requested(self, run_id: uuid.UUID) -> bool:
        """Whether someone asked to cancel the run."""
        with self._begin("read the run") as conn:
            return bool(
                conn.execute(
                    text(f"select cancel_requested from {SCHEMA}.runs where id = :id"), {"id": run_id}
                ).scalar_one_or_none()
            )

    def start_step(self, run_id: uuid.UUID, step: StepName) -> int:
        """Mark the step `running` for one more attempt and return the attempt's number."""
        with self._begin("start the step") as conn:
            return int(
                conn.execute(
                    text(
                        f"update {SCHEMA}.steps set status = 'running', attempt = attempt + 1, "
                        "started_at = now(), ended_at = null, error = null "
                        "where run_id = :id and step = :step returning attempt"
                    ),
                    {"id": run_id, "step": step},
                ).scalar_one()
            )

    def finish_step(
        self,
        run_id: uuid.UUID,
        step: StepName,
        status: StepStatus,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """End the step's attempt with `status`, its output and, for a failure, the reason."""
        with self._begin("record the step") as conn:
            conn.execute(
                text(
                    f"update {SCHEMA}.steps set status = :status, ended_at = now(), error = :error, "
                    "output = coalesce(cast(:output as jsonb), output), "
                    "started_at = coalesce(started_at, now()) "
                    "where run_id = :id and step = :step"
                ),
                {
                    "id": run_id,
                    "step": step,
                    "status": status,
                    "error": error,
                    "output": None if output is None else _json(output),
                },
            )

    def reopen_steps(self, run_id: uuid.UUID) -> None:
        """Set the first unfinished step and every step after it back to `pending`, for a resume.

        Later steps are reopened even if they ran: after a failed dbt step, finalize recorded the failure and
        must record the outcome of the retried build instead.
        """
        with self._begin("reopen the steps") as conn:
            conn.execute(
                text(
                    f"update {SCHEMA}.steps set status = 'pending' where run_id = :id and position >= ("
                    f"select coalesce(min(position), 1000) from {SCHEMA}.steps "
                    "where run_id = :id and status not in ('succeeded', 'skipped'))"
                ),
                {"id": run_id},
            )


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _run(row: RowMapping, steps: Any) -> Run:
    request = RunRequest(
        project=row["project"],
        target=row["target"],
        epoch=row["epoch"],
        vars=row["vars"],
        select=row["select"],
        exclude=row["exclude"],
        selector=row["selector"],
        lineage_mode=row["lineage_mode"],
        validation=row["validation"],
        dry_run=row["dry_run"],
        ingest=row["ingest"],
        runtime=row["runtime"],
    )
    return Run(
        id=row["id"],
        principal=row["principal"],
        request=request,
        status=row["status"],
        reason=row["reason"],
        failed_step=row["failed_step"],
        cancel_requested=row["cancel_requested"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
        steps=[
            Step(
                name=s["step"],
                status=s["status"],
                attempt=s["attempt"],
                started_at=s["started_at"],
                ended_at=s["ended_at"],
                error=s["error"],
                output=s["output"] or {},
            )
            for s in steps
        ],
    )
