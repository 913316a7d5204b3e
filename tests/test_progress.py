"""The progress display: its two phases, an ETA from the current pace, never 100 % while renames
remain, log lines above the live display, and the JSON `progress` lines off a terminal."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from structlog.testing import capture_logs

from bulkdedupe import logs
from bulkdedupe.progress import (
    Pace,
    Reporter,
    Stats,
    fmt_eta,
    fmt_pct,
    impact_text,
    rename_text,
    scan_text,
    snapshot,
)
from bulkdedupe.results import RunSummary

# --- helpers ------------------------------------------------------------------------------


def _stats(**kw: Any) -> Stats:
    return Stats(started=0.0, **kw)


def _reporter(stats: Stats, **kw: Any) -> Reporter:
    return Reporter(stats, verb="renamed", tty=False, **kw)


def _console(width: int = 160) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)


def _text(reporter: Reporter, **kw: Any) -> str:
    console = _console()
    console.print(reporter.render(reporter.snapshot(**kw)))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


_CSI = re.compile(r"\x1b\[([?\d;]*)([A-Za-z])|(\r)|(\n)|([^\x1b\r\n]+)")


def _screen(output: str) -> list[str]:
    """What a terminal shows after `output`: as much of one as rich's live display uses
    (carriage return, new line, cursor up, erase in line; styles and cursor visibility are
    not text)."""
    lines, row, col = [""], 0, 0
    for m in _CSI.finditer(output):
        args, cmd, cr, nl, text = m.groups()
        if text:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + text + line[col + len(text) :]
            col += len(text)
        elif cr:
            col = 0
        elif nl:
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif cmd == "A":
            row = max(0, row - int(args or 1))
        elif cmd == "K":
            lines[row] = "" if args == "2" else lines[row][:col]
        elif cmd == "G":
            col = int(args or 1) - 1
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.rstrip() for line in lines]


# --- phase 1: scanning --------------------------------------------------------------------


def test_phase_one_shows_the_scan_and_the_renames_found_so_far() -> None:
    stats = _stats(estimated_rows=2_000_000)
    reporter = _reporter(stats)
    for t in range(21):  # one sample a second, as run() takes them
        stats.scanned_rows = 40_000 * t
        stats.groups_found = 1_000 * t
        stats.rows_to_rename = 2_000 * t
        stats.renamed = 900 * t
        reporter.sample(float(t))
    snap = reporter.snapshot()
    assert snap.phase == "scanning"
    assert scan_text(stats, snap) == (
        "800,000 of ~2,000,000 index entries · 20,000 groups · 40,000 rows to rename · 40,000/s"
    )
    assert fmt_pct(snap.scan_fraction) == " 40.0%"
    assert snap.scan_eta == pytest.approx(30.0)
    # 40,000 found in 40 % of the index: about 100,000 in all
    assert snap.expected == 100_000
    assert rename_text(stats, snap, "renamed") == (
        "renamed 18,000 of ~100,000 (40,000 found so far) · 900/s"
    )
    assert fmt_pct(snap.fraction) == " 18.0%"
    # the renames' end, at the current pace, is after the scan's
    assert snap.eta == pytest.approx((100_000 - 18_000) / 900)
    shown = _text(reporter)
    assert "ETA 00:30" in shown.splitlines()[0]
    assert "ETA 01:32" in shown.splitlines()[1]


def test_while_scanning_the_eta_is_never_before_the_scan_ends() -> None:
    # 10 % scanned at 10,000 entries/s: 90 s to go; the renames found are all done
    stats = _stats(estimated_rows=1_000_000, scanned_rows=100_000, rows_to_rename=100)
    stats.renamed = 100
    snap = snapshot(stats, scan_rate=10_000.0, rate=1_000.0, scanning=True)
    assert snap.scan_eta == pytest.approx(90.0)
    assert snap.eta == pytest.approx(90.0)  # not the 0.9 s the 900 expected renames need
    # past the estimate, with every rename found done: still not 100 % while scanning
    stats.scanned_rows = 1_200_000
    snap = snapshot(stats, scan_rate=10_000.0, rate=1_000.0, scanning=True)
    assert fmt_pct(snap.scan_fraction) == fmt_pct(snap.fraction) == " 99.9%"
    assert snap.eta is None


def test_a_scan_without_an_estimate_shows_no_percentage() -> None:
    stats = _stats(scanned_rows=5_000, groups_found=3, rows_to_rename=4)
    snap = snapshot(stats, scan_rate=100.0, rate=None, scanning=True)
    assert snap.scan_fraction is None
    assert snap.scan_eta is None
    assert snap.eta is None
    assert fmt_pct(None).strip() == "?"
    assert scan_text(stats, snap).startswith("5,000 index entries · 3 groups · 4 rows to rename")
    assert rename_text(stats, snap, "would rename").startswith("would rename 0 of 4 found so far")


# --- phase 2: renaming --------------------------------------------------------------------


def test_phase_two_shows_renames_done_of_renames_found() -> None:
    """The issue's case: the scan is over at 47,819 of 100,000 renames. The old bar said 100 %
    and ETA 00:00 there."""
    stats = _stats(estimated_rows=2_000_000, batch_size=200)
    reporter = _reporter(stats)
    stats.scanned_rows, stats.groups_found, stats.rows_to_rename = 2_104_331, 48_101, 100_000
    for t in range(31):
        stats.renamed = 47_819 - 1_500 * (30 - t)
        reporter.sample(100.0 + t)
    stats.scan_seconds = 130.0
    snap = reporter.snapshot()
    assert snap.phase == "renaming"
    assert fmt_pct(snap.scan_fraction) == "100.0%"
    assert scan_text(stats, snap) == (
        "2,104,331 index entries, done · 48,101 groups · 100,000 rows to rename"
    )
    assert fmt_pct(snap.fraction) == " 47.8%"
    assert rename_text(stats, snap, "renamed") == (
        "renamed 47,819 of 100,000 · 1,500/s · batch 200"
    )
    assert snap.eta == pytest.approx((100_000 - 47_819) / 1_500)
    assert fmt_eta(snap.eta) == "00:35"
    assert "100.0%" not in _text(reporter).splitlines()[1]


def test_skipped_rows_count_as_done_and_show() -> None:
    stats = _stats(rows_to_rename=1_000, renamed=900, skipped_rows=100, scan_seconds=1.0)
    snap = snapshot(stats, scan_rate=None, rate=50.0, scanning=False)
    assert snap.fraction == 1.0
    assert snap.eta == 0.0
    assert "renamed 900 of 1,000 · skipped 100" in rename_text(stats, snap, "renamed")


def test_the_eta_follows_the_current_pace_not_the_runs_average() -> None:
    stats = _stats(rows_to_rename=100_000, scan_seconds=1.0)
    reporter = _reporter(stats)
    for t in range(61):  # fast for a minute: 1,000 renames/s ...
        stats.renamed = 1_000 * t
        reporter.sample(float(t))
    for t in range(61, 91):  # ... then slowed down to 100/s (the governor, a --max-rate)
        stats.renamed = 60_000 + 100 * (t - 60)
        reporter.sample(float(t))
    snap = reporter.snapshot()
    assert snap.rate == pytest.approx(100.0)
    left = 100_000 - stats.renamed
    assert snap.eta == pytest.approx(left / 100)
    average = stats.renamed / 90
    assert snap.eta > 5 * left / average


def test_pace() -> None:
    pace = Pace(window=10.0)
    assert pace.rate() is None
    pace.add(0.0, 0)
    assert pace.rate() is None
    for t in range(1, 31):
        pace.add(float(t), 10 * t if t <= 20 else 200)  # stops at t = 20
    assert pace.rate() == 0.0  # nothing in the last 10 s
    pace.add(35.0, 250)
    assert pace.rate() == pytest.approx(50 / 10)  # from t = 25 (200) to t = 35 (250)


@given(
    estimated=st.integers(0, 10**7),
    scanned=st.integers(0, 10**7),
    found=st.integers(0, 10**6),
    done=st.integers(0, 10**6),
    scanning=st.booleans(),
    rate=st.one_of(st.none(), st.just(0.0), st.floats(0.01, 1e6)),
)
def test_never_100_percent_while_renames_remain(
    estimated: int, scanned: int, found: int, done: int, scanning: bool, rate: float | None
) -> None:
    stats = _stats(estimated_rows=estimated, scanned_rows=scanned, rows_to_rename=found)
    stats.renamed = done
    snap = snapshot(stats, scan_rate=1_000.0, rate=rate, scanning=scanning)
    finished = not scanning and done >= found
    assert (fmt_pct(snap.fraction) == "100.0%") == finished
    assert (fmt_pct(snap.scan_fraction) == "100.0%") == (not scanning)
    if not finished:
        assert snap.eta != 0.0
        assert fmt_eta(snap.eta) != "00:00"


def test_fmt_eta() -> None:
    assert fmt_eta(None) == "--:--"
    assert fmt_eta(0.0) == "00:00"
    assert fmt_eta(0.2) == "00:01"  # not done yet: rounded up
    assert fmt_eta(3_725) == "1:02:05"


# --- the impact and who holds the run ------------------------------------------------------


def test_impact_and_holds_are_shown_when_known() -> None:
    stats = _stats(rows_to_rename=10, scan_seconds=1.0)
    assert impact_text(stats) is None
    reporter = Reporter(stats, verb="renamed", tty=True, stream=io.StringIO())
    assert len(_text(reporter).splitlines()) == 2  # the bars only
    stats.held_by = "paused: operator"
    assert _text(reporter).splitlines()[2].rstrip() == "held   paused: operator"
    stats.impact_baseline_ms, stats.impact_target = 2.0, 3.0
    assert impact_text(stats) == "baseline 2.0 ms · budget 3x"
    stats.impact_p99_ms, stats.pace = 5.1, 4_000.0
    assert impact_text(stats) == (
        "probe p99 5.1 ms / baseline 2.0 ms = 2.5x · budget 3x · pace 4,000/s"
    )
    lines = _text(reporter).splitlines()
    assert lines[2].startswith("impact probe p99 5.1 ms")
    assert lines[3].rstrip() == "held   paused: operator"


def test_a_scan_alone_has_no_renames_row() -> None:
    stats = _stats(estimated_rows=100, scanned_rows=100, groups_found=2, rows_to_rename=3)
    reporter = Reporter(stats, verb=None, tty=True, stream=io.StringIO())
    (line,) = _text(reporter, scanning=False).splitlines()
    assert line.startswith("scan ")
    assert "100.0%" in line
    assert "3 rows to rename" in line


def test_a_narrow_terminal_cuts_the_details_not_the_figures() -> None:
    stats = _stats(estimated_rows=2_000_000, scanned_rows=800_000, rows_to_rename=40_000)
    reporter = Reporter(stats, verb="renamed", tty=True, stream=io.StringIO())
    console = _console(width=70)
    console.print(reporter.render(reporter.snapshot()))
    for line in console.file.getvalue().splitlines():  # type: ignore[attr-defined]
        assert len(line.rstrip()) <= 70
        assert re.search(r"\d+\.\d%", line), line
    assert "…" in console.file.getvalue()  # type: ignore[attr-defined]


# --- on a terminal: rich's live display, log lines above it --------------------------------


@pytest.fixture
def console_logs() -> Iterator[None]:
    """logs.configure(fmt="console") for one test; structlog and asyncpg's logger restored."""
    saved = structlog.get_config()
    driver = logging.getLogger("asyncpg")
    handlers, propagate, level = driver.handlers[:], driver.propagate, driver.level
    logs.configure(fmt="console")
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
        driver.handlers, driver.propagate = handlers, propagate
        driver.setLevel(level)


