"""Whatever arrives as an artifact or a declaration, the answer is a typed result or a CDME error, never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.artifacts import parse_catalog, parse_manifest, parse_run_results
from services.core.errors import ArtifactError
from services.core.ldm import LdmDeclarationError, load_ldm, parse_project_config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)
schema_urls = st.sampled_from(
    [
        f"https://schemas.getdbt.com/dbt/{kind}/v{v}.json"
        for kind in ("manifest", "run-results", "catalog")
        for v in range(0, 14)
    ]
    + ["", "v12", "https://example.com/manifest/v12.json"]
)
artifacts = st.fixed_dictionaries(
    {"metadata": st.fixed_dictionaries({"dbt_schema_version": schema_urls})},
    optional={
        "nodes": json_values,
        "sources": json_values,
        "results": json_values,
        "elapsed_time": json_values,
    },
)
CONFIG = parse_project_config(
    {"grains": [{"name": "Atomic"}], "roles": [{"name": "r"}], "requirements": {"REQ-1": ""}}
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=json_values | artifacts)
def test_any_json_is_an_artifact_or_an_artifact_error(data: Any) -> None:
    for parse in (parse_manifest, parse_run_results, parse_catalog):
        try:
            parse(data, "hostile.json")
        except ArtifactError as e:
            message = str(e)
            assert message.startswith("hostile.json: ") and "\n" not in message


cdme_meta = st.dictionaries(
    st.sampled_from(
        [
            "key",
            "grain",
            "kind",
            "driving",
            "lookups",
            "filter",
            "error_sink",
            "req",
            "access",
            "monoids",
            "bogus",
        ]
    ),
    json_values | st.sampled_from(["Atomic", "iso", "aggregate", "up", "REQ-1", "r", "id"]),
    max_size=5,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(meta=cdme_meta | json_values)
def test_any_meta_cdme_loads_or_is_reported_by_entity_and_field(meta: Any) -> None:
    def node(name: str, cdme: dict[str, Any], depends: list[str]) -> dict[str, Any]:
        return {
            "unique_id": f"model.p.{name}",
            "resource_type": "model",
            "name": name,
            "package_name": "p",
            "schema": "s",
            "config": {"meta": {"cdme": cdme}},
            "columns": {"id": {"name": "id"}},
            "depends_on": {"nodes": depends},
        }

    manifest = parse_manifest(
        {
            "metadata": {
                "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
                "project_name": "p",
            },
            "nodes": {"model.p.up": node("up", {}, []), "model.p.m": node("m", meta, ["model.p.up"])},
        }
    )
    try:
        load_ldm(manifest, CONFIG)
    except LdmDeclarationError as e:
        # A declaration on m can make `up` its error sink, whose missing fields are reported on `up`.
        assert e.problems and all(p.entity in {"m", "up"} for p in e.problems)
        assert "\n" not in str(e)
