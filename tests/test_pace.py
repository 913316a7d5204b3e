"""The Pace, the one owner of a run's pace (pure, no database): the batch ceiling under the lock
budget and the governor's cap, the workers while scanning and after, --max-rate and the
governor's rate (the slower wins), the governor's holds; and a live `set --batch-size` that
changes how the producer packs work items."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdedupe.batching import LockBudget
from bulkdedupe.config import ThrottleConfig
from bulkdedupe.control import Knobs
from bulkdedupe.pace import Pace
from bulkdedupe.pipeline import _Producer
from bulkdedupe.progress import Stats
from bulkdedupe.scanner import Group, KeyRange
from bulkdedupe.spool import Spool
from bulkdedupe.state import Checkpoints
from bulkdedupe.throttle import Throttle
from bulkdedupe.worker import WorkItem


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pace(clock: Clock | None = None, **kw: Any) -> Pace:
    """A pace on a fake clock, outside any event loop."""
    return Pace(stats=Stats(started=0.0), clock=clock or Clock(), **kw)


# --- batch size ------------------------------------------------------------------------------


def test_the_ceiling_is_the_batch_size_under_the_lock_budget_at_the_concurrency() -> None:
    # 6400 slots: half for us, 2 a row -> 1600 rows for one worker, 200 each for eight
    p = pace(budget=LockBudget(6400), batch_size=1000, concurrency=8, concurrency_while_scanning=1)
    assert p.ceiling == 200  # the operator's concurrency, not the one while scanning
    assert (p.sizer.maximum, p.sizer.size) == (200, 200)  # fixed batches (no target time)
    assert p.batch_size == 1000  # as asked for: the producer packs by it
    p.change(concurrency=1)
    assert p.ceiling == p.sizer.maximum == 1000
    p.change(batch_size=5000)
    assert p.ceiling == p.sizer.maximum == 1600


def test_a_lower_ceiling_takes_the_floor_down_and_a_higher_one_gives_it_back() -> None:
    p = pace(batch_size=1000, min_batch_size=10, target_batch_time=0.25)
    p.change(batch_size=7)
    assert (p.sizer.maximum, p.sizer.minimum, p.sizer.size) == (7, 7, 7)
    p.change(batch_size=500)
    # adaptive batches keep their size (they earn the ceiling), the floor is the operator's again
    assert (p.sizer.maximum, p.sizer.minimum, p.sizer.size) == (500, 10, 10)


def test_the_governors_cap_lowers_the_batch_until_it_lets_go() -> None:
    p = pace(batch_size=1000, min_batch_size=10)
    p.govern(200.0, batch_cap=5)  # 25 ms of 200 renames/s, under --min-batch-size
    assert p.sizer.size == 5
    p.change(batch_size=800)  # a `set` under the cap stays under it
    assert (p.sizer.maximum, p.sizer.size) == (800, 5)
    p.govern(None)  # `set --max-impact off`
    assert p.sizer.size == 800


@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("batch_size"), st.integers(1, 5000)),
            st.tuples(st.just("concurrency"), st.integers(1, 64)),
            st.tuples(st.just("cap"), st.none() | st.integers(1, 5000)),
            st.tuples(st.just("observe"), st.integers(1, 5000)),
            st.tuples(st.just("failed"), st.none()),
        ),
        max_size=40,
    ),
    slots=st.none() | st.integers(64, 100_000),
    target=st.none() | st.just(0.25),
)
def test_every_path_keeps_the_batch_under_the_ceiling_and_the_cap(
    steps: list[tuple[str, int | None]], slots: int | None, target: float | None
) -> None:
    p = pace(budget=LockBudget(slots), batch_size=1000, target_batch_time=target)
    cap: int | None = None
    for what, n in steps:
        if what == "batch_size" and n is not None:
            p.change(batch_size=n)
        elif what == "concurrency" and n is not None:
            p.change(concurrency=n)
        elif what == "cap":
            cap = n
            p.govern(None if n is None else 100.0, batch_cap=n)
        elif what == "observe" and n is not None:
            p.sizer.observe(n, n * 0.0001)
        else:
            p.sizer.failed()
        assert p.sizer.maximum == p.ceiling <= p.batch_size
        assert p.ceiling == LockBudget(slots).clamp(p.batch_size, p.concurrency)
        assert 1 <= p.sizer.size <= min(p.ceiling, cap or p.ceiling)


# --- workers ---------------------------------------------------------------------------------


def test_few_workers_while_scanning_all_of_them_after() -> None:
    p = pace(concurrency=4, concurrency_while_scanning=1)
    assert p.limiter.total_tokens == 1
    p.change(concurrency=6)
    assert p.limiter.total_tokens == 1  # still scanning
    p.change(concurrency_while_scanning=2)
    assert p.limiter.total_tokens == 2
    p.scan_finished()
    assert p.limiter.total_tokens == 6
    p.change(concurrency=3)
    assert p.limiter.total_tokens == 3


# --- rate ------------------------------------------------------------------------------------


def test_no_rate_limit_no_wait() -> None:
    p = pace()
    p.stats.renamed = 10_000
    assert p.delay() == 0.0


def test_max_rate_makes_the_next_batch_wait_for_the_rows_renamed() -> None:
    clock = Clock()
    p = pace(clock, max_rate=100.0)
    assert p.delay() == 0.0  # the first batch is free
    p.stats.renamed = 50
    assert p.delay() == pytest.approx(0.5)
    clock.now = 0.5
    assert p.delay() == 0.0


def test_the_slower_of_max_rate_and_the_governor_wins() -> None:
    clock = Clock()
    p = pace(clock, max_rate=1000.0)
    p.govern(100.0, batch_cap=2)
    p.delay()
    p.stats.renamed = 100
    assert p.delay() == pytest.approx(1.0)  # the governor's 100/s, not --max-rate's 1000/s
    p.govern(10_000.0, batch_cap=250)
    assert p.delay() == pytest.approx(0.1)  # --max-rate is the slower one now


def test_a_rate_set_mid_run_owes_nothing_for_the_rows_before_it() -> None:
    clock = Clock()
    p = pace(clock)
    p.stats.renamed = 100_000  # at full speed
    p.set_max_rate(500.0)
    assert p.delay() == 0.0
    p.stats.renamed += 500
    assert p.delay() == pytest.approx(1.0)


def test_the_governor_switched_off_and_on_again_starts_afresh() -> None:
    clock = Clock()
    p = pace(clock)
    p.govern(500.0, batch_cap=12)
    p.delay()
    p.govern(None)  # `set --max-impact off`
    p.stats.renamed = 100_000  # ... renamed at full speed meanwhile
    clock.now = 5.0
    assert p.delay() == 0.0
    p.govern(500.0, batch_cap=12)  # `set --max-impact 3` again: no 200 s of debt
    assert p.delay() == 0.0


def test_a_rate_change_keeps_the_debt_so_far() -> None:
    clock = Clock()
    p = pace(clock, max_rate=100.0)
    p.delay()
    p.stats.renamed = 100  # 1 s of debt at 100/s
    p.delay()
    clock.now = 0.5
    p.set_max_rate(50.0)  # half paid at the old rate: 50 rows left
    assert p.delay() == pytest.approx(1.0)


# --- holds -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_held_pace_lets_no_batch_start_until_released() -> None:
    p = Pace(stats=Stats())
    p.hold("baseline")
    stop = anyio.Event()
    started = anyio.Event()

    async def batch() -> None:
        await p.wait_turn(stop)
        started.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(batch)
        await anyio.sleep(0.2)
        assert not started.is_set()
        p.release()
        with anyio.fail_after(5):
            await started.wait()
    p.hold("probe stalled")
    stop.set()
    with anyio.fail_after(5):
        await p.wait_turn(stop)  # a stop is obeyed while held


@pytest.mark.anyio
async def test_the_gate_waits_for_the_pace() -> None:
    stats = Stats()
    p = Pace(stats=stats, max_rate=10.0)
    gate = Throttle(ThrottleConfig(max_rate=10.0), stats, anyio.Event(), p).gate()
    await gate()
    stats.renamed = 2  # 0.2 s at 10/s
    started = anyio.current_time()
    with anyio.fail_after(5):
        await gate()
    assert anyio.current_time() - started >= 0.15


# --- who reads it: the producer --------------------------------------------------------------


@pytest.mark.anyio
async def test_a_live_set_batch_size_changes_how_the_producer_packs_items() -> None:
    stats = Stats()
    p = Pace(stats=stats, batch_size=3)
    knobs = Knobs(pace=p, throttle=Throttle(ThrottleConfig(), stats, anyio.Event(), p))
    spool: Spool[WorkItem] = Spool()
    producer = _Producer(spool, Checkpoints([KeyRange(0, None, None)]), p)
    pairs = [Group(f"k{i:02d}", 2) for i in range(12)]  # one rename each

    await producer.on_page(0, pairs[:6], pairs[5].key)
    knobs.apply({"batch_size": 6})  # as `set --batch-size 6` from another terminal
    await producer.on_page(0, pairs[6:], pairs[-1].key)
    spool.close()

    items = []
    while (item := await spool.get()) is not None:
        items.append(item)
    assert [len(i.groups) for i in items] == [3, 3, 6]
    assert [g for i in items for g in i.groups] == pairs  # nothing lost, in scan order
