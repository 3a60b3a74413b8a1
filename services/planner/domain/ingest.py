"""The ingest step: the declarative data-contract path from landed files to the raw tables.

A source declares in `meta.cdme.ingest` where its files land (`location`, relative to the landing directory,
`{epoch}` standing for the run's business date) and their `format` (`csv` with a header row, or `parquet`);
its YAML columns with their `data_type` are the contract. For each such source the step reads the epoch's
file, checks every row against the contract (the header names exactly the declared columns; each value
parses as its column's type; the epoch column holds the run's epoch), and only when every file passes loads
them all with COPY in one transaction, replacing the epoch's rows, together with one input checkpoint per
source (rows and the file's SHA-256) in `cdme_planner.input_checkpoints`. A file that breaks the contract is
rejected with its path, line and column, and nothing of any file is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from pydantic import ValidationError

from services.core.artifacts import Manifest
from services.core.errors import WarehouseError, describe_validation_error, first_line
from services.core.ldm.model import IngestDecl
from services.core.warehouse import libpq_url
from services.planner.domain.errors import IngestError

CHECKPOINTS = "cdme_planner.input_checkpoints"


def _text(value: str) -> Any:
    return value


def _integer(value: str) -> Any:
    return int(value)


def _numeric(value: str) -> Any:
    parsed = Decimal(value)
    if not parsed.is_finite():
        raise ValueError(value)
    return parsed


def _boolean(value: str) -> Any:
    lowered = value.strip().lower()
    if lowered in {"true", "t", "1", "yes"}:
        return True
    if lowered in {"false", "f", "0", "no"}:
        return False
    raise ValueError(value)


def _date(value: str) -> Any:
    return date.fromisoformat(value)


def _timestamptz(value: str) -> Any:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(value)  # a timestamp with time zone must say which zone
    return parsed


def _timestamp(value: str) -> Any:
    return datetime.fromisoformat(value)


# The declared types a contract may use, with their parser; the SQL type is the key itself, so only these
# spellings ever reach DDL.
_PARSERS: dict[str, Callable[[str], Any]] = {
    "text": _text,
    "varchar": _text,
    "character varying": _text,
    "integer": _integer,
    "int": _integer,
    "bigint": _integer,
    "smallint": _integer,
    "numeric": _numeric,
    "decimal": _numeric,
    "double precision": _numeric,
    "boolean": _boolean,
    "date": _date,
    "timestamp with time zone": _timestamptz,
    "timestamptz": _timestamptz,
    "timestamp": _timestamp,
    "timestamp without time zone": _timestamp,
}


@dataclass(frozen=True)
class SourceContract:
    """One source's declared file and columns."""

    unique_id: str
    schema: str
    table: str
    columns: dict[str, str]  # name -> declared data type, in YAML order
    epoch_column: str | None
    decl: IngestDecl
    owner: str | None
    personal: list[str]


@dataclass(frozen=True)
class CheckedFile:
    """A file that matched its contract, with its rows ready to COPY."""

    contract: SourceContract
    path: Path
    rows: list[tuple[Any, ...]]
    digest: str


def contracts(manifest: Manifest) -> list[SourceContract]:
    """The sources of `manifest` that declare `meta.cdme.ingest`, in a stable order.

    Raises:
        IngestError: A declaration is malformed, or names a column type the contract cannot check.
    """
    found: list[SourceContract] = []
    for source in sorted(manifest.sources.values(), key=lambda s: s.unique_id):
        raw = source.cdme.get("ingest")
        if raw is None:
            continue
        try:
            decl = IngestDecl.model_validate(raw)
        except ValidationError as e:
            msg = f"{source.unique_id}: meta.cdme.ingest: {describe_validation_error(e)}"
            raise IngestError(msg) from e
        columns: dict[str, str] = {}
        for name, column in source.columns.items():
            declared = (column.data_type or "").strip().lower()
            if declared not in _PARSERS:
                msg = (
                    f"{source.unique_id}: column {name} declares data_type {column.data_type!r}; ingest checks "
                    f"{', '.join(sorted(_PARSERS))}"
                )
                raise IngestError(msg)
            columns[name] = declared
        if not columns:
            msg = f"{source.unique_id}: meta.cdme.ingest needs the source's columns documented with data_type"
            raise IngestError(msg)
        epoch_column = source.cdme.get("epoch_column")
        found.append(
            SourceContract(
                unique_id=source.unique_id,
                schema=source.schema_,
                table=source.identifier,
                columns=columns,
                epoch_column=epoch_column if isinstance(epoch_column, str) else None,
                decl=decl,
                owner=source.cdme.get("owner"),
                personal=[n for n, c in source.columns.items() if c.cdme.get("sensitivity") == "personal"],
            )
        )
    return found


