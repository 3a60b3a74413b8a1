"""Validation of the reference project, compiled by real dbt without a warehouse, and the `cdme validate` CLI."""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.core.artifacts import Manifest, SourceDefinition, load_manifest
from services.core.dbt import first_failure, run_dbt
from services.core.ldm import ProjectConfig, load_project_config
from services.core.warehouse import libpq_url
from services.validation.domain import Report, validate_project
from services.validation.domain.volatility import catalog_volatility, shipped_volatility
from tests.conftest import PROJECT_DIR, RESEARCH_DATA, CliResult

pytestmark = pytest.mark.integration

VARS = '{"epoch_date": "2026-11-20"}'


@pytest.fixture(scope="module")
def compiled_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("compiled")
    # Port 1 refuses connections: validation must not need a warehouse.
    invocation = run_dbt(
        ["compile", "--no-populate-cache", "--vars", VARS],
        project_dir=PROJECT_DIR,
        target_path=target,
        warehouse_url="postgresql://nobody@127.0.0.1:1/none",
    )
    assert invocation.succeeded, first_failure(invocation)
    return target


@pytest.fixture(scope="module")
def compiled(compiled_target: Path) -> Manifest:
    return load_manifest(compiled_target / "manifest.json")


@pytest.fixture(scope="module")
def config() -> ProjectConfig:
    return load_project_config(PROJECT_DIR / "cdme.yml")


def _validate(manifest: Manifest, config: ProjectConfig) -> Report:
    return validate_project(manifest, config=config, project_dir=PROJECT_DIR)


def _mutate_sql(manifest: Manifest, model: str, old: str, new: str) -> Manifest:
    node = next(n for n in manifest.models() if n.name == model)
    assert node.compiled_code is not None and old in node.compiled_code, (model, old)
    nodes = dict(manifest.nodes)
    nodes[node.unique_id] = node.model_copy(update={"compiled_code": node.compiled_code.replace(old, new, 1)})
    return manifest.model_copy(update={"nodes": nodes})


def _mutate_meta(manifest: Manifest, model: str, change: Callable[[dict[str, Any]], None]) -> Manifest:
    node = next(n for n in manifest.models() if n.name == model)
    meta = copy.deepcopy(node.config.meta)
    change(meta["cdme"])
    nodes = dict(manifest.nodes)
    nodes[node.unique_id] = node.model_copy(update={"config": node.config.model_copy(update={"meta": meta})})
    return manifest.model_copy(update={"nodes": nodes})


def test_the_reference_project_validates_clean(compiled: Manifest, config: ProjectConfig) -> None:
    report = _validate(compiled, config)
    assert report.findings == [] or all(f.verdict != "VIOLATION" for f in report.findings), report.findings
    # Every source is governed (meta.cdme) and documented, so every column reference resolves.
    assert (report.coverage.models, report.coverage.models_fully_resolved) == (10, 10)
    assert report.coverage.column_references == report.coverage.column_references_resolved


@pytest.mark.parametrize(
    ("model", "old", "new", "rule", "message"),
    [
        (
            "fct_daily_positions",
            "sum(notional)",
            "sum(notionl)",
            "existence.column",
            "column `notionl` does not exist in `int_trades_enriched`; did you mean `notional`?",
        ),
        (
            "fct_monthly_positions",
            '"marts"."fct_daily_positions"',
            '"marts"."fct_daily_position"',
            "existence.relation",
            "relation `marts.fct_daily_position` is not a source, seed, snapshot or model of the project; "
            "did you mean `fct_daily_positions`?",
        ),
        (
            "int_trades_active",
            "trade_status\nfrom",
            "trade_status,\n    random() as noise\nfrom",
            "determinism",
            "`random` is non-deterministic",
        ),
        (
            "stg_trades",
            "select\n",
            "select distinct\n",
            "morphism.iso",
            "declared `kind: iso` (1:1) but the SQL has DISTINCT",
        ),
    ],
)
def test_planted_mistakes_in_the_reference_project_are_errors(
    compiled: Manifest, config: ProjectConfig, model: str, old: str, new: str, rule: str, message: str
) -> None:
    report = _validate(_mutate_sql(compiled, model, old, new), config)
    caught = [f for f in report.errors if f.rule == rule and f.model == model]
    assert caught, [f.message for f in report.findings]
    assert message in caught[0].message
    assert caught[0].line is not None, "the finding points at the line in the model's own file"


