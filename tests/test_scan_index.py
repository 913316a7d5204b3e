"""The scan index `--create-scan-index` builds, against real PostgreSQL: two runs on one table
share it (the second waits for the first's build and reuses it, neither drops it while the other
runs, the last one out drops it), and an invalid leftover is replaced.

What the catalog says is read with plain SQL, sampled while the runs work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest
from anyio.abc import TaskGroup
from structlog.testing import capture_logs

from bulkdedupe import ConnectConfig, RunConfig, TargetError, run
from bulkdedupe.config import ThrottleConfig
from bulkdedupe.results import RunSummary
from tests.factories import duplicate_groups, shuffled
from tests.faults_support import check_audit, run_row, wait_until
from tests.helpers import create_payments, execute, fetch, fetch_keys

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

NAME = "bulkdedupe_scan_payments_transaction_id"
Index = tuple[int, bool] | None  # (oid, valid) of the scan index, None when there is none
DEADLINE = 60.0


async def until(probe: Callable[[], Awaitable[object]], what: str) -> None:
    await wait_until(probe, what, deadline=DEADLINE, interval=0.02)


async def scan_index(conn: asyncpg.Connection) -> Index:
    row = await conn.fetchrow(
        "SELECT c.oid, i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = $1",
        NAME,
    )
    return None if row is None else (int(row["oid"]), bool(row["indisvalid"]))


# The scan index and the run's status, in one snapshot. The state schema exists by then: a run
# creates it before its index.
SAMPLE = """
SELECT (SELECT status FROM bulkdedupe.runs WHERE run_id = $2) AS status,
       c.oid::bigint AS oid, i.indisvalid AS valid
FROM (SELECT) AS one
LEFT JOIN pg_class c ON c.relname = $1
LEFT JOIN pg_index i ON i.indexrelid = c.oid
"""


async def make_table(dsn: str, seed: int) -> dict[int, str | None]:
    """300 pairs, no index on the key; and `holds`, which keeps a run paused (its
    --throttle-query) while its row says so."""
    await create_payments(
        dsn, rows=shuffled({f"k{i:04d}": 2 for i in range(300)}, seed=seed), index=False
    )
    await execute(dsn, "CREATE TABLE holds (run_id text PRIMARY KEY, hold boolean NOT NULL)")
    return await fetch_keys(dsn)


def held(run_id: str, **options: Any) -> RunConfig:
    """A run with --create-scan-index that stays paused (before its first batch) until
    released; it holds its scan index all the while."""
    query = f"SELECT coalesce((SELECT hold FROM holds WHERE run_id = '{run_id}'), false)"
    return RunConfig(
        apply=True,
        run_id=run_id,
        create_scan_index=True,
        throttle=ThrottleConfig(throttle_query=query),
        **options,
    )


class Runs:
    """Runs executing in this process, alongside the test."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.cfg = ConnectConfig(database_url=dsn)
        self.summaries: dict[str, RunSummary] = {}
        self.done: dict[str, anyio.Event] = {}

    async def start(self, tg: TaskGroup, run_cfg: RunConfig, *, hold: bool = False) -> None:
        assert run_cfg.run_id is not None
        await execute(
            self.dsn, f"INSERT INTO holds VALUES ('{run_cfg.run_id}', {str(hold).lower()})"
        )
        self.done[run_cfg.run_id] = anyio.Event()
        tg.start_soon(self._execute, run_cfg.run_id, run_cfg)

    async def _execute(self, run_id: str, run_cfg: RunConfig) -> None:
        try:
            self.summaries[run_id] = await run(self.cfg, run_cfg)
        finally:
            self.done[run_id].set()

    async def finish(self, run_id: str) -> RunSummary:
        """Release the run and wait for its end: it must complete."""
        await execute(self.dsn, f"UPDATE holds SET hold = false WHERE run_id = '{run_id}'")
        with anyio.fail_after(DEADLINE):
            await self.done[run_id].wait()
        summary = self.summaries[run_id]
        assert summary.status == "completed"
        return summary

    async def registered(self, conn: asyncpg.Connection, run_id: str) -> bool:
        """Recorded in the runs table: its scan index is settled by then."""
        return await run_row(conn, run_id) is not None

    async def sample(self, conn: asyncpg.Connection, run_id: str, seen: list[Index]) -> None:
        """The scan index, for as long as `run_id` is marked running (after its final status
        it may drop the index itself)."""
        while not self.done[run_id].is_set():
            row = await conn.fetchrow(SAMPLE, NAME, run_id)
            assert row is not None
            if row["status"] == "running":
                seen.append(None if row["oid"] is None else (row["oid"], row["valid"]))
            await anyio.sleep(0.01)


def one_index_throughout(seen: list[Index]) -> Index:
    """From its first sighting on, the same valid index: never dropped, never replaced."""
    valid = [s for s in seen if s is not None and s[1]]
    assert valid, seen
    since = set(seen[seen.index(valid[0]) :])
    assert since == {valid[0]}, f"the scan index changed under a run: {since}"
    return valid[0]


