"""`cdme services`, `cdme run`, `cdme runs`, `cdme run-logs`: the pipeline over HTTP only.

`cdme run` asks the planner service to run an epoch and follows it step by step; it never touches dbt or the
warehouse itself. Exit status: 0 for a COMPLETE run; 1 for a FAILED or CANCELLED one, after one line
`cdme: error: run <id> FAILED at <step>: <reason>`; a `CdmeError`'s own code when the planner cannot be asked.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from datetime import date
from typing import Annotated, Any

import httpx
import psycopg
import typer
from psycopg import sql

from services.cli import stack
from services.core.auth import ensure_demo_token
from services.core.errors import CdmeError, ConflictError, UsageError
from services.core.http import ServiceClient, UpstreamHttpError
from services.core.settings import CdmeSettings, get_settings
from services.core.warehouse import libpq_url, resolve_warehouse_url
from services.datagen.trading import parse_epoch

services_app = typer.Typer(help="The four CDME services as local processes.", no_args_is_help=True)

# Each poll would be an INFO line of httpx's on the terminal.
logging.getLogger("httpx").setLevel(logging.WARNING)

_TERMINAL = frozenset({"COMPLETE", "FAILED", "CANCELLED"})
_POLL_S = 0.5


class RunFailedError(CdmeError):
    """The run ended FAILED or CANCELLED; the message names the step and reason."""

    exit_code = 1


def _token(settings: CdmeSettings) -> str:
    if settings.service_token is not None:
        return settings.service_token.get_secret_value()
    return ensure_demo_token(settings)


def _client(settings: CdmeSettings, service: str, *, timeout: float | None = None) -> ServiceClient:
    url = stack.service_urls(settings)[service]
    return ServiceClient(url, token=_token(settings), timeout=timeout or settings.http_timeout_s, retries=2)


def planner_client(settings: CdmeSettings) -> ServiceClient:
    """A client of the running planner service, with the CLI's token."""
    return _client(settings, "planner")


# -- services -------------------------------------------------------------------------------------------------


@services_app.command("start")
def services_start() -> None:
    """Start the services that are not running (on free loopback ports), reuse the others; wait until live."""
    settings = get_settings()
    for current in stack.start(settings, libpq_url(resolve_warehouse_url(settings))):
        typer.echo(current.describe())


@services_app.command("stop")
def services_stop() -> None:
    """Stop the running services by their pids."""
    stopped = stack.stop(get_settings())
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else "no service was running")


@services_app.command("status")
def services_status() -> None:
    """Each service's pid, URL and readiness; exits 3 if one that is installed is not running."""
    settings = get_settings()
    down = False
    for name in stack.SERVICES:
        current = stack.state(settings, name)
        line = current.describe()
        if current.alive and current.url:
            try:
                ready = httpx.get(f"{current.url}/readyz", timeout=3)
                line += "  ready" if ready.status_code == 200 else f"  not ready: {_detail(ready)}"
            except httpx.HTTPError as e:
                line += f"  not ready: {type(e).__name__}"
        down = down or (current.installed and not current.alive)
        typer.echo(line)
    if down:
        raise typer.Exit(3)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    return str(body.get("detail") or body) if isinstance(body, dict) else str(body)


# -- runs -----------------------------------------------------------------------------------------------------


def _describe_step(step: dict[str, Any]) -> str:
    name, status = step["step"], step["status"]
    seconds = step.get("duration_seconds")
    line = f"  {name:<9} {status:<10}"
    if seconds is not None and status in {"succeeded", "failed"}:
        line += f" {seconds:7.1f} s"
    output = step.get("output") or {}
    if status == "failed" and step.get("error"):
        line += f"  {step['error']}"
    elif name == "validate" and output.get("summary"):
        s = output["summary"]
        line += f"  {output.get('status')}: {s.get('errors', 0)} errors, {s.get('warnings', 0)} warnings"
        lint = output.get("lint") or {}
        if lint.get("available"):
            line += f"; SQL lint: {lint.get('total', 0)} findings in {lint.get('files', 0)} files"
    elif name == "ingest" and output.get("sources"):
        line += "  " + ", ".join(f"{x['source']}: {x['rows']:,} rows" for x in output["sources"])
    elif name == "capture" and status == "succeeded":
        line += f"  {output.get('captured', 0)} models captured ({output.get('lineage_mode')}), {output.get('pairs', 0):,} pairs"
    elif name == "finalize" and output.get("ledger"):
        line += f"  ledger {output['ledger'].get('status')}, {output.get('events', 0)} events"
    return line


