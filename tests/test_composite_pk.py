"""Composite primary keys (issue #11): rows named by several columns of mixed types (bigint +
text + uuid here), through run, the audit, report (json/csv: one field per pk column), undo
(byte-exact) and a resume after kill -9. Real PostgreSQL throughout.

A composite key travels, and is audited, as the JSON array of its columns' text forms
(`["7", "eu", "0b4e…"]`); `{pk}` in the template renders the values joined by `-`."""

from __future__ import annotations

import csv
import io
import json
import signal
from pathlib import Path

import asyncpg
import pytest

from bulkdedupe import pipeline
from bulkdedupe.config import UndoConfig, parse_columns
from bulkdedupe.errors import RunStateError, UsageError
from bulkdedupe.undo import undo
from tests.factories import apply_cfg, connect
from tests.faults_support import cli, spawn, wait_until, wait_until_tool_gone
from tests.helpers import execute, fetch, fetchval

pytestmark = pytest.mark.anyio

TABLE = "ledger"
# region holds characters JSON and CSV must escape, and the template's own separator
REGIONS = ("eu", "us-east", 'q"uo\\te', "ü")


async def ledger(dsn: str, groups: int = 30, junk: int = 0) -> None:
    """`groups` duplicated values of 2-4 rows each, some unique rows, and `junk` rows sharing
    one value (a giant group when large); the primary key is (id bigint, region text, ref uuid)
    and a row's id alone is not unique."""
    await execute(
        dsn,
        f"""CREATE TABLE {TABLE} (
            id bigint NOT NULL, region text NOT NULL, ref uuid NOT NULL,
            transaction_id varchar(120), created_at timestamptz NOT NULL,
            PRIMARY KEY (id, region, ref))""",
        f"CREATE INDEX ON {TABLE} (transaction_id)",
    )
    rows = []
    n = 0
    for g in range(groups):
        for j in range(2 + g % 3):
            n += 1
            rows.append((g % 7, REGIONS[(g + j) % len(REGIONS)], f"tx-{g}"))
    rows += [(i % 5, REGIONS[i % len(REGIONS)], f"single-{i}") for i in range(20)]
    rows += [(i % 11, REGIONS[i % len(REGIONS)], "N/A") for i in range(junk)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            f"""INSERT INTO {TABLE} (id, region, ref, transaction_id, created_at)
            VALUES ($1, $2, gen_random_uuid(), $3,
                    timestamptz '2026-01-01' + random() * interval '1 day')""",
            rows,
        )
        await conn.execute(f"ANALYZE {TABLE}")
    finally:
        await conn.close()


