"""Faults during `run --apply`, each against real PostgreSQL (issue 5, "Fault tolerance"): a
worker's backend terminated mid-batch, the server restarted mid-run, an application holding row
locks for a long time, a real deadlock with an application, scan pages hitting
statement_timeout, and the tool killed (SIGKILL / SIGTERM) over and over.

After each, the contract is checked on the data itself: every row whose key changed has exactly
one audit row with the right old and new value and vice versa, and a final run or resume leaves
no duplicates. (Concurrent writers, one kill -9 + resume and SIGINT are in tests/test_live.py.)
"""

from __future__ import annotations

import json
import random
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
import structlog

from benchmarks.generate import GenSpec, generate
from bulkdedupe import sql
from bulkdedupe.errors import BulkDedupeError
from bulkdedupe.scanner import MIN_PAGE_SIZE, KeyRange, Page, scan_range
from tests.factories import shuffled
from tests.faults_support import (
    EXIT_DUPLICATES,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    OwnServer,
    blocked_by,
    catches,
    changes_count,
    check_audit,
    cli,
    duplicate_groups,
    output,
    own_server,
    run_row,
    slow_down_renames,
    spawn,
    speed_up_renames,
    tool_backends,
    wait_until,
    wait_until_tool_gone,
)
from tests.helpers import create_payments, fetch_keys

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """The test's own observer session."""
    c = await asyncpg.connect(dsn)
    try:
        yield c
    finally:
        await c.close()


def pairs_and(extra: dict[str, int], pairs: int = 60, singles: int = 40) -> dict[str | None, int]:
    layout: dict[str | None, int] = {f"pair-{i:03d}": 2 for i in range(pairs)}
    layout |= {f"single-{i:03d}": 1 for i in range(singles)}
    layout |= extra
    return layout


def to_rename(layout: dict[str | None, int]) -> int:
    return sum(n - 1 for k, n in layout.items() if k is not None)


def losers(before: dict[int, str | None], key: str) -> list[int]:
    """The rows of `key` that a run renames (default keep order: the lowest id survives)."""
    return sorted(pk for pk, k in before.items() if k == key)[1:]


# --- 1. a worker's backend terminated mid-batch ---------------------------------------------


async def test_worker_backend_terminated_mid_batch_is_retried_on_a_new_connection(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    layout = pairs_and({"hostage": 5})
    await create_payments(dsn, rows=shuffled(layout))
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    held = losers(before, "hostage")[-1]
    run_id = "terminated"

    # An application session holds one row of a group, so the batch renaming that group
    # waits (the tool's lock_timeout is long here): the moment to terminate its backend.
    app = await asyncpg.connect(dsn)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", held)
        args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20"]
        args += ["--concurrency", "2", "--lock-timeout", "60s", "--format", "json", "-d", dsn]
        async with spawn(tmp_path, "run", *args) as proc:
            terminated: set[int] = set()
            for _ in range(2):  # the batch, then its retry (on a new connection)

                async def waiting() -> int | None:
                    return await blocked_by(conn, app.get_server_pid(), exclude=terminated)

                pid = await wait_until(waiting, "a batch waiting on the held row", proc=proc)
                assert await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
                terminated.add(pid)
                # The terminated batch rolled back as a whole: nothing of it is visible.
                await check_audit(conn, before)
            await tx.rollback()
            with anyio.fail_after(120):
                await proc.wait()
    finally:
        await app.close()

    out, err = output(tmp_path, "run")
    assert proc.returncode == EXIT_OK, err
    summary = json.loads(out)
    assert summary["status"] == "completed"
    assert summary["retries"] >= 2
    assert summary["rows_skipped"] == 0
    assert summary["rows_renamed"] == total
    assert "Traceback" not in err
    # Nothing lost, nothing applied twice.
    assert await check_audit(conn, before) == total
    assert await changes_count(conn, run_id) == total
    assert before[held] != (await fetch_keys(dsn))[held]
    assert await duplicate_groups(conn) == 0


async def test_batch_whose_connection_keeps_being_cut_stops_the_run_resumably(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """Past its retries, a batch that keeps losing its connection ends the run (exit 3, how to
    resume) instead of splitting and skipping group after group as if the keys were at fault."""
    layout = pairs_and({"hostage": 3})
    await create_payments(dsn, rows=shuffled(layout))
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    run_id = "cut"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "200", "--concurrency", "1"]
    args += ["--lock-timeout", "60s", "--max-retries", "1", "--format", "json", "-d", dsn]
    app = await asyncpg.connect(dsn)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute(
            "SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", losers(before, "hostage")[-1]
        )
        async with spawn(tmp_path, "run", *args) as proc:
            terminated: set[int] = set()
            while proc.returncode is None:

                async def waiting() -> int | None:
                    if proc.returncode is not None:
                        return -1
                    return await blocked_by(conn, app.get_server_pid(), exclude=terminated)

                pid = await wait_until(waiting, "a batch waiting on the held row")
                if pid > 0:
                    await conn.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
                    terminated.add(pid)
                assert len(terminated) <= 2, "the tool kept retrying"
        await tx.rollback()
    finally:
        await app.close()
    out, err = output(tmp_path, "run")
    assert proc.returncode == EXIT_ENVIRONMENT, err
    assert len(terminated) == 2  # the batch and its one retry
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("bulkdedupe: error:")]
    assert len(errors) == 1, err
    assert "lost the connection" in errors[0]
    assert f"--run-id {run_id}" in errors[0]
    assert "groups skipped" not in err
    row = await run_row(conn, run_id)
    assert row is not None
    assert row["status"] == "failed"
    assert await check_audit(conn, before) == 0

    code, out, err = await cli(*args)
    assert code == EXIT_OK, err
    assert json.loads(out)["rows_renamed"] == total
    assert await check_audit(conn, before) == total
    assert await duplicate_groups(conn) == 0


