"""Property tests: on generated small datasets, per morphism kind, capture and queries equal a Python oracle.

Each example materialises its tables and models in schema `p` of one database, captures them through the
same derivation and capture code the service runs, then compares partitions, backward and impact with sets
computed independently in Python from the generated rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from unittest.mock import patch

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from services.adjoint.domain import capture as capture_module
from services.adjoint.domain import queries
from services.adjoint.domain.capture import CapturePlan, Morphism, capture, relation_of
from services.adjoint.domain.derive import Derivation, derive
from services.adjoint.domain.errors import DerivationError, NotReconstructableError
from services.adjoint.domain.keys import encode_key
from services.core.errors import NotFoundError
from services.core.ldm import Entity, Lookup, RecordKey
from services.core.ldm.config import LineageMode
from services.core.migrations import migrate
from services.core.warehouse import create_warehouse_engine

pytestmark = pytest.mark.integration

EXAMPLES = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Db:
    url: str
    engine: Engine

    def execute(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def db(new_database: Callable[[], str]) -> Iterator[Db]:
    url = new_database()
    engine = create_warehouse_engine(url)
    migrate(engine, "adjoint")
    yield Db(url, engine)
    engine.dispose()


def _entity(
    name: str,
    key: Sequence[str],
    *,
    source: bool = False,
    access: Sequence[str] = (),
    lookups: Sequence[Lookup] = (),
) -> Entity:
    return Entity(
        unique_id=f"{'source' if source else 'model'}.props.{name}",
        name=name,
        resource_type="source" if source else "model",
        database=None,
        schema_name="p",
        identifier=name,
        key=RecordKey(columns=tuple(key), source="declared", verified=True),
        lineage_mode="full",
        access=tuple(access),
        lookups=tuple(lookups),
    )


@dataclass
class Model:
    name: str
    sql: str
    key: Sequence[str]
    kind: str
    upstreams: Sequence[Entity]
    sink: Entity | None = None
    lookups: Sequence[Lookup] = ()


def _load(db: Db, tables: dict[str, tuple[str, list[tuple[Any, ...]]]]) -> None:
    for name, (ddl, rows) in tables.items():
        db.execute(f"create table p.{name} ({ddl})")
        if rows:
            width = len(rows[0])
            with psycopg.connect(db.url, autocommit=True) as conn, conn.cursor() as cur:
                cur.executemany(f"insert into p.{name} values ({', '.join(['%s'] * width)})", rows)


def _run(db: Db, tables: dict[str, tuple[str, list[tuple[Any, ...]]]], models: Sequence[Model]) -> str:
    """Create `tables` (DDL, rows) and build `models` in order in schema p; capture them as one run."""
    morphisms = _build(db, tables, models)
    run_id = str(uuid.uuid4())
    capture(db.engine, run_id, date(2026, 11, 20), "full", CapturePlan(morphisms, []))
    # Key-derivable capture accounts by digests where they balance and by key sets where they do not: either
    # way its accounting must be the full capture's, which the tests compare with the oracle.
    derived = str(uuid.uuid4())
    capture(db.engine, derived, date(2026, 11, 20), "key_derivable", CapturePlan(morphisms, []))
    assert _accounting(db, derived) == _accounting(db, run_id)
    # Its checkpoints too: the digests' per-target tallies of rows are those of the key sets' distinct pairs.
    checked = str(uuid.uuid4())
    with patch.object(capture_module._Capture, "accounted", return_value=False):
        capture(db.engine, checked, date(2026, 11, 20), "key_derivable", CapturePlan(morphisms, []))
    assert _checkpoints(db, checked) == _checkpoints(db, derived)
    # And digests (tried first in every mode) must never say what the key sets would not.
    exact = str(uuid.uuid4())
    with patch.object(capture_module._Capture, "accounted", return_value=False):
        capture(db.engine, exact, date(2026, 11, 20), "full", CapturePlan(morphisms, []))
    assert _accounting(db, exact) == _accounting(db, run_id)
    # The pairs the loaders stored before the fallback are gone: none twice. The exact path implies no pairs.
    stored = "select count(*) from cdme_adjoint.mapped where run_id = %s"
    implied = "select coalesce(sum(pairs), 0) from cdme_adjoint.morphisms where run_id = %s and keys_from is not null"
    assert db.execute(implied, (exact,)) == [(0,)]
    assert (
        db.execute(stored, (exact,))[0][0]
        == db.execute(stored, (run_id,))[0][0] + db.execute(implied, (run_id,))[0][0]
    )
    return run_id


def _build(
    db: Db, tables: dict[str, tuple[str, list[tuple[Any, ...]]]], models: Sequence[Model]
) -> list[Morphism]:
    """Create `tables` (DDL, rows) and build `models` in order in schema p; their morphisms."""
    db.execute("drop schema if exists p cascade; create schema p")
    _load(db, tables)
    morphisms: list[Morphism] = []
    for model in models:
        db.execute(f"create table p.{model.name} as {model.sql}")
        entity = _entity(model.name, model.key, lookups=model.lookups)
        for upstream in model.upstreams:
            assert upstream.key is not None
            derivation = derive(
                model.sql,
                model.name,
                relation_of(upstream),
                upstream.key.columns,
                model.key,
                relation_of(entity),
            )
            morphisms.append(
                Morphism(len(morphisms) + 1, entity, upstream, model.kind, derivation, model.sink)
            )
    return morphisms


def _accounting(db: Db, run_id: str) -> dict[str, Any]:
    answer = queries.partitions(db.engine, run_id)
    filtered = db.execute(
        "select morphism_id, source_key, condition_index from cdme_adjoint.filtered where run_id = %s",
        (run_id,),
    )
    errored = db.execute(
        "select morphism_id, source_key, failure_type from cdme_adjoint.errored where run_id = %s", (run_id,)
    )
    return {
        "morphisms": [
            {k: v for k, v in m.items() if k not in ("locations", "keys_from", "lineage_mode")}
            for m in answer["morphisms"]
        ],
        "sources": answer["sources"],
        "filtered": sorted(filtered),
        "errored": sorted(errored, key=repr),
    }


def _pairs(db: Db, run_id: str, model: str) -> set[tuple[str, str]]:
    """The pairs into `model` the run holds: stored, or implied (`keys_from`) as the input keys of its readers."""
    rows = db.execute(
        "select source_key, target_key from cdme_adjoint.mapped m join cdme_adjoint.morphisms o "
        "using (run_id, morphism_id) where run_id = %s and o.model = %s",
        (run_id, model),
    )
    implied = db.execute(
        "select k, k from cdme_adjoint.morphisms o cross join unnest(o.keys_from) as v(id) cross join lateral ("
        "select source_key from cdme_adjoint.mapped where run_id = o.run_id and morphism_id = v.id union "
        "select source_key from cdme_adjoint.filtered where run_id = o.run_id and morphism_id = v.id union "
        "select source_key from cdme_adjoint.errored where run_id = o.run_id and morphism_id = v.id) as i(k) "
        "where o.run_id = %s and o.model = %s",
        (run_id, model),
    )
    return {(r[0], r[1]) for r in [*rows, *implied]}


def _filtered(db: Db, run_id: str, model: str) -> dict[str, int]:
    rows = db.execute(
        "select source_key, condition_index from cdme_adjoint.filtered f join cdme_adjoint.morphisms o "
        "using (run_id, morphism_id) where run_id = %s and o.model = %s",
        (run_id, model),
    )
    return {r[0]: r[1] for r in rows}


def _checkpoints(db: Db, run_id: str) -> dict[tuple[str, str], Any]:
    """The checkpoints a key_derivable run recorded, per morphism (model and upstream)."""
    rows = db.execute(
        "select model, upstream, envelopes from cdme_adjoint.morphisms where run_id = %s", (run_id,)
    )
    return {(r[0], r[1]): r[2] for r in rows}


def _morphism(db: Db, run_id: str, model: str) -> dict[str, Any]:
    return next(m for m in queries.partitions(db.engine, run_id)["morphisms"] if m["model"] == model)


def _backward(db: Db, run_id: str, model: str, key: str, to: str | None = None) -> set[tuple[str, str]]:
    answer = queries.backward(db.engine, model, key, roles=None, run_id=run_id, to=to, limit=10_000)
    assert answer["next"] is None
    return {(c["entity"], c["key"]) for c in answer["contributions"]}


def _capture_key_derivable(db: Db, morphisms: list[Morphism]) -> tuple[str, dict[str, str]]:
    """Capture `morphisms` as a key_derivable run on 2026-11-20: its id, and the lineage mode of each model."""
    run_id = str(uuid.uuid4())
    capture(db.engine, run_id, date(2026, 11, 20), "key_derivable", CapturePlan(morphisms, []))
    report = queries.partitions(db.engine, run_id)
    return run_id, {m["model"]: m["lineage_mode"] for m in report["morphisms"]}


def _capture_iso(db: Db, mode: LineageMode, model: Entity, src: Entity, derivation: Derivation) -> str:
    """Capture a run of the one iso morphism `src` -> `model` on 2026-11-20; its run id."""
    run_id = str(uuid.uuid4())
    capture(
        db.engine,
        run_id,
        date(2026, 11, 20),
        mode,
        CapturePlan([Morphism(1, model, src, "iso", derivation, None)], []),
    )
    return run_id


def _k(*parts: Any) -> str:
    return encode_key([None if p is None else str(p) for p in parts])


codes = st.text(alphabet="ab|%7C", min_size=1, max_size=4)
values = st.integers(min_value=-5, max_value=20)


@EXAMPLES
@given(rows=st.dictionaries(st.tuples(codes, st.integers(0, 3)), values, min_size=1, max_size=12))
def test_iso_with_a_composite_key_is_its_own_inverse(db: Db, rows: dict[tuple[str, int], int]) -> None:
    src = _entity("src", ["code", "n"], source=True)
    data = [(c, n, v) for (c, n), v in rows.items()]
    model = Model("iso_m", "select code, n, v * 2 as w from p.src", ["code", "n"], "iso", [src])
    run_id = _run(db, {"src": ("code text, n int, v int", data)}, [model])
    expected = {(_k(c, n), _k(c, n)) for c, n, _ in data}
    assert _pairs(db, run_id, "iso_m") == expected
    m = _morphism(db, run_id, "iso_m")
    assert (m["input"], m["mapped"], m["filtered"], m["errored"], m["unaccounted"]["count"]) == (
        len(data),
        len(data),
        0,
        0,
        0,
    )
    status = {r["model"]: r["status"] for r in queries.reconcile(db.engine, run_id)["morphisms"]}
    assert status == {"iso_m": "exact"}
    for c, n, _ in data[:3]:
        assert _backward(db, run_id, "iso_m", _k(c, n)) == {("src", _k(c, n))}


def test_a_declared_iso_that_merges_keys_is_a_violation_naming_them(db: Db) -> None:
    src = _entity("src", ["id"], source=True)
    # Trades 2 and 3 both become record 1, so backward(forward(2)) holds 3 as well.
    model = Model("half", "select id / 2 as g, v from p.src", ["g"], "iso", [src])
    run_id = _run(db, {"src": ("id int, v int", [(1, 0), (2, 0), (3, 0), (4, 0)])}, [model])
    assert _pairs(db, run_id, "half") == {(_k(1), _k(0)), (_k(2), _k(1)), (_k(3), _k(1)), (_k(4), _k(2))}
    (result,) = queries.reconcile(db.engine, run_id)["morphisms"]
    assert result["status"] == "violation"
    assert result["samples"] == [_k(2)]


@EXAMPLES
@given(rows=st.dictionaries(st.integers(1, 60), st.one_of(st.none(), values), min_size=1, max_size=15))
def test_filter_partitions_every_key_into_mapped_or_filtered(db: Db, rows: dict[int, int | None]) -> None:
    src = _entity("src", ["id"], source=True)
    model = Model("flt", "select id, v from p.src where v > 10", ["id"], "filter", [src])
    run_id = _run(db, {"src": ("id int, v int", list(rows.items()))}, [model])
    kept = {i for i, v in rows.items() if v is not None and v > 10}
    assert _pairs(db, run_id, "flt") == {(_k(i), _k(i)) for i in kept}
    assert _filtered(db, run_id, "flt") == {_k(i): 0 for i in rows if i not in kept}
    m = _morphism(db, run_id, "flt")
    assert m["filters"][0]["condition"] == "v > 10" and m["unaccounted"]["count"] == 0


@EXAMPLES
@given(rows=st.dictionaries(st.integers(1, 60), st.one_of(st.none(), values), min_size=1, max_size=15))
def test_a_source_two_filters_read_has_each_key_reach_an_output_through_either(
    db: Db, rows: dict[int, int | None]
) -> None:
    # Both morphisms balance by digests, but no count says which keys one filter drops and the other keeps: the
    # end-to-end fates follow the pairs the capture stored (or, in key_derivable, gathered).
    src = _entity("src", ["id"], source=True)
    high = Model("high", "select id, v from p.src where v > 10", ["id"], "filter", [src])
    low = Model("low", "select id, v from p.src where v < 5", ["id"], "filter", [src])
    run_id = _run(db, {"src": ("id int, v int", list(rows.items()))}, [high, low])
    reached = sum(1 for v in rows.values() if v is not None and (v > 10 or v < 5))
    (source,) = queries.partitions(db.engine, run_id)["sources"]
    assert source["fates"] == {
        "reached_output": reached,
        "filtered": len(rows) - reached,
        "errored": 0,
        "unaccounted": 0,
    }


@EXAMPLES
@given(
    trades=st.dictionaries(st.integers(1, 60), st.integers(0, 6), min_size=1, max_size=15),
    lookup=st.sets(st.integers(0, 6), max_size=6),
    inner=st.booleans(),
)
def test_enrich_routes_failures_to_the_sink_and_a_silent_drop_stays_unaccounted(
    db: Db, trades: dict[int, int], lookup: set[int], inner: bool
) -> None:
    src = _entity("src", ["id"], source=True)
    join = "inner join" if inner else "left join"
    checked = (
        f"with c as (select s.id, s.g, l.label, case when l.g is null then 'MISSING' end as failure "
        f"from p.src s {join} p.lk l on l.g = s.g)"
    )
    sink = Model(
        "err",
        f"{checked} select failure as failure_type, jsonb_build_object('g', g) as offending_values, "
        "'src' as source_entity, id::text as source_key, date '2026-11-20' as source_epoch, "
        "array['src', 'enr'] as morphism_path from c where failure is not null",
        ["source_entity", "source_key"],
        "filter",
        [],
    )
    sink_entity = _entity("err", ["source_entity", "source_key"])
    enrich = Model(
        "enr",
        f"{checked} select id, label from c where failure is null",
        ["id"],
        "enrich",
        [src],
        sink_entity,
    )
    run_id = _run(
        db,
        {
            "src": ("id int, g int", list(trades.items())),
            "lk": ("g int, label text", [(g, f"L{g}") for g in lookup]),
        },
        [sink, enrich],
    )
    matched = {i for i, g in trades.items() if g in lookup}
    assert _pairs(db, run_id, "enr") == {(_k(i), _k(i)) for i in matched}
    m = _morphism(db, run_id, "enr")
    lost = len(trades) - len(matched)
    assert m["filtered"] == 0
    if inner:
        assert (m["errored"], m["unaccounted"]["count"]) == (0, lost)
        assert set(m["unaccounted"]["samples"]) <= {_k(i) for i in trades if i not in matched}
    else:
        assert (m["errored"], m["unaccounted"]["count"]) == (lost, 0)
    status = {r["model"]: r["status"] for r in queries.reconcile(db.engine, run_id)["morphisms"]}
    assert status["enr"] == ("violation" if inner and lost else "superset")


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(1, 8), st.integers(-2, 2)), min_size=1, max_size=16))
def test_an_upstream_with_repeated_keys_is_accounted_by_key_sets(db: Db, rows: list[tuple[int, int]]) -> None:
    # No uniqueness test vouches for src's key, and it repeats: a key whose rows pass and fail the WHERE is
    # mapped, not filtered, and counts once. (`_run` checks digests against key sets on every example.)
    src = _entity("src", ["id"], source=True)
    model = Model("kept", "select id, v from p.src where v > 0", ["id"], "filter", [src])
    run_id = _run(db, {"src": ("id int, v int", rows)}, [model])
    passing = {i for i, v in rows if v > 0}
    morphism = _morphism(db, run_id, "kept")
    assert (morphism["input"], morphism["mapped"]) == (len({i for i, _v in rows}), len(passing))
    assert _filtered(db, run_id, "kept") == {_k(i): 0 for i, _v in rows if i not in passing}


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=20))
def test_a_distinct_inside_a_cte_loses_the_rows_it_merges(db: Db, rows: list[tuple[int, int]]) -> None:
    src = _entity("src", ["id"], source=True)
    data = [(i, g, v) for i, (g, v) in enumerate(rows, start=1)]
    model = Model(
        "fold",
        "with legs as (select distinct g, v from p.src) select g, sum(v) as total, count(*) as n from legs group by g",
        ["g"],
        "aggregate",
        [src],
    )
    run_id = _run(db, {"src": ("id int, g int, v int", data)}, [model])
    # Rows equal in (g, v) merge into one: the least id stays, the others reach no output and no partition.
    kept: dict[tuple[int, int], int] = {}
    for i, g, v in data:
        kept.setdefault((g, v), i)
    merged = {i for i, g, v in data if kept[(g, v)] != i}
    assert _pairs(db, run_id, "fold") == {(_k(i), _k(g)) for (g, _v), i in kept.items()}
    morphism = _morphism(db, run_id, "fold")
    assert morphism["unaccounted"]["count"] == len(merged)
    assert morphism["unaccounted"]["samples"] == sorted(_k(i) for i in merged)[:10]


@EXAMPLES
@given(
    today=st.sets(st.integers(1, 60), min_size=1, max_size=15),
    earlier=st.sets(st.integers(1, 60), max_size=15),
    mode=st.sampled_from(["full", "key_derivable"]),
)
def test_an_incremental_identity_model_accounts_only_this_runs_rows(
    db: Db, today: set[int], earlier: set[int], mode: LineageMode
) -> None:
    # The model's table also holds an earlier epoch's rows (as an incremental model's does): they are not this
    # run's output, and must not count as mapped, nor unbalance the run.
    db.execute("drop schema if exists p cascade; create schema p")
    rows = [(i, "2026-11-20") for i in sorted(today)] + [(i, "2026-11-19") for i in sorted(earlier)]
    _load(db, {"src": ("id int, epoch_date date", rows)})
    sql = "select id, epoch_date from p.src where epoch_date = date '2026-11-20'"
    db.execute("create table p.inc (id int, epoch_date date)")
    db.execute("insert into p.inc select id, epoch_date from p.src")
    src = Entity(
        **{**_entity("src", ["id", "epoch_date"], source=True).model_dump(), "epoch_column": "epoch_date"}
    )
    model = Entity(**{**_entity("inc", ["id", "epoch_date"]).model_dump(), "materialized": "incremental"})
    derivation = derive(
        sql, "inc", relation_of(src), ["id", "epoch_date"], ["id", "epoch_date"], relation_of(model)
    )
    run_id = _capture_iso(db, mode, model, src, derivation)
    morphism = _morphism(db, run_id, "inc")
    assert (morphism["input"], morphism["mapped"], morphism["output"]) == (len(today),) * 3
    assert morphism["unaccounted"]["count"] == morphism["overlap"]["count"] == 0
    (source,) = queries.partitions(db.engine, run_id)["sources"]
    assert source["fates"] == {"reached_output": len(today), "filtered": 0, "errored": 0, "unaccounted": 0}


@pytest.mark.parametrize("mode", ["full", "key_derivable"])
def test_a_sources_records_are_those_of_the_runs_epoch(db: Db, mode: LineageMode) -> None:
    # The source holds two epochs, and a key in both: the run read, and records return, its epoch's row only.
    db.execute("drop schema if exists p cascade; create schema p")
    rows = [(1, 10, "2026-11-19"), (2, 20, "2026-11-19"), (1, 11, "2026-11-20"), (3, 31, "2026-11-20")]
    _load(db, {"src": ("id int, amount int, epoch_date date", rows)})
    sql = "select id, amount from p.src where epoch_date = date '2026-11-20'"
    db.execute(f"create table p.m as {sql}")
    src = Entity(**{**_entity("src", ["id"], source=True).model_dump(), "epoch_column": "epoch_date"})
    model = _entity("m", ["id"])
    derivation = derive(sql, "m", relation_of(src), ["id"], ["id"], relation_of(model))
    run_id = _capture_iso(db, mode, model, src, derivation)
    for key, amount in ((_k(1), 11), (_k(3), 31)):
        (contribution,) = queries.backward(db.engine, "m", key, roles=None, run_id=run_id, records=True)[
            "contributions"
        ]
        assert contribution["record"] == {"id": int(key), "amount": amount, "epoch_date": "2026-11-20"}
    # A key only an earlier epoch holds was not this run's.
    with pytest.raises(NotFoundError):
        queries.backward(db.engine, "m", _k(2), roles=None, run_id=run_id, records=True)


@EXAMPLES
@given(
    trades=st.dictionaries(st.integers(1, 60), st.sampled_from(["EUR", "USD", "SEK", "NOK"]), min_size=1),
    factors=st.dictionaries(st.sampled_from(["EUR", "USD", "SEK"]), st.sets(st.integers(1, 3), min_size=1)),
    declared=st.booleans(),
)
def test_an_inner_join_declared_as_a_filter_filters_the_unmatched_and_an_undeclared_one_loses_them(
    db: Db, trades: dict[int, str], factors: dict[str, set[int]], declared: bool
) -> None:
    src = _entity("src", ["id"], source=True)
    rf = [(f"{ccy}-{n}", ccy) for ccy, ns in factors.items() for n in ns]
    sql = "select t.id, f.factor_id from p.src as t inner join p.rf as f on f.ccy = t.ccy where t.id % 7 <> 0"
    entity_key = ["id", "factor_id"]
    tables: dict[str, tuple[str, list[tuple[Any, ...]]]] = {
        "src": ("id int, ccy text", sorted(trades.items())),
        "rf": ("factor_id text, ccy text", list(rf)),
    }
    db.execute("drop schema if exists p cascade; create schema p")
    _load(db, tables)
    db.execute(f"create table p.sens as {sql}")
    derivation = derive(
        sql,
        "sens",
        relation_of(src),
        ["id"],
        entity_key,
        relation_of(_entity("sens", entity_key)),
        filter_joins=["f"] if declared else (),
    )
    plan = CapturePlan([Morphism(1, _entity("sens", entity_key), src, "explode", derivation, None)], [])
    run_id = str(uuid.uuid4())
    capture(db.engine, run_id, date(2026, 11, 20), "full", plan)
    # SQL joins before it filters: an unmatched row never meets the WHERE.
    unmatched = {i for i, ccy in trades.items() if ccy not in factors}
    assert _filtered(db, run_id, "sens") == {
        **{_k(i): 0 for i in unmatched if declared},
        **{_k(i): 1 if declared else 0 for i in trades if i % 7 == 0 and i not in unmatched},
    }
    morphism = _morphism(db, run_id, "sens")
    assert morphism["unaccounted"]["count"] == (0 if declared else len(unmatched))
    if declared:
        assert morphism["filters"][0]["condition"] == "join f on f.ccy = t.ccy"
    with pytest.raises(DerivationError, match="'g' names no join"):
        derive(sql, "sens", relation_of(src), ["id"], entity_key, filter_joins=["g"])


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(0, 4), values), min_size=1, max_size=20))
def test_aggregate_with_where_and_having_maps_members_of_surviving_groups(
    db: Db, rows: list[tuple[int, int]]
) -> None:
    src = _entity("src", ["id"], source=True)
    data = [(i, g, v) for i, (g, v) in enumerate(rows, start=1)]
    model = Model(
        "agg",
        "select g, sum(v) as total, count(*) as n from p.src where v >= 0 group by g having sum(v) > 10",
        ["g"],
        "aggregate",
        [src],
    )
    run_id = _run(db, {"src": ("id int, g int, v int", data)}, [model])
    sums: dict[int, int] = {}
    for _, g, v in data:
        if v >= 0:
            sums[g] = sums.get(g, 0) + v
    kept = {g for g, total in sums.items() if total > 10}
    assert _pairs(db, run_id, "agg") == {(_k(i), _k(g)) for i, g, v in data if v >= 0 and g in kept}
    assert _filtered(db, run_id, "agg") == {
        _k(i): (0 if v < 0 else 1) for i, g, v in data if v < 0 or g not in kept
    }
    for g in kept:
        assert _backward(db, run_id, "agg", _k(g)) == {
            ("src", _k(i)) for i, gg, v in data if gg == g and v >= 0
        }


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(0, 4), values), min_size=1, max_size=20))
def test_having_inside_a_cte_filters_the_members_of_the_groups_it_drops(
    db: Db, rows: list[tuple[int, int]]
) -> None:
    src = _entity("src", ["id"], source=True)
    data = [(i, g, v) for i, (g, v) in enumerate(rows, start=1)]
    model = Model(
        "agg_cte",
        "with folded as (select g, sum(v) as total from p.src where v >= 0 group by g having count(*) > 1) "
        "select g, total * 2 as doubled from folded where total < 1000",
        ["g"],
        "aggregate",
        [src],
    )
    run_id = _run(db, {"src": ("id int, g int, v int", data)}, [model])
    members: dict[int, list[int]] = {}
    for _, g, v in data:
        if v >= 0:
            members.setdefault(g, []).append(v)
    # The HAVING inside the CTE drops groups first (condition 1); the outer WHERE then drops big totals (2).
    small = {g for g, vs in members.items() if len(vs) > 1}
    kept = {g for g in small if sum(members[g]) < 1000}

    def condition(g: int, v: int) -> int:
        return 0 if v < 0 else 1 if g not in small else 2

    assert _pairs(db, run_id, "agg_cte") == {(_k(i), _k(g)) for i, g, v in data if v >= 0 and g in kept}
    assert _filtered(db, run_id, "agg_cte") == {
        _k(i): condition(g, v) for i, g, v in data if v < 0 or g not in kept
    }
    assert _morphism(db, run_id, "agg_cte")["unaccounted"]["count"] == 0
    assert [f["condition"] for f in _morphism(db, run_id, "agg_cte")["filters"]] == [
        "v >= 0",
        "COUNT(*) > 1",
        "total < 1000",
    ]


@EXAMPLES
@given(
    rows=st.dictionaries(st.integers(1, 40), st.sets(st.integers(0, 5), max_size=4), min_size=1, max_size=10)
)
def test_explode_maps_each_parent_to_its_children(db: Db, rows: dict[int, set[int]]) -> None:
    src = _entity("src", ["id"], source=True)
    model = Model(
        "exp",
        "select s.id, x.n from p.src as s cross join lateral unnest(s.arr) as x(n)",
        ["id", "n"],
        "explode",
        [src],
    )
    run_id = _run(db, {"src": ("id int, arr int[]", [(i, sorted(a)) for i, a in rows.items()])}, [model])
    assert _pairs(db, run_id, "exp") == {(_k(i), _k(i, n)) for i, arr in rows.items() for n in arr}
    m = _morphism(db, run_id, "exp")
    # A parent without children leaves no row and no predicate explains it: unaccounted, not filtered.
    assert m["unaccounted"]["count"] == sum(1 for a in rows.values() if not a) and m["filtered"] == 0
    impact = queries.impact(db.engine, "src", [_k(i) for i in rows], roles=None, run_id=run_id)
    total = sum(len(a) for a in rows.values())
    assert [(a["model"], a["count"]) for a in impact["affected"]] == ([("exp", total)] if total else [])
    for i, arr in rows.items():
        for n in arr:
            assert _backward(db, run_id, "exp", _k(i, n)) == {("src", _k(i))}


def test_an_empty_key_is_found_like_any_other(db: Db) -> None:
    """`''` has no components to split: the lookup of a carried pair must still try the whole key."""
    src = _entity("src", ["id"], source=True)
    model = Model("cp", "select id, v from p.src", ["id"], "iso", [src])
    ids = ["", "a", "a|b", "|"]
    run_id = _run(db, {"src": ("id text, v int", [(i, n) for n, i in enumerate(ids)])}, [model])
    for i in ids:
        assert _backward(db, run_id, "cp", _k(i)) == {("src", _k(i))}


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(1, 6), st.integers(0, 2), values), min_size=1, max_size=12))
def test_pairs_whose_source_key_leads_the_target_key_are_found_both_ways(
    db: Db, rows: list[tuple[int, int, int]]
) -> None:
    """A group's key may equal a member's key, or begin with it: the backward index leaves such pairs out."""
    src = _entity("src", ["id"], source=True)
    cp_entity = _entity("cp", ["id"])
    data = [(i, g, h, v) for i, (g, h, v) in enumerate(rows, start=1)]
    cp = Model("cp", "select id, g, h, v from p.src", ["id"], "iso", [src])
    one = Model("one", "select g, sum(v) as total from p.cp group by g", ["g"], "aggregate", [cp_entity])
    two = Model(
        "two", "select g, h, sum(v) as total from p.cp group by g, h", ["g", "h"], "aggregate", [cp_entity]
    )
    run_id = _run(db, {"src": ("id int, g int, h int, v int", data)}, [cp, one, two])
    groups: dict[str, dict[str, set[str]]] = {"one": {}, "two": {}}
    for i, g, h, _ in data:
        groups["one"].setdefault(_k(g), set()).add(_k(i))
        groups["two"].setdefault(_k(g, h), set()).add(_k(i))
    for model, members in groups.items():
        assert _pairs(db, run_id, model) == {(k, target) for target, keys in members.items() for k in keys}
        for target, keys in members.items():
            assert _backward(db, run_id, model, target) == {(e, k) for k in keys for e in ("cp", "src")}
            # Paged to the source: the first keys in key order, read through the identity `cp`.
            page = queries.backward(db.engine, model, target, roles=None, run_id=run_id, to="src", limit=2)
            assert [c["key"] for c in page["contributions"]] == sorted(keys)[:2]
    affected = queries.impact(db.engine, "src", [_k(i) for i, *_ in data], roles=None, run_id=run_id)[
        "affected"
    ]
    assert {a["model"]: a["count"] for a in affected} == {
        "cp": len(data),
        "one": len(groups["one"]),
        "two": len(groups["two"]),
    }


@EXAMPLES
@given(
    left=st.dictionaries(st.integers(1, 30), values, max_size=8),
    right=st.dictionaries(st.integers(31, 60), values, max_size=8),
)
def test_union_all_has_one_morphism_per_input(db: Db, left: dict[int, int], right: dict[int, int]) -> None:
    a, b = _entity("a", ["id"], source=True), _entity("b", ["id"], source=True)
    model = Model(
        "uni", "select id, v from p.a union all select id, v from p.b where v > 0", ["id"], "union", [a, b]
    )
    run_id = _run(
        db, {"a": ("id int, v int", list(left.items())), "b": ("id int, v int", list(right.items()))}, [model]
    )
    pairs = _pairs(db, run_id, "uni")
    assert pairs == {(_k(i), _k(i)) for i in left} | {(_k(i), _k(i)) for i, v in right.items() if v > 0}
    morphisms = [m for m in queries.partitions(db.engine, run_id)["morphisms"] if m["model"] == "uni"]
    assert {(m["upstream"], m["mapped"], m["filtered"]) for m in morphisms} == {
        ("a", len(left), 0),
        ("b", sum(1 for v in right.values() if v > 0), sum(1 for v in right.values() if v <= 0)),
    }
    for i in list(right)[:2]:
        if right[i] > 0:
            assert _backward(db, run_id, "uni", _k(i)) == {("b", _k(i))}


@EXAMPLES
@given(rows=st.lists(st.tuples(st.integers(0, 3), values), min_size=1, max_size=20))
def test_backward_and_impact_compose_along_a_chain(db: Db, rows: list[tuple[int, int]]) -> None:
    src = _entity("src", ["id"], source=True)
    flt_entity = _entity("flt", ["id"])
    data = [(i, g, v) for i, (g, v) in enumerate(rows, start=1)]
    flt = Model("flt", "select id, g, v from p.src where v > 3", ["id"], "filter", [src])
    agg = Model("agg", "select g, sum(v) as total from p.flt group by g", ["g"], "aggregate", [flt_entity])
    run_id = _run(db, {"src": ("id int, g int, v int", data)}, [flt, agg])
    kept = [(i, g) for i, g, v in data if v > 3]
    for g in {g for _, g in kept}:
        members = {_k(i) for i, gg in kept if gg == g}
        expected = {("flt", k) for k in members} | {("src", k) for k in members}
        assert _backward(db, run_id, "agg", _k(g)) == expected
        assert _backward(db, run_id, "agg", _k(g), to="src") == {("src", k) for k in members}
    # A key src never had reaches nothing, though the filter's pairs are implied from agg's input keys.
    ids = {m["model"]: m for m in queries.partitions(db.engine, run_id)["morphisms"]}
    assert ids["flt"]["keys_from"] == [ids["agg"]["morphism_id"]]
    keys = [_k(i) for i, _, _ in data] + [_k(10_000)]
    affected = {
        a["model"]: a for a in queries.impact(db.engine, "src", keys, roles=None, run_id=run_id)["affected"]
    }
    for i in [*[i for i, _, v in data if v <= 3][:2], 10_000]:
        with pytest.raises(NotFoundError):
            _backward(db, run_id, "flt", _k(i))
    if kept:
        assert affected["flt"]["count"] == len(kept)
        assert set(affected["agg"]["keys"]) == {_k(g) for _, g in kept}
    else:
        assert affected == {}
    # Containment laws: x is in backward(forward(x)), and y is in forward(backward(y)).
    for i, _ in kept[:3]:
        for a in queries.impact(db.engine, "src", [_k(i)], roles=None, run_id=run_id)["affected"]:
            for target in a["keys"]:
                assert ("src", _k(i)) in _backward(db, run_id, a["model"], target, to="src")
    for g in {g for _, g in kept}:
        origins = [k for _, k in _backward(db, run_id, "agg", _k(g), to="src")]
        reached = queries.impact(db.engine, "src", origins, roles=None, run_id=run_id)["affected"]
        assert _k(g) in next(a["keys"] for a in reached if a["model"] == "agg")
    report = queries.partitions(db.engine, run_id)
    (source,) = report["sources"]
    assert source["fates"] == {
        "reached_output": len(kept),
        "filtered": len(data) - len(kept),
        "errored": 0,
        "unaccounted": 0,
    }


@EXAMPLES
@given(
    rows=st.dictionaries(
        st.integers(10, 99),
        st.tuples(st.sampled_from(["B", "S", "X"]), st.sampled_from(["a", "b"]), st.integers(1, 3)),
        min_size=1,
        max_size=14,
    )
)
def test_a_union_before_a_fold_loses_the_rows_it_merges(
    db: Db, rows: dict[int, tuple[str, str, int]]
) -> None:
    # UNION, not UNION ALL: two rows of the two partitions equal in (g, amount) count once in the fold.
    src = _entity("src", ["id"], source=True)
    folded = Model(
        "fold",
        "with legs as (select g, amount from p.src where side = 'B' "
        "union select g, amount from p.src where side = 'S') "
        "select g, count(*) as n, sum(amount) as total from legs group by g",
        ["g"],
        "aggregate",
        [src],
    )
    data = [(i, side, g, amount) for i, (side, g, amount) in rows.items()]
    run_id = _run(db, {"src": ("id int, side text, g text, amount int", data)}, [folded])
    legs = {(g, a) for _, side, g, a in data if side in {"B", "S"}}
    survivors = {min(i for i, side, g, a in data if side in {"B", "S"} and (g, a) == leg) for leg in legs}
    merged = {i for i, side, _, _ in data if side in {"B", "S"}} - survivors
    assert _pairs(db, run_id, "fold") == {(_k(i), _k(rows[i][1])) for i in survivors}
    m = _morphism(db, run_id, "fold")
    assert m["filtered"] == sum(1 for _, side, _, _ in data if side == "X")
    assert (m["unaccounted"]["count"], set(m["unaccounted"]["samples"])) == (
        len(merged),
        {_k(i) for i in sorted(merged)[:10]},
    )
    assert len(legs) == sum(n for (n,) in db.execute("select n from p.fold"))


@EXAMPLES
@given(rows=st.dictionaries(st.integers(10, 99), st.sampled_from(["a", "b", "c|d"]), min_size=1, max_size=12))
def test_distinct_and_limit_losses_stay_unaccounted(db: Db, rows: dict[int, str]) -> None:
    src = _entity("src", ["id"], source=True)
    distinct = Model("dst", "select distinct code from p.src", ["code"], "filter", [src])
    limited = Model("lim", "select id, code from p.src order by id limit 3", ["id"], "filter", [src])
    run_id = _run(db, {"src": ("id int, code text", list(rows.items()))}, [distinct, limited])
    survivors = {code: min(i for i, c in rows.items() if c == code) for code in set(rows.values())}
    assert _pairs(db, run_id, "dst") == {(_k(i), _k(code)) for code, i in survivors.items()}
    merged = {_k(i) for i in rows} - {_k(i) for i in survivors.values()}
    m = _morphism(db, run_id, "dst")
    assert (m["filtered"], m["unaccounted"]["count"]) == (0, len(merged))
    kept = sorted(rows)[:3]
    assert _pairs(db, run_id, "lim") == {(_k(i), _k(i)) for i in kept}
    m = _morphism(db, run_id, "lim")
    assert (m["filtered"], m["unaccounted"]["count"]) == (0, len(rows) - len(kept))


def test_a_key_derivable_run_answers_with_its_pairs_or_not_at_all_when_what_they_read_changes(db: Db) -> None:
    src = _entity("src", ["id"], source=True)
    tiers, factors, grades = (_entity(n, ["code"], source=True) for n in ("tiers", "factors", "grades"))
    exact = [Lookup(entity=tiers.unique_id, version="exact")]
    models = [
        # Pairs derived by the SQL from a column that is not the upstream's key...
        Model("by_book", "select book, sum(v) as v from p.src group by book", ["book"], "aggregate", [src]),
        # ... and from a lookup's.
        Model(
            "by_tier",
            "select t.tier, count(*) as n from p.src s join p.tiers t on t.code = s.code group by t.tier",
            ["tier"],
            "aggregate",
            [src],
            lookups=exact,
        ),
        # An explode through a lookup whose output key carries the trade's: its pairs are the built relation's.
        Model(
            "legs",
            "select s.id, f.leg from p.src s join p.factors f on f.ccy = s.ccy",
            ["id", "leg"],
            "explode",
            [src],
            lookups=[Lookup(entity=factors.unique_id, version="exact")],
        ),
        # A lookup replaced in place keeps none of the run's rows: the pairs are stored.
        Model(
            "by_grade",
            "select g.grade, count(*) as n from p.src s join p.grades g on g.code = s.code group by g.grade",
            ["grade"],
            "aggregate",
            [src],
            lookups=[Lookup(entity=grades.unique_id, version="latest")],
        ),
    ]
    morphisms = _build(
        db,
        {
            "src": (
                "id int, book text, code text, ccy text, v int",
                [
                    (1, "A", "x", "USD", 5),
                    (2, "A", "y", "USD", 3),
                    (3, "B", "x", "EUR", 1),
                    (4, "B", "y", "EUR", 2),
                ],
            ),
            "tiers": ("code text, tier text", [("x", "T1"), ("y", "T2")]),
            "factors": ("ccy text, leg text", [("USD", "L1"), ("USD", "L2"), ("EUR", "L1")]),
            "grades": ("code text, grade text", [("x", "G1"), ("y", "G2")]),
        },
        models,
    )
    run_id, modes = _capture_key_derivable(db, morphisms)
    assert modes == {
        "by_book": "key_derivable",
        "by_tier": "key_derivable",
        "legs": "key_derivable",
        "by_grade": "full",
    }
    assert _backward(db, run_id, "by_book", "A") == {("src", _k(1)), ("src", _k(2))}
    # A trade moves to another book: every key the envelopes cover is unchanged, the pairs are not.
    db.execute("update p.src set book = 'B' where id = 1")
    with pytest.raises(NotReconstructableError, match="by_book"):
        _backward(db, run_id, "by_book", "A")
    # The other aggregate does not read the book: its pairs, and its answer, stand.
    assert _backward(db, run_id, "by_tier", "T1") == {("src", _k(1)), ("src", _k(3))}
    db.execute("update p.tiers set tier = 'T2' where code = 'x'")
    with pytest.raises(NotReconstructableError, match="by_tier"):
        _backward(db, run_id, "by_tier", "T1")
    # The explode's lookup loses a factor after the build: its built relation still holds the leg.
    db.execute("delete from p.factors where leg = 'L2'")
    assert _backward(db, run_id, "legs", _k(1, "L2")) == {("src", _k(1))}
    db.execute("update p.grades set grade = 'G2' where code = 'x'")
    assert _backward(db, run_id, "by_grade", "G1") == {("src", _k(1)), ("src", _k(3))}


def test_a_key_derivable_run_stores_the_pairs_of_sql_that_need_not_give_them_again(db: Db) -> None:
    src = _entity("src", ["id"], source=True)
    seen = _entity("seen", ["id"])
    # The clock makes the SQL non-deterministic: evaluated again later, it need not keep the rows it kept.
    models = [
        Model(
            "seen",
            "select id, v from p.src where v > 0 and clock_timestamp() < timestamp '2100-01-01'",
            ["id"],
            "filter",
            [src],
        ),
        Model("big", "select id, v from p.seen where v > 4", ["id"], "filter", [seen]),
        # Pairs derived from SQL, not read from the built relation: stored as evaluated, then accounted.
        Model(
            "tally",
            "select v > 4 as large, count(*) as n from p.seen "
            "where clock_timestamp() < timestamp '2100-01-01' group by 1",
            ["large"],
            "aggregate",
            [seen],
        ),
    ]
    morphisms = _build(db, {"src": ("id int, v int", [(1, 5), (2, -1), (3, 7), (4, 2)])}, models)
    run_id, modes = _capture_key_derivable(db, morphisms)
    assert modes == {
        "seen": "full",
        "big": "key_derivable",
        "tally": "full",
    }
    assert _pairs(db, run_id, "seen") == {(_k(i), _k(i)) for i in (1, 3, 4)}
    assert _pairs(db, run_id, "tally") == {(_k(1), "true"), (_k(3), "true"), (_k(4), "false")}
    assert _pairs(db, run_id, "big") == set()
    assert _backward(db, run_id, "big", _k(3)) == {("seen", _k(3)), ("src", _k(3))}
    # The model's rows change after the run: the derived SQL reading them cannot answer, the stored pairs still do.
    db.execute("delete from p.seen where id = 1")
    with pytest.raises(NotReconstructableError):
        _backward(db, run_id, "big", _k(3))
    assert _backward(db, run_id, "seen", _k(3)) == {("src", _k(3))}
    assert _backward(db, run_id, "tally", "true") == {(e, _k(i)) for e in ("seen", "src") for i in (1, 3)}
    with pytest.raises(NotFoundError):
        _backward(db, run_id, "seen", _k(2))
