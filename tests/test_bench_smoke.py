"""The benchmark harness end to end on a tiny table, so `make bench` cannot rot unnoticed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import partitioned
from benchmarks.baselines import (
    extrapolate,
    heap_floor,
    heap_floor_checked,
    one_statement,
    per_row,
)
from benchmarks.generate import GenSpec, generate, plan
from benchmarks.oltp import KINDS, OltpResult
from benchmarks.pgbench import PgbenchConfig, find_pgbench, run_load
from benchmarks.run import Suite, _argv, _spec_for, impact_methods, parser, unavailable
from tests.helpers import REPO_ROOT, create_payments, sync

pytestmark = pytest.mark.slow


async def _databases(dsn: str, prefix: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", prefix + "%"
        )
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


@pytest.mark.timeout(120)
def test_bench_harness_end_to_end(dsn: str, tmp_path: Path) -> None:
    prefix = f"smoke_{uuid.uuid4().hex[:10]}"
    options = {
        "--rows": "5000",
        "--configs": "c2b100",
        "--idle-seconds": "1",
        "--lead-in-seconds": "0.3",
        "--per-row-max-rows": "100",
        "--oltp-rate": "40",
        "--results-dir": str(tmp_path),
        "--db-prefix": prefix,
    }
    argv = [sys.executable, "-m", "benchmarks.run", "-d", dsn, "--drop-templates", "--no-impact"]
    argv += ["--no-giant", "--no-partitioned", *(part for pair in options.items() for part in pair)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=100, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Targets (issues 3, 10, 11 and 12)" in proc.stdout

    (result_file,) = tmp_path.glob("*.json")
    results = json.loads(result_file.read_text())
    assert results["server"]["settings"]["fsync"] in ("on", "off")
    assert results["server"]["version_num"] > 0
    assert results["machine"]["cpus"] >= 1
    assert results["parameters"]["load"]["kind"] == "pgbench"
    (dataset,) = results["datasets"]
    expected = dataset["stats"]["rows_to_rename"]
    assert expected > 100

    by_method = {r["method"]: r for r in results["methods"]}
    assert set(by_method) == {"idle", "one-statement", "bulkdedupe", "batched", "per-row"}
    assert by_method["idle"]["oltp"]["requests"] > 0
    for name in ("one-statement", "bulkdedupe", "batched", "per-row"):
        r = by_method[name]
        assert r["correctness"]["passed"], (name, r["correctness"], r.get("error"))
        for figure in (
            "duration_s",
            "rows_per_s",
            "time_vs_one_statement",
            "txn_ms_p50",
            "txn_ms_p99",
            "txn_ms_max",
            "wal_bytes",
            "wal_bytes_per_row",
            "peak_rss_bytes",
        ):
            assert r[figure] is not None, (name, figure)
        assert r["peak_rss_bytes"] > 10 * 1024 * 1024
        assert {"p50_ms", "p99_ms", "max_ms", "over_1s", "requests"} <= r["oltp"].keys()
        assert r["oltp_timeline"]

    def original_renames(r: dict[str, Any]) -> int:
        # pgbench inserts live duplicates: a method renames those it meets on top.
        assert r["correctness"]["load_inserts_committed"] > 0
        return int(r["rows_renamed"] - r["correctness"]["load_rows_renamed"])

    assert original_renames(by_method["one-statement"]) == expected
    assert by_method["one-statement"]["time_vs_one_statement"] == 1.0
    bulk = by_method["bulkdedupe"]
    assert original_renames(bulk) == expected
    assert bulk["scan_rows_per_s"] > 0
    assert bulk["longest_scan_ms"] is not None
    floor = by_method["batched"]
    assert original_renames(floor) == expected
    assert floor["transactions"] == -(-floor["rows_renamed"] // 1000)  # 1000-row batches
    assert not floor["extrapolated"]
    # Capped by --per-row-max-rows: the rest is extrapolated, and said so.
    per_row = by_method["per-row"]
    assert per_row["rows_renamed"] == 100
    assert per_row["extrapolated"]
    assert per_row["estimated_duration_s"] >= per_row["duration_s"]

    statuses = {t["status"] for t in results["targets"]}
    assert statuses <= {"PASS", "FAIL", "SKIP", "SHOWN", "NOT SEEN"}
    assert results["targets"][0]["status"] == "PASS"  # every method left the expected table
    stem = result_file.with_suffix("")
    assert stem.with_suffix(".md").read_text().startswith("# bulkdedupe benchmark")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(results["plots"])
    assert len(results["plots"]) == 2
    # The harness drops the databases it made.
    assert asyncio.run(_databases(dsn, prefix)) == []


@pytest.mark.timeout(150)
def test_bench_giant_group_part_end_to_end(dsn: str, tmp_path: Path) -> None:
    """Issue 12's part on a tiny table: a 1,000-row junk group (20 % of 5,000 rows) renamed by
    the tool, the same renames as pairs, the one-statement UPDATE on the junk data; the ratio
    and the RSS judged and printed."""
    prefix = f"smoke_{uuid.uuid4().hex[:10]}"
    argv = [sys.executable, "-m", "benchmarks.run", "-d", dsn, "--drop-templates", "--giant"]
    argv += ["--giant-rows", "5000", "--junk-value", "N/A", "--lead-in-seconds", "0.3"]
    argv += ["--oltp-rate", "40", "--results-dir", str(tmp_path), "--db-prefix", prefix]
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=130, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Giant groups: one junk value in 20% of 5,000 rows" in proc.stdout

    (result_file,) = tmp_path.glob("*.json")
    results = json.loads(result_file.read_text())
    assert results["suite"] == "giant (custom)"
    assert results["parameters"]["giant"]["junk_value"] == "N/A"
    shapes = {ds["shape"]: ds["stats"] for ds in results["datasets"]}
    assert set(shapes) == {"junk", "pairs"}
    assert shapes["junk"]["largest_group"] == 1000
    assert shapes["junk"]["duplicate_groups"] == 1
    assert shapes["pairs"]["largest_group"] == 2
    assert shapes["junk"]["rows_to_rename"] == shapes["pairs"]["rows_to_rename"] == 999

    by = {(r["method"], r["shape"]): r for r in results["methods"]}
    assert set(by) == {("one-statement", "junk"), ("bulkdedupe", "junk"), ("bulkdedupe", "pairs")}
    for key, r in by.items():
        assert r["part"] == "giant"
        assert r["correctness"]["passed"], (key, r["correctness"], r.get("error"))
        assert r["rows_per_s"] > 0
        assert r["peak_rss_bytes"] > 10 * 1024 * 1024
        # The load never touched the junk value: all it inserted are other keys' duplicates.
        assert r["correctness"]["load_inserts_committed"] > 0
    giant = by["bulkdedupe", "junk"]
    assert giant["rows_renamed"] - giant["correctness"]["load_rows_renamed"] == 999
    assert giant["time_vs_one_statement"] is not None
    assert by["bulkdedupe", "pairs"]["time_vs_one_statement"] is None

    targets = {t["target"]: t for t in results["targets"]}
    speed = targets[
        "1k group (20% of 5k rows): rows/s >= 50% of the same renames as pairs (--max-impact off)"
    ]
    assert speed["status"] in ("PASS", "FAIL")
    ratio = giant["rows_per_s"] / by["bulkdedupe", "pairs"]["rows_per_s"]
    assert f"{ratio:.2f}x" in speed["detail"]
    rss = targets["1k group (20% of 5k rows): peak RSS of the tool <= 200 MB"]
    assert rss["status"] == "PASS"
    assert results["targets"][0]["status"] == "PASS"  # every method left the expected table
    assert "Floors: the group at >= 50% of the pairs' rows/s" in proc.stdout
    assert asyncio.run(_databases(dsn, prefix)) == []


def test_giant_part_is_in_the_suites_and_its_data_sets_match() -> None:
    """`make bench` (--quick) has the quick giant variant, `make bench-full` the issue's two
    sizes; the pairs data set has exactly the junk group's number of renames, all in pairs."""
    from benchmarks.run import GIANT_FULL_ROWS, GIANT_QUICK_ROWS, GIANT_ROWS, build_suite

    def giant_sizes(*argv: str) -> list[int]:
        suite = build_suite(parser().parse_args(list(argv)))
        return [rows for rows, methods in suite.plans if methods[0].part == "giant"]

    assert giant_sizes("--quick") == list(GIANT_QUICK_ROWS)
    assert giant_sizes("--full") == list(GIANT_FULL_ROWS) == [1_000_000, 5_000_000]
    assert giant_sizes("--giant") == list(GIANT_ROWS) == [1_000_000]
    assert giant_sizes("--quick", "--no-giant") == []
    assert giant_sizes("--impact") == []
    full = build_suite(parser().parse_args(["--full"]))
    assert full.giant_max_seconds > build_suite(parser().parse_args([])).giant_max_seconds
    suite = Suite(name="t", plans=())
    for rows in (5_000, 1_000_000, 5_000_000):
        junk, pairs = plan(_spec_for(suite, rows, "junk")), plan(_spec_for(suite, rows, "pairs"))
        assert junk.duplicate_groups == 1
        assert junk.segments[0].junk
        assert junk.segments[0].size == rows // 5
        assert pairs.rows_to_rename == junk.rows_to_rename == rows // 5 - 1
        assert {s.size for s in pairs.segments} == {1, 2}


