"""The adjoint service's ASGI app: `create_app()` wires the routes onto the shared service scaffolding.

Run it (one process; the lifespan migrates `cdme_adjoint` before the first request is served):

    CDME_WAREHOUSE_URL=postgresql://user:password@host:5432/db uvicorn services.adjoint.app:app --port 8002

The service must reach the warehouse dbt built into: capture runs its SQL there, and `cdme_adjoint` lives there.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.adjoint import api
from services.core.settings import CdmeSettings
from services.core.webapp import create_service_app

SERVICE = "adjoint"


def create_app(settings: CdmeSettings | None = None) -> FastAPI:
    """The adjoint service; nothing is read or connected until the lifespan starts.

    Args:
        settings: The settings to use (default: `get_settings()`, read when the app starts).
    """
    return create_service_app(
        SERVICE,
        title="CDME adjoint",
        summary="Record-level lineage of every run: backward, impact, reconciliation and accounting.",
        routers=[api.router],
        settings=settings,
        open_state=api.open_state,
    )


app = create_app()
