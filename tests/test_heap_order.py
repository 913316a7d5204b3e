"""Heap-order renames (`--order heap`, the default of --apply; bulkdedupe/sweep.py): groups are
decided in key order as the scan finds them, renamed in the order their rows lie in the heap,
each chunk re-checked under its groups' locks. Real PostgreSQL, real runs."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from typing import Any

import anyio
import asyncpg
import pytest

from bulkdedupe import pipeline, sweep
from bulkdedupe.spool import Spool
from bulkdedupe.worker import ChunkResult, Entry, Worker, WorkItem

from .factories import apply_cfg, connect, duplicate_groups, shuffled
from .faults_support import check_audit_of
from .helpers import SURVIVOR_CHANGES, create_payments, execute, fetch, fetch_keys

pytestmark = pytest.mark.anyio

# 60 groups of 2-4 rows, keys scattered over the heap (ids, so ctids, follow insertion order)
LAYOUT = {f"tx-{i:03d}": 2 + i % 3 for i in range(60)}
TO_RENAME = sum(n - 1 for n in LAYOUT.values())


async def _heap_positions(dsn: str) -> dict[int, tuple[int, int]]:
    return {r["id"]: r["ctid"] for r in await fetch(dsn, "SELECT id, ctid FROM payments")}


async def _transactions(dsn: str, run_id: str) -> list[list[tuple[int, str]]]:
    """The run's audit rows, (pk, old value), by the transaction that wrote them, in commit
    order (concurrency 1; within one transaction the order is the UPDATE's, not ours)."""
    rows = await fetch(
        dsn,
        "SELECT xmin::text AS tx, pk, old_value FROM bulkdedupe.changes WHERE run_id = $1 "
        "ORDER BY id",
        run_id,
    )
    out: dict[str, list[tuple[int, str]]] = {}
    for r in rows:
        out.setdefault(r["tx"], []).append((int(r["pk"]), r["old_value"]))
    return list(out.values())


def _in_order(txs: list[list[tuple[int, str]]], key: Any) -> bool:
    """Each transaction's rows all come after the previous one's, by `key`."""
    return all(
        max(key(row) for row in a) < min(key(row) for row in b) for a, b in itertools.pairwise(txs)
    )


async def test_renames_follow_the_heap_not_the_key(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=3))
    before = await fetch_keys(dsn)
    where = await _heap_positions(dsn)
    monkeypatch.setattr(sweep, "SORT_RUN_ITEMS", 7)  # the sort spills runs to disk and merges

    summary = await pipeline.run(
        connect(dsn), apply_cfg(batch_size=10, concurrency=1, target_batch_time=None)
    )

    assert summary.status == "completed"
    assert summary.rows_renamed == TO_RENAME
    assert await duplicate_groups(dsn) == {}
    assert await check_audit_of(dsn, before) == TO_RENAME
    txs = await _transactions(dsn, summary.run_id)
    assert len(txs) >= TO_RENAME // 10
    assert _in_order(txs, lambda row: where[row[0]])  # heap position
    assert not _in_order(txs, lambda row: row[1])  # not the key's order
    # the survivor of each group is still the first row by --keep order (the lowest id)
    after = await fetch_keys(dsn)
    for key in LAYOUT:
        assert min(pk for pk, k in before.items() if k == key) == min(
            pk for pk, k in after.items() if k == key
        )


async def test_key_order_renames_group_by_group(dsn: str) -> None:
    # the same table with --order key: the audit follows the key, so the test above is not
    # satisfied by any order a run happens to take
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=3))
    before = await fetch_keys(dsn)
    where = await _heap_positions(dsn)

    summary = await pipeline.run(
        connect(dsn),
        apply_cfg(batch_size=10, concurrency=1, target_batch_time=None, order="key"),
    )

    assert summary.rows_renamed == TO_RENAME
    assert await check_audit_of(dsn, before) == TO_RENAME
    txs = await _transactions(dsn, summary.run_id)
    assert len(txs) >= TO_RENAME // 10
    assert not _in_order(txs, lambda row: where[row[0]])
    # key order: a group is never split over batches, so the keys of each batch come after
    # the previous batch's (ties impossible)
    assert _in_order(txs, lambda row: row[1])


@SURVIVOR_CHANGES
async def test_survivor_changed_after_the_decision_is_decided_again_under_lock(
    dsn: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=4))
    before = await fetch_keys(dsn)
    victim = "tx-002"  # 4 rows
    survivor = min(pk for pk, k in before.items() if k == victim)
    original = Worker.rename_entries
    changed: list[int] = []

    async def application_changes_the_survivor_first(self: Worker, entries: list[Entry]) -> Any:
        if not changed:  # every group is decided; the application acts before the renames
            await execute(dsn, change.format(pk=survivor))
            changed.append(survivor)
        return await original(self, entries)

    monkeypatch.setattr(Worker, "rename_entries", application_changes_the_survivor_first)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=10, concurrency=2))

    assert changed
    assert summary.status == "completed"
    after = await fetch_keys(dsn)
    holders = sorted(pk for pk, k in after.items() if k == victim)
    # the value is held again, by the next row in --keep order; never by none
    assert holders == [sorted(pk for pk, k in before.items() if k == victim)[1]]
    assert await duplicate_groups(dsn) == {}
    baseline = dict(before)
    if change.startswith("UPDATE"):
        baseline[survivor] = "moved"  # the application's write, kept
    else:
        del baseline[survivor]
    assert await check_audit_of(dsn, baseline, deletions=True) == TO_RENAME - 1


