"""Throttling on health signals against real PostgreSQL, through the library API: max-rate,
a throttle query, lock waiters, active backends, the critical stop, max-runtime, and the signal
queries that cannot be exercised for real here (no replica, no archiver).

Each pausing test shows both halves: nothing is renamed while the signal is over its limit
(and `status` says why), and the run finishes with audit == data once it is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import pytest
from anyio.abc import TaskGroup

from bulkdedupe import ConnectConfig, RunConfig, RunSummary, ScanConfig, UsageError, run
from bulkdedupe.config import ThrottleConfig, parse_table
from bulkdedupe.control import status
from bulkdedupe.errors import BulkDedupeError
from bulkdedupe.health import HealthSampler
from bulkdedupe.results import RunStatus
from bulkdedupe.throttle import decide
from tests.factories import audit_rows, duplicate_groups, run_record, shuffled, state_schema_exists
from tests.faults_support import wait_until
from tests.helpers import create_payments, fetch_keys

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SMALL = ScanConfig(page_size=100, scanners=1)
DEADLINE = 30.0  # generous: the machine is shared; waits end as soon as the condition holds


def connect(dsn: str) -> ConnectConfig:
    return ConnectConfig(database_url=dsn, table=parse_table("payments"))


def apply_cfg(**kw: Any) -> RunConfig:
    kw.setdefault("batch_size", 20)
    kw.setdefault("concurrency", 2)
    kw.setdefault("scan", SMALL)
    return RunConfig(apply=True, **kw)


async def make_table(dsn: str, groups: int) -> dict[int, str | None]:
    layout: dict[str | None, int] = {f"k{i:04d}": 2 for i in range(groups)}
    layout |= {f"single{i}": 1 for i in range(20)}
    await create_payments(dsn, rows=shuffled(layout, seed=5))
    return await fetch_keys(dsn)


async def until(probe: Callable[[], Awaitable[object]], what: str) -> None:
    await wait_until(probe, what, deadline=DEADLINE, interval=0.2)


async def changes(dsn: str, run_id: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
            return 0
        return int(
            await conn.fetchval("SELECT count(*) FROM bulkdedupe.changes WHERE run_id = $1", run_id)
        )
    finally:
        await conn.close()


async def status_is(cfg: ConnectConfig, run_id: str, state: str) -> RunStatus | None:
    """The run's status when its state is `state` (and the runs row exists), else None."""
    try:
        st = await status(cfg, run_id)
    except BulkDedupeError:
        return None  # not registered yet
    return st if st.state == state else None


async def assert_audit_equals_data(dsn: str, before: dict[int, str | None], run_id: str) -> None:
    """Every row whose key changed has exactly one audit row (old -> new), no other audit row
    exists, and no duplicates are left."""
    after = await fetch_keys(dsn)
    changed = sorted((str(pk), before[pk], after[pk]) for pk in before if before[pk] != after[pk])
    assert changed, "nothing was renamed"
    assert await audit_rows(dsn, run_id) == changed
    assert await duplicate_groups(dsn) == {}


@dataclass
class Background:
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    summary: RunSummary | None = None
    error: BaseException | None = None

    async def result(self) -> RunSummary:
        with anyio.fail_after(DEADLINE):
            await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def start(tg: TaskGroup, cfg: ConnectConfig, run_cfg: RunConfig) -> Background:
    bg = Background()

    async def go() -> None:
        try:
            bg.summary = await run(cfg, run_cfg, stop=bg.stop)
        except BulkDedupeError as exc:
            bg.error = exc
        finally:
            bg.done.set()

    tg.start_soon(go)
    return bg