@pytest.mark.anyio
@pytest.mark.usefixtures("console_logs")
async def test_a_log_line_lands_above_the_live_display() -> None:
    stats = _stats(estimated_rows=1_000, scanned_rows=100, groups_found=1, rows_to_rename=1)
    console = _console(width=120)
    reporter = Reporter(stats, verb="renamed", console=console)
    assert reporter.tty
    async with anyio.create_task_group() as tg:
        tg.start_soon(reporter.run)
        await anyio.sleep(0.7)  # drawn at least once
        structlog.get_logger().warning("groups skipped", reason="lock_timeout")
        stats.scanned_rows = 500
        await anyio.sleep(0.6)  # and redrawn after the log line
        live = _screen(console.file.getvalue())  # type: ignore[attr-defined]
        tg.cancel_scope.cancel()
    assert len(live) == 3, live
    assert "groups skipped" in live[0]
    assert "reason=lock_timeout" in live[0]
    assert live[1].startswith("scan ")
    assert "500 of ~1,000 index entries" in live[1]
    assert live[2].startswith("rename ")

    stats.scan_seconds = 2.0
    reporter.close()
    final = _screen(console.file.getvalue())  # type: ignore[attr-defined]
    assert final[0] == live[0]
    assert final[1].startswith("scan ")
    assert "done" in final[1]
    assert len(final) == 3, final
    # the display is gone: log lines go to stderr again
    assert logs._live is None


