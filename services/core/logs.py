"""JSON logs to stdout, each line carrying the service and the request and run ids bound at that moment.

Examples:
    >>> configure_logging("planner")
    >>> with log_context(request_id="r-1", run_id="0190..."):
    ...     logging.getLogger("cdme.planner").info("step finished", extra={"step": "validate"})
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

_context: ContextVar[dict[str, str]] = ContextVar("cdme_log_context", default={})  # noqa: B039 - never mutated
# The service is process-wide, not per context: threads start with an empty context and would log "cdme".
_service = "cdme"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
# uvicorn adds `color_message`, the same message with terminal colour codes: noise in a JSON line.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


def current_context() -> dict[str, str]:
    """The ids bound by the enclosing `log_context` blocks (for propagating `X-Request-ID`)."""
    return dict(_context.get())


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Bind ids (e.g. `request_id`, `run_id`) to every log line emitted inside the block."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, bound ids and `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "service": _service,
            **_context.get(),
        }
        payload.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(
    service: str, level: str = "INFO", fmt: Literal["json", "text"] = "json", stream: Any = None
) -> None:
    """Send the root logger to `stream` (stdout by default) as JSON lines (or plain text for a terminal)."""
    global _service
    _service = service
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
