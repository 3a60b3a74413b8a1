"""Which PostgreSQL functions make a model non-deterministic, as PostgreSQL's own catalog says.

`pg_volatility.json` (shipped with the code) lists `pg_proc` functions with `provolatile = 'v'`, plus the
zero-argument stable functions that return the clock (`now()`, `statement_timestamp()`, ...): stable within a
transaction but different on every run, which is what matters for a reproducible pipeline. The SQL-standard
clock keywords (`current_date`, `current_timestamp`, ...) are not functions in `pg_proc`, so they are listed
here. `catalog_volatility()` derives the list from a live server; a test keeps the shipped file equal to it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

CLOCK_KEYWORDS = frozenset(
    {"current_date", "current_time", "current_timestamp", "localtime", "localtimestamp"}
)

_VOLATILE_SQL = """
select distinct p.proname
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'pg_catalog' and p.provolatile = 'v'
order by 1
"""
_CLOCK_SQL = """
select distinct p.proname
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where n.nspname = 'pg_catalog' and p.provolatile = 's' and p.pronargs = 0
  and p.prorettype in ('timestamptz'::regtype, 'timestamp'::regtype, 'date'::regtype, 'time'::regtype,
                       'timetz'::regtype)
order by 1
"""


def catalog_volatility(conn: Any) -> dict[str, Any]:
    """Read the lists from a live PostgreSQL (`conn` is a psycopg connection).

    Reserved keywords (`pg_get_keywords()`, category R) ride along: they are the other catalog fact the
    PostgreSQL rules need, and one file keeps one regeneration step.
    """
    version = str(conn.execute("show server_version").fetchone()[0]).split()[0]
    return {
        "postgres_version": version,
        "volatile": [r[0] for r in conn.execute(_VOLATILE_SQL).fetchall()],
        "clock": [r[0] for r in conn.execute(_CLOCK_SQL).fetchall()],
        "reserved_keywords": [
            r[0]
            for r in conn.execute(
                "select word from pg_get_keywords() where catcode = 'R' order by 1"
            ).fetchall()
        ],
    }


@lru_cache(maxsize=1)
def shipped_volatility() -> dict[str, Any]:
    """The lists shipped with CDME (`pg_volatility.json`)."""
    text = resources.files("services.validation.domain").joinpath("pg_volatility.json").read_text()
    data: dict[str, Any] = json.loads(text)
    return data


@lru_cache(maxsize=1)
def reserved_keywords() -> frozenset[str]:
    """PostgreSQL's reserved keywords: an unquoted identifier spelled like one is a syntax error."""
    return frozenset(shipped_volatility()["reserved_keywords"])


@lru_cache(maxsize=1)
def nondeterministic_functions() -> frozenset[str]:
    """Lower-case names whose result differs between two runs on the same data."""
    data = shipped_volatility()
    return frozenset(data["volatile"]) | frozenset(data["clock"]) | CLOCK_KEYWORDS