def test_logs_print_above_a_console_only_while_one_is_live() -> None:
    out = io.StringIO()
    logger = logs.LineLogger(out)
    console = _console()
    with logs.above(console):
        logger.info('{"event": "a json line longer than the console is wide' + "x" * 200 + '"}')
    logger.info("plain")
    assert out.getvalue() == "plain\n"
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert printed.count("\n") == 1  # soft-wrapped: still one line
    assert '"}' in printed


# --- off a terminal: JSON progress lines ----------------------------------------------------


_OLD_FIELDS = {
    "scanned_rows",
    "estimated_rows",
    "groups_found",
    "renamed",
    "skipped_rows",
    "batches",
    "batch_size",
    "rows_per_s",
    "eta_s",
}


@pytest.mark.anyio  # rows_per_s (the run's average) reads the event loop's clock
async def test_progress_lines_off_a_terminal_have_the_phase_and_the_current_pace() -> None:
    stats = _stats(estimated_rows=1_000_000)
    reporter = _reporter(stats)
    with capture_logs() as captured:
        for t in range(11):
            stats.scanned_rows = 50_000 * t
            stats.rows_to_rename = 1_000 * t
            stats.groups_found = 500 * t
            stats.renamed = 400 * t
            reporter.sample(float(t))
        reporter.emit()
        stats.scan_seconds = 20.0
        stats.impact_p99_ms, stats.impact_baseline_ms, stats.impact_target = 4.0, 2.0, 3.0
        stats.held_by = "governor: baseline"
        reporter.emit()
    scanning, renaming = (e for e in captured if e["event"] == "progress")
    assert scanning.keys() >= _OLD_FIELDS
    assert scanning["phase"] == "scanning"
    assert scanning["rows_to_rename"] == 10_000
    assert scanning["rows_per_s_now"] == 400.0
    # 10,000 found in half the index: 16,000 left of about 20,000, at 400/s
    assert scanning["eta_s"] == 40
    impact = {"impact_p99_ms", "impact_baseline_ms", "impact_ratio", "impact_target"}
    assert not (impact | {"pace", "held_by"}) & scanning.keys()
    assert renaming["phase"] == "renaming"
    assert renaming["eta_s"] == 15  # 6,000 left of the 10,000 found, at 400/s
    assert renaming["impact_p99_ms"] == 4.0
    assert renaming["impact_baseline_ms"] == 2.0
    assert renaming["impact_ratio"] == 2.0
    assert renaming["impact_target"] == 3.0
    assert renaming["held_by"] == "governor: baseline"
    assert "pace" not in renaming


