"""The validation service's ASGI app: `create_app()` wires the routes onto the shared service scaffolding.

Run it (one process; the lifespan migrates `cdme_validation` before the first request is served):

    CDME_WAREHOUSE_URL=postgresql://user:password@host:5432/db uvicorn services.validation.app:app --port 8001

Without `CDME_WAREHOUSE_URL` the embedded PostgreSQL must be running (`cdme warehouse start`). Clients send
`Authorization: Bearer <token>` (tokens from `CDME_AUTH_TOKENS` or the tokens file; `cdme auth token` prints
the demo's). `/livez`, `/readyz`, `/metrics` and `/docs` need no token. Errors, request ids, body limits and
metrics are `services.core.webapp`'s, the same in every CDME service.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.core.settings import CdmeSettings
from services.core.webapp import create_service_app
from services.validation import api

SERVICE = "validation"


def create_app(settings: CdmeSettings | None = None) -> FastAPI:
    """The validation service; nothing is read or connected until the lifespan starts.

    Args:
        settings: The settings to use (default: `get_settings()`, read when the app starts).

    Examples:
        >>> app = create_app(CdmeSettings(warehouse_url="postgresql://u:p@db:5432/cdme", auth_tokens="t=ci:ops"))
    """
    return create_service_app(
        SERVICE,
        title="CDME validation",
        summary="Is this dbt model safe to run? Static validation of a compiled project before dbt runs.",
        routers=[api.router],
        settings=settings,
        open_state=api.open_state,
    )


app = create_app()
