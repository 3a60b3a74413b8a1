"""The three services a run calls, over HTTP with the service token, exactly as their contracts say.

- validation: `POST /validate` (or `POST /dry-run` for a dry run) with the compiled manifest and `cdme.yml`;
- adjoint: `POST /runs/{run_id}/capture` with the epoch, lineage mode, manifest and run results (idempotent);
- lineage: `POST /runs/{run_id}/finalize` with the epoch, artifact directory, dbt outcome, validation report id
  and the run's trace (idempotent).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from services.core.errors import CdmeError
from services.core.http import ServiceClient

_PEERS = ("validation", "adjoint", "lineage")


@dataclass(frozen=True)
class Peers:
    """Where the peer services are and how to call them."""

    validation_url: str
    adjoint_url: str
    lineage_url: str
    token: str | None
    timeout_s: float = 300.0
    retries: int = 3

    def _client(self, url: str) -> ServiceClient:
        return ServiceClient(url, token=self.token, timeout=self.timeout_s, retries=self.retries)

    def urls(self) -> dict[str, str]:
        """Each peer's base URL by name."""
        return {"validation": self.validation_url, "adjoint": self.adjoint_url, "lineage": self.lineage_url}

    def validate(self, body: dict[str, Any], *, dry_run: bool) -> dict[str, Any]:
        """The validation service's verdict on a compiled manifest (`/dry-run` adds cost estimates, stores nothing).

        Raises:
            UpstreamServiceError: The service failed or is unreachable.
        """
        with self._client(self.validation_url) as client:
            # Validation stores a report per call, so it is not retried on a lost answer; /dry-run stores nothing.
            path = "/dry-run" if dry_run else "/validate"
            result: dict[str, Any] = client.post(path, json=body, idempotent=dry_run).json()
            return result

    def capture(self, run_id: uuid.UUID, body: dict[str, Any]) -> dict[str, Any]:
        """The adjoint service's capture of a built run (idempotent, so retried).

        Raises:
            UpstreamServiceError: The service failed or is unreachable.
        """
        with self._client(self.adjoint_url) as client:
            result: dict[str, Any] = client.post(f"/runs/{run_id}/capture", json=body, idempotent=True).json()
            return result

    def finalize(self, run_id: uuid.UUID, body: dict[str, Any]) -> dict[str, Any]:
        """The lineage service's ledger, events and gate for a run (idempotent, so retried).

        Raises:
            UpstreamServiceError: The service failed or is unreachable.
        """
        with self._client(self.lineage_url) as client:
            result: dict[str, Any] = client.post(
                f"/runs/{run_id}/finalize", json=body, idempotent=True
            ).json()
            return result

    def ready(self) -> dict[str, str]:
        """Each peer's readiness: `ready`, or why not (one line)."""
        states: dict[str, str] = {}
        for name, url in self.urls().items():
            client = ServiceClient(url, token=self.token, timeout=2.0, retries=0)
            try:
                with client:
                    client.get("/readyz")
                states[name] = "ready"
            except CdmeError as e:
                states[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return states
