"""The ledger: conservation, exclusivity, completeness and end-to-end fates; the gate; the atomic file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from services.core.errors import UpstreamServiceError
from services.lineage.domain.ledger import LEDGER_SCHEMA, build_ledger, gate, write_json_atomically
from services.lineage.domain.partitions import parse_partitions
from services.lineage.domain.versions import collect_versions
from tests.conftest import PROJECT_DIR
from tests.lineage_support import ACTIVE, CANCELLED, ENRICHED, ERRORED, RAW, clean_partitions, silent_drop

SCHEMA = Draft202012Validator(json.loads(LEDGER_SCHEMA.read_text()))
VERSIONS: dict[str, Any] = {
    "manifest_checksum": "sha256:" + "0" * 64,
    "project": "cdme_trading",
    "project_version": "1.0.0",
    "git_commit": None,
    "cdme_yml_digest": None,
    "dbt_version": "1.11.0",
    "cdme_version": "0.1.0",
    "compiled_sql": {},
}


def _ledger(document: dict[str, Any]) -> dict[str, Any]:
    ledger = build_ledger(parse_partitions(document), versions=VERSIONS)
    assert not list(SCHEMA.iter_errors(ledger)), [e.message for e in SCHEMA.iter_errors(ledger)]
    return ledger


def test_a_clean_run_balances_and_completes() -> None:
    ledger = _ledger(clean_partitions())
    assert ledger["status"] == "BALANCED" and ledger["discrepancies"] == []
    assert ledger["totals"] == {
        "input": RAW,
        "reached_output": ENRICHED,
        "filtered": CANCELLED,
        "errored": ERRORED,
        "unaccounted": 0,
        "morphisms": 2,
        "sources": 1,
        "discrepancies": 0,
    }
    enriched = next(m for m in ledger["morphisms"] if m["model"] == "int_trades_enriched")
    assert enriched["partitions"]["errored"]["count"] == ERRORED
    assert enriched["partitions"]["errored"]["location"].startswith("cdme_adjoint.errored#run=")
    assert gate(ledger, dbt_succeeded=True, dbt_error=None) == ("COMPLETE", None)


def test_a_silent_inner_join_drop_is_unbalanced_with_the_model_and_sample_keys() -> None:
    dropped = [f"cdme-key/v1:T{i:06d}" for i in range(12)]
    ledger = _ledger(silent_drop(clean_partitions(), dropped))
    assert ledger["status"] == "UNBALANCED"
    by_check = {(d["check"], d["model"]): d for d in ledger["discrepancies"]}
    conservation = by_check[("conservation", "int_trades_enriched")]
    assert (conservation["expected"], conservation["actual"], conservation["count"]) == (
        ACTIVE,
        ACTIVE - 12,
        12,
    )
    assert by_check[("completeness", "int_trades_enriched")]["sample_keys"] == dropped[:10]
    assert by_check[("end_to_end", "raw_trading.trades")]["count"] == 12
    assert not next(m for m in ledger["morphisms"] if m["model"] == "int_trades_enriched")["balanced"]
    assert next(m for m in ledger["morphisms"] if m["model"] == "int_trades_active")["balanced"]
    status, reason = gate(ledger, dbt_succeeded=True, dbt_error=None)
    assert status == "FAILED"
    assert reason is not None and "int_trades_enriched" in reason and "T000000" in reason


def test_a_key_in_two_partitions_breaks_exclusivity() -> None:
    document = clean_partitions()
    enriched = document["morphisms"][1]
    enriched["mapped"] += 1
    enriched["overlap"] = {"count": 1, "samples": ["cdme-key/v1:T000042"]}
    ledger = _ledger(document)
    checks = {d["check"] for d in ledger["discrepancies"]}
    assert checks == {"conservation", "exclusivity"}
    assert ["cdme-key/v1:T000042"] in [d["sample_keys"] for d in ledger["discrepancies"]]


def test_source_fates_that_do_not_add_up_are_unbalanced() -> None:
    document = clean_partitions()
    document["sources"][0]["fates"]["filtered"] -= 5  # a de-duplicating UNION lost five cancelled trades
    ledger = _ledger(document)
    (discrepancy,) = ledger["discrepancies"]
    assert discrepancy["check"] == "end_to_end" and discrepancy["count"] == 5
    assert discrepancy["expected"] == RAW and discrepancy["actual"] == RAW - 5


def test_dbt_failure_fails_the_run_even_when_balanced() -> None:
    ledger = _ledger(clean_partitions())
    assert gate(ledger, dbt_succeeded=False, dbt_error='relation "x" does not exist') == (
        "FAILED",
        'dbt failed: relation "x" does not exist',
    )
    assert gate(None, dbt_succeeded=True, dbt_error=None)[0] == "FAILED"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["morphisms"][0].update(input=-1), "morphisms.0.input"),
        (lambda d: d.pop("run_id"), "run_id"),
        (lambda d: d["sources"][0].pop("fates"), "sources.0.fates"),
    ],
)
def test_a_malformed_partitions_document_is_rejected_with_the_field(mutate, field) -> None:
    document = clean_partitions()
    mutate(document)
    with pytest.raises(UpstreamServiceError, match=f"invalid partitions document: {field}"):
        parse_partitions(document)


def test_the_ledger_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "run" / "ledger.json"
    write_json_atomically(target, {"old": True})
    write_json_atomically(target, _ledger(clean_partitions()))
    assert json.loads(target.read_text())["status"] == "BALANCED"
    assert [p.name for p in target.parent.iterdir()] == ["ledger.json"]

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json_atomically(target, {"bad": Unserialisable()})
    assert json.loads(target.read_text())["status"] == "BALANCED"  # the old file is intact
    assert [p.name for p in target.parent.iterdir()] == ["ledger.json"]


def test_versions_record_the_project_and_cdme(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    versions = collect_versions(tmp_path, None, PROJECT_DIR)
    assert versions["manifest_checksum"] == (
        "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )
    assert versions["project_version"] == "1.0.0"
    assert versions["cdme_yml_digest"].startswith("sha256:")
    assert versions["cdme_version"]
    assert versions["git_commit"] is None or len(versions["git_commit"]) == 40
