"""The test infrastructure itself: per-test databases, the helpers and the data generator."""

from __future__ import annotations

import subprocess
import sys

import asyncpg
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from benchmarks.generate import GenSpec, NotGeneratedError, generate, plan
from tests.helpers import (
    REPO_ROOT,
    create_payments,
    dsn_with_database,
    fetch_keys,
    table_checksum,
)

# --- per-test databases -----------------------------------------------------------------------
# The two tests below each create the same table; whichever runs second fails unless each test
# really gets a database of its own. The third checks both were dropped afterwards.
_claimed: list[str] = []


async def _claim_fresh_database(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('isolation_marker')") is None
        await conn.execute("CREATE TABLE isolation_marker (id int)")
        name = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    assert isinstance(name, str)
    assert name.startswith("test_")
    _claimed.append(name)
    return name


@pytest.mark.anyio
async def test_database_is_fresh_first(dsn: str) -> None:
    await _claim_fresh_database(dsn)


@pytest.mark.anyio
async def test_database_is_fresh_second(dsn: str) -> None:
    await _claim_fresh_database(dsn)


@pytest.mark.anyio
async def test_databases_are_distinct_and_dropped(pg_admin_dsn: str, pg_template: str) -> None:
    if len(_claimed) < 2:
        pytest.skip("needs the two test_database_is_fresh_* tests to run first")
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        existing = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = ANY($1::text[])", _claimed
        )
        template = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", pg_template
        )
    finally:
        await conn.close()
    assert len(set(_claimed)) == len(_claimed)
    assert existing == 0
    assert template == 1


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://postgres:@/postgres?host=/tmp/pg",
            "postgresql://postgres:@/test_1?host=/tmp/pg",
        ),
        (
            "postgresql://u:p%40ss@127.0.0.1:5432/postgres?sslmode=disable",
            "postgresql://u:p%40ss@127.0.0.1:5432/test_1?sslmode=disable",
        ),
        ("postgres://localhost", "postgres://localhost/test_1"),
        ("postgresql:///postgres?dbname=x&host=/s", "postgresql:///test_1?host=/s"),
    ],
)
def test_dsn_with_database(dsn: str, expected: str) -> None:
    assert dsn_with_database(dsn, "test_1") == expected


def test_dsn_with_database_rejects_keyword_form() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        dsn_with_database("host=/tmp dbname=postgres", "x")


# --- helpers ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_create_payments_and_fetch_keys(dsn: str) -> None:
    await create_payments(dsn, rows=[("a",), ("b",), ("a",), (None,)])
    assert await fetch_keys(dsn) == {1: "a", 2: "b", 3: "a", 4: None}
    before = await table_checksum(dsn)
    assert before == await table_checksum(dsn)

    conn = await asyncpg.connect(dsn)
    try:
        index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'payments_transaction_id_idx'"
        )
        await conn.execute("UPDATE payments SET transaction_id = 'c' WHERE id = 3")
    finally:
        await conn.close()
    assert index is not None
    assert "UNIQUE" not in index
    assert await table_checksum(dsn) != before


@pytest.mark.anyio
async def test_create_payments_in_schema_with_odd_names(dsn: str) -> None:
    await create_payments(dsn, schema='Odd "schema"', table="Pay", rows=[("x",)])
    assert await fetch_keys(dsn, 'Odd "schema".Pay') == {1: "x"}


# --- generator --------------------------------------------------------------------------------


@given(
    rows=st.integers(min_value=0, max_value=200_000),
    dup_fraction=st.floats(min_value=0, max_value=0.3),
    null_fraction=st.floats(min_value=0, max_value=0.3),
    tail_fraction=st.floats(min_value=0, max_value=1),
    big_groups=st.integers(min_value=0, max_value=5),
)
def test_plan_partitions_the_rows_exactly(
    rows: int, dup_fraction: float, null_fraction: float, tail_fraction: float, big_groups: int
) -> None:
    # On a handful of rows rounding can ask for more rows than there are (2 rows, 1 extra
    # duplicate and 1 NULL key): plan() refuses those, tested below.
    assume(2 * round(dup_fraction * rows) + round(null_fraction * rows) <= rows)
    spec = GenSpec(
        rows=rows,
        dup_fraction=dup_fraction,
        null_fraction=null_fraction,
        tail_fraction=tail_fraction,
        big_groups=big_groups,
    )
    layout = plan(spec)
    cursor = 0
    for segment in layout.segments:
        assert segment.start == cursor
        assert segment.count > 0
        cursor = segment.end
    assert cursor == rows
    assert layout.rows_to_rename == round(dup_fraction * rows)
    assert layout.null_keys == round(null_fraction * rows)