# --- 3. an application holds a group's rows for a long time ---------------------------------

# The scenario holds the locks for 30 s; 8 s against a 500 ms lock_timeout is the same
# situation (many lock timeouts in a row) in a fraction of the time.
HOLD = 8.0
TOOL_LOCK_TIMEOUT = 0.5
# The application's own patience: the tool's lock_timeout plus a margin. The tool may hold row
# locks for at most its lock_timeout (plus the instants its statements take), never longer.
APP_LOCK_TIMEOUT = TOOL_LOCK_TIMEOUT + 1.0


async def batch_mates(conn: asyncpg.Connection, key: str, n: int) -> list[int]:
    """Ids of the rows the tool renames in the `n` duplicated keys just before `key` in key
    order: groups that share a batch with it, renamed (and locked) before it in that batch."""
    keys = [
        r["k"]
        for r in await conn.fetch(
            "SELECT transaction_id AS k FROM payments GROUP BY 1 HAVING count(*) > 1 ORDER BY 1"
        )
    ]
    i = keys.index(key)
    near = keys[max(0, i - n) : i]
    return [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM payments p WHERE transaction_id = ANY($1::text[]) AND id > "
            "(SELECT min(id) FROM payments s WHERE s.transaction_id = p.transaction_id)",
            near,
        )
    ]


