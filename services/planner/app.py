"""The planner service's ASGI app: `create_app()` wires the run routes onto the shared service scaffolding.

Run it (one process; the lifespan migrates `cdme_planner`, then resumes every unfinished run):

    CDME_WAREHOUSE_URL=postgresql://u:p@host:5432/db uvicorn services.planner.app:app --port 8004

It calls the validation, adjoint and lineage services at `CDME_VALIDATION_URL`, `CDME_ADJOINT_URL` and
`CDME_LINEAGE_URL` with `CDME_SERVICE_TOKEN`, runs dbt (`CDME_PROJECT_DIR`) through the runtime each run names,
and keeps each run's artifacts in `<CDME_RUNS_DIR>/<run_id>/`. `/readyz` also requires the three peers ready.
"""

from __future__ import annotations

from fastapi import FastAPI

from services.core.settings import CdmeSettings
from services.core.webapp import create_service_app
from services.planner import api

SERVICE = "planner"


def create_app(settings: CdmeSettings | None = None) -> FastAPI:
    """The planner service; nothing is read or connected until the lifespan starts.

    Args:
        settings: The settings to use (default: `get_settings()`, read when the app starts).
    """
    return create_service_app(
        SERVICE,
        title="CDME planner",
        summary="Runs a dbt project through validation, dbt, adjoint capture and lineage finalize, resumably.",
        routers=[api.router],
        settings=settings,
        open_state=api.open_state,
        ready_checks=[api.peers_ready],
    )


app = create_app()
