"""The one owner of a run's pace: how many rows a batch may change, how many workers rename at
once, and how soon the next batch may start. Every path that changes one goes through it: the
start of a run, a live `set`, the guardrails' --max-rate, the impact governor, undo's batches.

Each dial is derived here and nowhere else:

- **batch size**: work items hold about --batch-size renames (as asked for, also by `set`);
  the sizer (batching.py) sizes each transaction to --target-batch-time under the *ceiling*:
  --batch-size, lowered to what the server's lock table allows at --concurrency (LockBudget)
  and to the governor's cap (a slow pace means small batches).
- **workers**: the limiter lets --concurrency workers hold work, only
  --concurrency-while-scanning of them while the scan runs.
- **rate**: the next batch waits while the governor holds the run, then for the slower of
  --max-rate and the governor's pace (token buckets over renamed rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
import structlog

from .batching import BatchSizer, LockBudget
from .config import DEFAULT_BATCH_SIZE, DEFAULT_MIN_BATCH_SIZE, RunConfig
from .progress import Stats

log = structlog.get_logger(__name__)

# A wait for the pace is taken in slices at most this long, so a stop is obeyed within a second.
SLICE = 1.0


@dataclass
class TokenBucket:
    """Rows per second over renamed rows, shared by all workers. A batch spends its rows after
    the fact (how many it renames is known only then); the next batch waits until the debt is
    paid. Idle time earns no credit: the rate is a ceiling, never caught up on."""

    rate: float
    tokens: float = 0.0
    at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is not None:
            self.tokens = min(0.0, self.tokens + self.rate * (now - self.at))
        self.at = now

    def spend(self, rows: int, now: float) -> None:
        self._refill(now)
        self.tokens -= rows

    def delay(self, now: float) -> float:
        """Seconds until the next batch may start."""
        self._refill(now)
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def set_rate(self, rate: float, now: float) -> None:
        self._refill(now)  # the debt so far at the old rate, the rest at the new one
        self.rate = rate


@dataclass
class _Meter:
    """A bucket charged with the rows renamed since it was made: a limit that starts mid-run
    (a `set`, the governor switched back on) owes nothing for the rows before it."""

    bucket: TokenBucket
    spent: int

    def delay(self, renamed: int, now: float) -> float:
        self.bucket.spend(renamed - self.spent, now)
        self.spent = renamed
        return self.bucket.delay(now)


class Pace:
    """How big and how fast, for one run (or one undo). The workers read `sizer` (and feed it
    what their batches took), the producer `batch_size`, the consumers `limiter`, the gate
    `held` and `delay()`; the rest of the program changes them only through the methods here.
    """

    def __init__(
        self,
        *,
        stats: Stats,
        budget: LockBudget | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        min_batch_size: int = DEFAULT_MIN_BATCH_SIZE,
        target_batch_time: float | None = None,
        concurrency: int = 1,
        concurrency_while_scanning: int | None = None,
        max_rate: float | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.stats = stats  # its `renamed` is what the rate limits are spent on
        self.budget = budget or LockBudget(None)  # None: no lock table to fit (a dry run)
        self.batch_size = batch_size  # as asked for; the ceiling may be lower
        self.min_batch_size = min_batch_size
        self.concurrency = concurrency
        self.concurrency_while_scanning = (
            concurrency if concurrency_while_scanning is None else concurrency_while_scanning
        )
        self.scanning = True
        self._clock = clock
        self.sizer = BatchSizer(
            target=target_batch_time, minimum=min_batch_size, maximum=self.ceiling
        )
        self.limiter = anyio.CapacityLimiter(self._workers())
        self.max_rate: float | None = None
        self.impact_rate: float | None = None  # the governor's pace (None: not governed)
        self._max_rate: _Meter | None = None
        self._impact: _Meter | None = None
        self.set_max_rate(max_rate)
        self.held: str | None = None  # why the governor holds the run (None: it does not)
        self._released = anyio.Event()

    @classmethod
    def for_run(cls, run_cfg: RunConfig, budget: LockBudget, stats: Stats) -> Pace:
        """The pace a `run` starts at."""
        return cls(
            stats=stats,
            budget=budget,
            batch_size=run_cfg.batch_size,
            min_batch_size=run_cfg.min_batch_size,
            target_batch_time=run_cfg.target_batch_time,
            concurrency=run_cfg.concurrency,
            concurrency_while_scanning=run_cfg.concurrency_while_scanning,
            max_rate=run_cfg.throttle.max_rate,
        )

    # --- batch size and workers: the start, `set`, the end of the scan ------------------------

    @property
    def ceiling(self) -> int:
        """The most rows one batch may change: --batch-size, under what the lock table allows
        at the operator's concurrency (not the lower one while scanning: once the scan is
        done, that many workers hold their batches' locks at once)."""
        return self.budget.clamp(self.batch_size, self.concurrency)

    def change(
        self,
        *,
        batch_size: int | None = None,
        concurrency: int | None = None,
        concurrency_while_scanning: int | None = None,
    ) -> None:
        """A live `set` (None: unchanged). The next work item, batch and worker take it."""
        if batch_size is not None:
            self.batch_size = batch_size
        if concurrency is not None:
            self.concurrency = concurrency
        if concurrency_while_scanning is not None:
            self.concurrency_while_scanning = concurrency_while_scanning
        self._apply_ceiling()
        self.limiter.total_tokens = self._workers()

    def scan_finished(self) -> None:
        """All workers from now on (renames no longer slow the scan down)."""
        self.scanning = False
        self.limiter.total_tokens = self._workers()

    def _apply_ceiling(self) -> None:
        ceiling = self.ceiling
        if ceiling == self.sizer.maximum:
            return
        if ceiling < self.batch_size:
            log.warning(
                "batch ceiling lowered to fit the server's lock table",
                batch_size=self.batch_size,
                concurrency=self.concurrency,
                batch_ceiling=ceiling,
            )
        self.sizer.set_ceiling(ceiling, self.min_batch_size)
        self.stats.batch_size = self.sizer.size

    def _workers(self) -> int:
        if self.scanning:
            # renames slow the scan (see pipeline): few workers until it is done
            return min(self.concurrency, self.concurrency_while_scanning)
        return self.concurrency

    # --- rate: --max-rate and the governor ------------------------------------------------

    def set_max_rate(self, rate: float | None) -> None:
        """--max-rate (renames/s; None: off), at the start or from a live `set`."""
        self.max_rate = rate
        self._max_rate = self._meter(self._max_rate, rate)

    def govern(self, rate: float | None, batch_cap: int | None = None) -> None:
        """The impact governor's pace: at most `rate` renames/s in batches of at most
        `batch_cap` rows (the application's commits wait behind each of ours). None: not
        governed (`set --max-impact off`)."""
        self.impact_rate = rate
        self._impact = self._meter(self._impact, rate)
        self.sizer.set_cap(batch_cap if rate is not None else None)

    def _meter(self, meter: _Meter | None, rate: float | None) -> _Meter | None:
        if rate is None:
            return None
        if meter is None:
            return _Meter(TokenBucket(rate), spent=self.stats.renamed)
        meter.bucket.set_rate(rate, self._clock())
        return meter

    def delay(self) -> float:
        """Seconds until the next batch may start: the slower of the two rates wins (the rows
        renamed so far are paid for after the fact)."""
        meters = [m for m in (self._max_rate, self._impact) if m is not None]
        if not meters:
            return 0.0
        now, renamed = self._clock(), self.stats.renamed
        return max(m.delay(renamed, now) for m in meters)

    # --- holds: the governor's baseline, its planned pauses, a stalled probe --------------

    def hold(self, why: str) -> None:
        """No batch starts until `release()`."""
        self.held = why

    def release(self) -> None:
        self.held = None
        self._released.set()
        self._released = anyio.Event()

    async def wait_released(self) -> None:
        while self.held is not None:
            await self._released.wait()

    async def wait_turn(self, stop: anyio.Event) -> None:
        """Wait until the next batch may start: while held, then for the delay; in slices, so
        a stop is obeyed within a second (for loops without a Throttle's gate: undo)."""
        while not stop.is_set():
            if self.held is not None:
                with anyio.move_on_after(SLICE):
                    await self.wait_released()
                continue
            delay = self.delay()
            if delay <= 0:
                return
            with anyio.move_on_after(min(delay, SLICE)):
                await stop.wait()