@pytest.mark.slow
async def test_app_holding_a_groups_rows_never_waits_behind_the_tool(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    layout = pairs_and({"pair-074h": 3}, pairs=150)
    await create_payments(dsn, rows=shuffled(layout))
    # Enough other rows that renames go by the key index in key order, as on a real table: a
    # batch renaming the held group locks the rows of the groups before it first, then waits.
    await conn.execute(
        "INSERT INTO payments (transaction_id) SELECT 'filler-' || g "
        "FROM generate_series(1, 20000) g; ANALYZE payments"
    )
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    held = sorted(pk for pk, k in before.items() if k == "pair-074h")
    hot = await batch_mates(conn, "pair-074h", 6)
    batch = 10
    run_id = "held"

    holder = await asyncpg.connect(dsn)
    writer = await asyncpg.connect(dsn)
    bumps: dict[int, int] = {}
    waits: list[float] = []
    try:
        await writer.execute(f"SET lock_timeout = '{int(APP_LOCK_TIMEOUT * 1000)}ms'")
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "UPDATE payments SET status = 'held by app' WHERE transaction_id = 'pair-074h'"
        )
        args = ["run", "--apply", "--run-id", run_id, "--batch-size", str(batch)]
        # key order: the batch mates above are the held group's (heap order's chunk of a held
        # row is the same one transaction, its mates heap neighbours, and it is left to this
        # key-order batch after one retry: test_heap_chunk_meeting_a_held_row_...)
        args += ["--target-batch-time", "off", "--concurrency", "2", "--order", "key"]
        args += ["--lock-timeout", f"{int(TOOL_LOCK_TIMEOUT * 1000)}ms", "--max-retries", "20"]
        args += ["--format", "json", "-d", dsn]
        done = anyio.Event()

        async def write() -> None:
            # The application keeps updating rows of the groups batched with the held one
            # (and others), one short transaction each, with its own lock_timeout.
            rng = random.Random(5)
            others = [pk for pk in before if pk not in held]
            while not done.is_set():
                pk = rng.choice(hot) if rng.random() < 0.8 else rng.choice(others)
                started = anyio.current_time()
                await writer.execute("UPDATE payments SET amount = amount + 1 WHERE id = $1", pk)
                waits.append(anyio.current_time() - started)
                bumps[pk] = bumps.get(pk, 0) + 1
                await anyio.sleep(0.005)

        async with spawn(tmp_path, "run", *args) as proc, anyio.create_task_group() as tg:
            tg.start_soon(write)
            started = anyio.current_time()

            async def rest_done() -> bool:
                # every group outside the held group's batch is renamed while it is held
                return await changes_count(conn, run_id) >= total - batch

            await wait_until(rest_done, "the rest of the run to proceed", proc=proc)
            await anyio.sleep(max(0.0, HOLD - (anyio.current_time() - started)))
            assert proc.returncode is None, "the tool gave up on the held group"
            assert await changes_count(conn, run_id) < total
            assert all(before[pk] == k for pk, k in (await fetch_keys(dsn)).items() if pk in held)
            await tx.commit()
            with anyio.fail_after(120):
                await proc.wait()
            done.set()
    finally:
        await holder.close()
        await writer.close()

    out, err = output(tmp_path, "run")
    assert proc.returncode == EXIT_OK, err
    summary = json.loads(out)
    assert summary["status"] == "completed"
    assert summary["retries"] >= 2  # lock timeouts on the held group
    assert summary["rows_skipped"] == 0
    assert summary["rows_renamed"] == total
    # The application worked all along, did meet the tool's row locks (the scenario
    # happened), and never timed out (it would have raised): it never waited longer than the
    # tool's lock_timeout plus the margin.
    assert len(waits) >= 50
    assert TOOL_LOCK_TIMEOUT / 4 < max(waits) < APP_LOCK_TIMEOUT
    # The held group was renamed once the application committed; no write was lost.
    after = await fetch_keys(dsn)
    assert [after[pk] == before[pk] for pk in held] == [True, False, False]
    rows = {r["id"]: r for r in await conn.fetch("SELECT id, amount, status FROM payments")}
    assert all(rows[pk]["status"] == "held by app" for pk in held)
    assert all(rows[pk]["amount"] == 10 + n for pk, n in bumps.items())
    assert await check_audit(conn, before) == total
    assert await duplicate_groups(conn) == 0


async def test_app_holding_past_every_retry_gets_the_group_skipped_then_a_rerun_completes(
    dsn: str, conn: asyncpg.Connection
) -> None:
    layout = pairs_and({"pair-020h": 3}, pairs=40)
    await create_payments(dsn, rows=shuffled(layout))
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM payments WHERE transaction_id = 'pair-020h' FOR UPDATE")
        args = ["run", "--apply", "--batch-size", "10", "--target-batch-time", "off"]
        args += ["--lock-timeout", "200ms", "--max-retries", "1", "--format", "json", "-d", dsn]
        code, out, err = await cli(*args)
        assert code == EXIT_DUPLICATES, err  # rows left duplicated because of errors
        summary = json.loads(out)
        assert summary["status"] == "incomplete"  # not "completed": a group is left
        assert summary["skipped"] == {"lock_timeout": 2}  # reported, with the reason
        assert summary["skipped_groups"] == 1
        assert summary["skipped_groups_by_reason"] == {"lock_timeout": 1}
        assert f"--run-id {summary['run_id']}" in summary["retry_command"]
        assert summary["rows_renamed"] == total - 2  # everything else is done
        assert await check_audit(conn, before) == total - 2
        skipped = await conn.fetch("SELECT group_key, reason, attempts FROM bulkdedupe.skipped")
        assert [tuple(r) for r in skipped] == [("pair-020h", "lock_timeout", 1)]
        row = await run_row(conn, summary["run_id"])
        assert row is not None
        assert row["status"] == "incomplete"
        await tx.commit()
    finally:
        await holder.close()

    # The resume retries exactly the skipped group: the checkpoint had moved past it.
    code, out, err = await cli(*args, "--run-id", summary["run_id"])
    assert code == EXIT_OK, err
    resumed = json.loads(out)
    assert resumed["status"] == "completed"
    assert resumed["rows_renamed"] == 2
    assert resumed["skipped_groups"] == 0
    assert await check_audit(conn, before) == total
    assert await duplicate_groups(conn) == 0
    assert await conn.fetchval("SELECT count(*) FROM bulkdedupe.skipped") == 0