def resolve_location(landing_dir: Path, decl: IngestDecl, epoch: date) -> Path:
    """The file a declaration names for `epoch`, which must lie inside `landing_dir`.

    Raises:
        IngestError: The location is absolute, climbs out of the landing directory, or is malformed.
    """
    try:
        relative = decl.location.format(epoch=epoch.isoformat())
    except (KeyError, IndexError, ValueError) as e:
        msg = f"ingest location {decl.location!r} may only use the placeholder {{epoch}}"
        raise IngestError(msg) from e
    if "\0" in relative or Path(relative).is_absolute():
        msg = f"ingest location {decl.location!r} must be a relative path inside the landing directory"
        raise IngestError(msg)
    root = landing_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        msg = f"ingest location {decl.location!r} leaves the landing directory {root}"
        raise IngestError(msg)
    return path


_Rows = tuple[list[str], Iterator[tuple[int, dict[str, str]]]]


def _csv_rows(path: Path, data: bytes) -> _Rows:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        msg = f"{path}: not UTF-8 text (byte {e.start})"
        raise IngestError(msg) from e
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        msg = f"{path}:1: empty file, expected a header row"
        raise IngestError(msg) from None
    except csv.Error as e:
        msg = f"{path}:1: {e}"
        raise IngestError(msg) from e
    names = [h.strip() for h in header]

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                msg = f"{path}:{reader.line_num}: {e}"
                raise IngestError(msg) from e
            if not values:
                continue
            if len(values) != len(names):
                msg = f"{path}:{reader.line_num}: {len(values)} fields, the header has {len(names)}"
                raise IngestError(msg)
            yield reader.line_num, dict(zip(names, values, strict=True))

    return names, rows()


def _parquet_rows(path: Path, data: bytes) -> _Rows:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]  # optional dependency
    except ImportError as e:
        msg = f"{path}: reading Parquet needs pyarrow, which is not installed (pip install pyarrow)"
        raise IngestError(msg) from e
    table = pq.read_table(io.BytesIO(data))

    def text(value: Any) -> str:
        if value is None:
            return ""
        return value.isoformat() if hasattr(value, "isoformat") else str(value)

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        # A Parquet "line" is the row's ordinal: the file has no lines.
        for index, row in enumerate(table.to_pylist(), start=1):
            yield index, {k: text(v) for k, v in row.items()}

    return list(table.column_names), rows()


