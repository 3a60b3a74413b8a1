"""`cdme bench lineage`: CDME's OpenLineage events against OpenLineage's own dbt artifact processor.

Both producers get the same artifacts: the reference project's last `cdme build` (manifest + run results) and
the research projects' compiled manifests with run results of a build where every node succeeded. Compared:
events, distinct datasets, facet keys present, column-lineage edges, schema validity (every event against the
local OpenLineage spec, each facet against its `_schemaURL`) and time (median of `repeat` runs). Then the time
of finalize's own work for a 1M-trade run (ledger, `ledger.json`, events, lineage graph), excluding the
adjoint's partitions query and the database insert.

Needs the `bench` extra (`openlineage-integration-common`) and `jsonschema` (the `dev` extra).
"""

from __future__ import annotations

import logging
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from psycopg import sql

from services.core.artifacts import Manifest, RunResults, load_manifest, load_run_results, parse_run_results
from services.core.settings import PROJECT_ROOT, CdmeSettings
from services.core.warehouse import create_warehouse_engine, libpq_url
from services.lineage.domain.columns import project_column_lineage
from services.lineage.domain.events import RunContext, build_events
from services.lineage.domain.partitions import parse_partitions
from services.lineage.domain.spec import EventValidator
from services.lineage.finalize import FinalizeInput, build_run
from services.lineage.store import LineageStore
from services.validation.domain.analysis import project_schemas

RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results" / "lineage.json"
RESEARCH_DATA = PROJECT_ROOT.parent / "shared" / "research-data"
NAMESPACE = "postgres://127.0.0.1:5432"
_RUN_ID = "01937e0a-5b1c-7000-8000-00000000be00"
_EXECUTED = ("model", "seed", "snapshot", "test")


def synthetic_run_results(manifest: Manifest) -> dict[str, Any]:
    """`run_results.json` of a `dbt build` in which every model, seed, snapshot and test succeeded."""
    results: list[dict[str, Any]] = []
    for i, node in enumerate(n for n in manifest.nodes.values() if n.resource_type in _EXECUTED):
        at = f"2026-11-20T06:{i // 60 % 60:02d}:{i % 60:02d}.000000Z"
        results.append(
            {
                "unique_id": node.unique_id,
                "status": "pass" if node.resource_type == "test" else "success",
                "timing": [{"name": "execute", "started_at": at, "completed_at": at}],
                "execution_time": 0.1,
                "adapter_response": {},
                "message": None,
                "failures": 0 if node.resource_type == "test" else None,
                "thread_id": "Thread-1",
            }
        )
    return {
        "metadata": {
            "dbt_schema_version": "https://schemas.getdbt.com/dbt/run-results/v6.json",
            "dbt_version": manifest.metadata.dbt_version,
            "generated_at": "2026-11-20T06:59:59Z",
            "invocation_id": _RUN_ID,
        },
        "results": results,
        "elapsed_time": 1.0,
        "args": {"which": "build"},
    }


def _cases(artifacts: Path | None) -> list[tuple[str, Path, dict[str, Any]]]:
    import json

    cases = []
    if artifacts is not None and (artifacts / "run_results.json").exists():
        data = json.loads((artifacts / "run_results.json").read_text())
        data.setdefault("args", {}).setdefault("which", "build")
        cases.append(("reference project (cdme build)", artifacts / "manifest.json", data))
    for path in sorted(RESEARCH_DATA.glob("*-compiled-manifest.json.gz")):
        cases.append((path.name.split("-v12")[0], path, synthetic_run_results(load_manifest(path))))
    return cases


def _cdme_events(manifest: Manifest, results: RunResults, project_dir: Path | None) -> list[dict[str, Any]]:
    schemas = project_schemas(manifest, project_dir=project_dir)
    return build_events(
        RunContext(
            run_id=_RUN_ID,
            project=manifest.metadata.project_name or "dbt",
            target="dev",
            job_namespace="cdme",
            dataset_namespace=NAMESPACE,
            manifest=manifest,
            run_results=results,
            column_lineage=project_column_lineage(manifest, schemas=schemas),
            schemas=schemas,
        )
    )


