"""Settings read from the environment, every variable under the one `CDME_` prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.errors import ConfigurationError, validation_error_parts
from services.core.ldm.config import LineageMode

# The checkout's root: the project ships dbt_project/ beside services/.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def normalize_postgres_url(url: str) -> str:
    """Return `url` with the psycopg 3 driver, whatever PostgreSQL scheme it came with.

    Args:
        url: A PostgreSQL URL (`postgres://`, `postgresql://`, `postgresql+psycopg2://`, ...).

    Returns:
        The same URL with the `postgresql+psycopg://` scheme that SQLAlchemy uses for psycopg 3.

    Raises:
        ConfigurationError: The URL is not a PostgreSQL URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0].lower() not in {"postgres", "postgresql"}:
        # Never echo the rest of the URL: it may carry a password.
        shown = f"{scheme!r}://…" if sep else "a value without a scheme"
        msg = f"not a PostgreSQL URL: {shown}; expected postgresql://user:password@host:port/db"
        raise ConfigurationError(msg)
    return f"postgresql+psycopg://{rest}"


class CdmeSettings(BaseSettings):
    """Everything CDME reads from the environment.

    Every field maps to `CDME_<FIELD>` (for example `CDME_WAREHOUSE_URL`). The README lists them.
    """

    model_config = SettingsConfigDict(env_prefix="CDME_", extra="ignore", frozen=True)

    home: Path = Field(
        default=PROJECT_ROOT / ".cdme",
        description="State directory: embedded PostgreSQL data, demo token and pepper, logs, run artifacts.",
    )
    warehouse_url: str | None = Field(
        default=None,
        description="PostgreSQL URL of the warehouse. Unset: the embedded PostgreSQL under `home` is used.",
    )
    embedded_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="TCP port of the embedded PostgreSQL (0: a free port is chosen once and kept).",
    )
    database: str = Field(
        default="cdme",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        description="Database the embedded server creates and CDME uses (a plain PostgreSQL identifier).",
    )
    project_dir: Path = Field(default=PROJECT_ROOT / "dbt_project", description="The dbt project.")
    dbt_target: str = Field(default="dev", description="dbt target passed to every invocation.")
    dbt_schema: str = Field(default="analytics", description="dbt target schema (DBT_SCHEMA).")
    pepper: SecretStr | None = Field(
        default=None,
        description="Secret pepper for pseudonymized keys; never written to the warehouse or artifacts.",
    )
    auth_tokens: SecretStr | None = Field(
        default=None,
        description="Bearer tokens as `token=principal:role1,role2;...`; overrides `auth_tokens_file`.",
    )
    auth_tokens_file: Path | None = Field(
        default=None,
        description="JSON file of principals and their token digests (default: `<home>/auth/tokens.json`).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    http_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of calls between services.")
    http_retries: int = Field(default=3, ge=0, le=10, description="Retries of idempotent service calls.")
    lineage_mode: LineageMode | None = Field(
        default=None, description="Overrides the lineage mode `cdme.yml` declares as default."
    )
    validation_url: str = Field(
        default="http://127.0.0.1:8001", description="Base URL of the validation service."
    )
    adjoint_url: str = Field(default="http://127.0.0.1:8002", description="Base URL of the adjoint service.")
    lineage_url: str = Field(default="http://127.0.0.1:8003", description="Base URL of the lineage service.")
    planner_url: str = Field(default="http://127.0.0.1:8004", description="Base URL of the planner service.")
    service_token: SecretStr | None = Field(
        default=None,
        description="The bearer token this service presents to its peers (its principal needs the `service` role).",
    )
    runs_dir: Path | None = Field(
        default=None,
        description="Where each run's artifacts live, `<runs_dir>/<run_id>/` (default: `<home>/runs`).",
    )
    openlineage_transport: Literal["file", "http", "console"] = Field(
        default="file", description="Where OpenLineage events are delivered from the outbox."
    )
    openlineage_url: str | None = Field(
        default=None,
        description="The collector's endpoint for the `http` transport, e.g. Marquez's `/api/v1/lineage`.",
    )
    openlineage_api_key: SecretStr | None = Field(
        default=None, description="Bearer token the `http` transport sends to the collector, if it needs one."
    )
    openlineage_file: Path | None = Field(
        default=None,
        description="JSON-lines file of the `file` transport (default: `<home>/openlineage/events.jsonl`).",
    )
    openlineage_namespace: str = Field(
        default="cdme", min_length=1, description="OpenLineage job namespace of CDME's runs and models."
    )

    @field_validator("warehouse_url")
    @classmethod
    def _normalize_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            normalized = normalize_postgres_url(value.strip())
        except ConfigurationError as e:
            raise ValueError(str(e)) from e
        try:
            _ = make_url(normalized).port  # a non-numeric port only fails when read
        except (ArgumentError, ValueError):
            msg = "cannot parse the URL's host, port or database; expected postgresql://user:password@host:port/db"
            raise ValueError(msg) from None
        return normalized

    @property
    def tokens_file(self) -> Path:
        """Where principals and token digests are read from."""
        return self.auth_tokens_file or self.home / "auth" / "tokens.json"

    @property
    def run_artifacts_root(self) -> Path:
        """The directory holding one artifact directory per run."""
        return self.runs_dir or self.home / "runs"

    @property
    def openlineage_events_file(self) -> Path:
        """The `file` transport's JSON-lines file."""
        return self.openlineage_file or self.home / "openlineage" / "events.jsonl"


@lru_cache(maxsize=1)
def get_settings() -> CdmeSettings:
    """Return the process-wide settings, read once from the environment.

    Raises:
        ConfigurationError: A `CDME_` variable has a value that cannot be used.
    """
    from pydantic import ValidationError

    try:
        return CdmeSettings()
    except ValidationError as e:
        field, text = validation_error_parts(e)
        msg = f"invalid setting CDME_{field.upper()}: {text}"
        raise ConfigurationError(msg) from e
