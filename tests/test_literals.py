"""The chunk statements' arrays travel as one text literal each (bulkdedupe/literals.py): the
server must read back exactly the values sent, however they are spelled, and a rename of keys
that need quoting must write them exactly."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from bulkdedupe import pipeline
from bulkdedupe.literals import int_array, text_array, tid_array, value_array
from tests.factories import apply_cfg, connect
from tests.helpers import create_payments

pytestmark = pytest.mark.anyio

AWKWARD = [
    "plain",
    "",
    "NULL",
    "null",
    " leading and trailing blanks ",
    "tab\there",
    "new\nline",
    'a "quoted" word',
    '"',
    "back\\slash",
    "\\",
    '\\"',
    "{braces}",
    "com,ma",
    "semi;colon",
    "(1,2)",
    "ünïcødé ß 字",
    "emoji 🙂",
]


async def test_text_literals_read_back_exactly(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for values in (AWKWARD, ["a", "b"], ["only"], []):
            for cast in ("text", "varchar", "varchar(64)"):
                got = await conn.fetchval(f"SELECT $1::text::{cast}[]", text_array(values))
                assert got == values, (cast, values)
        # the fast path (nothing to escape) and the slow one give the same literal's values
        assert await conn.fetchval("SELECT $1::text::text[]", text_array(["x", 'y"'])) == [
            "x",
            'y"',
        ]
    finally:
        await conn.close()


async def test_int_uuid_and_tid_literals_read_back_exactly(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        ints = [0, 1, -5, 2**62, 42]
        assert await conn.fetchval("SELECT $1::text::bigint[]", int_array(ints)) == ints
        assert await conn.fetchval("SELECT $1::text::bigint[]", value_array(ints)) == ints
        ids = [uuid.uuid4() for _ in range(3)]
        assert await conn.fetchval("SELECT $1::text::uuid[]", value_array(ids)) == ids
        pks = ['["1", "eu"]', '["2", "a \\"b\\""]']  # composite keys travel as JSON text
        assert await conn.fetchval("SELECT $1::text::text[]", value_array(pks)) == pks
        tids = [(0, 1), (4294967295, 65535), (12, 7)]
        assert await conn.fetchval("SELECT $1::text::tid[]", tid_array(tids)) == tids
    finally:
        await conn.close()


async def test_heap_order_run_renames_awkward_keys_exactly(dsn: str) -> None:
    # every awkward value duplicated: the chunk's locks and UPDATE carry them as literals
    values = [v for v in AWKWARD if v]
    await create_payments(dsn, rows=[(v,) for _ in range(3) for v in values])
    summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=10, concurrency=2))
    assert summary.rows_renamed == 2 * len(values)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, transaction_id FROM payments ORDER BY transaction_id, id"
        )
        first = {}
        for r in await conn.fetch(
            "SELECT min(id) AS id, v FROM (SELECT id, transaction_id AS v FROM payments) s "
            "WHERE v = ANY($1::text[]) GROUP BY v",
            values,
        ):
            first[r["v"]] = r["id"]
        assert sorted(first) == sorted(values)  # each value kept by its survivor
        renamed = {r["transaction_id"] for r in rows if r["id"] not in first.values()}
        audit = await conn.fetch("SELECT pk, old_value, new_value FROM bulkdedupe.changes")
        assert {a["new_value"] for a in audit} == renamed
        for a in audit:
            assert a["new_value"] == f"{a['old_value']}-{a['pk']}"
            assert a["old_value"] in values
    finally:
        await conn.close()


async def test_primary_key_of_another_type_keeps_binary_arrays(dsn: str) -> None:
    # a numeric primary key prints as its input too, but only the listed types go as literals:
    # the rest keep asyncpg's binary arrays, and the run is the same
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE payments (id numeric(12, 2) PRIMARY KEY, transaction_id varchar(64));"
            "CREATE INDEX payments_transaction_id_idx ON payments (transaction_id);"
            "INSERT INTO payments SELECT g + 0.5, 'k' || (g % 7) FROM generate_series(1, 40) g"
        )
        summary = await pipeline.run(connect(dsn), apply_cfg(batch_size=10, concurrency=2))
        assert summary.rows_renamed == 40 - 7
        left = await conn.fetchval(
            "SELECT count(*) FROM (SELECT transaction_id FROM payments "
            "GROUP BY 1 HAVING count(*) > 1) d"
        )
        assert left == 0
        # the survivor of each value is its lowest id; the others end in their own id
        renamed = await conn.fetch(
            "SELECT id, transaction_id FROM payments WHERE transaction_id LIKE '%-%'"
        )
        assert len(renamed) == 33
        assert all(r["transaction_id"].endswith(f"-{r['id']}") for r in renamed)
    finally:
        await conn.close()
