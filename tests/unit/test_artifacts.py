"""Typed dbt artifacts: real manifests of public projects, every supported version, and every bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest

from services.core.artifacts import (
    load_catalog,
    load_manifest,
    load_run_results,
    parse_catalog,
    parse_manifest,
    parse_run_results,
)
from services.core.errors import ArtifactError
from tests.conftest import RESEARCH_DATA

RESEARCH_MANIFESTS = sorted(RESEARCH_DATA.glob("*-manifest.json.gz"))


def _url(kind: str, version: int) -> str:
    return f"https://schemas.getdbt.com/dbt/{kind}/v{version}.json"


def _manifest(version: int, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"dbt_schema_version": _url("manifest", version)},
        "nodes": {},
        "sources": {},
        **extra,
    }


def _write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_research_corpus_is_present() -> None:
    assert len(RESEARCH_MANIFESTS) == 4, RESEARCH_DATA


@pytest.mark.parametrize("path", RESEARCH_MANIFESTS, ids=lambda p: p.name.split("-v12")[0])
def test_real_manifests_parse_completely(path: Path) -> None:
    raw = json.loads(gzip.decompress(path.read_bytes()))
    manifest = load_manifest(path)

    assert manifest.metadata.dbt_schema_version == _url("manifest", 12)
    assert set(manifest.nodes) == set(raw["nodes"])
    assert set(manifest.sources) == set(raw["sources"])
    models = manifest.models()
    assert len(models) == sum(1 for n in raw["nodes"].values() if n["resource_type"] == "model")
    # The corpus was compiled: every SQL model has its compiled SQL and a relation.
    assert all(m.compiled_code for m in models if m.language == "sql")
    assert all(m.relation_name for m in models if m.config.materialized != "ephemeral")
    for node in manifest.nodes.values():
        if node.resource_type == "test" and node.test_metadata is not None:
            assert (
                node.tested_node is None
                or node.tested_node in manifest.nodes
                or node.tested_node in manifest.sources
            )


def test_manifest_fields_cdme_reads_are_typed() -> None:
    manifest = load_manifest(RESEARCH_DATA / "jaffle-shop-v12-postgres-compiled-manifest.json.gz")
    orders = next(m for m in manifest.models() if m.name == "orders")
    assert orders.schema_
    assert orders.depends_on.nodes
    assert {r.name for r in orders.refs} >= {"stg_orders"}
    assert orders.checksum is not None and orders.checksum.name == "sha256"
    tests = manifest.tests_on(orders.unique_id)
    assert any(
        t.test_metadata and t.test_metadata.name == "unique" and t.column_name == "order_id" for t in tests
    )


@pytest.mark.parametrize("version", range(7, 13))
def test_every_supported_manifest_version_loads(version: int) -> None:
    parsed = parse_manifest(_manifest(version))
    assert parsed.metadata.dbt_schema_version.endswith(f"v{version}.json")


@pytest.mark.parametrize("version", [4, 5, 6])
def test_every_supported_run_results_version_loads(version: int) -> None:
    data = {
        "metadata": {"dbt_schema_version": _url("run-results", version)},
        "results": [
            {
                "unique_id": "model.p.m",
                "status": "success",
                "execution_time": 0.5,
                "adapter_response": {"rows_affected": 3, "code": "SELECT"},
                "timing": [{"name": "execute", "started_at": "2026-11-20T10:00:00Z", "completed_at": None}],
                "thread_id": "Thread-1",
                "message": "SELECT 3",
                "failures": None,
                "an_unknown_future_field": {"ignored": True},
            }
        ],
        "elapsed_time": 1.25,
    }
    results = parse_run_results(data)
    assert results.results[0].rows_affected == 3
    assert results.by_id()["model.p.m"].status == "success"


def test_catalog_v1_loads_with_case_folded_columns() -> None:
    data = {
        "metadata": {"dbt_schema_version": _url("catalog", 1)},
        "nodes": {
            "model.p.m": {
                "metadata": {"type": "BASE TABLE", "schema": "marts", "name": "m", "database": "db"},
                "columns": {"Trade_ID": {"type": "text", "index": 1, "name": "Trade_ID"}},
                "stats": {},
                "unique_id": "model.p.m",
            }
        },
        "sources": {},
    }
    catalog = parse_catalog(data)
    assert catalog.columns_of("model.p.m")["trade_id"].type == "text"
    assert catalog.columns_of("model.p.unknown") == {}


def test_v7_refs_and_tests_without_attached_node_are_normalised() -> None:
    data = _manifest(
        7,
        nodes={
            "model.p.a": {
                "unique_id": "model.p.a",
                "resource_type": "model",
                "name": "a",
                "package_name": "p",
                "schema": "s",
                "refs": [["b"], ["other_pkg", "c"]],
                "config": {"materialized": "table", "tags": "single-tag", "unique_key": "id"},
            },
            "test.p.unique_a_id": {
                "unique_id": "test.p.unique_a_id",
                "resource_type": "test",
                "name": "unique_a_id",
                "package_name": "p",
                "schema": "s",
                "column_name": "id",
                "test_metadata": {"name": "unique", "kwargs": {"column_name": "id"}},
                "depends_on": {"nodes": ["model.p.a"], "macros": []},
            },
        },
    )
    manifest = parse_manifest(data)
    node = manifest.nodes["model.p.a"]
    assert [(r.package, r.name) for r in node.refs] == [(None, "b"), ("other_pkg", "c")]
    assert node.config.tags == ["single-tag"]
    assert node.config.unique_key == ["id"]
    assert [t.name for t in manifest.tests_on("model.p.a")] == ["unique_a_id"]


@pytest.mark.parametrize(
    ("kind", "version", "loader", "expected"),
    [
        ("manifest", 6, load_manifest, "manifest schema v6 is not supported; supported: manifest v7-v12"),
        ("manifest", 13, load_manifest, "manifest schema v13 is not supported; supported: manifest v7-v12"),
        (
            "run-results",
            3,
            load_run_results,
            "run-results schema v3 is not supported; supported: run-results v4-v6",
        ),
        ("catalog", 2, load_catalog, "catalog schema v2 is not supported; supported: catalog v1"),
    ],
)
def test_unsupported_version_names_file_version_and_supported(
    tmp_path: Path, kind: str, version: int, loader: Any, expected: str
) -> None:
    path = _write(tmp_path, f"{kind}.json", {"metadata": {"dbt_schema_version": _url(kind, version)}})
    with pytest.raises(ArtifactError) as info:
        loader(path)
    assert str(info.value) == f"{path}: {expected}"


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text('{"metadata": {\n  "dbt_schema_version": ,\n}')
    with pytest.raises(ArtifactError, match=r"manifest\.json: malformed JSON at line 2 column 25"):
        load_manifest(path)


def test_truncated_gzip_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json.gz"
    path.write_bytes(gzip.compress(b'{"metadata": {}}')[:-6])
    with pytest.raises(ArtifactError, match=r"manifest\.json\.gz: cannot read"):
        load_manifest(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"nope\.json: file not found"):
        load_manifest(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], "expected a JSON object at the top level, found list"),
        ({"nodes": {}}, "no metadata.dbt_schema_version; is this a dbt manifest artifact?"),
        ({"metadata": {"dbt_schema_version": "v12"}}, "unrecognised dbt_schema_version 'v12'"),
        (
            {"metadata": {"dbt_schema_version": _url("run-results", 6)}},
            "this is a dbt run-results artifact, expected manifest",
        ),
    ],
)
def test_not_a_manifest(data: Any, expected: str) -> None:
    with pytest.raises(ArtifactError, match=expected):
        parse_manifest(data, "x.json")


def test_wrong_shape_names_the_field() -> None:
    data = _manifest(12, nodes={"model.p.a": {"unique_id": "model.p.a", "name": "a"}})
    with pytest.raises(ArtifactError) as info:
        parse_manifest(data, "m.json")
    message = str(info.value)
    assert message.startswith("m.json: manifest v12 field nodes.model.p.a.")
    assert "Field required" in message and "more)" in message


def test_loading_is_cached_per_content(tmp_path: Path) -> None:
    path = _write(tmp_path, "manifest.json", _manifest(12))
    first = load_manifest(path)
    assert load_manifest(path) is first
    data = _manifest(12, nodes={})
    data["metadata"]["project_name"] = "changed"
    path.write_text(json.dumps(data))
    os.utime(path, ns=(1, 10**18))  # a new mtime even on coarse-grained file systems
    assert load_manifest(path).metadata.project_name == "changed"


# What each schema version's nodes look like in the fields CDME reads (dbt-core's upgrade notes per version).
_VERSION_SHAPES: dict[int, dict[str, Any]] = {
    7: {"refs": [["stg"]], "sources": [["raw", "t"]]},
    8: {"refs": [["stg"]], "metrics": []},
    9: {
        "refs": [{"name": "stg", "package": None, "version": None}],
        "constraints": [],
        "access": "protected",
        "contract": {"enforced": False},
    },
    10: {
        "refs": [{"name": "stg", "package": None, "version": 2}],
        "access": "public",
        "version": 3,
        "latest_version": 3,
    },
    11: {
        "refs": [{"name": "stg", "package": None, "version": None}],
        "constraints": [{"type": "primary_key", "columns": ["id"]}],
    },
    12: {
        "refs": [{"name": "stg", "package": None, "version": None}],
        "primary_key": ["id"],
        "time_spine": None,
    },
}


@pytest.mark.parametrize("version", sorted(_VERSION_SHAPES))
def test_each_versions_node_shape_is_read(version: int) -> None:
    node = {
        "unique_id": "model.p.m",
        "resource_type": "model",
        "name": "m",
        "package_name": "p",
        "schema": "s",
        "raw_code": "select 1 as id",
        "compiled_code": "select 1 as id",
        "depends_on": {"nodes": ["model.p.stg"], "macros": []},
        "columns": {"id": {"name": "id", "data_type": "int", "meta": {}, "tags": []}},
        **_VERSION_SHAPES[version],
    }
    extra: dict[str, Any] = {"semantic_models": {}, "saved_queries": {}} if version >= 10 else {}
    extra |= {"unit_tests": {}} if version >= 12 else {}
    manifest = parse_manifest(_manifest(version, nodes={"model.p.m": node}, **extra))
    parsed = manifest.nodes["model.p.m"]
    assert [r.name for r in parsed.refs] == ["stg"]
    assert parsed.compiled_code == "select 1 as id"
    assert parsed.columns["id"].data_type == "int"
    if version >= 11:
        assert parsed.constraints or parsed.primary_key
