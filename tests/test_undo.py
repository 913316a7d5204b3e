"""`undo` against real PostgreSQL: after `run --apply` then `undo --apply` the table is
byte-for-byte what it was; rows changed since are reported and kept; a unique index on the key
stops the undo before it changes anything; bad run ids are refused with one clear line.

Table state is compared with plain SQL checksums and reads, never with undo's own counts alone.
"""

from __future__ import annotations

import json

import pytest

from bulkdedupe import (
    ConnectConfig,
    RunConfig,
    RunStateError,
    ScanConfig,
    TargetError,
    UndoConfig,
    open_report,
    run,
    undo,
)
from bulkdedupe.batching import LockBudget
from tests.helpers import (
    create_payments,
    execute,
    fetch,
    fetch_keys,
    fetchval,
    run_cli,
    table_checksum,
)

pytestmark = pytest.mark.anyio

APPLY = RunConfig(apply=True, batch_size=3, concurrency=2, scan=ScanConfig(page_size=4))

# Groups of 2 and 3, NULLs, unicode (composed and decomposed é are different values), trailing
# blanks and case look-alikes (all different to PostgreSQL), an emoji.
ROWS = [
    ("a",),
    ("a",),
    ("a",),
    ("a ",),
    ("A",),
    (None,),
    ("café",),
    ("café",),
    ("cafe\u0301",),
    (None,),
    ("💳-42",),
    ("💳-42",),
    ("💳-42",),
    ("solo",),
    ("a ",),
]


async def runs_count(dsn: str) -> int:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM bulkdedupe.runs")
    return int(rows[0]["n"])


async def audit(cfg: ConnectConfig, run_id: str) -> list[tuple[str, str, str]]:
    async with open_report(cfg, run_id) as rep:
        return [(c.pk, c.old_value, c.new_value) async for c in rep]


@pytest.mark.parametrize("key_type", ["varchar(64)", "char(12)"])
async def test_run_then_undo_restores_the_table_exactly(dsn: str, key_type: str) -> None:
    await create_payments(dsn, rows=ROWS, key_type=key_type)
    original = await table_checksum(dsn)
    cfg = ConnectConfig(database_url=dsn)
    summary = await run(cfg, APPLY)
    assert summary.rows_renamed >= 6
    renamed = await table_checksum(dsn)
    assert renamed != original

    preview = await undo(cfg, UndoConfig(run_id=summary.run_id, batch_size=2))
    assert await table_checksum(dsn) == renamed  # a dry run writes nothing...
    assert preview.run_id is None
    assert await runs_count(dsn) == 1  # ...not even a run record
    assert preview.restored == summary.rows_renamed

    result = await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True, batch_size=2))

    assert result.status == "completed"
    assert result.restored == summary.rows_renamed
    assert (result.changed_since, result.deleted_since) == (0, 0)
    assert result.batches >= 3  # small batches, one transaction each
    assert await table_checksum(dsn) == original
    # Audited as a run of its own, with old and new swapped.
    assert result.run_id is not None
    rows = await fetch(
        dsn, "SELECT command, status, renamed FROM bulkdedupe.runs WHERE run_id = $1", result.run_id
    )
    assert [tuple(r) for r in rows] == [("undo", "completed", summary.rows_renamed)]
    forward = await audit(cfg, summary.run_id)
    backward = await audit(cfg, result.run_id)
    assert sorted(backward) == sorted((pk, new, old) for pk, old, new in forward)

    # Undoing the same run again finds every row already restored and changes nothing.
    again = await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True))
    assert (again.restored, again.already_restored) == (0, summary.rows_renamed)
    assert await table_checksum(dsn) == original


async def test_rows_changed_since_are_reported_not_overwritten(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    cfg = ConnectConfig(database_url=dsn)
    summary = await run(cfg, APPLY)
    after_run = await fetch_keys(dsn)
    changes = await audit(cfg, summary.run_id)
    (edited, _, _), (deleted, _, _) = changes[0], changes[1]
    # The application moves on: one renamed row gets a new key, another is deleted.
    await execute(
        dsn,
        f"UPDATE payments SET transaction_id = 'set-by-app' WHERE id = {int(edited)}",
        f"DELETE FROM payments WHERE id = {int(deleted)}",
    )

    result = await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True, batch_size=2))

    assert result.changed_since == 1
    assert result.changed_sample == (edited,)
    assert result.deleted_since == 1
    assert result.restored == len(changes) - 2
    keys = await fetch_keys(dsn)
    assert keys[int(edited)] == "set-by-app"  # kept, not overwritten
    assert int(deleted) not in keys
    for pk, old, _ in changes[2:]:
        assert keys[int(pk)] == old
    untouched = {pk for pk in after_run if str(pk) not in {c[0] for c in changes}}
    assert all(keys[pk] == after_run[pk] for pk in untouched)


