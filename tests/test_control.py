"""Live control from another terminal: `set`, `pause`, `resume`, `stop` and `status` against a
`run --apply` executing in a separate process, and the errors for runs that cannot obey."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import anyio
import asyncpg
import pytest
from click.testing import CliRunner

from bulkdedupe import RunConfig, RunStateError, run
from bulkdedupe.batching import LockBudget
from bulkdedupe.cli import main
from bulkdedupe.config import ConnectConfig, ThrottleConfig, parse_table
from bulkdedupe.control import request, status
from bulkdedupe.results import RunStatus
from tests.factories import audit_rows, duplicate_groups, shuffled
from tests.faults_support import wait_until
from tests.helpers import REPO_ROOT, create_payments, fetch_keys

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEADLINE = 30.0
EXIT_INTERRUPTED = 130


async def cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a user calls it, in-process (a thread with its own event loop): the control
    commands come from another connection all the same, without a Python start-up each.
    Not for `run`, whose signal handlers need the main thread."""
    result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, list(args)))
    return result.exit_code, result.stdout, result.stderr


async def until(probe: Callable[[], Awaitable[object]], what: str) -> None:
    await wait_until(probe, what, deadline=DEADLINE, interval=0.2)


async def changes(conn: asyncpg.Connection) -> int:
    if not await conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
        return 0
    return int(await conn.fetchval("SELECT count(*) FROM bulkdedupe.changes"))


async def transactions(conn: asyncpg.Connection, run_id: str) -> list[tuple[int, int]]:
    """(first audit id, renames) of each batch transaction, in commit-ish order: the audit rows
    one transaction wrote share its xmin."""
    rows = await conn.fetch(
        "SELECT min(id) AS first, count(*) AS n FROM bulkdedupe.changes WHERE run_id = $1 "
        "GROUP BY xmin::text ORDER BY 1",
        run_id,
    )
    return [(r["first"], r["n"]) for r in rows]


