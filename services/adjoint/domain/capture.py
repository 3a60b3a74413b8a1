"""Capture: one run's adjoint metadata, written set-based in the warehouse.

For every model that succeeded in the run (run_results status `success`) and each driving upstream, the capture
SQL of `derive` runs as `INSERT ... SELECT` into fresh tables that become the run's partitions of
`cdme_adjoint.mapped`, `filtered` and `errored`; no key set ever travels to Python. Everything that decides the
run's metadata happens in one transaction: the previous capture of the run (if any) is dropped and the new
partitions attached at commit, so capturing twice yields the same rows, never duplicates, and a failed capture
leaves the previous one. The pairs are the one exception: `workers` connections of their own load every morphism's
pairs into the table that becomes the run's partition of `mapped` while the capture accounts the morphisms, reading
the relations as the capture's transaction saw them when it began, then index it. That table is committed but
attached to nothing until the capture commits, emptied if the run turns out to need key sets, and dropped if the
capture fails (a capture of the run sweeps any a crash left).

Per morphism (model M, driving upstream U), with `input` the keys of U (of the run's epoch, when U is a source
with an `epoch_column`):

- mapped: pairs (U key, M key) from the rewritten SQL, or from M's built relation where M's key carries U's
  unchanged and M is a table or view;
- errored: the rows of M's declared error sink whose `source_entity` is U;
- filtered: input keys neither mapped nor errored whose rows fail an explicit predicate (first one failed);
- unaccounted: input keys in none of the three; overlap: keys in two of them (both with samples).

Accounting runs by digests first (`_Capture.accounted`): per morphism, the count and the sum of 64-bit hashes of
the input keys must equal those of the mapped, errored and filtered keys, which takes a few scans and builds no
key set. Only when a morphism does not balance that way is the run captured again with key sets, which name the unaccounted and overlapping keys; either way the accounting is the same (the property tests
compare the two).

Lineage modes: `full` stores every pair, but for identities whose model another captured morphism reads
(`implied_identities`): their pairs are the model's keys, which are that reader's stored input keys, and the
run records where to read them (`morphisms.keys_from`); `summary` stores the pairs of a deterministic hash
sample of source keys (`hashtextextended(source_key, 0)` mod 1e6 below `rate`·1e6) with full counts;
`key_derivable` stores no pairs, only the SQL of each morphism's pairs (`pairs_sql`) and checkpoints that
queries check before evaluating it: envelopes (count, min/max key and an order-independent digest) of each
morphism's input and output keys, and for pairs derived by SQL rather than read from the built relation, the
count and digest of the pairs (`pairs_checkpoint`). A morphism whose pairs a later evaluation need not give
again (`downgraded`) has its pairs stored as `full` does.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from graphlib import TopologicalSorter
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine
from sqlglot import exp

from services.adjoint.domain.derive import Derivation, Relation, derive, nondeterministic_sql
from services.adjoint.domain.errors import CaptureInputError, DerivationError
from services.adjoint.domain.keys import ENCODING_SESSION, KEY_ENCODING, key_sql_text
from services.core.artifacts import Manifest, RunResults
from services.core.errors import LdmError, UsageError
from services.core.ldm import Entity, Ldm, ProjectConfig, load_ldm
from services.core.ldm.config import LineageMode

logger = logging.getLogger("cdme.adjoint.capture")

SCHEMA = "cdme_adjoint"
PARTITIONED = ("mapped", "filtered", "errored")
SAMPLES = 10
# Kinds whose every output record comes from exactly one input record: rows merged by DISTINCT/UNION are lost.
ONE_TO_ONE = frozenset({"iso", "filter", "enrich", "union"})
_SAMPLE_SCALE = 1_000_000


def normalise_run_id(run_id: str) -> str:
    """The canonical text of a run id (a UUID, lower case with dashes).

    Raises:
        UsageError: `run_id` is not a UUID.
    """
    try:
        return str(uuid.UUID(run_id))
    except (ValueError, AttributeError, TypeError):
        msg = f"run id {run_id!r} is not a UUID"
        raise UsageError(msg) from None


def partition_name(table: str, run_id: str) -> str:
    """The name of a run's partition of `table` (`mapped_r<32 hex digits>`)."""
    return f"{table}_r{uuid.UUID(run_id).hex}"


def relation_of(entity: Entity) -> Relation:
    """The relation dbt built (or reads) for an entity."""
    return Relation(entity.database, entity.schema_name, entity.identifier)


@dataclass(frozen=True)
class NotCaptured:
    """A model of the run that has no adjoint metadata, and why."""

    unique_id: str
    reason: str


@dataclass
class Morphism:
    """One (model, driving upstream) pair to capture, with its derivation."""

    morphism_id: int
    model: Entity
    upstream: Entity
    kind: str
    derivation: Derivation
    sink: Entity | None
    stats: dict[str, Any] = field(default_factory=dict)
    # Whether a uniqueness test on the upstream's (the model's) record key passed in this run.
    upstream_unique: bool = False
    model_unique: bool = False
    # The views the model reads (directly or through other views) whose SQL is non-deterministic.
    volatile_views: tuple[str, ...] = ()

    def unrepeatable(self, *, single_driver: bool) -> bool:
        """Whether evaluating the morphism's pairs again later need not give the run's pairs (see `downgraded`).

        So for SQL that calls `now()` or `random()` (or reads a view that does), and for pairs derived by SQL
        that joins a lookup declared `latest`: that lookup is replaced in place, so its rows of the run are gone.
        Pairs read from the built relation (`carried_key`) depend on no lookup.
        """
        if self.derivation.nondeterministic or self.volatile_views:
            return True
        return self.carried_key(single_driver=single_driver) is None and any(
            lookup.version == "latest" for lookup in self.model.lookups
        )

    @property
    def mapped_sql(self) -> str:
        """The pairs this morphism maps; a de-duplicating one-to-one model keeps one source key per output key."""
        if self.derivation.deduplicates and self.kind in ONE_TO_ONE:
            return (
                "select source_key, target_key from (select source_key, target_key, row_number() over "
                f"(partition by target_key order by source_key) as n from ({self.derivation.mapped_sql}) d) r "
                "where n = 1"
            )
        return self.derivation.mapped_sql

    @property
    def epoch_column(self) -> str | None:
        """The column of a source upstream that holds a row's epoch: a run reads only its epoch's rows."""
        if self.upstream.resource_type == "source" and self.upstream.epoch_column:
            return self.upstream.epoch_column
        return None

    def input_sql(self, epoch: date) -> str:
        """The `cdme-key/v1` key of each upstream row this run's morphism takes as input (one per row)."""
        assert self.upstream.key is not None
        key = key_sql_text(self.upstream.key.columns)
        text = f"select {key} as k from {relation_of(self.upstream).sql()}"
        if self.epoch_column is not None:
            column = sql.Identifier(self.epoch_column).as_string()
            text += f" where {column} = date '{epoch.isoformat()}'"
        return text

    def output_sql(self) -> str:
        """The `cdme-key/v1` keys of the model's built relation."""
        assert self.model.key is not None
        return f"select {key_sql_text(self.model.key.columns)} as k from {relation_of(self.model).sql()}"

    def carried_key(self, *, single_driver: bool) -> str | None:
        """The upstream key's encoding over the model's built relation, when every output key carries it.

        For an identity (output key = upstream key) or a projection (the upstream key's columns are among the
        output key's) with one driving upstream, the pairs are in the built relation itself: reading them there
        needs no re-run of the model's logic, and a row deleted after the build is a key missing at this model.
        """
        columns = self.carried_columns(single_driver=single_driver)
        return None if columns is None else key_sql_text(columns)

    def pairs_sql(self, *, single_driver: bool) -> str:
        """The morphism's distinct pairs, as the run's relations give them.

        Read from the built relation where the output key carries the upstream key (`carried_key`), derived by
        the SQL otherwise (`mapped_sql`): what the exact path captures, and what a key_derivable run evaluates
        again to answer.
        """
        carried = self.carried_key(single_driver=single_driver)
        return (
            self.mapped_sql
            if carried is None
            else f"select distinct * from ({self.built_pairs_sql(carried)}) b"
        )

    def carried_sources_sql(self, columns: Sequence[str]) -> str:
        """The distinct upstream keys (column `k`) in the built relation, given `carried_columns`.

        Grouped on the columns' text and encoded after: the encoding is injective on those texts (NULL included),
        so the groups are the keys', and an explode's parents are encoded once each instead of once per child.
        """
        # Byte-wise, whatever the columns' collation: under a non-deterministic one, texts the encoding tells
        # apart could group as one.
        text = ", ".join(
            f'{exp.cast(exp.column(c, quoted=True), "text").sql(dialect="postgres")} collate "C" as '
            f"{exp.to_identifier(c, quoted=True).sql(dialect='postgres')}"
            for c in columns
        )
        return (
            f"select {key_sql_text(columns, 'g')} as k from (select {text} from {relation_of(self.model).sql()} "
            f"group by {', '.join(str(i) for i in range(1, len(columns) + 1))}) g"
        )

    def carried_columns(self, *, single_driver: bool) -> list[str] | None:
        """The model's columns that hold the upstream key, in its order, when every output key carries it."""
        assert self.upstream.key is not None and self.model.key is not None
        columns = len(self.upstream.key.columns)
        d = self.derivation
        lookups = {lookup.entity for lookup in self.model.lookups}
        # Rows of other driving upstreams (a union, even one whose other branches were not captured) are in the
        # relation too, and an incremental model's relation also holds earlier runs' rows: only the SQL tells.
        drivers = [u for u in self.model.upstreams if u not in lookups]
        if (
            not single_driver
            or len(drivers) > 1
            or "union" in (self.model.kind, d.inferred_kind)
            or self.model.materialized == "incremental"
            or not d.projects(columns)
        ):
            return None
        return [self.model.key.columns[d.passthrough.index(i)] for i in range(columns)]

    def is_identity(self, *, single_driver: bool) -> bool:
        """Whether the SQL guarantees each output key is its upstream key, read from the built relation.

        Only an identity the SQL guarantees: data that happens to map keys to themselves may not next run.
        """
        assert self.upstream.key is not None
        return self.carried_key(single_driver=single_driver) is not None and self.derivation.is_identity(
            len(self.upstream.key.columns)
        )

    def accounted_pairs_sql(self, *, single_driver: bool) -> str:
        """The pairs digest accounting proves, which a full run stores (and discards if they do not balance).

        Read from the built relation where the output key carries the upstream key (`carried_key`); otherwise
        the derivation's rows, which are distinct pairs once the digests balance (each source key reaches the
        output once).
        """
        carried = self.carried_key(single_driver=single_driver)
        if carried is None:
            return self.derivation.mapped_rows_sql
        if self.is_identity(single_driver=single_driver):
            return f"select k as source_key, k as target_key from ({self.output_sql()}) o"
        # Rows of the built relation may repeat a pair unless a test proved the model's key unique.
        pairs = self.built_pairs_sql(carried)
        return pairs if self.model_unique else f"select distinct * from ({pairs}) p"

    def built_pairs_sql(self, carried: str) -> str:
        """The (source_key, target_key) of every row of the built relation, given `carried_key`."""
        assert self.model.key is not None
        return (
            f"select {carried} as source_key, {key_sql_text(self.model.key.columns)} as target_key "
            f"from {relation_of(self.model).sql()}"
        )


