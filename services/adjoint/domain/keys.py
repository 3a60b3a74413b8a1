"""Record keys as one text value: the `cdme-key/v1` encoding.

A record key is one or more columns. `cdme-key/v1` encodes it as text, the same in SQL (capture writes it
set-based in the warehouse) and in Python (clients build keys to query with):

- each component is PostgreSQL's text output of the value (`value::text`, sessions at `DateStyle=ISO, YMD`,
  `TimeZone=UTC`, `extra_float_digits=1`, so dates read `2026-11-20` and timestamps are in UTC);
- in that text `%` becomes `%25` and `|` becomes `%7C`; a NULL component is `%N` (unambiguous: a literal `%`
  is always escaped);
- components are joined with `|` in the order of the key's columns.

So a one-column key whose value has neither `%` nor `|` is its own text (`T000042`), and
`(2026-11-20, BOOK-1, USD)` is `2026-11-20|BOOK-1|USD`. Any change to these rules is a new version.

Examples:
    >>> encode_key(["2026-11-20", "BOOK|1", None])
    '2026-11-20|BOOK%7C1|%N'
    >>> decode_key("2026-11-20|BOOK%7C1|%N")
    ['2026-11-20', 'BOOK|1', None]
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlglot import exp

KEY_ENCODING = "cdme-key/v1"
# Session settings under which `value::text` is the canonical component text of `cdme-key/v1`.
ENCODING_SESSION = (
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
)
_NULL = "%N"


def encode_component(value: str | None) -> str:
    """One component's text in `cdme-key/v1` (`value` is already PostgreSQL's text of the value)."""
    if value is None:
        return _NULL
    return value.replace("%", "%25").replace("|", "%7C")


def encode_key(components: Sequence[str | None]) -> str:
    """The `cdme-key/v1` text of a key given its components' text, in key column order."""
    return "|".join(encode_component(c) for c in components)


def decode_key(key: str) -> list[str | None]:
    """The components of a `cdme-key/v1` key (None for NULL)."""
    out: list[str | None] = []
    for part in key.split("|"):
        out.append(None if part == _NULL else part.replace("%7C", "|").replace("%25", "%"))
    return out


def key_sql(columns: Sequence[exp.Expr]) -> exp.Expr:
    """The SQL expression that encodes `columns` as a `cdme-key/v1` key (text, never NULL)."""
    parts: list[exp.Expr] = []
    for column in columns:
        text = exp.cast(column.copy(), "text")
        escaped = exp.func(
            "replace",
            exp.func("replace", text, exp.Literal.string("%"), exp.Literal.string("%25")),
            exp.Literal.string("|"),
            exp.Literal.string("%7C"),
        )
        parts.append(exp.func("coalesce", escaped, exp.Literal.string(_NULL)))
    if len(parts) == 1:
        return parts[0]
    joined: exp.Expr = parts[0]
    for part in parts[1:]:
        joined = exp.DPipe(this=exp.DPipe(this=joined, expression=exp.Literal.string("|")), expression=part)
    return exp.paren(joined)


def key_sql_text(columns: Sequence[str], qualifier: str | None = None) -> str:
    """`key_sql` over named columns (optionally qualified), rendered for PostgreSQL."""
    return key_sql([exp.column(c, table=qualifier, quoted=True) for c in columns]).sql(dialect="postgres")
