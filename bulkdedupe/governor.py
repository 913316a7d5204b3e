"""The impact governor: paces renames by what the application feels. A probe commits a tiny
write (synchronous_commit on) a few times a second on a connection of its own; the controller
holds the probe's recent p99 within --max-impact x its baseline, measured before the first
rename and again during short planned pauses, and sets the pace (renames/s) the workers keep.

The controller (:class:`Controller`) is pure arithmetic, tested without a database. It reads
"p99 within budget" as "at most 1 % of probes over the target": slow start (x1.5 a step) until
the first breach, then gentle up (x1.1) while the probes stay under a dead band, fast down
(halved; a third when a probe is far over) on a breach, each decision on probes taken at the
current pace only, and a memory of paces that hurt (growth stays under 90 % of the last one
for a minute). Batches shrink with the pace: the application's commits wait behind each of
ours. The governor changes nothing itself: it asks the run's Pace (pace.py) for a rate and a
batch cap, and to hold the run.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import structlog

from . import db, sql
from .config import ConnectConfig, ImpactConfig
from .errors import DRIVER_ERRORS
from .pace import Pace
from .progress import Stats, percentile

log = structlog.get_logger(__name__)

START_RATE = 500.0  # renames/s before the first measurement says more
MIN_RATE = 20.0
MAX_RATE = 1_000_000.0
SLOW_START = 1.5  # xa step while no pace has hurt yet
GROWTH = 1.1  # xa step afterwards
DEAD_BAND = 0.7  # grow only while p99 < 70 % of the budget; hold between 70 % and 100 %
MEMORY_SECONDS = 60.0  # how long a pace that hurt caps the growth
STALL_SECONDS = 1.0  # a probe this slow (still running or done) pauses the run at once
# A baseline below this (an idle server, fsync off, a RAM disk) is taken as this: there, any
# concurrent commit doubles the probe's latency, and no pace would fit a 3x budget of 0.6 ms.
BASELINE_FLOOR_MS = 2.0
BASELINE_WINDOWS = 5  # the baseline is the median p99 of the last idle windows
WINDOW_SECONDS = 10.0  # a step looks at the probes since the last change of pace, this long
MIN_SAMPLES = 30  # ... and decides only once it has this many (1.5 s at 20 probes a second)
FAST_WINDOW_SECONDS = 1.0  # a probe of the last second over FAST_CUT x the target cuts at once
FAST_CUT = 4.0
OVER_TO_CUT = 3  # probes over the target that show a breach (and over 1 % of them)
P99_SHARE = 0.01
STEP_SECONDS = 0.5  # how often the controller steps
SETTLE_SECONDS = 0.5  # after a planned pause starts, in-flight batches commit first
# How many renames a batch may hold at a pace: its commit is what the application's commits
# queue behind (the WAL it must flush), so a slower pace also means smaller batches.
BATCH_SECONDS_OF_PACE = 0.025


@dataclass
class Controller:
    """Pure: the pace from the probe latencies at the current pace and the baseline.

    p99 <= budget x baseline is read as "at most 1 % of probes over the target": a cut needs
    several probes over it (one slow probe among twenty is no p99 breach), growth needs a run
    of probes under the dead band. A probe far over the target cuts at once."""

    budget: float  # --max-impact: p99 may be at most budget x baseline
    rate: float = START_RATE
    min_rate: float = MIN_RATE
    max_rate: float = MAX_RATE
    hurt_rate: float | None = None  # the last pace at which p99 went over the budget
    hurt_at: float = float("-inf")
    decisions: collections.Counter[str] = field(default_factory=collections.Counter)

    def target_ms(self, baseline_ms: float) -> float:
        return self.budget * max(baseline_ms, BASELINE_FLOOR_MS)

    def step(
        self, samples: Sequence[float], fast: Sequence[float], baseline_ms: float, now: float
    ) -> str:
        """One control step; returns what it did: "down", "up" or "hold". `samples`: probe
        latencies (ms) since the pace last changed (at most WINDOW_SECONDS); `fast`: those of
        the last second."""
        target = self.target_ms(baseline_ms)
        if any(ms > FAST_CUT * target for ms in fast):
            return self._down(now, 1 / 3)
        over = sum(ms > target for ms in samples)
        if over >= OVER_TO_CUT and over > P99_SHARE * len(samples):
            return self._down(now, 0.5)
        if len(samples) >= MIN_SAMPLES:
            over_band = sum(ms > DEAD_BAND * target for ms in samples)
            if over_band <= P99_SHARE * len(samples):
                return self._up(now)
        return self._did("hold")

    def _down(self, now: float, factor: float) -> str:
        self.hurt_rate, self.hurt_at = self.rate, now
        self.rate = self._clamp(self.rate * factor)
        return self._did("down")

    def _up(self, now: float) -> str:
        remembered = self.hurt_rate is not None and now - self.hurt_at < MEMORY_SECONDS
        new = self.rate * (GROWTH if self.hurt_rate is not None else SLOW_START)
        if remembered and self.hurt_rate is not None:
            new = min(new, max(self.rate, 0.9 * self.hurt_rate))
        if new <= self.rate:
            return self._did("hold")  # at the remembered ceiling
        self.rate = self._clamp(new)
        return self._did("up")

    def stalled(self, now: float) -> None:
        """A probe took longer than STALL_SECONDS: the lowest pace, remembered as hurting."""
        self.hurt_rate, self.hurt_at = self.rate, now
        self.rate = self.min_rate
        self._did("stall")

    def _did(self, what: str) -> str:
        self.decisions[what] += 1
        return what

    def _clamp(self, rate: float) -> float:
        return max(self.min_rate, min(self.max_rate, rate))

    def batch_cap(self) -> int:
        """The most renames one batch may hold at the current pace."""
        return max(1, int(self.rate * BATCH_SECONDS_OF_PACE))


def p99(samples: Iterable[float]) -> float:
    return percentile(list(samples), 99)


async def first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as one of the waits returns (the others are cancelled): e.g. the
    baseline, or a stop asked for meanwhile."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


@dataclass
class Probes:
    """Probe latencies (ms) with their times: the recent ones, and the p99 of each idle
    window (the run held: nothing of the tool's own in flight)."""

    window: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=4000)
    )
    idle_now: list[float] = field(default_factory=list)
    idle_p99s: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=BASELINE_WINDOWS)
    )

    def add(self, at: float, ms: float, *, idle: bool) -> None:
        self.window.append((at, ms))
        if idle:
            self.idle_now.append(ms)

    def close_idle_window(self) -> None:
        if self.idle_now:
            self.idle_p99s.append(p99(self.idle_now))
            self.idle_now = []

    def recent(self, now: float, seconds: float = WINDOW_SECONDS) -> list[float]:
        return [ms for at, ms in self.window if at >= now - seconds]

    def baseline(self) -> float | None:
        """The median p99 of the last idle windows: one noisy window (a checkpoint, our own
        aftermath) moves it little; a change in the application's own load moves it within
        a few windows."""
        if not self.idle_p99s:
            return None
        return max(statistics.median(self.idle_p99s), BASELINE_FLOOR_MS)


