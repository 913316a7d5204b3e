"""Adaptive batch sizing (pure): stays in bounds, shrinks at once, grows gradually; the lock
table's ceiling, and a live `set` that goes through it."""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from bulkdedupe.batching import GROWTH, LOCKS_PER_ROW, BatchSizer, LockBudget

observations = st.lists(
    st.tuples(st.integers(min_value=1, max_value=10_000), st.floats(min_value=1e-4, max_value=30)),
    max_size=50,
)


@given(
    target=st.floats(min_value=0.01, max_value=5),
    lo=st.integers(min_value=1, max_value=500),
    hi=st.integers(min_value=1, max_value=10_000),
    obs=observations,
    failures=st.lists(st.booleans(), max_size=50),
)
def test_size_stays_within_bounds_and_growth_is_gradual(
    target: float, lo: int, hi: int, obs: list[tuple[int, float]], failures: list[bool]
) -> None:
    sizer = BatchSizer(target=target, minimum=lo, maximum=hi)
    floor = min(lo, hi)
    for i, (rows, seconds) in enumerate(obs):
        before = sizer.size
        if i < len(failures) and failures[i]:
            sizer.failed()
            assert sizer.size <= max(before, floor)
        else:
            sizer.observe(rows, seconds)
            assert sizer.size <= max(floor, int(before * GROWTH))
            if seconds > target:
                assert sizer.size <= max(before, floor)  # a slow batch never grows the next
        assert floor <= sizer.size <= hi


def test_slow_batch_shrinks_the_next_one_at_once() -> None:
    sizer = BatchSizer(target=0.25, minimum=10, maximum=1000, size=1000)
    sizer.observe(1000, 1.0)  # 4x too slow
    assert sizer.size <= 250


def test_fast_batches_grow_to_the_ceiling_gradually() -> None:
    sizer = BatchSizer(target=0.25, minimum=10, maximum=1000)
    sizes = [sizer.size]
    for _ in range(30):
        sizer.observe(sizer.size, sizer.size * 0.0001)  # 0.1 ms a row: ceiling is the limit
        sizes.append(sizer.size)
    assert sizes[0] == 100
    assert sizes[-1] == 1000
    assert all(b <= int(a * GROWTH) for a, b in itertools.pairwise(sizes))


def test_failure_halves_and_fixed_mode_never_changes() -> None:
    sizer = BatchSizer(target=0.25, minimum=10, maximum=1000, size=800)
    sizer.failed()
    assert sizer.size == 400
    fixed = BatchSizer(target=None, minimum=10, maximum=500)
    fixed.observe(500, 100.0)
    fixed.failed()
    assert fixed.size == 500


def test_noisy_batches_mostly_stay_under_the_target() -> None:
    """With per-row times that vary (a busy server), the sizer keeps most batches under the
    target, not just the average one."""
    rng = random.Random(7)
    sizer = BatchSizer(target=0.25, minimum=10, maximum=5000)
    over = 0
    steps = 2000
    for step in range(steps):
        rate = 0.0002 * rng.lognormvariate(0, 0.35)  # ~0.2 ms a row, +-35 %
        seconds = sizer.size * rate
        if step >= 200 and seconds > 0.25:  # after warm-up
            over += 1
        sizer.observe(sizer.size, seconds)
    assert over / (steps - 200) < 0.06  # the mean alone would put about half of them over
    assert sizer.size > 400  # and it did not shrink to nothing to get there


@given(
    slots=st.integers(min_value=0, max_value=10_000_000),
    batch=st.integers(min_value=1, max_value=100_000),
    concurrency=st.integers(min_value=1, max_value=64),
)
def test_the_workers_together_hold_at_most_half_the_lock_table(
    slots: int, batch: int, concurrency: int
) -> None:
    budget = LockBudget(slots)
    size = budget.clamp(batch, concurrency)
    assert 1 <= size <= batch
    if slots >= 2 * concurrency * LOCKS_PER_ROW:  # else even one row a batch is too many
        assert concurrency * size * LOCKS_PER_ROW <= slots // 2
    # more workers never allow bigger batches
    assert budget.clamp(batch, concurrency + 1) <= size


@given(batch=st.integers(min_value=1), concurrency=st.integers(min_value=1, max_value=64))
def test_no_lock_table_no_ceiling(batch: int, concurrency: int) -> None:
    assert LockBudget(None).ceiling(concurrency) is None
    assert LockBudget(None).clamp(batch, concurrency) == batch
