"""How long validation takes: real projects and a 2,000-model synthetic one from cold, and one changed model warm.

Each case is timed `repeat` times and reported as the median, with the model count and the errors validation
found (all of these projects are valid, so any error is a false one). The result names the machine and the
time of the measurement and is written to `benchmarks/results/validate.json`.

Examples:
    >>> result = run_validation_benchmark(repeat=3)
    >>> [c["name"] for c in result["cases"]][-2:], result["totals"]["errors"]
    (['synthetic', 'one change'], 0)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.artifacts import Manifest, load_manifest, parse_manifest
from services.core.benchmarking import load_average, machine, measured_at, write_result
from services.core.settings import PROJECT_ROOT
from services.validation.domain import analysis
from services.validation.domain.findings import Report
from services.validation.domain.synthetic import change_one_model, synthetic_manifest
from services.validation.domain.validate import validate_project

RESEARCH_DATA = PROJECT_ROOT.parent / "shared" / "research-data"
RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results" / "validate.json"
SYNTHETIC_MODELS = 2000
SYNTHETIC_SEED = 7
CHANGE_SEED = 1
# The goals on the development machine: (case, wording, seconds, models the figure is for).
GOALS = (
    ("real", "about 700 real models in <= 3 s", 3.0, 700),
    ("synthetic", "2,000 generated models in <= 8 s", 8.0, 2000),
    ("one change", "one changed model in <= 100 ms", 0.1, None),
)


def _cold() -> None:
    # A cold run must analyse every model, but a warm cache from the previous run would answer instead.
    # analysis.py has no public way to empty it and a benchmark is no reason to add one.
    analysis._CACHE.clear()


def _timed(
    validate: Callable[[], Report], repeat: int, before: Callable[[], None]
) -> tuple[list[float], Report]:
    def run() -> tuple[float, Report]:
        before()
        start = time.perf_counter()
        report = validate()
        return time.perf_counter() - start, report

    runs = [run() for _ in range(repeat)]
    return [seconds for seconds, _ in runs], runs[-1][1]


def _case(name: str, kind: str, seconds: list[float], report: Report, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "models": report.coverage.models,
        "median_seconds": round(statistics.median(seconds), 4),
        "seconds": [round(s, 4) for s in seconds],
        "errors": len(report.errors),
        "column_share": round(report.coverage.column_share, 4),
        **extra,
    }


def _cold_case(name: str, kind: str, manifest: Manifest, repeat: int, workers: int) -> dict[str, Any]:
    seconds, report = _timed(lambda: validate_project(manifest, workers=workers), repeat, _cold)
    return _case(name, kind, seconds, report)


def _one_change_case(original: Manifest, changed: Manifest, repeat: int, workers: int) -> dict[str, Any]:
    reanalysed: list[int] = []

    def warm() -> None:
        # Re-warmed from empty each time: otherwise the changed model's own result from the previous repeat
        # would be cached too, and the repeat would time no analysis at all.
        _cold()
        validate_project(original, workers=workers)
        reanalysed.append(-len(analysis._CACHE))

    def validate() -> Report:
        report = validate_project(changed, workers=workers)
        reanalysed[-1] += len(analysis._CACHE)
        return report

    seconds, report = _timed(validate, repeat, warm)
    return _case("one change", "one change", seconds, report, models_reanalysed=max(reanalysed))


def _goals(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    goals = []
    for kind, wording, target, for_models in GOALS:
        matching = [c for c in cases if c["kind"] == kind]
        models = sum(c["models"] for c in matching)
        if not matching or not models:
            continue
        measured = sum(c["median_seconds"] for c in matching)
        # A goal stated for N models holds for the models measured at the same rate per model.
        scaled = target * models / for_models if for_models else target
        goals.append(
            {
                "case": kind,
                "goal": wording,
                "models": models,
                "target_seconds": round(scaled, 4),
                "measured_seconds": round(measured, 4),
                "ratio": round(measured / scaled, 2),
                "met": measured <= scaled,
            }
        )
    return goals


def run_validation_benchmark(
    repeat: int = 3,
    *,
    synthetic_models: int = SYNTHETIC_MODELS,
    research_data: Path = RESEARCH_DATA,
    out: Path | None = RESULTS_PATH,
    workers: int | None = None,
) -> dict[str, Any]:
    """Time `validate_project` on real projects, a synthetic project and one changed model.

    Real projects are every `*.json.gz` manifest under `research_data` (none when it is missing). Cold cases
    empty the per-model cache before each run. "One change" validates the synthetic project (warming the cache),
    then times validating a copy where one mid-graph model gained a column.

    Args:
        repeat: Runs per case; the median is reported.
        synthetic_models: Models of the synthetic project.
        research_data: The directory of real compiled manifests.
        out: Where to write the result as JSON (None: nowhere).
        workers: Processes analysing independent models at once (default: one per CPU, as `cdme validate`).

    Returns:
        `cases` (name, kind, models, median and individual seconds, errors, column share), `totals`, `goals`
        (target, measured, their ratio and whether it is met), `machine` (with the 1-minute load average
        before the run) and `measured_at`.

    Raises:
        ValueError: `repeat` is less than 1.
    """
    if repeat < 1:
        msg = f"repeat must be at least 1, got {repeat}"
        raise ValueError(msg)
    # Figures taken while something else keeps the CPUs busy are slower; the load says whether they were.
    load = load_average()
    workers = workers or os.cpu_count() or 1
    cases = [
        _cold_case(path.name.split("-v12")[0], "real", load_manifest(path), repeat, workers)
        for path in sorted(research_data.glob("*.json.gz"))
    ]
    data = synthetic_manifest(synthetic_models, seed=SYNTHETIC_SEED)
    synthetic = parse_manifest(data, "synthetic")
    cases.append(_cold_case("synthetic", "synthetic", synthetic, repeat, workers))
    changed = parse_manifest(change_one_model(data, seed=CHANGE_SEED), "synthetic, one model changed")
    cases.append(_one_change_case(synthetic, changed, repeat, workers))
    real = [c for c in cases if c["kind"] == "real"]
    result = {
        "benchmark": "validate",
        "repeat": repeat,
        "workers": workers,
        "cases": cases,
        "totals": {
            "real_models": sum(c["models"] for c in real),
            "real_seconds": round(sum(c["median_seconds"] for c in real), 4),
            "errors": sum(c["errors"] for c in cases),
        },
        "goals": _goals(cases),
        "machine": machine(load),
        "measured_at": measured_at(),
    }
    write_result(out, result)
    return result