# --- 4. a real deadlock with an application -------------------------------------------------


@pytest.mark.slow
async def test_deadlock_with_an_application_makes_the_tools_batch_retry(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    layout = pairs_and({"knot": 6})
    await create_payments(dsn, rows=shuffled(layout))
    await conn.execute(  # renames go by the key index, in key then id order (see above)
        "INSERT INTO payments (transaction_id) SELECT 'filler-' || g "
        "FROM generate_series(1, 20000) g; ANALYZE payments"
    )
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    knot = losers(before, "knot")  # the tool locks these in this order
    # PostgreSQL aborts the waiter whose deadlock check finds the cycle; a waiting session
    # checks deadlock_timeout after it starts waiting. The tool's sessions check after 2 s
    # (the default is 1 s; 2 s leaves the test room to close the cycle on a busy machine), the
    # application's only after 30 s: the tool's batch is the victim and the application's
    # transaction commits. The tool's lock_timeout is longer than both, so only the deadlock
    # detector can resolve it.
    await conn.execute(
        f"ALTER DATABASE {await conn.fetchval('SELECT current_database()')} "
        "SET deadlock_timeout = '2s'"
    )
    deadlocks_before = await conn.fetchval(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    run_id = "deadlock"
    app = await asyncpg.connect(dsn)
    try:
        await app.execute("SET deadlock_timeout = '30s'")
        tx = app.transaction()
        await tx.start()
        # The application locks the group's last row first, then wants its first one: the
        # opposite of the tool's order.
        await app.execute("UPDATE payments SET status = 'app' WHERE id = $1", knot[-1])
        args = ["--log-level", "debug", "run", "--apply", "--run-id", run_id]
        args += ["--batch-size", "50", "--concurrency", "1", "--lock-timeout", "60s"]
        args += ["--format", "json", "-d", dsn]
        async with spawn(tmp_path, "run", *args) as proc:

            async def tool_waits() -> int | None:
                return await blocked_by(conn, app.get_server_pid(), exclude=set())

            tool_pid = await wait_until(tool_waits, "the tool to wait for the app", proc=proc)
            # The tool holds the group's other rows and waits for the last: close the cycle.
            with anyio.fail_after(20):
                await app.execute("UPDATE payments SET status = 'app' WHERE id = $1", knot[0])
            # The tool's transaction was the one aborted: the application got its row.
            assert tool_pid in {b["pid"] for b in await tool_backends(conn)}
            await tx.commit()
            with anyio.fail_after(120):
                await proc.wait()
    finally:
        await app.close()

    out, err = output(tmp_path, "run")
    assert proc.returncode == EXIT_OK, err
    summary = json.loads(out)
    assert summary["status"] == "completed"
    assert summary["retries"] >= 1
    assert summary["rows_skipped"] == 0
    retried_on = [
        json.loads(line).get("error")
        for line in err.splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "batch retry"
    ]
    assert "DeadlockDetectedError" in retried_on, err[-3000:]

    async def detected() -> bool:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        n = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        return bool(n > deadlocks_before)

    await wait_until(detected, "PostgreSQL's deadlock counter to move", deadline=30)
    status = await conn.fetch(
        "SELECT status FROM payments WHERE id = ANY($1::bigint[])", [knot[0], knot[-1]]
    )
    assert [r["status"] for r in status] == ["app", "app"]  # the application's writes stand
    assert await check_audit(conn, before) == total
    assert await changes_count(conn, run_id) == total
    assert await duplicate_groups(conn) == 0


# --- 5. statement_timeout on scan pages -----------------------------------------------------


@pytest.fixture
async def heavy_view(dsn: str, conn: asyncpg.Connection) -> sql.TargetSql:
    """Scan queries over a view of payments in which reading more than `faults.max_rows`
    index entries in one statement costs 5 s (a real pg_sleep, cut short by the session's
    real statement_timeout): a page's cost now depends on its size, exactly and
    deterministically, as on a table too big to read a full page within the timeout."""
    layout: dict[str | None, int] = {f"k{i:04d}": 1 + i % 3 for i in range(500)} | {None: 20}
    await create_payments(dsn, rows=shuffled(layout))
    await conn.execute(
        """
        CREATE FUNCTION heavy_row() RETURNS boolean LANGUAGE plpgsql AS $$
        DECLARE n int := coalesce(nullif(current_setting('faults.rows', true), ''), '0')::int;
        BEGIN
            PERFORM set_config('faults.rows', (n + 1)::text, true);  -- this transaction only
            IF n + 1 = current_setting('faults.max_rows')::int + 1 THEN
                PERFORM pg_sleep(5);
            END IF;
            RETURN true;
        END $$;
        CREATE VIEW heavy_payments AS SELECT * FROM payments WHERE heavy_row();
        """
    )
    return sql.TargetSql(
        table="public.heavy_payments",
        key="transaction_id",
        pk="id",
        key_type="text",
        pk_type="bigint",
        keep=(),
        state=sql.StateSql("bulkdedupe"),
    )


async def scan_all(
    dsn: str, q: sql.TargetSql, *, max_rows: int, page_size: int
) -> AsyncIterator[Page]:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=2,
        server_settings={
            "statement_timeout": "1000",
            "faults.max_rows": str(max_rows),
            # As on a big table, every page goes by the key index; a table this small would
            # otherwise be read whole and sorted, and every page be heavy.
            "enable_seqscan": "off",
            "enable_bitmapscan": "off",
            "enable_sort": "off",
        },
    )
    assert pool is not None
    try:
        async for page in scan_range(pool, q, KeyRange(0, None, None), page_size=page_size):
            yield page
    finally:
        await pool.close()


async def test_scan_page_hitting_statement_timeout_is_split_and_nothing_is_skipped(
    dsn: str, conn: asyncpg.Connection, heavy_view: sql.TargetSql
) -> None:
    expected = {
        r["k"]: r["n"]
        for r in await conn.fetch(
            "SELECT transaction_id AS k, count(*) AS n FROM payments "
            "WHERE transaction_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1"
        )
    }
    non_null = await conn.fetchval("SELECT count(*) FROM payments WHERE transaction_id IS NOT NULL")
    # 1000 and 500 entries cost 5 s > the 1 s timeout; 250 (or a page with its last group
    # completed) stay under the 300 that make a page heavy.
    with structlog.testing.capture_logs() as logs:
        pages = [p async for p in scan_all(dsn, heavy_view, max_rows=300, page_size=1000)]
    splits = [e["page_size"] for e in logs if e["event"] == "scan page timed out; splitting"]
    assert splits == [500, 250]
    found: dict[str, int] = {}
    for page in pages:
        for g in page.groups:
            assert g.key not in found, f"group {g.key} reported twice"
            found[g.key] = g.count
    assert found == expected  # every group found, with its full size
    assert sum(p.rows_read for p in pages) == non_null  # every entry read once
    assert len(pages) >= 4


async def test_scan_page_that_cannot_be_split_further_fails_loudly(
    dsn: str, heavy_view: sql.TargetSql
) -> None:
    # Even the smallest page is heavy: the scan must stop with an error, not skip the page.
    pages: list[Page] = []

    async def scan() -> None:
        async for page in scan_all(dsn, heavy_view, max_rows=MIN_PAGE_SIZE // 2, page_size=400):
            pages.append(page)

    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(BulkDedupeError, match="statement_timeout"),
    ):
        await scan()
    assert pages == []
    splits = [e["page_size"] for e in logs if e["event"] == "scan page timed out; splitting"]
    assert splits == [200, MIN_PAGE_SIZE]  # split as far as it goes first


async def test_run_whose_scan_cannot_get_through_exits_3_and_resumes(
    dsn: str, conn: asyncpg.Connection
) -> None:
    """End to end: while an ACCESS EXCLUSIVE lock blocks every read of the table, each scan
    page hits --statement-timeout, is split down to the smallest size, then the run stops with
    one clear line (exit 3) instead of going on without those keys; once the lock is gone, a
    resume finishes."""
    layout = pairs_and({"big": 30})
    await create_payments(dsn, rows=shuffled(layout))
    before = await fetch_keys(dsn)
    total = to_rename(layout)
    run_id = "blocked-scan"
    args = ["run", "--apply", "--run-id", run_id, "--format", "json", "-d", dsn]
    locker = await asyncpg.connect(dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
            code, out, err = await cli(*args, "--statement-timeout", "200ms")
    finally:
        await locker.close()
    assert code == EXIT_ENVIRONMENT, err
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("bulkdedupe: error:")]
    assert len(errors) == 1, err
    assert "statement_timeout" in errors[0]
    assert "Traceback" not in err
    sizes = [
        json.loads(line)["page_size"]
        for line in err.splitlines()
        if line.startswith("{") and "splitting" in line
    ]
    assert min(sizes) == MIN_PAGE_SIZE
    row = await run_row(conn, run_id)
    assert row is not None
    assert row["status"] == "failed"
    assert await check_audit(conn, before) == 0

    code, out, err = await cli(*args)
    assert code == EXIT_OK, err
    assert json.loads(out)["rows_renamed"] == total
    assert await check_audit(conn, before) == total
    assert await duplicate_groups(conn) == 0


# --- 2. the server restarted mid-run --------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[OwnServer]:
    """A server of this module's own: these tests stop it, never the session's server."""
    with own_server() as s:
        yield s


@pytest.fixture
async def own_dsn(server: OwnServer) -> str:
    if not server.running():
        await anyio.to_thread.run_sync(server.start)
    return await server.create_database(f"faults_{random.getrandbits(48):012x}")


@pytest.mark.slow
async def test_server_restart_mid_run_exits_3_with_how_to_resume_then_resume_is_exact(
    server: OwnServer, own_dsn: str, tmp_path: Path
) -> None:
    dsn = own_dsn
    await generate(
        dsn,
        GenSpec(rows=10_000, dup_fraction=0.1, big_groups=1, big_group_size=50, payload_width=0),
    )
    before = await fetch_keys(dsn)
    conn = await asyncpg.connect(dsn)
    await slow_down_renames(conn, 0.003)
    total = await conn.fetchval(
        "SELECT count(*) - count(DISTINCT transaction_id) FROM payments "
        "WHERE transaction_id IS NOT NULL"
    )
    run_id = "restarted"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20", "--concurrency", "2"]
    args += ["--format", "json", "-d", dsn]
    async with spawn(tmp_path, "first", *args) as proc:

        async def under_way() -> bool:
            return await changes_count(conn, run_id) >= total // 4

        await wait_until(under_way, "a quarter of the renames", proc=proc)
        await conn.close()
        # Every session is cut (fast shutdown), no server for 2 s, then up again.
        await anyio.to_thread.run_sync(server.restart, 2.0)
        with anyio.fail_after(120):
            await proc.wait()
    out, err = output(tmp_path, "first")
    assert "Traceback" not in err
    assert proc.returncode == EXIT_ENVIRONMENT, err
    errors = [line for line in err.splitlines() if line.startswith("bulkdedupe: error:")]
    assert len(errors) == 1, err
    assert f"--run-id {run_id}" in errors[0]

    conn = await asyncpg.connect(dsn)
    try:
        done = await check_audit(conn, before)  # every committed batch whole
        assert 0 < done < total
        row = await run_row(conn, run_id)
        assert row is not None
        assert row["status"] in ("running", "failed", "interrupted")  # resumable

        await speed_up_renames(conn)
        code, out, err = await cli(*args)
        assert code == EXIT_OK, err
        summary = json.loads(out)
        assert summary["status"] == "completed"
        assert summary["rows_skipped"] == 0
        assert await check_audit(conn, before) == total
        assert await changes_count(conn, run_id) == total
        assert await duplicate_groups(conn) == 0
    finally:
        await conn.close()


@pytest.mark.slow
async def test_dry_run_whose_server_disappears_exits_3(
    server: OwnServer, own_dsn: str, tmp_path: Path
) -> None:
    dsn = own_dsn
    await create_payments(dsn, rows=shuffled(pairs_and({})))
    locker = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    # The dry run's scan waits behind this lock: a moment when it is surely mid-run.
    await locker.execute("BEGIN; LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
    try:
        async with spawn(tmp_path, "dry", "run", "--dry-run", "-d", dsn) as proc:

            async def scanning() -> int | None:
                return await blocked_by(watcher, locker.get_server_pid(), exclude=set())

            await wait_until(scanning, "the dry run to scan", proc=proc)
            await anyio.to_thread.run_sync(server.stop)  # and it does not come back
            with anyio.fail_after(120):
                await proc.wait()
    finally:
        locker.terminate()
        watcher.terminate()
    _, err = output(tmp_path, "dry")
    assert proc.returncode == EXIT_ENVIRONMENT, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("bulkdedupe: error:")]
    assert len(errors) == 1, err


# --- 6. killed over and over ----------------------------------------------------------------

KILLS = 10


@pytest.mark.slow
async def test_killed_at_random_moments_over_and_over_then_resume_finishes(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    """SIGKILL at any moment (even before the run is registered) and SIGTERM at any moment
    once the tool listens for it, alternately. SIGTERM before the handler is installed (the
    first instants of the process) is the default action, i.e. the same as a SIGKILL."""
    stats = await generate(
        dsn,
        GenSpec(rows=40_000, dup_fraction=0.15, big_groups=2, big_group_size=300, payload_width=0),
    )
    total = stats.rows_to_rename
    before = await fetch_keys(dsn)
    # At most 250 renames/s with two workers: the 6000 renames outlast every kill.
    await slow_down_renames(conn, 0.008)
    run_id = "pummelled"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20", "--concurrency", "2"]
    args += ["--format", "json", "-d", dsn]
    rng = random.Random(20)
    done = 0
    for n in range(KILLS):
        sig = signal.SIGKILL if n % 2 == 0 else signal.SIGTERM
        name = f"kill{n}"
        async with spawn(tmp_path, name, *args) as proc:
            if sig == signal.SIGTERM:

                async def listening() -> bool:
                    return catches(proc.pid, signal.SIGTERM)

                await wait_until(listening, "the tool to handle SIGTERM", proc=proc, interval=0.005)
                await anyio.sleep(rng.uniform(0.0, 1.5))
            else:
                await anyio.sleep(rng.uniform(0.0, 2.5))
            assert proc.returncode is None, "the run finished before it was killed"
            proc.send_signal(sig)
            with anyio.fail_after(60):
                await proc.wait()
        out, err = output(tmp_path, name)
        await wait_until_tool_gone(conn)
        row = await run_row(conn, run_id)
        if sig == signal.SIGTERM:
            assert proc.returncode == EXIT_INTERRUPTED, err
            assert "Traceback" not in err
            assert json.loads(out)["status"] == "interrupted"
            assert row is not None
            assert row["status"] == "interrupted"
        else:
            assert proc.returncode == -signal.SIGKILL
            if '"run started"' in err:  # registered (or resumed) before it died
                assert row is not None
                assert row["status"] == "running"
        # After every kill: each committed batch whole, each change audited exactly once.
        changed = await check_audit(conn, before)
        assert changed >= done
        assert changed == await changes_count(conn, run_id)
        done = changed
    assert 0 < done < total

    await speed_up_renames(conn)
    code, out, err = await cli(*args)
    assert code == EXIT_OK, err
    summary = json.loads(out)
    assert summary["run_id"] == run_id
    assert summary["status"] == "completed"
    assert summary["rows_skipped"] == 0
    row = await run_row(conn, run_id)
    assert row is not None
    assert row["status"] == "completed"
    assert await check_audit(conn, before) == total
    assert await changes_count(conn, run_id) == total
    assert await duplicate_groups(conn) == 0
    code, out, err = await cli("verify", "-d", dsn)
    assert code == EXIT_OK, out + err
