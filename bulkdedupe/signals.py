"""Stopping long commands cleanly: SIGINT/SIGTERM set a stop event that the command polls, and
helper tasks run alongside the command's own work without wrapping its errors in groups."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import structlog

log = structlog.get_logger(__name__)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signal(stop: anyio.Event, *, enabled: bool = True) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM set `stop` (instead of killing the command with
    work half-done); the handlers before it come back afterwards.

    Installed synchronously, on entry, before the command's first query: a signal has no moment
    in which it would still raise KeyboardInterrupt inside a task group (a run registered but
    not yet listening ended with a traceback, exit 1 and no final status). Only the main
    thread's event loop can take signals: elsewhere (a command run in-process from a thread)
    this does nothing."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def on_signal(signum: signal.Signals) -> None:
        if not stop.is_set():
            log.warning(
                "signal received: finishing the current step, then stopping", signal=signum.name
            )
        stop.set()

    for s in STOP_SIGNALS:
        loop.add_signal_handler(s, on_signal, s)
    try:
        yield
    finally:
        for s in STOP_SIGNALS:
            loop.remove_signal_handler(s)
            handler = previous[s]
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@asynccontextmanager
async def alongside(*tasks: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run `tasks` while the body runs and cancel them when it ends. The body's own exception
    comes out as itself, not inside an ExceptionGroup, so callers catch it by class."""
    try:
        async with anyio.create_task_group() as tg:
            for task in tasks:
                tg.start_soon(task)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        if len(eg.exceptions) == 1:
            inner = eg.exceptions[0]
            raise inner from inner.__cause__
        raise
