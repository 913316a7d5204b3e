"""Live traffic and crashes: writers working on the table during `run --apply`, `kill -9` at
several moments then resume, SIGINT/SIGTERM, and a second process on the same run.

After each, the contract is checked on the real data: the audit trail equals the changes (every
row whose key differs from what it had has exactly one audit row with the right old and new
value, and no audit row describes a change that did not happen), no writer's write is lost,
and a finished run leaves no duplicates.
"""

from __future__ import annotations

import json
import random
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import anyio
import asyncpg
import pytest
from anyio.abc import Process

from benchmarks.generate import GenSpec, generate
from tests import faults_support
from tests.faults_support import cli, cli_args, output, slow_down_renames, spawn
from tests.helpers import REPO_ROOT, fetch_keys

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

EXIT_INTERRUPTED = 130


# --- helpers ---------------------------------------------------------------------------------


async def changes_count(conn: asyncpg.Connection, run_id: str | None = None) -> int:
    if not await conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
        return 0
    if run_id is None:
        return int(await conn.fetchval("SELECT count(*) FROM bulkdedupe.changes"))
    return int(
        await conn.fetchval("SELECT count(*) FROM bulkdedupe.changes WHERE run_id = $1", run_id)
    )


async def wait_for_changes(conn: asyncpg.Connection, proc: Process, at_least: int) -> int:
    """Poll (bounded) until the run has committed `at_least` renames; fail if it ended first."""
    with anyio.fail_after(120):
        while True:
            n = await changes_count(conn)
            if n >= at_least:
                break
            assert proc.returncode is None, "the run ended before the moment to interrupt it"
            await anyio.sleep(0.02)
    assert proc.returncode is None, "the run ended before the moment to interrupt it"
    return n


async def wait_until_tool_gone(conn: asyncpg.Connection) -> None:
    """After a kill the server notices the dead client and rolls its transactions back."""
    with anyio.fail_after(60):
        while True:
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'bulkdedupe'"
            )
            if not left:
                return
            await anyio.sleep(0.05)


