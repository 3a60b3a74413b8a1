"""What produced a run: digests and versions of the manifest, the project, its SQL, `cdme.yml` and CDME itself."""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from services.core.artifacts import Manifest


def sha256_file(path: Path) -> str | None:
    """`sha256:<hex>` of a file's bytes, or None when it does not exist."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def sha256_text(text: str) -> str:
    """`sha256:<hex>` of a text's UTF-8 bytes."""
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _git_commit(directory: Path) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and len(commit) == 40 else None


def _project_version(project_dir: Path) -> str | None:
    try:
        document = yaml.safe_load((project_dir / "dbt_project.yml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    value = document.get("version") if isinstance(document, dict) else None
    return str(value) if value is not None else None


@lru_cache(maxsize=1)
def cdme_version() -> str:
    """The installed CDME distribution's version ("unknown" when run from a tree that is not installed)."""
    try:
        return version("cdme")
    except PackageNotFoundError:
        return "unknown"


def collect_versions(
    artifact_dir: Path, manifest: Manifest | None, project_dir: Path | None
) -> dict[str, Any]:
    """The versions of everything that produced a run.

    Args:
        artifact_dir: The run's artifact directory (holding `manifest.json`).
        manifest: The parsed manifest, if there is one (for the compiled SQL and dbt's version).
        project_dir: The dbt project's directory (for its version, `cdme.yml` and git commit), if known.

    Returns:
        `manifest_checksum`, `project`, `project_version`, `git_commit`, `cdme_yml_digest`, `dbt_version`,
        `cdme_version` and `compiled_sql` (unique id -> digest of the SQL dbt ran).
    """
    compiled: dict[str, str] = {}
    if manifest is not None:
        for node in manifest.nodes.values():
            if node.compiled_code and node.resource_type in {"model", "snapshot", "test"}:
                compiled[node.unique_id] = sha256_text(node.compiled_code)
    return {
        "manifest_checksum": sha256_file(artifact_dir / "manifest.json"),
        "project": manifest.metadata.project_name if manifest is not None else None,
        "project_version": _project_version(project_dir) if project_dir is not None else None,
        "git_commit": _git_commit(project_dir) if project_dir is not None else None,
        "cdme_yml_digest": sha256_file(project_dir / "cdme.yml") if project_dir is not None else None,
        "dbt_version": manifest.metadata.dbt_version if manifest is not None else None,
        "cdme_version": cdme_version(),
        "compiled_sql": dict(sorted(compiled.items())),
    }
