"""Throttling: the pure decision (health samples + limits -> go, pause or stop) and the gate
every worker passes before each batch transaction.

The monitor (monitor.py) samples the server about once a second and hands each sample to
:func:`decide`; the :class:`Throttle` keeps the verdict, logs each pause and resume once, and
makes workers wait on an event while paused (never a busy loop). How fast the batches go
(--max-rate, the impact governor's pace and holds) is the Pace's (pace.py): the gate asks it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from .config import ThrottleConfig
from .pace import Pace
from .progress import Stats

log = structlog.get_logger(__name__)

# Continuous signals (lag, WAL rate) hover around their limit: once paused by one, go on only
# when it has fallen below this share of the limit, so the run does not flap every second.
RESUME_BELOW = 0.8
# WAL segments completed but not yet archived before the run pauses (64 x 16 MiB = 1 GiB of
# WAL the archive has not got). A backlog means archive_command cannot keep up: WAL piles up
# in pg_wal, and a point-in-time restore would lose it. Watched with --max-wal-rate.
ARCHIVE_BACKLOG_SEGMENTS = 64
MIB = 1024 * 1024
# A rate wait or --sleep is taken in slices at most this long, so a `set` or a stop is obeyed
# within about a second.
NAP_SLICE = 1.0


class Stopping(Exception):
    """The run is stopping: the worker leaves its work item unfinished (it is not
    checkpointed, so a resume does it again)."""


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One look at the server's health. None: not watched (or not knowable)."""

    replica_lags: Mapping[str, float | None] = field(default_factory=dict)  # None: unknown
    lock_waiters: int | None = None
    active_backends: int | None = None
    wal_bytes_per_s: float | None = None
    archive_backlog: int | None = None  # segments waiting for the archiver; None: archiving off
    autovacuum: bool | None = None
    throttle_query: bool | None = None
    operator_paused: bool = False
    operator_stop: bool = False
    failure: str | None = None  # the monitor could not sample: health unknown
    elapsed: float = 0.0  # seconds since the run started


