"""How long one epoch takes end to end through the planner, and how much of it is the planner's own.

The epoch's trades are generated first (not timed). Then one run goes through the planner service over HTTP,
as `./run_cdme.sh` sends it: validate, dbt build, capture, finalize (ledger, OpenLineage, gate). The figures
come from the planner's own record of the run: each step's duration, the run's total from creation to end,
and the planner's overhead, the total minus the steps' work (queueing, state transitions, artifact reads
between steps). They are written to `benchmarks/results/e2e.json` with the machine and the time.
"""

from __future__ import annotations

import time
from datetime import date, datetime
from pathlib import Path
from typing import Any

from services.core.benchmarking import load_average, machine, machine_line, measured_at, write_result
from services.core.http import ServiceClient
from services.core.settings import PROJECT_ROOT
from services.datagen.trading import GenerateRequest, currency_codes, generate

RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results" / "e2e.json"
# The goals on the development machine.
GOAL_TRADES = 1_000_000
GOAL_SECONDS = 60.0
GOAL_OVERHEAD_SECONDS = 1.0
_POLL_S = 0.2


def run_e2e_benchmark(
    *,
    planner: ServiceClient,
    warehouse_url: str,
    project_dir: Path,
    trades: int,
    epoch: date,
    seed: int = 42,
    out: Path | None = RESULTS_PATH,
) -> dict[str, Any]:
    """Generate an epoch, run it through the planner, and return (and write) the figures.

    Args:
        planner: A client of the planner service (with a token).
        warehouse_url: The warehouse the services use (the trades are loaded there).
        project_dir: The dbt project (its currency seed shapes the generated trades).
        trades: Trades to generate.
        epoch: The business date.
        seed: The generator's seed.
        out: Where to write the figures (None: nowhere).

    Raises:
        UpstreamServiceError: The planner refused the run or could not be reached.
    """
    load = load_average()
    report = generate(
        warehouse_url,
        GenerateRequest(trades=trades, epoch=epoch, seed=seed),
        currency_codes(project_dir / "seeds" / "currencies.csv"),
    )
    begun = time.perf_counter()
    run: dict[str, Any] = planner.post("/runs", json={"epoch": epoch.isoformat()}).json()
    while run["status"] not in {"COMPLETE", "FAILED", "CANCELLED"}:
        time.sleep(_POLL_S)
        run = planner.get(f"/runs/{run['id']}").json()
    client_seconds = time.perf_counter() - begun
    steps = [
        {"step": s["step"], "status": s["status"], "seconds": round(s["duration_seconds"] or 0.0, 3)}
        for s in run["steps"]
    ]
    total = (
        datetime.fromisoformat(run["ended_at"]) - datetime.fromisoformat(run["created_at"])
    ).total_seconds()
    work = sum(s["seconds"] for s in steps)
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "trades": trades,
        "generate_seconds": round(report.seconds, 3),
        "run_id": run["id"],
        "status": run["status"],
        "reason": run["reason"],
        "steps": steps,
        "total_seconds": round(total, 3),
        "steps_seconds": round(work, 3),
        "planner_overhead_seconds": round(total - work, 3),
        "client_seconds": round(client_seconds, 3),
        "trades_per_second": round(trades / total) if total > 0 else None,
        "goals": [
            {
                "goal": f"{GOAL_TRADES:,} trades end to end in <= {GOAL_SECONDS:.0f} s",
                "measured_seconds": round(total, 3),
                "trades": trades,
                "met": trades >= GOAL_TRADES and total <= GOAL_SECONDS and run["status"] == "COMPLETE",
                "applies": trades >= GOAL_TRADES,
            },
            {
                "goal": f"planner overhead <= {GOAL_OVERHEAD_SECONDS:.0f} s per run",
                "measured_seconds": round(total - work, 3),
                "met": total - work <= GOAL_OVERHEAD_SECONDS,
                "applies": True,
            },
        ],
        "machine": machine(load),
        "measured_at": measured_at(),
    }
    write_result(out, result)
    return result


def format_e2e_benchmark(result: dict[str, Any]) -> list[str]:
    """The lines `cdme bench e2e` prints for a result of `run_e2e_benchmark`."""
    lines = [f"{result['trades']:,} trades (generated in {result['generate_seconds']:.1f} s, not timed)"]
    for step in result["steps"]:
        if step["status"] != "skipped":
            lines.append(f"  {step['step']:<9} {step['status']:<10} {step['seconds']:8.3f} s")
    lines.append(
        f"run {result['run_id']} {result['status']}: total {result['total_seconds']:.3f} s, steps "
        f"{result['steps_seconds']:.3f} s, planner overhead {result['planner_overhead_seconds']:.3f} s "
        f"({result['trades_per_second'] or 0:,} trades/s)"
    )
    if result["reason"]:
        lines.append(f"  reason: {result['reason']}")
    for goal in result["goals"]:
        verdict = ("met" if goal["met"] else "missed") if goal["applies"] else "not applicable at this size"
        lines.append(f"goal: {goal['goal']}; measured {goal['measured_seconds']:.3f} s: {verdict}")
    lines.append(machine_line(result))
    return lines
