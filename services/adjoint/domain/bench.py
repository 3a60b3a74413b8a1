"""How much the adjoint costs: capture against the dbt build, storage, and query latency in SQL and over HTTP.

One epoch of N generated trades is loaded into a fresh database of the configured warehouse. Then, three rounds
of: the reference project built from scratch with `dbt build --full-refresh` (timed, tests included), and that
run captured in each of the three lineage modes (timed). Each figure is the median of its three rounds, and a
mode's ratio is its median capture over the median build. A CHECKPOINT (untimed, its seconds recorded) precedes
each build, each capture and the queries, so that no phase pays for the write-back of the one before. Then the
last full capture's partitions are measured (bytes per mapped pair, indexes included), and 1,000 keys drawn at
random (fixed seed) for each query:

- 1-hop backward: an `int_trades_enriched` trade back to `int_trades_active` (`depth=1`);
- mart-to-raw backward: a `fct_monthly_positions` key back to `raw_trading.trades` (first page of 1,000);
- impact: one raw trade forward to every model.

On the key_derivable run (the default mode), a few mart-to-raw backwards are timed as the service answers them:
each checks the run's checkpoints and derives the pairs again.

"In the database" times the walk query the service runs (one connection, server-side prepared); "over HTTP"
times the route end to end against the service running under uvicorn in a subprocess (one keep-alive client).
Beside them, the round trip of `select 1` on the same connection: the floor of every query, which a busy shared
machine raises for all of them.
The figures, goals and machine are written to `benchmarks/results/adjoint.json`; the database is dropped.
"""

from __future__ import annotations

import gc
import json
import random
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from psycopg.rows import dict_row

from services.adjoint.domain import queries
from services.adjoint.domain.capture import capture, load_run_ldm, plan_capture
from services.core.artifacts import load_manifest, load_run_results
from services.core.benchmarking import load_average, machine, measured_at, settle, write_result
from services.core.dbt import first_failure, run_dbt
from services.core.errors import DbtError, UsageError
from services.core.ldm import load_project_config
from services.core.ldm.config import LineageMode
from services.core.migrations import migrate
from services.core.net import free_port
from services.core.service_process import await_answer, spawn_service, stop_process
from services.core.settings import PROJECT_ROOT, CdmeSettings
from services.core.warehouse import create_warehouse_engine, libpq_url, resolve_warehouse_url
from services.datagen.trading import GenerateRequest, currency_codes, generate

RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results" / "adjoint.json"
EPOCH = date(2026, 11, 20)
SAMPLES = 1000
MODES: tuple[LineageMode, ...] = ("full", "summary", "key_derivable")
# The project is built, and each mode captured (a new run each time), this many times; each figure is the median.
ROUNDS = 3
# Mart keys traced back to raw trades on the key_derivable run, each in seconds.
DERIVED_SAMPLES = 5
# The goals on the development machine.
GOALS = {
    "default_mode_capture_ratio": 0.25,
    "full_mode_capture_ratio": 1.0,
    "one_hop_db_p99_ms": 1.0,
    "mart_to_raw_db_p99_ms": 10.0,
    "mart_to_raw_http_p99_ms": 25.0,
    "impact_p99_ms": 20.0,
}


