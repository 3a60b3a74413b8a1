"""Typed dbt artifacts: `load_manifest`, `load_run_results`, `load_catalog` (files) and `parse_*` (decoded JSON).

Loading checks `metadata.dbt_schema_version` first, so an artifact of an unsupported version fails with a
message naming the file, the version found and the versions supported. Files are parsed once per content:
the cache is keyed by path, size and modification time.

Examples:
    >>> manifest = load_manifest(Path("dbt_project/target/manifest.json"))
    >>> [m.name for m in manifest.models()][:2]
    ['stg_trades', 'stg_counterparties']
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from services.core.artifacts.base import SUPPORTED_VERSIONS, read_json, validate_artifact
from services.core.artifacts.catalog import Catalog
from services.core.artifacts.manifest import Manifest, ManifestNode, SourceDefinition
from services.core.artifacts.run_results import NodeResult, RunResults

__all__ = [
    "SUPPORTED_VERSIONS",
    "Catalog",
    "Manifest",
    "ManifestNode",
    "NodeResult",
    "RunResults",
    "SourceDefinition",
    "load_catalog",
    "load_manifest",
    "load_run_results",
    "parse_catalog",
    "parse_manifest",
    "parse_run_results",
]


def parse_manifest(data: Any, source: str = "manifest.json") -> Manifest:
    """Validate a decoded `manifest.json` (see `load_manifest`)."""
    return validate_artifact(Manifest, data, "manifest", source)[0]


def parse_run_results(data: Any, source: str = "run_results.json") -> RunResults:
    """Validate a decoded `run_results.json` (see `load_run_results`)."""
    return validate_artifact(RunResults, data, "run-results", source)[0]


def parse_catalog(data: Any, source: str = "catalog.json") -> Catalog:
    """Validate a decoded `catalog.json` (see `load_catalog`)."""
    return validate_artifact(Catalog, data, "catalog", source)[0]


def _cache_key(path: Path) -> tuple[str, int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (str(path), -1, -1)  # read_json reports the missing file with its name
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _load_manifest(key: tuple[str, int, int]) -> Manifest:
    return parse_manifest(read_json(Path(key[0])), key[0])


def load_manifest(path: Path) -> Manifest:
    """Load `manifest.json` (v7-v12; `.json.gz` too).

    Raises:
        ArtifactError: Missing file, malformed JSON, unsupported version, or a field of the wrong shape.
    """
    return _load_manifest(_cache_key(path))


def load_run_results(path: Path) -> RunResults:
    """Load `run_results.json` (v4-v6).

    Raises:
        ArtifactError: Missing file, malformed JSON, unsupported version, or a field of the wrong shape.
    """
    return parse_run_results(read_json(path), str(path))


def load_catalog(path: Path) -> Catalog:
    """Load `catalog.json` (v1).

    Raises:
        ArtifactError: Missing file, malformed JSON, unsupported version, or a field of the wrong shape.
    """
    return parse_catalog(read_json(path), str(path))