def check_file(contract: SourceContract, path: Path, epoch: date) -> CheckedFile:
    """Read a landed file and check it against the source's contract.

    Raises:
        IngestError: The file is missing, or a header, row or value breaks the contract; the message is
            `<file>:<line>:<column>: <what>`.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        msg = f"{path}: no file for epoch {epoch} of {contract.unique_id}"
        raise IngestError(msg) from e
    except OSError as e:
        msg = f"{path}: cannot be read: {e.strerror}"
        raise IngestError(msg) from e
    reader = _csv_rows if contract.decl.format == "csv" else _parquet_rows
    declared = list(contract.columns)
    rows: list[tuple[Any, ...]] = []
    names, records = reader(path, data)
    _check_header(path, names, declared)
    for line, record in records:
        parsed: list[Any] = []
        for name in declared:
            value = record[name]
            if value == "":
                parsed.append(None)
                continue
            try:
                parsed.append(_PARSERS[contract.columns[name]](value))
            except (ValueError, InvalidOperation, ArithmeticError):
                msg = f"{path}:{line}:{name}: {value[:40]!r} is not a valid {contract.columns[name]}"
                raise IngestError(msg) from None
            if name == contract.epoch_column and parsed[-1] != epoch:
                msg = f"{path}:{line}:{name}: {value!r} is not the run's epoch {epoch}"
                raise IngestError(msg)
        rows.append(tuple(parsed))
    return CheckedFile(contract, path, rows, f"sha256:{hashlib.sha256(data).hexdigest()}")


def _check_header(path: Path, names: list[str], declared: list[str]) -> None:
    missing = [n for n in declared if n not in names]
    unknown = [n for n in names if n not in declared]
    if unknown:
        column = names.index(unknown[0]) + 1
        msg = f"{path}:1:{unknown[0]}: column {column} is not a declared column of the source"
        raise IngestError(msg)
    if missing:
        msg = f"{path}:1:{missing[0]}: declared column missing from the file"
        raise IngestError(msg)


def load(warehouse_url: str, run_id: uuid.UUID, epoch: date, files: list[CheckedFile]) -> None:
    """COPY checked files into their tables in one transaction, replacing the epoch's rows, with checkpoints.

    Raises:
        WarehouseError: The warehouse refused the load (nothing is loaded then).
    """
    try:
        with psycopg.connect(libpq_url(warehouse_url), connect_timeout=10) as conn, conn.transaction():
            for checked in files:
                _load_one(conn, run_id, epoch, checked)
    except psycopg.Error as e:
        msg = f"loading the epoch's files failed, nothing was loaded: {first_line(e)}"
        raise WarehouseError(msg) from e


def _load_one(conn: psycopg.Connection[Any], run_id: uuid.UUID, epoch: date, checked: CheckedFile) -> None:
    c = checked.contract
    table = sql.Identifier(c.schema, c.table)
    columns = sql.SQL(", ").join(sql.Identifier(n) for n in c.columns)
    definitions = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t)) for n, t in c.columns.items()
    )
    conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(c.schema)))
    conn.execute(sql.SQL("create table if not exists {} ({})").format(table, definitions))
    if c.epoch_column is not None:
        conn.execute(
            sql.SQL("delete from {} where {} = %s").format(table, sql.Identifier(c.epoch_column)), (epoch,)
        )
    else:
        conn.execute(sql.SQL("truncate {}").format(table))
    with conn.cursor().copy(sql.SQL("copy {} ({}) from stdin").format(table, columns)) as copy:
        for row in checked.rows:
            copy.write_row(row)
    conn.execute(
        f"insert into {CHECKPOINTS} (run_id, source, file, format, rows, digest) "
        "values (%s, %s, %s, %s, %s, %s) on conflict (run_id, source) do update set file = excluded.file, "
        "format = excluded.format, rows = excluded.rows, digest = excluded.digest, loaded_at = now()",
        (run_id, c.unique_id, str(checked.path), c.decl.format, len(checked.rows), checked.digest),
    )


def ingest(
    manifest: Manifest, landing_dir: Path, warehouse_url: str, run_id: uuid.UUID, epoch: date
) -> dict[str, Any]:
    """Check every declared file of the epoch, then load them all, or none.

    Returns:
        The step's output: one checkpoint per source (file, format, rows, digest, owner, personal columns).

    Raises:
        IngestError: A declaration or file breaks its contract (nothing is loaded).
        WarehouseError: The load failed (nothing is loaded).
    """
    declared = contracts(manifest)
    checked = [check_file(c, resolve_location(landing_dir, c.decl, epoch), epoch) for c in declared]
    load(warehouse_url, run_id, epoch, checked)
    return {
        "sources": [
            {
                "source": f.contract.unique_id,
                "file": str(f.path),
                "format": f.contract.decl.format,
                "rows": len(f.rows),
                "digest": f.digest,
                "owner": f.contract.owner,
                "personal_columns": f.contract.personal,
            }
            for f in checked
        ]
    }
