"""The interface every dbt runtime implements, and discovery through entry points."""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal

from services.core.errors import ConfigurationError, DbtError, UsageError, first_line

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
    """One SQL lint violation: the compiled file (relative to the target's `compiled/`), where, and which rule."""

    file: str
    line: int
    position: int
    code: str
    description: str


@dataclass(frozen=True)
class LintReport:
    """What linting a command's compiled SQL found; `available` is false when the runtime cannot lint."""

    available: bool
    findings: list[LintFinding] = field(default_factory=list)
    files: int = 0
    seconds: float = 0.0
    reason: str | None = None  # why nothing was linted (unavailable) or why linting stopped

    def as_output(self, kept: int) -> dict[str, Any]:
        """The report as a run step shows it, with at most `kept` findings (`total` counts them all)."""
        return {
            "available": self.available,
            "linter": _SQLFLUFF_NAME,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "total": len(self.findings),
            "findings": [asdict(f) for f in self.findings[:kept]],
            "reason": self.reason,
        }


_SQLFLUFF_NAME = "sqlfluff"
# Rules that compiled SQL breaks by construction, whatever the model says: dbt quotes every relation it
# renders (RF06), drops the trailing newline (LT12) and leaves a Jinja block's leading blank lines (LT13).
LINT_EXCLUDED_RULES = ("RF06", "LT12", "LT13")


def _sqlfluff_version() -> str | None:
    """`sqlfluff <version>` when it can be imported (the same test `lint` makes), else None."""
    try:
        import sqlfluff
    except ImportError:
        return None
    return f"{_SQLFLUFF_NAME} {sqlfluff.__version__}"


def compiled_sql_files(target_path: Path) -> list[Path]:
    """The compiled models, snapshots, analyses and singular tests under `<target>/compiled/`, sorted.

    Generic tests (compiled into a directory named after their YAML file) are dbt's macros, not the
    project's SQL, so they are left out.
    """
    root = target_path / "compiled"
    return sorted(p for p in root.rglob("*.sql") if p.parent.suffix not in {".yml", ".yaml"})


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
        """What this runtime is: its name, whether runs may overlap, its SQL linter, runtime-specific facts."""
        return {
            "name": self.name,
            "supports_parallel": self.supports_parallel,
            "sql_lint": _sqlfluff_version(),
        }

    def lint(self, outcome: DbtOutcome) -> LintReport:
        """Lint the SQL a command compiled (`<target>/compiled/`) with sqlfluff, when it is installed.

        The SQL is already rendered, so sqlfluff's `raw` templater reads it as it is, in the PostgreSQL
        dialect; a `.sqlfluff` in the project still chooses the rules (their exclusions are added to
        `LINT_EXCLUDED_RULES`). Lint is advisory: nothing here fails a run, and a runtime that keeps the compiled
        SQL elsewhere reports no files.
        """
        try:
            from sqlfluff.core import FluffConfig, Linter
        except ImportError:
            return LintReport(available=False, reason="sqlfluff is not installed (pip install sqlfluff)")
        files = compiled_sql_files(outcome.target_path)
        if not files:
            return LintReport(available=True, reason=f"no compiled SQL in {outcome.target_path / 'compiled'}")
        started = time.perf_counter()
        overrides: dict[str, Any] = {"dialect": "postgres", "templater": "raw"}
        root = outcome.target_path / "compiled"
        findings: list[LintFinding] = []
        try:
            project = FluffConfig.from_path(str(self.context.project_dir), overrides=overrides)
            configured = project.get("exclude_rules") or ""
            names = configured if isinstance(configured, list | tuple) else str(configured).split(",")
            excluded = {str(r).strip() for r in names if str(r).strip()}
            config = FluffConfig.from_path(
                str(self.context.project_dir),
                overrides={
                    **overrides,
                    "exclude_rules": ",".join(sorted(excluded | set(LINT_EXCLUDED_RULES))),
                },
            )
            linter = Linter(config=config)
            for path in files:
                relative = path.relative_to(root).as_posix()
                linted = linter.lint_string(path.read_text(), fname=relative)
                findings.extend(
                    LintFinding(
                        file=relative,
                        line=int(v.line_no),
                        position=int(v.line_pos),
                        code=str(v.rule_code()),
                        description=str(v.desc()),
                    )
                    for v in linted.get_violations()
                )
        except Exception as e:  # an advisory linter's own failure must not fail the run
            return LintReport(
                available=True,
                findings=findings,
                files=len(files),
                seconds=time.perf_counter() - started,
                reason=f"sqlfluff stopped: {type(e).__name__}: {first_line(e)}",
            )
        return LintReport(
            available=True, findings=findings, files=len(files), seconds=time.perf_counter() - started
        )


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
