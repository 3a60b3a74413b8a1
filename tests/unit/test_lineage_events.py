"""OpenLineage events and column lineage from the research projects' real compiled manifests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from services.core.artifacts import Manifest, RunResults, load_manifest, parse_run_results
from services.lineage.domain.columns import project_column_lineage
from services.lineage.domain.events import RunContext, build_events, event_id
from services.lineage.domain.spec import EventValidator
from tests.conftest import RESEARCH_DATA

MANIFESTS = sorted(RESEARCH_DATA.glob("*-compiled-manifest.json.gz"))
RUN_ID = "01937e0a-5b1c-7000-8000-0000000000aa"


@pytest.fixture(scope="module")
def validator() -> EventValidator:
    return EventValidator.from_directory()


def run_results_for(manifest: Manifest, failing: str | None = None) -> RunResults:
    """The run results of a build of every model, seed, snapshot and test of `manifest` (one may fail)."""
    results: list[dict[str, Any]] = []
    for i, node in enumerate(
        n for n in manifest.nodes.values() if n.resource_type in {"model", "seed", "snapshot", "test"}
    ):
        ok = "pass" if node.resource_type == "test" else "success"
        status = ("fail" if node.resource_type == "test" else "error") if node.unique_id == failing else ok
        started = f"2026-11-20T06:{i // 60 % 60:02d}:{i % 60:02d}.000000Z"
        results.append(
            {
                "unique_id": node.unique_id,
                "status": status,
                "timing": [{"name": "execute", "started_at": started, "completed_at": started}],
                "execution_time": 0.5,
                "adapter_response": {"rows_affected": 10},
                "message": 'relation "missing" does not exist' if status == "error" else None,
                "failures": 3 if status == "fail" else (0 if node.resource_type == "test" else None),
            }
        )
    return parse_run_results(
        {
            "metadata": {"dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json"},
            "results": results,
            "elapsed_time": 1.0,
        }
    )


def _context(manifest: Manifest, results: RunResults | None, **kw: Any) -> RunContext:
    return RunContext(
        run_id=RUN_ID,
        project=manifest.metadata.project_name or "p",
        target="dev",
        job_namespace="cdme",
        dataset_namespace="postgres://127.0.0.1:5432",
        manifest=manifest,
        run_results=results,
        column_lineage=project_column_lineage(manifest),
        **kw,
    )


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name.split("-v12")[0])
def test_every_event_of_a_real_project_is_valid(path: Path, validator: EventValidator) -> None:
    manifest = load_manifest(path)
    events = build_events(_context(manifest, run_results_for(manifest)))
    executed = [
        n for n in manifest.nodes.values() if n.resource_type in {"model", "seed", "snapshot", "test"}
    ]
    assert len(events) == 2 + 2 * len(executed)
    for event in events:
        assert validator.errors(event) == [], event["job"]["name"]
    assert len({event_id(e) for e in events}) == len(events)
    outputs = [o for e in events if e["eventType"] == "COMPLETE" for o in e["outputs"]]
    assert all(o["namespace"] == "postgres://127.0.0.1:5432" and o["name"].count(".") == 2 for o in outputs)
    lineage = [o for o in outputs if "columnLineage" in o["facets"]]
    assert len(lineage) >= len([n for n in executed if n.resource_type == "model"]) * 0.9
    tests = [
        e for e in events if e["job"]["facets"]["jobType"]["jobType"] == "TEST" and e["eventType"] != "START"
    ]
    assertions = [
        i["inputFacets"]["dataQualityAssertions"]["assertions"][0] for e in tests for i in e["inputs"]
    ]
    assert assertions and all(a["success"] for a in assertions)


def test_a_failed_model_and_test_carry_the_error_and_the_real_result(validator: EventValidator) -> None:
    manifest = load_manifest(next(p for p in MANIFESTS if p.name.startswith("jaffle")))
    model = next(n.unique_id for n in manifest.models())
    test = next(n.unique_id for n in manifest.nodes.values() if n.resource_type == "test")
    for failing in (model, test):
        events = build_events(
            _context(manifest, run_results_for(manifest, failing), status="FAILED", reason="x")
        )
        (fail,) = [e for e in events if e["eventType"] == "FAIL" and e["job"]["name"] == failing]
        assert validator.errors(fail) == []
        if failing == model:
            assert fail["run"]["facets"]["errorMessage"]["message"] == 'relation "missing" does not exist'
        else:
            (assertion,) = fail["inputs"][0]["inputFacets"]["dataQualityAssertions"]["assertions"]
            assert (assertion["success"], assertion["actual"]) == (False, "3")
        assert events[-1]["eventType"] == "FAIL" and events[-1]["job"]["name"] == "jaffle_shop.dev"


def test_without_run_results_the_run_still_fails_with_the_reason(validator: EventValidator) -> None:
    manifest = load_manifest(MANIFESTS[0])
    reason = "dbt failed: Compilation Error in model x"
    events = build_events(_context(manifest, None, status="FAILED", reason=reason))
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[1]["run"]["facets"]["errorMessage"]["message"] == reason
    assert all(validator.errors(e) == [] for e in events)


def test_events_are_identical_when_built_twice() -> None:
    manifest = load_manifest(MANIFESTS[-1])
    results = run_results_for(manifest)
    first = build_events(_context(manifest, results))
    second = build_events(_context(manifest, results))
    assert [json.dumps(e["run"]) for e in first[:-1]] == [json.dumps(e["run"]) for e in second[:-1]]


def test_the_validator_rejects_a_bad_facet_and_an_unknown_version(validator: EventValidator) -> None:
    manifest = load_manifest(MANIFESTS[-1])
    event = next(e for e in build_events(_context(manifest, run_results_for(manifest))) if e["outputs"])
    broken = copy.deepcopy(event)
    broken["job"]["facets"]["jobType"].pop("integration")
    assert any("'integration' is a required property" in e for e in validator.errors(broken))
    broken = copy.deepcopy(event)
    broken["job"]["facets"]["sql"]["_schemaURL"] = broken["job"]["facets"]["sql"]["_schemaURL"].replace(
        "1-1-0", "1-0-0"
    )
    assert any("not a known schema version" in e for e in validator.errors(broken))
    broken = copy.deepcopy(event)
    broken["run"]["runId"] = 42
    assert validator.errors(broken)


def test_column_lineage_goes_through_ctes_and_star_with_transformation_types() -> None:
    manifest = load_manifest(next(p for p in MANIFESTS if p.name.startswith("jaffle")))
    lineage = project_column_lineage(manifest)
    orders = next(v for k, v in lineage.items() if k.endswith(".orders"))
    assert orders.error is None
    subtypes = {e.subtype for edges in orders.fields.values() for e in edges}
    assert {"IDENTITY"} < subtypes
    assert all(
        e.unique_id in manifest.nodes or e.unique_id in manifest.sources
        for edges in orders.fields.values()
        for e in edges
    )
    assert any(e.type == "INDIRECT" for e in orders.dataset)


def test_upstream_columns_are_transitive_nearest_first_and_stop_on_cycles() -> None:
    from services.lineage.finalize import upstream_columns

    def edge(
        dataset: str, column: str, source: str, source_column: str, subtype: str = "IDENTITY"
    ) -> dict[str, Any]:
        return {
            "dataset": dataset,
            "column": column,
            "input_dataset": source,
            "input_column": source_column,
            "type": "DIRECT",
            "subtype": subtype,
            "masking": False,
        }

    graph = {
        "columns": [
            edge("db.marts.fct", "total", "db.int.enriched", "amount_usd", "AGGREGATION"),
            edge("db.int.enriched", "amount_usd", "db.stg.trades", "amount", "TRANSFORMATION"),
            edge("db.int.enriched", "amount_usd", "db.ref.fx", "rate", "TRANSFORMATION"),
            edge("db.stg.trades", "amount", "db.raw.trades", "amount"),
            edge("db.raw.trades", "amount", "db.stg.trades", "amount"),  # a cycle must not loop
        ]
    }
    found = upstream_columns(graph, "DB.MARTS.FCT", "Total")
    assert [(u["dataset"], u["column"], u["depth"]) for u in found] == [
        ("db.int.enriched", "amount_usd", 1),
        ("db.ref.fx", "rate", 2),
        ("db.stg.trades", "amount", 2),
        ("db.raw.trades", "amount", 3),
    ]
    assert upstream_columns(graph, "db.raw.trades", "nothing") == []