@asynccontextmanager
async def session(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        conn.terminate()


# --- max-rate ------------------------------------------------------------------------------


async def test_max_rate_bounds_the_rename_rate(dsn: str) -> None:
    before = await make_table(dsn, 600)
    cfg = connect(dsn)
    started = anyio.current_time()
    summary = await run(cfg, apply_cfg(run_id="rated", throttle=ThrottleConfig(max_rate=200.0)))
    took = anyio.current_time() - started
    assert summary.status == "completed"
    assert summary.rows_renamed == 600
    # The last batch starts only once all rows before it are paid for at 200/s; at most
    # concurrency x batch size = 40 rows are not: (600 - 40) / 200 = 2.8 s at the very least.
    assert took >= 2.5, f"600 rows at --max-rate 200 took only {took:.2f}s"
    await assert_audit_equals_data(dsn, before, "rated")


# --- --throttle-query ----------------------------------------------------------------------


async def test_throttle_query_pauses_until_it_returns_false(dsn: str) -> None:
    before = await make_table(dsn, 60)
    cfg = connect(dsn)
    # 1. SELECT true: paused from the start, nothing renamed; a stop while paused ends the run.
    always = apply_cfg(run_id="tq", throttle=ThrottleConfig(throttle_query="SELECT true"))
    async with anyio.create_task_group() as tg:
        bg = start(tg, cfg, always)
        await until(lambda: status_is(cfg, "tq", "paused"), "status paused")
        st = await status(cfg, "tq")
        assert st.reasons == ("--throttle-query returned true",)
        assert st.alive
        await anyio.sleep(1.5)
        assert await changes(dsn, "tq") == 0
        bg.stop.set()
        summary = await bg.result()
    assert summary.status == "interrupted"
    assert summary.rows_renamed == 0
    assert (await status(cfg, "tq")).state == "interrupted"

    # 2. Resumed with a query reading a flag: paused while it is true, goes on when false.
    async with session(dsn) as conn:
        await conn.execute("CREATE TABLE flag (paused boolean); INSERT INTO flag VALUES (true)")
        flagged = apply_cfg(
            run_id="tq", throttle=ThrottleConfig(throttle_query="SELECT paused FROM flag")
        )
        async with anyio.create_task_group() as tg:
            bg = start(tg, cfg, flagged)
            await until(lambda: status_is(cfg, "tq", "paused"), "status paused")
            assert await changes(dsn, "tq") == 0
            await conn.execute("UPDATE flag SET paused = false")
            summary = await bg.result()
    assert summary.status == "completed"
    assert summary.rows_renamed == 60
    await assert_audit_equals_data(dsn, before, "tq")


async def test_broken_throttle_query_is_refused_before_anything_changes(dsn: str) -> None:
    await make_table(dsn, 5)
    for query, message in [
        ("SELECT nope FROM missing", "UndefinedTableError"),
        ("SELECT 'yes'", "must return one boolean"),
        ("UPDATE payments SET amount = 0 RETURNING true", "ReadOnlySQLTransactionError"),
    ]:
        with pytest.raises(UsageError, match=message):
            await run(connect(dsn), apply_cfg(throttle=ThrottleConfig(throttle_query=query)))
    assert not await state_schema_exists(dsn)


async def test_throttle_query_failing_mid_run_fails_the_run(dsn: str) -> None:
    await make_table(dsn, 30)
    cfg = connect(dsn)
    async with session(dsn) as conn:
        await conn.execute("CREATE TABLE flag (paused boolean); INSERT INTO flag VALUES (true)")
        run_cfg = apply_cfg(
            run_id="tqf", throttle=ThrottleConfig(throttle_query="SELECT paused FROM flag")
        )
        async with anyio.create_task_group() as tg:
            bg = start(tg, cfg, run_cfg)
            await until(lambda: status_is(cfg, "tqf", "paused"), "status paused")
            await conn.execute("DROP TABLE flag")
            with pytest.raises(BulkDedupeError, match="--throttle-query failed"):
                await bg.result()
    assert (await run_record(dsn, "tqf"))["status"] == "failed"


# --- lock waiters and active backends --------------------------------------------------------


async def test_lock_waiters_pause_until_the_waiter_is_gone(dsn: str) -> None:
    before = await make_table(dsn, 40)
    cfg = connect(dsn)
    row = min(pk for pk, k in before.items() if k is not None and k.startswith("single"))
    async with session(dsn) as holder, session(dsn) as waiter:
        # A holds a row lock; B waits for it (a lock waiter on the table)
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", row)
        waiter_pid = await waiter.fetchval("SELECT pg_backend_pid()")

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter.execute, f"UPDATE payments SET amount = 1 WHERE id = {row}")

            async def b_waits() -> bool:
                return bool(
                    await holder.fetchval(
                        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                        waiter_pid,
                    )
                )

            await until(b_waits, "session B waiting on the row lock")
            bg = start(tg, cfg, apply_cfg(run_id="lw", throttle=ThrottleConfig(max_lock_waiters=0)))
            await until(lambda: status_is(cfg, "lw", "paused"), "status paused")
            st = await status(cfg, "lw")
            assert st.reasons == ("1 sessions wait on locks on the table > 0",)
            assert await changes(dsn, "lw") == 0
            await tx.commit()  # B gets its lock and finishes: no waiter left
            summary = await bg.result()
    assert summary.status == "completed"
    assert summary.rows_renamed == 40
    await assert_audit_equals_data(dsn, before, "lw")


@asynccontextmanager
async def busy_sessions(dsn: str, n: int) -> AsyncIterator[None]:
    """`n` sessions running pg_sleep (active backends) until the block ends."""
    conns = [await asyncpg.connect(dsn) for _ in range(n)]
    pids = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]

    async def sleep(c: asyncpg.Connection) -> None:
        with contextlib.suppress(asyncpg.QueryCanceledError):  # cancelled on the way out
            await c.execute("SELECT pg_sleep(120)")

    async with anyio.create_task_group() as tg:
        for c in conns:
            tg.start_soon(sleep, c)
        async with session(dsn) as admin:

            async def all_active() -> bool:
                n_active = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1) "
                    "AND state = 'active'",
                    pids,
                )
                return bool(n_active == n)

            await until(all_active, "sleeping sessions active")
            try:
                yield
            finally:
                await admin.execute("SELECT pg_cancel_backend(p) FROM unnest($1::int[]) p", pids)
                tg.cancel_scope.cancel()
    for c in conns:
        c.terminate()


