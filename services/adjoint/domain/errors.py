"""The adjoint service's errors: each a `CdmeError` with its exit code and HTTP status."""

from __future__ import annotations

from services.core.errors import CdmeError, ConflictError


class DerivationError(CdmeError):
    """A model's compiled SQL cannot be rewritten into capture SQL (the model is reported as not captured)."""

    exit_code = 65
    http_status = 422
    title = "Capture not derivable"


class NotReconstructableError(ConflictError):
    """A key-derivable run's data changed since capture (digest mismatch): no answer rather than a wrong one."""

    title = "Not reconstructable"


class CaptureInputError(CdmeError):
    """The capture request's artifacts are inconsistent (unknown models, manifest and run results disagree)."""

    exit_code = 65
    http_status = 422
    title = "Invalid capture request"