@pytest.mark.anyio
async def test_generate_a_junk_group_on_top_of_the_usual_duplicates(dsn: str) -> None:
    spec = GenSpec(rows=4_000, junk_fraction=0.25, junk_value="it's junk", payload_width=0)
    stats = await generate(dsn, spec)
    layout = plan(spec)
    assert stats.rows_to_rename == layout.rows_to_rename == 999 + round(0.05 * 4_000)
    assert stats.largest_group == 1_000
    conn = await asyncpg.connect(dsn)
    try:
        junk = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT amount) AS amounts, min(id) AS lo, "
            "max(id) AS hi FROM payments WHERE transaction_id = 'it''s junk'"
        )
    finally:
        await conn.close()
    assert junk is not None
    assert junk["n"] == 1_000
    # Unrelated payments that share a junk key, scattered over the heap.
    assert junk["amounts"] > 900
    assert junk["lo"] < 200
    assert junk["hi"] > 3_800


@pytest.mark.timeout(150)
def test_bench_partitioned_part_end_to_end(dsn: str, tmp_path: Path) -> None:
    """Issue 11's part on a tiny table: 4,000 rows over 8 hash partitions, unique per merchant;
    the scoped one-statement UPDATE, `run --apply --scope` and `enforce --scope` on identical
    copies, each end state checked, enforce's phases grouped and printed."""
    prefix = f"smoke_{uuid.uuid4().hex[:10]}"
    argv = [sys.executable, "-m", "benchmarks.run", "-d", dsn, "--drop-templates", "--partitioned"]
    argv += ["--partitioned-rows", "4000", "--results-dir", str(tmp_path), "--db-prefix", prefix]
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=130, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Partitioned: 4,000 rows over 8 hash partitions" in proc.stdout
    assert "**bulkdedupe run / one-statement UPDATE: " in proc.stdout
    assert "Every method left the same table" in proc.stdout
    assert "- Load during every method" not in proc.stdout  # no load here: none is claimed

    (result_file,) = tmp_path.glob("*.json")
    results = json.loads(result_file.read_text())
    assert results["suite"] == "partitioned (custom)"
    (dataset,) = results["datasets"]
    assert dataset["shape"] == "partitioned"
    assert dataset["partitions"] == 8
    assert dataset["cross_scope_keys"] == 20  # 1 % of 4,000 rows, in pairs
    assert dataset["stats"]["rows_to_rename"] == 200

    by = {r["method"]: r for r in results["methods"]}
    assert set(by) == {"one-statement", "bulkdedupe", "enforce"}
    for name, r in by.items():
        assert r["part"] == "partitioned"
        c = r["correctness"]
        assert c["passed"], (name, c, r.get("error"))
        assert c["duplicate_groups_left"] == 0
        assert r["rows_renamed"] == c["renamed_in_table"] == 200
        assert r["peak_rss_bytes"] > 10 * 1024 * 1024
        assert r["wal_bytes"] is not None
    # The same renames: one end state for all three.
    assert len({r["correctness"]["checksum"] for r in by.values()}) == 1
    assert by["one-statement"]["time_vs_one_statement"] == 1.0
    assert by["bulkdedupe"]["time_vs_one_statement"] > 0
    assert by["bulkdedupe"]["summary"]["status"] == "completed"

    enforce = by["enforce"]
    assert enforce["summary"]["status"] == "created"
    assert enforce["summary"]["partitioned"] is True
    assert len(enforce["summary"]["partition_indexes"]) == 8
    index = enforce["correctness"]["index"]
    assert index["valid"]
    assert index["is_unique"]
    assert index["leaves"] == index["valid_leaf_indexes"] == 8
    stages = {s["stage"]: s for s in enforce["stages"]}
    builds = stages["build the partitions' unique indexes CONCURRENTLY"]
    assert builds["count"] == 8
    assert stages["dedupe (audited run)"]["detail"] == "200 renames"
    phases = sum(p["seconds"] for p in enforce["summary"]["phases"])
    assert sum(s["seconds"] for s in stages.values()) == pytest.approx(
        max(phases, enforce["duration_s"]), abs=0.01
    )

    targets = {t["target"]: t for t in results["targets"]}
    what = "4k rows over 8 hash partitions, unique per merchant"
    built = targets[
        f"{what}: enforce builds the partitioned unique index (all 8 partitions valid and "
        "attached) and proves a duplicate is rejected"
    ]
    assert built["status"] == "PASS"
    ratio = by["bulkdedupe"]["duration_s"] / by["one-statement"]["duration_s"]
    shown = targets[f"{what}: run --apply --scope (--max-impact off) vs the one-statement UPDATE"]
    assert f"{ratio:.2f}x" in shown["detail"]
    assert targets[f"{what}: enforce's phases"]["status"] == "SHOWN"
    assert results["targets"][0]["status"] == "PASS"  # every method left the expected table
    assert asyncio.run(_databases(dsn, prefix)) == []