@dataclass(frozen=True, slots=True)
class Reason:
    """Why the run pauses or stops: the signal, its value and the limit it exceeded."""

    signal: str
    value: float | None
    limit: float | None
    detail: str

    def __str__(self) -> str:
        return self.detail

    def to_json(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "value": self.value,
            "limit": self.limit,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    pauses: tuple[Reason, ...] = ()
    stop: Reason | None = None

    @property
    def ok(self) -> bool:
        return not self.pauses and self.stop is None

    @property
    def signals(self) -> frozenset[str]:
        return frozenset(r.signal for r in self.pauses)


def _num(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"


def decide(
    sample: Sample, limits: ThrottleConfig, paused_by: frozenset[str] = frozenset()
) -> Verdict:
    """Pure: the verdict for `sample` under `limits`. `paused_by` are the signals the run is
    paused by now (for the hysteresis of continuous signals)."""
    pauses: list[Reason] = []

    def over(signal: str, value: float, limit: float, hysteresis: bool) -> bool:
        threshold = limit * RESUME_BELOW if hysteresis and signal in paused_by else limit
        return value > threshold

    if sample.operator_paused:
        pauses.append(Reason("operator", None, None, "paused by operator"))
    if sample.failure is not None:
        pauses.append(Reason("monitor", None, None, f"health unknown: {sample.failure}"))

    lag_limit = limits.max_replication_lag
    if lag_limit is not None and sample.replica_lags:
        unknown = sorted(n for n, v in sample.replica_lags.items() if v is None)
        known = {n: v for n, v in sample.replica_lags.items() if v is not None}
        if unknown:
            pauses.append(
                Reason("replication_lag", None, lag_limit, f"replica {unknown[0]}: lag unknown")
            )
        elif known:
            name, lag = max(known.items(), key=lambda kv: kv[1])
            if over("replication_lag", lag, lag_limit, hysteresis=True):
                pauses.append(
                    Reason(
                        "replication_lag",
                        lag,
                        lag_limit,
                        f"replication lag {_num(lag)}s > {_num(lag_limit)}s (replica {name})",
                    )
                )

    n = sample.lock_waiters
    if limits.max_lock_waiters is not None and n is not None and n > limits.max_lock_waiters:
        pauses.append(
            Reason(
                "lock_waiters",
                n,
                limits.max_lock_waiters,
                f"{n} sessions wait on locks on the table > {limits.max_lock_waiters}",
            )
        )

    n = sample.active_backends
    if limits.max_active_backends is not None and n is not None and n > limits.max_active_backends:
        pauses.append(
            Reason(
                "active_backends",
                n,
                limits.max_active_backends,
                f"{n} active backends > {limits.max_active_backends}",
            )
        )

    if limits.max_wal_rate is not None:
        rate = sample.wal_bytes_per_s
        if rate is not None and over("wal_rate", rate / MIB, limits.max_wal_rate, hysteresis=True):
            pauses.append(
                Reason(
                    "wal_rate",
                    round(rate / MIB, 3),
                    limits.max_wal_rate,
                    f"WAL rate {rate / MIB:.1f} MiB/s > {_num(limits.max_wal_rate)} MiB/s",
                )
            )
        backlog = sample.archive_backlog
        if backlog is not None and backlog > ARCHIVE_BACKLOG_SEGMENTS:
            pauses.append(
                Reason(
                    "archive_backlog",
                    backlog,
                    ARCHIVE_BACKLOG_SEGMENTS,
                    f"{backlog} WAL segments wait for the archiver > {ARCHIVE_BACKLOG_SEGMENTS}",
                )
            )

    if limits.pause_during_autovacuum and sample.autovacuum:
        pauses.append(Reason("autovacuum", None, None, "autovacuum is working on the table"))

    if sample.throttle_query:
        pauses.append(Reason("throttle_query", None, None, "--throttle-query returned true"))

    stop: Reason | None = None
    n = sample.active_backends
    crit = limits.critical_active_backends
    if sample.operator_stop:
        stop = Reason("operator_stop", None, None, "stopped by operator")
    elif crit is not None and n is not None and n > crit:
        stop = Reason(
            "critical_active_backends",
            n,
            crit,
            f"{n} active backends > --critical-active-backends {crit}",
        )
    elif limits.max_runtime is not None and sample.elapsed >= limits.max_runtime:
        stop = Reason(
            "max_runtime",
            round(sample.elapsed, 1),
            limits.max_runtime,
            f"--max-runtime {_num(limits.max_runtime)}s reached",
        )
    return Verdict(tuple(pauses), stop)


# --- WAL arithmetic ------------------------------------------------------------------------

_WAL_FILE = re.compile(r"([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})", re.IGNORECASE)


def wal_segment_number(name: str | None, segment_size: int) -> int | None:
    """Pure: the segment number of a WAL file name (timeline, log, segment: 3 x 8 hex digits).
    None for anything else pg_stat_archiver may name (a .history or .backup file)."""
    if not name or not (m := _WAL_FILE.fullmatch(name)):
        return None
    per_log = 0x1_0000_0000 // segment_size
    return int(m.group(2), 16) * per_log + int(m.group(3), 16)


def archive_backlog(last_archived: str | None, current: str, segment_size: int) -> int | None:
    """Pure: completed WAL segments not archived yet (the current one is still being written)."""
    last = wal_segment_number(last_archived, segment_size)
    now = wal_segment_number(current, segment_size)
    if last is None or now is None:
        return None
    return max(0, now - last - 1)


def wal_rate(history: Sequence[tuple[float, int]]) -> float | None:
    """Pure: bytes of WAL per second over the (time, WAL position) samples of the window."""
    if len(history) < 2:
        return None
    (t0, b0), (t1, b1) = history[0], history[-1]
    if t1 <= t0:
        return None
    return max(0.0, (b1 - b0) / (t1 - t0))


# --- the gate ------------------------------------------------------------------------------


class Throttle:
    """The current verdict and the guardrails' limits; workers wait here before each batch
    (and the scanner between pages while paused). --max-rate acts in `pace`, which this hands
    every change of it; the gate also waits out the pace's holds and delays."""

    def __init__(
        self, limits: ThrottleConfig, stats: Stats, stop: anyio.Event, pace: Pace | None = None
    ) -> None:
        self.limits = limits
        self.stats = stats
        self.stop = stop
        # a run's own (Pace.for_run, which starts at the same --max-rate); else one of its own
        self.pace = pace if pace is not None else Pace(stats=stats, max_rate=limits.max_rate)
        self.verdict = Verdict()
        self.stop_reason: Reason | None = None
        self.rate_waiting = 0  # workers waiting on the pace (max-rate, the governor) right now
        self.paused_since: datetime | None = None
        self._changed = anyio.Event()

    @property
    def paused(self) -> bool:
        return bool(self.verdict.pauses)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def wake(self) -> None:
        """Let every waiter look again (the run is stopping)."""
        self._notify()

    def update(self, verdict: Verdict) -> None:
        """Take a new verdict; log each pause and resume once, not every sample."""
        before = {r.signal: r for r in self.verdict.pauses}
        after = {r.signal: r for r in verdict.pauses}
        for sig, r in after.items():
            if sig not in before:
                log.warning("paused", reason=r.detail, signal=sig, value=r.value, limit=r.limit)
        for sig, r in before.items():
            if sig not in after:
                log.info("resumed", signal=sig, was=r.detail, limit=r.limit)
        if verdict.pauses and not before:
            self.paused_since = datetime.now(UTC)
        elif not verdict.pauses:
            self.paused_since = None
        if verdict.stop is not None and self.stop_reason is None:
            self.stop_reason = verdict.stop
        self.verdict = verdict
        # what the progress display says holds the run (the governor writes its own holds)
        if verdict.pauses:
            self.stats.held_by = "paused: " + "; ".join(r.detail for r in verdict.pauses)
        elif (self.stats.held_by or "").startswith("paused: "):
            self.stats.held_by = None
        if before.keys() != after.keys():
            self._notify()

    def set_limits(self, limits: ThrottleConfig) -> None:
        """A live `set` of the guardrails; --max-rate goes to the pace."""
        self.pace.set_max_rate(limits.max_rate)
        self.limits = limits
        self._notify()

    async def wait_open(self) -> bool:
        """Wait while the run is paused. False when the run is stopping instead."""
        while self.paused and not self.stop.is_set():
            await self._changed.wait()
        return not self.stop.is_set()

    async def _nap(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self.stop.wait()
        if self.stop.is_set():
            raise Stopping

    def gate(self) -> Callable[[], Awaitable[None]]:
        """A worker's `before_batch`. It runs inside the worker's concurrency slot, so --sleep
        idles the slot: each of the N concurrent workers waits that long before each of its
        batches (also the first: workers take turns on slots, and a sleep is cheap)."""

        async def before_batch() -> None:
            if self.limits.sleep > 0:
                await self._nap(self.limits.sleep)
            while True:
                if self.stop.is_set():
                    raise Stopping
                if self.paused:
                    if not await self.wait_open():
                        raise Stopping
                    continue
                if self.pace.held is not None:  # the governor's baseline, pause or stall
                    with anyio.move_on_after(NAP_SLICE):  # a stop is obeyed within a slice
                        await self.pace.wait_released()
                    continue
                delay = self.pace.delay()  # --max-rate and the governor's pace
                if delay <= 0:
                    return
                self.rate_waiting += 1
                try:
                    await self._nap(min(delay, NAP_SLICE))
                finally:
                    self.rate_waiting -= 1

        return before_batch

    def snapshot(self) -> dict[str, Any]:
        """What `status` shows about throttling."""
        throttled = []
        if self.limits.max_rate is not None:
            throttled.append(f"max-rate {_num(self.limits.max_rate)} rows/s")
        if self.limits.sleep > 0:
            throttled.append(f"sleep {_num(self.limits.sleep)}s between batches")
        return {
            "paused": self.paused,
            "paused_since": self.paused_since.isoformat() if self.paused_since else None,
            "reasons": [r.to_json() for r in self.verdict.pauses],
            "throttled_by": throttled,
            "rate_waiting": self.rate_waiting,
            "stopping": self.stop.is_set(),
            "stop_reason": self.stop_reason.to_json() if self.stop_reason else None,
            "limits": {
                k: v
                for k, v in dataclasses.asdict(self.limits).items()
                if k not in ("replica_urls", "throttle_query")
            }
            | {"replica_count": len(self.limits.replica_urls)},
        }
