"""The impact governor: the controller's arithmetic (pure, no database), and one real run paced
by its probe against real PostgreSQL: baseline first, figures in the summary and `status`, the
budget changed live with `set --max-impact`; and undo paced the same, its summary (human and
`--format json`) with the same figures."""

from __future__ import annotations

import json

import anyio
import anyio.lowlevel
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdedupe import RunConfig, control, pipeline
from bulkdedupe.batching import BatchSizer
from bulkdedupe.config import ImpactConfig, parse_max_impact
from bulkdedupe.errors import RunStateError, UsageError
from bulkdedupe.governor import (
    BASELINE_FLOOR_MS,
    MIN_RATE,
    MIN_SAMPLES,
    START_RATE,
    Controller,
    Probes,
)
from tests.factories import apply_cfg, connect, duplicate_groups
from tests.faults_support import slow_down_renames
from tests.helpers import create_payments, fetch, run_cli

BASE = 4.0  # ms: a baseline above the floor, so the budget is RATIO x this
QUIET = [BASE] * MIN_SAMPLES  # probes at the baseline: room to grow


def test_slow_start_then_gentle_growth_after_the_first_breach() -> None:
    c = Controller(budget=3.0)
    assert c.step(QUIET, QUIET[-5:], BASE, now=1.0) == "up"
    assert c.rate == START_RATE * 1.5
    over = [BASE * 3.5] * 5 + QUIET
    assert c.step(over, over[-5:], BASE, now=2.0) == "down"
    hurt = START_RATE * 1.5
    assert c.rate == hurt / 2
    c.step(QUIET, QUIET[-5:], BASE, now=3.0)
    assert c.rate == pytest.approx(hurt / 2 * 1.1)  # gentle now


def test_one_slow_probe_is_no_p99_breach() -> None:
    c = Controller(budget=3.0)
    samples = [*QUIET[:-1], BASE * 3.5]  # 1 of 30 over: could be noise, not a p99 breach
    assert c.step(samples, [BASE], BASE, now=1.0) != "down"


def test_a_probe_far_over_cuts_at_once_by_two_thirds() -> None:
    c = Controller(budget=3.0, rate=3000)
    assert c.step([BASE * 13], [BASE * 13], BASE, now=1.0) == "down"
    assert c.rate == pytest.approx(1000)


def test_hold_in_the_dead_band_and_without_enough_probes() -> None:
    c = Controller(budget=3.0, rate=1000)
    band = [BASE * 2.5] * MIN_SAMPLES  # over 70 % of the budget, under it
    assert c.step(band, band[-5:], BASE, now=1.0) == "hold"
    assert c.step(QUIET[:5], QUIET[:5], BASE, now=2.0) == "hold"  # too few to grow on
    assert c.rate == 1000


def test_a_pace_that_hurt_caps_growth_for_a_while() -> None:
    c = Controller(budget=3.0, rate=1000)
    over = [BASE * 3.5] * 5
    c.step(over, over, BASE, now=0.0)
    assert c.rate == 500
    for i in range(1, 20):
        c.step(QUIET, QUIET[-5:], BASE, now=float(i))
    assert c.rate <= 0.9 * 1000  # never back to the pace that hurt, within the memory
    for i in range(100, 110):
        c.step(QUIET, QUIET[-5:], BASE, now=float(i))
    assert c.rate > 900  # forgotten after MEMORY_SECONDS


def test_a_stalled_probe_drops_to_the_lowest_pace() -> None:
    c = Controller(budget=3.0, rate=5000)
    c.stalled(now=1.0)
    assert c.rate == MIN_RATE


@given(
    st.lists(st.floats(min_value=0.1, max_value=500), min_size=1, max_size=300),
    st.floats(min_value=0.1, max_value=50),
    st.floats(min_value=1.01, max_value=10),
)
def test_the_pace_stays_within_its_bounds(samples: list[float], base: float, ratio: float) -> None:
    c = Controller(budget=ratio)
    for i in range(5):
        c.step(samples, samples[-20:], base, now=float(i))
        assert MIN_RATE <= c.rate <= c.max_rate
        assert c.batch_cap() >= 1


def test_the_budget_is_never_tighter_than_the_floor() -> None:
    c = Controller(budget=3.0)
    assert c.target_ms(0.3) == 3.0 * BASELINE_FLOOR_MS


def test_baseline_is_the_median_of_the_idle_windows() -> None:
    probes = Probes()
    for window_p99 in (3.0, 30.0, 4.0):  # one noisy window moves it little
        probes.add(0.0, window_p99, idle=True)
        probes.close_idle_window()
    assert probes.baseline() == 4.0


def test_batches_shrink_with_the_pace() -> None:
    sizer = BatchSizer(target=0.25, minimum=10, maximum=1000)
    sizer.set_cap(Controller(budget=3.0, rate=200).batch_cap())
    assert sizer.size == 5  # 25 ms of a 200 renames/s pace, under --min-batch-size
    sizer.set_cap(None)
    sizer.observe(100, 0.01)
    assert sizer.size > 5


@pytest.mark.parametrize("text", ["1", "0.5", "-3", "x", "nan", "inf"])
def test_max_impact_must_be_a_ratio_above_one(text: str) -> None:
    with pytest.raises(UsageError, match="--max-impact"):
        parse_max_impact(text)