def test_partitioned_part_is_in_the_suites_and_scoped() -> None:
    """`make bench-full` has the issue's 5M rows over 8 partitions, `make bench` the 100k
    variant; every command of the part is scoped to merchant_id, the tool at full speed."""
    from benchmarks.run import (
        PARTITIONED_QUICK_ROWS,
        PARTITIONED_ROWS,
        build_suite,
        partitioned_methods,
    )

    def sizes(*argv: str) -> list[int]:
        suite = build_suite(parser().parse_args(list(argv)))
        return [rows for rows, methods in suite.plans if methods[0].part == "partitioned"]

    assert sizes("--full") == list(PARTITIONED_ROWS) == [5_000_000]
    assert sizes("--quick") == sizes() == list(PARTITIONED_QUICK_ROWS) == [100_000]
    assert sizes("--partitioned") == [5_000_000]
    assert sizes("--partitioned", "--quick") == [100_000]
    assert sizes("--partitioned", "--partitioned-rows", "2000") == [2000]
    assert sizes("--quick", "--no-partitioned") == []
    assert sizes("--impact") == sizes("--giant") == []
    only = build_suite(parser().parse_args(["--partitioned"]))
    assert {m.part for _, methods in only.plans for m in methods} == {"partitioned"}

    suite = Suite(name="t", plans=())
    spec = _spec_for(suite, 5_000_000, "partitioned")
    assert (spec.partitions, spec.merchants) == (8, 1000)
    layout = plan(spec)
    assert layout.rows_to_rename == 250_000  # 5 % of the rows, within merchants
    (cross,) = [s for s in layout.segments if s.cross]
    assert cross.size * cross.count == 50_000
    options = {"max_impact": True, "max_impact_default": "3.0", "scope": True}
    for method in partitioned_methods():
        argv = _argv(method, "postgresql://x", suite, options)
        assert argv[argv.index("--scope") + 1] == "merchant_id"
        if method.kind == "one-statement":
            assert argv[argv.index("--pk") + 1] == "id,merchant_id"
        else:
            assert argv[argv.index("--max-impact") + 1] == "off"
            assert argv[argv.index("--format") + 1] == "json"
            assert unavailable(method, options | {"scope": False}) is not None
    kinds = [m.kind for m in partitioned_methods()]
    assert kinds == ["one-statement", "bulkdedupe", "enforce"]