@pytest.mark.parametrize("keep", [False, True], ids=["drop", "keep"])
async def test_a_run_arriving_during_the_build_waits_and_reuses_it_and_the_last_one_drops_it(
    dsn: str, keep: bool
) -> None:
    before = await make_table(dsn, seed=11)
    runs = Runs(dsn)
    seen: list[Index] = []  # while the first run runs
    conn, blocker, sampler = [await asyncpg.connect(dsn) for _ in range(3)]
    try:

        async def building() -> int | None:
            return await conn.fetchval(
                "SELECT pid FROM pg_stat_progress_create_index "
                "WHERE relid = 'payments'::regclass AND datname = current_database()"
            )

        async with anyio.create_task_group() as tg:
            # A writer's open transaction holds the first run's CREATE INDEX CONCURRENTLY up,
            # so the second run arrives while the index is being built.
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("UPDATE payments SET status = status WHERE id = 1")
            await runs.start(tg, held("first", keep_scan_index=keep), hold=True)
            await until(building, "the first run's index build")
            build_pid = await building()
            tg.start_soon(runs.sample, sampler, "first", seen)
            await runs.start(tg, held("second"))

            async def second_at_the_index() -> bool:
                # waiting its turn (or, before the fix, dropping the index being built)
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'bulkdedupe' AND pid <> $1 "
                        "AND (query LIKE '%scan-index%' OR query LIKE '%' || $2 || '%')",
                        build_pid,
                        NAME,
                    )
                )

            await until(second_at_the_index, "the second run at the scan index")
            await tx.rollback()
            second = await runs.finish("second")
            assert second.rows_renamed == 300
            # the first run is still there: the second, done, left the index to it
            assert not runs.done["first"].is_set()
            built = await scan_index(conn)
            assert built is not None
            assert built[1], "the scan index is not valid"
            first = await runs.finish("first")

        assert first.rows_renamed == 0  # the second one did it all
        assert one_index_throughout(seen) == built
        assert await scan_index(conn) == (built if keep else None)  # the last one out
        assert await duplicate_groups(dsn) == {}
        assert await check_audit(conn, before) == 300
    finally:
        for c in (conn, blocker, sampler):
            await c.close()


async def test_a_run_ending_first_leaves_the_index_to_the_run_still_using_it(dsn: str) -> None:
    before = await make_table(dsn, seed=12)
    runs = Runs(dsn)
    seen: list[Index] = []  # while the second run runs
    conn, sampler = [await asyncpg.connect(dsn) for _ in range(2)]
    try:
        async with anyio.create_task_group() as tg:
            await runs.start(tg, held("first"), hold=True)  # builds the index
            await until(lambda: runs.registered(conn, "first"), "the first run under way")
            await runs.start(tg, held("second"), hold=True)  # finds it, and uses it
            await until(lambda: runs.registered(conn, "second"), "the second run under way")
            tg.start_soon(runs.sample, sampler, "second", seen)
            assert (await runs.finish("first")).rows_renamed == 300
            # the first run asked for a temporary index, but the second one still uses it
            assert not runs.done["second"].is_set()
            built = await scan_index(conn)
            assert built is not None
            await runs.finish("second")

        assert one_index_throughout(seen) == built
        assert await scan_index(conn) is None  # dropped by the last one out
        assert await duplicate_groups(dsn) == {}
        assert await check_audit(conn, before) == 300
    finally:
        for c in (conn, sampler):
            await c.close()


async def test_an_invalid_leftover_scan_index_is_replaced_and_a_valid_one_reused(
    dsn: str,
) -> None:
    await create_payments(dsn, rows=[("a",), ("a",), ("b",), ("c",), ("c",)], index=False)
    # what a failed or cancelled CREATE INDEX CONCURRENTLY leaves behind
    await execute(
        dsn,
        f"CREATE INDEX {NAME} ON payments (transaction_id)",
        f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{NAME}'::regclass",
    )
    conn = await asyncpg.connect(dsn)
    try:
        leftover = await scan_index(conn)
        assert leftover is not None
        cfg = ConnectConfig(database_url=dsn)
        keep = RunConfig(apply=True, create_scan_index=True, keep_scan_index=True)

        assert (await run(cfg, keep)).rows_renamed == 2

        rebuilt = await scan_index(conn)
        assert rebuilt is not None
        assert rebuilt[1]
        assert rebuilt[0] != leftover[0]
        await execute(dsn, "INSERT INTO payments (transaction_id) VALUES ('a'), ('b')")
        # valid: reused as it is, and (without --keep-scan-index) dropped at the end
        with capture_logs() as logs:
            again = await run(cfg, RunConfig(apply=True, create_scan_index=True))
        assert again.rows_renamed == 2
        events = [e["event"] for e in logs]
        assert "reusing scan index" in events
        assert "creating scan index concurrently" not in events
        assert await scan_index(conn) is None
        assert await duplicate_groups(dsn) == {}
        indexes = await fetch(dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'payments'")
        assert [r["indexname"] for r in indexes] == ["payments_pkey"]
    finally:
        await conn.close()


async def test_another_object_with_the_scan_index_name_is_refused_not_dropped(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("a",)], index=False)
    # not usable for the scan (partial), so the run must build one: and would need the name
    await execute(dsn, f"CREATE INDEX {NAME} ON payments (transaction_id) WHERE amount > 0")
    conn = await asyncpg.connect(dsn)
    try:
        theirs = await scan_index(conn)
        with pytest.raises(TargetError, match="not bulkdedupe's scan index"):
            await run(
                ConnectConfig(database_url=dsn), RunConfig(apply=True, create_scan_index=True)
            )
        assert await scan_index(conn) == theirs
    finally:
        await conn.close()