@dataclass(frozen=True)
class CapturePlan:
    """What a capture request will capture, and what it will not."""

    morphisms: list[Morphism]
    not_captured: list[NotCaptured]

    def single_driver(self, m: Morphism) -> bool:
        """Whether `m` is the only captured morphism into its model (a union has one per captured branch)."""
        return sum(1 for other in self.morphisms if other.model.unique_id == m.model.unique_id) == 1


@dataclass(frozen=True)
class CaptureResult:
    """The answer of `POST /runs/{run_id}/capture`."""

    run_id: str
    lineage_mode: LineageMode
    captured: list[str]
    not_captured: list[NotCaptured]
    pairs: int
    seconds: float


def plan_capture(ldm: Ldm, manifest: Manifest, run_results: RunResults) -> CapturePlan:
    """The morphisms of the run's succeeded models, each with its derived capture SQL.

    Args:
        ldm: The project's logical data model.
        manifest: The run's manifest (compiled SQL of each model).
        run_results: The run's results: only models with status `success` are captured.

    Returns:
        The morphisms to capture (in dependency order) and the models left out with the reason.
    """
    statuses = {r.unique_id: r.status for r in run_results.results}
    unique = _proven_unique(ldm, manifest, statuses)
    volatile = volatile_views(manifest)
    morphisms: list[Morphism] = []
    not_captured: list[NotCaptured] = []
    models = [e for e in ldm if e.resource_type == "model" and not e.is_error_sink]
    order = {uid: i for i, uid in enumerate(_model_order(manifest))}
    for entity in sorted(models, key=lambda e: order.get(e.unique_id, len(order))):
        status = statuses.get(entity.unique_id)
        if status != "success":
            reason = "not run in this run" if status is None else f"dbt status {status}"
            not_captured.append(NotCaptured(entity.unique_id, reason))
            continue
        node = manifest.nodes.get(entity.unique_id)
        problem = _unsupported(entity, node.compiled_code if node else None)
        if problem is not None:
            not_captured.append(NotCaptured(entity.unique_id, problem))
            continue
        assert node is not None and node.compiled_code is not None
        lookups = {lk.entity for lk in entity.lookups}
        drivers = (
            [u for u in entity.upstreams if u not in lookups]
            if entity.kind == "union"
            else [entity.driving]
            if entity.driving
            else []
        )
        if not drivers:
            not_captured.append(NotCaptured(entity.unique_id, "no driving upstream is declared or inferable"))
            continue
        sink = ldm.entities.get(entity.error_sink) if entity.error_sink else None
        for name in drivers:
            assert name is not None
            upstream = ldm.entities.get(name)
            if upstream is None or upstream.key is None:
                not_captured.append(
                    NotCaptured(entity.unique_id, f"its driving upstream {name} has no record key")
                )
                continue
            assert entity.key is not None
            try:
                derivation = derive(
                    node.compiled_code,
                    entity.name,
                    relation_of(upstream),
                    upstream.key.columns,
                    entity.key.columns,
                    relation_of(entity),
                    filter_joins=[entity.filter.join] if entity.filter and entity.filter.join else (),
                )
            except DerivationError as e:
                not_captured.append(NotCaptured(entity.unique_id, str(e)))
                continue
            kind = entity.kind or derivation.inferred_kind
            morphism = Morphism(len(morphisms) + 1, entity, upstream, kind, derivation, sink)
            morphism.upstream_unique = upstream.unique_id in unique
            morphism.model_unique = entity.unique_id in unique
            morphism.volatile_views = volatile.get(entity.unique_id, ())
            morphisms.append(morphism)
    return CapturePlan(morphisms, not_captured)


_UNIQUENESS_TESTS = frozenset({"unique", "unique_combination_of_columns"})


def _proven_unique(ldm: Ldm, manifest: Manifest, statuses: Mapping[str, str]) -> set[str]:
    """The entities whose record key a uniqueness test (on it or on a part of it) passed in this run."""
    proven: set[str] = set()
    by_id = {e.unique_id: e for e in ldm}
    for node in manifest.nodes.values():
        meta = node.test_metadata
        if meta is None or meta.name not in _UNIQUENESS_TESTS or statuses.get(node.unique_id) != "pass":
            continue
        entity = by_id.get(node.tested_node or "")
        if entity is None or entity.key is None:
            continue
        columns = (
            [node.column_name or meta.arguments.get("column_name")]
            if meta.name == "unique"
            else meta.arguments.get("combination_of_columns") or []
        )
        tested = {str(c).lower() for c in columns if c}
        if tested and tested <= set(entity.key.columns):
            proven.add(entity.unique_id)
    return proven


