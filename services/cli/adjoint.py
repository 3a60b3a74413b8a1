"""`cdme backward`, `cdme impact`, `cdme reconcile`: thin clients of the adjoint service (`CDME_ADJOINT_URL`).

They authenticate with `CDME_SERVICE_TOKEN` when set, else with the local demo token (`cdme auth token`).
Output is the service's JSON (`--format json`) or a short text rendering.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

import typer

from services.core.auth import ensure_demo_token
from services.core.errors import UsageError
from services.core.http import ServiceClient
from services.core.settings import CdmeSettings, get_settings


def _client(settings: CdmeSettings) -> ServiceClient:
    token = (
        settings.service_token.get_secret_value() if settings.service_token else ensure_demo_token(settings)
    )
    return ServiceClient.from_settings(settings.adjoint_url, settings, token=token)


def _check_format(output: str) -> None:
    if output not in {"json", "text"}:
        msg = f"--format must be text or json, got {output!r}"
        raise UsageError(msg)


def _echo_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))


Format = Annotated[str, typer.Option("--format", help="text or json.")]
RunOption = Annotated[
    str | None, typer.Option("--run-id", help="The run (default: the latest that captured it).")
]


def backward_command(
    model: Annotated[str, typer.Argument(help="The model (or source) whose record to trace.")],
    key: Annotated[str, typer.Argument(help="The record's cdme-key/v1 key (components joined by '|').")],
    to: Annotated[
        str | None, typer.Option("--to", help="Only this upstream, e.g. raw_trading.trades.")
    ] = None,
    depth: Annotated[int | None, typer.Option("--depth", min=1, help="At most this many hops.")] = None,
    records: Annotated[bool, typer.Option("--records", help="Also print the contributing rows.")] = False,
    run_id: RunOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Page size.")] = 1000,
    cursor: Annotated[str | None, typer.Option("--cursor", help="`next` of the previous page.")] = None,
    output: Format = "text",
) -> None:
    """Trace a record back to the upstream records it came from."""
    _check_format(output)
    settings = get_settings()
    params: dict[str, Any] = {"limit": limit, "records": records}
    for name, value in (("to", to), ("depth", depth), ("run_id", run_id), ("cursor", cursor)):
        if value is not None:
            params[name] = value
    with _client(settings) as client:
        body = client.get(f"/backward/{quote(model, safe='')}/{quote(key, safe='')}", params=params).json()
    if output == "json":
        _echo_json(body)
        return
    typer.echo(f"run {body['run_id']}: {body['model']} {body['key']} <- {len(body['contributions'])} records")
    for c in body["contributions"]:
        line = f"  {c['entity']:<32} {c['key']:<40} via {' <- '.join(c['path'])}"
        if c.get("run_id") not in (None, body["run_id"]):
            line += f"  (run {c['run_id']})"
        if records and c.get("record") is not None:
            line += f"  {json.dumps(c['record'])}"
        typer.echo(line)
    for u in body.get("unresolved") or []:
        typer.echo(f"  unresolved: {u['entity']} {u['key']} via {' <- '.join(u['path'])}: {u['reason']}")
    if body.get("next"):
        typer.echo(f"more: --cursor {body['next']}")


def impact_command(
    entity: Annotated[str, typer.Argument(help="The model or source the keys belong to.")],
    keys: Annotated[list[str], typer.Argument(help="cdme-key/v1 keys.")],
    depth: Annotated[int | None, typer.Option("--depth", min=1, help="At most this many hops.")] = None,
    run_id: RunOption = None,
    output: Format = "text",
) -> None:
    """List every downstream record the given records affect."""
    _check_format(output)
    settings = get_settings()
    request: dict[str, Any] = {"entity": entity, "keys": keys}
    if depth is not None:
        request["depth"] = depth
    if run_id is not None:
        request["run_id"] = run_id
    with _client(settings) as client:
        body = client.post("/impact", json=request, idempotent=True).json()
    if output == "json":
        _echo_json(body)
        return
    typer.echo(f"run {body['run_id']}: {body['keys']} keys of {body['entity']} affect")
    for a in body["affected"]:
        typer.echo(f"  {a['model']:<32} {a['count']:>10,} records via {' -> '.join(a['path'])}")


def reconcile_command(
    run_id: Annotated[str, typer.Argument(help="The captured run.")],
    output: Format = "text",
) -> None:
    """Reconcile a captured run per morphism: exact, superset or violation. Exits 1 on a violation."""
    _check_format(output)
    settings = get_settings()
    with _client(settings) as client:
        body = client.post(f"/runs/{quote(run_id, safe='')}/reconcile", idempotent=True).json()
    if output == "json":
        _echo_json(body)
    else:
        typer.echo(f"run {body['run_id']} ({body['lineage_mode']}): {body['status']}")
        for m in body["morphisms"]:
            detail = "; ".join(m["problems"])
            samples = f" e.g. {', '.join(m['samples'][:3])}" if m["samples"] else ""
            typer.echo(f"  {m['model']:<32} <- {m['upstream']:<28} {m['status']:<9} {detail}{samples}")
    if body["status"] == "violation":
        raise typer.Exit(1)