async def snapshot(dsn: str) -> dict[tuple[str, str, str], str | None]:
    """Every row's key by its primary key's text forms."""
    rows = await fetch(dsn, f"SELECT id::text, region, ref::text, transaction_id FROM {TABLE}")
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def expected_losers(dsn: str, order: str = "id, region, ref") -> dict[tuple[str, ...], str]:
    """pk -> old value of every row a correct run renames (survivor: first by `order`)."""
    rows = await fetch(
        dsn,
        f"""SELECT id::text, region, ref::text, transaction_id FROM (
            SELECT *, row_number() OVER (PARTITION BY transaction_id ORDER BY {order}) AS rn
            FROM {TABLE} WHERE transaction_id IS NOT NULL) s WHERE rn > 1""",
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def audit(dsn: str, run_id: str) -> dict[tuple[str, ...], tuple[str, str]]:
    rows = await fetch(
        dsn, "SELECT pk, old_value, new_value FROM bulkdedupe.changes WHERE run_id = $1", run_id
    )
    out: dict[tuple[str, ...], tuple[str, str]] = {}
    for r in rows:
        pk = tuple(json.loads(r["pk"]))
        assert pk not in out, f"{pk} audited twice"
        out[pk] = (r["old_value"], r["new_value"])
    return out


def test_parse_columns() -> None:
    assert parse_columns("id", "--pk") == ("id",)
    assert parse_columns(" id , Region ", "--pk") == ("id", "region")
    assert parse_columns('"A,b",c', "--pk") == ("A,b", "c")
    with pytest.raises(UsageError, match="named twice"):
        parse_columns("id,ID", "--pk")


async def test_composite_pk_run_renames_by_the_whole_key_and_audits_it(dsn: str) -> None:
    await ledger(dsn, junk=600)  # and one group larger than a batch: worked off in chunks
    before = await snapshot(dsn)
    losers = await expected_losers(dsn)
    cfg = connect(dsn, table=TABLE)

    summary = await pipeline.run(cfg, apply_cfg(batch_size=100))

    assert summary.status == "completed"
    assert summary.rows_renamed == len(losers)
    after = await snapshot(dsn)
    for pk, old in losers.items():
        assert after[pk] == f"{old}-{'-'.join(pk)}"  # {pk}: the values joined by '-'
    assert {pk: v for pk, v in after.items() if pk not in losers} == {
        pk: v for pk, v in before.items() if pk not in losers
    }
    assert await audit(dsn, summary.run_id) == {pk: (losers[pk], after[pk]) for pk in losers}
    assert (
        await fetchval(
            dsn,
            f"SELECT count(*) FROM (SELECT transaction_id FROM {TABLE} GROUP BY 1 "
            "HAVING count(*) > 1) d",
        )
        == 0
    )


async def test_report_has_one_field_per_pk_column_and_undo_is_byte_exact(dsn: str) -> None:
    await ledger(dsn)
    checksum = f"SELECT md5(string_agg(t::text, ',' ORDER BY id, region, ref)) FROM {TABLE} t"
    original = await fetchval(dsn, checksum)
    summary = await pipeline.run(connect(dsn, table=TABLE), apply_cfg())
    run_id = summary.run_id
    audited = await audit(dsn, run_id)

    code, out, err = await cli("report", "--run-id", run_id, "--format", "csv", "-d", dsn)
    assert code == 0, err
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == [
        "id",
        "pk.id",
        "pk.region",
        "pk.ref",
        "old_value",
        "new_value",
        "changed_at",
    ]
    assert {tuple(r[1:4]): (r[4], r[5]) for r in table[1:]} == audited

    code, out, err = await cli("report", "--run-id", run_id, "--format", "json", "-d", dsn)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert {(d["pk"]["id"], d["pk"]["region"], d["pk"]["ref"]) for d in lines} == set(audited)

    result = await undo(connect(dsn, table=TABLE), UndoConfig(run_id=run_id, apply=True))
    assert result.restored == len(audited)
    assert await fetchval(dsn, checksum) == original  # every byte of every row as it was


async def test_resume_must_name_rows_by_the_same_columns(dsn: str) -> None:
    await ledger(dsn)
    await execute(dsn, f"CREATE UNIQUE INDEX ledger_ref ON {TABLE} (ref)")
    summary = await pipeline.run(connect(dsn, table=TABLE), apply_cfg())
    with pytest.raises(RunStateError, match="pass --pk id,region,ref"):
        await undo(
            connect(dsn, table=TABLE, pk="ref"), UndoConfig(run_id=summary.run_id, apply=True)
        )


async def test_kill_9_with_a_composite_pk_then_resume_audits_each_row_once(
    dsn: str, tmp_path: Path
) -> None:
    await ledger(dsn, groups=600)
    losers = await expected_losers(dsn)
    run_id = "composite"
    args = ["run", "--apply", "--table", TABLE, "--run-id", run_id, "--batch-size", "20", "-d", dsn]
    async with spawn(tmp_path, "killed", *args, "--max-rate", "300") as proc:
        conn = await asyncpg.connect(dsn)
        try:

            async def some_renamed() -> bool:
                n = (
                    await conn.fetchval(
                        "SELECT count(*) FROM bulkdedupe.changes WHERE run_id = $1", run_id
                    )
                    if await conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL")
                    else 0
                )
                return bool(n and n >= 100)

            await wait_until(some_renamed, "100 renames", proc=proc)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await wait_until_tool_gone(conn)
        finally:
            await conn.close()
    done = len(await audit(dsn, run_id))
    assert 100 <= done < len(losers)

    code, out, err = await cli(*args, "--format", "json")

    assert code == 0, err
    assert json.loads(out)["rows_renamed"] == len(losers) - done
    after = await snapshot(dsn)
    assert await audit(dsn, run_id) == {pk: (old, after[pk]) for pk, old in losers.items()}
