"""Scoped uniqueness (issue #11): `--scope merchant_id` makes (merchant_id, transaction_id)
what must be unique. Groups are rows equal on the scope and the key; the same key in two scopes
is no duplicate; NULL in the scope is never one; only the key is rewritten. The keyset scan walks
an index whose leading columns are the scope and the key, in either order. Real PostgreSQL."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bulkdedupe import catalog, pipeline
from bulkdedupe.config import parse_keep
from bulkdedupe.errors import RunStateError
from tests.factories import apply_cfg, connect
from tests.faults_support import check_audit_of, cli, spawn, wait_until, wait_until_tool_gone
from tests.helpers import execute, fetch, fetch_keys

pytestmark = pytest.mark.anyio

SCOPE = ("merchant_id",)


async def scoped_table(
    dsn: str,
    *,
    index: str = "(merchant_id, transaction_id)",
    pk: str = "PRIMARY KEY (id)",
    nulls: bool = True,
) -> None:
    """payments(id, merchant_id, transaction_id, created_at): 'tx-<n>' repeats within and across
    merchants; merchant NULL rows share a key too (never duplicates)."""
    await execute(
        dsn,
        f"""CREATE TABLE payments (
            id bigserial, merchant_id int, transaction_id varchar(64),
            created_at timestamptz NOT NULL, {pk})""",
        f"CREATE INDEX payments_scope_idx ON payments {index}" if index else "SELECT 1",
        """INSERT INTO payments (merchant_id, transaction_id, created_at)
        SELECT i % 5, 'tx-' || (i % 97),
               timestamptz '2026-01-01' + (i * 7919 % 1000) * interval '1 min'
        FROM generate_series(1, 1500) i""",
        """INSERT INTO payments (merchant_id, transaction_id, created_at)
        SELECT NULL, 'tx-1', now() FROM generate_series(1, 4)"""
        if nulls
        else "SELECT 1",
        # one key in one scope only: unique as (merchant, key) although 'solo' is not unique
        """INSERT INTO payments (merchant_id, transaction_id, created_at)
        VALUES (1, 'solo', now()), (2, 'solo', now())""",
        "ANALYZE payments",
    )


async def expected(dsn: str, order: str = "id") -> dict[int, str]:
    """id -> old value of every row a correct scoped run renames (first by `order` stays)."""
    rows = await fetch(
        dsn,
        f"""SELECT id, transaction_id FROM (
            SELECT *, row_number() OVER (PARTITION BY merchant_id, transaction_id
                                         ORDER BY {order}, id) AS rn
            FROM payments WHERE merchant_id IS NOT NULL AND transaction_id IS NOT NULL) s
        WHERE rn > 1""",
    )
    return {r["id"]: r["transaction_id"] for r in rows}


async def scoped_duplicates(dsn: str) -> int:
    rows = await fetch(
        dsn,
        """SELECT count(*) AS n FROM (SELECT 1 FROM payments
        WHERE merchant_id IS NOT NULL AND transaction_id IS NOT NULL
        GROUP BY merchant_id, transaction_id HAVING count(*) > 1) d""",
    )
    return int(rows[0]["n"])


@pytest.mark.parametrize(
    "index", ["(merchant_id, transaction_id)", "(transaction_id, merchant_id)"]
)
async def test_scoped_run_renames_within_each_scope_only(dsn: str, index: str) -> None:
    await scoped_table(dsn, index=index)
    before = await fetch_keys(dsn)
    losers = await expected(dsn, order="created_at DESC")
    cfg = connect(dsn, scope=SCOPE)

    report = await pipeline.scan(cfg)
    assert report.index == "payments_scope_idx"  # the scope's index, either column order
    assert report.rows_to_rename == len(losers)

    summary = await pipeline.run(cfg, apply_cfg(keep=parse_keep("created_at desc")))

    assert summary.status == "completed"
    assert summary.rows_renamed == len(losers)
    after = await fetch_keys(dsn)
    assert {pk for pk in after if after[pk] != before[pk]} == set(losers)
    assert all(after[pk] == f"{old}-{pk}" for pk, old in losers.items())
    assert await scoped_duplicates(dsn) == 0
    # NULL scope: never a duplicate; one key in two scopes: untouched
    nulls = await fetch(dsn, "SELECT transaction_id FROM payments WHERE merchant_id IS NULL")
    assert [r[0] for r in nulls] == ["tx-1"] * 4
    solo = await fetch(dsn, "SELECT transaction_id FROM payments WHERE transaction_id = 'solo'")
    assert len(solo) == 2
    assert await check_audit_of(dsn, before) == len(losers)
    code, out, err = await cli("verify", "--scope", "merchant_id", "-d", dsn)
    assert code == 0, out + err


async def test_scoped_with_a_composite_primary_key_containing_the_scope(dsn: str) -> None:
    # the shape a partitioned payments table takes: PRIMARY KEY (id, merchant_id)
    await scoped_table(dsn, pk="PRIMARY KEY (id, merchant_id)", nulls=False)
    losers = await expected(dsn)
    summary = await pipeline.run(connect(dsn, scope=SCOPE), apply_cfg())
    assert summary.rows_renamed == len(losers)
    after = {r["id"]: r["transaction_id"] for r in await fetch(dsn, "SELECT * FROM payments")}
    merchant = {r["id"]: r["merchant_id"] for r in await fetch(dsn, "SELECT * FROM payments")}
    assert all(after[pk] == f"{old}-{pk}-{merchant[pk]}" for pk, old in losers.items())
    assert await scoped_duplicates(dsn) == 0


async def test_scope_group_larger_than_a_batch_is_worked_off_in_chunks(dsn: str) -> None:
    await scoped_table(dsn)
    await execute(
        dsn,
        """INSERT INTO payments (merchant_id, transaction_id, created_at)
        SELECT 1 + i % 2, 'N/A', now() FROM generate_series(1, 1200) i""",
    )
    before = await fetch_keys(dsn)
    losers = await expected(dsn)
    summary = await pipeline.run(connect(dsn, scope=SCOPE), apply_cfg(batch_size=100))
    assert summary.rows_renamed == len(losers)
    holders = await fetch(
        dsn, "SELECT merchant_id FROM payments WHERE transaction_id = 'N/A' ORDER BY 1"
    )
    assert [r[0] for r in holders] == [1, 2]  # one survivor per scope
    assert await check_audit_of(dsn, before) == len(losers)


async def test_the_documented_scoped_advisory_lock_is_the_tools(dsn: str) -> None:
    """README, "The advisory lock": with --scope the locked text is the group as JSON."""
    await scoped_table(dsn)
    app = await asyncpg.connect(dsn)
    try:
        async with app.transaction():
            await app.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('public.payments.transaction_id:'"
                " || jsonb_build_array(3::text, 'tx-5'::text)::text, 0))"
            )
            summary = await pipeline.run(
                connect(dsn, scope=SCOPE), apply_cfg(lock_timeout=0.2, max_retries=0)
            )
        assert summary.status == "incomplete"
        assert summary.skipped_groups_by_reason == {"lock_timeout": 1}
        [(key,)] = await app.fetch("SELECT group_key FROM bulkdedupe.skipped")
        assert json.loads(key) == ["3", "tx-5"]
    finally:
        await app.close()
    resumed = await pipeline.run(connect(dsn, scope=SCOPE), apply_cfg(run_id=summary.run_id))
    assert resumed.status == "completed"
    assert resumed.rows_renamed > 0
    assert await scoped_duplicates(dsn) == 0


async def test_kill_9_then_resume_of_a_scoped_run_continues_after_its_checkpoint(
    dsn: str, tmp_path: Path
) -> None:
    await scoped_table(dsn)
    before = await fetch_keys(dsn)
    losers = await expected(dsn)
    run_id = "scoped"
    # key order: its checkpoint moves with the batches (heap order's only at the end)
    args = ["run", "--apply", "--scope", "merchant_id", "--run-id", run_id, "--order", "key"]
    args += ["--batch-size", "10", "--scan-page-size", "100", "-d", dsn]
    async with spawn(tmp_path, "killed", *args, "--max-rate", "250") as proc:
        conn = await asyncpg.connect(dsn)
        try:

            async def checkpointed() -> Any:
                if not await conn.fetchval("SELECT to_regclass('bulkdedupe.runs') IS NOT NULL"):
                    return None
                cp = await conn.fetchval(
                    "SELECT checkpoint FROM bulkdedupe.runs WHERE run_id = $1", run_id
                )
                return cp and json.loads(cp)["ranges"][0]["cursor"]

            cursor = await wait_until(checkpointed, "a checkpoint inside the key space", proc=proc)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await wait_until_tool_gone(conn)
        finally:
            await conn.close()
    assert json.loads(cursor)[1].startswith("tx-")  # the cursor is a group: [scope, key]

    code, out, err = await cli(*args, "--format", "json")

    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    assert await scoped_duplicates(dsn) == 0
    assert await check_audit_of(dsn, before) == len(losers)

    code, out, err = await cli("run", "--apply", "--run-id", run_id, "-d", dsn)
    assert code != 0  # a completed run is not resumed, with or without its scope
    await execute(
        dsn,
        "UPDATE bulkdedupe.runs SET status = 'interrupted'",
        "CREATE INDEX ON payments (transaction_id)",  # so an unscoped run could scan
    )
    with pytest.raises(RunStateError, match="grouped its duplicates with --scope merchant_id"):
        await pipeline.run(connect(dsn), apply_cfg(run_id=run_id))


async def test_scoped_scan_page_walks_the_scope_index_without_sorting(dsn: str) -> None:
    await scoped_table(dsn)
    await execute(dsn, "VACUUM ANALYZE payments")
    conn = await asyncpg.connect(dsn)
    try:
        target = await catalog.resolve(conn, connect(dsn, scope=SCOPE))
        q = target.queries("bulkdedupe")
        for lower, args in (
            ("none", (None, None, 200)),
            ("exclusive", ('["2", "tx-40"]', None, 200)),
        ):
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                await conn.execute(f"PREPARE page AS {q.scan_page(lower, False)}")  # type: ignore[arg-type]
                literals = ", ".join("NULL" if a is None else f"'{a}'" for a in args[:2])
                plan = json.loads(
                    await conn.fetchval(
                        f"EXPLAIN (FORMAT JSON) EXECUTE page({literals}, {args[2]})"
                    )
                )[0]["Plan"]
                await conn.execute("DEALLOCATE page")
                nodes = [plan]
                for n in nodes:
                    nodes += n.get("Plans", [])
                kinds = {n["Node Type"] for n in nodes}
                assert "Sort" not in kinds, f"{lower} {mode}: a sort in\n{plan}"
                used = {n.get("Index Name") for n in nodes}
                assert "payments_scope_idx" in used, f"{lower} {mode}: index not used\n{plan}"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("scope", "fragment"),
    [
        ("nope", "'nope' does not exist"),
        ("transaction_id", "names the key transaction_id itself"),
        ("merchant_id,merchant_id", "named twice"),
        ("doc", "no btree ordering"),
    ],
)
async def test_bad_scope_is_one_line_and_changes_nothing(
    dsn: str, scope: str, fragment: str
) -> None:
    await scoped_table(dsn, index="")
    await execute(
        dsn, "ALTER TABLE payments ADD COLUMN doc json", "CREATE INDEX ON payments (transaction_id)"
    )
    before = await fetch_keys(dsn)
    code, out, err = await cli("run", "--apply", "--scope", scope, "-d", dsn)
    assert code in (2, 3), out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert fragment in lines[0], err
    assert await fetch_keys(dsn) == before


async def test_partitioned_payments_unique_per_merchant_end_to_end(dsn: str) -> None:
    """The issue's table: PRIMARY KEY (id, merchant_id), PARTITION BY HASH (merchant_id). The
    uniqueness it can enforce is per merchant: scan, run and enforce --scope merchant_id."""
    await execute(
        dsn,
        """CREATE TABLE payments (
            id bigserial, merchant_id int NOT NULL, transaction_id varchar(64),
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (id, merchant_id)) PARTITION BY HASH (merchant_id)""",
        *(
            f"CREATE TABLE payments_p{i} PARTITION OF payments "
            f"FOR VALUES WITH (MODULUS 3, REMAINDER {i})"
            for i in range(3)
        ),
        "CREATE INDEX ON payments (merchant_id, transaction_id)",
        """INSERT INTO payments (merchant_id, transaction_id)
        SELECT i % 6, 'tx-' || (i % 80) FROM generate_series(1, 1200) i""",
        "ANALYZE payments",
    )
    losers = await expected(dsn)
    cfg = connect(dsn, scope=SCOPE)

    code, out, err = await cli("scan", "--scope", "merchant_id", "--format", "json", "-d", dsn)
    assert code == 1, err  # duplicates found
    assert json.loads(out)["rows_to_rename"] == len(losers)
    # without the scope, a unique index could never be built on this table: refused up front
    code, out, err = await cli("enforce", "-d", dsn)
    assert code != 0
    assert "partition" in err

    code, out, err = await cli("enforce", "--scope", "merchant_id", "--format", "json", "-d", dsn)

    assert code == 0, out + err
    assert await scoped_duplicates(dsn) == 0
    valid = await fetch(
        dsn,
        """SELECT i.indisvalid, i.indisunique, pg_get_indexdef(i.indexrelid) AS def
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'payments'::regclass AND i.indisunique
          AND NOT i.indisprimary""",
    )
    assert len(valid) == 1 and valid[0]["indisvalid"], valid  # noqa: PT018
    assert "(merchant_id, transaction_id)" in valid[0]["def"]
    with pytest.raises(asyncpg.UniqueViolationError):
        await execute(dsn, "INSERT INTO payments (merchant_id, transaction_id) VALUES (1, 'tx-1')")
    # the same key in another merchant is still welcome
    await execute(dsn, "INSERT INTO payments (merchant_id, transaction_id) VALUES (1, 'tx-2')")
    del cfg


@pytest.mark.parametrize("key_index", [True, False], ids=["key-indexed", "scope-index-only"])
async def test_new_values_are_free_table_wide_when_an_index_leads_with_the_key(
    dsn: str, key_index: bool
) -> None:
    await execute(
        dsn,
        """CREATE TABLE payments (id bigint PRIMARY KEY, merchant_id int,
            transaction_id varchar(64), created_at timestamptz NOT NULL DEFAULT now())""",
        "CREATE INDEX ON payments (merchant_id, transaction_id)",
        "CREATE INDEX ON payments (transaction_id)" if key_index else "SELECT 1",
        # merchant 1: 'a' twice (row 2 is renamed, to 'a-2' by the template); merchant 9
        # already holds 'a-2', which its own scope's uniqueness does not forbid elsewhere
        "INSERT INTO payments (id, merchant_id, transaction_id) "
        "VALUES (1, 1, 'a'), (2, 1, 'a'), (3, 9, 'a-2')",
    )
    summary = await pipeline.run(connect(dsn, scope=SCOPE), apply_cfg())
    assert summary.rows_renamed == 1
    [(new,)] = await fetch(dsn, "SELECT transaction_id FROM payments WHERE id = 2")
    # with an index on the key the probe is cheap and the value stays unique table-wide;
    # without one it is checked (and unique) within its scope, which is what the index needs
    assert new == ("a-2~1" if key_index else "a-2")


async def test_enforce_with_scope_on_a_plain_table_builds_the_scoped_constraint(dsn: str) -> None:
    await scoped_table(dsn)
    code, out, err = await cli(
        "enforce", "--scope", "merchant_id", "--constraint", "--format", "json", "-d", dsn
    )
    assert code == 0, out + err
    assert await scoped_duplicates(dsn) == 0
    [con] = await fetch(
        dsn,
        "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint "
        "WHERE conrelid = 'payments'::regclass AND contype = 'u'",
    )
    assert con["def"] == "UNIQUE (merchant_id, transaction_id)"
    with pytest.raises(asyncpg.UniqueViolationError):
        await execute(
            dsn,
            "INSERT INTO payments (merchant_id, transaction_id, created_at) "
            "VALUES (1, 'tx-1', now())",
        )