@pytest.mark.anyio
async def test_run_logs_progress_lines_every_interval_off_a_terminal() -> None:
    stats = Stats()
    reporter = _reporter(stats, interval=0.05)
    with capture_logs() as captured:
        with anyio.move_on_after(0.3):
            await reporter.run()
        reporter.close()  # nothing to draw
    lines = [e for e in captured if e["event"] == "progress"]
    assert len(lines) >= 3
    assert all(e["phase"] == "scanning" for e in lines)


# --- the final summary ----------------------------------------------------------------------


def test_the_summary_shows_the_wal_written_and_the_impact() -> None:
    common: dict[str, Any] = {
        "run_id": "r1",
        "mode": "apply",
        "status": "completed",
        "table": "public.payments",
        "key": "transaction_id",
        "groups": 10,
        "rows_renamed": 50_000,
        "rows_skipped": 0,
        "skipped": {},
        "batches": 160,
        "retries": 0,
        "scanned_rows": 1_000_000,
        "duration_s": 18.4,
        "rows_per_s": 2_723.5,
        "batch_ms_p50": 40.8,
        "batch_ms_p99": 84.0,
        "batch_ms_max": 86.0,
        "longest_scan_page_ms": 26.8,
    }
    plain = RunSummary(**common)
    assert "WAL" not in plain.to_text()
    assert "impact" not in plain.to_text()
    assert plain.to_json()["wal_bytes"] is None

    summary = RunSummary(
        **common,
        wal_bytes=34_918_400,
        wal_bytes_per_rename=698.4,
        impact_p99_ms=5.1,
        impact_baseline_ms=2.0,
        impact_target=3.0,
    )
    text = summary.to_text()
    assert "WAL written (server)     33.3 MiB (698 bytes per rename)" in text
    assert "probe p99 5.1 / baseline 2.0 ms = 2.5x (budget 3x)" in text
    d = summary.to_json()
    assert d["wal_bytes"] == 34_918_400
    assert d["wal_bytes_per_rename"] == 698.4
    assert (d["impact_p99_ms"], d["impact_baseline_ms"], d["impact_target"]) == (5.1, 2.0, 3.0)