def follow_run(client: ServiceClient, run_id: str, *, echo: bool = True) -> dict[str, Any]:
    """Poll the run until it ends, printing each step when its status changes; return the final run."""
    seen: dict[str, str] = {}
    while True:
        run: dict[str, Any] = client.get(f"/runs/{run_id}").json()
        for step in run["steps"]:
            if seen.get(step["step"]) != step["status"] and step["status"] not in {"pending"}:
                seen[step["step"]] = step["status"]
                if echo and not (step["status"] == "skipped" and run["status"] not in _TERMINAL):
                    typer.echo(_describe_step(step))
        if run["status"] in _TERMINAL:
            return run
        time.sleep(_POLL_S)


def _summary(settings: CdmeSettings, run: dict[str, Any]) -> None:
    steps = {s["step"]: s for s in run["steps"]}
    validate = steps["validate"].get("output") or {}
    findings = validate.get("findings") or []
    counts = validate.get("summary") or {}
    typer.echo(
        f"validation: {validate.get('status')} ({counts.get('errors', 0)} errors, "
        f"{counts.get('warnings', 0)} warnings, {counts.get('unverifiable', 0)} unverifiable)"
    )
    for finding in findings[:5]:
        where = finding.get("model") or ""
        if finding.get("line"):
            where += f":{finding['line']}"
        typer.echo(f"  {finding.get('severity')} {finding.get('code')} {where}: {finding.get('message')}")
    finalize = steps["finalize"].get("output") or {}
    ledger = finalize.get("ledger") or {}
    if ledger:
        counts = ", ".join(f"{k}={v}" for k, v in ledger.items() if k not in {"status", "path"})
        typer.echo(f"ledger: {ledger.get('status')} ({counts}); {ledger.get('path')}")
    links = run.get("links") or {}
    for name in ("events", "proof", "ledger", "validation_report"):
        if name in links:
            typer.echo(f"{name}: {links[name]}")
    if settings.openlineage_transport == "file":
        typer.echo(f"OpenLineage events file: {settings.openlineage_events_file}")
    if run["status"] == "COMPLETE" and not run["request"]["dry_run"]:
        _backward_example(settings, run)


def _encode_key(components: list[str | None]) -> str:
    # cdme-key/v1 (the adjoint service's documented encoding): `%` -> %25, `|` -> %7C, NULL -> %N, joined by |.
    return "|".join("%N" if c is None else c.replace("%", "%25").replace("|", "%7C") for c in components)


def _backward_example(settings: CdmeSettings, run: dict[str, Any], mart: str = "fct_daily_positions") -> None:
    """Trace one record of a mart back to the raw trades it came from, through the adjoint service."""
    with _client(settings, "adjoint") as adjoint:
        partitions = adjoint.get(f"/runs/{run['id']}/partitions").json()
        morphism = next((m for m in partitions.get("morphisms", []) if m.get("model") == mart), None)
        if morphism is None:
            typer.echo(f"backward trace: {mart} was not captured in this run")
            return
        relation = str(morphism["relation"]).split(".")
        fields = list(morphism["target_key_fields"])
        query = sql.SQL("select {} from {} order by 1, 2 limit 1").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(f)) for f in fields),
            sql.Identifier(*relation[-2:]),
        )
        url = libpq_url(resolve_warehouse_url(settings))
        with psycopg.connect(url, connect_timeout=10, options="-c DateStyle=ISO,YMD -c TimeZone=UTC") as conn:
            row = conn.execute(query).fetchone()
        if row is None:
            typer.echo(f"backward trace: {mart} is empty")
            return
        key = _encode_key(list(row))
        path = f"/backward/{urllib.parse.quote(mart, safe='')}/{urllib.parse.quote(key, safe='')}"
        trace = adjoint.get(path, params={"to": "raw_trading.trades", "run_id": run["id"]}).json()
    contributions = trace.get("contributions") or []
    keys = [str(c.get("key")) for c in contributions]
    typer.echo(
        f"backward trace: {mart} [{key}] <- {len(keys)} raw trades"
        + (" (more on the next page)" if trace.get("next") else "")
        + (f": {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" if keys else "")
    )
    if contributions:
        typer.echo(f"  path: {' <- '.join(contributions[0].get('path') or [])}")