async def test_row_the_application_rekeys_meanwhile_keeps_its_new_value(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=5))
    before = await fetch_keys(dsn)
    loser = sorted(pk for pk, k in before.items() if k == "tx-001")[1]
    original = Worker.rename_entries
    done: list[bool] = []

    async def application_rekeys_a_loser(self: Worker, entries: list[Entry]) -> ChunkResult:
        if not done:
            await execute(dsn, f"UPDATE payments SET transaction_id = 'mine' WHERE id = {loser}")
            done.append(True)
        return await original(self, entries)

    monkeypatch.setattr(Worker, "rename_entries", application_rekeys_a_loser)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=10, concurrency=1))

    assert summary.status == "completed"
    assert (await fetch_keys(dsn))[loser] == "mine"  # the application's write is not lost
    assert await check_audit_of(dsn, before | {loser: "mine"}) == TO_RENAME - 1
    assert await duplicate_groups(dsn) == {}


async def test_rows_the_application_moves_meanwhile_are_renamed_with_its_writes_kept(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain table's chunk finds each row and its survivor by heap position (a TID scan:
    no pruning of pages it only reads). A row the application updates after the decision has
    moved (a new version, another ctid): the chunk does not find it, and its group is decided
    again under lock, so the rename still happens, on the current row, whose other columns
    keep the application's write; a moved survivor is still the survivor."""
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=6))
    before = await fetch_keys(dsn)
    rows_of = {k: sorted(pk for pk, v in before.items() if v == k) for k in ("tx-001", "tx-002")}
    loser = rows_of["tx-001"][1]  # a loser that moves
    survivor = rows_of["tx-002"][0]  # a survivor that moves
    original = Worker.rename_entries
    moved: list[Any] = []

    async def application_updates_other_columns(self: Worker, entries: list[Entry]) -> Any:
        if not moved:  # every group is decided; the application writes before the renames
            moved.extend(
                await fetch(
                    dsn, "SELECT id, ctid FROM payments WHERE id = ANY($1)", [loser, survivor]
                )
            )
            await execute(
                dsn, f"UPDATE payments SET amount = 99.99 WHERE id IN ({loser}, {survivor})"
            )
        return await original(self, entries)

    monkeypatch.setattr(Worker, "rename_entries", application_updates_other_columns)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=10, concurrency=2))

    assert summary.status == "completed"
    now = {r["id"]: r for r in await fetch(dsn, "SELECT id, ctid, amount FROM payments")}
    # both rows did move: the chunks' positions were stale for them
    assert {r["id"]: r["ctid"] for r in moved} != {pk: now[pk]["ctid"] for pk in (loser, survivor)}
    after = await fetch_keys(dsn)
    assert after[loser] == f"tx-001-{loser}"  # renamed all the same
    assert after[survivor] == "tx-002"  # still the survivor
    assert all(k != "tx-002" for pk, k in after.items() if pk != survivor)
    assert now[loser]["amount"] == now[survivor]["amount"] == Decimal("99.99")  # not lost
    assert await duplicate_groups(dsn) == {}
    assert await check_audit_of(dsn, before) == TO_RENAME


async def test_chunk_meeting_a_held_row_is_left_to_a_key_order_batch(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The application holds one group's row: the chunk holding it fails its lock_timeout, is
    # retried once, then its groups go to the key-order tail (an ordinary batch with every
    # retry), while the other chunks go on. Once the application commits, all is renamed.
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=6))
    before = await fetch_keys(dsn)
    tail: list[str] = []
    in_tail = anyio.Event()
    original = pipeline._decide_again

    async def spy(r: Any, keys: list[str]) -> None:
        tail.extend(keys)
        in_tail.set()
        await original(r, keys)

    monkeypatch.setattr(pipeline, "_decide_again", spy)
    app = await asyncpg.connect(dsn)
    try:
        tx = app.transaction()
        await tx.start()
        await app.execute("SELECT 1 FROM payments WHERE transaction_id = 'tx-010' FOR UPDATE")
        run_cfg = apply_cfg(batch_size=10, concurrency=2, lock_timeout=0.2, max_retries=30)
        async with anyio.create_task_group() as tg:

            async def release_later() -> None:
                await in_tail.wait()
                await anyio.sleep(0.5)  # its batch retries meanwhile
                await tx.commit()

            tg.start_soon(release_later)
            with anyio.fail_after(60):
                summary = await pipeline.run(connect(dsn), run_cfg)
    finally:
        await app.close()

    assert "tx-010" in tail
    assert summary.status == "completed"
    assert summary.retries >= 2
    assert summary.rows_renamed == TO_RENAME
    assert await check_audit_of(dsn, before) == TO_RENAME
    assert await duplicate_groups(dsn) == {}


