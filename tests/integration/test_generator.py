"""The data generator against a real PostgreSQL: deterministic, idempotent per epoch, all-or-nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date
from pathlib import Path

import psycopg
import pytest

from services.core.errors import ConfigurationError, UsageError, WarehouseError
from services.datagen.trading import ANOMALY_RATES, GenerateRequest, currency_codes, generate, table_digests
from tests.conftest import PROJECT_DIR, CliResult

pytestmark = pytest.mark.integration

EPOCH = date(2026, 11, 20)
CURRENCIES = currency_codes(PROJECT_DIR / "seeds" / "currencies.csv")


def _digests(url: str, epoch: date = EPOCH) -> dict[str, str]:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        return table_digests(cur, epoch)


def _scalar(url: str, sql: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
        return row[0] if row else None


def test_same_seed_same_digests_other_seed_other_data(new_database: Callable[[], str]) -> None:
    first, second, third = new_database(), new_database(), new_database()
    report = generate(first, GenerateRequest(trades=3000, epoch=EPOCH, seed=7), CURRENCIES, digest=True)
    generate(second, GenerateRequest(trades=3000, epoch=EPOCH, seed=7), CURRENCIES)
    generate(third, GenerateRequest(trades=3000, epoch=EPOCH, seed=8), CURRENCIES)

    assert report.digests == _digests(first) == _digests(second)
    assert _digests(third)["raw_trading.trades"] != _digests(first)["raw_trading.trades"]
    assert set(report.digests) == {
        "raw_trading.trades",
        "raw_trading.counterparties",
        "raw_risk.risk_factors",
    }


def test_reloading_an_epoch_replaces_it_and_leaves_other_epochs(new_database: Callable[[], str]) -> None:
    url = new_database()
    other = date(2026, 11, 19)
    generate(url, GenerateRequest(trades=500, epoch=other), CURRENCIES)
    generate(url, GenerateRequest(trades=2000, epoch=EPOCH), CURRENCIES)
    before = _digests(url)
    before_other = _digests(url, other)

    generate(url, GenerateRequest(trades=2000, epoch=EPOCH), CURRENCIES)

    assert _digests(url) == before
    assert _digests(url, other) == before_other
    assert _scalar(url, "select count(*) from raw_trading.trades") == 2500
    assert _scalar(url, "select count(*) from raw_risk.risk_factors") == 2 * (
        4 * len(CURRENCIES) + len(CURRENCIES) - 1
    )


def test_anomalies_are_exclusive_and_at_their_documented_rates(new_database: Callable[[], str]) -> None:
    url = new_database()
    n = 40_000
    report = generate(url, GenerateRequest(trades=n, epoch=EPOCH), CURRENCIES)

    for name, rate in ANOMALY_RATES.items():
        sigma = math.sqrt(n * rate * (1 - rate))
        assert abs(report.anomalies[name] - n * rate) < 5 * sigma, (name, report.anomalies[name])
    known = ", ".join(f"'{c}'" for c in CURRENCIES)
    observed = {
        "cancelled": "status = 'CANCELLED'",
        "missing_counterparty": "counterparty_id not in (select counterparty_id from raw_trading.counterparties)",
        "non_positive_notional": "notional <= 0",
        "unknown_currency": f"currency not in ({known})",
    }
    for name, predicate in observed.items():
        assert (
            _scalar(url, f"select count(*) from raw_trading.trades where {predicate}")
            == report.anomalies[name]
        )
    overlapping = " and ".join(f"({p})" for p in list(observed.values())[:2])
    assert _scalar(url, f"select count(*) from raw_trading.trades where {overlapping}") == 0


def test_counterparties_have_several_versions_in_force_by_the_epoch(new_database: Callable[[], str]) -> None:
    url = new_database()
    report = generate(url, GenerateRequest(trades=100, epoch=EPOCH, counterparties=300), CURRENCIES)
    assert report.counterparty_versions == _scalar(url, "select count(*) from raw_trading.counterparties")
    average = _scalar(
        url,
        "select avg(n) from (select count(*) n from raw_trading.counterparties group by 1=1, counterparty_id) v",
    )
    assert float(str(average)) > 3
    assert _scalar(url, "select min(valid_from)::date::text from raw_trading.counterparties") == "2000-01-01"
    assert _scalar(url, f"select count(*) from raw_trading.counterparties where valid_from > '{EPOCH}'") == 0


def test_a_failure_mid_load_writes_nothing(new_database: Callable[[], str]) -> None:
    url = new_database()
    generate(url, GenerateRequest(trades=1000, epoch=EPOCH), CURRENCIES)
    before = _digests(url)
    with psycopg.connect(url, autocommit=True) as conn:
        # A warehouse-side failure half way through the COPY of the reload.
        conn.execute(
            "create function boom() returns trigger language plpgsql as $$ begin "
            "if new.trade_id = 'T20261120-00000700' then raise exception 'disk full (simulated)'; end if; "
            "return new; end $$;"
            "create trigger boom before insert on raw_trading.trades for each row execute function boom()"
        )
    with pytest.raises(
        WarehouseError, match=r"loading epoch 2026-11-20 failed, nothing was written: disk full \(simulated\)"
    ):
        generate(url, GenerateRequest(trades=1000, epoch=EPOCH), CURRENCIES)
    assert _digests(url) == before


def test_mixing_seeds_in_one_warehouse_is_refused(new_database: Callable[[], str]) -> None:
    url = new_database()
    generate(url, GenerateRequest(trades=100, epoch=EPOCH, seed=1), CURRENCIES)
    with pytest.raises(UsageError, match="the warehouse holds data generated with seed 1; use --seed 1"):
        generate(url, GenerateRequest(trades=100, epoch=date(2026, 11, 21), seed=2), CURRENCIES)
    assert _scalar(url, "select count(*) from raw_trading.trades where epoch_date = '2026-11-21'") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--trades", "-5", "--epoch", "2026-11-20"],
            "cdme: error: --trades must be between 1 and 50,000,000, got -5",
        ),
        (
            ["--trades", "0", "--epoch", "2026-11-20"],
            "cdme: error: --trades must be between 1 and 50,000,000, got 0",
        ),
        (["--trades", "ten", "--epoch", "2026-11-20"], "cdme: error: Invalid value for '--trades'"),
        (
            ["--trades", "10", "--epoch", "2026-02-30"],
            "cdme: error: --epoch must be a date as YYYY-MM-DD, got '2026-02-30'",
        ),
        (
            ["--trades", "10", "--epoch", "20261120"],
            "cdme: error: --epoch must be a date as YYYY-MM-DD, got '20261120'",
        ),
        (
            ["--trades", "10", "--epoch", "1999-12-31"],
            "cdme: error: --epoch must be after 2000-01-01 and at most",
        ),
        (["--trades", "10"], "cdme: error: Missing option '--epoch'."),
    ],
)
def test_bad_generator_input_is_one_line_and_loads_nothing(
    new_database: Callable[[], str], cli: Callable[..., CliResult], args: list[str], message: str
) -> None:
    url = new_database()
    result = cli("generate", *args, env={"CDME_WAREHOUSE_URL": url})
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert _scalar(url, "select to_regclass('raw_trading.trades') is null")


def test_generate_cli_reports_what_it_loaded(
    new_database: Callable[[], str], cli: Callable[..., CliResult]
) -> None:
    url = new_database()
    result = cli(
        "generate",
        "--trades",
        "1500",
        "--epoch",
        "2026-11-20",
        "--seed",
        "3",
        "--digest",
        env={"CDME_WAREHOUSE_URL": url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("epoch 2026-11-20: 1,500 trades, ")
    assert "(seed 3; cancelled=" in result.stdout
    assert f"raw_trading.trades md5={_digests(url)['raw_trading.trades']}" in result.stdout


def test_currency_seed_problems_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nope\.csv: cannot read currency codes"):
        currency_codes(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("currency_code,currency_name\n")
    with pytest.raises(ConfigurationError, match=r"empty\.csv: no currency codes"):
        currency_codes(empty)


def test_request_validation_without_a_warehouse() -> None:
    with pytest.raises(
        UsageError, match="--epoch must be after 2000-01-01 and at most 2099-12-31, got 9999-12-31"
    ):
        GenerateRequest(trades=1, epoch=date(9999, 12, 31))
    with pytest.raises(UsageError, match="--counterparties must be between 1 and 1,000,000, got 0"):
        GenerateRequest(trades=1, epoch=EPOCH, counterparties=0)
    with pytest.raises(UsageError, match="--seed must be between 0 and 2"):
        GenerateRequest(trades=1, epoch=EPOCH, seed=-1)