def run_command(
    epoch: Annotated[str, typer.Option("--epoch", help="Business date, YYYY-MM-DD.")],
    target: Annotated[str, typer.Option("--target", help="dbt target.")] = "dev",
    project: Annotated[str, typer.Option("--project", help="dbt project name.")] = "cdme_trading",
    select: Annotated[list[str] | None, typer.Option("--select", "-s", help="dbt --select.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="dbt --exclude.")] = None,
    selector: Annotated[str | None, typer.Option("--selector", help="dbt YAML selector.")] = None,
    dbt_vars: Annotated[str | None, typer.Option("--vars", help="Further dbt vars as JSON.")] = None,
    lineage_mode: Annotated[
        str | None, typer.Option("--lineage-mode", help="full, key_derivable or summary.")
    ] = None,
    advisory: Annotated[
        bool, typer.Option("--advisory", help="A rejected validation does not stop the run.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and estimate cost only; write nothing.")
    ] = False,
    ingest: Annotated[bool, typer.Option("--ingest", help="Load the epoch's declared files first.")] = False,
    runtime: Annotated[
        str, typer.Option("--runtime", help="dbt runtime: local, inprocess, cloud.")
    ] = "local",
    resume: Annotated[
        str | None, typer.Option("--resume", help="Resume this run instead of starting one.")
    ] = None,
    summary: Annotated[
        bool, typer.Option("--summary", help="Print findings, ledger and links at the end.")
    ] = False,
    output: Annotated[str, typer.Option("--format", help="text or json (the final run).")] = "text",
) -> None:
    """Run an epoch through the planner service, showing each step as it ends; exit 0 only for COMPLETE."""
    if output not in {"text", "json"}:
        msg = f"--format must be text or json, got {output!r}"
        raise UsageError(msg)
    settings = get_settings()
    day: date = parse_epoch(epoch)
    extra: dict[str, Any] = {}
    if dbt_vars:
        try:
            extra = json.loads(dbt_vars)
        except json.JSONDecodeError as e:
            msg = f"--vars is not JSON: {e}"
            raise UsageError(msg) from e
        if not isinstance(extra, dict):
            msg = "--vars must be a JSON object"
            raise UsageError(msg)
    body: dict[str, Any] = {
        "project": project,
        "target": target,
        "epoch": day.isoformat(),
        "vars": extra,
        "select": select or [],
        "exclude": exclude or [],
        "selector": selector,
        "lineage_mode": lineage_mode,
        "validation": "advisory" if advisory else "gating",
        "dry_run": dry_run,
        "ingest": ingest,
        "runtime": runtime,
    }
    text = output == "text"
    with _client(settings, "planner") as planner:
        try:
            if resume:
                started = planner.post(f"/runs/{urllib.parse.quote(resume, safe='')}/resume").json()
            else:
                started = planner.post("/runs", json=body).json()
        except UpstreamHttpError as e:
            detail = (e.problem or {}).get("detail") or str(e)
            msg = f"the planner refused the run: {detail}"
            if e.status == 409:
                raise ConflictError(msg) from e
            if e.status in {400, 404, 422}:
                raise UsageError(msg) from e
            raise
        run_id = started["id"]
        if text:
            typer.echo(
                f"run {run_id}: project {project}, target {target}, epoch {day}"
                + (" (dry run)" if dry_run else "")
                + (" (resumed)" if resume else "")
            )
        run = follow_run(planner, run_id, echo=text)
    if text:
        typer.echo(f"run {run_id} {run['status']}")
        if summary:
            _summary(settings, run)
    else:
        typer.echo(json.dumps(run))
    if run["status"] != "COMPLETE":
        msg = f"run {run_id} {run['status']}: {run.get('reason') or 'no reason recorded'}"
        raise RunFailedError(msg)


def runs_command(
    status: Annotated[str | None, typer.Option("--status", help="Only runs in this status.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200)] = 10,
) -> None:
    """The latest runs, newest first: id, status, epoch, failed step and reason."""
    settings = get_settings()
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    with _client(settings, "planner") as planner:
        page = planner.get("/runs", params=params).json()
    for run in page["runs"]:
        where = f"  {run['reason']}" if run.get("reason") else ""
        typer.echo(f"{run['id']}  {run['status']:<9} {run['request']['epoch']}  {run['created_at']}{where}")
    typer.echo(f"{len(page['runs'])} of {page['total']} runs")


def run_logs_command(
    run_id: Annotated[str, typer.Argument(help="The run whose dbt log to stream.")],
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Stream until the run ends.")] = True,
) -> None:
    """Dbt's log messages of a run, streamed from the planner (server-sent events)."""
    settings = get_settings()
    url = f"{stack.service_urls(settings)['planner']}/runs/{urllib.parse.quote(run_id, safe='')}/logs"
    headers = {"Authorization": f"Bearer {_token(settings)}"}
    with httpx.stream("GET", url, headers=headers, params={"follow": follow}, timeout=None) as response:
        if response.status_code >= 400:
            response.read()
            msg = f"the planner answered {response.status_code}: {_detail(response)}"
            raise CdmeError(msg)
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if event == "end":
                    typer.echo(
                        f"run {data['status']}" + (f": {data['reason']}" if data.get("reason") else "")
                    )
                else:
                    info = data.get("info", {}) if isinstance(data, dict) else {}
                    typer.echo(f"{info.get('ts', '')[:19]} {info.get('level', ''):<5} {info.get('msg', '')}")
