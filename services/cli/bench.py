"""`cdme bench`: timed runs that print their figures and write them to `benchmarks/results/`."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from services.adjoint.domain.bench import RESULTS_PATH as ADJOINT_RESULTS_PATH
from services.adjoint.domain.bench import run_adjoint_benchmark
from services.cli import stack
from services.cli.pipeline import planner_client
from services.core.benchmarking import machine_line
from services.core.errors import UsageError
from services.core.settings import get_settings
from services.core.warehouse import libpq_url, resolve_warehouse_url
from services.datagen.trading import parse_epoch
from services.planner import bench as e2e
from services.validation.domain.bench import RESULTS_PATH, run_validation_benchmark

bench_app = typer.Typer(
    help="Benchmarks: timed runs that print figures and write them to benchmarks/results/.",
    no_args_is_help=True,
)


def _require_format(output: str) -> None:
    if output not in {"json", "text"}:
        msg = f"--format must be text or json, got {output!r}"
        raise UsageError(msg)


def _emit(
    result: dict[str, Any], output: str, lines_of: Callable[[dict[str, Any]], list[str]], written_to: Path
) -> None:
    """`--format json`: the result as one JSON object; text: its lines and where the file was written."""
    if output == "json":
        typer.echo(json.dumps(result))
        return
    for line in lines_of(result):
        typer.echo(line)
    typer.echo(f"written to {written_to}")


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.3f} s"


def format_validation_benchmark(result: dict[str, Any]) -> list[str]:
    """The lines `cdme bench validate` prints for a result of `run_validation_benchmark`.

    Args:
        result: The benchmark's result.

    Returns:
        One line per case, then the totals, one line per goal, and the machine.
    """
    lines = []
    for case in result["cases"]:
        detail = f"{case['models']:,} models"
        if "models_reanalysed" in case:
            detail += f", {case['models_reanalysed']} re-analysed"
        lines.append(f"{case['name']} ({detail}): {case['median_seconds']:.3f} s")
    totals = result["totals"]
    lines.append(
        f"real projects: {totals['real_models']:,} models in {totals['real_seconds']:.3f} s; "
        f"{totals['errors']} errors in all cases"
    )
    for goal in result["goals"]:
        scaled = (
            ""
            if goal["case"] == "one change"
            else f" ({goal['models']:,} models: <= {_seconds(goal['target_seconds'])})"
        )
        verdict = "met" if goal["met"] else "missed"
        lines.append(
            f"goal: {goal['goal']}{scaled}; measured {_seconds(goal['measured_seconds'])}, "
            f"{goal['ratio']:.2f}x the goal: {verdict}"
        )
    lines.append(
        f"median of {result['repeat']} runs, {result.get('workers', 1)} workers, on {machine_line(result)}"
    )
    return lines


@bench_app.command("validate")
def bench_validate(
    repeat: Annotated[
        int, typer.Option("--repeat", min=1, help="Runs per case; the median is reported.")
    ] = 3,
    output: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes analysing models at once (0: one per CPU).")
    ] = 0,
) -> None:
    """Time validation of the real projects, a 2,000-model synthetic project and one changed model.

    Exits 1 when validation reports an error on any of them: they are all valid, so an error is a false one.
    """
    _require_format(output)
    result = run_validation_benchmark(repeat, workers=workers or None)
    _emit(result, output, format_validation_benchmark, RESULTS_PATH)
    if result["totals"]["errors"]:
        typer.echo(
            f"cdme: error: validation reported {result['totals']['errors']} errors on projects that have none",
            err=True,
        )
        raise typer.Exit(1)


def format_adjoint_benchmark(result: dict[str, Any]) -> list[str]:
    """The lines `cdme bench adjoint` prints for a result of `run_adjoint_benchmark`."""
    builds = "/".join(f"{seconds:.1f}" for seconds in result.get("dbt_build_rounds_seconds", []))
    lines = [
        f"{result['trades']:,} trades, epoch {result['epoch']}: dbt build {result['dbt_build_seconds']:.1f} s"
        + (f" (median of {builds} s)" if builds else "")
    ]
    for mode, figures in result["capture"].items():
        rounds = "/".join(f"{seconds:.1f}" for seconds in figures.get("rounds_seconds", []))
        lines.append(
            f"capture {mode:<13} {figures['seconds']:8.2f} s  ({figures['ratio_to_build']:.2f}x the build, "
            f"{figures['pairs']:,} pairs; median of {rounds} s)"
        )
    settled = result.get("checkpoint_seconds", {})
    if settled:
        done = [seconds for seconds in settled.values() if seconds is not None]
        lines.append(
            f"checkpoints before each timed phase (untimed): {len(done)} of {len(settled)} run, "
            f"{sum(done):.1f} s in all, the longest {max(done, default=0):.1f} s"
        )
    lines.append(
        f"storage: {result['bytes_per_mapped_pair']} bytes per mapped pair, indexes included "
        f"({result['bytes_per_stored_pair']} per stored pair: {result['stored_pairs']:,} of "
        f"{result['capture']['full']['pairs']:,} stored, the rest implied by identities)"
    )
    for where, label in (("in_database", "in the database"), ("over_http", "over HTTP")):
        for query, figures in result[where].items():
            lines.append(
                f"{query:<22} {label:<16} p50 {figures['p50_ms']:8.3f} ms  p99 {figures['p99_ms']:8.3f} ms "
                f"({figures['samples']:,} keys)"
            )
    floor = result.get("round_trip_select_1")
    if floor:
        lines.append(
            f"{'select 1 (the floor)':<22} {'in the database':<16} p50 {floor['p50_ms']:8.3f} ms  "
            f"p99 {floor['p99_ms']:8.3f} ms ({floor['samples']:,} round trips)"
        )
    lines.append(
        f"impact of 1,000 source keys in one query: {result['impact_1000_source_keys_seconds'] * 1000:.1f} ms"
    )
    derived = result.get("key_derivable_mart_to_raw_seconds")
    if derived:
        samples = "/".join(f"{seconds:.2f}" for seconds in derived["samples_seconds"])
        lines.append(
            f"mart-to-raw backward on the key_derivable run (checkpoints checked, pairs derived again): "
            f"median {derived['median']:.2f} s ({samples} s)"
        )
    for goal in result["goals"]:
        verdict = "met" if goal["met"] else "missed"
        lines.append(f"goal {goal['goal']} <= {goal['target']}: measured {goal['measured']}: {verdict}")
    lines.append(f"on {machine_line(result)}")
    return lines


@bench_app.command("adjoint")
def bench_adjoint(
    trades: Annotated[
        int, typer.Option("--trades", min=1, help="Trades in the benchmark epoch.")
    ] = 1_000_000,
    output: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Time the dbt build, capture per lineage mode, storage, and backward/impact latency (SQL and HTTP)."""
    _require_format(output)
    result = run_adjoint_benchmark(
        get_settings(),
        trades,
        progress=None if output == "json" else lambda line: typer.echo(f"... {line}", err=True),
    )
    _emit(result, output, format_adjoint_benchmark, ADJOINT_RESULTS_PATH)


