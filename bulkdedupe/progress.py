"""Live counters of a run, and how they are shown: a live two-phase display on a terminal (the
scan, then the renames), periodic structured `progress` log lines otherwise."""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import anyio
import structlog
from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

from . import logs

if TYPE_CHECKING:
    from .scanner import Group

log = structlog.get_logger(__name__)

# The current pace (and so the ETA) is measured over this many seconds: long enough to smooth
# out batches and pauses, short enough to follow the end of the scan or a new --max-rate.
PACE_WINDOW = 20.0
# Shown as at most 99.9 % while anything remains (100 % only when it is true).
ALMOST = 0.999


@dataclass
class Stats:
    """Counters shared by the scanner and the workers (one event loop: no locking needed)."""

    estimated_rows: int = 0
    scanned_rows: int = 0
    groups_found: int = 0
    groups_done: int = 0
    renamed: int = 0
    skipped_rows: int = 0
    skipped_groups: int = 0  # groups skipped with a reason (not the ones that went away)
    skipped: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    retries: int = 0
    batch_seconds: list[float] = field(default_factory=list)
    longest_page_seconds: float = 0.0
    scan_seconds: float = 0.0
    batch_size: int = 0  # the sizer's current batch size
    started: float = field(default_factory=anyio.current_time)
    # the impact governor's view (None: off or not measured yet), filled by governor.py
    impact_p99_ms: float | None = None
    impact_baseline_ms: float | None = None
    impact_target: float | None = None
    pace: float | None = None  # renames/s the governor allows now
    held_by: str | None = None  # who holds the run right now (e.g. "governor: baseline")
    eta_now: float | None = None  # the display's ETA: from the current paces, both phases
    rows_to_rename: int = 0  # in the groups found so far (each group's count - 1): see found()
    # the server's WAL position (bytes) at the run's start and end (--apply), for the summary
    wal_start: int | None = None
    wal_end: int | None = None

    def elapsed(self) -> float:
        return anyio.current_time() - self.started

    def found(self, groups: Iterable[Group]) -> None:
        """Count duplicate groups found by the scan (or a resume's retries) and their renames."""
        for g in groups:
            self.groups_found += 1
            self.rows_to_rename += max(g.count - 1, 0)

    @property
    def scanning(self) -> bool:
        """Until the scan has read every range (pipeline.run records scan_seconds then)."""
        return self.scan_seconds == 0.0

    def wal_bytes(self) -> int | None:
        """WAL the server wrote during the run (all its sessions: the application's too)."""
        if self.wal_start is None or self.wal_end is None:
            return None
        return max(self.wal_end - self.wal_start, 0)

    def skip(self, reason: str, rows: int) -> None:
        self.skipped[reason] += rows
        self.skipped_rows += rows

    def rate(self) -> float:
        e = self.elapsed()
        return self.renamed / e if e > 0 else 0.0

    def eta(self) -> float | None:
        if not self.estimated_rows or not self.scanned_rows:
            return None
        left = max(self.estimated_rows - self.scanned_rows, 0)
        return left * self.elapsed() / self.scanned_rows


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of `values`; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# --- what is shown: pure ------------------------------------------------------------------


