"""The planner's errors, in the `CdmeError` tree (each carries its HTTP status and exit code)."""

from __future__ import annotations

import uuid

from services.core.errors import CdmeError, ConflictError, NotFoundError


class RunNotFoundError(NotFoundError):
    """No run has the id asked for."""

    title = "Run not found"


class RunConflictError(ConflictError):
    """Another run of the same (project, target, epoch) is active, or the run is in a state that forbids it."""

    title = "Run conflict"

    def __init__(self, message: str, active_run_id: uuid.UUID | None = None) -> None:
        super().__init__(message)
        self.active_run_id = active_run_id


class StepFailedError(CdmeError):
    """A step ended without doing its work; the message is the run's one-line reason."""

    exit_code = 1
    http_status = 500
    title = "Step failed"


class IngestError(CdmeError):
    """A declared input file is missing, outside its allowed root, or does not match the declared columns."""

    exit_code = 65  # EX_DATAERR
    http_status = 422
    title = "Input file rejected"
