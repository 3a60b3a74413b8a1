"""Benchmark: how long `cdme generate` takes to load N trades with COPY.

Runs the generator `--repeat` times for one epoch (each run replaces the epoch, as a re-load would) against
`CDME_WAREHOUSE_URL` or a fresh embedded PostgreSQL in a temporary directory, prints the median and the
individual timings, and writes them with the machine's description to `--out` (JSON).

    .venv/bin/python benchmarks/generate.py --trades 1000000 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path

from services.core.embedded_pg import EmbeddedPostgres
from services.core.settings import PROJECT_ROOT
from services.datagen.trading import GenerateRequest, currency_codes, generate


def main() -> int:
    """Run the benchmark and write its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "generate.json")
    args = parser.parse_args()

    currencies = currency_codes(PROJECT_ROOT / "dbt_project" / "seeds" / "currencies.csv")
    with tempfile.TemporaryDirectory(prefix="cdme-bench-") as scratch:
        server = None
        url = os.environ.get("CDME_WAREHOUSE_URL")
        if not url:
            server = EmbeddedPostgres(Path(scratch), database="bench")
            url = server.start().url
        if url is None:
            parser.error("the embedded server did not report a URL")
        try:
            seconds = []
            for run in range(args.repeat):
                report = generate(
                    url, GenerateRequest(trades=args.trades, epoch=date(2026, 11, 20)), currencies
                )
                seconds.append(report.seconds)
                print(f"run {run + 1}: {args.trades:,} trades in {report.seconds:.2f}s")
        finally:
            if server is not None:
                server.stop()
    result = {
        "benchmark": "generate",
        "trades": args.trades,
        "repeat": args.repeat,
        "median_seconds": round(statistics.median(seconds), 3),
        "seconds": [round(s, 3) for s in seconds],
        "trades_per_second": round(args.trades / statistics.median(seconds)),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"median {result['median_seconds']}s ({result['trades_per_second']:,} trades/s); written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
