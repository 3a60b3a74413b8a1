"""Queries over captured adjoint metadata: partitions, backward, impact, reconcile.

Every answer comes from `cdme_adjoint` (never from re-running the pipeline). Backward composes the runs'
mapped relations in reverse (target -> source, the contravariant direction), impact composes them forward;
both walk in one recursive SQL query over the (morphism, key) indexes of the run's partition. Keys and model
names are bind parameters; only identifiers the capture itself recorded reach SQL text.

Access control: an entity whose `meta.cdme.access` roles the principal holds none of does not exist for it; a
walk never passes through it, and asking about it directly is a 404 like an unknown name.

Key-derivable runs store no pairs: backward evaluates the morphisms' derived SQL with the key predicate, after
checking that the checkpoint envelopes of every relation it reads still match the capture (else 409).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from sqlalchemy import Connection, Engine, event

from services.adjoint.domain.capture import (
    CARRIED,
    PARTITIONED,
    SAMPLES,
    SCHEMA,
    envelope_of,
    normalise_run_id,
    pairs_checkpoint,
    partition_name,
)
from services.adjoint.domain.errors import NotReconstructableError
from services.adjoint.domain.keys import ENCODING_SESSION, KEY_ENCODING, key_sql_text
from services.core.errors import NotFoundError, UsageError

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
MAX_DEPTH = 64


@dataclass(frozen=True)
class Edge:
    """A captured morphism as the walks see it."""

    morphism_id: int
    model: str
    unique_id: str
    relation: str
    upstream: str
    upstream_unique_id: str
    upstream_relation: str
    kind: str
    source_key_fields: tuple[str, ...]
    target_key_fields: tuple[str, ...]
    access: tuple[str, ...]
    upstream_access: tuple[str, ...]
    mapped_sql: str
    input_sql: str
    output_sql: str
    envelopes: dict[str, Any] | None
    identity: bool
    # The column holding a source upstream's epoch (None for a model, or a run captured before it was recorded).
    upstream_epoch_column: str | None
    # A full run's identity whose pairs are implied: the morphisms whose input keys are its model's keys.
    keys_from: tuple[int, ...] | None
    # `full` where a key_derivable run stored the morphism's pairs (`capture.downgraded`); None: the run's mode.
    lineage_mode: str | None

    @property
    def width(self) -> int:
        """The components of each source key (the upstream key's columns): a carried pair's prefix (`_sources_of`)."""
        return len(self.source_key_fields)


@dataclass(frozen=True)
class RunGraph:
    """A captured run's morphisms, as visible to a principal."""

    run_id: str
    epoch: str
    lineage_mode: str
    edges: list[Edge]
    names: dict[str, str]
    hidden: frozenset[str]

    def uid_of(self, name: str) -> str:
        """The unique id of a visible entity named `name` (model name, `source.table`, or unique id).

        Raises:
            NotFoundError: No visible entity of the run has that name.
        """
        for uid, entity in self.names.items():
            if (name in (entity, uid)) and uid not in self.hidden:
                return uid
        msg = f"no captured model or source named {name!r} in run {self.run_id}"
        raise NotFoundError(msg)

    @property
    def producers(self) -> list[Edge]:
        """The morphisms that produce a model's keys by a lookup, not as copies (hidden ones included)."""
        return [e for e in self.edges if not e.identity]

    @property
    def producer_models(self) -> set[str]:
        """The models some non-identity morphism of the run produces."""
        return {e.unique_id for e in self.producers}

    def visible_edges(self) -> list[Edge]:
        """Edges whose model and upstream are both visible."""
        return [
            e
            for e in self.edges
            if e.unique_id not in self.hidden and e.upstream_unique_id not in self.hidden
        ]


def _visible(access: Sequence[str], roles: frozenset[str] | None) -> bool:
    return roles is None or not access or bool(roles.intersection(access))


@contextmanager
def _connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        yield conn
        # COMMIT, not the pool's ROLLBACK on return: psycopg forgets the statements it prepared when a transaction
        # rolls back, and every request would prepare and plan its queries anew. The queries run on the driver's
        # connection, where SQLAlchemy sees no transaction to commit.
        _driver(conn).commit()


# The walk, impact and graph queries are the same few texts run over and over with other keys, which psycopg
# prepares on the server. PostgreSQL would plan each execution anew (a custom plan) because the generic plan's
# estimate, with no key to go by, looks dearer: the planning then costs more than the lookup it plans (a one-hop
# backward: p50 1.0 ms with custom plans, 0.4 ms with the generic one). Capture's statements are never prepared.
SESSION = "set plan_cache_mode = force_generic_plan"


def prefer_generic_plans(engine: Engine) -> None:
    """Make every connection `engine` opens from now on plan prepared statements once (`SESSION`)."""

    def configure(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute(SESSION)
        dbapi_connection.commit()

    event.listen(engine, "connect", configure)
    # Connections opened before (the startup check's) would not be configured: open them again.
    engine.dispose()


def _driver(conn: Any) -> psycopg.Connection[Any]:
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    return raw


def latest_run(cur: psycopg.Cursor[Any], model: str | None = None) -> str:
    """The most recently captured run (that captured `model`, when given).

    Raises:
        NotFoundError: No run was captured (with that model).
    """
    if model is None:
        cur.execute("select run_id from cdme_adjoint.runs order by captured_at desc limit 1")
    else:
        cur.execute(
            "select r.run_id from cdme_adjoint.runs r where exists (select 1 from cdme_adjoint.morphisms m "
            "where m.run_id = r.run_id and (m.model = %(m)s or m.unique_id = %(m)s or m.upstream = %(m)s "
            "or m.upstream_unique_id = %(m)s)) order by r.captured_at desc limit 1",
            {"m": model},
        )
    row = cur.fetchone()
    if row is None:
        msg = "no run has been captured" if model is None else f"no captured run has a model named {model!r}"
        raise NotFoundError(msg)
    return str(row["run_id"] if isinstance(row, dict) else row[0])


def load_graph(cur: psycopg.Cursor[Any], run_id: str, roles: frozenset[str] | None) -> RunGraph:
    """A run's morphisms; entities `roles` may not see are hidden (None: everything visible).

    Raises:
        NotFoundError: The run was never captured.
    """
    run_id = normalise_run_id(run_id)
    cur.execute(
        "select epoch::text as epoch, lineage_mode from cdme_adjoint.runs where run_id = %s", (run_id,)
    )
    run = cur.fetchone()
    if run is None:
        msg = f"run {run_id} has not been captured"
        raise NotFoundError(msg)
    cur.execute(
        "select morphism_id, model, unique_id, relation, upstream, upstream_unique_id, upstream_relation, kind, "
        "source_key_fields, target_key_fields, access, upstream_access, mapped_sql, input_sql, output_sql, "
        "envelopes, identity, upstream_epoch_column, keys_from, lineage_mode from cdme_adjoint.morphisms "
        "where run_id = %s "
        "order by morphism_id",
        (run_id,),
    )
    edges = []
    for r in cur.fetchall():
        r = dict(r) if not isinstance(r, dict) else r
        edges.append(
            Edge(
                **{
                    **r,
                    "source_key_fields": tuple(r["source_key_fields"]),
                    "target_key_fields": tuple(r["target_key_fields"]),
                    "access": tuple(r["access"]),
                    "upstream_access": tuple(r["upstream_access"]),
                    "keys_from": None if r["keys_from"] is None else tuple(r["keys_from"]),
                }
            )
        )
    names: dict[str, str] = {}
    hidden: set[str] = set()
    for e in edges:
        names[e.unique_id] = e.model
        names[e.upstream_unique_id] = e.upstream
        if not _visible(e.access, roles):
            hidden.add(e.unique_id)
        if not _visible(e.upstream_access, roles):
            hidden.add(e.upstream_unique_id)
    return RunGraph(run_id, run["epoch"], run["lineage_mode"], edges, names, frozenset(hidden))


# -- partitions -------------------------------------------------------------------------------------------------


def partitions(engine: Engine, run_id: str, roles: frozenset[str] | None = None) -> dict[str, Any]:
    """The accounting of a captured run (the body of `GET /runs/{run_id}/partitions`).

    A principal with `roles` sees only the morphisms whose model and upstream it may see, and the graph sources
    it may see, as if the others were not in the run (None: every one).

    Raises:
        NotFoundError: The run was never captured.
    """
    run_id = normalise_run_id(run_id)
    with _connection(engine) as conn, _driver(conn).cursor(row_factory=dict_row) as cur:
        cur.execute(
            "select run_id, epoch::text as epoch, lineage_mode, key_encoding, not_captured "
            "from cdme_adjoint.runs where run_id = %s",
            (run_id,),
        )
        run = cur.fetchone()
        if run is None:
            msg = f"run {run_id} has not been captured"
            raise NotFoundError(msg)
        cur.execute("select * from cdme_adjoint.morphisms where run_id = %s order by morphism_id", (run_id,))
        rows = cur.fetchall()
        shown = [m for m in rows if _visible(m["access"], roles) and _visible(m["upstream_access"], roles)]
        visible = {m["morphism_id"] for m in shown}
        morphisms = [_morphism_view(run_id, m, run["lineage_mode"], visible) for m in shown]
        access = {m["upstream_unique_id"]: m["upstream_access"] for m in rows}
        cur.execute("select * from cdme_adjoint.sources where run_id = %s order by unique_id", (run_id,))
        sources = [
            {
                "source": s["name"],
                "unique_id": s["unique_id"],
                "relation": s["relation"],
                "key_fields": s["key_fields"],
                "input": s["input"],
                "fates": {
                    "reached_output": s["reached_output"],
                    "filtered": s["filtered"],
                    "errored": s["errored"],
                    "unaccounted": s["unaccounted"],
                },
                "unaccounted_samples": s["unaccounted_samples"],
            }
            for s in cur.fetchall()
            if _visible(access.get(s["unique_id"], ()), roles)
        ]
    return {
        "run_id": run["run_id"],
        "epoch": run["epoch"],
        "lineage_mode": run["lineage_mode"],
        "key_encoding": run["key_encoding"],
        "morphisms": morphisms,
        "sources": sources,
        "not_captured": run["not_captured"],
    }


def _location(table: str, run_id: str, morphism_id: int, keys_from: Sequence[int] | None = None) -> str:
    if table == "mapped" and keys_from is not None:
        # An implied identity stores no pairs: its mapped keys are the input keys of the morphisms it names.
        return (
            f"{SCHEMA}.{table}#run={run_id}&morphism={morphism_id}&keys_from={','.join(map(str, keys_from))}"
        )
    return f"{SCHEMA}.{table}#run={run_id}&morphism={morphism_id}"


def _morphism_view(run_id: str, m: dict[str, Any], run_mode: str, visible: set[int]) -> dict[str, Any]:
    # Morphisms the principal may not see are not named, here either.
    keys_from = None if m["keys_from"] is None else [i for i in m["keys_from"] if i in visible]
    return {
        "morphism_id": m["morphism_id"],
        "model": m["model"],
        "unique_id": m["unique_id"],
        "relation": m["relation"],
        "kind": m["kind"],
        "upstream": m["upstream"],
        "upstream_unique_id": m["upstream_unique_id"],
        "upstream_relation": m["upstream_relation"],
        "source_key_fields": m["source_key_fields"],
        "target_key_fields": m["target_key_fields"],
        "input": m["input"],
        "mapped": m["mapped"],
        "filtered": m["filtered"],
        "errored": m["errored"],
        "output": m["output"],
        "pairs": m["pairs"],
        "overlap": {"count": m["overlap_count"], "samples": m["overlap_samples"]},
        "unaccounted": {"count": m["unaccounted_count"], "samples": m["unaccounted_samples"]},
        "locations": {t: _location(t, run_id, m["morphism_id"], keys_from) for t in PARTITIONED},
        "keys_from": keys_from,
        # A key_derivable run stores in full the pairs it could not derive again (`capture.downgraded`).
        "lineage_mode": m["lineage_mode"] or run_mode,
        "filters": m["filters"],
        "req": m["req"],
    }


# -- backward and impact ----------------------------------------------------------------------------------------


def _cursor_offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        offset = int(data["offset"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        msg = "cursor: not a cursor this service issued (pass the `next` value of the previous page)"
        raise UsageError(msg) from None
    if offset < 0:
        msg = "cursor: negative offset"
        raise UsageError(msg)
    return offset


def _next_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _bounds(depth: int | None, limit: int) -> int:
    if depth is not None and not 1 <= depth <= MAX_DEPTH:
        msg = f"depth must be between 1 and {MAX_DEPTH}, got {depth}"
        raise UsageError(msg)
    if not 1 <= limit <= MAX_LIMIT:
        msg = f"limit must be between 1 and {MAX_LIMIT}, got {limit}"
        raise UsageError(msg)
    return depth or MAX_DEPTH


# Where the queries of one run read its pairs: its own partition of `mapped`, named by `for_run`. A generic plan
# (`SESSION`) over the parent table would lock and open every run's partition at each execution. (A run's partition
# partitioned again by morphism was tried: its generic plans open every morphism's table, and a one-hop backward
# took half as long again.)
_RUN_MAPPED = "{mapped}"
_ALL_MAPPED = f"{SCHEMA}.mapped"


def for_run(query: str, run_id: str) -> str:
    """`query` reading `run_id`'s partition of each table where it says `{mapped}`, `{filtered}` or `{errored}`."""
    for table in PARTITIONED:
        query = query.replace(f"{{{table}}}", f'{SCHEMA}."{partition_name(table, run_id)}"')
    return query


def _keyed(column: str, value: str, morphism: str) -> str:
    """`column = value` in morphism `morphism`, for a key column of `mapped`, as its indexes answer (migration 0005).

    The indexes hold one 64-bit hash of the key seeded with the morphism: the hash finds the rows, the comparisons
    keep only the morphism's own rows of the key (a collision costs a row read, never a wrong answer). `column`
    names its relation (`x.source_key`), whose `morphism_id` the condition reads too.

    The comparisons are one opaque condition so that the planner does not count their selectivity on top of the
    hash's, which already selects the key's rows. Counted twice, a daily position's 46,000 contributing trades
    looked like one row, and a LIMIT or EXISTS that needs only the first rows in index order read all of them
    through a bitmap instead (20 ms instead of 1 ms).
    """
    owner, dot, _name = column.rpartition(".")
    assert dot, f"{column}: name the relation the key column belongs to"
    row_morphism = f"{owner}.morphism_id"
    return (
        f"hashtextextended({column}, {row_morphism}) = hashtextextended({value}, {morphism}) "
        f"and coalesce({row_morphism} = {morphism} and {column} = {value}, false)"
    )


def _sources_of(
    run: str,
    morphism: str,
    target: str,
    width: str,
    when: str = "true",
    first: str | None = None,
    mapped: str = _RUN_MAPPED,
) -> str:
    """A subquery (column `source_key`) of the source keys `morphism` of `run` maps to the key `target`.

    Pairs that carry their source key in the target key (`capture.CARRIED`) are not in the backward index: their
    source key is the target key's first `width` components (the upstream key's), looked up in the forward index
    (one probe, whose row estimate the planner knows, where a series of prefixes let it guess a thousand). `when` is a
    condition on the outer query that gates both lookups. (`CARRIED` names the columns of `x`, the only relation
    in its scope, unqualified: the partial index's predicate must read the same.) With `first`, only the first
    `first` source keys in key order: the backward index reads them in order, and the carried ones are few. An
    existence check asks for the first one, so that the index scan stops at it.
    `mapped` is the run's partition (`for_run` names it) unless `run` is an expression over several runs.
    """
    prefix = f"array_to_string((string_to_array({target}, '|'))[1:{width}], '|')"
    ordered = "" if first is None else f" order by x.source_key limit {first}"
    return (
        f"((select x.source_key from {mapped} x where {when} and x.run_id = {run} "
        f"and {_keyed('x.target_key', target, morphism)} and not {CARRIED}{ordered}) "
        "union all "
        f"(select x.source_key from {mapped} x where {when} and x.run_id = {run} "
        f"and {_keyed('x.source_key', prefix, morphism)} and x.target_key = {target}))"
    )


def _implied_has(ids: str, key: str, run: str, *, across_runs: bool = False) -> str:
    """Whether `key` is in a partition of one of the morphisms `ids` (an `int[]`) of `run`: mapped, filtered, errored.

    The pairs of an implied identity (`capture.implied_identities`) are its model's keys. Over the whole list it
    names (`keys_from`), those are the stored input keys: the mapped source keys (the forward index), filtered
    keys and errored keys of the reader that stores its pairs, and the filtered and errored keys of the implied
    identities between. The run's own partitions (`for_run`), or with `across_runs` the parent tables, where `run`
    is a column.
    """
    mapped, filtered, errored = ((f"{SCHEMA}.{t}" if across_runs else f"{{{t}}}") for t in PARTITIONED)
    return (
        f"exists (select 1 from unnest({ids}) as v(id) where exists (select 1 from {mapped} x "
        f"where x.run_id = {run} and {_keyed('x.source_key', key, 'v.id')}) "
        f"or exists (select 1 from {filtered} f where f.run_id = {run} and f.morphism_id = v.id "
        f"and f.source_key = {key}) "
        f"or exists (select 1 from {errored} r where r.run_id = {run} and r.morphism_id = v.id "
        f"and r.source_key = {key}))"
    )


# The morphisms an implied identity `e.id` reads its keys from, out of `edge_params`.
_IMPLIED_IDS = (
    "array(select v.via from unnest(%(implied_of)s::int[], %(implied_via)s::int[]) as v(of, via) "
    "where v.of = {})"
)


# Backward through an identity morphism (every pair is (k, k)) needs no lookup: each output row of a model has
# its driving input row, so the key it reached is the key upstream. Besides the page (`stranded` false, in
# order), the query returns the keys the walk reached at a model that no morphism of this run produced (an
# incremental model's rows of earlier epochs): the caller follows them into the runs that did.
_BACKWARD = f"""
with recursive walk(uid, k, path, depth) as (
    select %(uid)s::text, %(key)s::text, array[%(uid)s::text], 0
  union all
    select e.up, m.source_key, w.path || e.up, w.depth + 1
    from walk w
    join unnest(%(ids)s::int[], %(models)s::text[], %(ups)s::text[], %(identity)s::bool[], %(widths)s::int[])
        as e(id, model, up, identity, width) on e.model = w.uid
    cross join lateral (
        select w.k as source_key where e.identity
      union all
        select s.source_key from {_sources_of("%(run)s", "e.id", "w.k", "e.width", "not e.identity")} s
    ) m
    where w.depth < %(depth)s
),
page as (
    select distinct uid, k, path, depth from walk where depth > 0 and (%(to)s::text is null or uid = %(to)s)
    order by depth, uid, k, path
    limit %(limit)s offset %(offset)s
)
select uid, k, path, depth, false as stranded from page
union all
select distinct w.uid, w.k, w.path, w.depth, true from walk w
where w.depth < %(depth)s and w.uid = any(%(producer_models)s::text[]) and not exists (
    select 1 from unnest(%(producer_models)s::text[], %(producer_ids)s::int[], %(producer_widths)s::int[])
        as p(model, id, width)
    cross join lateral {_sources_of("%(run)s", "p.id", "w.k", "p.width", first="1")} s
    where p.model = w.uid
)
"""

# One hop needs no recursion: the start key's contributions through each morphism into the model, and the start key
# itself when no morphism of the run produced it. The most frequent interactive question, so the cheapest plan.
_ONE_HOP = f"""
(select e.up as uid, m.source_key as k, array[%(uid)s::text, e.up] as path, 1 as depth, false as stranded
from unnest(%(ids)s::int[], %(models)s::text[], %(ups)s::text[], %(identity)s::bool[], %(widths)s::int[])
    as e(id, model, up, identity, width)
cross join lateral (
    select %(key)s::text as source_key where e.identity
  union all
    select s.source_key from {_sources_of("%(run)s", "e.id", "%(key)s", "e.width", "not e.identity")} s
) m
where e.model = %(uid)s and (%(to)s::text is null or e.up = %(to)s)
order by uid, k, path
limit %(limit)s offset %(offset)s)
union all
select %(uid)s, %(key)s, array[%(uid)s::text], 0, true
where %(uid)s = any(%(producer_models)s::text[]) and not exists (
    select 1 from unnest(%(producer_models)s::text[], %(producer_ids)s::int[], %(producer_widths)s::int[])
        as p(model, id, width)
    cross join lateral {_sources_of("%(run)s", "p.id", "%(key)s", "p.width", first="1")} s
    where p.model = %(uid)s
)
"""

_IMPACT = f"""
with recursive walk(uid, k, path, depth) as (
    select %(uid)s::text, k, array[%(uid)s::text], 0 from unnest(%(keys)s::text[]) as k
  union all
    select e.model, m.target_key, w.path || e.model, w.depth + 1
    from walk w
    join unnest(%(ids)s::int[], %(models)s::text[], %(ups)s::text[]) as e(id, model, up) on e.up = w.uid
    cross join lateral (
        select x.target_key from {_RUN_MAPPED} x where x.run_id = %(run)s and {_keyed("x.source_key", "w.k", "e.id")}
      union all
        select w.k where e.id = any(%(implied_of)s::int[])
        and {_implied_has(_IMPLIED_IDS.format("e.id"), "w.k", "%(run)s")}
    ) m
    where w.depth < %(depth)s
)
select uid, path, count(distinct k) as n, (array_agg(distinct k order by k))[1:%(sample)s] as keys
from walk where depth > 0 group by uid, path order by min(depth), uid, path
"""


def backward_sql(max_depth: int, run_id: str) -> str:
    """The walk query the service runs for a backward of at most `max_depth` hops in run `run_id`."""
    return for_run(_ONE_HOP if max_depth == 1 else _BACKWARD, run_id)


def walk_params(
    graph: RunGraph, uid: str, max_depth: int, edges: Sequence[Edge] | None = None
) -> dict[str, Any]:
    """The bind parameters of `backward_sql(max_depth)` from `uid`, but for the key, `to` and the page.

    `edges` narrows the walk to those morphisms (default: every visible one).
    """
    edges = graph.visible_edges() if edges is None else edges
    producers = producer_params(graph)
    if max_depth == 1:
        # One hop reads only the morphisms into `uid`: the smaller arrays are most of a 1 ms query's cost.
        edges = [e for e in edges if e.unique_id == uid]
        into = [i for i, model in enumerate(producers["producer_models"]) if model == uid]
        producers = {name: [values[i] for i in into] for name, values in producers.items()}
    return {**edge_params(edges), **producers, "uid": uid, "run": graph.run_id, "depth": max_depth}


def producer_params(graph: RunGraph) -> dict[str, Any]:
    """The bind parameters naming the run's non-identity morphisms into each model (hidden ones included)."""
    producers = graph.producers
    return {
        "producer_models": [e.unique_id for e in producers],
        "producer_ids": [e.morphism_id for e in producers],
        "producer_widths": [e.width for e in producers],
    }


def edge_params(edges: Sequence[Edge], *, identities: bool = True) -> dict[str, Any]:
    """The bind parameters describing `edges` to the walk queries (identity shortcuts only where allowed)."""
    return {
        "ids": [e.morphism_id for e in edges],
        "models": [e.unique_id for e in edges],
        "ups": [e.upstream_unique_id for e in edges],
        "identity": [e.identity and identities for e in edges],
        "widths": [e.width for e in edges],
        **_implied_params(edges),
    }


def _implied_params(edges: Sequence[Edge]) -> dict[str, list[int]]:
    """The implied identities among `edges` (`implied_of`), once per morphism each reads keys from (`implied_via`)."""
    pairs = [(e.morphism_id, via) for e in edges if e.keys_from for via in e.keys_from]
    return {"implied_of": [of for of, _via in pairs], "implied_via": [via for _of, via in pairs]}


def backward(
    engine: Engine,
    model: str,
    key: str,
    *,
    roles: frozenset[str] | None,
    run_id: str | None = None,
    to: str | None = None,
    depth: int | None = None,
    records: bool = False,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> dict[str, Any]:
    """The records every upstream contributed to `key` of `model`, down to the graph sources.

    Args:
        engine: An engine on the warehouse.
        model: The model (name or unique id).
        key: The record's `cdme-key/v1` key.
        roles: The principal's roles (None: no access control).
        run_id: The run to answer from (default: the latest run that captured `model`).
        to: Only contributions of this entity (e.g. `raw_trading.trades`).
        depth: At most this many hops.
        records: Also return the contributing rows themselves, as they are now in the warehouse (a source's of
            the run's epoch).
        limit: Page size.
        cursor: The `next` of the previous page.

    Returns:
        `{run_id, model, key, key_encoding, contributions: [{entity, unique_id, key, depth, path, run_id,
        record?}], unresolved: [{entity, unique_id, key, path, reason}], next}`, ordered by depth, entity and
        key. A key the walk reaches at a model this run did not produce (an incremental model's earlier epochs)
        is followed into the latest earlier run (by epoch) that captured it in `full` mode (its contributions
        carry that run's id); where no such run holds it, it is listed in `unresolved`, so a partial answer
        never passes for a whole one.

    Raises:
        NotFoundError: The run, the model, `to` or the key is unknown (or not visible).
        NotReconstructableError: A key-derivable run's data changed since capture.
        UsageError: A bound or the cursor is invalid.
    """
    max_depth = _bounds(depth, limit)
    offset = _cursor_offset(cursor)
    with _connection(engine) as conn, _driver(conn).cursor(row_factory=dict_row) as cur:
        graph = load_graph(cur, run_id or latest_run(cur, model), roles)
        uid = graph.uid_of(model)
        target = graph.uid_of(to) if to is not None else None
        names = dict(graph.names)
        if graph.lineage_mode != "key_derivable":
            _check_key(cur, graph, graph.visible_edges(), uid, key)
        rows, stranded = walk_run(cur, graph, uid, key, target, max_depth, limit + 1, offset)
        unresolved: list[_Row] = []
        # A summary run stores a sample of pairs: a key without any is unsampled, not produced elsewhere.
        if stranded and graph.lineage_mode != "summary":
            rows, unresolved = _walk_across_runs(cur, graph, roles, uid, key, target, max_depth, names)
            rows = rows[offset : offset + limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        contributions = [
            {
                "entity": names[u],
                "unique_id": u,
                "key": k,
                "depth": d,
                "path": [names[p] for p in path],
                "run_id": run,
            }
            for u, k, path, d, run in rows
        ]
        if records:
            _set_encoding_session(cur)
            _attach_records(cur, graph, contributions)
    return {
        "run_id": graph.run_id,
        "model": graph.names[uid],
        "key": key,
        "key_encoding": KEY_ENCODING,
        "lineage_mode": graph.lineage_mode,
        "contributions": contributions,
        "unresolved": [
            {
                "entity": names[u],
                "unique_id": u,
                "key": k,
                "path": [names[p] for p in path],
                "reason": f"no run captured in full mode before {run} produced it",
            }
            for u, k, path, _d, run in unresolved
        ],
        "next": _next_cursor(offset + limit) if more else None,
    }


# (entity unique id, key, path of unique ids, depth, run id)
_Row = tuple[str, str, list[str], int, str]


def walk_run(
    cur: psycopg.Cursor[Any],
    graph: RunGraph,
    uid: str,
    key: str,
    target: str | None,
    max_depth: int,
    limit: int | None,
    offset: int,
) -> tuple[list[_Row], list[_Row]]:
    """One run's backward walk: a page of contributions (all of them with no limit) and the stranded keys.

    This is all `backward` asks of the database for a run (the benchmark times it as "in the database"); the
    cursor must return dict rows.
    """
    edges = graph.visible_edges()
    if graph.lineage_mode == "key_derivable":
        found, derived_stranded = _backward_derived(cur, graph, edges, uid, key, target, max_depth)
        page = found[offset:] if limit is None else found[offset : offset + limit]
        run = graph.run_id
        return [(u, k, p, d, run) for u, k, p, d in page], [
            (u, k, p, d, run) for u, k, p, d in derived_stranded
        ]
    tail = _identity_tail(graph, edges, target) if target is not None and limit is not None else None
    if tail is not None and limit is not None and uid not in tail:
        return _walk_into_tail(cur, graph, edges, tail, uid, key, max_depth, limit, offset)
    cur.execute(
        backward_sql(max_depth, graph.run_id),
        {**walk_params(graph, uid, max_depth), "key": key, "to": target, "limit": limit, "offset": offset},
    )
    return _walked(cur.fetchall(), run_id=graph.run_id)


def _walked(rows: Sequence[Mapping[str, Any]], run_id: str) -> tuple[list[_Row], list[_Row]]:
    """A walk query's rows: the contributions in page order, and the stranded keys."""
    # Sorted here too: UNION ALL keeps its branches' order only in practice.
    walked: list[_Row] = sorted(
        ((r["uid"], r["k"], r["path"], r["depth"], run_id) for r in rows if not r["stranded"]),
        key=lambda w: (w[3], w[0], w[1], w[2]),
    )
    stranded: list[_Row] = sorted(
        (r["uid"], r["k"], r["path"], r["depth"], run_id) for r in rows if r["stranded"]
    )
    return walked, stranded


def _identity_tail(graph: RunGraph, edges: Sequence[Edge], target: str) -> list[str] | None:
    """The chain of entities whose keys reach `target` unchanged, ending at it (`[head, ..., target]`).

    Each step up is the one morphism reading the entity, an identity into a model with no other driving
    upstream: every record of `target` on a backward walk then comes from a record of the head with the same key.
    None when nothing reads `target`, or when the head is a model some morphism of the run aggregates or
    filters into (its keys may come from an earlier run, which only the full walk notices).
    """
    chain = [target]
    while True:
        readers = [e for e in edges if e.upstream_unique_id == chain[0]]
        if not readers:
            if len(chain) == 1:
                return None
            break
        (reader, *others) = readers
        drivers = [e for e in edges if e.unique_id == reader.unique_id]
        if others or not reader.identity or len(drivers) != 1 or reader.unique_id in chain:
            break
        chain.insert(0, reader.unique_id)
    if chain[0] in graph.producer_models:
        return None
    return chain


# The first `n` upstream keys of each target key through one morphism, in key order (the backward index's).
def _sources_per_target(first: str | None = None) -> str:
    """The upstream keys of each target key (`keys`) through one morphism (`id`, of an upstream key `width` wide).

    With `first`, that many of each.
    """
    page = "" if first is None else f" order by u.source_key limit {first}"
    return f"""
select t.k as target_key, s.source_key
from unnest(%(keys)s::text[]) as t(k)
cross join lateral (
    select u.source_key from {_sources_of("%(run)s", "%(id)s", "t.k", "%(width)s", first=first)} u{page}
) s
"""


_SOURCES = _sources_per_target()
_FIRST_SOURCES = _sources_per_target(first="%(n)s")


def _walk_into_tail(
    cur: psycopg.Cursor[Any],
    graph: RunGraph,
    edges: Sequence[Edge],
    tail: list[str],
    uid: str,
    key: str,
    max_depth: int,
    limit: int,
    offset: int,
) -> tuple[list[_Row], list[_Row]]:
    """A page of the walk to the end of an identity tail, read in key order instead of walked in full.

    The walk stops at the models that read the tail's head; from each of their keys, only the first
    `offset + limit` upstream keys (in the backward index's order) can be on the page, and the tail copies them
    to its end unchanged. A mart key of 46,000 trades then costs a page of index entries, not 185,000 rows.
    """
    head, length = tail[0], len(tail) - 1
    above = [e for e in edges if e.upstream_unique_id != head]
    cur.execute(
        backward_sql(max_depth, graph.run_id),
        {**walk_params(graph, uid, max_depth, above), "key": key, "to": None, "limit": None, "offset": 0},
    )
    walked, stranded = _walked(cur.fetchall(), graph.run_id)
    reached = [(uid, key, [uid], 0), *((u, k, p, d) for u, k, p, d, _run in walked)]
    found: dict[tuple[str, tuple[str, ...]], int] = {}
    for e in (e for e in edges if e.upstream_unique_id == head):
        frontier = [(k, p, d) for u, k, p, d in reached if u == e.unique_id and d + 1 + length <= max_depth]
        if not frontier:
            continue
        if e.identity:
            pairs = [(k, k) for k, _p, _d in frontier]
        else:
            cur.execute(
                for_run(_FIRST_SOURCES, graph.run_id),
                {
                    "keys": sorted({k for k, _p, _d in frontier}),
                    "run": graph.run_id,
                    "id": e.morphism_id,
                    "width": e.width,
                    "n": offset + limit,
                },
            )
            pairs = [(r["target_key"], r["source_key"]) for r in cur.fetchall()]
        upstream: dict[str, list[str]] = {}
        for target_key, source_key in pairs:
            upstream.setdefault(target_key, []).append(source_key)
        for k, p, d in frontier:
            for source_key in upstream.get(k, []):
                found.setdefault((source_key, (*p, *tail)), d + 1 + length)
    ordered = sorted(
        ((tail[-1], k, list(p), d, graph.run_id) for (k, p), d in found.items()),
        key=lambda w: (w[3], w[0], w[1], w[2]),
    )
    return ordered[offset : offset + limit], stranded


def _walk_across_runs(
    cur: psycopg.Cursor[Any],
    graph: RunGraph,
    roles: frozenset[str] | None,
    uid: str,
    key: str,
    target: str | None,
    max_depth: int,
    names: dict[str, str],
) -> tuple[list[_Row], list[_Row]]:
    """Every contribution of a walk that crosses into earlier runs, ordered; and the keys no run explains."""
    rows, stranded = walk_run(cur, graph, uid, key, target, max_depth, None, 0)
    found = {(u, k, tuple(p)): (d, r) for u, k, p, d, r in rows}
    unresolved: list[_Row] = []
    for s_uid, s_key, s_path, s_depth, _run in stranded:
        earlier = _producing_run(cur, s_uid, s_key, graph.run_id)
        if earlier is None:
            unresolved.append((s_uid, s_key, s_path, s_depth, graph.run_id))
            continue
        before = load_graph(cur, earlier, roles)
        names.update(before.names)
        more, lost = _walk_across_runs(cur, before, roles, s_uid, s_key, target, max_depth - s_depth, names)
        for u, k, p, d, r in more:
            found.setdefault((u, k, (*s_path, *p[1:])), (s_depth + d, r))
        unresolved += [(u, k, [*s_path, *p[1:]], s_depth + d, r) for u, k, p, d, r in lost]
    ordered = sorted(
        ((u, k, list(p), d, r) for (u, k, p), (d, r) in found.items()), key=lambda x: (x[3], x[0], x[1], x[2])
    )
    return ordered, unresolved


def _producing_run(cur: psycopg.Cursor[Any], uid: str, key: str, later_than: str) -> str | None:
    """The latest full run before `later_than` (by epoch, then capture time) in which `key` of `uid` was produced."""
    width = "cardinality(o.source_key_fields)"
    produced = _sources_of("o.run_id", "o.morphism_id", "%(k)s", width, first="1", mapped=_ALL_MAPPED)
    cur.execute(
        "select o.run_id from cdme_adjoint.morphisms o join cdme_adjoint.runs r on r.run_id = o.run_id "
        "where o.unique_id = %(uid)s and r.lineage_mode = 'full' "
        "and (r.epoch, r.captured_at) < (select epoch, captured_at from cdme_adjoint.runs where run_id = %(run)s) "
        f"and (exists (select 1 from {produced} s) "
        f"or {_implied_has('o.keys_from', '%(k)s', 'o.run_id', across_runs=True)}) "
        "order by r.epoch desc, r.captured_at desc limit 1",
        {"uid": uid, "k": key, "run": later_than},
    )
    row = cur.fetchone()
    return None if row is None else str(row["run_id"])


# Whether a key of a model is in the run: produced by a morphism into it, or read by one out of it.
_CHECK_KEY = (
    "select exists (select 1 from unnest(%(ids)s::int[], %(widths)s::int[]) as i(id, width) "
    f"cross join lateral {_sources_of('%(run)s', 'i.id', '%(k)s', 'i.width', first='1')} s) "
    f"or exists (select 1 from unnest(%(ups)s::int[]) as u(id) join {_RUN_MAPPED} x on x.run_id = %(run)s "
    f"and {_keyed('x.source_key', '%(k)s', 'u.id')}) "
    # An implied identity (into the model or out of it) maps its own model's keys, read where it says.
    "or exists (select 1 from unnest(%(implied_of)s::int[]) as i(id) "
    "where i.id = any(%(ids)s::int[] || %(ups)s::int[]) "
    f"and {_implied_has(_IMPLIED_IDS.format('i.id'), '%(k)s', '%(run)s')}) "
    "as exists"
)


def _check_key(cur: psycopg.Cursor[Any], graph: RunGraph, edges: Sequence[Edge], uid: str, key: str) -> None:
    into = [e for e in edges if e.unique_id == uid]
    ups = [e.morphism_id for e in edges if e.upstream_unique_id == uid]
    cur.execute(
        for_run(_CHECK_KEY, graph.run_id),
        {
            **_implied_params(edges),
            "run": graph.run_id,
            "ids": [e.morphism_id for e in into],
            "widths": [e.width for e in into],
            "ups": ups,
            "k": key,
        },
    )
    row = cur.fetchone()
    if not row or not row["exists"]:
        msg = f"key {key!r} of {graph.names[uid]} is not in the adjoint metadata of run {graph.run_id}"
        raise NotFoundError(msg)


def _raw(text: str) -> sql.SQL:
    """Recorded SQL inside a query that also has bind parameters: its literal `%` must not read as one."""
    return sql.SQL(text.replace("%", "%%"))


def _relation_sql(relation: str) -> sql.Composed:
    parts = relation.split(".")
    return sql.SQL("{}.{}").format(sql.Identifier(parts[-2]), sql.Identifier(parts[-1]))


def _attach_records(cur: psycopg.Cursor[Any], graph: RunGraph, contributions: list[dict[str, Any]]) -> None:
    """Each contribution's row as it is now in the warehouse; a source's, of its run's epoch only.

    A source that holds several epochs can hold a key in each: the run read the one of its epoch. A contribution
    found in an earlier run (`_walk_across_runs`) is of that run's epoch.
    """
    where: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
    for e in graph.edges:
        where.setdefault(e.unique_id, (e.relation, e.target_key_fields, None))
        where.setdefault(
            e.upstream_unique_id, (e.upstream_relation, e.source_key_fields, e.upstream_epoch_column)
        )
    epochs = {graph.run_id: graph.epoch}
    earlier = sorted({c["run_id"] for c in contributions} - epochs.keys())
    if earlier:
        cur.execute(
            "select run_id, epoch::text as epoch from cdme_adjoint.runs where run_id = any(%s)", (earlier,)
        )
        epochs.update((r["run_id"], r["epoch"]) for r in cur.fetchall())
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    for c in contributions:
        epoch = epochs[c["run_id"]] if where[c["unique_id"]][2] is not None else None
        groups.setdefault((c["unique_id"], epoch), []).append(c)
    for (uid, epoch), items in groups.items():
        relation, fields, epoch_column = where[uid]
        key = _raw(key_sql_text(fields, "r"))
        in_epoch = (
            sql.SQL("true")
            if epoch_column is None
            else sql.SQL("r.{} = %(epoch)s::date").format(sql.Identifier(epoch_column))
        )
        cur.execute(
            sql.SQL("select {} as k, to_jsonb(r) as record from {} r where {} = any(%(keys)s) and {}").format(
                key, _relation_sql(relation), key, in_epoch
            ),
            {"keys": [c["key"] for c in items], "epoch": epoch},
        )
        found: dict[str, Any] = {}
        for r in cur.fetchall():
            found.setdefault(r["k"], r["record"])
        for c in items:
            c["record"] = found.get(c["key"])


def _set_encoding_session(cur: psycopg.Cursor[Any]) -> None:
    for name, value in ENCODING_SESSION:
        # For this transaction only: the pooled connection goes back to the next request as it came.
        cur.execute("select set_config(%s, %s, true)", (name, value))


def _verify_envelopes(cur: psycopg.Cursor[Any], edge: Edge) -> None:
    recorded = edge.envelopes or {}
    for label, keys_sql in (("input", edge.input_sql), ("output", edge.output_sql)):
        expected = recorded.get(label)
        if expected is None:
            continue
        actual = envelope_of(cur, keys_sql)
        if actual != expected:
            where = edge.upstream if label == "input" else edge.model
            msg = (
                f"not reconstructable: {where} changed since the run was captured (checkpoint digest "
                f"{expected['digest']}, now {actual['digest']}); capture runs in full mode to keep their lineage"
            )
            raise NotReconstructableError(msg)
    expected = recorded.get("pairs")
    if expected is not None:
        # Captures of c7ab4e7 to 0d422dc checkpointed the distinct pairs, which the stored SQL selects.
        actual = pairs_checkpoint(cur, expected.get("rows", edge.mapped_sql))
        if (actual["count"], actual["digest"]) != (expected["count"], expected["digest"]):
            msg = (
                f"not reconstructable: the pairs {edge.model}'s SQL derives from {edge.upstream} changed since the "
                f"run was captured (checkpoint digest {expected['digest']}, now {actual['digest']}): a column or "
                "a lookup it reads changed; capture runs in full mode to keep their lineage"
            )
            raise NotReconstructableError(msg)


def _backward_derived(
    cur: psycopg.Cursor[Any],
    graph: RunGraph,
    edges: Sequence[Edge],
    uid: str,
    key: str,
    target: str | None,
    max_depth: int,
) -> tuple[list[tuple[str, str, list[str], int]], list[tuple[str, str, list[str], int]]]:
    _set_encoding_session(cur)
    # Planned for the keys at hand: a generic plan (`SESSION`) keeps the key list a parameter, and PostgreSQL
    # hashes only a constant list. Each row of a relation then searched the 46,000 keys of a mart key one by one:
    # 10 s a step instead of a fraction of one.
    cur.execute("select set_config('plan_cache_mode', 'force_custom_plan', true)")
    frontier: dict[tuple[str, str], list[str]] = {(uid, key): [uid]}
    out: list[tuple[str, str, list[str], int]] = []
    stranded: list[tuple[str, str, list[str], int]] = []
    verified: set[int] = set()
    # Visible producers only: a key a hidden morphism produced stops here, as the SQL walk's would.
    producers = {e.unique_id for e in edges}
    for level in range(1, max_depth + 1):
        step: dict[tuple[str, str], list[str]] = {}
        reached: set[tuple[str, str]] = set()
        for e in edges:
            keys = [k for (u, k) in frontier if u == e.unique_id]
            if not keys:
                continue
            if e.lineage_mode == "full":
                # Stored by the run, as its SQL need not give them again (`capture.downgraded`).
                cur.execute(
                    for_run(_SOURCES, graph.run_id),
                    {
                        "keys": keys,
                        "run": graph.run_id,
                        "id": e.morphism_id,
                        "width": e.width,
                    },
                )
            else:
                if e.morphism_id not in verified:
                    _verify_envelopes(cur, e)
                    verified.add(e.morphism_id)
                cur.execute(
                    sql.SQL(
                        "select distinct source_key, target_key from ({}) d where target_key = any(%(keys)s)"
                    ).format(_raw(e.mapped_sql)),
                    {"keys": keys},
                )
            for r in cur.fetchall():
                path = [*frontier[(e.unique_id, r["target_key"])], e.upstream_unique_id]
                step.setdefault((e.upstream_unique_id, r["source_key"]), path)
                reached.add((e.unique_id, r["target_key"]))
        stranded += [
            (u, k, p, level - 1)
            for (u, k), p in frontier.items()
            if u in producers and (u, k) not in reached and level > 1
        ]
        if not step:
            if level == 1:
                msg = f"key {key!r} of {graph.names[uid]} has no contributing records in run {graph.run_id}"
                raise NotFoundError(msg)
            break
        out.extend((u, k, p, level) for (u, k), p in step.items() if target is None or u == target)
        frontier = step
    return sorted(out, key=lambda r: (r[3], r[0], r[1], r[2])), sorted(stranded)


def impact(
    engine: Engine,
    entity: str,
    keys: Iterable[str],
    *,
    roles: frozenset[str] | None,
    run_id: str | None = None,
    depth: int | None = None,
    sample: int = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """Every downstream record the given keys of `entity` affect, per model and path.

    Returns:
        `{run_id, entity, keys, affected: [{model, unique_id, path, count, keys}]}`: `count` is exact, `keys`
        the first `sample` affected keys of that path in key order.

    Raises:
        NotFoundError: The run or the entity is unknown (or not visible).
        UsageError: No keys, or a bound is invalid.
    """
    keys = list(dict.fromkeys(keys))
    if not keys:
        msg = "keys: give at least one key"
        raise UsageError(msg)
    max_depth = _bounds(depth, DEFAULT_LIMIT)
    with _connection(engine) as conn, _driver(conn).cursor(row_factory=dict_row) as cur:
        graph = load_graph(cur, run_id or latest_run(cur, entity), roles)
        if graph.lineage_mode == "key_derivable":
            msg = (
                f"run {graph.run_id} was captured key_derivable: impact needs stored pairs (full or summary)"
            )
            raise UsageError(msg)
        uid = graph.uid_of(entity)
        cur.execute(
            for_run(_IMPACT, graph.run_id),
            {
                **edge_params(graph.visible_edges()),
                "uid": uid,
                "keys": keys,
                "run": graph.run_id,
                "depth": max_depth,
                "sample": sample,
            },
        )
        affected = [
            {
                "model": graph.names[r["uid"]],
                "unique_id": r["uid"],
                "path": [graph.names[p] for p in r["path"]],
                "count": r["n"],
                "keys": r["keys"],
            }
            for r in cur.fetchall()
        ]
    return {
        "run_id": graph.run_id,
        "entity": graph.names[uid],
        "keys": len(keys),
        "key_encoding": KEY_ENCODING,
        "affected": affected,
    }


# -- reconcile ----------------------------------------------------------------------------------------------------


# The keys that break iso-ness, per morphism: a source key mapped to several targets, or one of the source keys
# that share a target. All the run's isos in two scans of its partition: the indexes lead with a key's hash, not
# the morphism.
_ISO = """
select morphism_id, k from (
    select morphism_id, k, row_number() over (partition by morphism_id order by k) as n from (
        select morphism_id, source_key as k from {mapped} where run_id = %(run)s and morphism_id = any(%(ms)s)
        group by morphism_id, source_key having count(*) > 1
      union
        select morphism_id, min(source_key) from {mapped} where run_id = %(run)s and morphism_id = any(%(ms)s)
        group by morphism_id, target_key having count(*) > 1
    ) bad
) b where n <= %(n)s order by morphism_id, k
"""


def reconcile(engine: Engine, run_id: str, roles: frozenset[str] | None = None) -> dict[str, Any]:
    """Reconcile a run per morphism: `exact`, `superset` or `violation`, with sample keys.

    Only the morphisms `partitions` shows a principal with `roles` are reconciled for it.

    `exact`: an iso whose backward(forward(x)) = x for every key; `superset`: lossy but every input key has
    exactly one partition; `violation`: keys missing, keys in two partitions, or an iso that is not one.

    Raises:
        NotFoundError: The run was never captured.
    """
    report = partitions(engine, run_id, roles)
    results = []
    not_iso: dict[int, list[str]] = {}
    with _connection(engine) as conn, _driver(conn).cursor(row_factory=dict_row) as cur:
        isos = [m["morphism_id"] for m in report["morphisms"] if m["kind"] == "iso"]
        if report["lineage_mode"] == "full" and isos:
            cur.execute(for_run(_ISO, report["run_id"]), {"run": report["run_id"], "ms": isos, "n": SAMPLES})
            for r in cur.fetchall():
                not_iso.setdefault(r["morphism_id"], []).append(r["k"])
        for m in report["morphisms"]:
            problems: list[str] = []
            samples: list[str] = []
            if m["unaccounted"]["count"]:
                problems.append(f"{m['unaccounted']['count']} input keys are in no partition")
                samples += m["unaccounted"]["samples"]
            if m["overlap"]["count"]:
                problems.append(f"{m['overlap']['count']} keys are in two partitions")
                samples += m["overlap"]["samples"]
            status = "superset"
            if m["kind"] == "iso":
                bad = not_iso.get(m["morphism_id"], [])
                if bad:
                    problems.append("iso: backward(forward(x)) != x (a key maps to several or shares one)")
                    samples += bad
                lost = m["filtered"] + m["errored"]
                if lost:
                    problems.append(f"iso: {lost} keys filtered or errored, so forward is not total")
                status = "exact"
            if problems:
                status = "violation"
            results.append(
                {
                    "model": m["model"],
                    "unique_id": m["unique_id"],
                    "upstream": m["upstream"],
                    "kind": m["kind"],
                    "status": status,
                    "problems": problems,
                    "samples": samples[:SAMPLES],
                    "input": m["input"],
                    "mapped": m["mapped"],
                    "filtered": m["filtered"],
                    "errored": m["errored"],
                }
            )
    statuses = {r["status"] for r in results}
    return {
        "run_id": report["run_id"],
        "lineage_mode": report["lineage_mode"],
        "status": "violation" if "violation" in statuses else "reconciled",
        "morphisms": results,
    }
