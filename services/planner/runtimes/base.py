"""The interface every dbt runtime implements, and discovery through entry points."""

from __future__ import annotations

import importlib.util
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

from services.core.errors import ConfigurationError, DbtError, UsageError

ENTRY_POINT_GROUP = "cdme.dbt_runtimes"
DbtCommand = Literal["compile", "build", "run", "test"]


@dataclass(frozen=True)
class RuntimeContext:
    """What every runtime needs to know about the project and the warehouse it runs against."""

    project_dir: Path
    warehouse_url: str
    pepper: str | None
    schema: str
    target: str


@dataclass
class DbtCall:
    """One dbt command for a run: where its artifacts go, its vars and selection, how to stop it."""

    target_path: Path
    vars: dict[str, Any]
    selection: list[str] = field(default_factory=list)
    full_refresh: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[str], None] | None = None

    def args(self, command: DbtCommand) -> list[str]:
        """Dbt's command line (without `dbt`): the command, `--vars` as JSON, selection flags unchanged."""
        args = [command, "--vars", json.dumps(self.vars, sort_keys=True), *self.selection]
        if command == "compile":
            # Compiling needs no relation cache: validation runs before any model exists.
            args.append("--no-populate-cache")
        if self.full_refresh and command in {"build", "run"}:
            args.append("--full-refresh")
        return args


@dataclass(frozen=True)
class DbtOutcome:
    """How a dbt command ended, and where its artifacts are."""

    command: DbtCommand
    succeeded: bool
    target_path: Path
    error: str | None = None
    cancelled: bool = False

    @property
    def manifest_path(self) -> Path:
        """`manifest.json` of this command."""
        return self.target_path / "manifest.json"

    @property
    def run_results_path(self) -> Path:
        """`run_results.json` of this command (missing when dbt stopped before writing it)."""
        return self.target_path / "run_results.json"


@dataclass(frozen=True)
class LintFinding:
    """One SQL lint violation."""

    path: str
    line: int
    column: int
    code: str
    message: str


class DbtRuntime(ABC):
    """Runs dbt commands for the planner; one instance serves every run of the process."""

    name: ClassVar[str]
    supports_parallel: ClassVar[bool] = True

    def __init__(self, context: RuntimeContext) -> None:
        self.context = context

    @abstractmethod
    def execute(self, command: DbtCommand, call: DbtCall) -> DbtOutcome:
        """Run one dbt command and wait for it; artifacts end up in `call.target_path`.

        Raises:
            DbtError: dbt could not be started at all (a failing dbt is an unsuccessful outcome instead).
        """

    def compile(self, call: DbtCall) -> DbtOutcome:
        """`dbt compile`: a manifest with compiled SQL, nothing built."""
        return self.execute("compile", call)

    def build(self, call: DbtCall) -> DbtOutcome:
        """`dbt build`: seeds, snapshots, models and tests in DAG order."""
        return self.execute("build", call)

    def run(self, call: DbtCall) -> DbtOutcome:
        """`dbt run`: models only."""
        return self.execute("run", call)

    def test(self, call: DbtCall) -> DbtOutcome:
        """`dbt test`: data tests only."""
        return self.execute("test", call)

    def fetch_artifacts(self, outcome: DbtOutcome) -> dict[str, Path]:
        """The artifacts of a finished command that exist, by name (`manifest.json`, `run_results.json`, ...).

        Remote runtimes download them into `outcome.target_path` first.
        """
        names = ("manifest.json", "run_results.json", "catalog.json")
        return {n: outcome.target_path / n for n in names if (outcome.target_path / n).is_file()}

    def metadata(self) -> dict[str, Any]:
        """What this runtime is: its name, whether runs may overlap, and runtime-specific facts."""
        return {"name": self.name, "supports_parallel": self.supports_parallel}

    def lint(self, paths: list[Path]) -> list[LintFinding] | None:
        """Lint SQL files with sqlfluff (PostgreSQL dialect); None when sqlfluff is not installed."""
        if importlib.util.find_spec("sqlfluff") is None:
            return None
        import sqlfluff  # type: ignore[import-not-found,unused-ignore]  # optional dependency

        findings: list[LintFinding] = []
        for path in paths:
            for violation in sqlfluff.lint(path.read_text(), dialect="postgres"):
                findings.append(
                    LintFinding(
                        path=str(path),
                        line=int(violation.get("start_line_no", 0)),
                        column=int(violation.get("start_line_pos", 0)),
                        code=str(violation.get("code", "")),
                        message=str(violation.get("description", "")),
                    )
                )
        return findings


def available_runtimes() -> dict[str, Any]:
    """The runtimes installed, by name, as entry points (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_runtime(name: str, context: RuntimeContext) -> DbtRuntime:
    """Build the runtime called `name` from its entry point.

    Raises:
        UsageError: No runtime of that name is installed.
        ConfigurationError: The entry point does not name a `DbtRuntime` subclass.
    """
    found = available_runtimes().get(name)
    if found is None:
        known = ", ".join(sorted(available_runtimes())) or "none (reinstall CDME: pip install -e .)"
        msg = f"unknown dbt runtime {name!r}; installed: {known}"
        raise UsageError(msg)
    try:
        factory = found.load()
    except (ImportError, AttributeError) as e:
        msg = f"dbt runtime {name!r} cannot be loaded from {found.value}: {e}"
        raise ConfigurationError(msg) from e
    if not (isinstance(factory, type) and issubclass(factory, DbtRuntime)):
        msg = f"dbt runtime {name!r} ({found.value}) is not a DbtRuntime subclass"
        raise ConfigurationError(msg)
    return factory(context)


def require_artifact(outcome: DbtOutcome, name: str) -> Path:
    """The path of an artifact the command must have written.

    Raises:
        DbtError: It is missing.
    """
    path = outcome.target_path / name
    if not path.is_file():
        msg = f"dbt {outcome.command} wrote no {name} in {outcome.target_path}"
        raise DbtError(msg)
    return path
