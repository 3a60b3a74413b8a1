"""What a run is: the request that starts it, its steps in order, and the states both go through.

A run is `PENDING` until a worker takes it, `RUNNING` while its steps execute, and ends `COMPLETE`, `FAILED`
(with the step at fault and a one-line reason) or `CANCELLED`. Steps run in `STEPS` order; each ends
`succeeded`, `failed`, `skipped` (not applicable to this run) or `cancelled`. A step that is `succeeded` or
`skipped` is never run again, which is what makes resuming a run safe.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.core.ldm.config import LineageMode

RunStatus = Literal["PENDING", "RUNNING", "COMPLETE", "FAILED", "CANCELLED"]
StepStatus = Literal["pending", "running", "succeeded", "failed", "skipped", "cancelled"]
StepName = Literal["ingest", "validate", "dbt", "capture", "finalize"]
ValidationMode = Literal["gating", "advisory"]

STEPS: Final[tuple[StepName, ...]] = ("ingest", "validate", "dbt", "capture", "finalize")
ACTIVE: Final[frozenset[str]] = frozenset({"PENDING", "RUNNING"})
TERMINAL: Final[frozenset[str]] = frozenset({"COMPLETE", "FAILED", "CANCELLED"})
DONE_STEPS: Final[frozenset[str]] = frozenset({"succeeded", "skipped"})

_SELECTOR = (
    r"^[^\x00-\x1f]{1,500}$"  # dbt selection syntax is data to dbt; only control characters are refused
)


class RunRequest(BaseModel):
    """What a caller asks the planner to run (the body of `POST /runs`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project: str = Field(
        default="cdme_trading",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",
        description="The dbt project's name (dbt_project.yml `name`); it must be the project the planner runs.",
    )
    target: str = Field(
        default="dev", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The dbt target (`--target`)."
    )
    epoch: date = Field(description="The business date to run, passed to dbt as the var `epoch_date`.")
    vars: dict[str, Any] = Field(
        default_factory=dict, description="Further dbt vars; `epoch_date` is always the run's epoch."
    )
    select: list[str] = Field(
        default_factory=list, max_length=100, description="dbt `--select`, passed through."
    )
    exclude: list[str] = Field(
        default_factory=list, max_length=100, description="dbt `--exclude`, passed through."
    )
    selector: str | None = Field(default=None, pattern=_SELECTOR, description="dbt YAML selector name.")
    lineage_mode: LineageMode | None = Field(
        default=None, description="Overrides the lineage mode `cdme.yml` declares as default."
    )
    validation: ValidationMode = Field(
        default="gating",
        description="`gating`: a rejected validation stops the run before dbt; `advisory`: it is reported only.",
    )
    dry_run: bool = Field(
        default=False,
        description="Stop after validation and cost estimation; nothing is written to the warehouse.",
    )
    ingest: bool = Field(
        default=False,
        description="Load the epoch's files declared by sources in `meta.cdme.ingest` before validating.",
    )
    runtime: str = Field(
        default="local",
        pattern=r"^[a-z][a-z0-9_]{0,40}$",
        description="The dbt runtime plugin (entry-point group `cdme.dbt_runtimes`): local, inprocess, cloud.",
    )

    def dbt_vars(self) -> dict[str, Any]:
        """The vars dbt gets: the caller's, with `epoch_date` set to the run's epoch."""
        return {**self.vars, "epoch_date": self.epoch.isoformat()}

    def selection_args(self) -> list[str]:
        """`--select/--exclude/--selector` flags, values unchanged (dbt owns their syntax)."""
        args: list[str] = []
        for flag, values in (("--select", self.select), ("--exclude", self.exclude)):
            for value in values:
                if not value or any(ord(c) < 0x20 for c in value):
                    msg = f"{flag} value {value!r} is empty or holds control characters"
                    raise ValueError(msg)
            if values:
                args += [flag, *values]
        if self.selector:
            args += ["--selector", self.selector]
        return args


@dataclass(frozen=True)
class Step:
    """One step of a run as stored."""

    name: StepName
    status: StepStatus
    attempt: int
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None
    output: dict[str, Any]

    @property
    def seconds(self) -> float | None:
        """How long the last attempt took (None until it ended)."""
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class Run:
    """A run as stored: its request, state, and steps in order."""

    id: uuid.UUID
    principal: str
    request: RunRequest
    status: RunStatus
    reason: str | None
    failed_step: StepName | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    steps: list[Step] = field(default_factory=list)

    def step(self, name: StepName) -> Step:
        """The step called `name`."""
        return next(s for s in self.steps if s.name == name)

    @property
    def key(self) -> tuple[str, str, date]:
        """(project, target, epoch): at most one run per key is active."""
        return self.request.project, self.request.target, self.request.epoch
