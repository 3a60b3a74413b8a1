"""Synthetic raw data for the reference trading project, loaded with COPY, deterministic for a seed.

One call loads one epoch (business date) into `raw_trading.trades`, `raw_risk.risk_factors` and the
counterparty versions in force by then into `raw_trading.counterparties`, all in one transaction: a failure
leaves the warehouse as it was, and loading the same epoch again replaces it (idempotent per epoch).

Anomalies, drawn from one uniform number per trade so that they are mutually exclusive and their expected
rates are exact (`ANOMALY_RATES`): cancelled trades (filtered downstream), trades whose counterparty does not
exist, non-positive notionals and unknown currencies (all three routed to the enrichment's error sink).

Counterparty versions are a function of the seed and the calendar only: version 1 is in force from
2000-01-01; each counterparty then changes (rating, contact) every 90 to 360 days from a seed-drawn phase in
2024, so any recent epoch sees several versions of most counterparties, and loading epochs in any order
yields the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final

import psycopg

from services.core.errors import ConfigurationError, UsageError, WarehouseError, first_line
from services.core.warehouse import libpq_url

ANOMALY_RATES: Final[dict[str, float]] = {
    "cancelled": 0.03,
    "missing_counterparty": 0.01,
    "non_positive_notional": 0.005,
    "unknown_currency": 0.002,
}
MAX_TRADES: Final = 50_000_000
_UNKNOWN_CURRENCIES: Final = ("ZZZ", "QQQ")
_BOOKS: Final = (
    "RATES-EU",
    "RATES-US",
    "RATES-APAC",
    "FX-SPOT",
    "FX-FWD",
    "CREDIT-IG",
    "CREDIT-HY",
    "EM-MACRO",
)
_INSTRUMENTS: Final = ("IRS", "FRA", "FX_FWD", "FX_SWAP", "BOND", "CDS")
_SOURCES: Final = ("MUREX", "CALYPSO", "SUMMIT")
_RATINGS: Final = ("AAA", "AA", "A", "BBB", "BB", "B", "CCC")
_COUNTRIES: Final = ("GB", "US", "DE", "FR", "JP", "CH", "NL", "SG", "HK", "CA", "AU", "SE", "IE", "LU")
_FIRST: Final = (
    "Ada",
    "Ben",
    "Chloe",
    "Dev",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Luca",
)
_LAST: Final = (
    "Okafor",
    "Schmidt",
    "Tanaka",
    "Dubois",
    "Rossi",
    "Novak",
    "Silva",
    "Kowalski",
    "Byrne",
    "Lind",
)
_IR_TENORS: Final = (("3M", 0.25), ("1Y", 1.0), ("5Y", 5.0), ("10Y", 10.0))
_ONBOARDING: Final = datetime(2000, 1, 1, tzinfo=UTC)
_CHANGES_FROM: Final = date(2024, 1, 1)
_LAST_EPOCH: Final = date(2099, 12, 31)
_CHUNK_ROWS: Final = 100_000

_DDL: Final = """
create schema if not exists raw_trading;
create schema if not exists raw_risk;
create table if not exists raw_trading.trades (
    trade_id text primary key,
    epoch_date date not null,
    trade_ts timestamptz not null,
    book text not null,
    counterparty_id text not null,
    instrument_type text not null,
    side text not null,
    notional numeric(20, 2) not null,
    currency text not null,
    status text not null,
    source_system text not null
);
create index if not exists trades_epoch_date_idx on raw_trading.trades (epoch_date);
create table if not exists raw_trading.counterparties (
    counterparty_id text not null,
    version integer not null,
    valid_from timestamptz not null,
    legal_name text not null,
    contact_name text not null,
    contact_email text not null,
    country_code text not null,
    credit_rating text not null,
    lei text not null,
    primary key (counterparty_id, version)
);
create table if not exists raw_risk.risk_factors (
    risk_factor_id text not null,
    epoch_date date not null,
    risk_class text not null,
    currency text not null,
    tenor text not null,
    tenor_years numeric(6, 2) not null,
    risk_weight numeric(12, 8) not null,
    primary key (epoch_date, risk_factor_id)
);
create table if not exists raw_trading.generator_loads (
    epoch_date date primary key,
    seed bigint not null,
    trades integer not null,
    counterparties integer not null
);
"""


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate: `trades` trades of business date `epoch`, from `seed`."""

    trades: int
    epoch: date
    seed: int = 42
    counterparties: int = 2000

    def __post_init__(self) -> None:
        if not 1 <= self.trades <= MAX_TRADES:
            msg = f"--trades must be between 1 and {MAX_TRADES:,}, got {self.trades}"
            raise UsageError(msg)
        if not 1 <= self.counterparties <= 1_000_000:
            msg = f"--counterparties must be between 1 and 1,000,000, got {self.counterparties}"
            raise UsageError(msg)
        if not 0 <= self.seed < 2**63:
            msg = f"--seed must be between 0 and 2^63-1, got {self.seed}"
            raise UsageError(msg)
        if not _ONBOARDING.date() < self.epoch <= _LAST_EPOCH:
            # Before onboarding no counterparty exists; far in the future the version history grows unbounded.
            msg = f"--epoch must be after {_ONBOARDING.date()} and at most {_LAST_EPOCH}, got {self.epoch}"
            raise UsageError(msg)


