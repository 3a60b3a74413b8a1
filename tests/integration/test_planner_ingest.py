"""The ingest step: declared CSV files checked against their contract, loaded with COPY all or nothing."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services.core.artifacts import parse_manifest
from services.core.ldm.model import IngestDecl
from services.core.migrations import migrate
from services.planner.domain.errors import IngestError
from services.planner.domain.ingest import contracts, ingest, resolve_location

EPOCH = date(2026, 11, 20)
HEADER = "trade_id,epoch_date,trade_ts,notional,currency,contact_email\n"
GOOD = (
    HEADER
    + "T1,2026-11-20,2026-11-20T09:00:00+00:00,1000.50,USD,a@example.com\n"
    + "T2,2026-11-20,2026-11-20T10:30:00+01:00,250,EUR,\n"
)


def _manifest(location: str = "trades/{epoch}.csv", fmt: str = "csv") -> Any:
    columns = {
        "trade_id": "text",
        "epoch_date": "date",
        "trade_ts": "timestamp with time zone",
        "notional": "numeric",
        "currency": "text",
        "contact_email": "text",
    }
    source = {
        "unique_id": "source.demo.landing.trades",
        "name": "trades",
        "source_name": "landing",
        "package_name": "demo",
        "schema": "landing",
        "identifier": "trades",
        "resource_type": "source",
        "columns": {
            name: {
                "name": name,
                "data_type": kind,
                "meta": {"cdme": {"sensitivity": "personal"}} if name == "contact_email" else {},
            }
            for name, kind in columns.items()
        },
        "config": {
            "meta": {
                "cdme": {
                    "key": "trade_id",
                    "epoch_column": "epoch_date",
                    "owner": "trading-platform",
                    "ingest": {"location": location, "format": fmt},
                }
            }
        },
    }
    data = {
        "metadata": {
            "dbt_schema_version": "https://schemas.getdbt.com/dbt/manifest/v12.json",
            "project_name": "demo",
        },
        "nodes": {},
        "sources": {source["unique_id"]: source},
    }
    return parse_manifest(data, "test manifest")


def _landing(tmp_path: Path, content: str) -> Path:
    landing = tmp_path / "landing"
    (landing / "trades").mkdir(parents=True)
    (landing / "trades" / f"{EPOCH}.csv").write_text(content)
    return landing


def test_contract_comes_from_meta_cdme_with_owner_and_personal_columns() -> None:
    (contract,) = contracts(_manifest())
    assert contract.table == "trades" and contract.epoch_column == "epoch_date"
    assert contract.owner == "trading-platform" and contract.personal == ["contact_email"]
    assert contract.columns["trade_ts"] == "timestamp with time zone"


@pytest.mark.parametrize(
    "location", ["../secrets/{epoch}.csv", "/etc/passwd", "a/../../{epoch}.csv", "{0}.csv"]
)
def test_locations_outside_the_landing_directory_are_rejected(tmp_path: Path, location: str) -> None:
    with pytest.raises(IngestError, match=r"landing directory|placeholder"):
        resolve_location(tmp_path, IngestDecl(location=location), EPOCH)


@pytest.mark.integration
class TestLoad:
    @pytest.fixture
    def url(self, new_database: Callable[[], str]) -> str:
        url = new_database()
        migrate(url, "planner")
        run_id = self.run_id = uuid.uuid4()
        with psycopg.connect(url) as conn:
            conn.execute(
                'insert into cdme_planner.runs (id, principal, project, target, epoch, vars, "select", exclude, '
                "validation, dry_run, ingest, runtime, status) values (%s, 't', 'demo', 'dev', %s, '{}', '[]', "
                "'[]', 'gating', false, true, 'local', 'RUNNING')",
                (run_id, EPOCH),
            )
        return url

    def _rows(self, url: str, query: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(url) as conn:
            return conn.execute(query).fetchall()

    def test_a_good_file_is_loaded_with_its_checkpoint(self, url: str, tmp_path: Path) -> None:
        landing = _landing(tmp_path, GOOD)
        output = ingest(_manifest(), landing, url, self.run_id, EPOCH)
        assert output["sources"][0]["rows"] == 2
        assert output["sources"][0]["personal_columns"] == ["contact_email"]
        rows = self._rows(url, "select trade_id, notional, contact_email from landing.trades order by 1")
        assert [(r[0], str(r[1]), r[2]) for r in rows] == [
            ("T1", "1000.50", "a@example.com"),
            ("T2", "250", None),
        ]
        checkpoint = self._rows(url, "select source, rows, digest from cdme_planner.input_checkpoints")
        assert checkpoint[0][:2] == ("source.demo.landing.trades", 2)
        assert checkpoint[0][2].startswith("sha256:")
        # Loading the epoch again replaces its rows: idempotent.
        ingest(_manifest(), landing, url, self.run_id, EPOCH)
        assert self._rows(url, "select count(*) from landing.trades")[0][0] == 2
        assert self._rows(url, "select count(*) from cdme_planner.input_checkpoints")[0][0] == 1

    @pytest.mark.parametrize(
        ("content", "where"),
        [
            (
                GOOD + "T3,2026-11-20,2026-11-20T11:00:00+00:00,12x,USD,\n",
                ":4:notional: '12x' is not a valid numeric",
            ),
            (
                GOOD + "T3,2026-11-21,2026-11-20T11:00:00+00:00,1,USD,\n",
                ":4:epoch_date: '2026-11-21' is not the run's epoch",
            ),
            (
                GOOD + "T3,2026-11-20,2026-11-20T11:00:00,1,USD,\n",
                ":4:trade_ts: '2026-11-20T11:00:00' is not a valid timestamp",
            ),
            (GOOD + "T3,2026-11-20\n", ":4: 2 fields, the header has 6"),
            (
                HEADER.replace("currency", "ccy") + "T1,2026-11-20,,1,USD,\n",
                ":1:ccy: column 5 is not a declared column",
            ),
            (
                HEADER.replace(",contact_email", "") + "T1,2026-11-20,,1,USD\n",
                ":1:contact_email: declared column missing",
            ),
        ],
    )
    def test_a_bad_file_is_rejected_at_file_line_column_and_nothing_is_loaded(
        self, url: str, tmp_path: Path, content: str, where: str
    ) -> None:
        landing = _landing(tmp_path, GOOD)
        ingest(_manifest(), landing, url, self.run_id, EPOCH)  # the epoch as it was before
        (landing / "trades" / f"{EPOCH}.csv").write_text(content)
        with pytest.raises(IngestError) as error:
            ingest(_manifest(), landing, url, self.run_id, EPOCH)
        assert f"{landing.resolve() / 'trades' / f'{EPOCH}.csv'}{where}" in str(error.value)
        assert self._rows(url, "select count(*) from landing.trades")[0][0] == 2

    def test_a_missing_file_names_the_path_and_epoch(self, url: str, tmp_path: Path) -> None:
        (tmp_path / "landing").mkdir()
        with pytest.raises(IngestError, match=f"no file for epoch {EPOCH} of source.demo.landing.trades"):
            ingest(_manifest(), tmp_path / "landing", url, self.run_id, EPOCH)
