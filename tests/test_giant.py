"""Groups of many thousands of rows (issue #12): a junk value shared by a large share of the
table is renamed in O(its rows) and flat memory — its survivor decided once, its losers listed
on disk and renamed a chunk a transaction, each chunk re-reading only its own rows by primary
key. Real PostgreSQL throughout; the old per-batch re-read of the whole group was quadratic
(a 100,000-row group would outlast every timeout here)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bulkdedupe import pipeline
from bulkdedupe.config import RunConfig, parse_keep
from bulkdedupe.worker import GIANT_GROUP_MIN_LOSERS, Worker
from tests.factories import apply_cfg, connect, duplicate_groups, expected_plan
from tests.faults_support import (
    changes_count,
    check_audit_of,
    cli,
    spawn,
    wait_until,
    wait_until_tool_gone,
)
from tests.helpers import (
    SURVIVOR_CHANGES,
    create_payments,
    execute,
    fetch,
    fetch_keys,
    fetchval,
)

pytestmark = pytest.mark.anyio

JUNK = "N/A"
GIANT = 100_000  # rows holding the junk value


async def giant_table(dsn: str, rows: int = GIANT, pairs: int = 200) -> None:
    """`rows` rows holding JUNK spread over the heap between unique rows, plus `pairs` ordinary
    duplicate pairs; created_at falls as ids rise, so "created_at desc" keeps the lowest id and
    "created_at" (asc) the highest."""
    await create_payments(dsn, rows=[])
    await execute(
        dsn,
        f"""INSERT INTO payments (transaction_id, created_at)
        SELECT CASE WHEN i % 3 = 0 THEN 'u-' || i ELSE '{JUNK}' END,
               timestamptz '2026-01-01' - i * interval '1 second'
        FROM generate_series(1, {rows * 3 // 2}) i""",
        f"""INSERT INTO payments (transaction_id)
        SELECT 'pair-' || (i % {pairs}) FROM generate_series(1, {2 * pairs}) i""",
        "ANALYZE payments",
    )
    assert (
        await fetchval(dsn, f"SELECT count(*) FROM payments WHERE transaction_id = '{JUNK}'")
        == rows
    )


async def test_giant_group_is_renamed_completely_with_survivor_by_keep_and_audit_equal_data(
    dsn: str,
) -> None:
    await giant_table(dsn)
    before = await fetch_keys(dsn)
    expected = await expected_plan(dsn, order="created_at")  # asc: the highest junk id stays

    summary = await pipeline.run(
        connect(dsn), apply_cfg(batch_size=1000, keep=parse_keep("created_at"))
    )

    assert summary.status == "completed"
    assert summary.rows_renamed == expected.renamed == GIANT - 1 + 200
    survivor = expected.survivors[JUNK]
    holders = await fetch(dsn, f"SELECT id FROM payments WHERE transaction_id = '{JUNK}'")
    assert [r["id"] for r in holders] == [survivor]
    after = await fetch_keys(dsn)
    assert all(after[pk] == f"{old}-{pk}" for pk, (old, _) in expected.losers.items())
    assert await check_audit_of(dsn, before) == expected.renamed
    assert await duplicate_groups(dsn) == {}
    # chunks of the batch size, not a transaction a handful of rows
    assert summary.batches <= 3 * (GIANT // 100)


async def test_dry_run_of_a_giant_group_streams_each_loser_once_to_the_plan(
    dsn: str, tmp_path: Path
) -> None:
    rows = GIANT
    await giant_table(dsn, rows=rows, pairs=0)
    expected = await expected_plan(dsn, order="created_at DESC")
    before = await fetch_keys(dsn)
    plan = tmp_path / "plan.jsonl"

    summary = await pipeline.run(
        connect(dsn),
        RunConfig(apply=False, batch_size=500, keep=parse_keep("created_at desc"), output=plan),
    )

    assert summary.rows_renamed == rows - 1
    lines = [json.loads(line) for line in plan.read_text().splitlines()]
    assert len(lines) == rows - 1
    assert {line["pk"] for line in lines} == set(expected.losers)
    assert {line["survivor_pk"] for line in lines} == {expected.survivors[JUNK]}
    assert all(line["new_value"] == f"{JUNK}-{line['pk']}" for line in lines)
    assert await fetch_keys(dsn) == before  # a dry run changes nothing


async def test_rows_inserted_into_a_giant_group_while_it_is_renamed_are_picked_up(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 5_000
    await giant_table(dsn, rows=rows, pairs=0)
    before = await fetch_keys(dsn)
    original = Worker._entries_once
    inserted: list[int] = []

    async def chunk_while_the_application_inserts(self: Worker, *args: Any) -> Any:
        if not inserted:  # the losers are listed; the application inserts more of them
            conn = await asyncpg.connect(dsn)
            try:
                inserted.extend(
                    r["id"]
                    for r in await conn.fetch(
                        f"INSERT INTO payments (transaction_id) SELECT '{JUNK}' "
                        "FROM generate_series(1, 30) RETURNING id"
                    )
                )
            finally:
                await conn.close()
        return await original(self, *args)

    monkeypatch.setattr(Worker, "_entries_once", chunk_while_the_application_inserts)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=500, concurrency=1))

    assert len(inserted) == 30
    assert summary.status == "completed"
    assert summary.rows_renamed == rows - 1 + 30
    assert await duplicate_groups(dsn) == {}
    after = await fetch_keys(dsn)
    assert all(after[pk] == f"{JUNK}-{pk}" for pk in inserted)
    assert await check_audit_of(dsn, before | dict.fromkeys(inserted, JUNK)) == rows - 1 + 30


@SURVIVOR_CHANGES
async def test_survivor_of_a_giant_group_changed_midway_makes_the_next_pass_decide_again(
    dsn: str, change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = 3_000
    await giant_table(dsn, rows=rows, pairs=0)
    before = await fetch_keys(dsn)
    first = int(
        await fetchval(dsn, f"SELECT min(id) FROM payments WHERE transaction_id = '{JUNK}'")
    )
    original = Worker._entries_once
    calls: list[int] = []

    async def chunk_then_the_application_changes_the_survivor(self: Worker, *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # one chunk committed; the survivor changes before the next
            await execute(dsn, change.format(pk=first))
        return await original(self, *args)

    monkeypatch.setattr(Worker, "_entries_once", chunk_then_the_application_changes_the_survivor)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=400, concurrency=1))

    assert summary.status == "completed"
    holders = await fetch(dsn, f"SELECT id FROM payments WHERE transaction_id = '{JUNK}'")
    assert len(holders) == 1  # the value is held again, by the next row in --keep order
    survivor = holders[0]["id"]
    # the first chunk's renames stay; the new survivor is the lowest id not yet renamed
    renamed = {int(r["pk"]) for r in await fetch(dsn, "SELECT pk FROM bulkdedupe.changes")}
    assert survivor == min(
        pk for pk, k in before.items() if k == JUNK and pk not in renamed | {first}
    )
    assert summary.rows_renamed == rows - 2  # all but the old survivor and the new one
    assert await duplicate_groups(dsn) == {}
    # the application's own change is its own: the baseline says what it wrote
    baseline = before | {first: "moved"} if "UPDATE" in change else before
    assert await check_audit_of(dsn, baseline, deletions="DELETE" in change) == rows - 2


async def test_kill_9_inside_a_giant_group_then_resume_goes_on_from_where_it_was(
    dsn: str, tmp_path: Path
) -> None:
    await giant_table(dsn, pairs=0)
    before = await fetch_keys(dsn)
    expected = await expected_plan(dsn)
    run_id = "giant"
    # paced so the kill lands inside the group (100,000 renames at 20,000/s: 5 s)
    args = ["run", "--apply", "--run-id", run_id, "--batch-size", "1000", "-d", dsn]
    async with spawn(tmp_path, "killed", *args, "--max-rate", "20000") as proc:
        conn = await asyncpg.connect(dsn)
        try:

            async def a_fifth_renamed() -> bool:
                return await changes_count(conn, run_id) >= GIANT // 5

            await wait_until(a_fifth_renamed, "a fifth of the group renamed", proc=proc)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await wait_until_tool_gone(conn)
        finally:
            await conn.close()
    done_before = await check_audit_of(dsn, before)
    assert GIANT // 5 <= done_before < GIANT - 1  # killed inside the group

    code, out, err = await cli(*args, "--format", "json")

    assert code == 0, err
    summary = json.loads(out)
    assert summary["status"] == "completed"
    # the resume renamed only what was left: not the group over again
    assert summary["rows_renamed"] == GIANT - 1 - done_before
    holders = await fetch(dsn, f"SELECT id FROM payments WHERE transaction_id = '{JUNK}'")
    assert [r["id"] for r in holders] == [expected.survivors[JUNK]]  # the same survivor
    assert await check_audit_of(dsn, before) == GIANT - 1  # each row once, audit = data


async def test_group_smaller_than_the_threshold_takes_the_ordinary_batches(dsn: str) -> None:
    # just under the threshold and over the batch size: cut over a few ordinary transactions
    rows = GIANT_GROUP_MIN_LOSERS
    await create_payments(dsn, rows=[(JUNK,)] * rows)
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=100, concurrency=1))
    assert summary.rows_renamed == rows - 1
    assert summary.batches == 2
    assert await duplicate_groups(dsn) == {}


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    out = [plan]
    for child in plan.get("Plans", []):
        out += _nodes(child)
    return out


