"""SQL lint of a run's compiled SQL: real sqlfluff when it is installed, reported unavailable when it is not."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from services.planner.runtimes import DbtOutcome, RuntimeContext, load_runtime
from services.planner.runtimes.base import DbtRuntime

# Compiled as dbt writes it: quoted relations, no trailing newline. `SELECT` beside `from` breaks the
# capitalisation rule (CP01), `a,b` the spacing rule (LT01) and two targets on the select line LT09; the quoting
# (RF06) and the missing newline (LT12) are excluded because compiled SQL always has them.
MODEL = 'SELECT a,b\nfrom "db"."analytics"."trades"'


def _runtime(project_dir: Path) -> DbtRuntime:
    context = RuntimeContext(
        project_dir=project_dir,
        warehouse_url="postgresql://unused",
        pepper=None,
        schema="analytics",
        target="dev",
    )
    return load_runtime("local", context)


def _compiled(tmp_path: Path) -> DbtOutcome:
    target = tmp_path / "target"
    models = target / "compiled" / "demo" / "models"
    models.mkdir(parents=True)
    (models / "trades.sql").write_text(MODEL)
    # A generic test is dbt's macro compiled into a directory named after the YAML file: not linted.
    (models / "schema.yml").mkdir()
    (models / "schema.yml" / "not_null_trades_a.sql").write_text("SELECT a,b from t")
    return DbtOutcome("compile", True, target)


def test_compiled_models_are_linted_with_file_line_position_rule_and_description(tmp_path: Path) -> None:
    report = _runtime(tmp_path).lint(_compiled(tmp_path))
    assert report.available and report.reason is None
    assert report.files == 1
    found = {(f.file, f.line, f.position, f.code) for f in report.findings}
    assert found == {
        ("demo/models/trades.sql", 1, 1, "LT09"),  # select targets on their own lines
        ("demo/models/trades.sql", 1, 10, "LT01"),  # no space after the comma
        ("demo/models/trades.sql", 2, 1, "CP01"),  # `from` after `SELECT`
    }
    lt01 = next(f for f in report.findings if f.code == "LT01")
    assert "whitespace" in lt01.description.lower()
    output = report.as_output(kept=1)
    assert output["total"] == len(report.findings) and len(output["findings"]) == 1
    assert set(output["findings"][0]) == {"file", "line", "position", "code", "description"}
    assert _runtime(tmp_path).metadata()["sql_lint"].startswith("sqlfluff ")


def test_the_project_sqlfluff_config_chooses_the_rules(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / ".sqlfluff").write_text("[sqlfluff]\nexclude_rules = CP01\n")
    report = _runtime(project).lint(_compiled(tmp_path))
    codes = {f.code for f in report.findings}
    assert "LT01" in codes and "CP01" not in codes and "RF06" not in codes


def test_no_compiled_sql_is_said_not_an_error(tmp_path: Path) -> None:
    report = _runtime(tmp_path).lint(DbtOutcome("compile", True, tmp_path / "empty"))
    assert report.available and report.files == 0 and report.findings == []
    assert report.reason is not None and "no compiled SQL" in report.reason


def test_without_sqlfluff_lint_is_reported_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def without_sqlfluff(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sqlfluff" or name.startswith("sqlfluff."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_sqlfluff)
    runtime = _runtime(tmp_path)
    report = runtime.lint(_compiled(tmp_path))
    assert not report.available and report.findings == [] and report.files == 0
    assert report.reason == "sqlfluff is not installed (pip install sqlfluff)"
    assert runtime.metadata()["sql_lint"] is None
    assert report.as_output(kept=10)["available"] is False
