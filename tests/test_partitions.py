"""Partitioned tables (issue #11) against real PostgreSQL: hash- and range-partitioned tables
with sub-partitions through scan, run and undo; a key that partitions the table (renamed rows
move to another partition: refused unless --allow-row-movement); a partition without an index
on the key; and `enforce`'s partitioned procedure (ON ONLY index, each leaf's CONCURRENTLY,
ATTACH PARTITION) with an invalid leftover on one partition, late duplicates in another, and
partitions attached and detached between the scan and enforce.

What the table and the catalog say is read with plain SQL, never from the tool's own result.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import asyncpg
import pytest

from bulkdedupe import (
    EnforceConfig,
    RunConfig,
    ScanConfig,
    UndoConfig,
    enforce,
    run,
    scan,
    undo,
    verify,
)
from bulkdedupe.enforce import _Enforcer, _Spot
from tests.factories import connect, expected_plan, state_schema_exists
from tests.faults_support import cli
from tests.helpers import execute, fetch, fetchval, table_checksum

pytestmark = pytest.mark.anyio

INDEX = "payments_transaction_id_key"
DEDUPE = RunConfig(apply=True, batch_size=7, concurrency=2, scan=ScanConfig(page_size=13))
MOVE = RunConfig(
    apply=True,
    batch_size=7,
    concurrency=2,
    scan=ScanConfig(page_size=13),
    allow_row_movement=True,
)
ROW_MOVEMENT = "moves its row to another partition"


async def hash_by_key(dsn: str, groups: int = 40) -> None:
    """payments PARTITION BY HASH (transaction_id), one of its four partitions sub-partitioned
    by RANGE (transaction_id): the key is the partition key at both levels, so it is in the
    primary key (id, transaction_id), and every rename moves its row."""
    await execute(
        dsn,
        """CREATE TABLE payments (
            id bigserial, transaction_id varchar(64) NOT NULL, amount int NOT NULL DEFAULT 1,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (id, transaction_id)) PARTITION BY HASH (transaction_id)""",
        part("payments_p0", "payments", "WITH (MODULUS 4, REMAINDER 0)"),
        part("payments_p1", "payments", "WITH (MODULUS 4, REMAINDER 1)"),
        part("payments_p2", "payments", "WITH (MODULUS 4, REMAINDER 2)"),
        part("payments_p3", "payments", "WITH (MODULUS 4, REMAINDER 3)")
        + " PARTITION BY RANGE (transaction_id)",
        part("payments_p3_lo", "payments_p3", "FROM (MINVALUE) TO ('tx-2')"),
        part("payments_p3_hi", "payments_p3", "FROM ('tx-2') TO (MAXVALUE)"),
        "CREATE INDEX ON payments (transaction_id)",
    )
    rows = [(f"tx-{g}", g) for g in range(groups) for _ in range(1 + g % 4)]
    rows += [(f"single-{i}", i) for i in range(25)]
    await _insert(dsn, "INSERT INTO payments (transaction_id, amount) VALUES ($1, $2)", rows)
    await execute(dsn, "ANALYZE payments")


async def range_by_date(dsn: str, groups: int = 40) -> None:
    """ledger PARTITION BY RANGE (created_at): 2025 sub-partitioned BY HASH (merchant_id), 2026
    a leaf. The key is no partition key (renames stay in their partition; no unique index on
    the key alone is possible); NULL keys are never duplicates."""
    await execute(
        dsn,
        """CREATE TABLE ledger (
            id bigserial, merchant_id int NOT NULL, transaction_id text, created_at date NOT NULL,
            PRIMARY KEY (id, created_at, merchant_id)) PARTITION BY RANGE (created_at)""",
        """CREATE TABLE ledger_2025 PARTITION OF ledger
           FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY HASH (merchant_id)""",
        part("ledger_2025_0", "ledger_2025", "WITH (MODULUS 2, REMAINDER 0)"),
        part("ledger_2025_1", "ledger_2025", "WITH (MODULUS 2, REMAINDER 1)"),
        part("ledger_2026", "ledger", "FROM ('2026-01-01') TO ('2027-01-01')"),
        "CREATE INDEX ON ledger (transaction_id)",
    )
    rows: list[tuple[int, str | None, int]] = []
    for g in range(groups):
        rows += [(g * 7 + j, f"tx-{g}", (g * 37 + j * 200) % 700) for j in range(1 + g % 4)]
    rows += [(i, None, i * 3) for i in range(6)]
    rows += [(i, f"single-{i}", i * 11) for i in range(25)]
    await _insert(
        dsn,
        """INSERT INTO ledger (merchant_id, transaction_id, created_at)
           VALUES ($1, $2, date '2025-01-01' + $3::int)""",
        rows,
    )
    await execute(dsn, "ANALYZE ledger")


def part(name: str, parent: str, bounds: str) -> str:
    return f"CREATE TABLE {name} PARTITION OF {parent} FOR VALUES {bounds}"


async def _insert(dsn: str, statement: str, rows: list[Any]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(statement, rows)
    finally:
        await conn.close()


async def placement(dsn: str, table: str) -> dict[int, tuple[str | None, str]]:
    """id -> (key, the leaf partition that holds the row)."""
    rows = await fetch(
        dsn, f"SELECT id, transaction_id, tableoid::regclass::text AS p FROM {table}"
    )
    return {r["id"]: (r["transaction_id"], r["p"]) for r in rows}


async def check_audit(
    dsn: str, table: str, baseline: dict[int, tuple[str | None, str]], key_in_pk: bool
) -> int:
    """Audit == data: every row whose key differs from `baseline` has exactly one audit row
    old -> new, naming it by its primary key as it is now (with the new key when the key is in
    the primary key), and no audit row names anything else. Returns the rows changed."""
    now = await placement(dsn, table)
    audit: dict[int, list[tuple[list[str], str, str]]] = defaultdict(list)
    for r in await fetch(dsn, "SELECT pk, old_value, new_value FROM bulkdedupe.changes"):
        pk = json.loads(r["pk"])
        audit[int(pk[0])].append((pk, r["old_value"], r["new_value"]))
    changed = {i for i in now if now[i][0] != baseline[i][0]}
    assert set(audit) == changed
    for i in changed:
        ((pk, old, new),) = audit[i]
        assert (old, new) == (baseline[i][0], now[i][0])
        if key_in_pk:
            assert pk == [str(i), new]
    return len(changed)


async def attached_tree(dsn: str, index: str = INDEX) -> dict[str, tuple[str, bool]]:
    """The index's partition tree: index -> (the table it is on, valid)."""
    rows = await fetch(
        dsn,
        """SELECT t.relid::regclass::text AS idx, i.indrelid::regclass::text AS tbl, i.indisvalid
           FROM pg_partition_tree($1::regclass) t JOIN pg_index i ON i.indexrelid = t.relid""",
        index,
    )
    return {r["idx"]: (r["tbl"], r["indisvalid"]) for r in rows}