@dataclass(frozen=True)
class GenerateReport:
    """What one load wrote."""

    epoch: date
    seed: int
    trades: int
    counterparty_versions: int
    risk_factors: int
    anomalies: dict[str, int]
    seconds: float
    digests: dict[str, str] = field(default_factory=dict)


def parse_epoch(text: str) -> date:
    """Parse `YYYY-MM-DD`.

    Raises:
        UsageError: The text is not a calendar date in that form.
    """
    msg = f"--epoch must be a date as YYYY-MM-DD, got {text!r}"
    if len(text) != 10:  # fromisoformat also takes 20261120 and week dates; the CLI promises one form
        raise UsageError(msg)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(msg) from None


def currency_codes(seed_csv: Path) -> list[str]:
    """The currencies the reference project knows: the codes of its `currencies` seed.

    Raises:
        ConfigurationError: The seed file is missing, has no `currency_code` column, or no codes.
    """
    try:
        with seed_csv.open(newline="") as handle:
            codes = [row["currency_code"] for row in csv.DictReader(handle)]
    except (OSError, KeyError) as e:
        msg = f"{seed_csv}: cannot read currency codes ({e}); is CDME_PROJECT_DIR the reference project?"
        raise ConfigurationError(msg) from e
    if not codes:
        msg = f"{seed_csv}: no currency codes; the generator draws trade currencies from this seed"
        raise ConfigurationError(msg)
    return codes


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


def counterparty_versions(seed: int, count: int, known_by: datetime) -> Iterator[tuple[object, ...]]:
    """Every counterparty version in force at or before `known_by`, as rows of `raw_trading.counterparties`."""
    for i in range(1, count + 1):
        rng = _rng(seed, "cp", i)
        cp_id = f"CP{i:06d}"
        legal_name = f"{rng.choice(_LAST)} {rng.choice(('Capital', 'Holdings', 'Bank', 'Partners'))} {i} Ltd"
        country = rng.choice(_COUNTRIES)
        lei = hashlib.sha256(f"{seed}:{cp_id}".encode()).hexdigest()[:18].upper() + f"{i % 97:02d}"
        period = rng.randint(90, 360)
        first_change = _CHANGES_FROM + timedelta(days=rng.randrange(period))
        valid_from = _ONBOARDING
        version = 1
        while valid_from <= known_by:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            email = f"{first}.{last}{i}@example.com".lower()
            yield (
                cp_id,
                version,
                valid_from,
                legal_name,
                f"{first} {last}",
                email,
                country,
                rng.choice(_RATINGS),
                lei,
            )
            change = first_change + timedelta(days=period * (version - 1))
            valid_from = datetime(change.year, change.month, change.day, tzinfo=UTC)
            version += 1