class Pace:
    """The current pace of a growing count: its rate over the last `window` seconds of samples
    (the run's average hides a slow-down, a pause, or the end of the scan)."""

    def __init__(self, window: float = PACE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        self._samples.append((now, count))
        # keep one sample from before the window, so that the rate spans all of it
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Per second; None until two samples lie apart."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return max(0.0, (n1 - n0) / (t1 - t0)) if t1 > t0 else None


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    """What the display says at one moment, derived from Stats and the current paces."""

    phase: str  # "scanning" (renames may run already) | "renaming" (the scan is done)
    scan_fraction: float | None  # of the estimate, < 1 until the scan is done; None: no estimate
    scan_rate: float | None  # index entries/s, current pace
    scan_eta: float | None
    expected: int  # renames to do: those found, extrapolated over the rest of the scan
    done: int  # rows renamed or skipped
    fraction: float  # done of expected: < 1 while renames remain
    rate: float | None  # rows/s, current pace
    eta: float | None  # seconds until the run ends (the scan's end and the renames' both)


def snapshot(
    stats: Stats, *, scan_rate: float | None, rate: float | None, scanning: bool
) -> Snapshot:
    s = stats
    share = s.scanned_rows / s.estimated_rows if s.estimated_rows else None
    scan_fraction = 1.0 if not scanning else None if share is None else min(share, ALMOST)
    scan_eta = None
    if scanning and s.estimated_rows > s.scanned_rows and scan_rate:
        scan_eta = (s.estimated_rows - s.scanned_rows) / scan_rate
    found = s.rows_to_rename
    expected = found
    if scanning and share and share < 1:
        # duplicates are spread over the key's range about as densely as met so far
        expected = max(found, round(found / share))
    done = s.renamed + s.skipped_rows
    if not scanning and done >= expected:
        fraction = 1.0
    else:
        fraction = min(done / expected, ALMOST) if expected else 0.0
    left = expected - done
    eta = 0.0 if left <= 0 else left / rate if rate else None
    if scanning:  # the renames cannot end before the scan does
        eta = None if eta is None or scan_eta is None else max(eta, scan_eta)
    return Snapshot(
        phase="scanning" if scanning else "renaming",
        scan_fraction=scan_fraction,
        scan_rate=scan_rate,
        scan_eta=scan_eta,
        expected=expected,
        done=done,
        fraction=fraction,
        rate=rate,
        eta=eta,
    )


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(math.ceil(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def fmt_pct(fraction: float | None) -> str:
    if fraction is None:
        return "    ?"
    # floored, never rounded up: 99.96 % is not done
    return f"{math.floor(fraction * 1000 + 1e-6) / 10:5.1f}%"


def _per_s(rate: float | None) -> str:
    return "--/s" if rate is None else f"{rate:,.0f}/s"


def scan_text(stats: Stats, snap: Snapshot) -> str:
    s = stats
    groups = "group" if s.groups_found == 1 else "groups"
    found = f"{s.groups_found:,} {groups} · {s.rows_to_rename:,} rows to rename"
    if snap.phase != "scanning":
        return f"{s.scanned_rows:,} index entries, done · {found}"
    of = f" of ~{s.estimated_rows:,}" if s.estimated_rows else ""
    return f"{s.scanned_rows:,}{of} index entries · {found} · {_per_s(snap.scan_rate)}"


def rename_text(stats: Stats, snap: Snapshot, verb: str) -> str:
    s = stats
    if snap.phase != "scanning":
        of = f"of {snap.expected:,}"
    elif snap.expected > s.rows_to_rename:
        of = f"of ~{snap.expected:,} ({s.rows_to_rename:,} found so far)"
    else:
        of = f"of {s.rows_to_rename:,} found so far"
    out = f"{verb} {s.renamed:,} {of}"
    if s.skipped_rows:
        out += f" · skipped {s.skipped_rows:,}"
    out += f" · {_per_s(snap.rate)}"
    if s.batch_size:
        out += f" · batch {s.batch_size:,}"
    return out


def impact_text(stats: Stats) -> str | None:
    """The application's latency against its budget; None: not measured."""
    s = stats
    parts = []
    if s.impact_p99_ms is not None:
        probe = f"probe p99 {s.impact_p99_ms:.1f} ms"
        if s.impact_baseline_ms:
            ratio = s.impact_p99_ms / s.impact_baseline_ms
            probe += f" / baseline {s.impact_baseline_ms:.1f} ms = {ratio:.1f}x"
        parts.append(probe)
    elif s.impact_baseline_ms is not None:
        parts.append(f"baseline {s.impact_baseline_ms:.1f} ms")
    if s.impact_target is not None:
        parts.append(f"budget {s.impact_target:g}x")
    if s.pace is not None:
        parts.append(f"pace {s.pace:,.0f}/s")
    return " · ".join(parts) or None


def impact_fields(stats: Stats) -> dict[str, Any]:
    """The impact figures for a log line: only those known."""
    s = stats
    ratio = None
    if s.impact_p99_ms is not None and s.impact_baseline_ms:
        ratio = round(s.impact_p99_ms / s.impact_baseline_ms, 2)
    fields = {
        "impact_p99_ms": s.impact_p99_ms,
        "impact_baseline_ms": s.impact_baseline_ms,
        "impact_ratio": ratio,
        "impact_target": s.impact_target,
        "pace": s.pace,
        "held_by": s.held_by,
    }
    return {k: v for k, v in fields.items() if v is not None}


# --- how it is shown -----------------------------------------------------------------------


_FIXED = Column(no_wrap=True)


def _line(text: str) -> Text:
    return Text(text, no_wrap=True, overflow="ellipsis")


class _Details(ProgressColumn):
    """The figures after the bar: one line, cut short with an ellipsis when the terminal is."""

    def render(self, task: Task) -> Text:
        return _line(task.fields["text"])


class _Display(Progress):
    """rich's Progress, with free lines under its bars (the impact, who holds the run)."""

    footer: tuple[Text, ...] = ()

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield from self.footer


class Reporter:
    """Shows progress until cancelled: on a terminal a live display redrawn every half second
    (log lines print above it); otherwise a `progress` log line every `interval` seconds.

    `verb`: how renames are counted ("renamed", "would rename"); None: a scan alone."""

    def __init__(
        self,
        stats: Stats,
        *,
        verb: str | None,
        tty: bool | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        console: Console | None = None,
    ) -> None:
        self.stats = stats
        self.verb = verb
        self.stream = stream or sys.stderr
        if tty is None:
            tty = console.is_terminal if console is not None else self.stream.isatty()
        self.tty = tty
        self.interval = 0.5 if self.tty else (interval or 10.0)
        self.scan_pace = Pace()
        self.rename_pace = Pace()
        self.console = console or Console(file=self.stream, force_terminal=self.tty)
        self._display = _Display(
            # on a narrow terminal only the details are cut: the figures before them stay
            TextColumn("{task.description}", style="bold", markup=False, table_column=_FIXED),
            BarColumn(bar_width=24, table_column=_FIXED),
            TextColumn("{task.fields[pct]}", markup=False, table_column=_FIXED),
            TextColumn("{task.fields[eta]}", markup=False, table_column=_FIXED),
            _Details(),
            console=self.console,
            auto_refresh=False,  # redrawn by run(): no thread of its own
            transient=True,  # close() prints the final frame: the summary follows it
            # stdout may be a pipe (--format json): redirected only when it is the terminal
            redirect_stdout=sys.stdout.isatty(),
            redirect_stderr=True,
        )
        self._scan_task = self._display.add_task("scan", total=None, pct="", eta="", text="")
        self._rename_task: TaskID | None = None
        if verb is not None:
            self._rename_task = self._display.add_task("rename", total=1.0, pct="", eta="", text="")
        self._shown = contextlib.ExitStack()

    def sample(self, now: float) -> None:
        s = self.stats
        self.scan_pace.add(now, s.scanned_rows)
        self.rename_pace.add(now, s.renamed + s.skipped_rows)
        s.eta_now = self.snapshot().eta  # for `status`, from the same paces as the display

    def snapshot(self, *, scanning: bool | None = None) -> Snapshot:
        return snapshot(
            self.stats,
            scan_rate=self.scan_pace.rate(),
            rate=self.rename_pace.rate(),
            scanning=self.stats.scanning if scanning is None else scanning,
        )

    def render(self, snap: Snapshot) -> RenderableType:
        """The display for `snap` (bars, then the impact line)."""
        d, s = self._display, self.stats
        scan: dict[str, Any] = {
            "pct": fmt_pct(snap.scan_fraction),
            "eta": f"ETA {fmt_eta(snap.scan_eta)}" if snap.phase == "scanning" else "",
            "text": scan_text(s, snap),
        }
        if snap.scan_fraction is not None:
            scan |= {"total": 1.0, "completed": snap.scan_fraction}
        d.update(self._scan_task, **scan)
        if self._rename_task is not None and self.verb is not None:
            d.update(
                self._rename_task,
                completed=snap.fraction,
                pct=fmt_pct(snap.fraction),
                eta=f"ETA {fmt_eta(snap.eta)}",
                text=rename_text(s, snap, self.verb),
            )
        footer = [("impact", impact_text(s)), ("held", s.held_by)]
        d.footer = tuple(_line(f"{label:<6} {text}") for label, text in footer if text)
        return d.get_renderable()

    def emit(self) -> None:
        """Show the counters once: redraw the display, or log a `progress` line."""
        s, snap = self.stats, self.snapshot()
        if self.tty:
            self.render(snap)
            self._display.refresh()
            return
        log.info(
            "progress",
            phase=snap.phase,
            scanned_rows=s.scanned_rows,
            estimated_rows=s.estimated_rows,
            groups_found=s.groups_found,
            rows_to_rename=s.rows_to_rename,
            renamed=s.renamed,
            skipped_rows=s.skipped_rows,
            batches=s.batches,
            batch_size=s.batch_size,
            rows_per_s=round(s.rate(), 1),  # the run's average, as in the summary
            rows_per_s_now=None if snap.rate is None else round(snap.rate, 1),
            eta_s=None if snap.eta is None else math.ceil(snap.eta),
            **impact_fields(s),
        )

    @contextlib.contextmanager
    def _live(self) -> Iterator[None]:
        if not self.tty:
            yield
            return
        with self._shown:
            self.render(self.snapshot())  # the first frame drawn has figures in it
            self._display.start()
            self._shown.callback(self._display.stop)
            self._shown.enter_context(logs.above(self.console))
            yield

    def close(self, *, scan_finished: bool = False) -> None:
        """On a terminal: the final frame, left above what follows. `scan_finished`: the scan
        read everything (else Stats.scanning says)."""
        if not self.tty:
            return
        self._shown.close()  # the live display, if run() is still drawing it
        self.sample(anyio.current_time())
        snap = self.snapshot(scanning=False if scan_finished else None)
        self.console.print(self.render(snap))

    async def run(self) -> None:
        """Sample the counters every second (or `interval`, if shorter) and show them every
        `interval`, until cancelled."""
        tick = min(self.interval, 1.0)
        every = max(1, round(self.interval / tick))
        self.sample(anyio.current_time())
        with self._live():
            ticks = 0
            while True:
                await anyio.sleep(tick)
                self.sample(anyio.current_time())
                ticks += 1
                if ticks % every == 0:
                    self.emit()