def volatile_views(manifest: Manifest) -> dict[str, tuple[str, ...]]:
    """Per node, the views it reads, directly or through other views, whose SQL calls a non-deterministic function.

    A view is evaluated anew on each read: a model reading one through its derived SQL reads different rows later.
    A table's rows were fixed by its build, and the envelopes tell when they change.
    """

    def calls(code: str | None) -> bool:
        try:
            return bool(code and nondeterministic_sql(code))
        except DerivationError:
            # SQL the parser cannot read cannot be shown deterministic.
            return True

    views = {uid for uid, node in manifest.nodes.items() if node.config.materialized == "view"}
    volatile = {uid for uid in views if calls(manifest.nodes[uid].compiled_code)}
    found: dict[str, tuple[str, ...]] = {}
    for uid in _model_order(manifest):
        node = manifest.nodes.get(uid)
        if node is None or node.resource_type != "model":
            continue
        read: list[str] = []
        for upstream in node.depends_on.nodes:
            if upstream in views:
                read += [manifest.nodes[upstream].name] if upstream in volatile else []
                read += found.get(upstream, ())
        found[uid] = tuple(dict.fromkeys(read))
    return {uid: views for uid, views in found.items() if views}


def _model_order(manifest: Manifest) -> list[str]:
    graph = {uid: list(node.depends_on.nodes) for uid, node in manifest.nodes.items()}
    return list(TopologicalSorter(graph).static_order())


def _unsupported(entity: Entity, compiled: str | None) -> str | None:
    if entity.materialized == "ephemeral":
        return "ephemeral: it has no relation of its own (its SQL is captured inside its consumers)"
    if entity.key is None:
        return "no record key is declared or inferable (meta.cdme.key, a unique test or a primary key)"
    if not compiled:
        return "the manifest has no compiled SQL for it"
    return None


def load_run_ldm(manifest: Manifest, config: ProjectConfig, lineage_mode: LineageMode) -> Ldm:
    """The LDM of the run's manifest.

    Raises:
        CaptureInputError: The manifest's declarations are invalid.
    """
    try:
        return load_ldm(manifest, config, lineage_mode=lineage_mode)
    except LdmError as e:
        msg = f"the run's manifest has invalid CDME declarations: {e}"
        raise CaptureInputError(msg) from e


def _execute(cur: psycopg.Cursor[Any], statement: sql.SQL | sql.Composed | str) -> None:
    # Capture SQL carries no bind parameters (values are composed as literals), so a `%` in it stays literal.
    cur.execute(sql.SQL(statement) if isinstance(statement, str) else statement)


def _scalar(cur: psycopg.Cursor[Any], statement: sql.SQL | sql.Composed | str) -> Any:
    _execute(cur, statement)
    row = cur.fetchone()
    return row[0] if row else None


def _part(table: str, run_id: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(partition_name(table, run_id)))


def _columns_of(table: str) -> str:
    """The columns a run's partition of `table` is loaded with: all of the table's but `run_id`.

    `_Capture.seal` adds `run_id` as a column with a default, which PostgreSQL keeps in the catalog instead of in each row:
    a full run's 12.7 million pairs then write 470 MB less heap, and as much less WAL.
    """
    return {
        "mapped": "morphism_id integer not null, source_key text not null, target_key text not null",
        "filtered": "morphism_id integer not null, source_key text not null, condition_index integer not null",
        "errored": "morphism_id integer not null, source_key text not null, "
        "failure_type text, offending_values jsonb, source_epoch date, morphism_path text[]",
    }[table]


# A pair whose source key is its target key or the target key's leading components: an identity's or an explode's,
# whose output key carries the input's. Such pairs are left out of the backward index: the target key's leading
# components name their source keys, which the forward index finds (`queries.sources_of`).
CARRIED = "(target_key = source_key or starts_with(target_key, source_key || '|'))"

# As in migration 0005: lookups by key go through one 64-bit hash of the key seeded with the morphism, an integer
# sort key whose index builds compare integers only; the backward index keeps each target's source keys in order for
# paged walks.
_INDEXES: dict[str, tuple[tuple[str, str, str | None], ...]] = {
    "mapped": (
        ("backward", "hashtextextended(target_key, morphism_id), source_key", f"not {CARRIED}"),
        ("forward", "hashtextextended(source_key, morphism_id)", None),
    ),
    "filtered": (("key", "morphism_id, source_key", None),),
    "errored": (("key", "morphism_id, source_key", None),),
}


def _index_definitions(table: str) -> list[tuple[str, sql.Composable]]:
    """The indexes of a run's partition of `table`: each one's name suffix and its definition after `ON table`."""
    return [
        (
            suffix,
            sql.SQL("({}){}").format(sql.SQL(columns), sql.SQL("" if where is None else f" where {where}")),
        )
        for suffix, columns, where in _INDEXES[table]
    ]


def _create_index(index: str, table: sql.Composable, definition: sql.Composable) -> sql.Composed:
    # No ANALYZE before: a build sizes its parallel workers from the table's pages, and sampling a fresh table's
    # pages costs as much as a third of a scan of it.
    return sql.SQL("create index {} on {} {}").format(sql.Identifier(index), table, definition)


def envelope_of(cur: psycopg.Cursor[Any], keys_sql: str) -> dict[str, Any]:
    """The checkpoint envelope of the keys `keys_sql` selects (column `k`).

    Count, min/max and an order-independent digest (sum of 64-bit hashes) of the keys of a relation's rows. Over
    rows, not distinct keys: a duplicated row changes the envelope, and no sort is needed.
    """
    with cur.connection.cursor() as plain:
        # PostgreSQL would evaluate the key's expression (its encoding) once for each aggregate that reads it: half
        # the time of an envelope of 4.4M composite keys. A volatile column keeps the subquery from being merged
        # into the aggregate, so the key is computed once per row; being parallel safe, it keeps the scan parallel,
        # which OFFSET 0 would not.
        _execute(
            plain,
            sql.SQL(
                "select count(*), min(k), max(k), coalesce(sum(hashtextextended(k, 0)), 0)::text "
                "from (select k, clock_timestamp() from ({}) s) e"
            ).format(sql.SQL(keys_sql)),
        )
        row = plain.fetchone()
    assert row is not None
    return {"count": int(row[0]), "min": row[1], "max": row[2], "digest": row[3]}


def per_target_sql(rows_sql: str) -> str:
    """Per target key of the `source_key, target_key` rows `rows_sql` selects: how many, and their sources' digest.

    Columns `target_key`, `n` (the count) and `h` (the sum of the source keys' hashes).
    """
    return (
        f"select target_key, count(*) as n, sum(hashtextextended(source_key, 0)) as h from ({rows_sql}) r "
        "group by target_key"
    )


# The order-independent digest of a morphism's pairs, over the rows `g` of `per_target_sql`: each target key with
# its count and source digest (two integers after the key, so the text is unambiguous whatever the key holds).
PAIRS_DIGEST = "coalesce(sum(hashtextextended(g.target_key || ' ' || g.n || ' ' || g.h, 0)), 0)::text"


def pairs_checkpoint(cur: psycopg.Cursor[Any], rows_sql: str) -> dict[str, Any]:
    """The checkpoint of the pairs a derivation gives: the count of its rows `rows_sql` and their `PAIRS_DIGEST`.

    A key_derivable run answers by deriving a morphism's pairs again from its SQL, which reads more than the keys
    the input and output envelopes cover: the columns it groups and filters by, and its lookups. The pairs
    themselves tell whether it still gives the run's. Over the rows, not the distinct pairs: the same rows give
    the same pairs, and a query checks them without sorting every pair of the morphism.
    """
    with cur.connection.cursor() as plain:
        _execute(plain, f"select coalesce(sum(g.n), 0), {PAIRS_DIGEST} from ({per_target_sql(rows_sql)}) g")
        row = plain.fetchone()
    assert row is not None
    return {"rows": rows_sql, "count": int(row[0]), "digest": row[1]}


