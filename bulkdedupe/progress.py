"""Live counters of a run, and how they are shown: a one-line bar on a TTY, periodic
structured log lines otherwise."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

import anyio
import structlog

log = structlog.get_logger(__name__)


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

    def elapsed(self) -> float:
        return anyio.current_time() - self.started

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


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Reporter:
    """Shows progress every `interval` seconds until cancelled."""

    def __init__(
        self,
        stats: Stats,
        *,
        verb: str,
        tty: bool | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.stats = stats
        self.verb = verb
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.5 if self.tty else (interval or 10.0)

    def line(self) -> str:
        s = self.stats
        pct = ""
        if s.estimated_rows:
            pct = f" {min(100.0, 100 * s.scanned_rows / s.estimated_rows):5.1f}%"
        width = 24
        filled = int(width * min(1.0, s.scanned_rows / s.estimated_rows)) if s.estimated_rows else 0
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"[{bar}]{pct} scanned {s.scanned_rows:,} · groups {s.groups_found:,} · "
            f"{self.verb} {s.renamed:,} · {s.rate():,.0f} rows/s · batch {s.batch_size} · "
            f"ETA {_fmt_eta(s.eta())}"
        )

    def emit(self) -> None:
        s = self.stats
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
        else:
            log.info(
                "progress",
                scanned_rows=s.scanned_rows,
                estimated_rows=s.estimated_rows,
                groups_found=s.groups_found,
                renamed=s.renamed,
                skipped_rows=s.skipped_rows,
                batches=s.batches,
                batch_size=s.batch_size,
                rows_per_s=round(s.rate(), 1),
                eta_s=None if s.eta() is None else round(s.eta() or 0.0),
            )

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + "\n")
            self.stream.flush()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            self.emit()