def risk_factor_rows(seed: int, epoch: date, currencies: Sequence[str]) -> list[tuple[object, ...]]:
    """The epoch's risk factors: four IR tenors per currency plus an FX spot factor per non-USD currency."""
    rng = _rng(seed, "rf", epoch)
    rows: list[tuple[object, ...]] = []
    for ccy in currencies:
        for tenor, years in _IR_TENORS:
            weight = round(-0.0001 * years * (0.9 + 0.2 * rng.random()), 8)  # PV01-like: loses as rates rise
            rows.append((f"IR.{ccy}.{tenor}", epoch, "IR", ccy, tenor, years, weight))
        if ccy != "USD":
            rows.append(
                (f"FX.{ccy}USD", epoch, "FX", ccy, "SPOT", 0, round(0.01 * (0.8 + 0.4 * rng.random()), 8))
            )
    return rows


def _trade_lines(request: GenerateRequest, currencies: Sequence[str]) -> tuple[Iterator[str], dict[str, int]]:
    # Column-wise draws (choices/list comprehensions) keep a million rows within a few seconds of CPU.
    n, epoch = request.trades, request.epoch
    rng = _rng(request.seed, "trades", epoch)
    weights = [max(1.0, 40.0 / (k + 1) ** 1.3) for k in range(len(currencies))]
    u = [rng.random() for _ in range(n)]
    books = rng.choices(_BOOKS, k=n)
    cps = [f"CP{k:06d}" for k in (rng.randrange(request.counterparties) + 1 for _ in range(n))]
    instruments = rng.choices(_INSTRUMENTS, k=n)
    sides = rng.choices(("BUY", "SELL"), k=n)
    ccys = rng.choices(currencies, weights=weights, k=n)
    notionals = [10 ** (4 + 4 * rng.random()) for _ in range(n)]
    millis = [int(rng.random() * 86_400_000) for _ in range(n)]
    sources = rng.choices(_SOURCES, k=n)
    amended = [rng.random() < 0.1 for _ in range(n)]

    c_cancel = ANOMALY_RATES["cancelled"]
    c_missing = c_cancel + ANOMALY_RATES["missing_counterparty"]
    c_nonpos = c_missing + ANOMALY_RATES["non_positive_notional"]
    c_ccy = c_nonpos + ANOMALY_RATES["unknown_currency"]
    counts = dict.fromkeys(ANOMALY_RATES, 0)
    day = f"{epoch.isoformat()}"
    prefix = f"T{epoch:%Y%m%d}-"

    def lines() -> Iterator[str]:
        for i in range(n):
            status = "AMENDED" if amended[i] else "NEW"
            cp, notional, ccy = cps[i], f"{notionals[i]:.2f}", ccys[i]
            x = u[i]
            if x < c_cancel:
                status = "CANCELLED"
                counts["cancelled"] += 1
            elif x < c_missing:
                cp = f"CPX{i % 100_000:05d}"
                counts["missing_counterparty"] += 1
            elif x < c_nonpos:
                notional = "0.00" if i % 2 else f"-{notional}"
                counts["non_positive_notional"] += 1
            elif x < c_ccy:
                ccy = _UNKNOWN_CURRENCIES[i % 2]
                counts["unknown_currency"] += 1
            ms = millis[i]
            ts = f"{day} {ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}+00"
            yield (
                f"{prefix}{i + 1:08d}\t{day}\t{ts}\t{books[i]}\t{cp}\t{instruments[i]}\t{sides[i]}\t"
                f"{notional}\t{ccy}\t{status}\t{sources[i]}\n"
            )

    return lines(), counts


def _copy_lines(cur: psycopg.Cursor[tuple[object, ...]], statement: str, lines: Iterator[str]) -> None:
    with cur.copy(statement) as copy:
        buffer = io.StringIO()
        for rows, line in enumerate(lines, start=1):
            buffer.write(line)
            if rows % _CHUNK_ROWS == 0:
                copy.write(buffer.getvalue())
                buffer = io.StringIO()
        copy.write(buffer.getvalue())


