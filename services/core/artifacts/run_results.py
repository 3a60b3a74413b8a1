"""The fields of dbt's `run_results.json` (schema v4 to v6) that CDME reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field

from services.core.artifacts.base import ArtifactModel


class RunResultsMetadata(ArtifactModel):
    """`metadata` of a run."""

    dbt_schema_version: str
    dbt_version: str | None = None
    generated_at: datetime | None = None
    invocation_id: str | None = None


class TimingInfo(ArtifactModel):
    """One phase (`compile`, `execute`) of a node's execution."""

    name: str
    started_at: datetime | None = None
    completed_at: datetime | None = None


class NodeResult(ArtifactModel):
    """How one node fared: `success`, `error`, `skipped`, `pass`, `fail`, `warn`, ..."""

    unique_id: str
    status: str
    timing: list[TimingInfo] = Field(default_factory=list)
    thread_id: str | None = None
    execution_time: float = 0.0
    adapter_response: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None
    failures: int | None = None
    compiled_code: str | None = None
    relation_name: str | None = None

    @property
    def rows_affected(self) -> int | None:
        """The adapter's row count, when it reported one (views and tests do not)."""
        value = self.adapter_response.get("rows_affected")
        return value if isinstance(value, int) else None


class RunResults(ArtifactModel):
    """A dbt `run_results.json`."""

    metadata: RunResultsMetadata
    results: list[NodeResult] = Field(default_factory=list)
    elapsed_time: float = 0.0
    args: dict[str, Any] = Field(default_factory=dict)

    def by_id(self) -> dict[str, NodeResult]:
        """Results keyed by node id."""
        return {r.unique_id: r for r in self.results}
