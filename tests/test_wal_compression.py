"""--wal-compression: the batches compress their own full-page images when the server and the
role allow it, and say so; an impossible request is refused before anything changes.

A trigger records `current_setting('wal_compression')` inside every renaming UPDATE: what the
batch transactions really ran with, not what the tool says it asked for."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from bulkdedupe import ConnectConfig, RunConfig, ScanConfig, run
from bulkdedupe.catalog import wal_compression
from bulkdedupe.errors import UsageError
from tests.factories import run_record, state_schema_exists
from tests.helpers import create_payments, execute, fetch, fetchval, table_checksum

pytestmark = pytest.mark.anyio

ROWS = [(f"tx-{i % 40}",) for i in range(200)]  # 40 groups of 5: 160 renames


async def _server(dsn: str) -> dict[str, Any]:
    row = (
        await fetch(
            dsn,
            "SELECT current_setting('wal_compression') AS current, "
            "current_setting('server_version_num')::int AS version, "
            "(SELECT enumvals FROM pg_settings WHERE name = 'wal_compression') AS methods",
        )
    )[0]
    return {"current": row["current"], "version": row["version"], "methods": row["methods"] or []}


async def _watch_updates(dsn: str) -> None:
    await execute(
        dsn,
        "CREATE TABLE seen (setting text NOT NULL)",
        """CREATE FUNCTION record_setting() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO seen VALUES (current_setting('wal_compression'));
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER record_setting BEFORE UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION record_setting()",
    )


def _cfg(dsn: str) -> ConnectConfig:
    return ConnectConfig(database_url=dsn)


def _apply(**kw: Any) -> RunConfig:
    return RunConfig(apply=True, batch_size=50, concurrency=2, scan=ScanConfig(page_size=100), **kw)


async def test_an_explicit_method_is_what_every_batch_runs_with(dsn: str) -> None:
    server = await _server(dsn)
    if "pglz" not in server["methods"]:
        pytest.skip("wal_compression is a boolean before PostgreSQL 15")
    await create_payments(dsn, rows=ROWS)
    await _watch_updates(dsn)
    summary = await run(_cfg(dsn), _apply(wal_compression="pglz"))
    assert summary.rows_renamed == 160
    seen = await fetch(dsn, "SELECT setting, count(*) AS n FROM seen GROUP BY setting")
    assert [(r["setting"], r["n"]) for r in seen] == [("pglz", 160)]
    # SET LOCAL: the sessions and the server keep their own setting
    assert (await _server(dsn))["current"] == server["current"]
    record = await run_record(dsn, summary.run_id)
    assert json.loads(record["options"])["wal_compression"] == "pglz"


async def test_auto_uses_a_fast_method_only_when_the_server_has_one(dsn: str) -> None:
    server = await _server(dsn)
    await create_payments(dsn, rows=ROWS)
    await _watch_updates(dsn)
    summary = await run(_cfg(dsn), _apply())  # --wal-compression auto is the default
    # the tests connect as a superuser: auto may set it whenever the server offers lz4/zstd
    fast = [m for m in ("lz4", "zstd") if m in server["methods"]]
    if server["current"] == "off" and fast:
        expected, recorded = fast[0], fast[0]
    else:
        expected, recorded = server["current"], "server"
    seen = await fetch(dsn, "SELECT DISTINCT setting FROM seen")
    assert [r["setting"] for r in seen] == [expected]
    assert await fetchval(dsn, "SELECT count(*) FROM seen") == summary.rows_renamed == 160
    record = await run_record(dsn, summary.run_id)
    assert json.loads(record["options"])["wal_compression"] == recorded


async def test_a_method_the_server_lacks_is_refused_before_any_change(dsn: str) -> None:
    server = await _server(dsn)
    missing = next((m for m in ("lz4", "zstd") if m not in server["methods"]), None)
    if missing is None:
        pytest.skip("this server offers every method")
    await create_payments(dsn, rows=ROWS)
    before = await table_checksum(dsn)
    with pytest.raises(UsageError, match=f"--wal-compression {missing}: this server does not"):
        await run(_cfg(dsn), _apply(wal_compression=missing))
    assert await table_checksum(dsn) == before
    assert not await state_schema_exists(dsn)


async def test_a_role_that_may_not_set_it(dsn: str) -> None:
    """auto leaves the server's setting; an explicit method is refused, naming the GRANT; the
    GRANT (PostgreSQL 15+) makes it possible."""
    server = await _server(dsn)
    role = f"nosuper_{uuid.uuid4().hex[:8]}"
    await execute(dsn, f'CREATE ROLE "{role}" NOLOGIN')
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'SET ROLE "{role}"')
        assert await wal_compression(conn, "auto", server["version"]) is None
        assert await wal_compression(conn, "server", server["version"]) is None
        if "pglz" not in server["methods"]:
            return  # before PostgreSQL 15: no methods to ask for
        with pytest.raises(UsageError, match="GRANT SET ON PARAMETER wal_compression"):
            await wal_compression(conn, "pglz", server["version"])
        await conn.execute("RESET ROLE")
        await conn.execute(f'GRANT SET ON PARAMETER wal_compression TO "{role}"')
        await conn.execute(f'SET ROLE "{role}"')
        assert await wal_compression(conn, "pglz", server["version"]) == "pglz"
    finally:
        await conn.close()
        # roles are cluster-wide: leave none behind, granted or not, whatever failed above
        cleanup = [f'DROP ROLE "{role}"']
        if "pglz" in server["methods"]:
            cleanup.insert(0, f'REVOKE SET ON PARAMETER wal_compression FROM "{role}"')
        await execute(dsn, *cleanup)


def test_nonsense_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--wal-compression 'fast': use one of auto, server"):
        RunConfig(apply=True, wal_compression="fast")