async def test_a_chunk_finds_its_rows_by_primary_key_even_with_a_generic_plan(dsn: str) -> None:
    # A prepared statement switches to a generic plan after five executions; that plan cannot
    # know the value is held by 20,000 rows and, asked `k = $2`, would walk all of them in the
    # key's index for every chunk (then for every row, for the survivor check): O(group²).
    rows = 20_000
    await giant_table(dsn, rows=rows, pairs=0)
    await execute(dsn, "VACUUM ANALYZE payments")
    conn = await asyncpg.connect(dsn)
    try:
        from bulkdedupe import catalog

        target = await catalog.resolve(conn, connect(dsn))
        q = target.queries("bulkdedupe")
        found = await conn.fetch(
            f"SELECT id, ctid::text AS tid FROM payments WHERE transaction_id = '{JUNK}' "
            "ORDER BY id DESC"
        )
        junk = [r["id"] for r in found]
        survivor, chunk = junk[-1], junk[:400]
        # heap positions, for the by-position statement (run first: the others move the rows)
        tids = "'{" + ",".join(f'"{r["tid"]}"' for r in found[:400]) + "}'::tid[]"
        stids = "'{" + ",".join([f'"{found[-1]["tid"]}"'] * len(chunk)) + "}'::tid[]"
        ids = "'{" + ",".join(map(str, chunk)) + "}'::bigint[]"
        olds = "'{" + ",".join([JUNK] * len(chunk)) + "}'::varchar[]"
        news = "'{" + ",".join(f"{JUNK}-{pk}" for pk in chunk) + "}'::varchar[]"
        survivors = "'{" + ",".join([str(survivor)] * len(chunk)) + "}'::bigint[]"
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("CREATE SCHEMA bulkdedupe")
        await conn.execute(
            "CREATE TABLE bulkdedupe.changes (run_id text, pk text, old_value text, new_value text)"
        )
        statements = {
            "apply_renames_at": (
                q.apply_renames_at,
                f"{tids}, {ids}, {olds}, {news}, {stids}, {survivors}, 'r'",
            ),
            "read_entries": (q.read_entries, f"{ids}, {olds}, {survivors}"),
            "apply_renames": (
                q.apply_renames,
                f"{ids}, {olds}, {news}, 'r', {survivors}, {olds}::text[], {olds}::text[]",
            ),
        }
        for name, (query, args) in statements.items():
            await conn.execute(f"PREPARE {name} AS {query}")
            async with conn.transaction():
                plan = json.loads(
                    await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({args})")
                )[0]["Plan"]
                # the rows were found (and, for the UPDATE, renamed) ...
                renamed = await conn.fetchval("SELECT count(*) FROM bulkdedupe.changes")
                assert name == "read_entries" or renamed == len(chunk), plan
                nodes = _nodes(plan)
                # ... each by its primary key: no node read the group's other rows to drop them
                walked = sum(n.get("Rows Removed by Filter", 0) for n in nodes)
                assert walked == 0, f"{name}: {walked} rows read and dropped\n{plan}"
                for n in nodes:
                    # every read of the table but `o` (is the new value free?) is by pk
                    if n["Node Type"].endswith("Scan") and n.get("Alias") in (
                        "payments",
                        "payments_1",
                        "t",
                        "s",
                    ):
                        if name == "apply_renames_at":  # by heap position, the pk checked
                            assert n["Node Type"] == "Tid Scan", f"{name}: {n}"
                        else:
                            assert n.get("Index Name") == "payments_pkey", f"{name}: {n}"
                # undo what EXPLAIN ANALYZE did
                await conn.execute("DELETE FROM bulkdedupe.changes")
                await conn.execute(
                    f"UPDATE payments SET transaction_id = '{JUNK}' WHERE id = ANY({ids})"
                )
    finally:
        await conn.close()