async def test_undo_refused_while_a_unique_index_exists(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    cfg = ConnectConfig(database_url=dsn)
    summary = await run(cfg, APPLY)
    await execute(dsn, "CREATE UNIQUE INDEX payments_txn_uq ON payments (transaction_id)")
    checksum = await table_checksum(dsn)

    with pytest.raises(TargetError, match="payments_txn_uq") as err:
        await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True))
    cli = run_cli("undo", "-d", dsn, "--run-id", summary.run_id, "--apply")
    dry = run_cli("undo", "-d", dsn, "--run-id", summary.run_id, "--format", "json")

    assert "DROP INDEX CONCURRENTLY" in str(err.value)
    assert await table_checksum(dsn) == checksum
    assert await runs_count(dsn) == 1  # no undo run was even registered
    assert cli.returncode == 3
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1, cli.stderr
    assert "payments_txn_uq" in lines[0]
    # The dry run still shows what would be restored, and exits 3: --apply would be refused.
    assert dry.returncode == 3
    out = json.loads(dry.stdout)
    assert out["restored"] == summary.rows_renamed
    assert "payments_txn_uq" in out["blocked_by"]
    assert await table_checksum(dsn) == checksum


async def test_unknown_run_undo_of_undo_and_missing_state_schema_are_refused(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    cfg = ConnectConfig(database_url=dsn)

    with pytest.raises(RunStateError, match="does not exist"):
        await undo(cfg, UndoConfig(run_id="nope"))
    assert (await fetch(dsn, "SELECT to_regnamespace('bulkdedupe') AS s"))[0]["s"] is None

    summary = await run(cfg, APPLY)
    first = await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True))
    assert first.run_id is not None
    checksum = await table_checksum(dsn)
    with pytest.raises(RunStateError, match="itself an undo"):
        await undo(cfg, UndoConfig(run_id=first.run_id, apply=True))
    unknown = run_cli("undo", "-d", dsn, "--run-id", "20000101T000000Z-000000", "--apply")

    assert unknown.returncode == 3
    lines = unknown.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "not found" in lines[0]
    assert "bulkdedupe runs" in lines[0]
    assert await table_checksum(dsn) == checksum


LOCK_SLOTS = """
SELECT current_setting('max_locks_per_transaction')::int
       * (current_setting('max_connections')::int
          + current_setting('max_prepared_transactions')::int)"""


async def test_undo_batches_stay_under_the_lock_table_ceiling(dsn: str) -> None:
    """An undo batch holds two advisory locks per change (the old and the restored value):
    a --batch-size bigger than the server's lock table allows is cut down to the ceiling."""
    ceiling = LockBudget(int(await fetchval(dsn, LOCK_SLOTS))).ceiling(1)
    assert ceiling is not None
    if ceiling > 5000:
        pytest.skip(f"this server's lock table allows {ceiling}-row batches: too big to fill")
    renames = ceiling + ceiling // 2
    await create_payments(dsn, rows=[(f"k{i // 2:05d}",) for i in range(2 * renames)])
    original = await table_checksum(dsn)
    cfg = ConnectConfig(database_url=dsn)
    summary = await run(cfg, RunConfig(apply=True))
    assert summary.rows_renamed == renames

    result = await undo(cfg, UndoConfig(run_id=summary.run_id, apply=True, batch_size=10**6))

    assert result.status == "completed"
    assert await table_checksum(dsn) == original
    # the audit rows one transaction wrote share its xmin
    sizes = [
        r["n"]
        for r in await fetch(
            dsn,
            "SELECT count(*) AS n FROM bulkdedupe.changes WHERE run_id = $1 GROUP BY xmin::text",
            result.run_id,
        )
    ]
    assert sum(sizes) == renames
    assert max(sizes) <= ceiling, sizes