async def test_stop_during_the_sweep_then_resume_renames_the_rest_once(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=7))
    before = await fetch_keys(dsn)
    stop = anyio.Event()
    original = Worker.rename_entries
    chunks: list[int] = []

    async def stop_after_two_chunks(self: Worker, entries: list[Entry]) -> ChunkResult:
        chunks.append(len(entries))
        if len(chunks) == 2:
            stop.set()
        return await original(self, entries)

    monkeypatch.setattr(Worker, "rename_entries", stop_after_two_chunks)
    cfg = connect(dsn)
    first = await pipeline.run(
        cfg,
        apply_cfg(batch_size=10, concurrency=1, target_batch_time=None, run_id="swept"),
        stop=stop,
    )
    assert first.status == "interrupted"
    assert 0 < first.rows_renamed < TO_RENAME
    # the checkpoint has not moved: a resume scans again (renamed groups are no longer found)
    [row] = await fetch(dsn, "SELECT checkpoint FROM bulkdedupe.runs WHERE run_id = 'swept'")
    assert not any(r["done"] for r in json.loads(row["checkpoint"])["ranges"])
    monkeypatch.setattr(Worker, "rename_entries", original)

    resumed = await pipeline.run(cfg, apply_cfg(run_id="swept"))

    assert resumed.status == "completed"
    assert first.rows_renamed + resumed.rows_renamed == TO_RENAME
    assert await check_audit_of(dsn, before) == TO_RENAME  # each row audited once
    assert await duplicate_groups(dsn) == {}


# --- the worker sessions -------------------------------------------------------------------


async def _record_batch_settings(dsn: str) -> None:
    await execute(
        dsn,
        "CREATE TABLE seen (sync text, lock_timeout text)",
        """CREATE FUNCTION record_settings() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO seen VALUES (current_setting('synchronous_commit'),
                                     current_setting('lock_timeout'));
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER record_settings BEFORE UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION record_settings()",
    )


@pytest.mark.parametrize(
    ("order", "choice", "expected"),
    [
        ("heap", "off", "off"),
        ("key", "off", "off"),
        ("heap", "server", "on"),
    ],
)
async def test_batches_run_with_the_sessions_settings(
    dsn: str, order: str, choice: str, expected: str
) -> None:
    # The worker sessions start with the batches' settings (no SET LOCAL): every rename runs
    # with --lock-timeout and --synchronous-commit, and nothing else of the server changes.
    await create_payments(dsn, rows=shuffled(LAYOUT, seed=8))
    await _record_batch_settings(dsn)
    # the test servers run with synchronous_commit off: this database's sessions default to on
    await execute(
        dsn,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = "
        "on', current_database()); END $$",
    )
    server = await fetch(dsn, "SELECT current_setting('synchronous_commit') AS s")
    assert server[0]["s"] == "on"

    summary = await pipeline.run(
        connect(dsn),
        apply_cfg(order=order, synchronous_commit=choice, lock_timeout=1.5, batch_size=10),
    )

    assert summary.rows_renamed == TO_RENAME
    seen = await fetch(dsn, "SELECT sync, lock_timeout, count(*) AS n FROM seen GROUP BY 1, 2")
    assert [(r["sync"], r["lock_timeout"], r["n"]) for r in seen] == [
        (expected, "1500ms", TO_RENAME)
    ]
    assert (await fetch(dsn, "SELECT current_setting('synchronous_commit') AS s"))[0]["s"] == "on"
    [row] = await fetch(dsn, "SELECT options FROM bulkdedupe.runs")
    options = json.loads(row["options"])
    assert (options["order"], options["synchronous_commit"]) == (order, choice)


async def test_stop_while_the_pump_waits_for_room_is_a_clean_interrupt() -> None:
    # Found by the interleaving test (SIGTERM right after a resume started, exit 4): the only
    # decider left on a stop (Stopping, from a retried group's batch) while the pump waited for
    # room in the stream; the pump's send raised BrokenResourceError, an internal error.
    spool: Spool[WorkItem] = Spool()
    for seq in range(5):
        await spool.put(WorkItem(0, seq, (), None))
    send, recv = anyio.create_memory_object_stream[WorkItem](1)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(pipeline._pump, spool, send, stop)
        with recv:
            await recv.receive()
            await anyio.wait_all_tasks_blocked()  # the pump waits: the buffer is full
            stop.set()
        # the consumer has left; the pump must end quietly, not raise
    # without a stop, consumers gone is a bug, and says so
    send2, recv2 = anyio.create_memory_object_stream[WorkItem](0)
    recv2.close()
    with send2, pytest.raises(anyio.BrokenResourceError):
        await pipeline._send_unless_stopping(send2, WorkItem(0, 0, (), None), anyio.Event())
