"""Reading a dbt artifact: bytes to JSON to a checked schema version to a typed model, with precise errors."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from services.core.errors import ArtifactError, describe_validation_error

ArtifactKind = Literal["manifest", "run-results", "catalog"]

# The schema versions whose fields CDME reads; dbt-core documents each under schemas.getdbt.com.
SUPPORTED_VERSIONS: dict[ArtifactKind, range] = {
    "manifest": range(7, 13),
    "run-results": range(4, 7),
    "catalog": range(1, 2),
}

_VERSION_URL = re.compile(r"/dbt/(?P<kind>[a-z-]+)/v(?P<version>\d+)\.json$")


def as_list(value: Any) -> Any:
    """A pydantic before-validator: dbt lets many list fields be a single string (or null)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class ArtifactModel(BaseModel):
    """Base of every artifact model: unknown fields are ignored, so newer dbt releases still load."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


M = TypeVar("M", bound=ArtifactModel)


def _supported_text(kind: ArtifactKind) -> str:
    versions = SUPPORTED_VERSIONS[kind]
    return f"v{versions[0]}-v{versions[-1]}" if len(versions) > 1 else f"v{versions[0]}"


def read_json(path: Path) -> Any:
    """Read a JSON file (gzip-compressed when it ends in `.gz`), naming the file in every error.

    Raises:
        ArtifactError: The file is missing, unreadable, or not valid JSON.
    """
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        msg = f"{path}: file not found"
        raise ArtifactError(msg) from e
    except (OSError, EOFError) as e:
        msg = f"{path}: cannot read: {e}"
        raise ArtifactError(msg) from e
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        msg = f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise ArtifactError(msg) from e
    except UnicodeDecodeError as e:
        msg = f"{path}: not UTF-8 text: {e.reason}"
        raise ArtifactError(msg) from e


def schema_version(data: Any, kind: ArtifactKind, source: str) -> int:
    """Return the artifact's schema version, checking it is `kind` and supported.

    Args:
        data: The decoded JSON document.
        kind: The artifact expected.
        source: How to name the artifact in messages (usually its path).

    Raises:
        ArtifactError: The document has no `metadata.dbt_schema_version`, is another kind of artifact, or has
            a version CDME does not support.
    """
    if not isinstance(data, dict):
        msg = f"{source}: expected a JSON object at the top level, found {type(data).__name__}"
        raise ArtifactError(msg)
    metadata = data.get("metadata")
    url = metadata.get("dbt_schema_version") if isinstance(metadata, dict) else None
    if not isinstance(url, str):
        msg = f"{source}: no metadata.dbt_schema_version; is this a dbt {kind} artifact?"
        raise ArtifactError(msg)
    match = _VERSION_URL.search(url)
    if match is None:
        msg = f"{source}: unrecognised dbt_schema_version {url!r}; supported: {kind} {_supported_text(kind)}"
        raise ArtifactError(msg)
    if match["kind"] != kind:
        msg = f"{source}: this is a dbt {match['kind']} artifact, expected {kind}"
        raise ArtifactError(msg)
    version = int(match["version"])
    if version not in SUPPORTED_VERSIONS[kind]:
        msg = (
            f"{source}: {kind} schema v{version} is not supported; supported: {kind} {_supported_text(kind)}"
        )
        raise ArtifactError(msg)
    return version


def validate_artifact(model: type[M], data: Any, kind: ArtifactKind, source: str) -> tuple[M, int]:
    """Check the version of `data`, then validate it into `model`.

    Returns:
        The typed artifact and its schema version.

    Raises:
        ArtifactError: The version is unsupported or a field CDME reads has the wrong shape; the message names
            the first offending field and how many more there are.
    """
    version = schema_version(data, kind, source)
    try:
        return model.model_validate(data), version
    except ValidationError as e:
        msg = f"{source}: {kind} v{version} field {describe_validation_error(e)}"
        raise ArtifactError(msg) from e
