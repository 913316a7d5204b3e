"""Pure batch sizing: how many rows the next transaction may change so it takes about the
target time (pt-online-schema-change's --chunk-time, GitLab's batched migrations)."""

from __future__ import annotations

from dataclasses import dataclass

GROWTH = 1.2  # at most x1.2 a step: growth is gradual...
# The per-row time is tracked the way TCP tracks round trips (Jacobson/Karels): a smoothed mean
# and a smoothed mean deviation. Sizing for mean + 3 deviations keeps the slow batches, not the
# average one, under the target: on a busy server the spread is what breaks a time budget.
MEAN_GAIN = 0.125
DEVIATION_GAIN = 0.25
DEVIATIONS = 3.0
# Aim a little below the target: spikes the per-row statistics cannot see yet land on top of
# the planned time. The largest is a checkpoint starting: every page changed next writes a
# full-page image again and the per-row time jumps 2-3x. More headroom does not pay: at 0.7 the
# 5M-row benchmark's p99 batch went from 215-266 ms to 197-227 ms, but its time rose by a quarter
# (each batch also has a fixed cost: its commit waits for the WAL flush behind the others).
HEADROOM = 0.8


@dataclass
class BatchSizer:
    """...shrinking is immediate: a slow batch or a failure cuts the next one at once.

    With `target` None the size stays at `maximum` (fixed batches).
    """

    target: float | None
    minimum: int
    maximum: int
    size: int = 0
    seconds_per_row: float | None = None
    deviation: float = 0.0
    cap: int | None = None  # the impact governor's limit, below `maximum` (None: none)
    # (`maximum`, `minimum` and `cap` are set by the run's Pace, pace.py, and by nothing else)

    def __post_init__(self) -> None:
        self.minimum = max(1, min(self.minimum, self.maximum))
        if self.target is None:
            self.size = self.maximum
        elif not self.size:
            # start small and earn the ceiling: the first batches also warm caches
            self.size = max(self.minimum, min(self.maximum, 100))

    def observe(self, rows: int, seconds: float) -> None:
        """A batch that changed `rows` rows committed after `seconds`."""
        if self.target is None or rows <= 0 or seconds <= 0:
            return
        rate = seconds / rows
        if self.seconds_per_row is None:
            self.seconds_per_row, self.deviation = rate, rate / 2
        else:
            error = rate - self.seconds_per_row
            self.deviation += DEVIATION_GAIN * (abs(error) - self.deviation)
            self.seconds_per_row += MEAN_GAIN * error
        ideal = HEADROOM * self.target / (self.seconds_per_row + DEVIATIONS * self.deviation)
        if seconds > self.target:
            # too slow: size for the observed rate at once, not for the average
            ideal = min(ideal, HEADROOM * self.target / rate)
            self.size = self._clamp(min(ideal, self.size))
        else:
            self.size = self._clamp(min(ideal, self.size * GROWTH))

    def failed(self) -> None:
        """A batch timed out, deadlocked or lost its connection: halve the next one."""
        if self.target is not None:
            self.size = self._clamp(self.size / 2)

    def set_ceiling(self, maximum: int, minimum: int) -> None:
        """A new ceiling and the floor under it (a live `set`, the lock budget at a new
        concurrency): fixed batches take it at once; adaptive ones keep their size under it,
        never raised to it."""
        self.maximum = maximum
        self.minimum = max(1, min(minimum, maximum))
        self.size = self._clamp(self.maximum if self.target is None else self.size)

    def set_cap(self, cap: int | None) -> None:
        """The impact governor's batch limit (small batches at a slow pace: the application's
        commits wait behind each batch's commit). Takes effect on the next batch."""
        self.cap = cap
        if self.target is None:
            self.size = self._clamp(self.maximum)
        else:
            self.size = self._clamp(self.size)

    def _clamp(self, value: float) -> int:
        hi = self.maximum if self.cap is None else max(1, min(self.maximum, self.cap))
        return max(min(self.minimum, hi), min(hi, int(value)))


# A batch holds one advisory lock per group key and one per new value (a rename), or per old
# and per restored value (an undo), until it commits: about two lock-table slots per row.
LOCKS_PER_ROW = 2


@dataclass(frozen=True)
class LockBudget:
    """The one owner of the batch ceiling the server's lock table allows: all workers together
    hold at most half of its slots, the other half is the application's ("out of shared memory"
    fails their locks too). The Pace (pace.py) asks it on every path that sets a batch size or a
    concurrency: the start of a run, a live `set`, undo's batches.

    `lock_slots` None: the batches take no locks (a dry run), so there is no ceiling.
    """

    lock_slots: int | None

    def ceiling(self, concurrency: int) -> int | None:
        """The most rows one batch may change while `concurrency` workers hold locks at once."""
        if self.lock_slots is None:
            return None
        return max(1, self.lock_slots // 2 // max(1, concurrency) // LOCKS_PER_ROW)

    def clamp(self, batch_size: int, concurrency: int) -> int:
        """`batch_size`, or the ceiling at `concurrency` when that is lower."""
        ceiling = self.ceiling(concurrency)
        return batch_size if ceiling is None else min(batch_size, ceiling)
