"""Real `dbt build`s of the reference trading project on generated data, checked record by record."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.core.artifacts import load_catalog, load_manifest, load_run_results
from services.core.dbt import DbtInvocation, first_failure, run_dbt
from services.core.ldm import load_ldm, load_project_config
from services.datagen.trading import (
    GenerateReport,
    GenerateRequest,
    counterparty_versions,
    currency_codes,
    generate,
)
from tests.conftest import PROJECT_DIR, CliResult

pytestmark = pytest.mark.integration

SEED = 11
COUNTERPARTIES = 400
FIRST_EPOCH = date(2026, 11, 20)
CURRENCIES = currency_codes(PROJECT_DIR / "seeds" / "currencies.csv")


def _next_version_change(after: date) -> date:
    """The first day after `after` on which some generated counterparty gets a new version."""
    horizon = datetime.combine(after + timedelta(days=60), datetime.min.time(), tzinfo=UTC)
    changes = {
        row[2].date()
        for row in counterparty_versions(SEED, COUNTERPARTIES, horizon)
        if isinstance(row[2], datetime) and row[2].date() > after
    }
    return min(changes)


SECOND_EPOCH = _next_version_change(FIRST_EPOCH)


@dataclass
class Build:
    url: str
    pepper: str
    invocations: dict[date, DbtInvocation] = field(default_factory=dict)
    reports: dict[date, GenerateReport] = field(default_factory=dict)
    accounting: dict[date, dict[str, Any]] = field(default_factory=dict)

    def rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Any = None) -> Any:
        return self.rows(sql, params)[0][0]


def _dbt(url: str, target: Path, command: list[str], pepper: str | None) -> DbtInvocation:
    return run_dbt(command, project_dir=PROJECT_DIR, target_path=target, warehouse_url=url, pepper=pepper)


@pytest.fixture(scope="module")
def build(new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Build:
    result = Build(url=new_database(), pepper=secrets.token_hex(16))
    for epoch in (FIRST_EPOCH, SECOND_EPOCH):
        result.reports[epoch] = generate(
            result.url,
            GenerateRequest(trades=4000, epoch=epoch, seed=SEED, counterparties=COUNTERPARTIES),
            CURRENCIES,
        )
        target = tmp_path_factory.mktemp(f"build-{epoch}")
        invocation = _dbt(
            result.url, target, ["build", "--vars", json.dumps({"epoch_date": str(epoch)})], result.pepper
        )
        assert invocation.succeeded, first_failure(invocation)
        result.invocations[epoch] = invocation
        # Intermediate tables hold the latest epoch only: record each epoch's fates right after its build.
        result.accounting[epoch] = {
            "raw": result.scalar("select count(*) from raw_trading.trades where epoch_date = %s", (epoch,)),
            "cancelled": result.scalar(
                "select count(*) from raw_trading.trades where epoch_date = %s and status = 'CANCELLED'",
                (epoch,),
            ),
            "enriched": result.scalar("select count(*) from intermediate.int_trades_enriched"),
            "errors": dict(
                result.rows("select failure_type, count(*) from errors.err_trades_enrichment group by 1")
            ),
            "both": result.scalar(
                "select count(*) from intermediate.int_trades_enriched e "
                "join errors.err_trades_enrichment x on x.source_key = e.trade_id"
            ),
        }
    return result


def test_every_node_builds_and_every_dbt_test_passes(build: Build) -> None:
    for epoch, invocation in build.invocations.items():
        results = invocation.run_results()
        assert results is not None
        statuses = {r.unique_id: r.status for r in results.results}
        assert set(statuses.values()) <= {"success", "pass"}, (epoch, statuses)
        assert sum(1 for uid in statuses if uid.startswith("test.")) >= 45
        assert {"snapshot.cdme_trading.snap_counterparties", "seed.cdme_trading.currencies"} <= set(statuses)


def test_every_trade_of_an_epoch_has_exactly_one_fate(build: Build) -> None:
    for epoch, counts in build.accounting.items():
        anomalies = build.reports[epoch].anomalies
        assert counts["raw"] == 4000
        assert counts["cancelled"] == anomalies["cancelled"]
        assert counts["errors"] == {
            "MISSING_COUNTERPARTY": anomalies["missing_counterparty"],
            "NON_POSITIVE_NOTIONAL": anomalies["non_positive_notional"],
            "UNKNOWN_CURRENCY": anomalies["unknown_currency"],
        }
        assert counts["raw"] == counts["enriched"] + counts["cancelled"] + sum(counts["errors"].values())
        assert counts["both"] == 0


def test_error_sink_carries_the_structured_fields(build: Build) -> None:
    columns = dict(
        build.rows(
            "select column_name, data_type from information_schema.columns "
            "where table_schema = 'errors' and table_name = 'err_trades_enrichment'"
        )
    )
    assert {
        k: columns[k]
        for k in (
            "failure_type",
            "offending_values",
            "source_entity",
            "source_key",
            "source_epoch",
            "morphism_path",
        )
    } == {
        "failure_type": "text",
        "offending_values": "jsonb",
        "source_entity": "text",
        "source_key": "text",
        "source_epoch": "date",
        "morphism_path": "ARRAY",
    }
    rows = build.rows(
        "select failure_type, offending_values, source_entity, source_epoch, morphism_path from errors.err_trades_enrichment"
    )
    expected_field = {
        "MISSING_COUNTERPARTY": "counterparty_id",
        "NON_POSITIVE_NOTIONAL": "notional",
        "UNKNOWN_CURRENCY": "currency_code",
    }
    for failure, offending, entity, epoch, path in rows:
        assert list(offending) == [expected_field[failure]]
        assert entity == "int_trades_active" and epoch == SECOND_EPOCH
        assert path == ["raw_trading.trades", "stg_trades", "int_trades_active", "int_trades_enriched"]
    unknown = build.rows(
        "select offending_values->>'currency_code' from errors.err_trades_enrichment where failure_type = 'UNKNOWN_CURRENCY'"
    )
    assert {r[0] for r in unknown} <= {"ZZZ", "QQQ"}


def test_versioned_lookup_joins_the_counterparty_version_in_force_at_trade_time(build: Build) -> None:
    changed = build.rows(
        "select counterparty_id from raw_trading.counterparties where valid_from = %s",
        (datetime.combine(SECOND_EPOCH, datetime.min.time(), tzinfo=UTC),),
    )
    assert changed, "the second epoch was chosen as a day on which versions change"
    snapshot_rows = build.scalar("select count(*) from snapshots.snap_counterparties")
    assert snapshot_rows == COUNTERPARTIES + len(changed)
    closed = build.scalar(
        "select count(*) from snapshots.snap_counterparties where dbt_valid_to = %s",
        (datetime.combine(SECOND_EPOCH, datetime.min.time(), tzinfo=UTC),),
    )
    assert closed == len(changed)
    # Every enriched trade carries the raw version whose validity holds its timestamp.
    mismatches = build.scalar(
        """
        select count(*)
        from intermediate.int_trades_enriched e
        join intermediate.int_trades_active a using (trade_id)
        where e.counterparty_version <> (
            select max(c.version) from raw_trading.counterparties c
            where c.counterparty_id = a.counterparty_id and c.valid_from <= a.trade_ts
        )
        """
    )
    assert mismatches == 0
    on_new_version = build.scalar(
        "select count(*) from intermediate.int_trades_enriched e join intermediate.int_trades_active a using (trade_id) "
        "where a.counterparty_id = any(%s) ",
        ([c[0] for c in changed],),
    )
    assert on_new_version > 0 or len(changed) * 4000 / COUNTERPARTIES < 3


def test_incremental_daily_mart_keeps_both_days_and_monthly_folds_daily(build: Build) -> None:
    daily = dict(
        build.rows("select business_date, sum(trade_count) from marts.fct_daily_positions group by 1")
    )
    assert daily == {epoch: counts["enriched"] for epoch, counts in build.accounting.items()}
    differences = build.scalar(
        """
        select count(*) from (
            select cast(date_trunc('month', business_date) as date) as month_start, book, currency_code,
                   sum(trade_count) as trade_count, sum(gross_notional) as gross_notional,
                   sum(net_notional_usd) as net_notional_usd, count(*) as days_reported
            from marts.fct_daily_positions group by 1, 2, 3
            except
            select month_start, book, currency_code, trade_count, gross_notional, net_notional_usd, days_reported
            from marts.fct_monthly_positions
        ) d
        """
    )
    assert differences == 0
    assert build.scalar("select count(*) from marts.fct_daily_positions where gross_notional <= 0") == 0


def test_explode_emits_one_sensitivity_per_risk_factor_of_the_currency(build: Build) -> None:
    expected = build.scalar(
        "select sum(case when currency_code = 'USD' then 4 else 5 end) from intermediate.int_trades_enriched"
    )
    assert build.scalar("select count(*) from intermediate.int_trade_risk_sensitivities") == expected
    assert (
        build.scalar("select count(distinct trade_id) from intermediate.int_trade_risk_sensitivities")
        == build.accounting[SECOND_EPOCH]["enriched"]
    )


def test_pepper_pseudonymizes_and_is_never_stored(build: Build) -> None:
    for invocation in build.invocations.values():
        for path in invocation.target_path.rglob("*"):
            if path.is_file():
                assert build.pepper not in path.read_text(errors="ignore"), path
    wrong = build.scalar(
        "select count(*) from intermediate.int_trades_enriched e join intermediate.int_trades_active a using (trade_id) "
        "where e.counterparty_sk <> encode(sha256(convert_to(%s || '|' || a.counterparty_id, 'UTF8')), 'hex')",
        (build.pepper,),
    )
    assert wrong == 0
    personal = build.rows(
        "select table_schema, table_name, column_name from information_schema.columns "
        "where table_schema in ('intermediate', 'marts') and column_name in ('contact_name', 'contact_email', 'counterparty_id')"
        " and table_name <> 'int_trades_active'"
    )
    assert personal == []


def test_without_a_pepper_the_pseudonymizing_model_fails_loudly(build: Build, tmp_path: Path) -> None:
    invocation = _dbt(
        build.url,
        tmp_path,
        ["run", "--select", "int_trades_enriched", "--vars", json.dumps({"epoch_date": str(SECOND_EPOCH)})],
        pepper=None,
    )
    assert not invocation.succeeded
    assert "CDME pepper is not set: export CDME_PEPPER" in first_failure(invocation)


def test_a_run_without_an_epoch_is_refused_before_touching_data(build: Build, tmp_path: Path) -> None:
    invocation = _dbt(build.url, tmp_path, ["run", "--select", "stg_trades"], pepper=build.pepper)
    assert not invocation.succeeded
    assert "epoch_date is not set: pass --vars '{epoch_date: YYYY-MM-DD}'" in first_failure(invocation)


def test_reference_artifacts_parse_and_the_ldm_resolves_against_the_catalog(
    build: Build, tmp_path: Path
) -> None:
    docs = _dbt(
        build.url,
        tmp_path,
        ["docs", "generate", "--vars", json.dumps({"epoch_date": str(SECOND_EPOCH)})],
        build.pepper,
    )
    assert docs.succeeded, first_failure(docs)
    manifest = load_manifest(tmp_path / "manifest.json")
    catalog = load_catalog(tmp_path / "catalog.json")
    results = load_run_results(build.invocations[SECOND_EPOCH].target_path / "run_results.json")
    assert results.elapsed_time > 0 and len(results.results) > 60

    ldm = load_ldm(manifest, load_project_config(PROJECT_DIR / "cdme.yml"), catalog)
    for entity in ldm:
        assert entity.key is not None and entity.key.verified, entity.name
        assert entity.grain is not None, entity.name
    enriched = ldm.entity("int_trades_enriched")
    # The catalog's type (the warehouse's own) wins over the YAML declaration.
    assert enriched.columns["notional"].data_type == "numeric(20,2)"
    assert enriched.columns["notional"].semantic_type == "Notional"
    assert enriched.columns["counterparty_sk"].pseudonymized
    assert [(lk.entity, lk.version, lk.as_of) for lk in enriched.lookups] == [
        ("snap_counterparties", "as_of", "trade_ts"),
        ("currencies", "latest", None),
    ]
    assert ldm.entity("err_trades_enrichment").is_error_sink
    monthly = ldm.entity("fct_monthly_positions")
    assert (monthly.grain, monthly.driving) == ("MonthlyAggregate", "fct_daily_positions")
    assert ldm.config.grain_chain("MonthlyAggregate")[1] == ldm.entity("fct_daily_positions").grain


def test_main_job_runs_end_to_end_on_its_own_embedded_server(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("CDME_")}
    env.update(
        {"CDME_HOME": str(tmp_path / "home"), "CDME_DEMO_TRADES": "2000", "CDME_DEMO_EPOCH": "2026-11-18"}
    )
    try:
        proc = subprocess.run(
            [str(PROJECT_DIR.parent / "run_cdme.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        for service in ("validation", "adjoint", "lineage", "planner"):
            assert any(line.startswith(f"{service} ") and " running " in line for line in lines), service
        assert any(line.split()[:2] == ["dbt", "succeeded"] for line in lines)
        assert any(line.endswith(" COMPLETE") and line.startswith("run ") for line in lines)
        assert any(line.startswith("ledger: BALANCED") for line in lines)
        assert lines[-2].startswith("backward trace: fct_daily_positions [2026-11-18|")
        assert "raw trades" in lines[-2] and lines[-1].strip().endswith("<- raw_trading.trades")
    finally:
        # The services and the embedded server, by their pids.
        subprocess.run(
            [str(PROJECT_DIR.parent / "run_cdme.sh"), "stop"],
            env=env,
            capture_output=True,
            check=False,
            timeout=120,
        )


def test_build_failure_is_one_line_naming_the_node(
    new_database: Callable[[], str], cli: Callable[..., CliResult]
) -> None:
    empty = new_database()
    result = cli(
        "build",
        "--epoch",
        "2026-11-20",
        "--quiet",
        "--select",
        "stg_trades",
        env={"CDME_WAREHOUSE_URL": empty},
    )
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("cdme: error: dbt build failed: model.cdme_trading.stg_trades: ")
    assert 'relation "raw_trading.trades" does not exist' in result.stderr


def test_invalid_meta_cdme_fails_ldm_check_naming_model_and_field(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs"))
    marts = project / "models" / "marts" / "_marts.yml"
    marts.write_text(marts.read_text().replace("grain: MonthlyAggregate", "grain: Hourly", 1))

    good = cli("ldm", "check", env={"CDME_PROJECT_DIR": str(PROJECT_DIR)})
    assert good.returncode == 0, good.stderr
    assert "declarations valid" in good.stdout
    assert good.stderr == "", (
        "every record key of the reference project is checked against documented columns"
    )

    bad = cli("ldm", "check", env={"CDME_PROJECT_DIR": str(project)})
    assert bad.returncode == 65
    assert bad.stderr == (
        "cdme: error: fct_monthly_positions: meta.cdme.grain: unknown grain 'Hourly' "
        "(declared in cdme.yml: Atomic, DailyAggregate, MonthlyAggregate, Reference)\n"
    )


def test_build_with_an_invalid_declaration_writes_nothing(
    tmp_path: Path, new_database: Callable[[], str], cli: Callable[..., CliResult]
) -> None:
    project = tmp_path / "project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs"))
    staging = project / "models" / "staging" / "_staging.yml"
    staging.write_text(staging.read_text().replace("kind: iso", "kind: isomorphism", 1))
    url = new_database()

    result = cli(
        "build",
        "--epoch",
        "2026-11-20",
        "--quiet",
        env={"CDME_WAREHOUSE_URL": url, "CDME_PROJECT_DIR": str(project)},
    )

    assert result.returncode == 65
    assert result.stderr.startswith("cdme: error: stg_trades: meta.cdme.kind: Input should be 'iso',")
    with psycopg.connect(url) as conn:
        schemas = {
            r[0] for r in conn.execute("select schema_name from information_schema.schemata").fetchall()
        }
    assert not schemas & {"staging", "intermediate", "marts", "snapshots", "raw_reference", "errors"}
