"""The lineage service's ASGI app: `create_app()` wires the routes onto the shared service scaffolding.

Run it (one process; the lifespan migrates `cdme_lineage`, then starts the outbox's delivery loop):

    CDME_WAREHOUSE_URL=postgresql://user:password@host:5432/db uvicorn services.lineage.app:app --port 8003

OpenLineage events go to `CDME_OPENLINEAGE_TRANSPORT` (`file`, the default, `http` with `CDME_OPENLINEAGE_URL`,
or `console`). Partitions come from `CDME_ADJOINT_URL` with `CDME_SERVICE_TOKEN`.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.core.settings import CdmeSettings
from services.core.webapp import create_service_app
from services.lineage import api

SERVICE = "lineage"


def create_app(settings: CdmeSettings | None = None) -> FastAPI:
    """The lineage service; nothing is read or connected until the lifespan starts.

    Args:
        settings: The settings to use (default: `get_settings()`, read when the app starts).
    """
    return create_service_app(
        SERVICE,
        title="CDME lineage",
        summary="Accounting ledger, run gate and OpenLineage events of each CDME run.",
        routers=[api.router],
        settings=settings,
        open_state=api.open_state,
    )


app = create_app()