@pytest.mark.anyio
async def test_generate_a_hash_partitioned_table_unique_per_merchant(dsn: str) -> None:
    spec = GenSpec(
        rows=4_000, merchants=50, cross_scope_fraction=0.02, partitions=4, payload_width=0
    )
    stats = await generate(dsn, spec)
    layout = plan(spec)
    assert stats.rows_to_rename == layout.rows_to_rename == 200
    conn = await asyncpg.connect(dsn)
    try:
        leaves = await conn.fetchval(
            "SELECT count(*) FROM pg_partition_tree('payments') WHERE isleaf"
        )
        strategy = await conn.fetchval(
            "SELECT partstrat::text FROM pg_partitioned_table "
            "WHERE partrelid = 'payments'::regclass"
        )
        indexes = {
            r["name"]: r["definition"]
            for r in await conn.fetch(
                "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'payments'::regclass"
            )
        }
        # Every duplicate group lies within one merchant; across merchants only the planned
        # cross-scope pairs share a key.
        unscoped = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE merchants > 1) AS cross_keys, "
            "max(merchants) AS most_merchants, "
            "count(*) FILTER (WHERE merchants > 1 AND n <> 2) AS odd_cross "
            "FROM (SELECT transaction_id, count(*) AS n, count(DISTINCT merchant_id) AS merchants "
            "FROM payments GROUP BY transaction_id) AS g"
        )
        merchants = await conn.fetchrow(
            "SELECT min(merchant_id) AS lo, max(merchant_id) AS hi, "
            "count(DISTINCT merchant_id) AS n FROM payments"
        )
    finally:
        await conn.close()
    assert leaves == 4
    assert strategy == "h"
    assert "(id, merchant_id)" in indexes["payments_pkey"]
    assert "(merchant_id, transaction_id)" in indexes["payments_merchant_id_transaction_id_idx"]
    assert unscoped is not None
    assert unscoped["cross_keys"] == 40  # 2 % of 4,000 rows, in pairs
    assert unscoped["most_merchants"] == 2
    assert unscoped["odd_cross"] == 0
    assert merchants is not None
    assert (merchants["lo"], merchants["hi"]) == (1, 50)