def _percentiles(seconds: Sequence[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "samples": len(ordered),
    }


def _timed(calls: Sequence[Callable[[], object]]) -> dict[str, float]:
    for call in calls[:20]:
        call()  # warm the plan cache and the connection
    # As timeit does: a collection of the benchmark's own objects (a full one takes tens of milliseconds here) is
    # not the latency of the query it happens to interrupt. The services freeze theirs after startup.
    gc.collect()
    gc.disable()
    try:
        times = []
        for call in calls:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    return _percentiles(times)


class _Service:
    """The adjoint service under uvicorn in a subprocess, stopped by its pid."""

    def __init__(self, url: str, home: Path) -> None:
        self.token = secrets.token_hex(16)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        env = {
            "CDME_WAREHOUSE_URL": url,
            "CDME_AUTH_TOKENS": f"{self.token}=bench:data_engineer",
            "CDME_HOME": str(home),
            "CDME_LOG_LEVEL": "WARNING",
        }
        log = home / "adjoint.log"
        self.process = spawn_service("services.adjoint.app:app", port, env, log, access_log=False)
        failure = await_answer(self.process, self.base_url, "/readyz", 60)
        if failure is not None:
            self.stop()
            msg = f"the adjoint service {failure} (log: {log})"
            raise UsageError(msg)

    def stop(self) -> None:
        stop_process(self.process)


def _keys(conn: psycopg.Connection[Any], query: str, rng: random.Random) -> list[str]:
    found = [r[0] for r in conn.execute(query).fetchall()]
    if not found:
        msg = f"no keys to sample: {query}"
        raise UsageError(msg)
    return [rng.choice(found) for _ in range(SAMPLES)]


def _walk(
    conn: psycopg.Connection[Any], sql_text: str, base: dict[str, Any], name: str
) -> Callable[[Any], Callable[[], list[Any]]]:
    def bind(value: Any) -> Callable[[], list[Any]]:
        return lambda: conn.execute(sql_text, {**base, name: value}, prepare=True).fetchall()

    return bind


def run_adjoint_benchmark(
    settings: CdmeSettings,
    trades: int,
    *,
    out: Path | None = RESULTS_PATH,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build, capture and query one epoch of `trades` trades; the figures (see the module docstring).

    Raises:
        UsageError: `trades` is not positive or the service cannot be started.
        DbtError: The dbt build failed.
    """
    if trades <= 0:
        msg = f"--trades must be positive, got {trades}"
        raise UsageError(msg)
    say = progress or (lambda _line: None)
    server = resolve_warehouse_url(settings)
    name = f"cdme_bench_adjoint_{uuid.uuid4().hex[:8]}"
    load = load_average()
    with psycopg.connect(libpq_url(server, "postgres"), autocommit=True) as admin:
        admin.execute(f'create database "{name}"')
    url = libpq_url(server, name)
    engine = create_warehouse_engine(url)
    try:
        with tempfile.TemporaryDirectory(prefix="cdme-bench-adjoint-") as scratch:
            work = Path(scratch)
            say(f"generating {trades:,} trades into {name}")
            generate(
                url,
                GenerateRequest(trades=trades, epoch=EPOCH, seed=42, counterparties=max(400, trades // 500)),
                currency_codes(settings.project_dir / "seeds" / "currencies.csv"),
            )
            # Each timed phase starts with nothing left to write: the build is not slowed by the generator's
            # write-back, nor a capture by the build's (nor by the checkpoint its WAL would trigger mid-capture).
            settled: dict[str, float | None] = {}
            builds: list[float] = []
            timings: dict[str, list[float]] = {mode: [] for mode in MODES}
            runs: dict[str, str] = {}
            pairs: dict[str, int] = {}
            config = load_project_config(settings.project_dir / "cdme.yml")
            migrate(engine, "adjoint")
            # Rounds of a build and every mode's capture of it, so that a slow spell of the machine does not fall
            # on one phase only: the build's time varies as much as a capture's.
            for round_ in range(1, ROUNDS + 1):
                settled[f"before_build_{round_}"] = settle(url)
                say(f"dbt build (round {round_} of {ROUNDS})")
                target = work / f"target_{round_}"
                started = time.perf_counter()
                # From scratch every round: the incremental model rebuilt, not merged into, as in the first.
                invocation = run_dbt(
                    ["build", "--full-refresh", "--vars", json.dumps({"epoch_date": EPOCH.isoformat()})],
                    project_dir=settings.project_dir,
                    target_path=target,
                    warehouse_url=url,
                    pepper=secrets.token_hex(16),
                )
                builds.append(round(time.perf_counter() - started, 3))
                if not invocation.succeeded:
                    msg = f"dbt build failed: {first_failure(invocation)}"
                    raise DbtError(msg)
                manifest = load_manifest(target / "manifest.json")
                results = load_run_results(target / "run_results.json")
                settled[f"after_build_{round_}"] = settle(url, vacuum=True)
                for mode in MODES:
                    settled[f"before_capture_{mode}_{round_}"] = settle(url)
                    say(f"capture ({mode}, round {round_} of {ROUNDS})")
                    plan = plan_capture(load_run_ldm(manifest, config, mode), manifest, results)
                    captured = capture(
                        engine,
                        str(uuid.uuid4()),
                        EPOCH,
                        mode,
                        plan,
                        sample_rate=config.defaults.summary_sample_rate,
                    )
                    runs[mode], pairs[mode] = captured.run_id, captured.pairs
                    timings[mode].append(round(captured.seconds, 3))
            build_seconds = statistics.median(builds)
            captures: dict[str, dict[str, Any]] = {
                mode: {
                    "seconds": round(statistics.median(seconds), 3),
                    "ratio_to_build": round(statistics.median(seconds) / build_seconds, 3),
                    "rounds_seconds": seconds,
                    "pairs": pairs[mode],
                }
                for mode, seconds in timings.items()
            }
            full = runs["full"]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(queries.SESSION)  # as the service's connections are
                stored = conn.execute(
                    "select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_inherits i "
                    "join pg_class c on c.oid = i.inhrelid where i.inhparent = 'cdme_adjoint.mapped'::regclass "
                    "and c.relname = %s",
                    (f"mapped_r{uuid.UUID(full).hex}",),
                ).fetchone()
                mapped_bytes = int(stored[0]) if stored else 0
                # The identities whose pairs the run implies from their readers' input keys store none.
                implied = conn.execute(
                    "select coalesce(sum(pairs) filter (where keys_from is not null), 0) "
                    "from cdme_adjoint.morphisms where run_id = %s",
                    (full,),
                ).fetchone()
                stored_pairs = pairs["full"] - (int(implied[0]) if implied else 0)
                rng = random.Random(7)
                one_hop = _keys(
                    conn,
                    "select trade_id from intermediate.int_trades_enriched order by md5(trade_id) limit 5000",
                    rng,
                )
                marts = _keys(
                    conn,
                    "select month_start || '|' || book || '|' || currency_code from marts.fct_monthly_positions",
                    rng,
                )
                sources = _keys(
                    conn,
                    f"select trade_id from raw_trading.trades where epoch_date = date '{EPOCH}' "
                    "order by md5(trade_id) limit 5000",
                    rng,
                )
                settled["before_queries"] = settle(url)
                say("queries in the database")
                with conn.cursor(row_factory=dict_row) as cur:
                    graph = queries.load_graph(cur, full, None)
                edges = queries.edge_params(graph.visible_edges())
                enriched = graph.uid_of("int_trades_enriched")
                monthly = graph.uid_of("fct_monthly_positions")
                raw = graph.uid_of("raw_trading.trades")
                walker = conn.cursor(row_factory=dict_row)

                def walk(uid: str, to: str | None, depth: int) -> Callable[[str], Callable[[], list[Any]]]:
                    def bind(key: str) -> Callable[[], list[Any]]:
                        page = queries.DEFAULT_LIMIT + 1
                        return lambda: queries.walk_run(walker, graph, uid, key, to, depth, page, 0)[0]

                    return bind

                hop = walk(enriched, None, 1)
                to_raw = walk(monthly, raw, queries.MAX_DEPTH)
                impact_params = {**edges, "run": full}
                forward = _walk(
                    conn,
                    queries.for_run(queries._IMPACT, full),
                    {**impact_params, "uid": raw, "depth": 64, "sample": 100},
                    "keys",
                )
                # The floor under every query: a round trip to the server on the same connection. On a shared
                # machine it moves with the others' load, and the queries' figures with it.
                floor = _timed([lambda: conn.execute("select 1", prepare=True).fetchall()] * SAMPLES)
                in_db = {
                    "backward_1_hop": _timed([hop(k) for k in one_hop]),
                    "backward_mart_to_raw": _timed([to_raw(k) for k in marts]),
                    "impact_1_source_key": _timed([forward([k]) for k in sources]),
                }
                rows_mart = [len(to_raw(k)()) for k in marts[:50]]
                start = time.perf_counter()
                forward(sources)()
                impact_all = time.perf_counter() - start
            # The default mode answers by deriving the pairs again, after checking the run's checkpoints: seconds,
            # not milliseconds, so a few keys tell. Its last capture is of the build still in the warehouse.
            say("backward on the key_derivable run")
            derived_seconds = []
            for k in marts[:DERIVED_SAMPLES]:
                start = time.perf_counter()
                queries.backward(
                    engine, "fct_monthly_positions", k, roles=None, run_id=runs["key_derivable"], to=raw
                )
                derived_seconds.append(round(time.perf_counter() - start, 3))
            say("queries over HTTP")
            service = _Service(url, work)
            try:
                with httpx.Client(
                    base_url=service.base_url,
                    headers={"Authorization": f"Bearer {service.token}"},
                    timeout=60,
                ) as client:

                    def get(path: str, **params: Any) -> Callable[[], object]:
                        return lambda: client.get(path, params=params).raise_for_status()

                    def post(path: str, body: dict[str, Any]) -> Callable[[], object]:
                        return lambda: client.post(path, json=body).raise_for_status()

                    over_http = {
                        "backward_1_hop": _timed(
                            [
                                get(
                                    f"/backward/int_trades_enriched/{quote(k, safe='')}", depth=1, run_id=full
                                )
                                for k in one_hop
                            ]
                        ),
                        "backward_mart_to_raw": _timed(
                            [
                                get(
                                    f"/backward/fct_monthly_positions/{quote(k, safe='')}",
                                    to="raw_trading.trades",
                                    run_id=full,
                                )
                                for k in marts
                            ]
                        ),
                        "impact_1_source_key": _timed(
                            [
                                post("/impact", {"entity": "raw_trading.trades", "keys": [k], "run_id": full})
                                for k in sources
                            ]
                        ),
                    }
            finally:
                service.stop()
    finally:
        engine.dispose()
        with psycopg.connect(libpq_url(server, "postgres"), autocommit=True) as admin:
            admin.execute(f'drop database if exists "{name}" with (force)')
    default_mode = config.defaults.lineage_mode
    result: dict[str, Any] = {
        "benchmark": "adjoint",
        "trades": trades,
        "epoch": EPOCH.isoformat(),
        "dbt_build_seconds": round(build_seconds, 3),
        "dbt_build_rounds_seconds": builds,
        "capture": captures,
        "checkpoint_seconds": settled,
        "default_mode": default_mode,
        "bytes_per_mapped_pair": round(mapped_bytes / max(1, pairs["full"]), 1),
        "mapped_bytes": mapped_bytes,
        "stored_pairs": stored_pairs,
        "bytes_per_stored_pair": round(mapped_bytes / max(1, stored_pairs), 1),
        "mart_to_raw_rows_per_key_mean": round(statistics.mean(rows_mart), 1),
        "impact_1000_source_keys_seconds": round(impact_all, 4),
        "in_database": in_db,
        "over_http": over_http,
        "round_trip_select_1": floor,
        "key_derivable_mart_to_raw_seconds": {
            "median": statistics.median(derived_seconds),
            "samples_seconds": derived_seconds,
        },
    }
    result["goals"] = _goals(result)
    result["machine"] = machine(load)
    result["measured_at"] = measured_at()
    write_result(out, result)
    return result


def _goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    measured = {
        "default_mode_capture_ratio": result["capture"][result["default_mode"]]["ratio_to_build"],
        "full_mode_capture_ratio": result["capture"]["full"]["ratio_to_build"],
        "one_hop_db_p99_ms": result["in_database"]["backward_1_hop"]["p99_ms"],
        "mart_to_raw_db_p99_ms": result["in_database"]["backward_mart_to_raw"]["p99_ms"],
        "mart_to_raw_http_p99_ms": result["over_http"]["backward_mart_to_raw"]["p99_ms"],
        "impact_p99_ms": result["in_database"]["impact_1_source_key"]["p99_ms"],
    }
    return [
        {"goal": goal, "target": target, "measured": measured[goal], "met": measured[goal] <= target}
        for goal, target in GOALS.items()
    ]
