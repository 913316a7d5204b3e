"""`runs` and `report` against real PostgreSQL: the run list, and the audit of a run with a few
thousand changes streamed page by page, checked against the table itself, in every format."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner

from bulkdedupe import ConnectConfig, RunConfig, RunStateError, ScanConfig, list_runs, open_report
from bulkdedupe import run as dedupe
from bulkdedupe.cli import main
from bulkdedupe.sql import StateSql
from tests.helpers import create_payments, fetch_keys, run_cli

pytestmark = pytest.mark.anyio

GROUPS = 1500  # 1250 groups of 2 and 250 of 3: 1750 renames
ROWS = [(f"tx-{i:05d}",) for i in range(GROUPS) for _ in range(2)]
ROWS += [(f"tx-{i:05d}",) for i in range(250)] + [(None,)] * 5
RENAMES = GROUPS + 250


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


Applied = tuple[ConnectConfig, str, dict[str, tuple[str, str]]]


async def apply_dedupe(dsn: str) -> Applied:
    """A table deduplicated by one run; returns the config, the run id and the expected audit
    {pk: (old, new)} computed from the table before and after."""
    await create_payments(dsn, rows=ROWS)
    before = await fetch_keys(dsn)
    cfg = ConnectConfig(database_url=dsn)
    summary = await dedupe(
        cfg, RunConfig(apply=True, batch_size=500, concurrency=2, scan=ScanConfig(page_size=700))
    )
    after = await fetch_keys(dsn)
    expected = {str(pk): (before[pk], after[pk]) for pk in after if after[pk] != before[pk]}
    assert len(expected) == RENAMES
    return cfg, summary.run_id, expected


@pytest.fixture
async def applied(dsn: str) -> Applied:
    return await apply_dedupe(dsn)


async def test_runs_without_state_schema_says_so_and_creates_nothing(dsn: str) -> None:
    cfg = ConnectConfig(database_url=dsn)

    listed = await list_runs(cfg)
    cli = run_cli("runs", "-d", dsn)

    assert listed.runs == ()
    assert listed.note is not None
    assert "does not exist" in listed.note
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("no runs")
    rows = await fetch(dsn, "SELECT to_regnamespace('bulkdedupe') AS s")
    assert rows[0]["s"] is None
    with pytest.raises(RunStateError, match="does not exist"):
        async with open_report(cfg, "whatever"):
            pass


async def test_runs_lists_the_run_with_its_counts(
    applied: Applied,
) -> None:
    cfg, run_id, _ = applied

    listed = await list_runs(cfg)

    (info,) = listed.runs
    assert (info.run_id, info.command, info.status) == (run_id, "run", "completed")
    assert (info.table, info.key, info.pk) == ("public.payments", "transaction_id", "id")
    assert info.rows_changed == RENAMES
    assert info.finished_at is not None
    assert info.finished_at >= info.started_at
    assert info.options["batch_size"] == 500
    text = listed.to_text()
    assert run_id in text
    assert f"{RENAMES:,}" in text


async def test_report_streams_every_change_in_bounded_pages(
    applied: Applied,
) -> None:
    cfg, run_id, expected = applied

    async with open_report(cfg, run_id, page_size=300) as rep:
        pages = [page async for page in rep.pages()]

    assert max(len(p) for p in pages) == 300
    assert len(pages) == -(-RENAMES // 300)
    changes = [c for p in pages for c in p]
    ids = [c.id for c in changes]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {c.pk: (c.old_value, c.new_value) for c in changes} == expected


def test_report_cli_formats(dsn: str) -> None:
    _, run_id, expected = asyncio.run(apply_dedupe(dsn))
    # A real process for the exit codes and the bytes on stdout; in-process for the rest.
    as_csv = run_cli("report", "-d", dsn, "--run-id", run_id, "--format", "csv")
    unknown = run_cli("report", "-d", dsn, "--run-id", "no-such-run")
    runner = CliRunner()
    as_json = runner.invoke(main, ["report", "-d", dsn, "--run-id", run_id, "--format", "json"])
    as_table = runner.invoke(main, ["report", "-d", dsn, "--run-id", run_id])
    runs_json = runner.invoke(main, ["runs", "-d", dsn, "--format", "json"])

    assert as_csv.returncode == 0, as_csv.stderr
    records = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(records[0]) == ["id", "pk", "old_value", "new_value", "changed_at"]
    assert {r["pk"]: (r["old_value"], r["new_value"]) for r in records} == expected
    assert len(records) == RENAMES

    assert as_json.exit_code == 0, as_json.output
    lines = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {o["pk"]: (o["old_value"], o["new_value"]) for o in lines} == expected

    assert as_table.exit_code == 0, as_table.output
    table_lines = as_table.stdout.splitlines()
    assert run_id in table_lines[0]
    assert f"{RENAMES:,} rows changed" in table_lines[0]
    assert len(table_lines) == 2 + RENAMES

    assert runs_json.exit_code == 0, runs_json.output
    assert [r["run_id"] for r in json.loads(runs_json.stdout)["runs"]] == [run_id]

    assert unknown.returncode == 3
    err = unknown.stderr.strip().splitlines()
    assert len(err) == 1
    assert "no-such-run" in err[0]
    assert "bulkdedupe runs" in err[0]


async def test_report_page_query_walks_the_run_index(
    applied: Applied,
) -> None:
    """The keyset page reads the (run_id, id) index, so page N costs what page 1 costs."""
    cfg, run_id, _ = applied
    conn = await asyncpg.connect(cfg.database_url)
    try:
        # Other runs' audit rows around ours, as in a state schema that has seen many runs.
        await conn.execute(
            "INSERT INTO bulkdedupe.changes (run_id, pk, old_value, new_value) "
            "SELECT 'other-' || (i % 20), i::text, 'x', 'x-' || i FROM generate_series(1, 40000) i"
        )
        await conn.execute("ANALYZE bulkdedupe.changes")
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + StateSql("bulkdedupe").changes_page, run_id, 1000, 300
        )
    finally:
        await conn.close()
    text = json.dumps(plan)
    assert "changes_run_id_idx" in text
    assert '"Sort"' not in text  # rows come in id order straight from the index