async def test_active_backends_pause_until_they_are_done(dsn: str) -> None:
    before = await make_table(dsn, 40)
    cfg = connect(dsn)
    async with anyio.create_task_group() as tg:
        async with busy_sessions(dsn, 3):
            bg = start(
                tg, cfg, apply_cfg(run_id="ab", throttle=ThrottleConfig(max_active_backends=1))
            )
            await until(lambda: status_is(cfg, "ab", "paused"), "status paused")
            st = await status(cfg, "ab")
            assert len(st.reasons) == 1
            assert "active backends > 1" in st.reasons[0]
            assert await changes(dsn, "ab") == 0
        summary = await bg.result()
    assert summary.status == "completed"
    assert summary.rows_renamed == 40
    await assert_audit_equals_data(dsn, before, "ab")


async def test_critical_active_backends_stop_the_run_resumably(dsn: str) -> None:
    before = await make_table(dsn, 40)
    cfg = connect(dsn)
    async with busy_sessions(dsn, 2):
        summary = await run(
            cfg, apply_cfg(run_id="crit", throttle=ThrottleConfig(critical_active_backends=1))
        )
        assert summary.status == "interrupted"
        st = await status(cfg, "crit")
        assert st.state == "interrupted"
        assert not st.alive
        assert st.stop_reason == "2 active backends > --critical-active-backends 1"
    resumed = await run(cfg, apply_cfg(run_id="crit"))
    assert resumed.status == "completed"
    await assert_audit_equals_data(dsn, before, "crit")


# --- max-runtime -----------------------------------------------------------------------------


async def test_max_runtime_stops_cleanly_and_a_resume_finishes(dsn: str) -> None:
    before = await make_table(dsn, 200)
    cfg = connect(dsn)
    slow = apply_cfg(
        run_id="rt",
        batch_size=5,
        target_batch_time=None,
        concurrency=1,
        throttle=ThrottleConfig(sleep=0.2, max_runtime=1.0),
    )
    summary = await run(cfg, slow)
    # 200 renames in batches of 5 with 0.2 s between them take at least 8 s
    assert summary.status == "interrupted"
    assert 0 < summary.rows_renamed < 200
    st = await status(cfg, "rt")
    assert st.state == "interrupted"
    assert st.stop_reason == "--max-runtime 1s reached"
    assert st.batch_ceiling == 5
    resumed = await run(cfg, apply_cfg(run_id="rt"))
    assert resumed.status == "completed"
    await assert_audit_equals_data(dsn, before, "rt")


# --- signals that need a replica or an archiver ----------------------------------------------


async def test_signal_queries_run_on_a_lone_primary(dsn: str) -> None:
    await make_table(dsn, 3)
    cfg = connect(dsn)
    limits = ThrottleConfig(
        max_replication_lag=5.0,
        max_wal_rate=100.0,
        pause_during_autovacuum=True,
        max_lock_waiters=0,
        max_active_backends=1000,
    )
    async with session(dsn) as conn:
        oid = await conn.fetchval("SELECT 'payments'::regclass::oid")
        sampler = HealthSampler(cfg, oid, limits)
        await sampler.check(conn, limits)
        first = await sampler.sample(conn, limits, 0.0)
        await conn.execute("CREATE TABLE wal_maker AS SELECT g FROM generate_series(1, 1000) g")
        await anyio.sleep(0.1)
        second = await sampler.sample(conn, limits, 1.0)
        assert await conn.fetchval("SELECT current_setting('archive_mode')") == "off"
    assert first.replica_lags == {}
    assert second.replica_lags == {}
    assert first.wal_bytes_per_s is None  # one position is no rate yet
    assert second.wal_bytes_per_s is not None
    assert second.wal_bytes_per_s > 0
    assert second.archive_backlog is None  # archiving off
    assert second.autovacuum is False
    assert second.lock_waiters == 0
    assert isinstance(second.active_backends, int)
    assert decide(second, limits).ok


async def test_replica_url_that_is_not_a_standby_is_refused(dsn: str) -> None:
    await make_table(dsn, 3)
    limits = ThrottleConfig(max_replication_lag=5.0, replica_urls=(dsn,))
    with pytest.raises(UsageError, match="is not a standby"):
        await run(connect(dsn), apply_cfg(throttle=limits))
    assert not await state_schema_exists(dsn)
