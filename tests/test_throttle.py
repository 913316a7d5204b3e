"""Pure throttle logic, no database: each health signal over and under its limit, the hysteresis
of continuous signals, the max-rate token bucket, WAL arithmetic, and `set` validation."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdedupe.config import ThrottleConfig
from bulkdedupe.control import validate_settings
from bulkdedupe.errors import UsageError
from bulkdedupe.pace import Pace, TokenBucket
from bulkdedupe.progress import Stats
from bulkdedupe.throttle import (
    ARCHIVE_BACKLOG_SEGMENTS,
    MIB,
    RESUME_BELOW,
    Sample,
    Stopping,
    Throttle,
    Verdict,
    archive_backlog,
    decide,
    wal_rate,
    wal_segment_number,
)

SEG = 16 * MIB


def signals(sample: Sample, limits: ThrottleConfig, paused_by: frozenset[str] = frozenset()):
    return decide(sample, limits, paused_by).signals


def test_nothing_watched_means_go() -> None:
    v = decide(Sample(lock_waiters=99, active_backends=99, throttle_query=False), ThrottleConfig())
    assert v.ok
    assert v.stop is None


def test_lock_waiters_over_and_under() -> None:
    limits = ThrottleConfig(max_lock_waiters=2)
    assert signals(Sample(lock_waiters=2), limits) == frozenset()
    v = decide(Sample(lock_waiters=3), limits)
    assert v.signals == {"lock_waiters"}
    (r,) = v.pauses
    assert (r.value, r.limit) == (3, 2)
    assert "3 sessions wait on locks" in r.detail


def test_lock_waiters_zero_limit_pauses_on_one() -> None:
    assert signals(Sample(lock_waiters=1), ThrottleConfig(max_lock_waiters=0)) == {"lock_waiters"}
    assert signals(Sample(lock_waiters=0), ThrottleConfig(max_lock_waiters=0)) == frozenset()


def test_active_backends_over_and_under() -> None:
    limits = ThrottleConfig(max_active_backends=10)
    assert signals(Sample(active_backends=10), limits) == frozenset()
    assert signals(Sample(active_backends=11), limits) == {"active_backends"}


def test_replication_lag_worst_replica_counts() -> None:
    limits = ThrottleConfig(max_replication_lag=10.0)
    assert signals(Sample(replica_lags={"a": 1.0, "b": 9.9}), limits) == frozenset()
    v = decide(Sample(replica_lags={"a": 1.0, "b": 12.5}), limits)
    (r,) = v.pauses
    assert r.signal == "replication_lag"
    assert r.value == 12.5
    assert "replica b" in r.detail


def test_no_replicas_is_no_lag() -> None:
    assert decide(Sample(replica_lags={}), ThrottleConfig(max_replication_lag=1.0)).ok


def test_unknown_replica_lag_pauses() -> None:
    v = decide(Sample(replica_lags={"a": 0.0, "r2": None}), ThrottleConfig(max_replication_lag=5))
    (r,) = v.pauses
    assert r.signal == "replication_lag"
    assert r.value is None
    assert "r2" in r.detail


def test_lag_hysteresis_resumes_only_below_the_resume_share() -> None:
    limits = ThrottleConfig(max_replication_lag=10.0)
    between = 10.0 * (RESUME_BELOW + 1) / 2  # under the limit, over the resume threshold
    running = frozenset()
    paused = frozenset({"replication_lag"})
    # not paused yet: under the limit is fine
    assert signals(Sample(replica_lags={"a": between}), limits, running) == frozenset()
    # paused by lag: stays paused until it falls below RESUME_BELOW x limit
    assert signals(Sample(replica_lags={"a": between}), limits, paused) == {"replication_lag"}
    below = 10.0 * RESUME_BELOW - 0.1
    assert signals(Sample(replica_lags={"a": below}), limits, paused) == frozenset()


def test_wal_rate_with_hysteresis() -> None:
    limits = ThrottleConfig(max_wal_rate=50.0)
    assert signals(Sample(wal_bytes_per_s=50 * MIB), limits) == frozenset()
    v = decide(Sample(wal_bytes_per_s=80 * MIB), limits)
    assert v.signals == {"wal_rate"}
    assert v.pauses[0].value == 80.0
    assert signals(Sample(wal_bytes_per_s=45 * MIB), limits, frozenset({"wal_rate"})) == {
        "wal_rate"
    }
    assert signals(Sample(wal_bytes_per_s=30 * MIB), limits, frozenset({"wal_rate"})) == frozenset()


def test_archive_backlog_pauses_only_with_max_wal_rate() -> None:
    over = Sample(archive_backlog=ARCHIVE_BACKLOG_SEGMENTS + 1)
    assert signals(over, ThrottleConfig(max_wal_rate=100.0)) == {"archive_backlog"}
    assert signals(over, ThrottleConfig()) == frozenset()
    at = Sample(archive_backlog=ARCHIVE_BACKLOG_SEGMENTS)
    assert signals(at, ThrottleConfig(max_wal_rate=100.0)) == frozenset()
    assert signals(Sample(archive_backlog=None), ThrottleConfig(max_wal_rate=100.0)) == frozenset()


def test_autovacuum_only_when_asked() -> None:
    busy = Sample(autovacuum=True)
    assert signals(busy, ThrottleConfig()) == frozenset()
    assert signals(busy, ThrottleConfig(pause_during_autovacuum=True)) == {"autovacuum"}
    assert signals(Sample(autovacuum=False), ThrottleConfig(pause_during_autovacuum=True)) == set()


def test_throttle_query_true_pauses() -> None:
    limits = ThrottleConfig(throttle_query="SELECT true")
    assert signals(Sample(throttle_query=True), limits) == {"throttle_query"}
    assert signals(Sample(throttle_query=False), limits) == frozenset()


def test_operator_pause_and_monitor_failure() -> None:
    v = decide(
        Sample(operator_paused=True, failure="ConnectionDoesNotExistError: gone"), ThrottleConfig()
    )
    assert v.signals == {"operator", "monitor"}
    assert "paused by operator" in [r.detail for r in v.pauses]


def test_several_reasons_at_once() -> None:
    limits = ThrottleConfig(max_lock_waiters=0, max_active_backends=1)
    assert signals(Sample(lock_waiters=1, active_backends=5), limits) == {
        "lock_waiters",
        "active_backends",
    }


def test_critical_active_backends_stops() -> None:
    limits = ThrottleConfig(critical_active_backends=20, max_active_backends=10)
    v = decide(Sample(active_backends=15), limits)
    assert v.stop is None
    assert v.signals == {"active_backends"}
    v = decide(Sample(active_backends=21), limits)
    assert v.stop is not None
    assert v.stop.signal == "critical_active_backends"


def test_max_runtime_stops() -> None:
    limits = ThrottleConfig(max_runtime=60.0)
    assert decide(Sample(elapsed=59.9), limits).stop is None
    v = decide(Sample(elapsed=60.0), limits)
    assert v.stop is not None
    assert v.stop.signal == "max_runtime"


def test_operator_stop() -> None:
    v = decide(Sample(operator_stop=True), ThrottleConfig())
    assert v.stop is not None
    assert v.stop.detail == "stopped by operator"


# --- the token bucket ------------------------------------------------------------------------


def test_bucket_first_batch_is_free_then_waits_for_its_rows() -> None:
    b = TokenBucket(rate=200.0)
    assert b.delay(0.0) == 0.0
    b.spend(100, 0.0)
    assert b.delay(0.0) == pytest.approx(0.5)
    assert b.delay(0.25) == pytest.approx(0.25)
    assert b.delay(0.5) == 0.0


def test_bucket_idle_time_earns_no_credit() -> None:
    b = TokenBucket(rate=100.0)
    b.spend(0, 0.0)
    assert b.delay(100.0) == 0.0  # long idle
    b.spend(50, 100.0)
    assert b.delay(100.0) == pytest.approx(0.5)  # not paid for by the idle time


def test_bucket_rate_change_keeps_the_debt() -> None:
    b = TokenBucket(rate=100.0)
    b.spend(100, 0.0)  # 1 s of debt at 100/s
    b.set_rate(50.0, 0.5)  # half paid at the old rate: 50 rows left
    assert b.delay(0.5) == pytest.approx(1.0)  # 50 rows at 50/s


@given(
    rate=st.floats(min_value=1, max_value=10_000),
    batches=st.lists(st.integers(min_value=0, max_value=5_000), min_size=1, max_size=40),
)
def test_bucket_never_exceeds_the_rate(rate: float, batches: list[int]) -> None:
    """Start each batch as soon as the bucket allows: every batch but the last is paid for
    before the next starts, so rows / time never beats the rate."""
    b = TokenBucket(rate=rate)
    now = 0.0
    for rows in batches:
        now += b.delay(now)
        b.spend(rows, now)
    paid_until = now + b.delay(now)
    assert sum(batches) <= rate * paid_until + 1e-6 * max(1.0, sum(batches))


# --- WAL arithmetic --------------------------------------------------------------------------


def test_wal_segment_numbers() -> None:
    assert wal_segment_number("000000010000000000000001", SEG) == 1
    # 256 segments of 16 MiB per "log" file number
    assert wal_segment_number("0000000100000002000000FF", SEG) == 2 * 256 + 255
    assert wal_segment_number("00000002.history", SEG) is None
    assert wal_segment_number("000000010000000000000003.00000028.backup", SEG) is None
    assert wal_segment_number(None, SEG) is None


def test_archive_backlog_counts_completed_segments_only() -> None:
    assert archive_backlog("000000010000000000000009", "00000001000000000000000A", SEG) == 0
    assert archive_backlog("000000010000000000000001", "00000001000000000000000A", SEG) == 8
    # across a log file boundary and a timeline switch
    assert archive_backlog("0000000100000000000000FE", "000000020000000100000001", SEG) == 2
    assert archive_backlog(None, "00000001000000000000000A", SEG) is None


def test_wal_rate_over_the_window() -> None:
    assert wal_rate([(0.0, 0)]) is None
    assert wal_rate([(0.0, 0), (1.0, 10 * MIB), (4.0, 40 * MIB)]) == pytest.approx(10 * MIB)
    assert wal_rate([(1.0, 0), (1.0, 5)]) is None


# --- the gate --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_gate_waits_while_paused_and_leaves_when_stopping() -> None:
    stop = anyio.Event()
    throttle = Throttle(ThrottleConfig(), Stats(), stop)
    gate = throttle.gate()
    await gate()  # open: returns at once
    paused = decide(Sample(operator_paused=True), ThrottleConfig())
    throttle.update(paused)
    passed = anyio.Event()

    async def worker() -> None:
        await gate()
        passed.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        await anyio.sleep(0.2)
        assert not passed.is_set()
        throttle.update(Verdict())
        with anyio.fail_after(5):
            await passed.wait()

    throttle.update(paused)
    stop.set()
    throttle.wake()
    with pytest.raises(Stopping), anyio.fail_after(5):
        await gate()


@pytest.mark.anyio
async def test_gate_logs_each_pause_and_resume_once() -> None:
    from structlog.testing import capture_logs

    throttle = Throttle(ThrottleConfig(max_lock_waiters=0), Stats(), anyio.Event())
    limits = throttle.limits
    with capture_logs() as logs:
        for n in (1, 2, 3, 2):  # four samples over the limit: one "paused"
            throttle.update(decide(Sample(lock_waiters=n), limits, throttle.verdict.signals))
        for _ in range(3):
            throttle.update(decide(Sample(lock_waiters=0), limits, throttle.verdict.signals))
    events = [(e["event"], e.get("signal")) for e in logs]
    assert events == [("paused", "lock_waiters"), ("resumed", "lock_waiters")]
    assert logs[0]["value"] == 1
    assert logs[0]["limit"] == 0


# --- config and `set` validation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rate": 0}, "--max-rate"),
        ({"max_lock_waiters": -1}, "--max-lock-waiters"),
        ({"sleep": -1}, "--sleep"),
        ({"replica_urls": ("postgresql://r/db",)}, "--replica-url needs --max-replication-lag"),
        ({"throttle_query": "  "}, "--throttle-query"),
        ({"max_runtime": 0}, "--max-runtime"),
    ],
)
def test_throttle_config_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ThrottleConfig(**kwargs)  # type: ignore[arg-type]


def test_throttle_config_repr_hides_replica_passwords() -> None:
    cfg = ThrottleConfig(max_replication_lag=5, replica_urls=("postgresql://u:s3cret@r/db",))
    assert "s3cret" not in repr(cfg)


def test_validate_settings() -> None:
    assert validate_settings({"batch_size": 7, "max_rate": None, "sleep": 0.5}) == {
        "batch_size": 7,
        "max_rate": None,
        "sleep": 0.5,
    }
    for bad, message in [
        ({"batch_size": 0}, "--batch-size"),
        ({"concurrency": 65}, "at most 64"),
        ({"batch_size": None}, "cannot be turned off"),
        ({"max_rate": "fast"}, "expected a number"),
        ({"max_lock_waiters": 1.5}, "whole number"),
        ({"throttle_query": "SELECT 1"}, "not a setting"),
        ({"max_rate": -3}, "--max-rate"),
    ]:
        with pytest.raises(UsageError, match=message):
            validate_settings(bad)


# --- `set` applied in the running process ---------------------------------------------------


@pytest.mark.anyio
async def test_knobs_apply_settings_where_they_act() -> None:
    from structlog.testing import capture_logs

    from bulkdedupe.control import Knobs

    stats = Stats()
    pace = Pace(
        stats=stats, batch_size=1000, min_batch_size=10, concurrency=4, concurrency_while_scanning=1
    )
    sizer, limiter = pace.sizer, pace.limiter
    throttle = Throttle(ThrottleConfig(), stats, anyio.Event(), pace)
    knobs = Knobs(pace=pace, throttle=throttle)
    assert limiter.total_tokens == 1  # while scanning
    with capture_logs() as logs:
        knobs.apply({"batch_size": 7, "concurrency": 6, "max_rate": 250.0, "sleep": 0.1})
        knobs.apply({"batch_size": 7, "concurrency": 6, "max_rate": 250.0, "sleep": 0.1})
    changed = sorted(e["setting"] for e in logs if e["event"] == "setting changed by operator")
    assert changed == ["batch_size", "concurrency", "max_rate", "sleep"]  # once each
    # fixed batches take the new ceiling at once; the floor follows it down
    assert (sizer.maximum, sizer.size, sizer.minimum) == (7, 7, 7)
    assert stats.batch_size == 7
    assert limiter.total_tokens == 1  # still scanning: concurrency-while-scanning rules
    pace.scan_finished()  # the pipeline tells the pace, not `set`
    assert limiter.total_tokens == 6
    # --max-rate acts in the pace: 250 rows renamed cost a second
    assert (throttle.limits.max_rate, pace.max_rate) == (250.0, 250.0)
    assert pace.delay() == 0.0
    stats.renamed = 250
    assert pace.delay() == pytest.approx(1.0, abs=0.05)
    assert throttle.limits.sleep == 0.1
    knobs.apply({"concurrency": 2, "max_rate": None})
    assert limiter.total_tokens == 2
    assert pace.max_rate is None
    assert pace.delay() == 0.0
    # a hand-written bad value is ignored (and logged), not obeyed
    with capture_logs() as logs:
        knobs.apply({"concurrency": 0})
    assert limiter.total_tokens == 2
    assert logs[0]["event"] == "control settings ignored"
    # adaptive sizing: the size is clamped under a lower ceiling, never raised to it
    adaptive = Pace(stats=stats, batch_size=1000, min_batch_size=10, target_batch_time=0.25)
    adaptive.sizer.size = 300
    knobs = Knobs(pace=adaptive, throttle=throttle)
    knobs.apply({"batch_size": 500})
    assert (adaptive.sizer.maximum, adaptive.sizer.size) == (500, 300)
    knobs.apply({"batch_size": 100})
    assert adaptive.sizer.size == 100


@pytest.mark.anyio
async def test_set_batch_size_and_concurrency_go_through_the_lock_budget() -> None:
    """Live `set` cannot oversubscribe the server's lock table: more workers lower the batch
    ceiling, a bigger batch size stays under it, fewer workers let it rise again."""
    from structlog.testing import capture_logs

    from bulkdedupe.batching import LockBudget
    from bulkdedupe.control import Knobs

    budget = LockBudget(6400)  # PostgreSQL's defaults: 64 locks x 100 connections
    stats = Stats()
    pace = Pace(stats=stats, budget=budget, batch_size=1000, min_batch_size=10, concurrency=1)
    sizer = pace.sizer
    knobs = Knobs(pace=pace, throttle=Throttle(ThrottleConfig(), stats, anyio.Event(), pace))
    assert sizer.maximum == 1000  # 1600 allowed for one worker
    with capture_logs() as logs:
        knobs.apply({"concurrency": 8})
    assert (sizer.maximum, sizer.size) == (200, 200)  # 6400 / 2 / 8 workers / 2 locks a row
    assert any(e["event"] == "batch ceiling lowered to fit the server's lock table" for e in logs)
    assert knobs.current()["batch_size"] == 1000  # what the operator asked for, still
    knobs.apply({"batch_size": 5000})
    assert sizer.maximum == 200
    knobs.apply({"concurrency": 2})
    assert sizer.maximum == 800
    knobs.apply({"concurrency": 1})
    assert sizer.maximum == 1600  # the operator's 5000, under one worker's share
