"""The ingest step: the declarative data-contract path from landed files to the raw tables.

A source declares in `meta.cdme.ingest` where its files land (`location`, relative to the landing directory,
`{epoch}` standing for the run's business date) and their `format` (`csv` with a header row, or `parquet`);
its YAML columns with their `data_type` are the contract. For each such source the step reads the epoch's
file, checks every row against the contract (the header names exactly the declared columns; each value
parses as its column's type; the key and epoch columns have values; the epoch column holds the run's epoch),
and loads them all with COPY in one transaction, replacing the epoch's rows, together with one input checkpoint
per source (rows and the file's SHA-256) in `cdme_planner.input_checkpoints`. A file that breaks the contract
is rejected with its path, line and column, and nothing of any file is loaded.

A CSV file is checked whole before the transaction opens. A Parquet file's schema (column names and Arrow
types) is checked before it; its values are checked batch by batch while they stream into COPY, so a large
file never sits in memory whole, and a bad value rolls the transaction back. Its position is the row's
ordinal (1-based): Parquet has no lines.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from psycopg import sql
from pydantic import ValidationError

from services.core.artifacts import Manifest
from services.core.artifacts.base import as_list
from services.core.errors import WarehouseError, describe_validation_error, first_line
from services.core.ldm.model import IngestDecl
from services.core.warehouse import libpq_url
from services.planner.domain.errors import IngestError

CHECKPOINTS = "cdme_planner.input_checkpoints"
# Rows per Arrow batch streamed from a Parquet file into COPY: what one file holds in memory at a time.
PARQUET_BATCH_ROWS = 65_536
_READ_BUFFER = 1 << 20


def _text(value: str) -> Any:
    if "\0" in value:
        raise ValueError(value)  # PostgreSQL text cannot hold U+0000
    return value


# The integer types' ranges: a value outside is refused at its row rather than by the warehouse mid-COPY.
_INT_RANGES: dict[str, tuple[int, int]] = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "int": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}


def _integer(kind: str) -> Callable[[str], Any]:
    low, high = _INT_RANGES[kind]

    def parse(value: str) -> Any:
        parsed = int(value)
        if not low <= parsed <= high:
            raise ValueError(value)
        return parsed

    return parse


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
    "integer": _integer("integer"),
    "int": _integer("int"),
    "bigint": _integer("bigint"),
    "smallint": _integer("smallint"),
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


def _is_text(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))


def _is_exact(t: pa.DataType) -> bool:
    return bool(pa.types.is_decimal(t) or pa.types.is_integer(t))


def _is_double(t: pa.DataType) -> bool:
    return bool(pa.types.is_float32(t) or pa.types.is_float64(t) or pa.types.is_integer(t))


def _is_zoned(t: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(t) and t.tz is not None)


def _is_naive(t: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(t) and t.tz is None)


# The Arrow types a Parquet column may have for each declared type, and how a message names them. A float is
# no numeric (it cannot carry an exact decimal); a timestamp without a zone is no timestamptz (as in CSV).
_ARROW_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    **dict.fromkeys(("text", "varchar", "character varying"), (_is_text, "a string")),
    **dict.fromkeys(("integer", "int", "bigint", "smallint"), (pa.types.is_integer, "an integer")),
    **dict.fromkeys(("numeric", "decimal"), (_is_exact, "a decimal or an integer")),
    "double precision": (_is_double, "a float or an integer"),
    "boolean": (pa.types.is_boolean, "a boolean"),
    "date": (pa.types.is_date, "a date"),
    **dict.fromkeys(("timestamp with time zone", "timestamptz"), (_is_zoned, "a timestamp with a time zone")),
    **dict.fromkeys(
        ("timestamp", "timestamp without time zone"), (_is_naive, "a timestamp without a time zone")
    ),
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
    key: tuple[str, ...] = ()

    @property
    def required(self) -> dict[str, str]:
        """The columns every row must fill, with what makes them required: the key and the epoch column."""
        roles = {name: "the source's key" for name in self.key if name in self.columns}
        if self.epoch_column in self.columns:
            roles[self.epoch_column] = "the epoch column"
        return roles


@dataclass(frozen=True)
class CheckedFile:
    """A file whose contract checks passed so far, and how its rows reach COPY.

    `write` puts the rows into an open COPY and returns how many it wrote; a streamed format checks its values
    as it goes and raises `IngestError` at the first bad one (the surrounding transaction then loads nothing).
    """

    contract: SourceContract
    path: Path
    digest: str
    write: Callable[[psycopg.Copy], int]
    copy_format: str  # "text" (rows written by psycopg) or "csv" (CSV text rendered by Arrow)
    # Where in the file the record is that COPY counts as `line` (for a value the warehouse refused).
    locate: Callable[[int], int]


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
                key=tuple(str(k) for k in as_list(source.cdme.get("key")) if isinstance(k, str)),
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


def _read_failure(contract: SourceContract, path: Path, epoch: date, error: OSError) -> IngestError:
    if isinstance(error, FileNotFoundError):
        return IngestError(f"{path}: no file for epoch {epoch} of {contract.unique_id}")
    return IngestError(f"{path}: cannot be read: {error.strerror or error}")


def check_file(contract: SourceContract, path: Path, epoch: date) -> CheckedFile:
    """Read a landed file and check it against the source's contract.

    A CSV file is checked whole here; a Parquet file's schema is checked here and its values while `write`
    streams them.

    Raises:
        IngestError: The file is missing, or a header, row or value breaks the contract; the message is
            `<file>:<line>:<column>: <what>` (a Parquet row's ordinal stands for the line).
    """
    if contract.decl.format == "parquet":
        return _check_parquet(contract, path, epoch)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _read_failure(contract, path, epoch, e) from e
    declared = list(contract.columns)
    required = contract.required
    rows: list[tuple[Any, ...]] = []
    lines: list[int] = []
    names, records = _csv_rows(path, data)
    _check_header(f"{path}:1", names, declared)
    for line, record in records:
        parsed: list[Any] = []
        for name in declared:
            value = record[name]
            if value == "":
                if name in required:
                    msg = f"{path}:{line}:{name}: empty, but {name} is {required[name]} and must have a value"
                    raise IngestError(msg)
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
        lines.append(line)

    def write(copy: psycopg.Copy) -> int:
        for row in rows:
            copy.write_row(row)
        return len(rows)

    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"

    def locate(line: int) -> int:
        # psycopg writes text-format rows, one line each: COPY's line is the row's index.
        return lines[line - 1] if 0 < line <= len(lines) else line

    return CheckedFile(contract, path, digest, write, copy_format="text", locate=locate)


def _check_header(where: str, names: list[str], declared: list[str]) -> None:
    for index, name in enumerate(names):
        if name in names[:index]:
            msg = f"{where}:{name}: column {index + 1} repeats column {names.index(name) + 1}"
            raise IngestError(msg)
    missing = [n for n in declared if n not in names]
    unknown = [n for n in names if n not in declared]
    if unknown:
        column = names.index(unknown[0]) + 1
        msg = f"{where}:{unknown[0]}: column {column} is not a declared column of the source"
        raise IngestError(msg)
    if missing:
        msg = f"{where}:{missing[0]}: declared column missing from the file"
        raise IngestError(msg)


def _open_parquet(contract: SourceContract, path: Path, epoch: date) -> pq.ParquetFile:
    try:
        # Read column chunks through a small buffer instead of pre-buffering a whole row group: memory stays
        # near one batch however large the row groups are (measured: 25 MB for 3M rows in one row group, 65 MB
        # with pre-buffering).
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER)
    except OSError as e:
        if not path.is_file():
            raise _read_failure(contract, path, epoch, FileNotFoundError(str(path))) from e
        msg = f"{path}: not a readable Parquet file: {first_line(e)}"
        raise IngestError(msg) from e
    except pa.ArrowException as e:
        msg = f"{path}: not a readable Parquet file: {first_line(e)}"
        raise IngestError(msg) from e


def _check_parquet(contract: SourceContract, path: Path, epoch: date) -> CheckedFile:
    try:
        with path.open("rb") as f:
            digest = f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    except OSError as e:
        raise _read_failure(contract, path, epoch, e) from e
    parquet = _open_parquet(contract, path, epoch)
    try:
        schema = parquet.schema_arrow
    finally:
        parquet.close()
    # A Parquet file has no header line: its schema's problems are located by file and column only.
    _check_header(str(path), list(schema.names), list(contract.columns))
    for name, declared in contract.columns.items():
        found = schema.field(name).type
        accepts, expected = _ARROW_TYPES[declared]
        value_type = found.value_type if pa.types.is_dictionary(found) else found
        if not accepts(value_type):
            msg = f"{path}:{name}: Arrow type {found} where the declared {declared} needs {expected}"
            raise IngestError(msg)

    def write(copy: psycopg.Copy) -> int:
        return _stream_parquet(contract, path, schema, epoch, copy)

    def locate(line: int) -> int:
        return _row_of_copy_line(contract, path, epoch, line)

    return CheckedFile(contract, path, digest, write, copy_format="csv", locate=locate)


def _stream_parquet(
    contract: SourceContract, path: Path, schema: pa.Schema, epoch: date, copy: psycopg.Copy
) -> int:
    parquet = _open_parquet(contract, path, epoch)
    written = 0
    options = pa_csv.WriteOptions(include_header=False)
    try:
        if not parquet.schema_arrow.equals(schema):
            msg = f"{path}: the file changed between its check and its load"
            raise IngestError(msg)
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(contract.columns)):
            checked = _check_batch(contract, path, epoch, batch, written)
            sink = pa.BufferOutputStream()
            # Arrow renders the batch as CSV (nulls as empty fields, strings quoted), which COPY's csv format
            # reads back exactly, without a Python object per value.
            pa_csv.write_csv(checked, sink, options)
            copy.write(memoryview(sink.getvalue()))
            written += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        msg = f"{path}: unreadable after row {written}: {first_line(e)}"
        raise IngestError(msg) from e
    finally:
        parquet.close()
    return written


def _row_of_copy_line(contract: SourceContract, path: Path, epoch: date, line: int) -> int:
    """The row whose CSV record ends on COPY's `line`: a string holding newlines spans several lines.

    Only a value the warehouse refused needs this, so the file is read a second time rather than every load
    counting lines.
    """
    parquet = _open_parquet(contract, path, epoch)
    ended, row = 0, 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(contract.columns)):
            newlines = [0] * batch.num_rows
            for array in batch.columns:
                value_type = array.type.value_type if pa.types.is_dictionary(array.type) else array.type
                if _is_text(value_type):
                    counts = pc.count_substring(pc.cast(array, value_type), "\n").to_pylist()
                    newlines = [n + (c or 0) for n, c in zip(newlines, counts, strict=True)]
            for extra in newlines:
                row += 1
                ended += 1 + extra
                if ended >= line:
                    return row
    finally:
        parquet.close()
    return line


def _first(mask: pa.Array) -> int | None:
    index = pc.index(mask, True).as_py()
    return None if index is None or index < 0 else int(index)


def _value(array: pa.Array, index: int) -> Any:
    """The Python value at `index`, or Arrow's rendering of one Python cannot hold (nanoseconds, year 10000)."""
    try:
        return array[index].as_py()
    except (ValueError, OverflowError):
        if pa.types.is_timestamp(array.type) and array.type.unit == "ns":
            return pc.cast(array.slice(index, 1), pa.string())[0].as_py()
        return f"{array[index].value} ({array.type})"


def _shown(value: Any) -> str:
    text = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return repr(text[:40])


# What a failed check says: a fixed text, or one made from the first offending value.
_Why = str | Callable[[Any], str]


def _check_batch(
    contract: SourceContract, path: Path, epoch: date, batch: pa.RecordBatch, before: int
) -> pa.RecordBatch:
    """The batch's columns in declared order, ready for COPY, once every value fits its declared column.

    Raises:
        IngestError: A value breaks the contract, named by file, row (1-based over the file) and column.
    """
    required = contract.required
    columns: list[pa.Array] = []
    for name, declared in contract.columns.items():
        array = batch.column(name)
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()

        def fail(mask: pa.Array, what: _Why, name: str = name, array: pa.Array = array) -> None:
            index = _first(mask)
            if index is not None:
                why = what if isinstance(what, str) else what(_value(array, index))
                msg = f"{path}:{before + index + 1}:{name}: {why}"
                raise IngestError(msg)

        if name in required and array.null_count:
            fail(pc.is_null(array), f"null, but {name} is {required[name]} and must have a value")
        array = _fitted(array, declared, fail)
        if name == contract.epoch_column:
            found = array if pa.types.is_date32(array.type) else pc.cast(array, pa.string())
            wanted = pa.scalar(epoch, pa.date32()) if pa.types.is_date32(found.type) else epoch.isoformat()
            fail(pc.not_equal(found, wanted), lambda v: f"{_shown(v)} is not the run's epoch {epoch}")
        columns.append(array)
    return pa.RecordBatch.from_arrays(columns, names=list(contract.columns))


def _fitted(array: pa.Array, declared: str, fail: Callable[[pa.Array, _Why], None]) -> pa.Array:
    """`array` as PostgreSQL takes it for `declared`, after refusing the values the column cannot hold."""
    kind = array.type
    if declared in _INT_RANGES and pa.types.is_integer(kind):
        low, high = _INT_RANGES[declared]
        bits = kind.bit_width
        kind_low, kind_high = (0, 2**bits - 1) if pa.types.is_unsigned_integer(kind) else _signed(bits)
        too_small = pc.less(array, pa.scalar(low, kind)) if kind_low < low else None
        too_large = pc.greater(array, pa.scalar(high, kind)) if kind_high > high else None
        for mask in (too_small, too_large):
            if mask is not None:
                fail(mask, lambda v: f"{v} does not fit {declared} ({low} to {high})")
    elif pa.types.is_floating(kind):
        fail(pc.invert(pc.is_finite(array)), lambda v: f"{v} is not a finite {declared}")
    elif _is_text(kind):
        fail(pc.match_substring(array, "\0"), lambda v: f"{_shown(v)} holds U+0000, which text cannot hold")
    elif pa.types.is_date(kind):
        array = pc.cast(array, pa.date32())
        days = pc.cast(array, pa.int32())
        fail(pc.or_(pc.less(days, _FIRST_DAY), pc.greater(days, _LAST_DAY)), _outside_years)
    elif pa.types.is_timestamp(kind):
        if kind.unit != "ns":  # nanoseconds since 1970 cannot leave the years 1677 to 2262
            ticks = pc.cast(array, pa.int64())
            per_second = {"s": 1, "ms": 1_000, "us": 1_000_000}[kind.unit]
            low, high = _FIRST_DAY * 86_400 * per_second, (_LAST_DAY + 1) * 86_400 * per_second
            fail(pc.or_(pc.less(ticks, low), pc.greater_equal(ticks, high)), _outside_years)
        if kind.unit == "ns":
            # PostgreSQL keeps microseconds: a value with nanoseconds would be rounded, so it does not fit.
            ticks = pc.cast(array, pa.int64())
            rest = pc.subtract(ticks, pc.multiply(pc.divide(ticks, 1000), 1000))
            fail(
                pc.not_equal(rest, 0), lambda v: f"{_shown(v)} has nanoseconds; {declared} keeps microseconds"
            )
            array = pc.cast(array, pa.timestamp("us", tz=kind.tz))
        if kind.tz is not None:
            # Arrow writes a zoned timestamp in its own zone with a `+hhmm` offset; UTC renders as `Z`.
            array = pc.cast(array, pa.timestamp(array.type.unit, tz="UTC"))
    return array


# Days since 1970 of 0001-01-01 and 9999-12-31: Arrow renders dates and timestamps outside these years in forms
# PostgreSQL reads wrongly or not at all, so they are refused at their row.
_FIRST_DAY, _LAST_DAY = -719_162, 2_932_896


def _outside_years(value: Any) -> str:
    return f"{_shown(value)} is outside the years 1 to 9999"


def _signed(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def load(warehouse_url: str, run_id: uuid.UUID, epoch: date, files: list[CheckedFile]) -> list[int]:
    """COPY checked files into their tables in one transaction, replacing the epoch's rows, with checkpoints.

    Returns:
        The rows loaded from each file, in order.

    Raises:
        IngestError: A streamed file broke its contract, or the warehouse refused one of its values (nothing
            is loaded then).
        WarehouseError: The warehouse refused the load (nothing is loaded then).
    """
    try:
        with psycopg.connect(libpq_url(warehouse_url), connect_timeout=10) as conn, conn.transaction():
            return [_load_one(conn, run_id, epoch, checked) for checked in files]
    except psycopg.Error as e:
        msg = f"loading the epoch's files failed, nothing was loaded: {first_line(e)}"
        raise WarehouseError(msg) from e


# Where PostgreSQL says a COPY value failed: `COPY trades, line 3, column trade_ts: "..."`.
_COPY_CONTEXT = re.compile(r"COPY [^,]*, line (\d+)(?:, column ([^:]+))?")


def _load_one(conn: psycopg.Connection[Any], run_id: uuid.UUID, epoch: date, checked: CheckedFile) -> int:
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
    statement = sql.SQL("copy {} ({}) from stdin (format {})").format(
        table, columns, sql.SQL(checked.copy_format)
    )
    try:
        with conn.cursor().copy(statement) as copy:
            rows = checked.write(copy)
    except psycopg.DataError as e:
        raise IngestError(_refused_value(checked, e)) from e
    conn.execute(
        f"insert into {CHECKPOINTS} (run_id, source, file, format, rows, digest) "
        "values (%s, %s, %s, %s, %s, %s) on conflict (run_id, source) do update set file = excluded.file, "
        "format = excluded.format, rows = excluded.rows, digest = excluded.digest, loaded_at = now()",
        (run_id, c.unique_id, str(checked.path), c.decl.format, rows, checked.digest),
    )
    return rows


def _refused_value(checked: CheckedFile, error: psycopg.DataError) -> str:
    """A value the checks let through but the warehouse refused, located in the file from COPY's context."""
    found = _COPY_CONTEXT.search(error.diag.context or "")
    if found is None:
        return f"{checked.path}: the warehouse refused a value: {first_line(error)}"
    line = checked.locate(int(found.group(1)))
    column = f":{found.group(2).strip()}" if found.group(2) else ""
    return f"{checked.path}:{line}{column}: {first_line(error)}"


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
    loaded = load(warehouse_url, run_id, epoch, checked)
    return {
        "sources": [
            {
                "source": f.contract.unique_id,
                "file": str(f.path),
                "format": f.contract.decl.format,
                "rows": rows,
                "digest": f.digest,
                "owner": f.contract.owner,
                "personal_columns": f.contract.personal,
            }
            for f, rows in zip(checked, loaded, strict=True)
        ]
    }
