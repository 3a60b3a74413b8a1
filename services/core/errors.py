"""One exception tree for CDME, translated to exit codes and HTTP statuses at the edges.

Every error CDME raises on purpose derives from `CdmeError`. Each subclass carries the exit code the CLI
returns and the HTTP status a service answers with, so adapters translate without a lookup table of their own.
Messages are one line that says what is wrong and what to fix.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CdmeError(Exception):
    """Root of every error CDME raises deliberately."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "CDME error"


class ConfigurationError(CdmeError):
    """A setting, profile or project file is missing or invalid."""

    exit_code = 78  # EX_CONFIG
    http_status = 500
    title = "Configuration error"


class UsageError(CdmeError):
    """A caller passed an argument that cannot be used (bad count, malformed date, unknown option)."""

    exit_code = 2
    http_status = 422
    title = "Invalid argument"


class ArtifactError(CdmeError):
    """A dbt artifact is missing, malformed, or of a schema version CDME does not support."""

    exit_code = 65  # EX_DATAERR
    http_status = 422
    title = "Invalid dbt artifact"


class LdmError(CdmeError):
    """A `meta.cdme` declaration or `cdme.yml` is invalid; the message names the entity and field."""

    exit_code = 65
    http_status = 422
    title = "Invalid CDME declaration"


class WarehouseError(CdmeError):
    """The warehouse cannot be reached or refused an operation."""

    exit_code = 69  # EX_UNAVAILABLE
    http_status = 503
    title = "Warehouse unavailable"


class EmbeddedPostgresError(WarehouseError):
    """The embedded PostgreSQL server could not be initialised, started or stopped."""

    title = "Embedded PostgreSQL error"


class DbtError(CdmeError):
    """dbt could not be run or reported a failure."""

    exit_code = 3
    http_status = 502
    title = "dbt failed"


class AuthenticationError(CdmeError):
    """A request carried no bearer token or one that maps to no principal."""

    exit_code = 77  # EX_NOPERM
    http_status = 401
    title = "Unauthenticated"


class AuthorizationError(CdmeError):
    """The principal is known but lacks the role an operation needs."""

    exit_code = 77
    http_status = 403
    title = "Forbidden"


class UpstreamServiceError(CdmeError):
    """Another CDME service (or an external API) failed or could not be reached after retries."""

    exit_code = 69
    http_status = 502
    title = "Upstream service failed"


class NotFoundError(CdmeError):
    """A resource named by the request does not exist (or is invisible to the caller, which looks the same)."""

    exit_code = 66  # EX_NOINPUT
    http_status = 404
    title = "Not found"


class ConflictError(CdmeError):
    """The request conflicts with the current state (another active run, data changed since capture, ...)."""

    exit_code = 75  # EX_TEMPFAIL
    http_status = 409
    title = "Conflict"


class NotReadyError(CdmeError):
    """A service cannot serve yet: its database, its schema or a peer it needs is not there."""

    exit_code = 69  # EX_UNAVAILABLE
    http_status = 503
    title = "Not ready"


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (drivers append hints and context lines)."""
    original = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's error
    for line in str(original).splitlines():
        if line.strip():
            return line.strip()
    return type(original).__name__


def error_location(loc: Any) -> str:
    """A pydantic error location as `a.b.0.c`; keys that are not plain printable text show as Python literals.

    Keys come from user files, and a key holding a newline must not break a one-line message.
    """

    def part(p: Any) -> str:
        text = str(p)
        plain = bool(text) and text.isprintable() and text.strip() == text
        return text if plain else repr(p)

    return ".".join(part(p) for p in loc)


def validation_error_parts(error: Any) -> tuple[str, str]:
    """The location and message of a pydantic `ValidationError`'s first error (with how many more there are).

    pydantic's "Value error, " prefix (from our own validators) is dropped, so the text reads as written.
    """
    errors = error.errors()
    first = errors[0]
    where = error_location(first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return where, f"{str(first['msg']).removeprefix('Value error, ')}{more}"


def describe_validation_error(error: Any) -> str:
    """`location: message` of a pydantic `ValidationError` (no location when the whole document is wrong)."""
    where, text = validation_error_parts(error)
    return f"{where}: {text}" if where else text
