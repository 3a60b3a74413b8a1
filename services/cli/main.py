"""The `cdme` command line: thin commands over `services.core` and `services.datagen`.

Errors are translated here, once: a `CdmeError` prints one line `cdme: error: ...` and exits with its code;
a usage error exits 2; anything unexpected prints one line pointing at a crash log, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import click
import psycopg
import typer
from sqlalchemy import text

from services.cli.adjoint import backward_command, impact_command, reconcile_command
from services.cli.bench import bench_app
from services.cli.pipeline import run_command, run_logs_command, runs_command, services_app
from services.core.artifacts import (
    Catalog,
    Manifest,
    load_catalog,
    load_manifest,
    parse_catalog,
    parse_manifest,
    parse_run_results,
)
from services.core.artifacts import base as artifact_base
from services.core.auth import TokenAuthenticator, ensure_demo_token
from services.core.dbt import first_failure, parse_project, run_dbt
from services.core.errors import CdmeError, DbtError, UsageError, WarehouseError, first_line
from services.core.ldm import Ldm, LdmDeclarationError, load_ldm, load_project_config
from services.core.logs import configure_logging
from services.core.migrations import migrate, service_schema
from services.core.secrets import resolve_pepper
from services.core.settings import CdmeSettings, get_settings
from services.core.warehouse import (
    check_connection,
    create_warehouse_engine,
    embedded_server,
    libpq_url,
    resolve_warehouse_url,
)
from services.datagen.trading import GenerateRequest, currency_codes, generate, parse_epoch
from services.validation.domain import validate_project
from services.validation.domain.cost import TableStats, relations_of, warehouse_stats

app = typer.Typer(
    name="cdme",
    help="CDME: validation, adjoint lineage and record accounting around a dbt project.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
warehouse_app = typer.Typer(help="The embedded PostgreSQL warehouse.", no_args_is_help=True)
ldm_app = typer.Typer(help="The logical data model declared in meta.cdme and cdme.yml.", no_args_is_help=True)
artifacts_app = typer.Typer(help="dbt artifacts (manifest, run_results, catalog).", no_args_is_help=True)
auth_app = typer.Typer(help="Bearer tokens.", no_args_is_help=True)
app.add_typer(warehouse_app, name="warehouse")
app.add_typer(ldm_app, name="ldm")
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(auth_app, name="auth")
app.add_typer(bench_app, name="bench")
app.add_typer(services_app, name="services")
app.command("run")(run_command)
app.command("runs")(runs_command)
app.command("run-logs")(run_logs_command)
app.command("backward")(backward_command)
app.command("impact")(impact_command)
app.command("reconcile")(reconcile_command)


# -- warehouse ------------------------------------------------------------------------------------------------


@warehouse_app.command("start")
def warehouse_start() -> None:
    """Start the embedded PostgreSQL (initialising it on first use); a running server is reused."""
    status = embedded_server(get_settings()).start()
    typer.echo(status.describe())


@warehouse_app.command("stop")
def warehouse_stop() -> None:
    """Stop the embedded PostgreSQL by its own pid."""
    stopped = embedded_server(get_settings()).stop()
    typer.echo("stopped" if stopped else "not running")


@warehouse_app.command("status")
def warehouse_status() -> None:
    """Report the embedded PostgreSQL's state; exits 3 when it is stopped (like pg_ctl status)."""
    status = embedded_server(get_settings()).status()
    typer.echo(status.describe())
    if not status.running:
        raise typer.Exit(3)


@warehouse_app.command("url")
def warehouse_url() -> None:
    """Print the warehouse URL (CDME_WAREHOUSE_URL, else the running embedded server's)."""
    typer.echo(libpq_url(resolve_warehouse_url(get_settings())))


# -- data -----------------------------------------------------------------------------------------------------