def test_iso_model_with_group_by_is_an_error(compiled: Manifest, config: ProjectConfig) -> None:
    node = next(n for n in compiled.models() if n.name == "stg_risk_factors")
    assert node.compiled_code is not None
    mutated = _mutate_sql(
        compiled,
        "stg_risk_factors",
        node.compiled_code,
        node.compiled_code + "\ngroup by 1, 2, 3, 4, 5, 6, 7",
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "morphism.iso"]
    assert [f.message for f in caught] == [
        "declared `kind: iso` (1:1) but the SQL has GROUP BY; declare the kind it is or remove it"
    ]


def test_an_unversioned_lookup_is_an_error(compiled: Manifest, config: ProjectConfig) -> None:
    mutated = _mutate_meta(compiled, "int_trades_enriched", lambda cdme: cdme["lookups"].pop("currencies"))
    caught = [f for f in _validate(mutated, config).errors if f.rule == "lookups"]
    assert [(f.model, f.code) for f in caught] == [("int_trades_enriched", "CDME-V030")]
    assert (
        "'currencies' is an upstream of int_trades_enriched but neither its driving upstream nor a declared lookup"
        in caught[0].message
    )


def test_a_clock_in_an_external_morphism_is_allowed(compiled: Manifest, config: ProjectConfig) -> None:
    mutated = _mutate_sql(
        compiled, "int_trades_active", "trade_status\nfrom", "trade_status,\n    now() as loaded_at\nfrom"
    )
    assert [f.rule for f in _validate(mutated, config).errors] == ["determinism"]
    external = _mutate_meta(mutated, "int_trades_active", lambda cdme: cdme.update(external=True))
    assert _validate(external, config).errors == []


def test_shipped_volatility_list_equals_the_test_servers_catalog(server_url: str) -> None:
    with psycopg.connect(libpq_url(server_url)) as conn:
        live = catalog_volatility(conn)
    assert live == shipped_volatility(), (
        "regenerate services/validation/domain/pg_volatility.json from this server"
    )


# -- the CLI -------------------------------------------------------------------------------------------------------