class _Capture:
    def __init__(
        self,
        cur: psycopg.Cursor[Any],
        run_id: str,
        epoch: date,
        mode: LineageMode,
        sample_rate: float,
    ) -> None:
        self.cur = cur
        self.run_id = run_id
        self.epoch = epoch
        self.mode = mode
        self.sample_rate = sample_rate
        self.run = sql.Literal(run_id)
        self.envelopes: dict[str, dict[str, Any]] = {}
        # The table the run's pairs are loaded into, named afresh by each capture: the previous capture's partition
        # keeps its name (and this transaction's lock on it) until this one commits.
        self.staging = f"{partition_name('mapped', run_id)}_{uuid.uuid4().hex[:8]}"
        self.loader: _Loader | None = None
        # The identities whose pairs this full capture implies instead of storing (`implied_identities`).
        self.implied: dict[int, list[int]] = {}

    @property
    def run_lock(self) -> sql.Composed:
        return sql.SQL("hashtextextended({}, 7)").format(self.run)

    @property
    def pairs_table(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(self.staging))

    def prepare(self) -> None:
        _configure(self.cur, "2GB")
        # Two captures of one run (two replicas, a retry) take turns instead of failing on each other's DDL.
        _execute(self.cur, sql.SQL("select pg_advisory_xact_lock({})").format(self.run_lock))
        _execute(
            self.cur,
            sql.SQL("delete from {}.runs where run_id = {}").format(sql.Identifier(SCHEMA), self.run),
        )
        # Pair tables a failed capture of this run committed but never attached (a crash left them behind).
        _execute(
            self.cur,
            sql.SQL(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = {} "
                "and c.relkind = 'r' and not c.relispartition and starts_with(c.relname, {})"
            ).format(sql.Literal(SCHEMA), sql.Literal(partition_name("mapped", self.run_id) + "_")),
        )
        for (stray,) in self.cur.fetchall():
            _execute(
                self.cur,
                sql.SQL("drop table if exists {}.{}").format(sql.Identifier(SCHEMA), sql.Identifier(stray)),
            )
        for table in PARTITIONED:
            _execute(self.cur, sql.SQL("drop table if exists {}").format(_part(table, self.run_id)))
            if table != "mapped":
                _execute(
                    self.cur,
                    sql.SQL("create table {} ({}) with (autovacuum_enabled = false)").format(
                        _part(table, self.run_id), sql.SQL(_columns_of(table))
                    ),
                )
        _execute(self.cur, "drop table if exists _cdme_all_pairs")
        _execute(
            self.cur,
            "create temp table _cdme_all_pairs (morphism_id integer, source_key text, target_key text) on commit drop",
        )

    def start_loading(self, engine: Engine, workers: int, plan: CapturePlan) -> None:
        """Create the pairs' table, committed for the workers, and start loading every morphism's pairs.

        The loads start before the accounting has proved anything: they take the longest, and the accounting
        runs beside them. A morphism that does not balance sends the capture to the exact path, which empties
        the table first (`discard`). None in key_derivable, which stores no pairs.
        """
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(
                sql.SQL("create table {} ({}) with (autovacuum_enabled = false)")
                .format(self.pairs_table, sql.SQL(_columns_of("mapped")))
                .as_string()
            )
        # Digests cannot prove a de-duplicating morphism balanced: the run needs key sets, and its pairs their
        # exact-path SQL.
        if self.mode == "key_derivable" or any(m.derivation.deduplicates for m in plan.morphisms):
            return
        self.loader = _Loader(engine, str(_scalar(self.cur, "select pg_export_snapshot()")), workers)
        if self.mode == "full":
            self.implied = implied_identities(plan)
        for m in plan.morphisms:
            if m.morphism_id in self.implied:
                continue
            self.loader.submit(self.load, m, m.accounted_pairs_sql(single_driver=plan.single_driver(m)))

    def load(self, loader: _Loader, m: Morphism, pairs: str) -> None:
        """Insert the pairs `pairs` selects (as the mode stores them), reading the capture's snapshot."""
        begun = time.perf_counter()
        with loader.session(snapshot=True, maintenance_work_mem="64MB") as cur:
            _execute(
                cur,
                sql.SQL("insert into {} {}").format(
                    self.pairs_table,
                    self.stored(
                        sql.SQL("select {}, source_key, target_key from ({}) p").format(
                            sql.Literal(m.morphism_id), sql.SQL(pairs)
                        )
                    ),
                ),
            )
        logger.debug(
            "pairs stored",
            extra={
                "run_id": self.run_id,
                "model": m.model.name,
                "seconds": round(time.perf_counter() - begun, 3),
            },
        )

    def drop_pairs_table(self, engine: Engine) -> None:
        """Drop the committed pairs' table of a capture that failed (its transaction has rolled back)."""
        try:
            if self.loader is not None:
                self.loader.close(cancel=True)
            with engine.begin() as conn:
                # Another capture of the run that took the lock since sweeps the table itself: waiting for it would
                # hold this failed request until that capture commits.
                locked = conn.exec_driver_sql(
                    sql.SQL("select pg_try_advisory_xact_lock({})").format(self.run_lock).as_string()
                ).scalar()
                if locked:
                    conn.exec_driver_sql(
                        sql.SQL("drop table if exists {}").format(self.pairs_table).as_string()
                    )
        except Exception:
            # The next capture of the run sweeps what is left; the capture's own error is what the caller needs.
            logger.exception(
                "could not drop the pairs table of a failed capture", extra={"run_id": self.run_id}
            )

    def morphism(self, m: Morphism, *, single_driver: bool) -> None:
        cur, mid = self.cur, sql.Literal(m.morphism_id)
        filtered, errored = _part("filtered", self.run_id), _part("errored", self.run_id)
        _execute(cur, "drop table if exists _cdme_in, _cdme_mapped, _cdme_rest, _cdme_lost, _cdme_overlap")
        _execute(
            cur,
            f"create temp table _cdme_in on commit drop as select distinct k from ({m.input_sql(self.epoch)}) i",
        )
        _execute(
            cur,
            f"create temp table _cdme_mapped on commit drop as {m.pairs_sql(single_driver=single_driver)}",
        )
        if self.mode != "key_derivable" or downgraded(self.mode, m, single_driver=single_driver):
            _execute(
                cur,
                sql.SQL("insert into {} {}").format(
                    self.pairs_table,
                    self.stored(sql.SQL("select {}, source_key, target_key from _cdme_mapped").format(mid)),
                ),
            )
        if self.mode != "full":
            # End-to-end fates need every pair, also when the run stores a sample or none of them.
            _execute(
                cur,
                sql.SQL(
                    "insert into _cdme_all_pairs select {}, source_key, target_key from _cdme_mapped"
                ).format(mid),
            )
        if m.sink is not None:
            self.insert_errored(m)
        errored_keys = sql.SQL("select source_key from {} where morphism_id = {}").format(errored, mid)
        filtered_keys = sql.SQL("select source_key from {} where morphism_id = {}").format(filtered, mid)
        # Set operations (hashed), never NOT EXISTS probes: temp tables have no statistics and a probe per key
        # into an unindexed table is quadratic.
        _execute(
            cur,
            sql.SQL(
                "create temp table _cdme_rest on commit drop as "
                "select k from _cdme_in except select source_key from _cdme_mapped except {}"
            ).format(errored_keys),
        )
        if m.derivation.filters and _scalar(cur, "select exists (select 1 from _cdme_rest)"):
            _execute(
                cur,
                sql.SQL(
                    "insert into {} select {}, p.source_key, min(p.condition) from ({}) p "
                    "join _cdme_rest r on r.k = p.source_key where p.condition is not null group by p.source_key"
                ).format(filtered, mid, sql.SQL(m.derivation.prefilter_sql)),
            )
        _execute(
            cur,
            sql.SQL(
                "create temp table _cdme_lost on commit drop as select k from _cdme_rest except {}"
            ).format(filtered_keys),
        )
        # Filtered keys are chosen among the keys neither mapped nor errored, so only those two can overlap;
        # a key the sink holds twice is in the errored partition twice.
        _execute(
            cur,
            sql.SQL(
                "create temp table _cdme_overlap on commit drop as "
                "({} intersect select source_key from _cdme_mapped) "
                "union (select source_key from {} where morphism_id = {} group by source_key having count(*) > 1)"
            ).format(errored_keys, errored, mid),
        )
        stats: dict[str, Any] = {"input": _scalar(cur, "select count(*) from _cdme_in")}
        # GROUP BY hashes where count(distinct) would sort.
        stats["pairs"] = _scalar(cur, "select count(*) from _cdme_mapped")
        stats["mapped"] = _scalar(
            cur, "select count(*) from (select source_key from _cdme_mapped group by 1) k"
        )
        stats["output"] = _scalar(
            cur, "select count(*) from (select target_key from _cdme_mapped group by 1) k"
        )
        stats["identity"] = m.is_identity(single_driver=single_driver)
        stats["errored"] = _scalar(
            cur, sql.SQL("select count(distinct source_key) from ({}) e").format(errored_keys)
        )
        stats["filtered"] = _scalar(cur, sql.SQL("select count(*) from ({}) f").format(filtered_keys))
        stats["unaccounted_count"] = _scalar(cur, "select count(*) from _cdme_lost")
        _execute(cur, sql.SQL("select k from _cdme_lost order by k limit {}").format(sql.Literal(SAMPLES)))
        stats["unaccounted_samples"] = [r[0] for r in cur.fetchall()]
        stats["overlap_count"] = _scalar(cur, "select count(*) from _cdme_overlap")
        _execute(
            cur,
            sql.SQL("select source_key from _cdme_overlap order by 1 limit {}").format(sql.Literal(SAMPLES)),
        )
        stats["overlap_samples"] = [r[0] for r in cur.fetchall()]
        if self.mode == "key_derivable":
            stats["envelopes"] = {
                "input": envelope_of(cur, m.input_sql(self.epoch)),
                "output": envelope_of(cur, m.output_sql()),
            }
            if m.carried_key(single_driver=single_driver) is None and not downgraded(
                self.mode, m, single_driver=single_driver
            ):
                stats["envelopes"]["pairs"] = pairs_checkpoint(cur, m.derivation.mapped_rows_sql)
        m.stats = stats

    def tally(self, statement: str) -> Tally:
        """Count and digest of the column `k` that `statement` selects (one row per value, not distinct)."""
        row = self.row(
            f"select count(*), coalesce(sum(hashtextextended(k, 0)), 0)::text from ({statement}) t"
        )
        return Tally(int(row[0]), int(row[1]))

    def row(self, statement: str | sql.Composed) -> tuple[Any, ...]:
        _execute(self.cur, statement)
        found = self.cur.fetchone()
        assert found is not None
        return tuple(found)

    def envelope(self, keys_sql: str) -> dict[str, Any]:
        """A relation's envelope, computed once per capture (a model's output is its consumers' input).

        Only key_derivable runs store envelopes; the other modes account with the count and digest alone, and
        skip the text comparisons of min and max.
        """
        if keys_sql not in self.envelopes:
            if self.mode == "key_derivable":
                self.envelopes[keys_sql] = envelope_of(self.cur, keys_sql)
            else:
                tally = self.tally(keys_sql)
                self.envelopes[keys_sql] = {"count": tally.count, "digest": str(tally.digest)}
        return self.envelopes[keys_sql]

    def accounted(self, plan: CapturePlan) -> bool:
        """Account every morphism by digests instead of key sets: whether that proved each one balanced.

        For each morphism, the count and digest of the input must equal the sums of those of the mapped, errored
        and filtered keys. Equal sums of 64-bit hashes over rows, not over distinct keys, prove (up to hash
        collisions) that the three partitions are disjoint and cover the input: a key mapped twice, or both
        mapped and errored, adds its hash twice. The mapped keys of a morphism whose output key carries the
        upstream key unchanged (and that is not incremental) are read from the built relation, which is also
        how rows deleted from it after the build show up. The keys of filtered rows and the error sink's rows
        are written, as in any mode, while the loaders store the pairs; the caller discards all of it and falls
        back to the exact set-based capture when this returns False.
        """
        for m in plan.morphisms:
            begun = time.perf_counter()
            rows: str | None = None
            if downgraded(self.mode, m, single_driver=plan.single_driver(m)):
                # Stored first, then accounted from what was stored: the SQL evaluated twice may differ.
                mid = sql.Literal(m.morphism_id)
                _execute(
                    self.cur,
                    sql.SQL("insert into {} select {}, source_key, target_key from ({}) p").format(
                        self.pairs_table,
                        mid,
                        sql.SQL(m.accounted_pairs_sql(single_driver=plan.single_driver(m))),
                    ),
                )
                rows = (
                    sql.SQL("select source_key, target_key from {} where morphism_id = {}")
                    .format(self.pairs_table, mid)
                    .as_string(self.cur)
                )
            if not self.account(m, single_driver=plan.single_driver(m), rows=rows):
                logger.info(
                    "digest accounting does not balance; capturing key sets",
                    extra={"run_id": self.run_id, "model": m.model.name, "upstream": m.upstream.name},
                )
                return False
            _log_morphism(self.run_id, m, time.perf_counter() - begun)
            if self.loader is not None:
                self.loader.check()
        return True

    def gather_pairs(self, plan: CapturePlan, morphisms: Iterable[Morphism]) -> None:
        """The pairs of balanced `morphisms` in `_cdme_all_pairs`, for fates the run's stored pairs do not give."""
        for m in morphisms:
            _execute(
                self.cur,
                sql.SQL("insert into _cdme_all_pairs select {}, source_key, target_key from ({}) p").format(
                    sql.Literal(m.morphism_id),
                    sql.SQL(m.accounted_pairs_sql(single_driver=plan.single_driver(m))),
                ),
            )

    def account(self, m: Morphism, *, single_driver: bool, rows: str | None = None) -> bool:
        """Account `m` by digests (see `accounted`); `rows` replaces its derived rows where they were stored."""
        assert m.upstream.key is not None and m.model.key is not None
        d = m.derivation
        if d.deduplicates:
            return False
        inputs = self.envelope(m.input_sql(self.epoch))
        # Digests sum over rows: a key on two input rows could be mapped by one and errored by the other and
        # still balance. Without a passing uniqueness test on the upstream's key, count its distinct keys.
        if not m.upstream_unique and self.row(
            f"select count(*) from (select k from ({m.input_sql(self.epoch)}) i group by k) d"
        ) != (inputs["count"],):
            return False
        output = self.envelope(m.output_sql())
        carried = m.carried_columns(single_driver=single_driver)
        identity = m.is_identity(single_driver=single_driver)
        checkpoint: dict[str, Any] | None = None
        if identity:
            mapped = Tally(output["count"], int(output["digest"]))
            pairs, targets = output["count"], output["count"]
        elif carried is not None:
            mapped = self.tally(m.carried_sources_sql(carried))
            pairs, targets = output["count"], output["count"]
        else:
            # The SQL re-derives the output keys: each must be in the built relation, or a record went missing
            # after the build (then only the key sets, followed downstream, can tell where).
            # Only key_derivable runs check the pairs again, and those they store (`rows`) need no checkpoint.
            checked = self.mode == "key_derivable" and rows is None
            row = self.row(
                "select coalesce(sum(n), 0), coalesce(sum(h), 0)::text, count(*), count(*) filter (where not "
                f"exists (select from ({m.output_sql()}) o where o.k = g.target_key)), "
                f"{PAIRS_DIGEST if checked else 'null'} from ({per_target_sql(rows or d.mapped_rows_sql)}) g"
            )
            if row[3]:
                return False
            mapped, pairs, targets = Tally(int(row[0]), int(row[1])), int(row[0]), int(row[2])
            checkpoint = {"rows": d.mapped_rows_sql, "count": pairs, "digest": row[4]} if checked else None
        mid = sql.Literal(m.morphism_id)
        filtered_part, errored_part = _part("filtered", self.run_id), _part("errored", self.run_id)
        errored = Tally(0, 0)
        if m.sink is not None:
            self.insert_errored(m)
            errored = self.tally(
                sql.SQL("select source_key as k from {} where morphism_id = {}")
                .format(errored_part, mid)
                .as_string(self.cur)
            )
        rest = Tally(inputs["count"], int(inputs["digest"])) - mapped - errored
        filtered = Tally(0, 0)
        if rest != filtered:
            if not d.filters:
                return False
            _execute(
                self.cur,
                sql.SQL(
                    "insert into {} select {}, p.source_key, min(p.condition) from ({}) p "
                    "where p.condition is not null and not exists (select from {} e where e.morphism_id = {} "
                    "and e.source_key = p.source_key) group by p.source_key"
                ).format(filtered_part, mid, sql.SQL(d.prefilter_sql), errored_part, mid),
            )
            filtered = self.tally(
                sql.SQL("select source_key as k from {} where morphism_id = {}")
                .format(filtered_part, mid)
                .as_string(self.cur)
            )
            if rest != filtered:
                return False
        m.stats = {
            "input": inputs["count"],
            "pairs": pairs,
            "mapped": mapped.count,
            "output": targets,
            "identity": identity,
            "errored": errored.count,
            "filtered": filtered.count,
            "unaccounted_count": 0,
            "unaccounted_samples": [],
            "overlap_count": 0,
            "overlap_samples": [],
        }
        if self.mode == "key_derivable":
            m.stats["envelopes"] = {"input": inputs, "output": output}
            if checkpoint is not None:
                m.stats["envelopes"]["pairs"] = checkpoint
        return True

    def stored(self, pairs: sql.Composable) -> sql.Composable:
        """The rows of `pairs` (a `mapped` row each) the run's mode stores: all, or summary's sample."""
        if self.mode != "summary":
            return pairs
        return sql.SQL("select * from ({}) p where abs(hashtextextended(source_key, 0)) % {} < {}").format(
            pairs, sql.Literal(_SAMPLE_SCALE), sql.Literal(int(self.sample_rate * _SAMPLE_SCALE))
        )

    def insert_errored(self, m: Morphism) -> None:
        assert m.sink is not None
        _execute(
            self.cur,
            sql.SQL(
                "insert into {} select {}, source_key, failure_type, offending_values, source_epoch, "
                "morphism_path from {} where source_entity = {}"
            ).format(
                _part("errored", self.run_id),
                sql.Literal(m.morphism_id),
                sql.SQL(relation_of(m.sink).sql()),
                sql.Literal(m.upstream.name),
            ),
        )

    def discard(self) -> None:
        """Forget what `accounted` wrote and loaded, before the exact capture writes it again."""
        if self.loader is not None:
            self.loader.close(cancel=True)
            self.loader = None
        # The exact path stores every pair: a morphism that did not balance may have input keys in no partition.
        self.implied = {}
        for table in ("filtered", "errored"):
            _execute(self.cur, sql.SQL("truncate {}").format(_part(table, self.run_id)))
        _execute(self.cur, sql.SQL("truncate {}").format(self.pairs_table))

    def finish(self) -> None:
        name = partition_name("mapped", self.run_id)
        if self.loader is not None:
            self.loader.wait()
            # Side by side on the loaders' connections: the serial phases of one build (its final merge, writing the
            # index out) leave a core to the other.
            for suffix, definition in _index_definitions("mapped"):
                self.loader.submit(self.build_index, f"{self.staging}_{suffix}", definition)
            self.loader.wait()
            self.loader.close()
        _execute(
            self.cur, sql.SQL("alter table {} rename to {}").format(self.pairs_table, sql.Identifier(name))
        )
        for table in PARTITIONED:
            for suffix, definition in _index_definitions(table):
                index = f"{partition_name(table, self.run_id)}_{suffix}"
                # The loaders indexed the pairs' table under its staging name (none run on the exact path).
                if table == "mapped" and self.loader is not None:
                    _execute(
                        self.cur,
                        sql.SQL("alter index {}.{} rename to {}").format(
                            sql.Identifier(SCHEMA),
                            sql.Identifier(f"{self.staging}_{suffix}"),
                            sql.Identifier(index),
                        ),
                    )
                else:
                    _execute(self.cur, _create_index(index, _part(table, self.run_id), definition))
            self.seal(table)

    def build_index(self, loader: _Loader, index: str, definition: sql.Composable) -> None:
        """Build an index of the committed pairs' table on a connection of its own."""
        with loader.session(snapshot=False, maintenance_work_mem="1GB") as cur:
            _execute(cur, _create_index(index, self.pairs_table, definition))

    def seal(self, table: str) -> None:
        """Give the run's freshly loaded and indexed partition of `table` its `run_id`, and attach it."""
        part, name = _part(table, self.run_id), partition_name(table, self.run_id)
        # A default that is not volatile is stored once in the catalog, not in the rows.
        _execute(
            self.cur,
            sql.SQL("alter table {} add column run_id text not null default {}").format(part, self.run),
        )
        # The planner estimates lookups by a key's hash from the statistics of the index expressions, and a filter
        # on run_id from its own.
        _execute(self.cur, sql.SQL("analyze {}").format(part))
        # The CHECK lets ATTACH skip its validating scan of the freshly loaded table.
        _execute(
            self.cur,
            sql.SQL("alter table {} add constraint {} check (run_id = {})").format(
                part, sql.Identifier(f"{name}_run"), self.run
            ),
        )
        _execute(
            self.cur,
            sql.SQL("alter table {}.{} attach partition {} for values in ({})").format(
                sql.Identifier(SCHEMA), sql.Identifier(table), part, self.run
            ),
        )