def test_max_impact_off() -> None:
    assert parse_max_impact("off") is None
    assert parse_max_impact("1.5") == 1.5


# --- one real run ---------------------------------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_a_paced_run_measures_its_baseline_first_and_reports_its_impact(dsn: str) -> None:
    rows = [(f"g{i:04d}",) for i in range(300) for _ in range(2)]
    await create_payments(dsn, rows=rows)
    app = await asyncpg.connect(dsn)
    await slow_down_renames(app, 0.01)  # about 3 s of renames, so the run can be watched
    await app.close()
    cfg = connect(dsn)
    impact = ImpactConfig(max_impact=3.0, baseline=0.5, remeasure_every=1.0, remeasure_for=0.3)
    stop = anyio.Event()
    seen: dict[str, object] = {}

    async def watch() -> None:
        # `status` sees the governor while it runs; `set --max-impact` changes its budget
        while not seen.get("set"):
            await anyio.sleep(0.2)
            try:
                s = await control.status(cfg)
            except RunStateError:  # the state schema or the run does not exist yet
                await anyio.lowlevel.checkpoint()
                continue
            if s.alive and s.impact_baseline_ms:
                seen["status"] = s
                await control.request(cfg, s.run_id, verb="set", settings={"max_impact": 5})
                seen["set"] = True

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            summary = await pipeline.run(
                cfg, apply_cfg(batch_size=20, concurrency=2, impact=impact), stop=stop
            )
            tg.cancel_scope.cancel()

    assert summary.status == "completed"
    assert summary.rows_renamed == 300
    assert await duplicate_groups(dsn) == {}
    assert summary.impact_baseline_ms is not None
    assert summary.impact_baseline_ms > 0
    assert summary.impact_p99_ms is not None
    assert summary.impact_p99_ms > 0
    assert summary.impact_target == 5.0  # as `set` left it
    beats = await fetch(dsn, "SELECT run_id, beat FROM bulkdedupe.heartbeat")
    assert [r["run_id"] for r in beats] == [summary.run_id]
    assert beats[0]["beat"] > 5  # the probe wrote, a few times a second
    assert seen.get("set")
    assert getattr(seen["status"], "impact_target", None) == 3.0  # before the `set`


async def test_a_dry_run_needs_no_probe(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("a",)])
    impact = ImpactConfig(max_impact=3.0, baseline=30.0)  # would wait 30 s if it probed
    with anyio.fail_after(20):
        summary = await pipeline.run(connect(dsn), RunConfig(impact=impact))
    assert summary.mode == "dry-run"
    assert summary.impact_target is None


async def test_undo_is_paced_by_the_governor_too(dsn: str) -> None:
    from bulkdedupe import UndoConfig, undo

    await create_payments(dsn, rows=[(f"u{i:03d}",) for i in range(100) for _ in range(2)])
    cfg = connect(dsn)
    summary = await pipeline.run(cfg, apply_cfg())
    assert summary.rows_renamed == 100
    impact = ImpactConfig(max_impact=3.0, baseline=0.3, remeasure_every=None)
    with anyio.fail_after(60):
        result = await undo(
            cfg, UndoConfig(run_id=summary.run_id, apply=True, batch_size=10, impact=impact)
        )
    assert result.status == "completed"
    assert result.restored == 100
    beats = await fetch(dsn, "SELECT run_id, beat FROM bulkdedupe.heartbeat")
    assert [r["run_id"] for r in beats] == [result.run_id]  # the undo's own probe
    assert beats[0]["beat"] >= 3
    # its summary has the impact figures a run's has, and says them
    assert result.impact_baseline_ms is not None
    assert result.impact_baseline_ms >= BASELINE_FLOOR_MS
    assert result.impact_p99_ms is not None
    assert result.impact_p99_ms > 0
    assert result.impact_target == 3.0
    assert "(budget 3x)" in result.to_text()
    assert result.to_json()["impact_target"] == 3.0
    # ... and so does `status` of the finished undo, from its runs row
    assert result.run_id is not None
    finished = await control.status(cfg, result.run_id)
    assert (finished.impact_target, finished.impact_baseline_ms) == (
        3.0,
        result.impact_baseline_ms,
    )


async def test_undo_summary_in_json_carries_the_impact_figures(dsn: str) -> None:
    await create_payments(dsn, rows=[(f"j{i:03d}",) for i in range(40) for _ in range(2)])
    summary = await pipeline.run(connect(dsn), apply_cfg())  # --max-impact off (the suite's)
    undo = ["undo", "-d", dsn, "--run-id", summary.run_id, "--format", "json"]
    paced = ["--max-impact", "3", "--impact-baseline", "0.3s", "--impact-remeasure", "off"]

    dry = run_cli(*undo, *paced)  # a dry run writes nothing: no probe, no figures
    applied = run_cli(*undo, "--apply", *paced)

    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["impact_target"] is None
    assert applied.returncode == 0, applied.stderr
    out = json.loads(applied.stdout)
    assert out["restored"] == 40
    assert out["impact_target"] == 3.0
    assert out["impact_baseline_ms"] >= BASELINE_FLOOR_MS
    assert out["impact_p99_ms"] > 0