def generate(
    url: str, request: GenerateRequest, currencies: Sequence[str], *, digest: bool = False
) -> GenerateReport:
    """Load one epoch of raw data into the warehouse at `url`, replacing that epoch if it was loaded.

    Args:
        url: The warehouse URL.
        request: What to generate.
        currencies: The currency codes the project knows (`currency_codes()` of its seed).
        digest: Also compute the loaded tables' digests (an ordered md5 per table; costs a scan).

    Returns:
        Counts of what was written, the anomalies injected, and the time it took.

    Raises:
        UsageError: The warehouse already holds data generated from another seed.
        WarehouseError: The warehouse refused the load; nothing of it was written.
    """
    started = time.perf_counter()
    known_by = datetime(request.epoch.year, request.epoch.month, request.epoch.day, tzinfo=UTC)
    try:
        with (
            psycopg.connect(libpq_url(url), connect_timeout=10, options="-c timezone=UTC") as conn,
            conn.cursor() as cur,
        ):
            cur.execute("select pg_advisory_xact_lock(hashtext('cdme.generate'))")
            cur.execute(_DDL)
            cur.execute(
                "select seed from raw_trading.generator_loads where seed <> %s limit 1", (request.seed,)
            )
            if (other := cur.fetchone()) is not None:
                msg = (
                    f"the warehouse holds data generated with seed {other[0]}; "
                    f"use --seed {other[0]} or an empty database (mixing seeds breaks determinism)"
                )
                raise UsageError(msg)
            cur.execute("delete from raw_trading.trades where epoch_date = %s", (request.epoch,))
            cur.execute("delete from raw_risk.risk_factors where epoch_date = %s", (request.epoch,))

            lines, anomalies = _trade_lines(request, currencies)
            _copy_lines(
                cur,
                "copy raw_trading.trades (trade_id, epoch_date, trade_ts, book, counterparty_id, instrument_type,"
                " side, notional, currency, status, source_system) from stdin",
                lines,
            )

            cur.execute("create temporary table cp_load (like raw_trading.counterparties) on commit drop")
            with cur.copy("copy cp_load from stdin") as copy:
                for row in counterparty_versions(request.seed, request.counterparties, known_by):
                    copy.write_row(row)
            cur.execute(
                "insert into raw_trading.counterparties select * from cp_load "
                "on conflict (counterparty_id, version) do nothing"
            )
            cur.execute("select count(*) from raw_trading.counterparties where valid_from <= %s", (known_by,))
            versions = int(cur.fetchone()[0])  # type: ignore[index]  # count(*) always returns one row

            risk_rows = risk_factor_rows(request.seed, request.epoch, currencies)
            with cur.copy("copy raw_risk.risk_factors from stdin") as copy:
                for risk_row in risk_rows:
                    copy.write_row(risk_row)

            cur.execute(
                "insert into raw_trading.generator_loads values (%s, %s, %s, %s) on conflict (epoch_date) do "
                "update set seed = excluded.seed, trades = excluded.trades, counterparties = excluded.counterparties",
                (request.epoch, request.seed, request.trades, request.counterparties),
            )
            conn.commit()
            digests = table_digests(cur, request.epoch) if digest else {}
    except psycopg.Error as e:
        msg = f"loading epoch {request.epoch} failed, nothing was written: {first_line(e)}"
        raise WarehouseError(msg) from e
    return GenerateReport(
        epoch=request.epoch,
        seed=request.seed,
        trades=request.trades,
        counterparty_versions=versions,
        risk_factors=len(risk_rows),
        anomalies=anomalies,
        seconds=time.perf_counter() - started,
        digests=digests,
    )


def table_digests(cur: psycopg.Cursor[tuple[object, ...]], epoch: date) -> dict[str, str]:
    """An md5 over each raw table's rows for `epoch`, in key order: equal digests mean equal contents."""
    # Rows render timestamps in the session's time zone: fix it, so digests agree across servers.
    cur.execute("set local timezone = 'UTC'")
    queries = {
        "raw_trading.trades": "select md5(coalesce(string_agg(t::text, E'\\n' order by trade_id), '')) "
        "from raw_trading.trades t where epoch_date = %(epoch)s",
        "raw_trading.counterparties": "select md5(coalesce(string_agg(c::text, E'\\n' order by counterparty_id, "
        "version), '')) from raw_trading.counterparties c where valid_from <= %(epoch)s::timestamptz",
        "raw_risk.risk_factors": "select md5(coalesce(string_agg(r::text, E'\\n' order by risk_factor_id), '')) "
        "from raw_risk.risk_factors r where epoch_date = %(epoch)s",
    }
    digests = {}
    for table, query in queries.items():
        cur.execute(query, {"epoch": epoch})
        digests[table] = str(cur.fetchone()[0])  # type: ignore[index]  # an aggregate returns one row
    return digests