async def test_set_pause_resume_stop_from_another_terminal(dsn: str, tmp_path: Path) -> None:
    before_layout = {f"k{i:04d}": 2 for i in range(800)}
    await create_payments(dsn, rows=shuffled(before_layout, seed=9))
    before = await fetch_keys(dsn)
    cfg = ConnectConfig(database_url=dsn, table=parse_table("payments"))
    common = ("-d", dsn)
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    conn = await asyncpg.connect(dsn)
    try:
        with out.open("w") as fo, err.open("w") as fe:
            proc = await anyio.open_process(
                [sys.executable, "-m", "bulkdedupe", "--log-format", "json", "run", *common,
                 "--apply", "--run-id", "ctl", "--batch-size", "20", "--target-batch-time", "off",
                 "--concurrency", "1", "--sleep", "300ms", "--scanners", "1",
                 "--scan-page-size", "100"],
                stdout=fo, stderr=fe, cwd=REPO_ROOT,
            )  # fmt: skip
            try:
                await until(lambda: _at_least(conn, 20), "the first batch of 20")

                # set: later batches are at most 7 rows, three workers at a time
                rc, stdout, stderr = await cli(
                    "set", *common, "--run-id", "ctl", "--batch-size", "7", "--concurrency", "3"
                )
                assert rc == 0, stderr
                assert "batch-size=7, concurrency=3" in stdout
                assert "obeyed" in stdout
                mark = await conn.fetchval("SELECT max(id) FROM bulkdedupe.changes")

                # pause: nothing more is renamed, and status says why
                rc, _, stderr = await cli("pause", *common, "--run-id", "ctl")
                assert rc == 0, stderr

                async def paused() -> bool:
                    return (await status(cfg, "ctl")).state == "paused"

                await until(paused, "status paused")
                st = await status(cfg, "ctl")
                assert st.reasons == ("paused by operator",)
                assert st.alive
                assert st.batch_ceiling == 7
                assert st.concurrency == 3
                assert st.batch_size == 7
                held = await changes(conn)
                await anyio.sleep(1.5)
                assert await changes(conn) == held, "renamed while paused"

                # resume: renames go on
                await request(cfg, "ctl", verb="resume")
                await until(lambda: _at_least(conn, held + 7), "renames after resume")

                # stop: graceful, exit 130, resumable
                rc, _, stderr = await cli("stop", *common, "--run-id", "ctl")
                assert rc == 0, stderr
                with anyio.fail_after(DEADLINE):
                    code = await proc.wait()
                assert code == EXIT_INTERRUPTED, err.read_text()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

        rc, stdout, _ = await cli("status", *common, "--run-id", "ctl", "--format", "json")
        assert rc == 0
        shown = json.loads(stdout)
        assert shown["state"] == "interrupted"
        assert shown["alive"] is False
        assert 20 < shown["rows_renamed"] < 800

        txs = await transactions(conn, "ctl")
        assert max(n for first, n in txs if first <= mark) == 20
        after_set = [n for first, n in txs if first > mark]
        # the first batch after `set` may have been under way when it was obeyed
        assert len(after_set) >= 3, after_set
        assert max(after_set[1:]) <= 7, after_set
    finally:
        await conn.close()

    # the rest in one go, then: audit equals data, nothing left to do
    assert (await run(cfg, RunConfig(apply=True, run_id="ctl"))).status == "completed"
    after = await fetch_keys(dsn)
    changed = sorted((str(pk), before[pk], after[pk]) for pk in before if before[pk] != after[pk])
    assert len(changed) == 800
    assert await audit_rows(dsn, "ctl") == changed
    assert await duplicate_groups(dsn) == {}
    st = await status(cfg)  # the newest run
    assert (st.run_id, st.state, st.alive) == ("ctl", "completed", False)

    # a finished run cannot be told anything
    rc, _, stderr = await cli("pause", *common, "--run-id", "ctl")
    assert rc == 3
    assert "run ctl is completed" in stderr
    assert stderr.count("\n") == 1


async def _at_least(conn: asyncpg.Connection, n: int) -> bool:
    return await changes(conn) >= n


async def test_control_errors(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("a",)])
    common = ("-d", dsn)
    # no state schema yet: nothing to show or control
    rc, _, stderr = await cli("status", *common)
    assert rc == 3
    assert "does not exist" in stderr
    cfg = ConnectConfig(database_url=dsn, table=parse_table("payments"))
    await run(cfg, RunConfig(apply=True, run_id="done"))
    for args, code, message in [
        (("status", "--run-id", "nope"), 3, "run nope not found"),
        (("stop", "--run-id", "nope"), 3, "run nope not found"),
        (("resume", "--run-id", "done"), 3, "run done is completed"),
        (("set", "--run-id", "done"), 2, "at least one setting"),
        (("set", "--run-id", "done", "--batch-size", "0"), 2, "--batch-size 0: must be at least 1"),
        (("set", "--run-id", "done", "--max-rate", "fast"), 2, "expected a float or off"),
        (("run", "--apply", "--max-rate", "0"), 2, "--max-rate 0.0: must be greater than zero"),
        (("run", "--apply", "--replica-url", dsn), 2, "needs --max-replication-lag"),
    ]:
        rc, _, stderr = await cli(*args[:1], *common, *args[1:])
        assert rc == code, (args, stderr)
        assert message in stderr, (args, stderr)
        assert stderr.count("\n") == 1, (args, stderr)  # one line
    rc, stdout, _ = await cli("status", *common, "--run-id", "done")
    assert rc == 0
    assert "completed" in stdout
    assert "none alive" in stdout