def test_scoped_one_statement_renames_within_the_scope_as_the_tool_does(dsn: str) -> None:
    """The one-statement baseline with a scope and a composite pk: only rows equal on (scope,
    key) are duplicates, NULL never is, the survivor is the lowest pk, the others become
    {value}-{id}-{merchant_id}."""

    async def go() -> list[tuple[int, int, str | None]]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                "CREATE TABLE payments (id bigint, merchant_id int, transaction_id text, "
                "PRIMARY KEY (id, merchant_id))"
            )
            await conn.executemany(
                "INSERT INTO payments VALUES ($1, $2, $3)",
                [(1, 1, "a"), (2, 1, "a"), (3, 2, "a"), (4, 1, None), (5, 1, None), (6, 1, "a")],
            )
        finally:
            await conn.close()
        result = await one_statement(dsn, pk="id,merchant_id", scope=["merchant_id"])
        assert result.rows_renamed == 2
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT * FROM payments ORDER BY id")
        finally:
            await conn.close()
        return [(r["id"], r["merchant_id"], r["transaction_id"]) for r in rows]

    assert sync(go()) == [
        (1, 1, "a"),
        (2, 1, "a-2-1"),
        (3, 2, "a"),
        (4, 1, None),
        (5, 1, None),
        (6, 1, "a-6-1"),
    ]


def test_enforce_stages_group_its_phases() -> None:
    summary = {
        "duration_s": 10.0,
        "attempts": [
            {"number": 1, "outcome": "duplicates", "partition": "public.p0", "rows_renamed": 7},
            {"number": 2, "outcome": "built", "partition": "public.p0", "rows_renamed": 0},
            {"number": 1, "outcome": "built", "partition": "public.p1", "rows_renamed": 0},
        ],
        "phases": [
            {"phase": "inspect", "seconds": 0.1},
            {"phase": "create partitioned index (ON ONLY)", "seconds": 0.1},
            {"phase": "build public.p0 (attempt 1)", "seconds": 1.0},
            {"phase": "drop invalid index public.p0 (attempt 1)", "seconds": 0.5},
            {"phase": "dedupe public.p0 (attempt 1)", "seconds": 4.0},
            {"phase": "build public.p0 (attempt 2)", "seconds": 1.5},
            {"phase": "attach partition indexes", "seconds": 0.2},
            {"phase": "build public.p1 (attempt 1)", "seconds": 2.0},
            {"phase": "check valid", "seconds": 0.05},
            {"phase": "prove", "seconds": 0.05},
            {"phase": "something new", "seconds": 0.1},
        ],
    }
    stages = {s["stage"]: s for s in partitioned.stages(summary)}
    assert stages["failed builds (duplicates)"]["seconds"] == 1.0
    builds = stages["build the partitions' unique indexes CONCURRENTLY"]
    assert (builds["seconds"], builds["count"]) == (3.5, 2)
    assert builds["detail"] == "2 partitions, 1.50–2.00 s each"
    assert stages["dedupe (audited run)"]["detail"] == "7 renames"
    assert stages["something new"]["seconds"] == 0.1
    assert stages["outside the phases (connect, locks, catalog)"]["seconds"] == pytest.approx(0.4)
    assert sum(s["seconds"] for s in stages.values()) == pytest.approx(10.0)


