"""JSON log lines: fields, bound ids, `extra=` fields, exceptions, the text format and the service name."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from services.core import logs
from services.core.logs import JsonFormatter, configure_logging, current_context, log_context


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(logs, "_service", logs._service)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_configure_logging_writes_one_json_object_per_line(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("cdme.planner").info("first")
    logging.getLogger("cdme.planner").warning("second %s", "arg")

    assert len(stream.getvalue().splitlines()) == 2
    first, second = _lines(stream)
    assert set(first) == {"ts", "level", "logger", "msg", "service"}
    assert first["level"] == "info"
    assert first["logger"] == "cdme.planner"
    assert first["msg"] == "first"
    assert first["service"] == "planner"
    assert second["level"] == "warning"
    assert second["msg"] == "second arg"


def test_timestamp_is_utc_iso_with_milliseconds(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").info("hello")

    ts = _lines(stream)[0]["ts"]
    parsed = datetime.fromisoformat(ts)
    assert parsed.utcoffset() == timedelta(0)
    assert ts.endswith("+00:00")
    assert len(ts.split("T")[1].split("+")[0]) == len("12:34:56.789")


def test_level_filters_lower_records(stream: io.StringIO) -> None:
    configure_logging("planner", level="WARNING", stream=stream)

    logging.getLogger("x").info("dropped")
    logging.getLogger("x").error("kept")

    assert [line["msg"] for line in _lines(stream)] == ["kept"]
    assert logging.getLogger().level == logging.WARNING


def test_configure_logging_replaces_previous_handlers(stream: io.StringIO) -> None:
    old = io.StringIO()
    configure_logging("first", stream=old)
    configure_logging("second", stream=stream)

    logging.getLogger("x").info("hello")

    assert old.getvalue() == ""
    assert _lines(stream)[0]["service"] == "second"
    assert len(logging.getLogger().handlers) == 1


def test_configure_logging_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("planner")

    logging.getLogger("x").info("to stdout")

    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stdout
    assert json.loads(capsys.readouterr().out)["msg"] == "to stdout"


def test_log_context_binds_ids_to_lines_inside_the_block(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)
    log = logging.getLogger("x")

    with log_context(request_id="r-1", run_id="run-9"):
        log.info("inside")
    log.info("outside")

    inside, outside = _lines(stream)
    assert inside["request_id"] == "r-1"
    assert inside["run_id"] == "run-9"
    assert "request_id" not in outside
    assert "run_id" not in outside


def test_nested_log_context_adds_and_overrides_then_resets(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)
    log = logging.getLogger("x")

    with log_context(request_id="r-1"):
        with log_context(run_id="run-1"):
            log.info("both")
            with log_context(request_id="r-2"):
                log.info("overridden")
        log.info("outer again")
    log.info("none")

    both, overridden, outer, none = _lines(stream)
    assert (both["request_id"], both["run_id"]) == ("r-1", "run-1")
    assert (overridden["request_id"], overridden["run_id"]) == ("r-2", "run-1")
    assert outer["request_id"] == "r-1"
    assert "run_id" not in outer
    assert not {"request_id", "run_id"} & set(none)


def test_log_context_ignores_none_values() -> None:
    with log_context(request_id="r-1"), log_context(request_id=None, run_id=None):
        assert current_context() == {"request_id": "r-1"}


def test_log_context_resets_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), log_context(request_id="r-1"):
        raise RuntimeError("boom")

    assert current_context() == {}


def test_current_context_is_a_copy() -> None:
    with log_context(request_id="r-1"):
        current_context()["request_id"] = "tampered"

        assert current_context() == {"request_id": "r-1"}


def test_current_context_is_empty_outside_any_block() -> None:
    assert current_context() == {}


def test_extra_fields_appear_on_the_line(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").info("step finished", extra={"step": "validate", "rows": 3, "ok": True})

    line = _lines(stream)[0]
    assert line["step"] == "validate"
    assert line["rows"] == 3
    assert line["ok"] is True


def test_extra_fields_that_are_not_json_are_rendered_as_strings(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").info("odd", extra={"when": datetime(2024, 1, 2, 3, 4, 5), "ids": {1}})

    line = _lines(stream)[0]
    assert line["when"] == "2024-01-02 03:04:05"
    assert line["ids"] == "{1}"


def test_standard_record_attributes_are_not_logged_as_fields(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").info("plain")

    assert set(_lines(stream)[0]) == {"ts", "level", "logger", "msg", "service"}


def test_exception_produces_an_exc_field_with_the_traceback(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("x").exception("it failed")

    line = _lines(stream)[0]
    assert line["level"] == "error"
    assert line["msg"] == "it failed"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("ValueError: bad value")
    assert len(stream.getvalue().splitlines()) == 1


def test_lines_without_an_exception_have_no_exc_field(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").error("no exception here")

    assert "exc" not in _lines(stream)[0]


def test_multiline_messages_stay_on_one_line(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    logging.getLogger("x").info("line one\nline two")

    assert len(stream.getvalue().splitlines()) == 1
    assert _lines(stream)[0]["msg"] == "line one\nline two"


def test_text_format_is_level_logger_and_message(stream: io.StringIO) -> None:
    configure_logging("planner", fmt="text", stream=stream)

    with log_context(request_id="r-1"):
        logging.getLogger("cdme.planner").warning("careful %d", 3)

    assert stream.getvalue() == "WARNING cdme.planner: careful 3\n"


def test_service_is_logged_from_other_threads(stream: io.StringIO) -> None:
    configure_logging("planner", stream=stream)

    worker = threading.Thread(target=lambda: logging.getLogger("x").info("from a thread"))
    worker.start()
    worker.join()

    assert _lines(stream)[0]["service"] == "planner"


def test_json_formatter_formats_a_record_directly() -> None:
    with log_context(run_id="run-1"):
        record = logging.LogRecord("cdme.x", logging.DEBUG, __file__, 1, "n=%d", (5,), None)
        payload = json.loads(JsonFormatter().format(record))

    assert payload["level"] == "debug"
    assert payload["logger"] == "cdme.x"
    assert payload["msg"] == "n=5"
    assert payload["run_id"] == "run-1"