def _openlineage_events(manifest_path: Path, run_results: dict[str, Any]) -> list[dict[str, Any]]:
    import gzip
    import json

    from openlineage.client.serde import Serde
    from openlineage.common.provider.dbt.processor import DbtArtifactProcessor

    raw = manifest_path.read_bytes()
    manifest = json.loads(gzip.decompress(raw) if manifest_path.suffix == ".gz" else raw)

    class ArtifactProcessor(DbtArtifactProcessor):  # type: ignore[misc]  # the package ships no types
        def get_dbt_metadata(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], None]:
            profile = {"type": "postgres", "host": "127.0.0.1", "port": 5432}
            return manifest, run_results, profile, None

        def dbt_run_run_facet(self) -> dict[str, Any]:
            return {}  # the local processor's facet names the invocation; artifacts alone have none to give

    processor = ArtifactProcessor(producer="https://github.com/OpenLineage/OpenLineage", job_namespace="cdme")
    return [json.loads(Serde.to_json(e)) for e in processor.parse().events()]


def _facet_keys(event: dict[str, Any]) -> set[str]:
    keys = {f"run.{k}" for k in (event.get("run", {}).get("facets") or {})}
    keys |= {f"job.{k}" for k in (event.get("job", {}).get("facets") or {})}
    for side in ("inputs", "outputs"):
        for dataset in event.get(side) or []:
            for group in ("facets", "inputFacets", "outputFacets"):
                keys |= {f"dataset.{k}" for k in (dataset.get(group) or {})}
    return keys


def _column_edges(event: dict[str, Any]) -> int:
    if event.get("eventType") == "START":
        return 0
    total = 0
    for dataset in event.get("outputs") or []:
        lineage = (dataset.get("facets") or {}).get("columnLineage") or {}
        total += sum(len(f.get("inputFields") or []) for f in (lineage.get("fields") or {}).values())
        total += len(lineage.get("dataset") or [])
    return total


def summarize(events: list[dict[str, Any]], validator: EventValidator, seconds: float) -> dict[str, Any]:
    """Counts of one producer's events: datasets, facet keys, column edges, validity."""
    datasets = {
        (d["namespace"], d["name"]) for e in events for s in ("inputs", "outputs") for d in e.get(s) or []
    }
    invalid = 0
    unresolvable = 0
    first_error = None
    for event in events:
        errors = validator.errors(event)
        unknown = [e for e in errors if "is not a known schema version" in e]
        unresolvable += len(unknown)
        if len(errors) > len(unknown):
            invalid += 1
            first_error = first_error or next(e for e in errors if e not in unknown)
    facets = sorted(set().union(*(_facet_keys(e) for e in events)) if events else set())
    return {
        "events": len(events),
        "datasets": len(datasets),
        "facets": facets,
        "column_edges": sum(_column_edges(e) for e in events),
        "invalid_events": invalid,
        "facets_without_known_schema": unresolvable,
        "first_error": first_error,
        "seconds": round(seconds, 4),
    }


def _median_time(
    function: Callable[[], list[dict[str, Any]]], repeat: int
) -> tuple[list[dict[str, Any]], float]:
    times = []
    result: list[dict[str, Any]] = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times)