async def _pgbench_for(dsn: str, seconds: float, max_id: int) -> OltpResult:
    stop, ready = anyio.Event(), anyio.Event()
    results: list[OltpResult] = []
    cfg = PgbenchConfig(rate=100, connections=2, keys=50, drain_seconds=5)

    async def load() -> None:
        results.append(await run_load(dsn, cfg, stop, max_id=max_id, ready=ready))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        with anyio.fail_after(30):
            await ready.wait()
        await anyio.sleep(seconds)
        stop.set()
    return results[0]


@pytest.mark.timeout(60)
def test_pgbench_load_on_an_idle_table(dsn: str) -> None:
    """The production-impact load on a tiny table: pgbench is there, its scripts parse, a short
    run's log yields every kind of transaction with real latencies, and its inserts are rows."""
    assert Path(find_pgbench()).is_file()
    sync(create_payments(dsn, rows=[(f"k{i % 50}",) for i in range(200)]))
    result = sync(_pgbench_for(dsn, seconds=1.0, max_id=200))
    summary = result.summary()
    assert summary["requests"] > 0
    assert summary["p99_ms"] > 0
    assert summary["errors"] == 0
    assert result.unfinished == 0
    assert not result.notes
    assert {s.kind for s in result.samples} == set(KINDS)
    assert all(s.latency_ms >= s.service_ms > 0 for s in result.samples)
    inserts = sum(1 for s in result.samples if s.kind == "insert")

    async def inserted() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM payments WHERE id > 200"))
        finally:
            await conn.close()

    # Each insert reuses a key of the table: a live duplicate for the method under test.
    assert sync(inserted()) == inserts


def test_impact_methods_without_the_governor_run_or_say_not_available() -> None:
    """The impact part runs on a tool with or without `--max-impact`: governed methods are
    "not available" without it, the others leave the option out; with it, "the default" runs
    issue 10's budget when the tool's own default is off."""
    methods = {m.label: m for m in impact_methods(full=True, rates=[4000.0])}
    suite = Suite(name="t", plans=())
    old = {"max_impact": False, "max_impact_default": None}
    assert unavailable(methods["bulkdedupe defaults"], old) is not None
    assert unavailable(methods["bulkdedupe --max-impact 1.5"], old) is not None
    for label in ("bulkdedupe --max-impact off", "bulkdedupe --max-rate 4000"):
        assert unavailable(methods[label], old) is None
        assert "--max-impact" not in _argv(methods[label], "postgresql://x", suite, old)
    off_default = {"max_impact": True, "max_impact_default": "off"}
    argv = _argv(methods["bulkdedupe defaults"], "postgresql://x", suite, off_default)
    assert argv[argv.index("--max-impact") + 1] == "3"
    argv = _argv(
        methods["bulkdedupe defaults"],
        "postgresql://x",
        suite,
        off_default | {"max_impact_default": "3.0"},
    )
    assert "--max-impact" not in argv


def test_per_row_estimate_is_never_below_the_time_measured(dsn: str) -> None:
    """A fast machine finishes the measured part in milliseconds: the extrapolated full time
    must still be at least that (it was rounded to 0.0 s once)."""
    sync(create_payments(dsn, rows=[(f"k{i % 50}",) for i in range(100)]))
    result = sync(per_row(dsn, max_rows=2))
    assert result.extrapolated
    assert result.rows_renamed == 2
    assert result.estimated_duration_s >= result.duration_s > 0


