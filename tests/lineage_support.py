"""Partitions documents shaped as the adjoint service's contract, from the reference project's real counts."""

from __future__ import annotations

from typing import Any

PROJECT = "cdme_trading"
RUN_ID = "01937e0a-5b1c-7000-8000-00000000c0de"
# A dbt build of the reference project on 4,000 generated trades (seed 42, `cdme generate --trades 4000`):
# 116 cancelled, 34 missing counterparty, 26 non-positive notional, 8 unknown currency.
RAW, CANCELLED, ERRORED = 4000, 116, 68
ACTIVE = RAW - CANCELLED
ENRICHED = ACTIVE - ERRORED


def _uid(name: str) -> str:
    return f"model.{PROJECT}.{name}"


def morphism(
    model: str,
    upstream: str,
    *,
    kind: str,
    input: int,
    mapped: int,
    filtered: int = 0,
    errored: int = 0,
    output: int | None = None,
    run_id: str = RUN_ID,
    req: list[str] | None = None,
    schema: str = "intermediate",
) -> dict[str, Any]:
    """One morphism of a partitions document."""
    location = f"cdme_adjoint.{{}}#run={run_id}&morphism={_uid(model)}"
    return {
        "model": model,
        "unique_id": _uid(model),
        "relation": f"cdme.{schema}.{model}",
        "kind": kind,
        "upstream": upstream,
        "upstream_unique_id": _uid(upstream),
        "upstream_relation": f"cdme.intermediate.{upstream}",
        "source_key_fields": ["trade_id"],
        "target_key_fields": ["trade_id"],
        "input": input,
        "mapped": mapped,
        "filtered": filtered,
        "errored": errored,
        "output": mapped if output is None else output,
        "overlap": {"count": 0, "samples": []},
        "unaccounted": {"count": 0, "samples": []},
        "locations": {p: location.format(p) for p in ("mapped", "filtered", "errored")},
        "filters": [{"condition": "trade_status <> 'CANCELLED'", "model": model, "line": 12}]
        if filtered
        else [],
        "req": req or [],
    }


def clean_partitions(run_id: str = RUN_ID, epoch: str = "2026-11-20") -> dict[str, Any]:
    """The partitions of a clean run of the reference project: every trade has one fate."""
    return {
        "run_id": run_id,
        "epoch": epoch,
        "lineage_mode": "full",
        "key_encoding": "cdme-key/v1",
        "morphisms": [
            morphism(
                "int_trades_active",
                "stg_trades",
                kind="filter",
                input=RAW,
                mapped=ACTIVE,
                filtered=CANCELLED,
                run_id=run_id,
                req=["REQ-FLT-01"],
            ),
            morphism(
                "int_trades_enriched",
                "int_trades_active",
                kind="enrich",
                input=ACTIVE,
                mapped=ENRICHED,
                errored=ERRORED,
                run_id=run_id,
                req=["REQ-ERR-01", "REQ-REF-01"],
            ),
        ],
        "sources": [
            {
                "source": "raw_trading.trades",
                "unique_id": f"source.{PROJECT}.raw_trading.trades",
                "relation": "cdme.raw_trading.trades",
                "key_fields": ["trade_id"],
                "input": RAW,
                "fates": {
                    "reached_output": ENRICHED,
                    "filtered": CANCELLED,
                    "errored": ERRORED,
                    "unaccounted": 0,
                },
                "unaccounted_samples": [],
            }
        ],
        "not_captured": [],
    }


def silent_drop(document: dict[str, Any], dropped: list[str]) -> dict[str, Any]:
    """`document` after an inner join silently dropped `dropped` keys at int_trades_enriched."""
    for m in document["morphisms"]:
        if m["model"] == "int_trades_enriched":
            m["mapped"] -= len(dropped)
            m["output"] -= len(dropped)
            m["unaccounted"] = {"count": len(dropped), "samples": dropped[:10]}
    source = document["sources"][0]
    source["fates"]["reached_output"] -= len(dropped)
    source["fates"]["unaccounted"] = len(dropped)
    source["unaccounted_samples"] = dropped[:10]
    return document