async def test_a_run_marked_running_without_a_process_is_refused(dsn: str) -> None:
    """kill -9 leaves the row 'running' but releases the run lock with the connection."""
    await create_payments(dsn, rows=[("a",), ("a",)])
    cfg = ConnectConfig(database_url=dsn, table=parse_table("payments"))
    await run(cfg, RunConfig(apply=True, run_id="crashed"))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE bulkdedupe.runs SET status = 'running' WHERE run_id = 'crashed'")
        # the lock query really looks at the lock: held here, the run counts as alive
        assert await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended('bulkdedupe.run:' || 'crashed', 0))"
        )
        assert (await status(cfg, "crashed")).alive
        await conn.execute("SELECT pg_advisory_unlock_all()")
        st = await status(cfg, "crashed")
        assert (st.state, st.alive) == ("gone", False)
    finally:
        await conn.close()
    rc, _, stderr = await cli("pause", "-d", dsn, "--run-id", "crashed")
    assert rc == 3
    assert "no process is executing it" in stderr
    assert "--run-id crashed" in stderr


LOCK_SLOTS = """
SELECT current_setting('max_locks_per_transaction')::int
       * (current_setting('max_connections')::int
          + current_setting('max_prepared_transactions')::int)"""


async def test_set_concurrency_upward_lowers_the_batch_ceiling(dsn: str) -> None:
    """More workers share the same lock table: `set --concurrency` upward lowers the batch
    ceiling (two advisory locks a rename), and a `set --batch-size` above it stays under it."""
    conn = await asyncpg.connect(dsn)
    try:
        budget = LockBudget(int(await conn.fetchval(LOCK_SLOTS)))
        one, eight = budget.ceiling(1), budget.ceiling(8)
        assert one is not None
        assert eight is not None
        batch = min(400, one)
        if eight >= batch:
            pytest.skip(f"this server's lock table allows {eight}-row batches for 8 workers")
        await create_payments(
            dsn, rows=shuffled({f"k{i:05d}": 2 for i in range(4 * batch)}, seed=3)
        )
        # paused (by its --throttle-query) from the start until the test says go
        await conn.execute("CREATE TABLE hold (paused boolean); INSERT INTO hold VALUES (true)")
        cfg = ConnectConfig(database_url=dsn, table=parse_table("payments"))
        run_cfg = RunConfig(
            apply=True,
            run_id="wide",
            batch_size=batch,
            concurrency=1,
            target_batch_time=None,
            throttle=ThrottleConfig(throttle_query="SELECT paused FROM hold"),
        )
        summaries = []

        async def execute() -> None:
            summaries.append(await run(cfg, run_cfg))

        async def written_after(moment: datetime) -> RunStatus:
            """The first status the process wrote after `moment` (server time)."""
            live: list[RunStatus] = []

            async def fresh() -> bool:
                try:
                    live.append(await status(cfg, "wide"))
                except RunStateError:  # not registered yet
                    return False
                # with what the process reports of itself (not only its registration)
                return live[-1].updated_at > moment and live[-1].batch_ceiling is not None

            await until(fresh, "a status written by the run")
            return live[-1]

        async def obeyed(settings: dict[str, int]) -> RunStatus:
            await request(cfg, "wide", verb="set", settings=settings)
            return await written_after(await conn.fetchval("SELECT now()"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(execute)
            live = await written_after(await conn.fetchval("SELECT now()"))
            assert (live.concurrency, live.batch_ceiling) == (1, batch)
            live = await obeyed({"concurrency": 8})
            assert (live.concurrency, live.batch_ceiling) == (8, eight)
            live = await obeyed({"batch_size": 10 * batch})
            assert live.batch_ceiling == eight
            await conn.execute("UPDATE hold SET paused = false")
        (summary,) = summaries
        assert summary.status == "completed"
        assert summary.rows_renamed == 4 * batch
        sizes = [n for _, n in await transactions(conn, "wide")]
        assert sum(sizes) == 4 * batch
        assert max(sizes) <= eight, sizes
    finally:
        await conn.close()
    assert await duplicate_groups(dsn) == {}