@given(
    scan_s=st.floats(min_value=0, max_value=100),
    update_s=st.floats(min_value=0, max_value=100),
    done=st.integers(min_value=0, max_value=10**6),
    more=st.integers(min_value=0, max_value=10**6),
)
def test_extrapolation_is_at_least_the_measured_time(
    scan_s: float, update_s: float, done: int, more: int
) -> None:
    seconds = scan_s + update_s
    estimate = extrapolate(seconds, scan_s, done, done + more)
    assert estimate >= seconds
    if not more:
        assert estimate == seconds


@pytest.mark.timeout(240)
@pytest.mark.parametrize("checked", [False, True], ids=["unchecked", "checked"])
def test_heap_floor_renames_as_the_tool_does_in_heap_order(dsn: str, checked: bool) -> None:
    """The heap-order floor (issue 13): the lowest id of each value kept, the others renamed
    to {value}-{id} with one audit row each, in transactions that follow the heap (each
    batch's rows found by ctid), so its figures are comparable with the tool's. Checked (its
    locks, survivor and new-value checks): the same table, and where a new value is already
    taken, that row is left alone instead of made a new duplicate."""

    async def go() -> tuple[int, list[tuple[int, str | None]], int]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE payments (id bigint PRIMARY KEY, transaction_id text)")
            rows = [(i, f"v{i % 7}" if i % 3 else f"u{i}") for i in range(1, 61)]
            await conn.executemany("INSERT INTO payments VALUES ($1, $2)", [*rows, (61, None)])
            if checked:  # v1-8's new value, taken: the checked floor must not rename id 8
                await conn.execute("INSERT INTO payments VALUES (62, 'v1-8')")
            await conn.execute("CREATE INDEX ON payments (transaction_id)")
        finally:
            await conn.close()
        run = heap_floor_checked if checked else heap_floor
        result = await run(dsn, batch_size=4, concurrency=2)
        conn = await asyncpg.connect(dsn)
        try:
            after = await conn.fetch("SELECT id, transaction_id FROM payments ORDER BY id")
            audited = await conn.fetchval("SELECT count(*) FROM bench_batched_audit")
        finally:
            await conn.close()
        assert result.rows_to_rename - checked == result.rows_renamed
        assert result.transactions == -(-result.rows_to_rename // 4)
        assert result.method == ("heap-floor-checked" if checked else "heap-floor")
        return result.rows_renamed, [(r["id"], r["transaction_id"]) for r in after], audited

    renamed, after, audited = sync(go())
    first: dict[str, int] = {}
    expected: list[tuple[int, str | None]] = []
    for i in range(1, 61):
        value = f"v{i % 7}" if i % 3 else f"u{i}"
        keep = first.setdefault(value, i) == i or (checked and i == 8)
        expected.append((i, value if keep else f"{value}-{i}"))
    assert after == [*expected, (61, None), *([(62, "v1-8")] if checked else [])]
    assert renamed == audited == 40 - 7 - checked  # 40 rows share 7 values


def test_anatomy_end_to_end(dsn: str, tmp_path: Path) -> None:
    """benchmarks.anatomy (issue 13) on a tiny table: each method runs on its own copy and is
    checked, the server's counters are read around it, the tool's round trips are traced, and
    the WAL is read back with pg_waldump when the server's pg_wal is at hand."""
    prefix = f"smoke_{uuid.uuid4().hex[:10]}"
    argv = [sys.executable, "-m", "benchmarks.anatomy", "-d", dsn, "--rows", "5000"]
    argv += ["--repeat", "1", "--results-dir", str(tmp_path), "--db-prefix", prefix]
    proc = subprocess.run(
        [*argv, "--drop-templates"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=230,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 5,000 rows" in proc.stdout
    (result_file,) = tmp_path.glob("*-anatomy.json")
    results = json.loads(result_file.read_text())
    timed = {r["method"]: r for r in results["runs"] if not r["forensic"]}
    floors = ("heap-floor", "heap-floor-checked")
    assert set(timed) == {"one-statement", "bulkdedupe", "bulkdedupe-key", *floors, "scan"}
    for name in ("one-statement", "bulkdedupe", "bulkdedupe-key", *floors):
        assert timed[name]["correctness"]["passed"], timed[name].get("error")
        assert timed[name]["totals"]["counters"]["wal_bytes"] > 0
        # (no count of the 100 ms samples inside the run: on 5,000 rows a fast machine's
        # UPDATE ends between two of them)
        assert "run" in timed[name]["phases"]
    # if the tool's SQL changes, the tracer's names for it must follow
    trace = timed["bulkdedupe-key"]["trace"]
    # key order: BEGIN, the advisory locks, the re-read, the candidates, UPDATE + audit, COMMIT
    assert trace["batches"]["all"]["n"] > 0
    assert trace["batches"]["all"]["round_trips_mean"] >= 6
    for label in ("lock_keys", "read_groups", "check_candidates", "apply_renames", "scan_page"):
        assert trace["queries"][label]["n"] > 0, label
    trace = timed["bulkdedupe"]["trace"]
    # heap order: the decision, then chunks of BEGIN, the locks, UPDATE + audit, COMMIT
    assert trace["batches"]["all"]["n"] > 0
    assert trace["batches"]["all"]["round_trips_mean"] >= 4
    for label in ("decide_losers", "lock_chunk", "apply_renames", "scan_page"):
        assert trace["queries"][label]["n"] > 0, label
    assert timed["scan"]["trace"]["scan_pages"] > 0
    # the floor's phases split where the tool's do: its decision, then its renames
    for name in floors:
        assert {"scan", "renames"} <= set(timed[name]["phases"]), name
    for r in results["runs"]:
        if r["forensic"]:
            assert "payments" in r["waldump"].get("relations", {}), (r["method"], r["waldump"])
    assert not sync(_databases(dsn, prefix))


def test_anatomy_counts_full_page_images_by_relation() -> None:
    """pg_waldump -b output (PostgreSQL 18) -> full-page images, their bytes (the page less its
    hole), block references and distinct blocks, per relation, and which record carried them."""
    from benchmarks.anatomy import parse_blocks

    lines = """\
rmgr: Heap        len (rec/tot):     59/  8243, lsn: 0/01, desc: LOCK xmax: 7
\tblkref #0: rel 1663/5/100 fork main blk 0 (FPW); hole: offset: 504, length: 8
rmgr: Heap        len (rec/tot):     73/  2885, lsn: 0/02, desc: UPDATE old_xmax: 7
\tblkref #0: rel 1663/5/100 fork main blk 8 (FPW); hole: offset: 188, length: 5380
\tblkref #1: rel 1663/5/100 fork main blk 0
rmgr: Btree       len (rec/tot):     53/    53, lsn: 0/03, desc: INSERT_LEAF off: 2
\tblkref #0: rel 1663/5/101 fork main blk 1
rmgr: XLOG        len (rec/tot):     49/  8213, lsn: 0/04, desc: FPI_FOR_HINT
\tblkref #0: rel 1663/5/2610 fork main blk 1 (FPW); hole: offset: 292, length: 28
rmgr: XLOG        len (rec/tot):    148/   148, lsn: 0/05, desc: CHECKPOINT_ONLINE redo 0/04
rmgr: XLOG        len (rec/tot):     30/    30, lsn: 0/06, desc: CHECKPOINT_REDO wal_level replica
rmgr: XLOG        len (rec/tot):     49/  8213, lsn: 0/07, desc: FPI_FOR_HINT
\tblkref #0: rel 1663/5/100 fork main blk 8 (FPW); hole: offset: 292, length: 28
""".splitlines()
    out = parse_blocks(lines, {(5, 100): "payments", (5, 101): "payments_pkey"})
    heap = out["relations"]["payments"]
    assert heap["fpi"] == 3
    assert heap["fpi_bytes"] == (8192 - 8) + (8192 - 5380) + (8192 - 28)
    assert heap["refs"] == 4
    assert heap["records"] == 3
    assert heap["record_bytes"] == 8243 + 2885 + 8213 - heap["fpi_bytes"]
    assert heap["fpi_by_record_type"] == {"Heap/LOCK": 1, "Heap/UPDATE": 1, "XLOG/FPI_FOR_HINT": 1}
    # blocks 0 and 8, block 8 again after the checkpoint's redo point: only hinted there
    assert (heap["distinct_blocks"], heap["block_cycles"], heap["fpi_hint_only"]) == (2, 3, 1)
    assert out["cycles"] == 2
    assert out["relations"]["payments_pkey"]["fpi"] == 0
    assert out["relations"]["catalogs"]["fpi"] == 1
    assert out["relations"]["(no block)"]["records"] == 2
    assert out["checkpoint_records"] == {"XLOG/CHECKPOINT_ONLINE": 1, "XLOG/CHECKPOINT_REDO": 1}
