"""Transport selection from settings and the file and console transports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.errors import ConfigurationError
from services.core.settings import CdmeSettings
from services.lineage.delivery import (
    ConsoleTransport,
    DeliveryError,
    FileTransport,
    HttpTransport,
    transport_from_settings,
)

EVENT = {
    "eventType": "START",
    "eventTime": "2026-11-22T06:00:00Z",
    "run": {"runId": "r"},
    "job": {"name": "j"},
}


def test_the_transport_follows_the_settings(tmp_path: Path) -> None:
    default = transport_from_settings(CdmeSettings(home=tmp_path))
    assert isinstance(default, FileTransport) and default.path == tmp_path / "openlineage" / "events.jsonl"
    http = transport_from_settings(
        CdmeSettings(
            home=tmp_path, openlineage_transport="http", openlineage_url="http://m:5000/api/v1/lineage"
        )
    )
    assert isinstance(http, HttpTransport) and http.url == "http://m:5000/api/v1/lineage"
    http.close()
    assert isinstance(
        transport_from_settings(CdmeSettings(openlineage_transport="console")), ConsoleTransport
    )
    with pytest.raises(ConfigurationError, match="needs CDME_OPENLINEAGE_URL"):
        transport_from_settings(CdmeSettings(openlineage_transport="http"))


def test_the_file_transport_appends_one_line_per_event(tmp_path: Path) -> None:
    transport = FileTransport(tmp_path / "deep" / "events.jsonl")
    transport.send(EVENT)
    transport.send({**EVENT, "eventType": "COMPLETE"})
    lines = (tmp_path / "deep" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["eventType"] for line in lines] == ["START", "COMPLETE"]
    (tmp_path / "dir").mkdir()
    with pytest.raises(DeliveryError, match="cannot append to"):
        FileTransport(tmp_path / "dir").send(EVENT)


def test_the_console_transport_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    ConsoleTransport().send(EVENT)
    assert json.loads(capsys.readouterr().out) == EVENT


def test_an_unreachable_collector_is_a_delivery_error() -> None:
    transport = HttpTransport("http://127.0.0.1:1/api/v1/lineage", timeout=1)
    with pytest.raises(DeliveryError, match=r"POST http://127\.0\.0\.1:1/api/v1/lineage: ConnectError"):
        transport.send(EVENT)
    transport.close()