def _finalize_case(artifacts: Path, trades: int, warehouse_url: str | None) -> dict[str, Any]:
    """Finalize's own work for a run of `trades` trades on the reference project's artifacts.

    With a warehouse, the run, ledger and events are also inserted (into a scratch database); the partitions
    query, which the adjoint service runs, is not part of it.
    """
    manifest = load_manifest(artifacts / "manifest.json")
    results = load_run_results(artifacts / "run_results.json")
    cancelled, errored = trades * 29 // 1000, trades * 17 // 1000
    active = trades - cancelled
    keys = [f"cdme-key/v1:T{i:09d}" for i in range(10)]

    def morphism(
        model: str, upstream: str, n_in: int, mapped: int, filtered: int, failed: int
    ) -> dict[str, Any]:
        return {
            "model": model,
            "unique_id": f"model.cdme_trading.{model}",
            "upstream_unique_id": f"model.cdme_trading.{upstream}",
            "input": n_in,
            "mapped": mapped,
            "filtered": filtered,
            "errored": failed,
            "output": mapped,
            "overlap": {"count": 0, "samples": []},
            "unaccounted": {"count": 0, "samples": keys[:0]},
            "locations": {"mapped": f"cdme_adjoint.mapped#run={_RUN_ID}"},
        }

    document = {
        "run_id": _RUN_ID,
        "epoch": "2026-11-20",
        "lineage_mode": "full",
        "morphisms": [
            morphism("int_trades_active", "stg_trades", trades, active, cancelled, 0),
            morphism("int_trades_enriched", "int_trades_active", active, active - errored, 0, errored),
        ],
        "sources": [
            {
                "source": "raw_trading.trades",
                "unique_id": "source.cdme_trading.raw_trading.trades",
                "input": trades,
                "fates": {"reached_output": active - errored, "filtered": cancelled, "errored": errored},
            }
        ],
    }
    with tempfile.TemporaryDirectory() as tmp, _scratch_store(warehouse_url) as store:
        settings = CdmeSettings(home=Path(tmp), runs_dir=Path(tmp))
        times = []
        events = 0
        for _ in range(3):
            run_id = str(uuid.uuid4())
            started = time.perf_counter()
            partitions = parse_partitions({**document, "run_id": run_id})
            record, ledger, path, built = build_run(
                settings,
                NAMESPACE,
                FinalizeInput(run_id=run_id, artifact_dir=Path(tmp), dbt_succeeded=True),
                Path(tmp),
                manifest,
                results,
                None,
                partitions,
            )
            if store is not None:
                store.save_run(record, ledger, path, built)
            times.append(time.perf_counter() - started)
            events = len(built)
        assert ledger is not None and record.status == "COMPLETE"
    return {
        "trades": trades,
        "median_seconds": round(statistics.median(times), 4),
        "events": events,
        "includes_database_insert": store is not None,
        "goal_seconds": 2.0,
    }


@contextmanager
def _scratch_store(warehouse_url: str | None) -> Iterator[LineageStore | None]:
    """A lineage store in a database created for the benchmark on the warehouse's server, dropped afterwards."""
    if warehouse_url is None:
        yield None
        return
    import psycopg

    from services.core.migrations import migrate

    name = f"cdme_bench_lineage_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(warehouse_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    engine = create_warehouse_engine(libpq_url(warehouse_url, name), pool_size=1)
    try:
        migrate(engine, "lineage")
        yield LineageStore(engine)
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def latest_build_artifacts(settings: CdmeSettings) -> Path | None:
    """The newest `cdme build` target directory holding both manifest and run results."""
    candidates = sorted(
        (p.parent for p in (settings.home / "runs").glob("*/target/run_results.json")),
        key=lambda p: p.stat().st_mtime,
    )
    return candidates[-1] if candidates else None


def run_lineage_benchmark(
    artifacts: Path | None, repeat: int = 3, warehouse_url: str | None = None
) -> dict[str, Any]:
    """Run every case and write `benchmarks/results/lineage.json`.

    Args:
        artifacts: The reference project's build artifacts (`cdme build` writes them), if any.
        repeat: Runs per producer and case; the median time is reported.
        warehouse_url: A PostgreSQL server on which finalize's inserts are timed too (in a scratch database).

    Returns:
        The figures (also written to `RESULTS_PATH`).
    """
    import json

    logging.getLogger("openlineage").setLevel(logging.ERROR)
    validator = EventValidator.from_directory()
    cases = []
    for name, manifest_path, run_results in _cases(artifacts):
        manifest = load_manifest(manifest_path)
        results = parse_run_results(run_results)
        project_dir = PROJECT_ROOT / "dbt_project" if name.startswith("reference") else None
        ours, ours_s = _median_time(partial(_cdme_events, manifest, results, project_dir), repeat)
        theirs, theirs_s = _median_time(partial(_openlineage_events, manifest_path, run_results), repeat)
        cdme = summarize(ours, validator, ours_s)
        reference = summarize(theirs, validator, theirs_s)
        cases.append(
            {
                "name": name,
                "cdme": cdme,
                "openlineage_dbt": reference,
                "facets_only_in_openlineage_dbt": sorted(set(reference["facets"]) - set(cdme["facets"])),
                "superset_of_datasets": cdme["datasets"] >= reference["datasets"],
            }
        )
    from importlib.metadata import version

    result = {
        "measured_at": datetime.now(UTC).isoformat(),
        "repeat": repeat,
        "openlineage_integration_common": version("openlineage-integration-common"),
        "cases": cases,
        "finalize": _finalize_case(artifacts, 1_000_000, warehouse_url) if artifacts is not None else None,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
    return result