@app.command("generate")
def generate_command(
    trades: Annotated[int, typer.Option("--trades", help="Trades to generate for the epoch.")],
    epoch: Annotated[str, typer.Option("--epoch", help="Business date, YYYY-MM-DD.")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same data.")] = 42,
    counterparties: Annotated[
        int, typer.Option("--counterparties", help="Counterparty universe size.")
    ] = 2000,
    digest: Annotated[
        bool, typer.Option("--digest", help="Print an md5 digest of each loaded table.")
    ] = False,
) -> None:
    """Load one epoch of raw trades, counterparty versions and risk factors with COPY (idempotent per epoch)."""
    request = GenerateRequest(
        trades=trades, epoch=parse_epoch(epoch), seed=seed, counterparties=counterparties
    )
    settings = get_settings()
    currencies = currency_codes(settings.project_dir / "seeds" / "currencies.csv")
    report = generate(resolve_warehouse_url(settings), request, currencies, digest=digest)
    anomalies = ", ".join(f"{k}={v}" for k, v in report.anomalies.items())
    typer.echo(
        f"epoch {report.epoch}: {report.trades:,} trades, {report.counterparty_versions:,} counterparty versions, "
        f"{report.risk_factors} risk factors in {report.seconds:.1f}s (seed {report.seed}; {anomalies})"
    )
    for table, value in report.digests.items():
        typer.echo(f"  {table} md5={value}")


# -- dbt ------------------------------------------------------------------------------------------------------


def _row_counts(url: str, ldm: Ldm, unique_ids: set[str]) -> dict[str, int]:
    engine = create_warehouse_engine(url, pool_size=1)
    counts: dict[str, int] = {}
    try:
        quote = engine.dialect.identifier_preparer.quote
        with engine.connect() as conn:
            for entity in ldm:
                if entity.unique_id in unique_ids:
                    relation = f"{quote(entity.schema_name)}.{quote(entity.identifier)}"
                    counts[entity.name] = int(
                        conn.execute(text(f"select count(*) from {relation}")).scalar_one()
                    )
    finally:
        engine.dispose()
    return counts


@app.command("build")
def build_command(
    epoch: Annotated[str, typer.Option("--epoch", help="Business date to build, YYYY-MM-DD.")],
    select: Annotated[
        list[str] | None, typer.Option("--select", "-s", help="dbt --select, passed through.")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="dbt --exclude, passed through.")
    ] = None,
    selector: Annotated[str | None, typer.Option("--selector", help="dbt YAML selector name.")] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="Rebuild incremental models.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only print the summary.")] = False,
) -> None:
    """Run `dbt build` of the project for one epoch and print what it produced."""
    settings = get_settings()
    day = parse_epoch(epoch)
    url = resolve_warehouse_url(settings)
    engine = create_warehouse_engine(url, pool_size=1)
    try:
        check_connection(engine)
    finally:
        engine.dispose()
    command = ["build", "--vars", json.dumps({"epoch_date": day.isoformat()})]
    for flag, values in (("--select", select), ("--exclude", exclude)):
        if values:
            command += [flag, *values]
    if selector:
        command += ["--selector", selector]
    if full_refresh:
        command.append("--full-refresh")
    run_dir = settings.home / "runs" / f"{day}-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
    # Declarations are checked before dbt touches the warehouse: a bad one stops the build with nothing written.
    ldm = _project_ldm(settings, _parse_project(settings, run_dir / "target", url=url, epoch=day))
    invocation = run_dbt(
        command,
        project_dir=settings.project_dir,
        target_path=run_dir / "target",
        warehouse_url=url,
        pepper=resolve_pepper(settings),
        schema=settings.dbt_schema,
        target=settings.dbt_target,
        partial_parse=True,
        on_progress=None if quiet else typer.echo,
    )
    if not invocation.succeeded:
        msg = f"dbt build failed: {first_failure(invocation)} (log: {run_dir / 'target' / 'dbt.log.jsonl'})"
        raise DbtError(msg)
    results = invocation.run_results()
    statuses = Counter(r.status for r in results.results) if results else Counter()
    built = {r.unique_id for r in results.results} if results else set()
    counts = _row_counts(url, ldm, built)
    elapsed = results.elapsed_time if results else 0.0
    typer.echo(
        f"dbt build of epoch {day}: {dict(statuses)} in {elapsed:.1f}s; artifacts in {run_dir / 'target'}"
    )
    for name, rows in counts.items():
        entity = ldm.entity(name)
        typer.echo(
            f"  {entity.relation:<52} {entity.materialized or entity.resource_type:<12} {rows:>12,} rows"
        )


# -- LDM and artifacts ----------------------------------------------------------------------------------------