async def invalid_indexes(dsn: str) -> list[str]:
    rows = await fetch(
        dsn,
        """SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
           WHERE NOT i.indisvalid ORDER BY 1""",
    )
    return [r["relname"] for r in rows]


async def duplicate_insert_rejected(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.execute(
                "INSERT INTO payments (transaction_id) SELECT transaction_id FROM payments LIMIT 1"
            )
        except asyncpg.UniqueViolationError:
            return True
        finally:
            await tx.rollback()
        return False
    finally:
        await conn.close()


def one_error_line(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bulkdedupe: error:"), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- scan, run, undo ---------------------------------------------------------------------------


async def test_key_that_partitions_the_table_needs_allow_row_movement(dsn: str) -> None:
    await hash_by_key(dsn)
    before = await table_checksum(dsn)
    groups = len((await expected_plan(dsn)).survivors)

    scanned = await cli("scan", "-d", dsn, "--format", "json")  # read-only: allowed
    dry = await cli("run", "-d", dsn)
    applied = await cli("run", "-d", dsn, "--apply")
    enforced = await cli("enforce", "-d", dsn)

    assert scanned[0] == 1, scanned[2]
    assert json.loads(scanned[1])["groups"] == groups
    for code, _, err in (dry, applied, enforced):
        assert code == 3
        line = one_error_line(err, ROW_MOVEMENT, "serialization error", "--allow-row-movement")
        assert "of public.payments, HASH (transaction_id)" in line
    assert await table_checksum(dsn) == before
    assert not await state_schema_exists(dsn)  # nothing was created, not even the state schema
    assert await invalid_indexes(dsn) == []


async def test_sub_partition_key_counts_too(dsn: str) -> None:
    """The key partitions only a sub-partitioned level: still refused, naming that level."""
    await execute(
        dsn,
        """CREATE TABLE payments (id bigserial, region text NOT NULL, transaction_id text NOT NULL,
           PRIMARY KEY (id, region, transaction_id)) PARTITION BY LIST (region)""",
        """CREATE TABLE payments_eu PARTITION OF payments FOR VALUES IN ('eu')
           PARTITION BY RANGE (transaction_id)""",
        part("payments_eu_all", "payments_eu", "FROM (MINVALUE) TO (MAXVALUE)"),
        part("payments_us", "payments", "IN ('us')"),
        "CREATE INDEX ON payments (transaction_id)",
        """INSERT INTO payments (region, transaction_id)
           VALUES ('eu', 'a'), ('eu', 'a'), ('us', 'a')""",
    )

    code, _, err = await cli("run", "-d", dsn, "--apply")
    ok = await cli("run", "-d", dsn, "--apply", "--allow-row-movement", "--format", "json")

    assert code == 3
    one_error_line(err, "public.payments_eu (a partition of public.payments)", ROW_MOVEMENT)
    assert ok[0] == 0, ok[2]
    assert json.loads(ok[1])["rows_renamed"] == 2


async def test_hash_partitioned_by_the_key_run_and_undo_move_rows(dsn: str) -> None:
    await hash_by_key(dsn)
    cfg = connect(dsn)
    baseline = await placement(dsn, "payments")
    before = await table_checksum(dsn)
    expected = await expected_plan(dsn)

    report = await scan(cfg, ScanConfig(page_size=13, scanners=2))
    summary = await run(cfg, MOVE)

    assert report.groups == len(expected.survivors)
    assert report.index == "payments_transaction_id_idx"
    assert summary.status == "completed"
    assert summary.rows_renamed == expected.renamed
    now = await placement(dsn, "payments")
    for value, survivor in expected.survivors.items():
        assert now[survivor] == baseline[survivor]  # unchanged, in its partition
        assert sum(1 for k, _ in now.values() if k == value) == 1
    moved = [i for i in expected.losers if now[i][1] != baseline[i][1]]
    assert moved  # hash partitioning: most renamed rows now live in another partition
    # {pk} leaves out the key's own place in the primary key (id, transaction_id): tx-3-17
    assert all(now[i][0] == f"{old}-{i}" for i, (old, _) in expected.losers.items())
    assert await check_audit(dsn, "payments", baseline, key_in_pk=True) == expected.renamed
    assert (await verify(cfg)).ok
    options = await fetchval(
        dsn, "SELECT options FROM bulkdedupe.runs WHERE run_id = $1", summary.run_id
    )
    assert json.loads(options)["allow_row_movement"] is True

    refused = await cli("undo", "-d", dsn, "--run-id", str(summary.run_id), "--apply")
    assert refused[0] == 3
    one_error_line(refused[2], ROW_MOVEMENT)
    assert await placement(dsn, "payments") == now

    restored = await undo(
        cfg, UndoConfig(run_id=str(summary.run_id), apply=True, allow_row_movement=True)
    )

    assert restored.status == "completed"
    assert restored.restored == expected.renamed
    assert await placement(dsn, "payments") == baseline  # every row back in its partition
    assert await table_checksum(dsn) == before


async def test_range_partitioned_with_sub_partitions_run_and_undo(dsn: str) -> None:
    await range_by_date(dsn)
    cfg = connect(dsn, table="ledger")
    baseline = await placement(dsn, "ledger")
    before = await table_checksum(dsn, "ledger")
    expected = await expected_plan(dsn, table="ledger")

    report = await scan(cfg, ScanConfig(page_size=13, scanners=2))
    summary = await run(cfg, DEDUPE)  # the key is no partition key: no flag needed

    assert report.groups == len(expected.survivors)
    assert summary.status == "completed"
    assert summary.rows_renamed == expected.renamed
    now = await placement(dsn, "ledger")
    for i, (_, partition) in now.items():
        assert partition == baseline[i][1]  # nothing moved
    for value, survivor in expected.survivors.items():
        assert now[survivor][0] == value
    for i, (old, survivor) in expected.losers.items():
        assert now[i][0] != old
        assert str(now[i][0]).startswith(f"{old}-{i}-")  # {value}-{pk}: id, created_at, merchant
        assert now[survivor][0] == old
    assert await check_audit(dsn, "ledger", baseline, key_in_pk=False) == expected.renamed
    assert (await verify(cfg)).ok

    restored = await undo(cfg, UndoConfig(run_id=str(summary.run_id), apply=True))

    assert restored.restored == expected.renamed
    assert await table_checksum(dsn, "ledger") == before


async def test_partition_without_a_key_index_is_refused_with_the_statement(dsn: str) -> None:
    """A leaf without an index on the key would be sorted whole on every scan page (a Sort
    under the Merge Append): refused, naming it and the CREATE INDEX to run."""
    await range_by_date(dsn)
    await execute(
        dsn,
        "DROP INDEX ledger_transaction_id_idx",
        "CREATE INDEX ON ledger_2025_0 (transaction_id)",
        "CREATE INDEX ON ledger_2025_1 (transaction_id)",
    )
    before = await table_checksum(dsn, "ledger")
    statement = 'CREATE INDEX CONCURRENTLY ON "public"."ledger_2026" ("transaction_id")'

    results = [
        await cli("scan", "-d", dsn, "--table", "ledger"),
        await cli("run", "-d", dsn, "--table", "ledger", "--apply"),
        await cli("run", "-d", dsn, "--table", "ledger", "--apply", "--create-scan-index"),
    ]

    for code, _, err in results:
        assert code == 3
        one_error_line(err, "partition public.ledger_2026", statement)
    assert "--create-scan-index cannot" in results[2][2]
    assert await table_checksum(dsn, "ledger") == before
    assert not await state_schema_exists(dsn)

    await execute(dsn, statement.replace("CONCURRENTLY ", ""))
    assert (await scan(connect(dsn, table="ledger"))).groups > 0


# --- enforce -----------------------------------------------------------------------------------


async def test_enforce_refused_when_the_index_cannot_contain_the_partition_key(dsn: str) -> None:
    await range_by_date(dsn)
    cfg = connect(dsn, table="ledger")
    await run(cfg, DEDUPE)  # scan, verify and run are allowed
    before = await table_checksum(dsn, "ledger")
    indexes = await fetchval(dsn, "SELECT count(*) FROM pg_class WHERE relkind IN ('i', 'I')")

    code, _, err = await cli("enforce", "-d", dsn, "--table", "ledger")

    assert code == 3
    one_error_line(
        err,
        "PostgreSQL cannot enforce UNIQUE (transaction_id)",
        "must contain the partition key",
        "RANGE (created_at)",
        "merchant_id (of public.ledger_2025)",
        "scan, verify and run still work",
    )
    assert await fetchval(dsn, "SELECT count(*) FROM pg_class WHERE relkind IN ('i', 'I')") == (
        indexes
    )
    assert await table_checksum(dsn, "ledger") == before
    assert (await verify(cfg)).ok


async def test_enforce_constraint_is_refused_on_a_partitioned_table(dsn: str) -> None:
    await hash_by_key(dsn)
    await run(connect(dsn), MOVE)

    code, _, err = await cli("enforce", "-d", dsn, "--constraint", "--allow-row-movement")

    assert code == 3
    one_error_line(err, "--constraint", "partitioned", "USING INDEX")
    assert await fetchval(dsn, "SELECT to_regclass($1)", INDEX) is None


async def test_enforce_builds_the_partitioned_index_over_a_leftover_and_late_duplicates(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid leftover on one partition (a failed earlier CREATE INDEX CONCURRENTLY) is
    dropped and built again; duplicates that arrive in another partition after the dedupe, just
    before its index is built, are renamed by an audited run and that partition built again."""
    await hash_by_key(dsn)
    with pytest.raises(asyncpg.UniqueViolationError):  # what a failed attempt leaves behind
        await execute(
            dsn,
            "CREATE UNIQUE INDEX CONCURRENTLY payments_p1_transaction_id_key "
            "ON payments_p1 (transaction_id)",
        )
    assert await invalid_indexes(dsn) == ["payments_p1_transaction_id_key"]
    cfg = connect(dsn)
    first = await run(cfg, MOVE)
    assert first.status == "completed"
    late_value = await fetchval(dsn, "SELECT transaction_id FROM payments_p3_hi LIMIT 1")
    real_build = _Enforcer.build_once
    builds: list[str | None] = []

    async def build_once(self: _Enforcer, spot: _Spot | None = None) -> tuple[str, str | None]:
        builds.append(spot.partition if spot else None)
        if (
            spot is not None
            and spot.partition == "public.payments_p3_hi"
            and builds.count(spot.partition) == 1
        ):
            # live traffic after the dedupe: two copies of a value of that partition
            await execute(
                dsn,
                f"INSERT INTO payments (transaction_id) VALUES ('{late_value}'), ('{late_value}')",
            )
        return await real_build(self, spot)

    monkeypatch.setattr(_Enforcer, "build_once", build_once)

    result = await enforce(cfg, EnforceConfig(dedupe=MOVE))

    assert result.status == "created", result
    assert result.index_valid
    outcomes = [(a.partition, a.outcome) for a in result.attempts]
    assert ("public.payments_p3_hi", "duplicates") in outcomes
    assert outcomes.count(("public.payments_p3_hi", "built")) == 1
    late = next(a for a in result.attempts if a.outcome == "duplicates")
    assert late.rows_renamed == 2  # the two late copies (the survivor was there before)
    assert result.dropped_invalid == 2  # the leftover, and the failed build of p3_hi
    assert set(builds) == {
        "public.payments_p0",
        "public.payments_p1",
        "public.payments_p2",
        "public.payments_p3_lo",
        "public.payments_p3_hi",
    }
    # The catalog: the partitioned index valid, every level's index attached under it.
    tree = await attached_tree(dsn)
    assert tree == {
        INDEX: ("payments", True),
        "payments_p0_transaction_id_key": ("payments_p0", True),
        "payments_p1_transaction_id_key": ("payments_p1", True),
        "payments_p2_transaction_id_key": ("payments_p2", True),
        "payments_p3_transaction_id_key": ("payments_p3", True),
        "payments_p3_lo_transaction_id_key": ("payments_p3_lo", True),
        "payments_p3_hi_transaction_id_key": ("payments_p3_hi", True),
    }
    assert await invalid_indexes(dsn) == []
    assert await duplicate_insert_rejected(dsn)
    assert result.duplicate_rejected is True
    assert (await verify(cfg)).ok
    phases = {p for p, _ in result.phases}
    assert {"create partitioned index (ON ONLY)", "attach partition indexes", "prove"} <= phases
    assert "create sub-partition indexes (ON ONLY)" in phases
    assert "drop invalid index public.payments_p1" in phases
    # The late renames: an audited run of their own, which recorded the row movement.
    assert late.dedupe_run_id is not None
    audit = await fetch(
        dsn, "SELECT old_value FROM bulkdedupe.changes WHERE run_id = $1", late.dedupe_run_id
    )
    assert [r["old_value"] for r in audit] == [late_value, late_value]
    options = await fetchval(
        dsn, "SELECT options FROM bulkdedupe.runs WHERE run_id = $1", late.dedupe_run_id
    )
    assert json.loads(options)["allow_row_movement"] is True

    # Now the index stops an undo, which names the statement that drops it (not CONCURRENTLY).
    before = await table_checksum(dsn)
    code, _, err = await cli(
        "undo", "-d", dsn, "--run-id", str(first.run_id), "--apply", "--allow-row-movement"
    )
    assert code == 3
    one_error_line(err, f'DROP INDEX "public"."{INDEX}"')
    assert "CONCURRENTLY" not in err
    assert await table_checksum(dsn) == before

    again = await enforce(cfg, EnforceConfig(dedupe=MOVE))
    assert again.status == "already_enforced"
    assert again.attempts == ()


async def test_enforce_that_does_not_converge_leaves_the_parent_invalid_and_resumes(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Duplicates keep arriving in one partition: enforce stops after --max-attempts with no
    invalid partition index left; the partitioned index stays INVALID with what was attached,
    and the next enforce goes on from there."""
    await hash_by_key(dsn)
    cfg = connect(dsn)
    await run(cfg, MOVE)
    value = await fetchval(dsn, "SELECT transaction_id FROM payments_p2 LIMIT 1")
    real_build = _Enforcer.build_once

    async def build_once(self: _Enforcer, spot: _Spot | None = None) -> tuple[str, str | None]:
        if spot is not None and spot.partition == "public.payments_p2":
            await execute(dsn, f"INSERT INTO payments (transaction_id) VALUES ('{value}')")
        return await real_build(self, spot)

    monkeypatch.setattr(_Enforcer, "build_once", build_once)

    stopped = await enforce(cfg, EnforceConfig(dedupe=MOVE, max_attempts=1))

    assert stopped.status == "not_converged"
    assert [(a.partition, a.outcome) for a in stopped.attempts][-1] == (
        "public.payments_p2",
        "duplicates",
    )
    assert await invalid_indexes(dsn) == [INDEX]  # only the partitioned one (no storage)
    tree = await attached_tree(dsn)
    assert tree[INDEX] == ("payments", False)
    assert "payments_p0_transaction_id_key" in tree  # built before p2, and attached
    assert "payments_p2_transaction_id_key" not in tree
    assert "INVALID" in stopped.to_text()

    monkeypatch.setattr(_Enforcer, "build_once", real_build)
    await run(cfg, MOVE)  # the duplicate that stopped it
    resumed = await enforce(cfg, EnforceConfig(dedupe=MOVE))

    assert resumed.status == "created"
    assert [a.partition for a in resumed.attempts] == [
        "public.payments_p2",
        "public.payments_p3_hi",
        "public.payments_p3_lo",
    ]  # p0 and p1 were attached already
    assert all(valid for _, valid in (await attached_tree(dsn)).values())
    assert await duplicate_insert_rejected(dsn)


async def test_partitions_attached_and_detached_between_scan_and_enforce(dsn: str) -> None:
    """RANGE (transaction_id): after the run, one partition is detached (its duplicates are no
    longer the table's business) and a new one with duplicates of its own is attached; enforce
    works on the tree as it is then."""
    await execute(
        dsn,
        """CREATE TABLE payments (id bigserial, transaction_id text NOT NULL,
           PRIMARY KEY (id, transaction_id)) PARTITION BY RANGE (transaction_id)""",
        "CREATE TABLE payments_a PARTITION OF payments FOR VALUES FROM (MINVALUE) TO ('m')",
        "CREATE TABLE payments_m PARTITION OF payments FOR VALUES FROM ('m') TO ('t')",
        "CREATE INDEX ON payments (transaction_id)",
        """INSERT INTO payments (transaction_id)
           SELECT v FROM unnest(array['a1', 'a1', 'b2', 'b2', 'b2', 'c3', 'm1', 'm1', 'n2']) v""",
    )
    cfg = connect(dsn)
    assert (await scan(cfg)).groups == 3
    await run(cfg, MOVE)
    await execute(
        dsn,
        "ALTER TABLE payments DETACH PARTITION payments_m",
        "INSERT INTO payments_m (transaction_id) VALUES ('m1'), ('m1')",  # no longer ours
        "CREATE TABLE payments_t (id bigint NOT NULL, transaction_id text NOT NULL)",
        """INSERT INTO payments_t (id, transaction_id)
           VALUES (101, 't1'), (102, 't1'), (103, 't1'), (104, 'u1')""",
        "ALTER TABLE payments ATTACH PARTITION payments_t FOR VALUES FROM ('t') TO (MAXVALUE)",
    )
    detached = await table_checksum(dsn, "payments_m")

    result = await enforce(cfg, EnforceConfig(dedupe=MOVE))

    assert result.status == "created"
    assert [(a.partition, a.outcome) for a in result.attempts] == [
        ("public.payments_a", "built"),
        ("public.payments_t", "duplicates"),
        ("public.payments_t", "built"),
    ]
    assert result.attempts[1].rows_renamed == 2
    assert set(await attached_tree(dsn)) == {
        INDEX,
        "payments_a_transaction_id_key",
        "payments_t_transaction_id_key",
    }
    assert await duplicate_insert_rejected(dsn)
    # the detached table is untouched: no index built on it, its duplicates its own
    assert await table_checksum(dsn, "payments_m") == detached
    assert await fetchval(dsn, "SELECT to_regclass('payments_m_transaction_id_key')") is None


async def test_enforce_refuses_another_index_with_a_partitions_name(dsn: str) -> None:
    """Checked for every partition before anything is created."""
    await hash_by_key(dsn)
    await run(connect(dsn), MOVE)
    await execute(
        dsn, "CREATE INDEX payments_p2_transaction_id_key ON payments_p2 (lower(transaction_id))"
    )

    code, _, err = await cli("enforce", "-d", dsn, "--allow-row-movement")

    assert code == 3
    one_error_line(err, "payments_p2_transaction_id_key exists", "another definition")
    assert await fetchval(dsn, "SELECT to_regclass($1)", INDEX) is None
    assert await fetchval(dsn, "SELECT to_regclass('payments_p0_transaction_id_key')") is None
