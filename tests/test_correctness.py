"""Issue 9: the engine's edges under hostile data and live traffic, each pinned against real
PostgreSQL — a group that can never be placed, skipped groups and the resume, a survivor that
vanishes mid-batch, per-group errors, the final status, and how bugs are reported."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

from bulkdedupe import pipeline, state
from bulkdedupe.errors import InternalError, TargetError
from bulkdedupe.worker import Worker
from tests.factories import apply_cfg, audit_rows, connect, duplicate_groups, run_record
from tests.faults_support import check_audit_of, slow_down_renames
from tests.helpers import create_payments, execute, fetch, fetch_keys, fetchval

pytestmark = pytest.mark.anyio

SKIPPED = "SELECT group_key, reason, rows, attempts, error FROM bulkdedupe.skipped ORDER BY 1"


def pairs(n: int, prefix: str = "pair") -> list[tuple[str]]:
    return [(f"{prefix}-{i:03d}",) for i in range(n) for _ in range(2)]


# --- 1. a group whose losers cannot be renamed ends ----------------------------------------


async def test_group_whose_losers_fit_no_value_ends_with_each_row_decided_once(dsn: str) -> None:
    # varchar(8) and 12-digit ids: "-<pk>" alone is 13 characters, so no loser of "aa" can be
    # renamed; with 149 losers and --batch-size 50 the group takes several transactions. Each
    # must decide new rows: the run ends, "bb" (small ids, so it fits) is renamed.
    await create_payments(dsn, rows=[("bb",)] * 3, key_type="varchar(8)")
    await execute(
        dsn,
        "ALTER SEQUENCE payments_id_seq RESTART WITH 100000000000",
        "INSERT INTO payments (transaction_id, created_at) "
        "SELECT 'aa', now() FROM generate_series(1, 150)",
    )
    before = await fetch_keys(dsn)
    cfg = connect(dsn)

    with anyio.fail_after(60):
        summary = await pipeline.run(cfg, apply_cfg(batch_size=50, concurrency=2))

    assert summary.status == "incomplete"
    assert summary.rows_renamed == 2  # bb-2, bb-3: the starving group behind it is done
    assert summary.skipped == {"no_unique_value_fits": 149}  # every loser counted once
    assert summary.batches <= 30  # each decides new rows (it was ~10,000 and counting)
    assert summary.skipped_groups_by_reason == {"no_unique_value_fits": 1}
    [(key, reason, rows, attempts, error)] = await fetch(dsn, SKIPPED)
    assert (key, reason, rows, attempts) == ("aa", "no_unique_value_fits", 149, 1)
    assert "8 characters" in error
    assert await check_audit_of(dsn, before) == 2


# --- 2. skipped groups are on record, and the resume retries them ---------------------------


async def test_group_skipped_before_an_interruption_is_retried_by_the_resume(dsn: str) -> None:
    # The reported case: an application holds a group's row, the tool skips it (lock_timeout),
    # the run is stopped an item later. The checkpoint may pass the skipped group; the resume
    # must still retry it, and say "completed" only once it is resolved.
    await create_payments(dsn, rows=pairs(200))
    before = await fetch_keys(dsn)
    app = await asyncpg.connect(dsn)
    await slow_down_renames(app, 0.003)
    tx = app.transaction()
    await tx.start()
    await app.execute("SELECT 1 FROM payments WHERE transaction_id = 'pair-000' FOR UPDATE")
    cfg = connect(dsn)
    # key order: its checkpoint moves item by item, so it may pass the skipped group (heap
    # order checkpoints only at the end, and skips a held group in its key-order tail)
    run_cfg = apply_cfg(
        batch_size=10, concurrency=1, lock_timeout=0.1, max_retries=0, run_id="held", order="key"
    )
    stop = anyio.Event()

    async def stop_after_the_skip() -> None:
        probe = await asyncpg.connect(dsn)
        try:
            while True:
                await anyio.sleep(0.05)
                if await probe.fetchval("SELECT to_regclass('bulkdedupe.skipped')") and (
                    await probe.fetchval("SELECT count(*) FROM bulkdedupe.skipped")
                ):
                    await anyio.sleep(0.3)  # an item or more later
                    stop.set()
                    return
        finally:
            await probe.close()

    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_after_the_skip)
                summary = await pipeline.run(cfg, run_cfg, stop=stop)
        assert summary.status == "interrupted"
        assert summary.skipped_groups == 1
        assert summary.retry_command is not None
        assert [r["group_key"] for r in await fetch(dsn, SKIPPED)] == ["pair-000"]
        assert (await run_record(dsn, "held"))["status"] == "interrupted"
    finally:
        await tx.rollback()
        await app.close()

    with anyio.fail_after(60):
        resumed = await pipeline.run(cfg, run_cfg)
    assert resumed.status == "completed"
    assert resumed.skipped_groups == 0
    assert await fetch(dsn, SKIPPED) == []
    assert await duplicate_groups(dsn) == {}
    assert await check_audit_of(dsn, before) == 200


async def test_runs_and_status_show_the_skipped_groups(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("a",), ("b",), ("b",)], key_type="varchar(1)")
    cfg = connect(dsn)
    summary = await pipeline.run(cfg, apply_cfg())
    assert summary.status == "incomplete"

    from bulkdedupe import control, list_runs

    runs = await list_runs(cfg)
    assert [(r.run_id, r.status, r.skipped_groups) for r in runs.runs] == [
        (summary.run_id, "incomplete", 2)
    ]
    st = await control.status(cfg, summary.run_id)
    assert (st.status, st.skipped_groups) == ("incomplete", 2)
    assert "groups skipped" in st.to_text()


# --- 3. a survivor that vanishes between the batch's read and its UPDATE --------------------


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM payments WHERE id = 1",
        "UPDATE payments SET transaction_id = 'moved' WHERE id = 1",
    ],
    ids=["survivor-deleted", "survivor-rekeyed"],
)
@pytest.mark.parametrize("order", ["heap", "key"])
async def test_survivor_changed_mid_batch_never_leaves_the_value_unheld(
    dsn: str, change: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=[("tx-42",), ("tx-42",), ("tx-42",), *pairs(5)])
    original = Worker._assign
    fired: list[bool] = []

    async def assign_after_the_application(self: Worker, conn: Any, plans: Any) -> Any:
        # The batch has read the group (survivor: id 1); the application commits its change
        # now, before the rename statement takes its snapshot.
        if not fired and any(p.key == "tx-42" for p in plans):
            fired.append(True)
            await execute(dsn, change)
        return await original(self, conn, plans)

    rename_some = Worker._rename_some

    async def rename_after_the_application(self: Worker, conn: Any, renames: Any) -> Any:
        # heap order: the chunk has its locks and values; the UPDATE comes next
        if not fired and any(r.group == "tx-42" for r in renames):
            fired.append(True)
            await execute(dsn, change)
        return await rename_some(self, conn, renames)

    monkeypatch.setattr(Worker, "_assign", assign_after_the_application)
    monkeypatch.setattr(Worker, "_rename_some", rename_after_the_application)
    summary = await pipeline.run(connect(dsn), apply_cfg(concurrency=1, order=order))

    assert fired
    assert summary.status == "completed"
    if order == "key":
        assert summary.retries >= 1  # the stale batch was rolled back and decided again
    # heap order: the chunk's UPDATE renamed none of the group (its survivor check), and the
    # group was decided again under its lock by a key-order batch
    holders = await fetch(dsn, "SELECT id FROM payments WHERE transaction_id = 'tx-42'")
    assert [r["id"] for r in holders] == [2]  # the new survivor, unchanged
    assert await fetchval(dsn, "SELECT transaction_id FROM payments WHERE id = 3") == "tx-42-3"
    assert ("2", "tx-42", "tx-42-2") not in await audit_rows(dsn, summary.run_id)
    assert await duplicate_groups(dsn) == {}


@pytest.mark.parametrize("order", ["heap", "key"])
async def test_group_single_by_its_turn_is_counted_once_and_left_alone(
    dsn: str, order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The application deletes one row of "tx-gone" after the scan found the group and before
    # its worker decides it: the group is no longer duplicated, its row is left as it is, and
    # it is counted once under its reason; the groups beside it are renamed.
    await create_payments(dsn, rows=[("tx-gone",), ("tx-gone",), *pairs(4)])
    fired: list[bool] = []

    def deleting_first(original: Any) -> Any:
        async def wrapper(self: Worker, item: Any, *args: Any) -> Any:
            if not fired and any(g.key == "tx-gone" for g in item.groups):
                fired.append(True)
                await execute(dsn, "DELETE FROM payments WHERE id = 2")
            return await original(self, item, *args)

        return wrapper

    monkeypatch.setattr(Worker, "handle", deleting_first(Worker.handle))  # key order
    monkeypatch.setattr(Worker, "decide", deleting_first(Worker.decide))  # heap order
    summary = await pipeline.run(connect(dsn), apply_cfg(concurrency=1, order=order))

    assert fired
    assert summary.status == "completed"
    assert summary.skipped == {"no_longer_duplicate": 1}
    assert summary.rows_renamed == 4
    assert await fetchval(dsn, "SELECT transaction_id FROM payments WHERE id = 1") == "tx-gone"
    assert all(pk != "1" for pk, _, _ in await audit_rows(dsn, summary.run_id))
    assert await duplicate_groups(dsn) == {}


# --- 4. per-group errors stay per group -----------------------------------------------------


async def test_trigger_refusing_a_rename_skips_its_group_only(dsn: str) -> None:
    await create_payments(dsn, rows=[("settled",)] * 3 + pairs(20))
    await execute(
        dsn,
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.transaction_id = 'settled' THEN
                RAISE EXCEPTION 'payment % is settled: its provider id may not change', OLD.id;
            END IF;
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER refuse BEFORE UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    cfg = connect(dsn)

    summary = await pipeline.run(cfg, apply_cfg(concurrency=1))

    assert summary.status == "incomplete"
    assert summary.rows_renamed == 20  # every other group, in the same batch, is done
    assert summary.skipped == {"trigger_error": 2}
    assert summary.skipped_groups_by_reason == {"trigger_error": 1}
    [(key, reason, _, _, error)] = await fetch(dsn, SKIPPED)
    assert (key, reason) == ("settled", "trigger_error")
    assert "is settled: its provider id may not change" in error  # the operator sees why
    assert await duplicate_groups(dsn) == {"settled": 3}


async def test_index_row_too_large_for_a_new_value_skips_its_group_only(dsn: str) -> None:
    # SQLSTATE 54000 (program_limit_exceeded): the value fits the btree, value + "-<pk>" does
    # not. STORAGE EXTERNAL keeps the index entry uncompressed, so the limit is exact.
    await create_payments(dsn, rows=pairs(5), key_type="text", index=False)
    long = "".join(chr(65 + (i * 7) % 26) for i in range(2690))
    await execute(
        dsn,
        "ALTER TABLE payments ALTER COLUMN transaction_id SET STORAGE EXTERNAL",
        "CREATE INDEX payments_transaction_id_idx ON payments (transaction_id)",
        f"INSERT INTO payments (transaction_id) VALUES ('{long}'), ('{long}')",
    )

    summary = await pipeline.run(connect(dsn), apply_cfg(concurrency=1))

    assert summary.status == "incomplete"
    assert summary.rows_renamed == 5
    assert summary.skipped_groups_by_reason == {"program_limit_exceeded": 1}
    [(_, reason, _, _, error)] = await fetch(dsn, SKIPPED)
    assert reason == "program_limit_exceeded"
    assert "index row size" in error


# --- 8. the final status is always written --------------------------------------------------


async def test_final_status_written_when_the_audit_count_cannot_finish(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stands in for tens of millions of fresh audit rows: the count waits on a lock the test
    # holds on the audit table. The status must still be written, counted from the run's own
    # counters, within the count's budget.
    await create_payments(dsn, rows=pairs(30))
    blocker = await asyncpg.connect(dsn)
    tx = blocker.transaction()
    original = pipeline._skipped_on_record

    async def lock_the_audit_first(*args: Any, **kw: Any) -> Any:
        await tx.start()
        await blocker.execute("LOCK TABLE bulkdedupe.changes IN ACCESS EXCLUSIVE MODE")
        return await original(*args, **kw)

    monkeypatch.setattr(pipeline, "_skipped_on_record", lock_the_audit_first)
    monkeypatch.setattr(pipeline, "COUNT_TIMEOUT", "200ms")
    try:
        with anyio.fail_after(30):
            summary = await pipeline.run(connect(dsn), apply_cfg())
        record = await run_record(dsn, summary.run_id)
    finally:
        await tx.rollback()
        await blocker.close()
    assert summary.status == "completed"
    assert record["status"] == "completed"
    assert record["renamed"] == 30
    assert record["finished_at"] is not None


async def test_error_after_the_run_is_registered_marks_it_failed_not_running(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=pairs(3))

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "plan_ranges", broken)
    with pytest.raises(InternalError, match="internal error RuntimeError: boom"):
        await pipeline.run(connect(dsn), apply_cfg(run_id="broken"))
    assert (await run_record(dsn, "broken"))["status"] == "failed"
    monkeypatch.undo()
    summary = await pipeline.run(connect(dsn), apply_cfg(run_id="broken"))  # lock released
    assert summary.status == "completed"
    assert summary.rows_renamed == 3


# --- 11. error plumbing ---------------------------------------------------------------------


async def test_bug_in_a_worker_is_an_internal_error_with_its_cause(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=pairs(3))

    async def bug(self: Worker, item: Any, *args: Any) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(Worker, "handle", bug)  # key order
    monkeypatch.setattr(Worker, "decide", bug)  # heap order (the default)
    with pytest.raises(InternalError, match="internal error ValueError: a bug") as info:
        await pipeline.run(connect(dsn), apply_cfg())
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.exit_code == 4


async def test_operator_error_from_a_task_is_not_chained_to_itself(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await create_payments(dsn, rows=pairs(3))

    async def refuse(self: Worker, item: Any, *args: Any) -> None:
        raise TargetError("the table changed")

    monkeypatch.setattr(Worker, "handle", refuse)  # key order
    monkeypatch.setattr(Worker, "decide", refuse)  # heap order (the default)
    with pytest.raises(TargetError, match="the table changed") as info:
        await pipeline.run(connect(dsn), apply_cfg())
    assert info.value.__cause__ is not info.value
    assert state.RESUMABLE  # the run itself was saved as failed, resumable


# --- SIGTERM outside a run's own handler ----------------------------------------------------


async def test_sigterm_while_no_run_handles_it_is_an_interruption_exit_130(dsn: str) -> None:
    # `report` streams the audit trail with no signal handler of its own; stdout is a pipe
    # the test never reads, so the process blocks writing to it when the signal comes.
    import signal

    from tests.faults_support import cli_args
    from tests.helpers import REPO_ROOT

    await create_payments(dsn, rows=pairs(3000))
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=1000))
    assert summary.rows_renamed == 3000
    args = cli_args("report", "--run-id", summary.run_id, "--format", "csv", "-d", dsn)
    async with await anyio.open_process(args, cwd=REPO_ROOT) as proc:
        await anyio.sleep(3)  # started, connected, and blocked on the full pipe
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            assert proc.stderr is not None
            err = (await proc.stderr.receive()).decode()
            await proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
