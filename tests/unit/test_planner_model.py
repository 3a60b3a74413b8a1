"""The planner's plain pieces: run ids, run requests, lock keys, runtime discovery."""

from __future__ import annotations

import time
import uuid
from datetime import date
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.core.errors import UsageError
from services.planner.domain.ids import uuid7
from services.planner.domain.model import RunRequest
from services.planner.domain.planner import lock_key
from services.planner.runtimes import DbtCall, RuntimeContext, available_runtimes, load_runtime
from services.planner.runtimes.cloud import CloudRuntime
from services.planner.runtimes.inprocess import InProcessRuntime
from services.planner.runtimes.local import LocalRuntime

CONTEXT = RuntimeContext(Path("."), "postgresql://u:p@localhost:5432/db", None, "analytics", "dev")


def test_run_ids_are_uuid7_and_sort_by_creation() -> None:
    first = uuid7()
    time.sleep(0.002)
    second = uuid7()
    assert first.version == 7 and first.variant == uuid.RFC_4122
    assert str(first) < str(second)
    assert len({uuid7() for _ in range(1000)}) == 1000


def test_a_run_request_passes_dbt_flags_through_and_sets_the_epoch_var() -> None:
    request = RunRequest(
        epoch=date(2026, 11, 20),
        vars={"region": "EU", "epoch_date": "ignored"},
        select=["tag:daily", "+fct_daily_positions"],
        exclude=["stg_counterparties"],
        selector="nightly",
    )
    assert request.dbt_vars() == {"region": "EU", "epoch_date": "2026-11-20"}
    assert request.selection_args() == [
        "--select",
        "tag:daily",
        "+fct_daily_positions",
        "--exclude",
        "stg_counterparties",
        "--selector",
        "nightly",
    ]
    args = DbtCall(target_path=Path("t"), vars=request.dbt_vars(), selection=request.selection_args()).args(
        "build"
    )
    assert args[:2] == ["build", "--vars"] and "--selector" in args


@pytest.mark.parametrize(
    "body",
    [
        {"epoch": "2026-11-20", "unknown": 1},
        {"epoch": "not a date"},
        {"epoch": "2026-11-20", "validation": "sometimes"},
        {"epoch": "2026-11-20", "selector": "a\nb"},
        {"epoch": "2026-11-20", "project": "x; drop table y"},
        {"epoch": "2026-11-20", "lineage_mode": "everything"},
    ],
)
def test_a_malformed_run_request_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        RunRequest.model_validate(body)


def test_control_characters_in_selection_are_refused() -> None:
    with pytest.raises(ValueError, match="control characters"):
        RunRequest(epoch=date(2026, 11, 20), select=["a\x00b"]).selection_args()


def test_lock_keys_are_stable_64_bit_and_distinct_per_key() -> None:
    key = lock_key("cdme_trading", "dev", date(2026, 11, 20))
    assert key == lock_key("cdme_trading", "dev", date(2026, 11, 20))
    assert -(2**63) <= key < 2**63
    others = {
        lock_key("cdme_trading", "dev", date(2026, 11, 21)),
        lock_key("cdme_trading", "prod", date(2026, 11, 20)),
        lock_key("other", "dev", date(2026, 11, 20)),
    }
    assert key not in others and len(others) == 3


def test_runtimes_are_discovered_through_entry_points() -> None:
    assert {"local", "inprocess", "cloud"} <= set(available_runtimes())
    assert isinstance(load_runtime("local", CONTEXT), LocalRuntime)
    assert isinstance(load_runtime("inprocess", CONTEXT), InProcessRuntime)
    assert isinstance(load_runtime("cloud", CONTEXT), CloudRuntime)
    with pytest.raises(UsageError, match=r"unknown dbt runtime 'spark'; installed: .*local"):
        load_runtime("spark", CONTEXT)
