"""The read-only side: the keyset scan uses the key's index, finds every duplicate group exactly
once however the key space is split into pages and ranges, and `scan` / `verify` report it with
the documented exit codes, without ever writing."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import asyncpg
import pytest

from bulkdedupe import ConnectConfig, RunConfig, ScanConfig, catalog, run, scan
from bulkdedupe.db import pool
from bulkdedupe.scanner import KeyRange, plan_ranges, scan_range
from bulkdedupe.sql import LowerBound, StateSql, TargetSql
from tests.factories import duplicate_groups, expected_plan, shuffled, state_schema_exists
from tests.helpers import create_payments, execute, run_cli, table_checksum

pytestmark = pytest.mark.anyio


def _cfg(dsn: str) -> ConnectConfig:
    return ConnectConfig(database_url=dsn)


def _random_layout(seed: int, keys: int, singles: int, nulls: int) -> dict[str | None, int]:
    """Duplicated keys of 2-6 rows spread over the whole key space, in mixed case and with
    non-ASCII letters so the collation's order (not Python's) decides where ranges cut."""
    rnd = random.Random(seed)
    alphabet = "abcXYZéß019-"
    layout: dict[str | None, int] = {}
    while len(layout) < keys + singles:
        k = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(3, 10)))
        layout.setdefault(k, rnd.randint(2, 6) if len(layout) < keys else 1)
    layout[None] = nulls
    return layout


# --- the keyset page uses the key index -----------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _assert_uses_index(plan_json: str, index: str, what: str) -> None:
    root = json.loads(plan_json)[0]["Plan"]
    # The page's ORDER BY (the order the checkpoint relies on) sorts at most the groups that
    # come out of a sorted aggregate (the page's duplicate groups and its total row), never
    # the page's entries: the aggregate reads them in the index's order.
    aggregate = root["Plans"][0] if root["Node Type"] == "Sort" else root
    assert (aggregate["Node Type"], aggregate.get("Strategy")) == ("Aggregate", "Sorted"), (
        f"{what}: the groups do not come from a GroupAggregate in\n{plan_json}"
    )
    nodes = list(_nodes(aggregate))
    kinds = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in kinds, f"{what}: sequential scan in\n{plan_json}"
    assert "Sort" not in kinds, f"{what}: the page is sorted instead of read in index order"
    assert "Incremental Sort" not in kinds, f"{what}: sorted in\n{plan_json}"
    used = {
        n.get("Index Name") for n in nodes if n["Node Type"] in ("Index Only Scan", "Index Scan")
    }
    assert index in used, f"{what}: {index} not used in\n{plan_json}"


async def test_keyset_scan_page_uses_the_key_index(dsn: str) -> None:
    layout: dict[str | None, int] = {f"tx-{i:06d}": 1 + (i % 7 == 0) for i in range(18_000)}
    layout[None] = 500
    await create_payments(dsn, rows=shuffled(layout, seed=1))
    await execute(dsn, "VACUUM ANALYZE payments")
    keys = sorted(k for k in layout if k is not None)
    lo, cursor, hi = keys[2_000], keys[6_000], keys[12_000]
    page = 500  # pages are small slices of a big table

    conn = await asyncpg.connect(dsn)
    try:
        target = await catalog.resolve(conn, _cfg(dsn))
        assert target.scan_index == "payments_transaction_id_idx"
        q = target.queries("bulkdedupe")
        shapes: list[tuple[LowerBound, bool, tuple[Any, ...]]] = [
            ("none", False, (None, None, page)),  # first page of a single range
            ("none", True, (None, hi, page)),  # first page of the first range
            ("inclusive", True, (lo, hi, page)),  # first page of a middle range
            ("inclusive", False, (lo, None, page)),  # first page of the last range
            ("exclusive", True, (cursor, hi, page)),  # any later page
            ("exclusive", False, (cursor, None, page)),
        ]
        for lower, upper, args in shapes:
            query = q.scan_page(lower, upper)
            what = f"scan_page({lower!r}, {upper})"
            # the plan for these very values (what the first executions get) ...
            _assert_uses_index(
                await conn.fetchval(f"EXPLAIN (FORMAT JSON) {query}", *args),
                target.scan_index,
                what + " custom plan",
            )
            # ... and the generic plan a prepared statement switches to after five executions
            await conn.execute(f"PREPARE page AS {query}")
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            literals = ", ".join("NULL" if a is None else f"'{a}'" for a in args[:2])
            _assert_uses_index(
                await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE page({literals}, {page})"),
                target.scan_index,
                what + " generic plan",
            )
            await conn.execute("RESET plan_cache_mode")
            await conn.execute("DEALLOCATE page")
    finally:
        await conn.close()


def test_scan_page_states_its_key_order() -> None:
    # The producer checkpoints a page's groups in the order they come, so the page must say
    # that order in SQL: a GroupAggregate keeps it today, a hash aggregate would not (the
    # EXPLAIN test above shows that the ORDER BY sorts only the groups, never the entries).
    # The total row (the ROLLUP's, GROUPING 1) comes last.
    q = TargetSql(
        table="payments",
        key="k",
        pk="id",
        key_type="text",
        pk_type="int8",
        keep=(),
        state=StateSql("bulkdedupe"),
    )
    lowers: tuple[LowerBound, ...] = ("none", "inclusive", "exclusive")
    for lower in lowers:
        for upper in (False, True):
            outer = " ".join(q.scan_page(lower, upper).rsplit(") p", 1)[1].split())
            assert outer == (
                "GROUP BY ROLLUP (p.k) HAVING count(*) > 1 OR GROUPING(p.k) = 1 "
                "ORDER BY GROUPING(p.k), p.k"
            )


class _CountingProbes:
    """The pool scan_range reads through, counting the `count_key` probes it sends (every
    query still goes to the server as it is)."""

    def __init__(self, pool: asyncpg.Pool, probe: str) -> None:
        self.pool, self.probe, self.probes = pool, probe, 0

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        return await self.pool.fetch(query, *args)

    async def fetchval(self, query: str, *args: object) -> object:
        self.probes += query == self.probe
        return await self.pool.fetchval(query, *args)


async def test_scan_pages_come_in_key_order_with_their_groups_whole(dsn: str) -> None:
    # Every page's groups in the column's own order (as PostgreSQL sorts, not Python), each group
    # once and whole across page boundaries: what the ORDER BY must not change. A page that
    # ends inside a key's run leaves that key to the next page (no second query), except when
    # the page holds nothing else: "big" (100 rows) is longer than a 37-entry page.
    layout = _random_layout(seed=3, keys=400, singles=300, nulls=20) | {"big": 100}
    collation = await _linguistic_collation(dsn)
    key_type = f'varchar(64) COLLATE "{collation}"' if collation else "varchar(64)"
    await create_payments(dsn, rows=shuffled(layout, seed=3), key_type=key_type)
    truth = await duplicate_groups(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        target = await catalog.resolve(conn, _cfg(dsn))
    finally:
        await conn.close()
    q = target.queries("bulkdedupe")
    in_key_order = (
        "SELECT coalesce(array_agg(DISTINCT transaction_id ORDER BY transaction_id), '{}') "
        "FROM payments WHERE transaction_id = ANY($1)"
    )
    groups_up_to = (
        "SELECT coalesce(array_agg(transaction_id), '{}') FROM (SELECT transaction_id "
        "FROM payments WHERE transaction_id <= $1 GROUP BY 1 HAVING count(*) > 1) g"
    )
    entries = sum(n for k, n in layout.items() if k is not None)
    # 37: pages ending anywhere, "big" counted by one probe; `entries`: one page exactly
    # full, then a short one that reads its last key again, whole
    for page_size, probes in ((37, 1), (entries, 0)):
        seen: list[str] = []
        read = pages = 0
        async with pool(_cfg(dsn), size=2) as p:
            counting = _CountingProbes(p, q.count_key)
            async for page in scan_range(
                cast(asyncpg.Pool, counting), q, KeyRange(0, None, None), page_size=page_size
            ):
                keys = [g.key for g in page.groups]
                assert keys == await p.fetchval(in_key_order, keys)
                seen += keys
                read += page.rows_read
                pages += 1
                if page.last_key is not None:  # the checkpoint: no group at or before it left
                    assert set(await p.fetchval(groups_up_to, page.last_key)) <= set(seen)
        assert Counter(seen) == Counter(truth.keys()), page_size
        # every non-NULL entry counted once (the progress bar's figure), the cut groups too
        assert read == entries, page_size
        assert counting.probes == probes, page_size
        # each page moves on by its entries but its last key's (at most 6, re-read next)
        if page_size == entries:
            assert pages == 2
        else:
            assert entries / page_size < pages <= entries / (page_size - 6) + 2


# --- every group once, however the scan is split --------------------------------------------------


async def _linguistic_collation(dsn: str) -> str | None:
    """A deterministic non-C collation, where the server's order differs from Python's (ICU
    or glibc en_US; the Debian PostgreSQL 15 of CI has them, the embedded server only C)."""
    conn = await asyncpg.connect(dsn)
    try:
        name = await conn.fetchval(
            """
            SELECT collname FROM pg_collation
            WHERE collisdeterministic
              AND collname IN ('und-x-icu', 'en-x-icu', 'en_US.utf8', 'en_US.UTF-8')
              AND collencoding IN (-1, (SELECT encoding FROM pg_database
                                        WHERE datname = current_database()))
            ORDER BY collname DESC LIMIT 1
            """
        )
    finally:
        await conn.close()
    return str(name) if name else None


async def test_several_scanners_find_exactly_the_groups_of_one(dsn: str) -> None:
    layout = _random_layout(seed=8, keys=2_500, singles=1_500, nulls=300)
    collation = await _linguistic_collation(dsn)
    key_type = f'varchar(64) COLLATE "{collation}"' if collation else "varchar(64)"
    await create_payments(dsn, rows=shuffled(layout, seed=8), key_type=key_type)
    await execute(dsn, "ANALYZE payments")
    truth = await duplicate_groups(dsn)
    cfg = _cfg(dsn)

    conn = await asyncpg.connect(dsn)
    try:
        target = await catalog.resolve(conn, cfg)
        ranges = await plan_ranges(conn, target, 4)
    finally:
        await conn.close()
    # The premise: the histogram really splits the keys, and some cut falls on a duplicated
    # key (whose rows must all land in one range).
    assert len(ranges) == 4
    assert any(r.lo in truth for r in ranges)

    one = await scan(cfg, ScanConfig(scanners=1, page_size=97, top=10_000))
    four = await scan(cfg, ScanConfig(scanners=4, page_size=97, top=10_000))

    for report in (one, four):
        assert report.groups == len(truth)
        assert report.rows_to_rename == sum(n - 1 for n in truth.values())
        # a group counted twice (or split in two) would show up twice or with a smaller size
        assert Counter(report.largest_groups) == Counter(truth.items())

    # Range by range: disjoint, and together exactly the groups.
    seen: list[str] = []
    async with pool(cfg, size=2) as p:
        q = target.queries("bulkdedupe")
        for rng in ranges:
            async for page in scan_range(p, q, rng, page_size=97):
                for g in page.groups:
                    assert truth[g.key] == g.count
                    seen.append(g.key)
    assert sorted(seen) == sorted(truth)


@pytest.mark.parametrize("scanners", [1, 3])
async def test_group_straddling_page_boundaries_is_counted_once(dsn: str, scanners: int) -> None:
    # page_size 3 and groups of 5 (and one of 12): every group spans two to four pages.
    layout: dict[str | None, int] = {f"g{i:02d}": 5 for i in range(30)}
    layout |= {f"g{i:02d}x": 1 for i in range(0, 30, 3)}  # singles between some groups
    layout |= {"g99": 12, "a": 2, None: 4}
    await create_payments(dsn, rows=shuffled(layout, seed=9))
    await execute(dsn, "ANALYZE payments")
    truth = await duplicate_groups(dsn)
    cfg = _cfg(dsn)

    report = await scan(cfg, ScanConfig(scanners=scanners, page_size=3, top=1_000))

    assert Counter(report.largest_groups) == Counter(truth.items())
    assert report.groups == len(truth) == 32
    assert report.rows_to_rename == sum(n - 1 for n in truth.values())


async def test_dry_run_over_tiny_pages_plans_each_row_once(dsn: str, tmp_path: Path) -> None:
    layout: dict[str | None, int] = {f"g{i:02d}": 5 for i in range(20)}
    layout |= {"g99": 12, "s": 1, None: 3}
    await create_payments(dsn, rows=shuffled(layout, seed=10))
    expected = await expected_plan(dsn)
    out = tmp_path / "plan.jsonl"

    summary = await run(
        _cfg(dsn),
        RunConfig(output=out, batch_size=4, scan=ScanConfig(page_size=3, scanners=2)),
    )

    plan = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p["pk"] for p in plan) == sorted(expected.losers)
    assert {p["pk"]: p["survivor_pk"] for p in plan} == {
        pk: survivor for pk, (_, survivor) in expected.losers.items()
    }
    assert summary.rows_renamed == expected.renamed


async def test_scan_reports_the_largest_groups(dsn: str) -> None:
    layout: dict[str | None, int] = {"big": 50, "mid": 20, "small": 7, None: 30}
    layout |= {f"pair{i}": 2 + i % 2 for i in range(40)}
    layout |= {f"single{i}": 1 for i in range(100)}
    await create_payments(dsn, rows=shuffled(layout, seed=11))
    truth = await duplicate_groups(dsn)
    by_size = sorted(truth.items(), key=lambda kv: -kv[1])
    assert by_size[2][1] > by_size[3][1]  # the top 3 are unambiguous

    report = await scan(_cfg(dsn), ScanConfig(top=3, page_size=25))

    assert list(report.largest_groups) == by_size[:3]
    assert report.groups == len(truth)
    assert report.rows_to_rename == sum(n - 1 for n in truth.values())
    assert report.ok is False

    none = await scan(_cfg(dsn), ScanConfig(top=0))
    assert none.largest_groups == ()
    assert none.groups == len(truth)


async def test_scan_writes_nothing_and_never_creates_the_state_schema(dsn: str) -> None:
    await create_payments(dsn, rows=shuffled({"a": 3, "b": 1, None: 2}))
    checksum = await table_checksum(dsn)

    report = await scan(_cfg(dsn))

    assert report.groups == 1
    assert await table_checksum(dsn) == checksum
    assert not await state_schema_exists(dsn)


# --- through the command line ---------------------------------------------------------------------


def test_cli_scan_run_verify_exit_codes_and_json(dsn: str) -> None:
    layout: dict[str | None, int] = {"tx1": 3, "tx2": 2, "big": 40, "ok": 1, None: 25}
    anyio.run(lambda: create_payments(dsn, rows=shuffled(layout, seed=12)))
    truth = anyio.run(duplicate_groups, dsn)
    checksum = anyio.run(table_checksum, dsn)
    common = ["-d", dsn, "--format", "json"]

    scanned = run_cli("scan", *common, "--top", "2")
    assert scanned.returncode == 1, scanned.stderr
    report = json.loads(scanned.stdout)
    assert report["ok"] is False
    assert report["groups"] == len(truth)
    assert report["rows_to_rename"] == sum(n - 1 for n in truth.values())
    assert [(g["value"], g["rows"]) for g in report["largest_groups"]] == [("big", 40), ("tx1", 3)]

    verified = run_cli("verify", *common)
    assert verified.returncode == 1, verified.stderr
    assert json.loads(verified.stdout)["groups"] == len(truth)

    # read-only so far
    assert anyio.run(table_checksum, dsn) == checksum
    assert not anyio.run(state_schema_exists, dsn)

    applied = run_cli("run", *common, "--apply", "--batch-size", "10", "--concurrency", "2")
    assert applied.returncode == 0, applied.stderr
    summary = json.loads(applied.stdout)
    assert summary["status"] == "completed"
    assert summary["rows_renamed"] == sum(n - 1 for n in truth.values())

    clean = run_cli("scan", *common)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["ok"] is True
    verified = run_cli("verify", *common)
    assert verified.returncode == 0, verified.stderr
    result = json.loads(verified.stdout)
    assert result["ok"] is True
    assert result["groups"] == 0
    assert anyio.run(duplicate_groups, dsn) == {}

    human = run_cli("scan", "-d", dsn)
    assert human.returncode == 0
    assert "duplicate groups" in human.stdout