class _Loader:
    """Loads the morphisms' pairs, then indexes them, on `workers` connections beside the capture's own."""

    def __init__(self, engine: Engine, snapshot: str, workers: int) -> None:
        self.engine = engine
        self.snapshot = snapshot
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="cdme-capture")
        self.futures: list[Future[None]] = []
        self.lock = threading.Lock()
        self.loading: set[psycopg.Connection[Any]] = set()
        # Connections a cancel may still reach late: they never go back to the pool.
        self.uncancelled: set[psycopg.Connection[Any]] = set()
        self.cancelled = False

    def submit(self, work: Callable[..., None], *args: Any) -> None:
        """Run `work(self, *args)` on one of the workers."""
        self.futures.append(self.pool.submit(work, self, *args))

    @contextmanager
    def session(self, *, snapshot: bool, maintenance_work_mem: str) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor in a transaction of its own, reading the capture's snapshot if asked, that `close` can cancel."""
        with (
            self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
            conn.begin(),
        ):
            raw = conn.connection.driver_connection
            assert isinstance(raw, psycopg.Connection)
            try:
                with self.running(raw), raw.cursor() as cur:
                    if snapshot:
                        _execute(
                            cur, sql.SQL("set transaction snapshot {}").format(sql.Literal(self.snapshot))
                        )
                    _configure(cur, maintenance_work_mem)
                    yield cur
            finally:
                if raw in self.uncancelled:
                    conn.invalidate()

    @contextmanager
    def running(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """While a load or an index build runs on `conn`: `close(cancel=True)` cancels its statement then."""
        with self.lock:
            if self.cancelled:
                msg = "the capture was abandoned before this load started"
                raise psycopg.errors.QueryCanceled(msg)
            self.loading.add(conn)
        try:
            yield
        finally:
            # Before the connection goes back to the pool: a cancel must never reach another request's statement.
            with self.lock:
                self.loading.discard(conn)

    def check(self) -> None:
        """Raise the error of a load that failed already, if one has: the capture then ends without the others."""
        for future in self.futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                future.result()

    def wait(self) -> None:
        """Wait for all the work submitted, or until a piece fails: its error is raised, the caller cancels the rest."""
        futures_wait(self.futures, return_when=FIRST_EXCEPTION)
        self.check()
        # Only `close` cancels work; pairs missing from a table about to be attached must never pass unnoticed.
        assert not any(future.cancelled() for future in self.futures), "a load was cancelled"

    def close(self, *, cancel: bool = False) -> None:
        """Drop the loads not yet started, cancel the running ones if asked, and wait for them to end."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        if cancel:
            with self.lock:
                self.cancelled = True
                for conn in self.loading:
                    try:
                        conn.cancel_safe(timeout=5.0)
                    except psycopg.Error:
                        # The load then runs to its end, and waiting for it costs time but loses nothing.
                        logger.warning("could not cancel a load", exc_info=True)
                        self.uncancelled.add(conn)
        self.pool.shutdown(wait=True)


def _configure(cur: psycopg.Cursor[Any], maintenance_work_mem: str) -> None:
    # Capture is a handful of large hashes and sorts: give them memory instead of spilling to disk.
    settings = (("work_mem", "256MB"), ("maintenance_work_mem", maintenance_work_mem), *ENCODING_SESSION)
    for name, value in settings:
        _execute(
            cur, sql.SQL("select set_config({}, {}, true)").format(sql.Literal(name), sql.Literal(value))
        )


@dataclass(frozen=True)
class Tally:
    """How many keys, and the sum of their 64-bit hashes: the order-independent digest of a multiset."""

    count: int
    digest: int

    def __sub__(self, other: Tally) -> Tally:
        return Tally(self.count - other.count, self.digest - other.digest)


def downgraded(mode: LineageMode, m: Morphism, *, single_driver: bool) -> bool:
    """Whether a run of `mode` stores `m`'s pairs as a full run would, although its mode stores none.

    A key_derivable run answers by evaluating the morphism's pairs again, which must then give the run's pairs:
    not so where it is `unrepeatable`. That morphism's segment is captured in full instead.
    """
    return mode == "key_derivable" and m.unrepeatable(single_driver=single_driver)


def implied_identities(plan: CapturePlan) -> dict[int, list[int]]:
    """The identities whose pairs a full run need not store, each with the morphisms its keys are read from.

    An identity M into a model X (a table or view with M its one driver) maps each key of X to itself, so its
    pairs are X's keys. Those are the input keys of any captured morphism D reading X, and once D balances they
    are its mapped source keys, filtered keys and errored keys, all stored. When D is implied too, its own mapped
    keys are read on from where it says. M is then implied from `[D, *from(D)]`; a key is mapped by M when one of
    those morphisms took it as input (for an implied one, its filtered or errored keys: the rest are read on). A
    reader that is not an identity is preferred, as it stores its pairs and the chain stops there.
    """
    identities = {m.morphism_id for m in plan.morphisms if m.is_identity(single_driver=plan.single_driver(m))}
    readers: dict[str, list[Morphism]] = {}
    for m in plan.morphisms:
        readers.setdefault(m.upstream.unique_id, []).append(m)
    implied: dict[int, list[int]] = {}

    def keys_from(m: Morphism) -> list[int] | None:
        if m.morphism_id not in implied:
            found = sorted(
                readers.get(m.model.unique_id, []), key=lambda r: (r.morphism_id in identities, r.morphism_id)
            )
            if not found:
                return None
            reader = found[0]
            rest = keys_from(reader) if reader.morphism_id in identities else []
            implied[m.morphism_id] = [reader.morphism_id, *(rest or [])]
        return implied[m.morphism_id]

    for m in plan.morphisms:
        if m.morphism_id in identities:
            keys_from(m)
    return implied


def _derived_fates(plan: CapturePlan) -> list[dict[str, Any]] | None:
    """End-to-end fates from balanced morphisms' counts alone, where the graph's shape makes them exact.

    A model that no captured morphism reads is an output. Every key of an entity reaches an output when one of
    its downstream morphisms maps all of its keys into a model whose keys all reach an output. Otherwise an
    entity read by exactly one morphism takes that morphism's filtered and errored keys plus, through an
    identity (each output key is its upstream key) into a model with that one driver, the fates of the model's
    keys. Any other shape returns None, and capture computes fates key by key.
    """
    morphisms = plan.morphisms
    downstream: dict[str, list[Morphism]] = {}
    for m in morphisms:
        downstream.setdefault(m.upstream.unique_id, []).append(m)
    reaches: dict[str, bool] = {}

    def reach_all(uid: str) -> bool:
        if uid not in reaches:
            readers = downstream.get(uid, [])
            reaches[uid] = not readers or any(
                m.stats["mapped"] == m.stats["input"] and reach_all(m.model.unique_id) for m in readers
            )
        return reaches[uid]

    def fates(uid: str) -> tuple[int, int, int] | None:
        readers = downstream.get(uid, [])
        if not readers:
            return None
        if reach_all(uid):
            return (readers[0].stats["input"], 0, 0)
        if len(readers) != 1:
            return None
        m = readers[0]
        s = m.stats
        if reach_all(m.model.unique_id):
            return (s["mapped"], s["filtered"], s["errored"])
        if not (s["identity"] and plan.single_driver(m)):
            return None
        below = fates(m.model.unique_id)
        if below is None:
            return None
        return (below[0], below[1] + s["filtered"], below[2] + s["errored"])

    produced = {m.model.unique_id for m in morphisms}
    sources: list[dict[str, Any]] = []
    for m in morphisms:
        source = m.upstream
        if source.unique_id in produced or any(s["unique_id"] == source.unique_id for s in sources):
            continue
        found = fates(source.unique_id)
        if found is None:
            return None
        sources.append(_source_fates(source, m.stats["input"], found, []))
    return sources


def _source_fates(
    source: Entity, total: int, fates: tuple[int, int, int], samples: list[str]
) -> dict[str, Any]:
    """A graph source's end-to-end accounting: its input keys by fate (reached, filtered, errored, neither)."""
    assert source.key is not None
    reached, filtered, errored = fates
    return {
        "source": source.name,
        "unique_id": source.unique_id,
        "relation": source.relation,
        "key_fields": list(source.key.columns),
        "input": total,
        "fates": {
            "reached_output": reached,
            "filtered": filtered,
            "errored": errored,
            "unaccounted": total - reached - filtered - errored,
        },
        "unaccounted_samples": samples,
    }


def _log_morphism(run_id: str, m: Morphism, seconds: float) -> None:
    # One line per morphism, tagged with the requirements it implements, for whoever audits the run.
    logger.info(
        "morphism captured",
        extra={
            "run_id": run_id,
            "model": m.model.name,
            "upstream": m.upstream.name,
            "req": list(m.model.req),
            "pairs": int(m.stats.get("pairs", 0)),
            "seconds": round(seconds, 3),
        },
    )


def _fates(
    cur: psycopg.Cursor[Any],
    run_id: str,
    morphisms: list[Morphism],
    epoch: date,
    *,
    stored: bool,
    gathered: bool,
) -> list[dict[str, Any]]:
    """End-to-end fate of every input key of each graph source, computed backward from the graph's outputs.

    A key's fate at an entity is the best its rows reach downstream: an output (0), filtered (1), errored (2);
    keys with none of these are unaccounted. Leaves (models no captured morphism reads) are outputs. The pairs
    are the run's partition of `mapped` (`stored`), those `gather_pairs` gathered, or both.
    """
    mapped, filtered, errored = (_part(t, run_id) for t in PARTITIONED)
    if gathered:
        _execute(cur, "analyze _cdme_all_pairs")
        mapped = (
            sql.SQL(
                "(select morphism_id, source_key, target_key from {} "
                "union all select morphism_id, source_key, target_key from _cdme_all_pairs)"
            ).format(mapped)
            if stored
            else sql.Composed([sql.Identifier("_cdme_all_pairs")])
        )
    _execute(cur, "drop table if exists _cdme_fate")
    _execute(cur, "create temp table _cdme_fate (uid text, k text, fate smallint) on commit drop")
    by_upstream: dict[str, list[Morphism]] = {}
    for m in morphisms:
        by_upstream.setdefault(m.upstream.unique_id, []).append(m)
    graph: dict[str, set[str]] = {}
    for m in morphisms:
        graph.setdefault(m.model.unique_id, set()).add(m.upstream.unique_id)
        graph.setdefault(m.upstream.unique_id, set())
    order = list(TopologicalSorter(graph).static_order())
    for uid in reversed(order):
        downstream = by_upstream.get(uid)
        if not downstream:
            producers = [m for m in morphisms if m.model.unique_id == uid]
            for m in producers:
                _execute(
                    cur,
                    sql.SQL(
                        "insert into _cdme_fate select distinct {}, target_key, 0 from {} where morphism_id = {}"
                    ).format(sql.Literal(uid), mapped, sql.Literal(m.morphism_id)),
                )
            _execute(cur, "analyze _cdme_fate")
            continue
        parts = []
        for m in downstream:
            mid = sql.Literal(m.morphism_id)
            parts.append(
                sql.SQL(
                    "select x.source_key as k, coalesce(f.fate, 3) as fate from {} x left join _cdme_fate f "
                    "on f.uid = {} and f.k = x.target_key where x.morphism_id = {}"
                ).format(mapped, sql.Literal(m.model.unique_id), mid)
            )
            parts.append(sql.SQL("select source_key, 1 from {} where morphism_id = {}").format(filtered, mid))
            parts.append(sql.SQL("select source_key, 2 from {} where morphism_id = {}").format(errored, mid))
        _execute(
            cur,
            sql.SQL("insert into _cdme_fate select {}, k, min(fate) from ({}) a group by k").format(
                sql.Literal(uid), sql.SQL(" union all ").join(parts)
            ),
        )
        _execute(cur, "analyze _cdme_fate")
    sources = []
    produced = {m.model.unique_id for m in morphisms}
    seen: set[str] = set()
    for m in morphisms:
        source = m.upstream
        if source.unique_id in produced or source.unique_id in seen:
            continue
        seen.add(source.unique_id)
        source_uid = sql.Literal(source.unique_id)
        fate_keys = sql.SQL("select k, fate from _cdme_fate where uid = {}").format(source_uid)
        _execute(
            cur,
            sql.SQL(
                "select count(*) filter (where f.fate = 0), count(*) filter (where f.fate = 1), "
                "count(*) filter (where f.fate = 2) from ({}) i join ({}) f on f.k = i.k"
            ).format(sql.SQL(f"select distinct k from ({m.input_sql(epoch)}) i"), fate_keys),
        )
        row = cur.fetchone()
        assert row is not None
        total = m.stats["input"]
        _execute(cur, "drop table if exists _cdme_source_lost")
        _execute(
            cur,
            sql.SQL(
                "create temp table _cdme_source_lost on commit drop as "
                "select k from ({}) i except select k from _cdme_fate where uid = {} and fate < 3"
            ).format(sql.SQL(f"select distinct k from ({m.input_sql(epoch)}) i"), source_uid),
        )
        _execute(
            cur, sql.SQL("select k from _cdme_source_lost order by 1 limit {}").format(sql.Literal(SAMPLES))
        )
        samples = [r[0] for r in cur.fetchall()]
        sources.append(_source_fates(source, total, (row[0], row[1], row[2]), samples))
    return sources


def capture(
    engine: Engine,
    run_id: str,
    epoch: date,
    lineage_mode: LineageMode,
    plan: CapturePlan,
    *,
    project: str | None = None,
    sample_rate: float = 0.01,
    workers: int = 2,
) -> CaptureResult:
    """Capture a run: replace its adjoint metadata atomically with what the plan's SQL yields now.

    Args:
        engine: An engine on the warehouse the run built (where `cdme_adjoint` lives too).
        run_id: The run's id (a UUID).
        epoch: The run's business date.
        lineage_mode: How much to store (see the module docstring).
        plan: The morphisms to capture (`plan_capture`).
        project: The dbt project's name, recorded with the run.
        sample_rate: The share of keys `summary` mode stores.
        workers: How many connections load the morphisms' pairs at once (besides the capture's own).

    Returns:
        What was captured.
    """
    run_id = normalise_run_id(run_id)
    started = time.perf_counter()
    job: _Capture | None = None
    try:
        # Each statement sees what the loaders committed (the count of stored pairs, ANALYZE): READ COMMITTED.
        with engine.connect().execution_options(isolation_level="READ COMMITTED") as conn, conn.begin():
            raw = conn.connection.driver_connection
            assert isinstance(raw, psycopg.Connection)
            with raw.cursor() as cur:
                job = _Capture(cur, run_id, epoch, lineage_mode, sample_rate)
                job.prepare()
                job.start_loading(engine, workers, plan)
                # Digests prove most runs balanced in a few passes; only a run they cannot prove needs key sets.
                balanced = job.accounted(plan)
                if not balanced:
                    job.discard()
                    for m in plan.morphisms:
                        begun = time.perf_counter()
                        job.morphism(m, single_driver=plan.single_driver(m))
                        _log_morphism(run_id, m, time.perf_counter() - begun)
                job.finish()
                sources = _derived_fates(plan) if balanced else None
                if sources is None:
                    if balanced:
                        # The counts stand; only the fates need the pairs: those the run did not store (all but
                        # a full run's, which lack the identities it implies) are gathered.
                        logger.info(
                            "end-to-end fates need key sets in this graph; following the pairs",
                            extra={"run_id": run_id},
                        )
                        job.gather_pairs(
                            plan,
                            [
                                m
                                for m in plan.morphisms
                                if lineage_mode != "full" or m.morphism_id in job.implied
                            ],
                        )
                    sources = _fates(
                        cur,
                        run_id,
                        plan.morphisms,
                        epoch,
                        stored=lineage_mode == "full",
                        gathered=lineage_mode != "full" or bool(job.implied),
                    )
                pairs = (
                    sum(int(m.stats["pairs"]) for m in plan.morphisms)
                    if lineage_mode == "full"
                    else _scalar(cur, sql.SQL("select count(*) from {}").format(_part("mapped", run_id)))
                )
                seconds = time.perf_counter() - started
                _store_run(
                    cur,
                    run_id,
                    epoch,
                    lineage_mode,
                    plan,
                    sources,
                    int(pairs),
                    seconds,
                    project,
                    sample_rate,
                    job.implied,
                )
    except BaseException:
        if job is not None:
            job.drop_pairs_table(engine)
        raise
    captured = sorted({m.model.unique_id for m in plan.morphisms})
    logger.info(
        "run captured",
        extra={
            "run_id": run_id,
            "morphisms": len(plan.morphisms),
            "pairs": pairs,
            "seconds": round(seconds, 3),
        },
    )
    return CaptureResult(run_id, lineage_mode, captured, plan.not_captured, int(pairs), seconds)


def _store_run(
    cur: psycopg.Cursor[Any],
    run_id: str,
    epoch: date,
    mode: LineageMode,
    plan: CapturePlan,
    sources: Iterable[Mapping[str, Any]],
    pairs: int,
    seconds: float,
    project: str | None,
    sample_rate: float,
    implied: Mapping[int, list[int]],
) -> None:
    cur.execute(
        "insert into cdme_adjoint.runs (run_id, epoch, lineage_mode, key_encoding, project, seconds, pairs, "
        "sample_rate, not_captured) values (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            run_id,
            epoch,
            mode,
            KEY_ENCODING,
            project,
            seconds,
            pairs,
            sample_rate if mode == "summary" else None,
            json.dumps([{"unique_id": n.unique_id, "reason": n.reason} for n in plan.not_captured]),
        ),
    )
    for m in plan.morphisms:
        assert m.upstream.key is not None and m.model.key is not None
        filters = [
            {"condition": f.condition, "model": m.model.name, "line": f.line, "clause": f.clause}
            for f in m.derivation.filters
        ]
        s = m.stats
        cur.execute(
            "insert into cdme_adjoint.morphisms values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                run_id,
                m.morphism_id,
                m.model.name,
                m.model.unique_id,
                m.model.relation,
                m.kind,
                m.upstream.name,
                m.upstream.unique_id,
                m.upstream.relation,
                list(m.upstream.key.columns),
                list(m.model.key.columns),
                s["input"],
                s["mapped"],
                s["filtered"],
                s["errored"],
                s["output"],
                s["pairs"],
                s["overlap_count"],
                s["overlap_samples"],
                s["unaccounted_count"],
                s["unaccounted_samples"],
                json.dumps(filters),
                list(m.model.req),
                list(m.model.access),
                list(m.upstream.access),
                m.pairs_sql(single_driver=plan.single_driver(m)),
                m.input_sql(epoch),
                m.output_sql(),
                json.dumps(s.get("envelopes")) if s.get("envelopes") else None,
                # With several driving upstreams (a union) an output key need not come from this one.
                s["identity"] and plan.single_driver(m),
                m.epoch_column,
                implied.get(m.morphism_id),
                "full" if downgraded(mode, m, single_driver=plan.single_driver(m)) else None,
            ),
        )
    for src in sources:
        cur.execute(
            "insert into cdme_adjoint.sources values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                run_id,
                src["unique_id"],
                src["source"],
                src["relation"],
                src["key_fields"],
                src["input"],
                src["fates"]["reached_output"],
                src["fates"]["filtered"],
                src["fates"]["errored"],
                src["fates"]["unaccounted"],
                src["unaccounted_samples"],
            ),
        )