async def run_row(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM bulkdedupe.runs WHERE run_id = $1", run_id)
    assert row is not None
    return row


async def check_audit(conn: asyncpg.Connection, baseline: dict[int, str | None]) -> int:
    """Audit == data; the writers of these tests delete rows, so vanished rows are fine."""
    return await faults_support.check_audit(conn, baseline, deletions=True)


async def duplicate_groups(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM (SELECT transaction_id FROM payments "
            "WHERE transaction_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) d"
        )
    )


async def slow_table(dsn: str) -> tuple[asyncpg.Connection, dict[int, str | None], int]:
    """10k rows, 1000 to rename in groups of 2..50, renames slowed down; returns an open
    connection, the keys before any run, and the number of rows to rename."""
    stats = await generate(
        dsn,
        GenSpec(rows=10_000, dup_fraction=0.1, big_groups=1, big_group_size=50, payload_width=0),
    )
    conn = await asyncpg.connect(dsn)
    await slow_down_renames(conn, 0.002)
    return conn, await fetch_keys(dsn), stats.rows_to_rename


# --- concurrent writers --------------------------------------------------------------------


@dataclass
class Writer:
    """One writer's own rows (id % WRITERS) and what it did to them."""

    index: int
    last: dict[int, tuple[Decimal, str]] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    inserted: dict[int, str] = field(default_factory=dict)
    times: list[datetime] = field(default_factory=list)
    ops: int = 0


WRITERS = 4
MAX_OPS = 3_000


async def test_concurrent_writers_lose_nothing(dsn: str) -> None:
    stats = await generate(
        dsn,
        GenSpec(rows=20_000, dup_fraction=0.2, big_groups=2, big_group_size=200, payload_width=0),
    )
    before = await fetch_keys(dsn)
    counts: dict[str, int] = defaultdict(int)
    for key in before.values():
        if key is not None:
            counts[key] += 1
    in_groups = [pk for pk, key in before.items() if key is not None and counts[key] > 1]
    duplicated_keys = sorted(k for k, n in counts.items() if n > 1)
    single_keys = sorted(k for k, n in counts.items() if n == 1)
    writers = [Writer(i) for i in range(WRITERS)]
    finished = anyio.Event()

    async def write(w: Writer) -> None:
        rng = random.Random(w.index)
        mine = [pk for pk in before if pk % WRITERS == w.index]
        mine_in_groups = [pk for pk in in_groups if pk % WRITERS == w.index]
        conn = await asyncpg.connect(dsn)
        try:
            while not finished.is_set() and w.ops < MAX_OPS:
                w.ops += 1
                amount = Decimal(rng.randint(1, 10**8)) / 100
                status = f"w{w.index}-{w.ops}"
                roll = rng.random()
                if roll < 0.6:  # update other columns, mostly of rows in duplicate groups
                    pk = rng.choice(mine_in_groups if rng.random() < 0.7 else mine)
                    if pk in w.deleted:
                        continue
                    ts = await conn.fetchval(
                        "UPDATE payments SET amount = $2, status = $3 WHERE id = $1 "
                        "RETURNING clock_timestamp()",
                        pk,
                        amount,
                        status,
                    )
                    assert ts is not None, f"row {pk} vanished"
                    w.last[pk] = (amount, status)
                elif roll < 0.85:  # insert a new duplicate of an existing key
                    key = rng.choice(duplicated_keys if rng.random() < 0.5 else single_keys)
                    row = await conn.fetchrow(
                        "INSERT INTO payments (transaction_id, amount, currency, status, "
                        "created_at) VALUES ($1, $2, 'EUR', $3, now()) "
                        "RETURNING id, clock_timestamp() AS ts",
                        key,
                        amount,
                        status,
                    )
                    assert row is not None
                    w.inserted[row["id"]] = key
                    w.last[row["id"]] = (amount, status)
                    ts = row["ts"]
                else:  # delete one of its rows, often one of a duplicate group
                    pk = rng.choice(mine_in_groups if rng.random() < 0.7 else mine)
                    if pk in w.deleted:
                        continue
                    ts = await conn.fetchval(
                        "DELETE FROM payments WHERE id = $1 RETURNING clock_timestamp()", pk
                    )
                    assert ts is not None
                    w.deleted.add(pk)
                    w.last.pop(pk, None)
                w.times.append(ts)
                await anyio.sleep(0.001)
        finally:
            await conn.close()

    run_id = "live-writers"
    async with anyio.create_task_group() as tg:
        for w in writers:
            tg.start_soon(write, w)
        apply = ["run", "--apply", "--batch-size", "50", "--concurrency", "4"]
        result = await anyio.run_process(
            cli_args(*apply, "--run-id", run_id, "--format", "json", "-d", dsn),
            check=False,
            cwd=REPO_ROOT,
        )
        finished.set()
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "completed"
    assert "deadlock" not in summary["skipped"], summary
    assert "Deadlock" not in stderr
    assert summary["rows_renamed"] > stats.rows_to_rename // 2

    conn = await asyncpg.connect(dsn)
    try:
        # The writers really wrote while the run was renaming.
        first, last = await conn.fetchrow(
            "SELECT min(changed_at), max(changed_at) FROM bulkdedupe.changes WHERE run_id = $1",
            run_id,
        )
        during = sum(first <= t <= last for w in writers for t in w.times)
        assert during >= 10, f"only {during} writes overlapped the run: not a live test"

        # No write lost, no deleted row back, no row from nowhere.
        rows = {r["id"]: r for r in await conn.fetch("SELECT id, amount, status FROM payments")}
        deleted = set().union(*(w.deleted for w in writers))
        inserted = {pk: key for w in writers for pk, key in w.inserted.items()}
        assert rows.keys() == (before.keys() - deleted) | inserted.keys()
        lost = [
            (pk, expected, (rows[pk]["amount"], rows[pk]["status"]))
            for w in writers
            for pk, expected in w.last.items()
            if (rows[pk]["amount"], rows[pk]["status"]) != expected
        ]
        assert not lost, lost[:10]
        assert sum(len(w.last) for w in writers) > 100

        baseline = {**before, **inserted}
        changed = await check_audit(conn, baseline)
        # Rows renamed and later deleted by a writer keep their audit row.
        renamed_then_deleted = len(await _audited(conn) & deleted)
        assert await changes_count(conn, run_id) == changed + renamed_then_deleted

        # New duplicates written after their key was done are left for the next run: one more
        # run (quiet now) and verify leave none.
        code, _, err = await cli("run", "--apply", "--batch-size", "50", "-d", dsn)
        assert code == 0, err
        code, out, err = await cli("verify", "-d", dsn)
        assert code == 0, out + err
        assert await duplicate_groups(conn) == 0
        await check_audit(conn, baseline)
    finally:
        await conn.close()


async def _audited(conn: asyncpg.Connection) -> set[int]:
    return {int(r["pk"]) for r in await conn.fetch("SELECT pk FROM bulkdedupe.changes")}


# --- kill -9 and resume --------------------------------------------------------------------


async def test_kill_9_at_several_moments_then_resume(dsn: str, tmp_path: Path) -> None:
    conn, before, total = await slow_table(dsn)
    run_id = "killed"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20", "--concurrency", "2"]
    try:
        seen = 0
        for n, fraction in enumerate((0.0, 0.35, 0.7)):
            async with spawn(tmp_path, f"kill{n}", *args, "-d", dsn) as proc:
                reached = await wait_for_changes(conn, proc, max(seen + 1, int(total * fraction)))
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            assert proc.returncode == -signal.SIGKILL
            await wait_until_tool_gone(conn)
            # Every committed batch is whole: each changed row has its one audit row.
            changed = await check_audit(conn, before)
            assert changed >= reached > seen
            assert changed == await changes_count(conn, run_id)
            seen = changed
            row = await run_row(conn, run_id)
            assert row["status"] == "running"  # nobody got to say otherwise
            assert row["finished_at"] is None

        code, out, err = await cli(*args, "--format", "json", "-d", dsn)
        assert code == 0, err
        summary = json.loads(out)
        assert summary["run_id"] == run_id
        assert summary["status"] == "completed"
        assert summary["rows_skipped"] == 0
        row = await run_row(conn, run_id)
        assert row["status"] == "completed"
        assert row["renamed"] == total
        assert await check_audit(conn, before) == total
        assert await duplicate_groups(conn) == 0
        code, out, err = await cli("verify", "-d", dsn)
        assert code == 0, out + err
    finally:
        await conn.close()


# --- SIGINT / SIGTERM ----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_interrupts_cleanly_then_resume(
    dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    conn, before, total = await slow_table(dsn)
    run_id = f"sig-{signum.name}"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20", "--concurrency", "2"]
    try:
        async with spawn(tmp_path, "first", *args, "--format", "json", "-d", dsn) as proc:
            await wait_for_changes(conn, proc, 1)
            proc.send_signal(signum)
            with anyio.fail_after(60):
                await proc.wait()
        out, err = output(tmp_path, "first")
        assert proc.returncode == EXIT_INTERRUPTED, err
        summary = json.loads(out)  # the summary is printed
        assert summary["status"] == "interrupted"
        assert summary["run_id"] == run_id
        assert 0 < summary["rows_renamed"] < total
        assert "Traceback" not in err
        assert "--run-id" in err  # the log says how to resume

        await wait_until_tool_gone(conn)
        row = await run_row(conn, run_id)
        assert row["status"] == "interrupted"
        assert row["checkpoint"] is not None
        assert row["finished_at"] is not None
        changed = await check_audit(conn, before)
        assert changed == row["renamed"] == await changes_count(conn, run_id)
        assert changed >= summary["rows_renamed"]

        code, out, err = await cli(*args, "--format", "json", "-d", dsn)
        assert code == 0, err
        resumed = json.loads(out)
        assert resumed["status"] == "completed"
        assert resumed["run_id"] == run_id
        assert resumed["rows_skipped"] == 0
        assert (await run_row(conn, run_id))["status"] == "completed"
        assert await check_audit(conn, before) == total
        assert await changes_count(conn, run_id) == total
        assert await duplicate_groups(conn) == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_before_the_run_listens_for_it_still_ends_interrupted_with_a_summary(
    dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal while the run is still preparing (here: waiting to create its state schema)
    used to raise KeyboardInterrupt inside a task group: a traceback, exit 1, no summary, the run
    left 'running'. The run listens from before its first query now."""
    conn, before, _ = await slow_table(dsn)
    run_id = f"early-{signum.name}"
    args = ["run", "--apply", "--run-id", run_id, "--format", "json", "-d", dsn]
    app = await asyncpg.connect(dsn)
    try:
        ddl = app.transaction()
        await ddl.start()
        # the lock bulkdedupe takes to create (or upgrade) its state schema
        await app.execute("SELECT pg_advisory_xact_lock(hashtextextended('bulkdedupe.ddl', 0))")
        async with spawn(tmp_path, "early", *args) as proc:

            async def waiting_for_the_ddl_lock() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                        "WHERE l.locktype = 'advisory' AND NOT l.granted "
                        "AND a.application_name = 'bulkdedupe'"
                    )
                )

            await faults_support.wait_until(
                waiting_for_the_ddl_lock, "the run to wait for the DDL lock", proc=proc
            )
            proc.send_signal(signum)
            await anyio.sleep(0.3)
            assert proc.returncode is None  # it finishes its step first
            await ddl.rollback()
            with anyio.fail_after(60):
                await proc.wait()
        out, err = output(tmp_path, "early")
        assert proc.returncode == EXIT_INTERRUPTED, err
        assert "Traceback" not in err
        summary = json.loads(out)
        assert summary["status"] == "interrupted"
        assert summary["rows_renamed"] == 0
        row = await run_row(conn, run_id)
        assert row is not None and row["status"] == "interrupted"  # noqa: PT018
        assert await check_audit(conn, before) == 0
    finally:
        await app.close()
        await conn.close()


# --- one run, one process -------------------------------------------------------------------


async def test_second_process_on_the_same_run_is_refused(dsn: str, tmp_path: Path) -> None:
    conn, before, total = await slow_table(dsn)
    run_id = "only-once"
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "20", "--concurrency", "2"]
    try:
        async with spawn(tmp_path, "first", *args, "-d", dsn) as proc:
            await wait_for_changes(conn, proc, 1)
            code, out, err = await cli(*args, "-d", dsn)
            assert proc.returncode is None, "the first run must still be going"
            assert code == 3, err
            lines = err.splitlines()
            assert len(lines) == 1, err
            assert lines[0].startswith("bulkdedupe: error: ")
            assert "another bulkdedupe process" in lines[0]
            assert out == ""
            # the first run is undisturbed and finishes
            with anyio.fail_after(120):
                await proc.wait()
        assert proc.returncode == 0, output(tmp_path, "first")[1]
        assert (await run_row(conn, run_id))["status"] == "completed"
        assert await check_audit(conn, before) == total
        assert await duplicate_groups(conn) == 0
    finally:
        await conn.close()


async def test_signal_while_blocked_on_a_lock_stops_promptly(dsn: str, tmp_path: Path) -> None:
    """The run waits on a lock held by the application (its scan blocked behind an exclusive
    table lock): SIGTERM cancels the waiting query instead of sitting out the statement
    timeout, records the run as interrupted, and leaves no backend behind."""
    await generate(dsn, GenSpec(rows=2_000, dup_fraction=0.1, payload_width=0))
    before = await fetch_keys(dsn)
    locker = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    run_id = "blocked"
    args = ["run", "--apply", "--run-id", run_id, "--statement-timeout", "5min", "-d", dsn]
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
            async with spawn(tmp_path, "blocked", *args) as proc:
                with anyio.fail_after(60):
                    while not await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND application_name = 'bulkdedupe' "
                        "AND wait_event_type = 'Lock'"
                    ):
                        assert proc.returncode is None, output(tmp_path, "blocked")
                        await anyio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                # far less than the 5 min statement timeout: the query was cancelled
                with anyio.fail_after(60):
                    await proc.wait()
            assert proc.returncode == EXIT_INTERRUPTED, output(tmp_path, "blocked")
            # still inside the application's transaction: nothing of the tool is left waiting
            await wait_until_tool_gone(watcher)
        assert (await run_row(watcher, run_id))["status"] == "interrupted"
        assert await check_audit(watcher, before) == 0
        code, _, err = await cli(*args)
        assert code == 0, err
        assert await duplicate_groups(watcher) == 0
        assert await check_audit(watcher, before) == 200
    finally:
        await locker.close()
        await watcher.close()
