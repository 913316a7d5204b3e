"""The benchmark harness end to end on a tiny table, so `make bench` cannot rot unnoticed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.baselines import extrapolate, per_row
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
        "--idle-seconds": "2",
        "--lead-in-seconds": "0.3",
        "--per-row-max-rows": "100",
        "--oltp-rate": "40",
        "--results-dir": str(tmp_path),
        "--db-prefix": prefix,
    }
    argv = [sys.executable, "-m", "benchmarks.run", "-d", dsn, "--drop-templates"]
    argv += [part for pair in options.items() for part in pair]
    proc = subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=100, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Targets (issue 3)" in proc.stdout

    (result_file,) = tmp_path.glob("*.json")
    results = json.loads(result_file.read_text())
    assert results["server"]["settings"]["fsync"] in ("on", "off")
    assert results["server"]["version_num"] > 0
    assert results["machine"]["cpus"] >= 1
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
    assert by_method["one-statement"]["rows_renamed"] == expected
    assert by_method["one-statement"]["time_vs_one_statement"] == 1.0
    bulk = by_method["bulkdedupe"]
    assert bulk["rows_renamed"] == expected
    assert bulk["scan_rows_per_s"] > 0
    assert bulk["longest_scan_ms"] is not None
    floor = by_method["batched"]
    assert floor["rows_renamed"] == expected
    assert floor["transactions"] == -(-expected // 1000)  # 1000-row batches
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
