"""structlog set-up: a console renderer on a TTY, JSON lines otherwise, on stderr (above the
live progress display while one is drawn); context (run id, table) bound through contextvars."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import structlog
from rich.console import Console
from rich.text import Text

LEVELS = ("debug", "info", "warning", "error")

# The rich Console of the live progress display being drawn, if any: one per process, not per
# task (a contextvar would reach only the tasks started after it was set).
_live: Console | None = None


@contextlib.contextmanager
def above(console: Console) -> Iterator[None]:
    """While a live display is drawn on `console`, log lines are printed through it: above the
    display, never into the middle of it."""
    global _live
    previous, _live = _live, console
    try:
        yield
    finally:
        _live = previous


class LineLogger:
    """structlog's logger for rendered lines: written to `file`, or printed above the live
    display while one is drawn."""

    def __init__(self, file: TextIO) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        if _live is not None:
            # soft_wrap: a JSON line stays one line; from_ansi keeps the console renderer's colors
            _live.print(Text.from_ansi(message), soft_wrap=True)
            return
        print(message, file=self._file, flush=True)

    log = debug = info = warn = warning = error = err = critical = fatal = exception = msg
    failure = msg


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
    stream = sys.stderr
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
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
        logger_factory=lambda *_: LineLogger(stream),
        cache_logger_on_first_use=False,
    )
    driver = logging.getLogger("asyncpg")
    driver.handlers = [_DriverLogs(tracebacks=level == "debug")]
    driver.propagate = False
    driver.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
