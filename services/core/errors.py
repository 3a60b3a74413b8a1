"""One exception tree for CDME, translated to exit codes and HTTP statuses at the edges.

Every error CDME raises on purpose derives from `CdmeError`. Each subclass carries the exit code the CLI
returns and the HTTP status a service answers with, so adapters translate without a lookup table of their own.
Messages are one line that says what is wrong and what to fix.
"""

from __future__ import annotations

from typing import ClassVar


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
