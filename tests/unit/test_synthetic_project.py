"""The synthetic benchmark project: deterministic, layered, valid by construction; and how its figures print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli import bench as cli_bench
from services.cli.main import app, main
from services.core.artifacts import Manifest, parse_manifest
from services.validation.domain import Report, analysis, validate_project
from services.validation.domain.bench import run_validation_benchmark
from services.validation.domain.synthetic import EXTRA_COLUMN, change_one_model, synthetic_manifest

MODELS = 300


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Any], Manifest, Report]:
    data = synthetic_manifest(MODELS)
    manifest = parse_manifest(data, "synthetic")
    return data, manifest, validate_project(manifest)


def test_same_seed_gives_the_same_manifest() -> None:
    assert json.dumps(synthetic_manifest(120, seed=3)) == json.dumps(synthetic_manifest(120, seed=3))
    assert json.dumps(synthetic_manifest(120, seed=3)) != json.dumps(synthetic_manifest(120, seed=4))


@pytest.mark.parametrize("models", [3, 41, 250])
def test_the_requested_number_of_models(models: int) -> None:
    manifest = parse_manifest(synthetic_manifest(models), "synthetic")
    assert len(manifest.models()) == models
    assert {m.schema_ for m in manifest.models()} == {"staging", "intermediate", "marts"}


def test_too_few_models_for_three_layers() -> None:
    with pytest.raises(ValueError, match="at least 3 models"):
        synthetic_manifest(2)


def test_the_manifest_looks_like_a_compiled_dbt_project(
    project: tuple[dict[str, Any], Manifest, Report],
) -> None:
    _, manifest, _ = project
    assert manifest.metadata.adapter_type == "postgres"
    assert manifest.metadata.project_name == "synthetic"
    assert all(s.columns and all(c.data_type for c in s.columns.values()) for s in manifest.sources.values())
    known = set(manifest.nodes) | set(manifest.sources)
    for model in manifest.models():
        assert model.compiled_code and model.raw_code and model.relation_name
        assert model.database and model.alias == model.name
        assert model.depends_on.nodes and set(model.depends_on.nodes) <= known
        assert "{{" in model.raw_code and "{{" not in model.compiled_code
    staging = [m for m in manifest.models() if m.schema_ == "staging"]
    assert all(all(d.startswith("source.") for d in m.depends_on.nodes) for m in staging)
    marts = [m for m in manifest.models() if m.schema_ == "marts"]
    assert all(m.columns for m in marts)
    assert any(m.columns for m in manifest.models() if m.schema_ != "marts")
    assert any(not m.columns for m in manifest.models())
    sql = "\n".join(m.compiled_code or "" for m in manifest.models() if m.schema_ == "intermediate")
    for construct in ("join", "group by", "case", "over (partition by", "where"):
        assert construct in sql


def test_a_correct_validator_finds_nothing_wrong(project: tuple[dict[str, Any], Manifest, Report]) -> None:
    _, _, report = project
    assert report.errors == [], [f.message for f in report.errors[:5]]
    assert report.coverage.models == MODELS
    assert report.coverage.column_share > 0.95, report.coverage


def test_a_planted_mistake_is_found(project: tuple[dict[str, Any], Manifest, Report]) -> None:
    _, manifest, _ = project
    mart = next(m for m in manifest.models() if m.schema_ == "marts")
    code = mart.compiled_code or ""
    at = code.rindex("\nfrom final")
    broken = code[:at] + ",\n    no_such_column as oops" + code[at:]
    nodes = dict(manifest.nodes) | {mart.unique_id: mart.model_copy(update={"compiled_code": broken})}
    report = validate_project(manifest.model_copy(update={"nodes": nodes}))
    assert [(f.rule, f.model) for f in report.errors] == [("existence.column", mart.name)]


def test_one_model_changes_and_stays_valid(project: tuple[dict[str, Any], Manifest, Report]) -> None:
    data, _, _ = project
    before = json.dumps(data)
    changed = change_one_model(data, seed=1)
    assert json.dumps(data) == before, "the original must not be modified"
    differing = [uid for uid, node in data["nodes"].items() if node != changed["nodes"][uid]]
    assert len(differing) == 1
    node, original = changed["nodes"][differing[0]], data["nodes"][differing[0]]
    assert node["schema"] == "intermediate" and changed["child_map"][differing[0]]
    assert f"* 2 as {EXTRA_COLUMN}" in node["compiled_code"]
    assert node["compiled_code"].count("\n") == original["compiled_code"].count("\n") + 1
    assert change_one_model(data, seed=1) == changed
    report = validate_project(parse_manifest(changed, "changed"))
    assert report.errors == [], [f.message for f in report.errors[:5]]
    assert report.coverage.column_share > 0.95


def test_forked_workers_give_exactly_the_report_one_process_gives(
    project: tuple[dict[str, Any], Manifest, Report], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manifest, serial = project
    # Every level forks, however small, so the parallel path is the one under test.
    monkeypatch.setattr(analysis, "_PARALLEL_MIN_MODELS", 1)
    analysis._CACHE.clear()
    parallel = validate_project(manifest, workers=2)
    assert parallel == serial
    # The children's results were cached by the parent: a second run analyses nothing again.
    cached = len(analysis._CACHE)
    assert cached >= MODELS and validate_project(manifest, workers=2) == serial
    assert len(analysis._CACHE) == cached


def test_the_benchmark_reports_every_case_and_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "validate.json"
    result = run_validation_benchmark(1, synthetic_models=24, research_data=tmp_path / "none", out=out)
    assert json.loads(out.read_text()) == result
    assert [c["name"] for c in result["cases"]] == ["synthetic", "one change"]
    assert result["totals"] == {"real_models": 0, "real_seconds": 0, "errors": 0}
    assert [g["case"] for g in result["goals"]] == ["synthetic", "one change"]
    assert 1 <= result["cases"][1]["models_reanalysed"] < 24
    with pytest.raises(ValueError, match="repeat"):
        run_validation_benchmark(0, out=None)


FAKE_RESULT: dict[str, Any] = {
    "benchmark": "validate",
    "repeat": 3,
    "cases": [
        {"name": "jaffle-shop", "kind": "real", "models": 13, "median_seconds": 0.0523, "errors": 0},
        {"name": "synthetic", "kind": "synthetic", "models": 2000, "median_seconds": 7.5, "errors": 0},
        {
            "name": "one change",
            "kind": "one change",
            "models": 2000,
            "median_seconds": 0.25,
            "errors": 0,
            "models_reanalysed": 3,
        },
    ],
    "totals": {"real_models": 13, "real_seconds": 0.0523, "errors": 0},
    "goals": [
        {
            "case": "real",
            "goal": "about 700 real models in <= 3 s",
            "models": 13,
            "target_seconds": 0.0557,
            "measured_seconds": 0.0523,
            "ratio": 0.94,
            "met": True,
        },
        {
            "case": "one change",
            "goal": "one changed model in <= 100 ms",
            "models": 2000,
            "target_seconds": 0.1,
            "measured_seconds": 0.25,
            "ratio": 2.5,
            "met": False,
        },
    ],
    "machine": {"cpus": 2, "platform": "Linux", "python": "3.11.7", "load_average_before": 0.25},
    "measured_at": "2026-11-22T03:00:00+00:00",
}


def test_text_output_names_each_case_and_goal() -> None:
    lines = cli_bench.format_validation_benchmark(FAKE_RESULT)
    assert lines[0] == "jaffle-shop (13 models): 0.052 s"
    assert lines[1] == "synthetic (2,000 models): 7.500 s"
    assert lines[2] == "one change (2,000 models, 3 re-analysed): 0.250 s"
    assert lines[3] == "real projects: 13 models in 0.052 s; 0 errors in all cases"
    assert lines[4] == (
        "goal: about 700 real models in <= 3 s (13 models: <= 56 ms); measured 52 ms, 0.94x the goal: met"
    )
    assert lines[5] == "goal: one changed model in <= 100 ms; measured 250 ms, 2.50x the goal: missed"
    assert lines[6].startswith("median of 3 runs, 1 workers, on 2 CPUs")
    assert lines[6].endswith(", load average 0.25 before")


@pytest.mark.parametrize(("output", "errors", "code"), [("json", 0, 0), ("text", 0, 0), ("json", 2, 1)])
def test_the_command_prints_the_result(
    monkeypatch: pytest.MonkeyPatch, output: str, errors: int, code: int
) -> None:
    result = json.loads(json.dumps(FAKE_RESULT))
    result["totals"]["errors"] = errors
    monkeypatch.setattr(
        cli_bench,
        "run_validation_benchmark",
        lambda repeat, workers: result | {"repeat": repeat, "workers": workers or 2},
    )
    run = CliRunner().invoke(app, ["bench", "validate", "--repeat", "2", "--format", output])
    assert run.exit_code == code, run.output
    stdout = run.stdout
    if output == "json":
        assert json.loads(stdout) == result | {"repeat": 2, "workers": 2}
    else:
        assert stdout.splitlines()[0] == "jaffle-shop (13 models): 0.052 s"
        assert "written to" in stdout.splitlines()[-1]


def test_the_command_rejects_an_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "validate", "--format", "xml"]) == 2
    assert "--format must be text or json" in capsys.readouterr().err
