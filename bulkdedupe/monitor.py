"""The monitor: one task and ONE dedicated connection per run. About once a second it polls the
run's control row, samples the health signals the limits watch, and hands the verdict to the
throttle; it stops the run on a critical signal, at --max-runtime, or when asked to."""

from __future__ import annotations

import contextlib
import dataclasses
from types import TracebackType

import anyio
import asyncpg
import structlog

from . import db
from .config import ConnectConfig
from .control import RunControl
from .errors import BulkDedupeError
from .health import SAMPLE_ERRORS, HealthSampler, ThrottleQueryError
from .progress import Stats
from .throttle import Sample, Throttle, decide

log = structlog.get_logger(__name__)

SAMPLE_INTERVAL = 1.0
MONITOR_STATEMENT_TIMEOUT = 5.0  # health queries are catalog reads: never let one hang


class Monitor:
    """`async with Monitor(...) as m:` then `await m.tick()` once before the workers start (no
    batch runs before the health is known) and `m.run()` alongside them. A broken
    --throttle-query ends up in `error` and stops the run: the caller fails it after the
    in-flight batches have finished."""

    def __init__(
        self,
        cfg: ConnectConfig,
        *,
        throttle: Throttle,
        stats: Stats,
        sampler: HealthSampler | None,
        control: RunControl | None,
        interval: float = SAMPLE_INTERVAL,
    ) -> None:
        self.cfg = cfg
        self.throttle = throttle
        self.stats = stats
        self.sampler = sampler
        self.control = control
        self.interval = interval
        self.error: BulkDedupeError | None = None
        self._conn: asyncpg.Connection | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._disconnect()
            if self.sampler is not None:
                await self.sampler.close()

    @property
    def _needs_db(self) -> bool:
        return self.control is not None or (
            self.sampler is not None and self.throttle.limits.watches_database
        )

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            await self._disconnect()
            stack = contextlib.AsyncExitStack()
            self._conn = await stack.enter_async_context(
                db.connect(self.cfg, statement_timeout=MONITOR_STATEMENT_TIMEOUT)
            )
            self._stack = stack
        return self._conn

    async def _disconnect(self) -> None:
        stack, self._stack, self._conn = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def tick(self) -> None:
        limits = self.throttle.limits
        sample = Sample(elapsed=self.stats.elapsed())
        failure: str | None = None
        if self._needs_db:
            try:
                conn = await self._connection()
                if self.control is not None:
                    await self.control.poll(conn)
                if self.sampler is not None:
                    sample = await self.sampler.sample(conn, limits, self.stats.elapsed())
            except ThrottleQueryError as exc:
                self._fail(exc)
                return
            except SAMPLE_ERRORS as exc:
                # Health unknown: pause (and say why) until a sample succeeds again.
                failure = f"{type(exc).__name__}: {exc}"
                await self._disconnect()
        if self.control is not None:
            sample = dataclasses.replace(
                sample, operator_paused=self.control.paused, operator_stop=self.control.stop
            )
        if failure is not None:
            sample = dataclasses.replace(sample, failure=failure)
        verdict = decide(sample, self.throttle.limits, self.throttle.verdict.signals)
        self.throttle.update(verdict)
        if verdict.stop is not None and not self.throttle.stop.is_set():
            r = verdict.stop
            log.warning(
                "stopping the run (resumable)",
                reason=r.detail,
                signal=r.signal,
                value=r.value,
                limit=r.limit,
            )
            self.throttle.stop.set()

    def _fail(self, exc: BulkDedupeError) -> None:
        log.error("stopping the run", error=str(exc))
        self.error = exc
        self.throttle.stop.set()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            await self.tick()
