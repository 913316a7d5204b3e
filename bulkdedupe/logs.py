"""structlog set-up: a console renderer on a TTY, JSON lines otherwise, on stderr; context
(run id, table) bound through contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error")


class _DriverLogs(logging.Handler):
    """asyncpg logs through the standard library, e.g. "Failed to restore the pool connection
    floor; retrying" with a traceback while the server restarts: one line in our format
    instead, the traceback only at debug."""

    def __init__(self, *, tracebacks: bool) -> None:
        super().__init__()
        self.tracebacks = tracebacks

    def emit(self, record: logging.LogRecord) -> None:
        kw: dict[str, Any] = {"logger": record.name}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            kw["error"] = f"{type(exc).__name__}: {exc}"
            if self.tracebacks:
                kw["exc_info"] = record.exc_info
        structlog.get_logger().log(record.levelno, record.getMessage(), **kw)


def configure(*, fmt: str | None = None, level: str = "info") -> None:
    """`fmt`: "console" or "json"; None picks console on a TTY and JSON otherwise."""
    if fmt is None:
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    driver = logging.getLogger("asyncpg")
    driver.handlers = [_DriverLogs(tracebacks=level == "debug")]
    driver.propagate = False
    driver.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