@bench_app.command("e2e")
def bench_e2e(
    trades: Annotated[int, typer.Option("--trades", min=1, help="Trades in the epoch.")] = 1_000_000,
    epoch: Annotated[str, typer.Option("--epoch", help="Business date, YYYY-MM-DD.")] = "2026-11-20",
    output: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Time one epoch through the planner (validate, dbt build, capture, finalize) and the planner's overhead.

    Starts the embedded PostgreSQL and the services if they are not running. Exits 1 unless the run is COMPLETE.
    """
    _require_format(output)
    settings = get_settings()
    url = libpq_url(resolve_warehouse_url(settings, start_embedded=True))
    stack.start(settings, url)
    with planner_client(settings) as planner:
        result = e2e.run_e2e_benchmark(
            planner=planner,
            warehouse_url=url,
            project_dir=settings.project_dir,
            trades=trades,
            epoch=parse_epoch(epoch),
        )
    _emit(result, output, e2e.format_e2e_benchmark, e2e.RESULTS_PATH)
    if result["status"] != "COMPLETE":
        typer.echo(f"cdme: error: run {result['run_id']} {result['status']}: {result['reason']}", err=True)
        raise typer.Exit(1)


def format_lineage_benchmark(result: dict[str, Any]) -> list[str]:
    """The lines `cdme bench lineage` prints for a result of `run_lineage_benchmark`."""
    lines = []
    for case in result["cases"]:
        ours, theirs = case["cdme"], case["openlineage_dbt"]
        lines.append(
            f"{case['name']}: CDME {ours['events']} events, {ours['datasets']} datasets, {len(ours['facets'])} facet keys, "
            f"{ours['column_edges']} column edges, {ours['invalid_events']} invalid, {_seconds(ours['seconds'])} | "
            f"openlineage-dbt {theirs['events']} events, {theirs['datasets']} datasets, {len(theirs['facets'])} facet keys, "
            f"{theirs['column_edges']} column edges, {theirs['invalid_events']} invalid "
            f"({theirs['facets_without_known_schema']} facets without a known schema), {_seconds(theirs['seconds'])}"
        )
        if case["facets_only_in_openlineage_dbt"]:
            lines.append(
                f"  facets only openlineage-dbt emits: {', '.join(case['facets_only_in_openlineage_dbt'])}"
            )
    final = result["finalize"]
    if final is None:
        lines.append(
            "finalize: skipped (no reference build; run `cdme build --epoch D` first or pass --artifacts)"
        )
    else:
        verdict = "met" if final["median_seconds"] <= final["goal_seconds"] else "missed"
        lines.append(
            f"finalize of a {final['trades']:,}-trade run (excluding the partitions query): "
            f"{_seconds(final['median_seconds'])}, {final['events']} events"
            f"{', database insert included' if final['includes_database_insert'] else ', without the database insert'}"
            f"; goal <= 2 s: {verdict}"
        )
    return lines


@bench_app.command("lineage")
def bench_lineage(
    artifacts: Annotated[
        str | None,
        typer.Option(
            "--artifacts", help="A reference build's target dir (default: the newest `cdme build`)."
        ),
    ] = None,
    repeat: Annotated[
        int, typer.Option("--repeat", min=1, help="Runs per case; the median is reported.")
    ] = 3,
    output: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
) -> None:
    """Compare CDME's OpenLineage events with openlineage-integration-common's dbt processor on the same artifacts."""
    from services.core.errors import CdmeError
    from services.core.settings import get_settings
    from services.core.warehouse import resolve_warehouse_url
    from services.lineage.bench import RESULTS_PATH as LINEAGE_RESULTS
    from services.lineage.bench import latest_build_artifacts, run_lineage_benchmark

    _require_format(output)
    if importlib.util.find_spec("openlineage.common") is None:
        msg = "the lineage benchmark needs the bench extra: pip install -e '.[bench]'"
        raise UsageError(msg)
    directory = Path(artifacts) if artifacts else latest_build_artifacts(get_settings())
    if directory is not None and not (directory / "manifest.json").exists():
        msg = f"--artifacts {directory} holds no manifest.json"
        raise UsageError(msg)
    try:
        warehouse: str | None = resolve_warehouse_url(get_settings())
    except CdmeError:
        warehouse = None  # finalize is timed without its database insert
    result = run_lineage_benchmark(directory, repeat, warehouse)
    _emit(result, output, format_lineage_benchmark, LINEAGE_RESULTS)