class Governor:
    """Runs the probe and the controller for one run (or undo), and asks `pace` for what the
    controller decides: a rate and a batch cap, or to hold the run (its baseline, a planned
    pause, a stalled or failing probe)."""

    def __init__(
        self,
        cfg: ConnectConfig,
        impact: ImpactConfig,
        stats: Stats,
        run_id: str,
        state: str,
        *,
        pace: Pace,
    ) -> None:
        assert impact.max_impact is not None
        self.cfg = cfg
        self.impact = impact
        self.stats = stats
        self.run_id = run_id
        self.st = sql.StateSql(state)
        self.controller = Controller(budget=impact.max_impact)
        self.probes = Probes()
        self.pace = pace
        pace.hold("baseline")  # no rename before the baseline is known
        self._baseline_ready = anyio.Event()
        self._probe_started: float | None = None
        self._idle_from: float | None = None  # probes started after this are idle ones
        self.enabled = True
        self.paced: collections.deque[float] = collections.deque(maxlen=200_000)  # not idle
        self._changed_at = 0.0  # when the pace last changed (or a hold ended)
        self.error: str | None = None

    @property
    def rate(self) -> float:
        return self.controller.rate

    @property
    def held(self) -> str | None:
        """Why the governor holds the run (None: it does not)."""
        return self.pace.held

    async def wait_baseline(self) -> None:
        await self._baseline_ready.wait()

    # --- the loops ----------------------------------------------------------------------

    async def run(self) -> None:
        """Probe, measure the baseline, then control, until cancelled."""
        async with db.connect(self.cfg) as conn:
            await conn.execute(sql.PROBE_SESSION)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._probe_loop, conn)
                await self._measure_idle(self.impact.baseline, settle=0.0)
                self._baseline_ready.set()
                self._ask_pace()
                self._release()
                tg.start_soon(self._control_loop)
                if self.impact.remeasure_every is not None:
                    tg.start_soon(self._remeasure_loop)

    async def _probe_loop(self, conn: asyncpg.Connection) -> None:
        beat = 0
        while True:
            beat += 1
            started = anyio.current_time()
            self._probe_started = started
            try:
                await conn.execute(self.st.probe, self.run_id, beat)
            except DRIVER_ERRORS as exc:
                # no probe, no pacing: hold the run until the probe works again
                self.error = f"{type(exc).__name__}: {exc}"
                self._hold("probe failed")
                log.warning("impact probe failed; holding the run", error=self.error)
                await anyio.sleep(1.0)
                continue
            finally:
                self._probe_started = None
            done = anyio.current_time()
            ms = (done - started) * 1000
            idle = self.held is not None and self._idle_ok(started)
            self.probes.add(done, ms, idle=idle)
            if self.held is None:
                self.paced.append(ms)
            if self.error is not None:
                self.error = None
                if self.held == "probe failed":
                    self._release()
            if ms > STALL_SECONDS * 1000 and self.enabled:
                self.controller.stalled(done)
                self._ask_pace()
                log.warning("impact probe stalled", probe_ms=round(ms, 1))
            self._publish(done)
            await anyio.sleep(max(0.0, self.impact.probe_interval - (done - started)))

    def _idle_ok(self, started: float) -> bool:
        return self._idle_from is not None and started >= self._idle_from

    async def _measure_idle(self, seconds: float, *, settle: float) -> None:
        """Hold the run for `settle` + `seconds`; probes in the last `seconds` are idle ones."""
        self._hold("baseline")
        await anyio.sleep(settle)
        self._idle_from = anyio.current_time()
        await anyio.sleep(seconds)
        self._idle_from = None
        samples = len(self.probes.idle_now)
        self.probes.close_idle_window()
        log.info(
            "impact baseline",
            baseline_ms=round(self.probes.baseline() or 0.0, 2),
            window_p99_ms=round(self.probes.idle_p99s[-1], 2) if self.probes.idle_p99s else None,
            samples=samples,
        )

    async def _remeasure_loop(self) -> None:
        every = self.impact.remeasure_every
        assert every is not None
        while True:
            await anyio.sleep(every)
            if not self.enabled:
                continue
            await self._measure_idle(self.impact.remeasure_for, settle=SETTLE_SECONDS)
            self._release()

    async def _control_loop(self) -> None:
        while True:
            await anyio.sleep(STEP_SECONDS)
            now = anyio.current_time()
            started = self._probe_started
            if started is not None and now - started > STALL_SECONDS:
                if self.held is None and self.enabled:
                    self.controller.stalled(now)
                    self._ask_pace()
                    self._hold("probe stalled")
                    log.warning("impact probe stalled; holding the run", waited_s=now - started)
                continue
            if self.held == "probe stalled":
                self._release()
            if self.held is not None or not self.enabled:
                continue
            # only probes taken at the current pace (and after the last hold) say what it costs
            since = max(self._changed_at, now - WINDOW_SECONDS)
            recent = self.probes.recent(now, now - since)
            baseline = self.probes.baseline()
            fast = self.probes.recent(now, min(FAST_WINDOW_SECONDS, now - since))
            if baseline is None:
                continue
            before = self.rate
            what = self.controller.step(recent, fast, baseline, now)
            if what in ("up", "down"):
                self._changed_at = now
            self._ask_pace()
            if what == "down":
                log.info(
                    "impact over budget: slowing down",
                    p99_ms=round(p99(recent), 2),
                    baseline_ms=round(baseline, 2),
                    rate_from=round(before),
                    rate_to=round(self.rate),
                )

    def _ask_pace(self) -> None:
        """The controller's pace (renames/s, and the batch cap it implies), or none when off."""
        if self.enabled:
            self.pace.govern(self.controller.rate, self.controller.batch_cap())
        else:
            self.pace.govern(None)

    def _hold(self, why: str) -> None:
        self.pace.hold(why)
        self.stats.held_by = f"governor: {why}"

    def _release(self) -> None:
        self._changed_at = anyio.current_time()
        self.pace.release()
        self.stats.held_by = None

    def _publish(self, now: float) -> None:
        recent = self.probes.recent(now)
        self.stats.impact_p99_ms = round(p99(recent), 3) if recent else None
        baseline = self.probes.baseline()
        self.stats.impact_baseline_ms = round(baseline, 3) if baseline else None
        self.stats.impact_target = self.budget
        self.stats.pace = round(self.rate, 1) if self.enabled else None

    @property
    def budget(self) -> float | None:
        """The ratio it holds the probe's p99 to; None: switched off by `set`."""
        return self.controller.budget if self.enabled else None

    def set_budget(self, ratio: float | None) -> None:
        """`set --max-impact`: a new ratio, or None to stop pacing (full speed)."""
        self.enabled = ratio is not None
        if ratio is not None:
            self.controller.budget = ratio
        self.stats.impact_target = ratio
        if not self.enabled and self.held is not None and self.held != "baseline":
            self._release()
        self._ask_pace()

    def figures(self) -> tuple[float | None, float | None, float | None]:
        """For the summary: the probe's p99 over the run (its paced part, ms), the baseline
        (ms), the budget as it ended."""
        baseline = self.probes.baseline()
        return (
            round(p99(self.paced), 3) if self.paced else None,
            round(baseline, 3) if baseline is not None else None,
            self.budget,
        )

    def snapshot(self) -> dict[str, object]:
        return {
            "max_impact": self.budget,
            "baseline_ms": self.stats.impact_baseline_ms,
            "probe_p99_ms": self.stats.impact_p99_ms,
            "pace": round(self.rate, 1),
            "held": self.held,
            "decisions": dict(self.controller.decisions),
        }
