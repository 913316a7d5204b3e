"""Stopping long commands cleanly: SIGINT/SIGTERM set a stop event that the command polls, and
helper tasks run alongside the command's own work without wrapping its errors in groups."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import anyio
import structlog

log = structlog.get_logger(__name__)


async def set_on_signal(stop: anyio.Event) -> None:
    """Set `stop` on the first SIGINT or SIGTERM (instead of dying with work half-done)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.warning(
                "signal received: finishing the current step, then stopping",
                signal=signal.Signals(signum).name,
            )
            stop.set()
            return


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
