"""What every benchmark records beside its figures: the machine, its load before the run, and where it wrote them."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg


def load_average() -> float | None:
    """The 1-minute load average, where the platform has one: figures taken under load are slower."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine(load: float | None) -> dict[str, Any]:
    """CPUs, platform and Python of this machine, with the load average measured before the run."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": load,
    }


def settle(url: str, *, vacuum: bool = False) -> float | None:
    """Write out what earlier work left dirty (a CHECKPOINT), so the next timed phase does not pay for it.

    With `vacuum`, first VACUUM the database: the maintenance autovacuum would otherwise start on the tables a
    build just wrote, in the middle of a later phase.

    Returns the seconds it took, or None where the warehouse's role may not checkpoint (then the phases run
    unsettled, as they would in production).
    """
    started = time.perf_counter()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            if vacuum:
                conn.execute("vacuum")
            conn.execute("checkpoint")
    except psycopg.errors.InsufficientPrivilege:
        return None
    return round(time.perf_counter() - started, 3)


def measured_at() -> str:
    """Now, in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_result(out: Path | None, result: dict[str, Any]) -> None:
    """Write a benchmark's result as indented JSON to `out` (nowhere when None), creating its directory."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def machine_line(result: dict[str, Any]) -> str:
    """`2 CPUs, <platform>, Python 3.11.7, <time>[, load average L before]`: where a result was measured."""
    machine_ = result["machine"]
    load = machine_.get("load_average_before")
    return (
        f"{machine_['cpus']} CPUs, {machine_['platform']}, Python {machine_['python']}, {result['measured_at']}"
        + (f", load average {load} before" if load is not None else "")
    )
