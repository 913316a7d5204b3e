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

from benchmarks.baselines import extrapolate, per_row
from benchmarks.oltp import KINDS, OltpResult
from benchmarks.pgbench import PgbenchConfig, find_pgbench, run_load
from benchmarks.run import Suite, _argv, impact_methods, unavailable
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
    argv += [part for pair in options.items() for part in pair]
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=100, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Targets (issues 3 and 10)" in proc.stdout

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
