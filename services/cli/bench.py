"""`cdme bench`: timed runs that print their figures and write them to `benchmarks/results/`."""

from __future__ import annotations

import importlib.util
import json
from typing import Annotated, Any

import typer

from services.core.errors import UsageError
from services.validation.domain.bench import RESULTS_PATH, run_validation_benchmark

bench_app = typer.Typer(
    help="Benchmarks: timed runs that print figures and write them to benchmarks/results/.",
    no_args_is_help=True,
)


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
    machine = result["machine"]
    load = machine.get("load_average_before")
    lines.append(
        f"median of {result['repeat']} runs, {result.get('workers', 1)} workers, on {machine['cpus']} CPUs, "
        f"{machine['platform']}, "
        f"Python {machine['python']}, {result['measured_at']}"
        + (f", load average {load} before" if load is not None else "")
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
    if output not in {"json", "text"}:
        msg = f"--format must be text or json, got {output!r}"
        raise UsageError(msg)
    result = run_validation_benchmark(repeat, workers=workers or None)
    if output == "json":
        typer.echo(json.dumps(result))
    else:
        for line in format_validation_benchmark(result):
            typer.echo(line)
        typer.echo(f"written to {RESULTS_PATH}")
    if result["totals"]["errors"]:
        typer.echo(
            f"cdme: error: validation reported {result['totals']['errors']} errors on projects that have none",
            err=True,
        )
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
    from pathlib import Path

    from services.core.errors import CdmeError
    from services.core.settings import get_settings
    from services.core.warehouse import resolve_warehouse_url
    from services.lineage.bench import RESULTS_PATH as LINEAGE_RESULTS
    from services.lineage.bench import latest_build_artifacts, run_lineage_benchmark

    if output not in {"json", "text"}:
        msg = f"--format must be text or json, got {output!r}"
        raise UsageError(msg)
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
    if output == "json":
        typer.echo(json.dumps(result))
    else:
        for line in format_lineage_benchmark(result):
            typer.echo(line)
        typer.echo(f"written to {LINEAGE_RESULTS}")
