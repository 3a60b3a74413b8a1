"""The adjoint service's errors: each a `CdmeError` with its exit code and HTTP status."""

from __future__ import annotations

from services.core.errors import CdmeError


class DerivationError(CdmeError):
    """A model's compiled SQL cannot be rewritten into capture SQL (the model is reported as not captured)."""

    exit_code = 65
    http_status = 422
    title = "Capture not derivable"


class NotFoundError(CdmeError):
    """The run, model or key asked about is not in the adjoint metadata (or not visible to the principal)."""

    exit_code = 66  # EX_NOINPUT
    http_status = 404
    title = "Not found"


class NotReconstructableError(CdmeError):
    """A key-derivable run's data changed since capture (digest mismatch): no answer rather than a wrong one."""

    exit_code = 65
    http_status = 409
    title = "Not reconstructable"


class CaptureInputError(CdmeError):
    """The capture request's artifacts are inconsistent (unknown models, manifest and run results disagree)."""

    exit_code = 65
    http_status = 422
    title = "Invalid capture request"
