"""Nodes of a dbt `manifest.json`, for tests that build a small one in place (`parse_manifest`)."""

from __future__ import annotations

from typing import Any


def manifest_columns(*names: str) -> dict[str, Any]:
    """A node's `columns`: each named column, of type text."""
    return {n: {"name": n, "data_type": "text"} for n in names}


def manifest_node(
    name: str,
    *,
    resource_type: str = "model",
    materialized: str = "table",
    cdme: dict[str, Any] | None = None,
    columns: tuple[str, ...] = (),
    depends: tuple[str, ...] = (),
    **extra: Any,
) -> dict[str, Any]:
    """A node of package `p` in `db.s`; `extra` adds or replaces keys (`compiled_code`, ...)."""
    return {
        "unique_id": f"{resource_type}.p.{name}",
        "resource_type": resource_type,
        "name": name,
        "package_name": "p",
        "schema": "s",
        "database": "db",
        "config": {"materialized": materialized, "meta": {"cdme": cdme} if cdme is not None else {}},
        "columns": manifest_columns(*columns),
        "depends_on": {"nodes": list(depends), "macros": []},
        **extra,
    }
