"""`enforce` against real PostgreSQL: the UNIQUE index is built CONCURRENTLY, an invalid leftover
is replaced, late duplicates are renamed and the build converges, an existing index is left
alone, the constraint attaches, and no invalid index survives a failure or an interrupt.

What the catalog and the table say is read with plain SQL, never from enforce's own result.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import asyncpg
import pytest

from bulkdedupe import (
    ConnectConfig,
    EnforceConfig,
    RunConfig,
    ScanConfig,
    TargetError,
    enforce,
    open_report,
    run,
    verify,
)
from bulkdedupe.enforce import default_index_name
from tests.helpers import create_payments, execute, fetch, fetch_keys, run_cli, table_checksum

pytestmark = pytest.mark.anyio

INDEX = "payments_transaction_id_key"
# Two groups (a x2, c x3), a singleton and NULLs (never duplicates): 3 rows to rename.
ROWS = [("a",), ("a",), ("b",), (None,), ("c",), ("c",), ("c",), (None,)]
DEDUPE = RunConfig(apply=True, batch_size=2, concurrency=2, scan=ScanConfig(page_size=3))


async def index_row(dsn: str, name: str = INDEX) -> asyncpg.Record | None:
    rows = await fetch(
        dsn,
        """SELECT c.oid, i.indisvalid, i.indisunique, pg_get_indexdef(c.oid) AS def
           FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid WHERE c.relname = $1""",
        name,
    )
    return rows[0] if rows else None


async def invalid_indexes(dsn: str) -> list[str]:
    rows = await fetch(
        dsn,
        """SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE i.indrelid = 'payments'::regclass AND NOT i.indisvalid""",
    )
    return [r["relname"] for r in rows]


async def duplicate_is_rejected(dsn: str) -> bool:
    """Insert a copy of an existing key (rolled back either way)."""
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "INSERT INTO payments (transaction_id) "
                "SELECT transaction_id FROM payments WHERE transaction_id IS NOT NULL LIMIT 1"
            )
        except asyncpg.UniqueViolationError:
            return True
        finally:
            await tx.rollback()
        return False
    finally:
        await conn.close()


async def poll(conn: asyncpg.Connection, query: str) -> None:
    """Wait until `query` returns true."""
    while not await conn.fetchval(query):  # noqa: ASYNC110 - the server's state has no event
        await anyio.sleep(0.05)


async def failed_concurrent_build(dsn: str) -> None:
    """What a failed migration leaves behind: CREATE UNIQUE INDEX CONCURRENTLY over duplicates
    fails and leaves an INVALID index."""
    with pytest.raises(asyncpg.UniqueViolationError):
        await execute(dsn, f"CREATE UNIQUE INDEX CONCURRENTLY {INDEX} ON payments (transaction_id)")
    assert await invalid_indexes(dsn) == [INDEX]


async def test_invalid_leftover_index_is_dropped_and_rebuilt(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    await failed_concurrent_build(dsn)
    cfg = ConnectConfig(database_url=dsn)
    await run(cfg, DEDUPE)
    keys_before = await fetch_keys(dsn)

    result = await enforce(cfg)

    assert result.status == "created"
    assert result.dropped_invalid == 1
    assert [a.outcome for a in result.attempts] == ["built"]
    row = await index_row(dsn)
    assert row is not None
    assert row["indisvalid"]
    assert row["indisunique"]
    assert row["def"].endswith("USING btree (transaction_id)")
    assert await invalid_indexes(dsn) == []
    assert await duplicate_is_rejected(dsn)
    assert result.duplicate_rejected is True
    assert await fetch_keys(dsn) == keys_before  # nothing to rename: no data touched
    assert {p for p, _ in result.phases} >= {"inspect", "drop invalid index", "prove"}


async def test_invalid_leftover_with_duplicates_converges_in_one_call(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    await failed_concurrent_build(dsn)
    cfg = ConnectConfig(database_url=dsn)

    result = await enforce(cfg, EnforceConfig(dedupe=DEDUPE))

    assert result.status == "created"
    first, second = result.attempts
    assert first.outcome == "duplicates"
    assert first.rows_renamed == 3
    assert second.outcome == "built"
    assert result.dropped_invalid == 2  # the leftover, then the one the first attempt left
    assert await invalid_indexes(dsn) == []
    assert (await verify(cfg)).ok
    assert await duplicate_is_rejected(dsn)


async def test_duplicates_arriving_after_the_dedupe_are_renamed_and_enforce_converges(
    dsn: str,
) -> None:
    await create_payments(dsn, rows=ROWS)
    cfg = ConnectConfig(database_url=dsn)
    await run(cfg, DEDUPE)
    # Live traffic after the dedupe: copies of an existing key and a new duplicated value.
    await execute(
        dsn,
        "INSERT INTO payments (transaction_id) VALUES ('a'), ('b'), ('new'), ('new'), ('new')",
    )
    late = await fetch_keys(dsn)

    result = await enforce(cfg, EnforceConfig(dedupe=DEDUPE))

    assert result.status == "created"
    assert [a.outcome for a in result.attempts] == ["duplicates", "built"]
    dedupe_run = result.attempts[0].dedupe_run_id
    assert dedupe_run is not None
    assert result.attempts[0].rows_renamed == 4  # one 'a', one 'b', two 'new'
    assert (await verify(cfg)).ok
    assert await invalid_indexes(dsn) == []
    assert await duplicate_is_rejected(dsn)
    # The late renames are audited under the dedupe run, exactly the rows that changed.
    now = await fetch_keys(dsn)
    changed = {pk: (late[pk], now[pk]) for pk in now if now[pk] != late[pk]}
    async with open_report(cfg, dedupe_run) as rep:
        audit = {int(c.pk): (c.old_value, c.new_value) async for c in rep}
    assert audit == changed
    assert len(audit) == 4


async def test_already_enforced_is_a_no_op(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("b",), (None,)])
    await execute(dsn, f"CREATE UNIQUE INDEX {INDEX} ON payments (transaction_id)")
    before = await index_row(dsn)
    checksum = await table_checksum(dsn)
    cfg = ConnectConfig(database_url=dsn)

    result = await enforce(cfg)

    assert result.status == "already_enforced"
    assert result.attempts == ()
    assert result.dropped_invalid == 0
    assert result.duplicate_rejected is True
    after = await index_row(dsn)
    assert after is not None
    assert before is not None
    assert after["oid"] == before["oid"]  # the very same index, not rebuilt
    assert await table_checksum(dsn) == checksum  # the proof was rolled back
    rows = await fetch(dsn, "SELECT to_regnamespace('bulkdedupe') IS NULL AS absent")
    assert rows[0]["absent"]  # no dedupe ran, so no state schema either


async def test_index_of_that_name_with_another_definition_is_refused(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("b",)])
    await execute(dsn, f"CREATE INDEX {INDEX} ON payments (transaction_id, id)")
    before = await index_row(dsn)
    cfg = ConnectConfig(database_url=dsn)

    with pytest.raises(TargetError, match="another definition") as err:
        await enforce(cfg)

    assert "--index-name" in str(err.value)
    after = await index_row(dsn)
    assert after is not None
    assert before is not None
    assert after["oid"] == before["oid"]


async def test_constraint_is_attached_then_left_alone(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    cfg = ConnectConfig(database_url=dsn)
    await run(cfg, DEDUPE)
    ecfg = EnforceConfig(constraint=True, index_name="payments_txn_unique")

    first = await enforce(cfg, ecfg)
    second = await enforce(cfg, ecfg)

    assert (first.status, first.constraint_status) == ("created", "attached")
    assert (second.status, second.constraint_status) == ("already_enforced", "already_attached")
    rows = await fetch(
        dsn,
        """SELECT con.conname, con.contype::text, ic.relname AS index_name
           FROM pg_constraint con JOIN pg_class ic ON ic.oid = con.conindid
           WHERE con.conrelid = 'payments'::regclass AND con.contype = 'u'""",
    )
    assert [tuple(r) for r in rows] == [("payments_txn_unique", "u", "payments_txn_unique")]
    assert await duplicate_is_rejected(dsn)


async def test_not_converging_leaves_no_index_and_exits_1(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    checksum = await table_checksum(dsn)

    cli = run_cli("enforce", "-d", dsn, "--max-attempts", "1", "--format", "json")

    assert cli.returncode == 1, cli.stderr
    out = json.loads(cli.stdout)
    assert out["status"] == "not_converged"
    assert [a["outcome"] for a in out["attempts"]] == ["duplicates"]
    assert await index_row(dsn) is None  # the invalid index of the failed build is gone
    assert await table_checksum(dsn) == checksum  # the last attempt is not followed by renames


async def test_cli_exit_codes_success_and_environment_error(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    await execute(dsn, "CREATE INDEX clash ON payments (lower(transaction_id))")

    refused = run_cli("enforce", "-d", dsn, "--index-name", "clash")
    ok = run_cli("enforce", "-d", dsn, "--constraint", "--format", "json")

    assert refused.returncode == 3
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("bulkdedupe: error:")
    assert "clash" in lines[0]
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["ok"]
    assert out["index"] == INDEX
    assert out["constraint_status"] == "attached"
    assert [a["outcome"] for a in out["attempts"]] == ["duplicates", "built"]
    assert {p["phase"] for p in out["phases"]} >= {"build (attempt 1)", "dedupe (attempt 1)"}


async def test_interrupted_build_leaves_no_invalid_index(dsn: str) -> None:
    """A build waiting behind an open writer is cancelled by `stop`; the index it left is
    dropped before enforce returns."""
    await create_payments(dsn, rows=[("a",), ("b",)])
    cfg = ConnectConfig(database_url=dsn)
    blocker = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    stop = anyio.Event()
    results: list[Any] = []

    async def go() -> None:
        results.append(await enforce(cfg, stop=stop))

    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("UPDATE payments SET amount = amount WHERE id = 1")
        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            with anyio.fail_after(30):
                # The build is in the catalog (invalid) and waits for our writer to finish.
                await poll(
                    watcher,
                    "SELECT count(*) > 0 FROM pg_stat_progress_create_index "
                    "WHERE phase = 'waiting for writers before build'",
                )
                assert await invalid_indexes(dsn) == [INDEX]
                stop.set()
                # Let go of the table only once the server has cancelled the build.
                await poll(
                    watcher,
                    "SELECT count(*) = 0 FROM pg_stat_activity "
                    "WHERE query LIKE 'CREATE UNIQUE INDEX%' AND state = 'active'",
                )
                await tx.rollback()
    finally:
        await blocker.close()
        await watcher.close()

    (result,) = results
    assert result.status == "interrupted"
    assert [a.outcome for a in result.attempts] == ["interrupted"]
    assert await index_row(dsn) is None


def test_default_index_name_fits_postgres_limit() -> None:
    assert default_index_name("payments", "transaction_id") == INDEX
    long = default_index_name("t" * 60, "ключ")
    assert long.endswith("_key")
    assert len(long.encode()) <= 63