# `dbt parse` renders profiles.yml but never connects, so any well-formed URL serves when none is configured.
def _parse_project(
    settings: CdmeSettings,
    target: Path,
    *,
    url: str | None = None,
    epoch: date | None = None,
    compile_sql: bool = False,
    dbt_vars: str | None = None,
) -> Manifest:
    epoch_vars = json.dumps({"epoch_date": epoch.isoformat()}) if epoch is not None else None
    return parse_project(
        settings, target, warehouse_url=url, dbt_vars=epoch_vars or dbt_vars, compile_sql=compile_sql
    )


def _project_ldm(settings: CdmeSettings, manifest: Manifest, catalog: Catalog | None = None) -> Ldm:
    config = load_project_config(settings.project_dir / "cdme.yml")
    return load_ldm(manifest, config, catalog, lineage_mode=settings.lineage_mode)


@ldm_app.command("check")
def ldm_check(
    manifest: Annotated[Path | None, typer.Option(help="manifest.json (default: run `dbt parse`).")] = None,
    config: Annotated[Path | None, typer.Option(help="cdme.yml (default: the project's).")] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="catalog.json, to check columns against the warehouse.")
    ] = None,
) -> None:
    """Load every meta.cdme declaration and cdme.yml; list each invalid one with its entity and field."""
    settings = get_settings()
    parsed = (
        load_manifest(manifest) if manifest else _parse_project(settings, settings.home / "parse" / "target")
    )
    project_config = load_project_config(config or settings.project_dir / "cdme.yml")
    try:
        ldm = load_ldm(
            parsed,
            project_config,
            load_catalog(catalog) if catalog else None,
            lineage_mode=settings.lineage_mode,
        )
    except LdmDeclarationError as e:
        for problem in e.problems[1:]:
            typer.echo(f"cdme: error: {problem}", err=True)
        raise
    kinds = Counter(e.kind or e.resource_type for e in ldm)
    keyed = sum(1 for e in ldm if e.key is not None)
    typer.echo(f"{len(ldm.entities)} entities ({dict(kinds)}); {keyed} with a record key; declarations valid")
    unverified = sorted(e.name for e in ldm if e.key is not None and not e.key.verified)
    if unverified:
        typer.echo(
            f"cdme: warning: {len(unverified)} record keys could not be checked against any column (document "
            f"the columns in YAML or pass --catalog): {', '.join(unverified)}",
            err=True,
        )


@artifacts_app.command("check")
def artifacts_check(
    paths: Annotated[list[Path], typer.Argument(help="Artifact files (.json or .json.gz).")],
) -> None:
    """Parse dbt artifacts, recognising each by its dbt_schema_version, and summarise them."""
    parsers: dict[str, Any] = {
        "manifest": parse_manifest,
        "run-results": parse_run_results,
        "catalog": parse_catalog,
    }
    for path in paths:
        data = artifact_base.read_json(path)
        version_url = (
            str(((data or {}).get("metadata") or {}).get("dbt_schema_version", ""))
            if isinstance(data, dict)
            else ""
        )
        kind = next((k for k in parsers if f"/dbt/{k}/" in version_url), "manifest")
        parsed = parsers[kind](data, str(path))
        version = artifact_base.schema_version(data, kind, str(path))  # type: ignore[arg-type]  # kind is a key of parsers
        sizes = {
            "manifest": lambda a: f"{len(a.nodes)} nodes, {len(a.sources)} sources",
            "run-results": lambda a: f"{len(a.results)} results",
            "catalog": lambda a: f"{len(a.nodes)} nodes, {len(a.sources)} sources",
        }[kind](parsed)
        typer.echo(f"{path}: {kind} v{version}: {sizes}")


def _warehouse_stats(settings: CdmeSettings, manifest: Manifest) -> dict[tuple[str, str], TableStats]:
    # The one place validation connects: cost estimation reads the planner's statistics, nothing else.
    relations = relations_of(manifest)
    url = libpq_url(resolve_warehouse_url(settings))
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            return warehouse_stats(conn, relations)
    except psycopg.Error as e:
        msg = f"cost estimation needs the warehouse's statistics, which could not be read: {first_line(e)}"
        raise WarehouseError(msg) from e