def test_cli_validates_the_project_without_a_warehouse(cli: Callable[..., CliResult]) -> None:
    result = cli(
        "validate", "--vars", VARS, env={"CDME_WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["errors"] == 0
    assert report["coverage"]["models"] == 10
    assert report["findings"] == []
    assert report["summary"] == {"errors": 0, "warnings": 0, "unverifiable": 0}
    assert {"models_fully_resolved", "column_references", "model_share", "column_share"} <= set(
        report["coverage"]
    )


def test_cli_exits_1_on_error_findings_and_reports_them(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    manifest = json.loads(
        gzip.decompress((RESEARCH_DATA / "jaffle-shop-v12-postgres-compiled-manifest.json.gz").read_bytes())
    )
    orders = manifest["nodes"]["model.jaffle_shop.orders"]
    assert "order_items_summary.count_food_items > 0" in orders["compiled_code"]
    orders["compiled_code"] = orders["compiled_code"].replace(
        "order_items_summary.count_food_items > 0", "order_items_summary.count_food_itms > 0", 1
    )
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))

    result = cli("validate", "--manifest", str(path), "--format", "text")
    assert result.returncode == 1, result.stdout
    assert "VIOLATION    error   CDME-V002 orders:" in result.stdout
    assert (
        "column `count_food_itms` does not exist in `order_items_summary`; did you mean `count_food_items`?"
        in result.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--manifest", "/nonexistent/manifest.json"],
            "cdme: error: /nonexistent/manifest.json: file not found",
        ),
        (["--format", "yaml", "--manifest", "x"], "cdme: error: --format must be json or text, got 'yaml'"),
        ([], "cdme: error: dbt compile failed: Compilation Error in model"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    cli: Callable[..., CliResult], args: list[str], message: str
) -> None:
    result = cli("validate", *args, env={"CDME_WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


# -- the rules that depend on declarations: types, grain, governance, folds, access, PostgreSQL ----------------------


def _relation(manifest: Manifest, model: str) -> str:
    node = next(n for n in manifest.nodes.values() if n.name == model)
    assert node.relation_name is not None
    return node.relation_name


def test_a_join_of_numeric_and_text_is_a_type_error(compiled: Manifest, config: ProjectConfig) -> None:
    mutated = _mutate_sql(
        compiled,
        "int_trade_risk_sensitivities",
        "rf.currency_code = t.currency_code",
        "rf.tenor_years = t.currency_code",
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "types"]
    assert [f.message for f in caught] == [
        "`rf.tenor_years` (numeric) is compared with `t.currency_code` (text): there is no implicit cast between "
        "numeric and text; cast one side explicitly"
    ]


def test_mixing_semantic_types_is_a_type_error(compiled: Manifest, config: ProjectConfig) -> None:
    mutated = _mutate_sql(
        compiled,
        "int_trades_active",
        "trade_status\nfrom",
        "trade_status,\n    notional + business_date as nonsense\nfrom",
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "types"]
    assert caught and "semantic types Notional and BusinessDate do not unify" in caught[0].message


def test_aggregating_past_a_level_of_the_grain_hierarchy_is_an_error(
    compiled: Manifest, config: ProjectConfig
) -> None:
    mutated = _mutate_sql(
        compiled,
        "fct_monthly_positions",
        _relation(compiled, "fct_daily_positions"),
        _relation(compiled, "int_trades_enriched"),
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "grain"]
    assert [f.message for f in caught] == [
        "aggregates int_trades_enriched (Atomic) straight to MonthlyAggregate, skipping DailyAggregate"
    ]


def test_joining_another_grain_without_aggregating_is_an_error(
    compiled: Manifest, config: ProjectConfig
) -> None:
    daily = _relation(compiled, "fct_daily_positions")
    mutated = _mutate_sql(
        compiled,
        "int_trades_active",
        "where trade_status <> 'CANCELLED'",
        f"cross join {daily} as d\nwhere trade_status <> 'CANCELLED'",
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "grain"]
    assert [f.message for f in caught] == [
        "grain Atomic reads fct_daily_positions (DailyAggregate) without aggregating; aggregate to Atomic first "
        "or declare the upstream a lookup"
    ]


def test_personal_data_reaching_a_mart_is_a_governance_error(
    compiled: Manifest, config: ProjectConfig
) -> None:
    leaky = _mutate_sql(
        compiled, "int_trades_enriched", "    country_code,\n", "    country_code,\n    contact_email,\n"
    )
    leaky = _mutate_sql(
        leaky,
        "fct_daily_positions",
        "count(*) as trade_count",
        "count(*) as trade_count,\n    max(contact_email) as contact",
    )
    caught = [f for f in _validate(leaky, config).errors if f.rule == "governance"]
    assert [(f.model, f.message) for f in caught] == [
        (
            "fct_daily_positions",
            "column `contact` carries personal data into a mart; pseudonymize it (cdme_pseudonymize) or leave it out",
        )
    ]
    hashed = _mutate_sql(
        leaky, "fct_daily_positions", "max(contact_email) as contact", "max(md5(contact_email)) as contact"
    )
    assert [f for f in _validate(hashed, config).errors if f.rule == "governance"] == []


def test_an_unordered_fold_is_an_error_in_a_governed_model(compiled: Manifest, config: ProjectConfig) -> None:
    mutated = _mutate_sql(
        compiled,
        "fct_daily_positions",
        "count(*) as trade_count",
        "count(*) as trade_count,\n    string_agg(trade_id, ',') as trades",
    )
    caught = [f for f in _validate(mutated, config).errors if f.rule == "morphism.fold"]
    assert caught and caught[0].message.startswith("`string_agg` without ORDER BY folds rows")
    ordered = _mutate_sql(
        mutated,
        "fct_daily_positions",
        "string_agg(trade_id, ',')",
        "string_agg(trade_id, ',' order by trade_id)",
    )
    assert [f for f in _validate(ordered, config).errors if f.rule == "morphism.fold"] == []


def test_postgres_identifier_rules(compiled: Manifest, config: ProjectConfig) -> None:
    long_name = "net_notional_usd_" + "x" * 60
    mutated = _mutate_sql(compiled, "fct_daily_positions", "as net_notional_usd", f"as {long_name}")
    messages = [f.message for f in _validate(mutated, config).errors if f.rule == "postgres"]
    assert messages == [
        f"column name `{long_name}` is 77 bytes; PostgreSQL truncates identifiers to 63, so it would collide with any other name sharing that prefix"
    ]


def test_a_model_denied_to_a_principal_does_not_exist_for_it(
    compiled: Manifest, config: ProjectConfig
) -> None:
    as_analyst = validate_project(
        compiled, config=config, project_dir=PROJECT_DIR, principal="ana", roles=frozenset({"risk_analyst"})
    )
    caught = sorted((f.model, f.message) for f in as_analyst.errors if f.rule == "access")
    assert caught == [
        ("int_trades_enriched", "relation `intermediate.int_trades_active` is unknown to principal `ana`"),
        ("int_trades_enriched", "relation `snapshots.snap_counterparties` is unknown to principal `ana`"),
    ]
    assert "snap_counterparties" not in {s.model for s in as_analyst.plan.steps}
    assert (
        validate_project(
            compiled, config=config, project_dir=PROJECT_DIR, roles=frozenset({"data_engineer"})
        ).errors
        == []
    )


def test_the_plan_classifies_every_model_and_its_checkpoints(
    compiled: Manifest, config: ProjectConfig
) -> None:
    plan = _validate(compiled, config).plan
    steps = {s.model: s for s in plan.steps}
    assert len(steps) == 10
    assert (steps["int_trade_risk_sensitivities"].kind, steps["int_trade_risk_sensitivities"].declared) == (
        "explode",
        True,
    )
    assert steps["fct_monthly_positions"].lossy and steps["fct_monthly_positions"].checkpoint_after
    assert steps["err_trades_enrichment"].declared is False
    assert plan.inputs == ["raw_risk.risk_factors", "raw_trading.counterparties", "raw_trading.trades"]
    assert plan.outputs == ["err_trades_enrichment", "fct_daily_risk_sensitivities", "fct_monthly_positions"]


def test_cli_validates_as_a_principal(cli: Callable[..., CliResult], compiled_target: Path) -> None:
    args = [
        "validate",
        "--manifest",
        str(compiled_target / "manifest.json"),
        "--config",
        str(PROJECT_DIR / "cdme.yml"),
    ]
    env = {"CDME_AUTH_TOKENS": "t1=ana:risk_analyst;t2=dee:data_engineer"}

    denied = cli(*args, "--principal", "ana", env=env)
    assert denied.returncode == 1, denied.stderr
    findings = json.loads(denied.stdout)["findings"]
    assert {(f["rule"], f["code"], f["model"]) for f in findings if f["verdict"] == "VIOLATION"} == {
        ("access", "CDME-V070", "int_trades_enriched")
    }

    assert cli(*args, "--principal", "dee", env=env).returncode == 0
    unknown = cli(*args, "--principal", "bob", env=env)
    assert unknown.returncode == 2
    assert (
        unknown.stderr
        == "cdme: error: unknown principal 'bob': it is not in CDME_AUTH_TOKENS or the tokens file\n"
    )


# -- cost: estimates from the warehouse's planner statistics, against budgets ------------------------------------


@pytest.fixture(scope="module")
def analysed_warehouse(new_database: Callable[[], str]) -> str:
    from datetime import date

    from services.datagen.trading import GenerateRequest, currency_codes, generate

    url = new_database()
    currencies = currency_codes(PROJECT_DIR / "seeds" / "currencies.csv")
    generate(url, GenerateRequest(trades=4000, epoch=date(2026, 11, 20), counterparties=300), currencies)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("analyze")
    return url


def _stats(url: str, manifest: Manifest) -> dict[tuple[str, str], Any]:
    from services.validation.domain.cost import warehouse_stats

    relations = [
        (n.schema_, n.identifier if isinstance(n, SourceDefinition) else (n.alias or n.name))
        for n in manifest.entities()
    ]
    with psycopg.connect(libpq_url(url)) as conn:
        return warehouse_stats(conn, relations)


def test_costs_are_estimated_from_planner_statistics(
    analysed_warehouse: str, compiled: Manifest, config: ProjectConfig
) -> None:
    stats = _stats(analysed_warehouse, compiled)
    assert stats[("raw_trading", "trades")].rows == 4000
    report = validate_project(compiled, config=config, project_dir=PROJECT_DIR, stats=stats)
    costs = {c.model: c for c in report.costs}
    assert len(costs) == 10 and report.errors == []
    assert costs["stg_trades"].rows == 4000, "one epoch loaded: the epoch predicate keeps every row"
    assert costs["int_trade_risk_sensitivities"].join_depth == 1
    assert costs["int_trades_enriched"].join_depth == 2
    # The explode multiplies by the risk factors per currency (4 or 5), and the daily fold keeps at most
    # books x currencies groups of the one business date.
    explode, enriched = costs["int_trade_risk_sensitivities"].rows, costs["int_trades_enriched"].rows
    assert explode is not None and enriched is not None and explode > enriched
    assert (costs["fct_daily_positions"].rows or 0) <= 8 * 22


def test_a_budget_exceeded_is_a_cost_error_stating_estimate_and_budget(
    analysed_warehouse: str, compiled: Manifest, config: ProjectConfig
) -> None:
    from services.core.ldm.config import Budget

    stats = _stats(analysed_warehouse, compiled)
    report = validate_project(
        compiled, config=config, stats=stats, budget=Budget(max_output_rows=3000, max_join_depth=1)
    )
    caught = {(f.model, f.message) for f in report.errors if f.rule == "cost"}
    assert ("stg_trades", "estimated output rows 4,000 exceed the budget of 3,000 (x1.3)") in caught
    assert ("int_trades_enriched", "estimated join depth 2 exceed the budget of 1 (x2.0)") in caught
    assert all(f.code == "CDME-V090" for f in report.errors if f.rule == "cost")


def test_cli_estimates_cost_only_when_asked(
    analysed_warehouse: str, cli: Callable[..., CliResult], compiled_target: Path
) -> None:
    args = [
        "validate",
        "--manifest",
        str(compiled_target / "manifest.json"),
        "--config",
        str(PROJECT_DIR / "cdme.yml"),
    ]
    without = json.loads(
        cli(*args, env={"CDME_WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/none"}).stdout
    )
    assert without["costs"] == []

    result = cli(*args, "--estimate-cost", env={"CDME_WAREHOUSE_URL": analysed_warehouse})
    assert result.returncode == 0, result.stderr
    assert {c["model"] for c in json.loads(result.stdout)["costs"]} >= {"stg_trades", "fct_monthly_positions"}

    dead = cli(*args, "--estimate-cost", env={"CDME_WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert dead.returncode == 2
    assert dead.stderr.startswith(
        "cdme: error: cost estimation needs the warehouse's statistics, which could not be read:"
    )
    assert dead.stderr.count("\n") == 1


# -- symbolic paths --------------------------------------------------------------------------------------------------


def test_paths_follow_the_reference_projects_relationship_tests(
    compiled: Manifest, config: ProjectConfig
) -> None:
    from services.core.ldm import load_ldm
    from services.validation.domain.paths import validate_path

    ldm = load_ldm(compiled, config)
    resolved = validate_path(
        compiled, "int_trades_enriched.currency_code.rate_to_usd", ldm=ldm, project_dir=PROJECT_DIR
    )
    assert (resolved.valid, resolved.attribute) == (True, "currencies.rate_to_usd")
    typo = validate_path(
        compiled, "int_trades_enriched.currencies.rate_to_eur", ldm=ldm, project_dir=PROJECT_DIR
    )
    assert not typo.valid and typo.findings[0].message.startswith(
        "`currencies` has no column `rate_to_eur` (columns: "
    )

    denied = validate_path(
        compiled,
        "snap_counterparties.counterparty_id",
        ldm=ldm,
        principal="ana",
        roles=frozenset({"risk_analyst"}),
    )
    assert [f.message for f in denied.findings] == [
        "`snap_counterparties` is not an entity known to principal `ana`; a path is entity.relationship.attribute"
    ]
    allowed = validate_path(
        compiled, "snap_counterparties.counterparty_id", ldm=ldm, roles=frozenset({"data_engineer"})
    )
    assert allowed.valid


def test_a_join_across_epochs_must_match_them_or_declare_its_temporal_semantics(
    compiled: Manifest, config: ProjectConfig
) -> None:
    trades = compiled.sources["source.cdme_trading.raw_trading.trades"].relation_name
    factors = compiled.sources["source.cdme_trading.raw_risk.risk_factors"].relation_name
    assert trades is not None and factors is not None
    # Both raw tables declare epoch_column: epoch_date. Matching currencies alone pairs every epoch with every other.
    across = _mutate_sql(
        compiled,
        "stg_trades",
        f"from {trades}",
        f"from {trades} as t\ninner join {factors} as rf on rf.currency = t.currency",
    )
    caught = [f for f in _validate(across, config).errors if f.rule == "lookups"]
    assert [(f.model, f.message) for f in caught] == [
        (
            "stg_trades",
            "joins raw_risk.risk_factors to raw_trading.trades across epochs: the join does not match "
            "`rf.epoch_date` with `t.epoch_date`; join on the epoch, or declare the temporal semantics "
            "(meta.cdme.lookups.raw_risk.risk_factors: version as_of or var)",
        )
    ]
    assert caught[0].code == "CDME-V030"
    same_epoch = _mutate_sql(
        across,
        "stg_trades",
        "on rf.currency = t.currency",
        "on rf.currency = t.currency and rf.epoch_date = t.epoch_date",
    )
    assert [f for f in _validate(same_epoch, config).errors if f.rule == "lookups"] == []
