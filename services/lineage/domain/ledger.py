"""The accounting ledger of a run: built from the adjoint's partitions, verified, gated, written atomically.

Per morphism the ledger checks conservation (`|input| = |mapped| + |filtered| + |errored|`), mutual
exclusivity (no key in two partitions: the adjoint's `overlap`) and completeness (no input key in no partition:
`unaccounted`); per graph source it checks that every key of the epoch has exactly one terminal fate. Any
failed check is a discrepancy with its counts and sample keys, and makes the ledger `UNBALANCED`.

The document's format is `schemas/ledger.schema.json` (JSON Schema 2020-12), `LEDGER_SCHEMA` below.

Examples:
    >>> ledger = build_ledger(parse_partitions(document), versions={"cdme": "0.1.0"})
    >>> ledger["status"], [d["model"] for d in ledger["discrepancies"]]
    ('UNBALANCED', ['int_trades_enriched'])
    >>> gate(ledger, dbt_succeeded=True, dbt_error=None)
    ('FAILED', 'ledger UNBALANCED: int_trades_enriched: 12 input keys in no partition (e.g. ...)')
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services.lineage.domain.partitions import Morphism, Partitions, SourceFates

LEDGER_FORMAT = "cdme-ledger/v1"
LEDGER_SCHEMA = Path(__file__).with_name("schemas") / "ledger.schema.json"
# A discrepancy carries at most this many sample keys: enough to start an investigation, bounded in size.
MAX_SAMPLES = 10

LedgerStatus = Literal["BALANCED", "UNBALANCED"]
# The checks of one morphism's own accounting; `end_to_end` checks name a graph source instead.
MORPHISM_CHECKS = frozenset({"conservation", "exclusivity", "completeness"})
RunStatus = Literal["COMPLETE", "FAILED"]


def _discrepancy(
    check: str,
    subject: str,
    unique_id: str,
    message: str,
    *,
    expected: int | None = None,
    actual: int | None = None,
    count: int,
    samples: list[str],
) -> dict[str, Any]:
    return {
        "check": check,
        "model": subject,
        "unique_id": unique_id,
        "expected": expected,
        "actual": actual,
        "count": count,
        "sample_keys": samples[:MAX_SAMPLES],
        "message": message,
    }


def _samples_text(samples: list[str]) -> str:
    return f" (e.g. {', '.join(samples[:3])})" if samples else ""


def _morphism_entry(m: Morphism) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []
    accounted = m.mapped + m.filtered + m.errored
    if accounted != m.input:
        difference = m.input - accounted
        verb = "missing from" if difference > 0 else "too many in"
        found.append(
            _discrepancy(
                "conservation",
                m.model,
                m.unique_id,
                f"{m.model}: input {m.input} != mapped {m.mapped} + filtered {m.filtered} + errored {m.errored} "
                f"({abs(difference)} keys {verb} the partitions){_samples_text(m.unaccounted.samples)}",
                expected=m.input,
                actual=accounted,
                count=abs(difference),
                samples=m.unaccounted.samples if difference > 0 else m.overlap.samples,
            )
        )
    if m.overlap.count:
        found.append(
            _discrepancy(
                "exclusivity",
                m.model,
                m.unique_id,
                f"{m.model}: {m.overlap.count} keys in two partitions{_samples_text(m.overlap.samples)}",
                count=m.overlap.count,
                samples=m.overlap.samples,
            )
        )
    if m.unaccounted.count:
        found.append(
            _discrepancy(
                "completeness",
                m.model,
                m.unique_id,
                f"{m.model}: {m.unaccounted.count} input keys in no partition{_samples_text(m.unaccounted.samples)}",
                count=m.unaccounted.count,
                samples=m.unaccounted.samples,
            )
        )
    partitions = {
        name: {"count": getattr(m, name), "location": m.locations.get(name)}
        for name in ("mapped", "filtered", "errored")
    }
    entry = {
        "model": m.model,
        "unique_id": m.unique_id,
        "relation": m.relation,
        "kind": m.kind,
        "upstream": m.upstream,
        "upstream_unique_id": m.upstream_unique_id,
        "source_key_fields": list(m.source_key_fields),
        "target_key_fields": list(m.target_key_fields),
        "input": m.input,
        "output": m.output,
        "partitions": partitions,
        "overlap": {"count": m.overlap.count, "samples": m.overlap.samples[:MAX_SAMPLES]},
        "unaccounted": {"count": m.unaccounted.count, "samples": m.unaccounted.samples[:MAX_SAMPLES]},
        "filters": [f.model_dump() for f in m.filters],
        "req": list(m.req),
        "balanced": not found,
    }
    return entry, found


def _source_entry(s: SourceFates) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    found: list[dict[str, Any]] = []
    fates = s.fates
    total = fates.reached_output + fates.filtered + fates.errored + fates.unaccounted
    if total != s.input:
        found.append(
            _discrepancy(
                "end_to_end",
                s.source,
                s.unique_id,
                f"{s.source}: {s.input} keys in the epoch but {total} terminal fates "
                f"(reached output {fates.reached_output}, filtered {fates.filtered}, errored {fates.errored}, "
                f"unaccounted {fates.unaccounted})",
                expected=s.input,
                actual=total,
                count=abs(s.input - total),
                samples=s.unaccounted_samples,
            )
        )
    if fates.unaccounted:
        found.append(
            _discrepancy(
                "end_to_end",
                s.source,
                s.unique_id,
                f"{s.source}: {fates.unaccounted} keys of the epoch have no terminal fate"
                f"{_samples_text(s.unaccounted_samples)}",
                count=fates.unaccounted,
                samples=s.unaccounted_samples,
            )
        )
    entry = {
        "source": s.source,
        "unique_id": s.unique_id,
        "relation": s.relation,
        "key_fields": list(s.key_fields),
        "input": s.input,
        "fates": fates.model_dump(),
        "unaccounted_samples": s.unaccounted_samples[:MAX_SAMPLES],
        "balanced": not found,
    }
    return entry, found


def build_ledger(
    partitions: Partitions,
    *,
    versions: dict[str, Any],
    epoch: str | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """Verify a run's partitions and return its ledger document (see `LEDGER_SCHEMA`).

    Args:
        partitions: The adjoint service's partitions of the run.
        versions: What produced the run (see `services.lineage.domain.versions.collect_versions`).
        epoch: The run's epoch, when the partitions do not carry it.
        created_at: When the ledger was built (default: now).

    Returns:
        The ledger: counts, partition breakdown with adjoint locations, status, discrepancies with samples.
    """
    morphisms: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    discrepancies: list[dict[str, Any]] = []
    for m in partitions.morphisms:
        entry, found = _morphism_entry(m)
        morphisms.append(entry)
        discrepancies.extend(found)
    for s in partitions.sources:
        entry, found = _source_entry(s)
        sources.append(entry)
        discrepancies.extend(found)
    status: LedgerStatus = "UNBALANCED" if discrepancies else "BALANCED"
    totals = {
        "input": sum(s.input for s in partitions.sources),
        "reached_output": sum(s.fates.reached_output for s in partitions.sources),
        "filtered": sum(s.fates.filtered for s in partitions.sources),
        "errored": sum(s.fates.errored for s in partitions.sources),
        "unaccounted": sum(s.fates.unaccounted for s in partitions.sources),
        "morphisms": len(morphisms),
        "sources": len(sources),
        "discrepancies": len(discrepancies),
    }
    return {
        "format": LEDGER_FORMAT,
        "run_id": partitions.run_id,
        "epoch": partitions.epoch or epoch,
        "lineage_mode": partitions.lineage_mode,
        "key_encoding": partitions.key_encoding,
        "created_at": (created_at or datetime.now(UTC)).isoformat(),
        "status": status,
        "totals": totals,
        "morphisms": morphisms,
        "sources": sources,
        "discrepancies": discrepancies,
        "not_captured": [n.model_dump() for n in partitions.not_captured],
        "versions": versions,
    }


def gate(
    ledger: dict[str, Any] | None, *, dbt_succeeded: bool, dbt_error: str | None
) -> tuple[RunStatus, str | None]:
    """Decide the run's final status: COMPLETE only when dbt succeeded and the ledger balances.

    Args:
        ledger: The run's ledger (None: there is none, for example the partitions could not be obtained).
        dbt_succeeded: Whether dbt reported success.
        dbt_error: dbt's one-line error, when it failed.

    Returns:
        The status and, for FAILED, the reason (dbt's failure first, then the ledger's first discrepancies).
    """
    reasons: list[str] = []
    if not dbt_succeeded:
        reasons.append(f"dbt failed: {dbt_error or 'no error message'}")
    if ledger is None:
        reasons.append("no ledger: the run's partitions are unavailable")
    elif ledger["status"] != "BALANCED":
        shown = "; ".join(d["message"] for d in ledger["discrepancies"][:3])
        more = len(ledger["discrepancies"]) - 3
        reasons.append(f"ledger UNBALANCED: {shown}" + (f" (and {more} more)" if more > 0 else ""))
    if reasons:
        return "FAILED", "; ".join(reasons)
    return "COMPLETE", None


def write_json_atomically(path: Path, document: Any) -> None:
    """Write `document` as JSON to `path` so readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same directory, are fsynced, then renamed over `path`; the
    directory is fsynced so the rename survives a crash.

    Raises:
        OSError: The directory cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