def _principal_roles(settings: CdmeSettings, name: str) -> frozenset[str]:
    found = TokenAuthenticator.from_settings(settings).principal_named(name)
    if found is None:
        msg = f"unknown principal {name!r}: it is not in CDME_AUTH_TOKENS or the tokens file"
        raise UsageError(msg)
    return found.roles


@app.command("validate")
def validate_command(
    project_dir: Annotated[
        Path | None, typer.Option("--project-dir", help="dbt project (default: CDME_PROJECT_DIR).")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="A compiled manifest.json instead.")
    ] = None,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", help="catalog.json: the warehouse's columns.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="cdme.yml (default: the project's, if any).")
    ] = None,
    dbt_vars: Annotated[
        str | None, typer.Option("--vars", help="dbt --vars for compiling, passed through.")
    ] = None,
    principal: Annotated[
        str | None,
        typer.Option("--principal", help="Validate as this principal: models its roles deny do not exist."),
    ] = None,
    estimate_cost: Annotated[
        bool,
        typer.Option("--estimate-cost", help="Estimate each model's size from the warehouse's statistics."),
    ] = False,
    output: Annotated[str, typer.Option("--format", help="json or text.")] = "json",
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Processes analysing models at once (0: one per CPU).")
    ] = 0,
) -> None:
    """Validate a project before dbt runs; exits 0 without error findings, 1 with, 2 on bad input."""
    if output not in {"json", "text"}:
        msg = f"--format must be json or text, got {output!r}"
        raise UsageError(msg)
    if project_dir is not None and manifest is not None:
        msg = "give --project-dir or --manifest, not both"
        raise UsageError(msg)
    settings = get_settings()
    try:
        roles = _principal_roles(settings, principal) if principal is not None else None
        if manifest is not None:
            parsed = load_manifest(manifest)
            directory = project_dir
        else:
            directory = (project_dir or settings.project_dir).resolve()
            scoped = settings.model_copy(update={"project_dir": directory})
            parsed = _parse_project(
                scoped, settings.home / "validate" / "target", compile_sql=True, dbt_vars=dbt_vars
            )
        config_path = config or (directory / "cdme.yml" if directory is not None else None)
        report = validate_project(
            parsed,
            config=load_project_config(config_path)
            if config_path is not None and (config or config_path.exists())
            else None,
            catalog=load_catalog(catalog) if catalog else None,
            project_dir=directory,
            lineage_mode=settings.lineage_mode,
            principal=principal,
            roles=roles,
            stats=_warehouse_stats(settings, parsed) if estimate_cost else None,
            workers=workers or os.cpu_count() or 1,
        )
    except UsageError:
        raise
    except CdmeError as e:
        # Whatever stops validation from starting is bad input to this command (exit 2), not a finding.
        raise UsageError(str(e)) from e
    if output == "json":
        summary = {
            "errors": len(report.errors),
            "warnings": len(report.warnings),
            "unverifiable": sum(1 for f in report.findings if f.verdict == "UNVERIFIABLE"),
        }
        payload = {"summary": summary, **report.model_dump(mode="json")}
        payload["coverage"] |= {
            "model_share": report.coverage.model_share,
            "column_share": report.coverage.column_share,
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        for f in report.findings:
            where = f"{f.model}:{f.line}" if f.line else f.model
            typer.echo(f"{f.verdict:<12} {f.severity:<7} {f.code} {where}: {f.message}")
        c = report.coverage
        for cost in report.costs:
            typer.echo(
                f"COST         {cost.model}: ~{cost.rows if cost.rows is not None else '?'} rows, "
                f"widest step ~{cost.intermediate_rows if cost.intermediate_rows is not None else '?'}, "
                f"{cost.join_depth if cost.join_depth is not None else '?'} joins"
            )
        typer.echo(
            f"{len(report.errors)} errors, {len(report.warnings)} warnings; {c.models_fully_resolved}/{c.models} models "
            f"and {c.column_references_resolved}/{c.column_references} column references fully resolved"
        )
    if report.errors:
        raise typer.Exit(1)


@auth_app.command("token")
def auth_token() -> None:
    """Print the demo bearer token, creating it (and the tokens file) on first run."""
    typer.echo(ensure_demo_token(get_settings()))


# -- operations -------------------------------------------------------------------------------------------------

# The four services, each on its standard port (the defaults of CDME_<SERVICE>_URL): compose, k8s and the image
# all use these.
SERVICE_PORTS: dict[str, int] = {"validation": 8001, "adjoint": 8002, "lineage": 8003, "planner": 8004}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def _check_service(service: str) -> str:
    if service not in SERVICE_PORTS:
        msg = f"unknown service {service!r}; choose one of {', '.join(SERVICE_PORTS)}"
        raise UsageError(msg)
    if not _has_module(f"services.{service}.app"):
        msg = f"service {service!r} is not part of this installation (no services.{service}.app module)"
        raise UsageError(msg)
    return service


def migratable_services() -> list[str]:
    """The services of this installation that ship Alembic migrations, in `SERVICE_PORTS` order."""
    return [service for service in SERVICE_PORTS if _has_module(f"services.{service}.migrations")]


@app.command("serve")
def serve_command(
    service: Annotated[str, typer.Argument(help="validation, adjoint, lineage or planner.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0 in a container).")
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option("--port", min=1, max=65535, help="Port (default: the service's standard one)."),
    ] = None,
) -> None:
    """Serve one service in this process (uvicorn, one worker): what a container runs."""
    import uvicorn

    name = _check_service(service)
    settings = get_settings()
    # JSON lines on stdout from the first line on: uvicorn installs no handlers of its own (log_config=None).
    configure_logging(name, settings.log_level, settings.log_format)
    uvicorn.run(
        f"services.{name}.app:app",
        host=host,
        port=port or SERVICE_PORTS[name],
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=20,
    )


@app.command("migrate")
def migrate_command(
    service: Annotated[
        list[str] | None, typer.Option("--service", help="A service whose schema to migrate (repeatable).")
    ] = None,
    all_services: Annotated[
        bool, typer.Option("--all", help="Every service of this installation that has migrations.")
    ] = False,
) -> None:
    """Upgrade services' schemas (`cdme_<service>`) to their newest migration: the one-shot deploy step."""
    if bool(service) == all_services:
        msg = "name the services with --service, or pass --all (one of the two)"
        raise UsageError(msg)
    names = (
        migratable_services() if all_services else [_check_service(s) for s in dict.fromkeys(service or [])]
    )
    if not names:
        msg = "no service of this installation has migrations"
        raise UsageError(msg)
    engine = create_warehouse_engine(resolve_warehouse_url(get_settings()), pool_size=1)
    try:
        for name in names:
            revision = migrate(engine, name)
            typer.echo(f"{service_schema(name)}: at revision {revision or 'none'}")
    finally:
        engine.dispose()


# -- entry point ----------------------------------------------------------------------------------------------


def _crash_log(exc: BaseException) -> Path | None:
    try:
        logs = get_settings().home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / f"crash-{datetime.now(UTC):%Y%m%dT%H%M%S%f}.log"
        path.write_text("".join(traceback.format_exception(exc)))
    except (OSError, CdmeError):
        return None
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script's entry point)."""
    try:
        settings = get_settings()
        # The terminal gets results on stdout; diagnostics go to stderr in the configured format.
        configure_logging("cli", settings.log_level, settings.log_format, stream=sys.stderr)
        result = app(args=argv, standalone_mode=False, prog_name="cdme")
    except (typer.Exit, click.exceptions.Exit) as e:
        return int(e.exit_code)
    except (typer.Abort, click.exceptions.Abort):
        typer.echo("cdme: aborted", err=True)
        return 130
    except CdmeError as e:
        typer.echo(f"cdme: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("cdme: interrupted", err=True)
        return 130
    except Exception as e:
        # Typer vendors click, so usage errors are recognised by shape rather than by class.
        format_message = getattr(e, "format_message", None)
        exit_code = getattr(e, "exit_code", None)
        if callable(format_message) and isinstance(exit_code, int):
            prefix = "" if type(e).__name__ == "NoArgsIsHelpError" else "cdme: error: "
            typer.echo(f"{prefix}{format_message()}", err=True)
            return exit_code
        where = _crash_log(e)
        typer.echo(f"cdme: internal error: {type(e).__name__}: {e} (traceback in {where})", err=True)
        return 70
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