def test_plan_refuses_a_spec_that_needs_more_rows_than_it_has() -> None:
    with pytest.raises(ValueError, match="more than rows=2"):
        plan(GenSpec(rows=2, dup_fraction=0.3, null_fraction=0.3, big_groups=0))


@pytest.mark.anyio
async def test_generate_small_table(dsn: str) -> None:
    spec = GenSpec(rows=5_000, dup_fraction=0.05, null_fraction=0.02, seed=7)
    stats = await generate(dsn, spec)
    layout = plan(spec)

    assert stats.rows == 5_000
    assert stats.null_keys == 100
    # Keys of distinct groups never collide, so the table has exactly the planned duplicates.
    assert stats.rows_to_rename == layout.rows_to_rename == 250
    assert stats.duplicate_groups == layout.duplicate_groups
    assert 0.045 <= stats.dup_fraction <= 0.055
    # Big groups shrink to a quarter of the duplicates on a table this small: 2 groups of 32.
    assert stats.largest_group == max(s.size for s in layout.segments) == 32

    conn = await asyncpg.connect(dsn)
    try:
        spread = await conn.fetchrow(
            """
            SELECT count(*) FILTER (WHERE id <= 2500) AS low,
                   count(*) FILTER (WHERE id > 2500) AS high,
                   corr(id, extract(epoch FROM created_at)) AS corr,
                   (SELECT last_value FROM payments_id_seq) AS seq
            FROM payments
            WHERE transaction_id IN (
                SELECT transaction_id FROM payments GROUP BY 1 HAVING count(*) > 1
            )
            """
        )
        unique_index = await conn.fetchval(
            "SELECT indisunique FROM pg_index "
            "WHERE indexrelid = 'payments_transaction_id_idx'::regclass"
        )
    finally:
        await conn.close()
    assert spread is not None
    # Duplicates are scattered over the whole heap, not clustered at one end.
    assert spread["low"] > 100
    assert spread["high"] > 100
    # created_at is shuffled relative to id.
    assert abs(spread["corr"]) < 0.2
    # The sequence continues after the generated ids, so later inserts do not collide.
    assert spread["seq"] == 5_000
    assert unique_index is False


@pytest.mark.anyio
async def test_generate_is_deterministic_by_seed(dsn: str) -> None:
    await generate(dsn, GenSpec(rows=3_000, seed=11, table="a"))
    await generate(dsn, GenSpec(rows=3_000, seed=11, table="b"))
    await generate(dsn, GenSpec(rows=3_000, seed=12, table="c"))
    assert await table_checksum(dsn, "a") == await table_checksum(dsn, "b")
    assert await table_checksum(dsn, "a") != await table_checksum(dsn, "c")


@pytest.mark.anyio
async def test_generate_with_big_groups_and_options(dsn: str) -> None:
    spec = GenSpec(
        rows=40_000,
        dup_fraction=0.1,
        big_groups=2,
        big_group_size=500,
        key_length=64,
        payload_width=0,
        shuffled_created_at=False,
        vacuum=False,
        table="Sales.Payments",
    )
    stats = await generate(dsn, spec)
    assert stats.largest_group == 500
    assert stats.rows_to_rename == 4_000
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT min(length(transaction_id)) AS lo, max(length(transaction_id)) AS hi, "
            'corr(id, extract(epoch FROM created_at)) AS corr FROM "Sales"."Payments"'
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["lo"] == row["hi"] == 64
    assert row["corr"] > 0.99


@pytest.mark.anyio
async def test_generate_refuses_to_overwrite_without_drop(dsn: str) -> None:
    await generate(dsn, GenSpec(rows=10))
    with pytest.raises(asyncpg.DuplicateTableError):
        await generate(dsn, GenSpec(rows=10))
    stats = await generate(dsn, GenSpec(rows=20), drop=True)
    assert stats.rows == 20


@pytest.mark.anyio
async def test_generate_drop_spares_tables_it_did_not_make(dsn: str) -> None:
    await create_payments(dsn, rows=[("precious",)])
    with pytest.raises(NotGeneratedError, match="refusing to drop"):
        await generate(dsn, GenSpec(rows=10), drop=True)
    assert await fetch_keys(dsn) == {1: "precious"}


def test_genspec_validates() -> None:
    with pytest.raises(ValueError, match="dup_fraction"):
        GenSpec(dup_fraction=0.6)
    with pytest.raises(ValueError, match="key_length"):
        GenSpec(key_length=8)
    with pytest.raises(ValueError, match="table"):
        GenSpec(table="a.b.c")
    with pytest.raises(ValueError, match="key_type"):
        GenSpec(key_type="int; DROP TABLE x")


def test_generate_cli(dsn: str) -> None:
    cmd = [sys.executable, "-m", "benchmarks.generate", "-d", dsn, "--rows", "2000", "--drop"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("payments: 2000 rows,")
    assert "100 rows to rename (5.00%)" in result.stdout
