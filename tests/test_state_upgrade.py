"""The state schema across releases, against real PostgreSQL: one the previous release made
(tests/fixtures/state_v1.sql, with its runs) is read as it is, upgraded in place by the first
command that writes (once, whoever races), or by a DBA with `init-state --print-sql` when the
role may not; its runs still report and undo exactly. One a newer release made is refused,
untouched."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import structlog
from click.testing import CliRunner

from benchmarks.generate import quote_ident
from bulkdedupe import privileges, sql
from bulkdedupe.cli import main
from tests.faults_support import cli, output, spawn, wait_until
from tests.helpers import create_payments, dsn_as, fetch_keys, sync, table_checksum
from tests.helpers import execute as execute_async
from tests.helpers import fetch as fetch_async

FIXTURE = Path(__file__).parent / "fixtures" / "state_v1.sql"
EXIT_OK = 0
EXIT_ENVIRONMENT = 3
PASSWORD = "upgrade-Pw-1"

# What the previous release recorded (see the fixture's header): a completed run on payments,
# whose table the tests put back in the state it left, and an incomplete one on invoices.
OLD_RUN = "20261201T220813Z-5e2a1c"
OLD_INCOMPLETE = "20261201T220813Z-b07f93"
ROWS = [("a",), ("b",), ("a",), ("c",), ("b",), ("d",), ("c",), ("b",), ("c",), (None,), ("c",)]
OLD_RENAMES = {3: ("a", "a-3"), 5: ("b", "b-5"), 8: ("b", "b-8"), 7: ("c", "c-7"),
               9: ("c", "c-9"), 11: ("c", "c-11")}  # fmt: skip
INVOICES = ["inv-1", "inv-2", "inv-1", "inv-blocked", "inv-3", "inv-blocked", "inv-2"]
OLD_INCOMPLETE_RENAMES = {3: "inv-1-3", 7: "inv-2-7"}  # 'inv-blocked' was skipped
# Duplicates the application made since: ids 12-14 (one of each group is renamed).
NEW_ROWS = ["a", "e", "e"]
NEW_RENAMES = 2

# What the previous release's `init-state --print-sql --role R` granted (its state tables were
# the same five).
V1_GRANTS = [
    'GRANT USAGE ON SCHEMA "bulkdedupe" TO {role}',
    *(
        f'GRANT SELECT, INSERT, UPDATE ON TABLE "bulkdedupe"."{t}" TO {{role}}'
        for t in ("runs", "changes", "control", "skipped", "heartbeat")
    ),
    'GRANT USAGE ON SEQUENCE "bulkdedupe"."changes_id_seq" TO {role}',
    'GRANT SELECT ON TABLE "payments" TO {role}',
    'GRANT UPDATE ("transaction_id") ON TABLE "payments" TO {role}',
]


# --- helpers ---------------------------------------------------------------------------------


def execute(dsn: str, *statements: str) -> None:
    sync(execute_async(dsn, *statements))


def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    return sync(fetch_async(dsn, query, *args))


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (an interpreter start-up per call would dominate the test)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == EXIT_OK, (result.args, result.stdout, result.stderr)
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bulkdedupe: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def state_version(dsn: str) -> str | None:
    """The runs table's comment: the version marker (None: version 1)."""
    (row,) = fetch(dsn, "SELECT obj_description('bulkdedupe.runs'::regclass, 'pg_class') AS c")
    return row["c"]


def runs_columns(dsn: str) -> list[str]:
    rows = fetch(
        dsn,
        """SELECT attname FROM pg_attribute WHERE attrelid = 'bulkdedupe.runs'::regclass
           AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
    )
    return [r["attname"] for r in rows]


def state_snapshot(dsn: str) -> tuple[Any, ...]:
    """Everything of the state schema: its relations' columns and types, the runs table's
    comment, every row of every table; and the payments table."""
    columns = fetch(
        dsn,
        """SELECT c.relname, c.relkind::text, a.attname, format_type(a.atttypid, a.atttypmod)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           WHERE n.nspname = 'bulkdedupe' ORDER BY 1, 3""",
    )
    tables = sorted({r[0] for r in columns if r[1] == "r"})
    rows = {
        t: fetch(dsn, f'SELECT t::text AS r FROM bulkdedupe."{t}" t ORDER BY 1') for t in tables
    }
    return (
        [tuple(r) for r in columns],
        state_version(dsn),
        {t: [r["r"] for r in rs] for t, rs in rows.items()},
        sync(table_checksum(dsn)),
    )


def insert_new_duplicates(dsn: str) -> None:
    execute(
        dsn,
        "INSERT INTO payments (transaction_id) VALUES " + ", ".join(f"('{v}')" for v in NEW_ROWS),
    )


def v1_database(dsn: str) -> str:
    """`dsn` as the previous release left it: payments after its completed run, and its
    state schema with both runs (owned by the superuser, as a DBA's init-state made it)."""
    sync(create_payments(dsn, rows=ROWS))
    execute(
        dsn,
        FIXTURE.read_text(),
        f"""UPDATE payments p SET transaction_id = c.new_value FROM bulkdedupe.changes c
            WHERE c.run_id = '{OLD_RUN}' AND p.id = c.pk::bigint""",
    )
    return dsn


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def v1(dsn: str) -> str:
    return v1_database(dsn)


@pytest.fixture
def role(dsn: str) -> Iterator[str]:
    """A login role that owns nothing (cluster-wide: a unique name), dropped with whatever it
    was granted."""
    name = f"app_dedupe_{uuid.uuid4().hex[:8]}"
    execute(dsn, f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD '{PASSWORD}'")
    try:
        yield name
    finally:
        execute(dsn, f"DROP OWNED BY {quote_ident(name)}", f"DROP ROLE {quote_ident(name)}")


# --- the version marker, without a server ----------------------------------------------------


def test_the_version_marker() -> None:
    st = sql.StateSql("bulkdedupe")
    assert sql.parse_state_version(None) == 1  # the first release wrote none
    assert sql.parse_state_version("notes of the DBA") == 1
    assert sql.parse_state_version(f"{sql.STATE_VERSION_MARKER}2") == 2
    assert sql.parse_state_version(f"{sql.STATE_VERSION_MARKER}17") == 17
    assert st.mark_version == (
        f'COMMENT ON TABLE "bulkdedupe"."runs" IS \'{sql.STATE_VERSION_MARKER}{st.VERSION}\''
    )


# --- the previous release's state schema -----------------------------------------------------


def test_the_fixture_lacks_exactly_what_version_2_adds(v1: str) -> None:
    async def inspect() -> privileges.StateAccess:
        conn = await asyncpg.connect(v1)
        try:
            return await privileges.inspect_state(conn, sql.StateSql("bulkdedupe"))
        finally:
            await conn.close()

    access = sync(inspect())
    assert access.version == 1
    assert access.outdated
    assert list(access.missing) == [
        sql.StateObject("column", "bulkdedupe", "runs", "pk_columns"),
        sql.StateObject("column", "bulkdedupe", "runs", "scope_columns"),
    ]
    st = sql.StateSql("bulkdedupe")
    assert privileges.upgrade_statements(access, st) == [st.create[-1], st.mark_version]


def test_readers_work_on_the_old_schema_and_change_nothing(v1: str) -> None:
    before = state_snapshot(v1)
    runs = json.loads(ok(invoke("runs", "--format", "json", "-d", v1)))
    assert {r["run_id"]: r["status"] for r in runs["runs"]} == {
        OLD_RUN: "completed",
        OLD_INCOMPLETE: "incomplete",
    }
    assert {r["run_id"]: r["skipped_groups"] for r in runs["runs"]}[OLD_INCOMPLETE] == 1
    status = invoke("status", "--run-id", OLD_INCOMPLETE, "--format", "json", "-d", v1)
    assert json.loads(ok(status))["run_id"] == OLD_INCOMPLETE
    report = ok(invoke("report", "--run-id", OLD_RUN, "--format", "csv", "-d", v1))
    lines = report.splitlines()
    assert lines[0].startswith("id,pk,old_value,new_value")
    assert {int(ln.split(",")[1]): tuple(ln.split(",")[2:4]) for ln in lines[1:]} == OLD_RENAMES
    undo_preview = invoke("undo", "--run-id", OLD_RUN, "-d", v1)  # a dry run: reads only
    assert undo_preview.returncode == EXIT_OK, undo_preview.stderr
    assert state_snapshot(v1) == before  # not upgraded, not touched


def test_a_new_run_upgrades_in_place_and_the_old_run_still_undoes_exactly(v1: str) -> None:
    assert "pk_columns" not in runs_columns(v1)
    insert_new_duplicates(v1)
    new = json.loads(
        ok(invoke("run", "--apply", "--run-id", "after-upgrade", "--format", "json", "-d", v1))
    )
    assert new["rows_renamed"] == NEW_RENAMES
    # Upgraded: the columns, the marker; the old runs keep NULL (= their pk_column, no scope).
    assert state_version(v1) == f"{sql.STATE_VERSION_MARKER}2"
    assert runs_columns(v1)[-2:] == ["pk_columns", "scope_columns"]
    recorded = {
        r["run_id"]: (r["pk_column"], r["pk_columns"], r["scope_columns"])
        for r in fetch(
            v1, "SELECT run_id, pk_column, pk_columns, scope_columns FROM bulkdedupe.runs"
        )
    }
    assert recorded == {
        OLD_RUN: ("id", None, None),
        OLD_INCOMPLETE: ("id", None, None),
        "after-upgrade": ("id", ["id"], None),
    }
    # The old run is reported as before, and undone exactly: each row it renamed gets its old
    # value back; nothing else moves (the new run's renames included).
    report = ok(invoke("report", "--run-id", OLD_RUN, "--format", "csv", "-d", v1))
    assert len(report.splitlines()) == 1 + len(OLD_RENAMES)
    before = sync(fetch_keys(v1))
    ok(invoke("undo", "--run-id", OLD_RUN, "--apply", "-d", v1))
    after = sync(fetch_keys(v1))
    assert after == before | {pk: old for pk, (old, _new) in OLD_RENAMES.items()}
    assert [after[i] for i in range(1, len(ROWS) + 1)] == [r[0] for r in ROWS]
    runs = json.loads(ok(invoke("runs", "--format", "json", "-d", v1)))
    assert len(runs["runs"]) == 4  # the two old ones, the new run, the undo


def test_the_old_incomplete_run_resumes_after_the_upgrade(v1: str) -> None:
    """Its skipped group (a trigger refused it; lifted since) is retried under the same rules;
    the run, recorded by the previous release, completes on the upgraded schema."""
    sync(create_payments(v1, table="invoices", rows=[(v,) for v in INVOICES]))
    for pk, new in OLD_INCOMPLETE_RENAMES.items():
        execute(v1, f"UPDATE invoices SET transaction_id = '{new}' WHERE id = {pk}")
    resumed = invoke(
        "run", "--apply", "--table", "invoices", "--run-id", OLD_INCOMPLETE,
        "--format", "json", "-d", v1,
    )  # fmt: skip
    summary = json.loads(ok(resumed))
    assert (summary["run_id"], summary["status"], summary["rows_renamed"]) == (
        OLD_INCOMPLETE,
        "completed",
        1,
    )
    assert state_version(v1) == f"{sql.STATE_VERSION_MARKER}2"
    keys = sync(fetch_keys(v1, "invoices"))
    assert keys == {
        1: "inv-1", 2: "inv-2", 3: "inv-1-3", 4: "inv-blocked", 5: "inv-3", 6: "inv-blocked-6",
        7: "inv-2-7",
    }  # fmt: skip
    assert not fetch(v1, "SELECT 1 FROM bulkdedupe.skipped WHERE run_id = $1", OLD_INCOMPLETE)


def test_a_role_that_owns_the_old_schema_upgrades_it_itself(v1: str, role: str) -> None:
    """As when the role made its state itself (CREATE on the database) with the previous
    release: it owns the state tables, so its first run upgrades them."""
    r = quote_ident(role)
    execute(
        v1,
        f"ALTER SCHEMA bulkdedupe OWNER TO {r}",
        *(
            f"ALTER TABLE bulkdedupe.{t} OWNER TO {r}"
            for t in ("runs", "changes", "control", "skipped", "heartbeat")
        ),
        f"GRANT SELECT, UPDATE (transaction_id) ON payments TO {r}",
    )
    insert_new_duplicates(v1)
    applied = invoke("run", "--apply", "--format", "json", "-d", dsn_as(v1, role, PASSWORD))
    assert json.loads(ok(applied))["rows_renamed"] == NEW_RENAMES
    assert state_version(v1) == f"{sql.STATE_VERSION_MARKER}2"


def test_init_state_upgrades_once_and_then_has_nothing_to_do(v1: str) -> None:
    first = ok(invoke("init-state", "-d", v1))
    assert "upgraded in place from version 1" in first
    assert "column bulkdedupe.runs.pk_columns" in first
    again = json.loads(ok(invoke("init-state", "--format", "json", "-d", v1)))
    assert (again["created"], again["upgraded_from"], again["version"]) == ([], None, 2)
    before = state_snapshot(v1)
    execute(v1, ok(invoke("init-state", "--print-sql")))  # the DBA's script, again: a no-op
    assert state_snapshot(v1) == before


@pytest.mark.anyio
async def test_two_first_runs_at_once_upgrade_it_once(dsn: str, tmp_path: Path) -> None:
    """Two processes start on the old schema at the same moment (held at the DDL lock until
    both wait for it): one upgrades, the other finds nothing left to do; both runs work."""
    await anyio.to_thread.run_sync(v1_database, dsn)
    await create_payments(dsn, table="refunds", rows=[("r1",), ("r1",), ("r2",), ("r2",)])
    insert = "INSERT INTO payments (transaction_id) VALUES " + ", ".join(
        f"('{v}')" for v in NEW_ROWS
    )
    await execute_async(dsn, insert)
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(sql.STATE_DDL_LOCK)

        async def waiting() -> bool:
            n = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return bool(n >= 2)

        common = ("--log-format", "json", "run", "--apply", "--format", "json", "-d", dsn)
        async with (
            spawn(tmp_path, "one", *common, "--run-id", "one") as one,
            spawn(tmp_path, "two", *common, "--table", "refunds", "--run-id", "two") as two,
        ):
            await wait_until(waiting, "both processes waiting for the DDL lock", proc=one)
            await tx.commit()
            with anyio.fail_after(120):
                await one.wait()
                await two.wait()
        outs = {name: output(tmp_path, name) for name in ("one", "two")}
        for name, proc in (("one", one), ("two", two)):
            assert proc.returncode == EXIT_OK, outs[name]
        assert json.loads(outs["one"][0])["rows_renamed"] == NEW_RENAMES
        assert json.loads(outs["two"][0])["rows_renamed"] == 2
        upgrades = [
            name
            for name, (_out, err) in outs.items()
            for line in err.splitlines()
            if line.startswith("{")
            and json.loads(line).get("event") == "state schema upgraded in place"
        ]
        assert len(upgrades) == 1, outs
        comment = await holder.fetchval(
            "SELECT obj_description('bulkdedupe.runs'::regclass, 'pg_class')"
        )
        assert comment == f"{sql.STATE_VERSION_MARKER}2"
    finally:
        await holder.close()


@pytest.mark.anyio
async def test_an_upgrade_that_cannot_lock_the_runs_table_soon_gives_up(dsn: str) -> None:
    """A session holding the runs table (here: an open transaction that read it) would make
    the ALTER wait, and everyone queue behind it: the upgrade gives up after its lock timeout,
    changing nothing, and says so."""
    await anyio.to_thread.run_sync(v1_database, dsn)
    before = await anyio.to_thread.run_sync(state_snapshot, dsn)
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT count(*) FROM bulkdedupe.runs")
            code, out, err = await cli("run", "--apply", "-d", dsn)
    finally:
        await holder.close()
    one_error_line(
        subprocess.CompletedProcess([], code, out, err),
        EXIT_ENVIRONMENT,
        f"within {privileges.UPGRADE_LOCK_TIMEOUT}",
        "nothing was changed",
    )
    assert await anyio.to_thread.run_sync(state_snapshot, dsn) == before


def test_a_role_that_may_not_upgrade_is_told_and_the_printed_sql_fixes_it(
    v1: str, role: str
) -> None:
    execute(v1, *(g.format(role=quote_ident(role)) for g in V1_GRANTS))
    as_role = dsn_as(v1, role, PASSWORD)
    insert_new_duplicates(v1)
    before = state_snapshot(v1)
    # Reading needs no upgrade: the grants of the previous release are enough.
    ok(invoke("runs", "-d", as_role))
    ok(invoke("status", "--run-id", OLD_RUN, "-d", as_role))
    ok(invoke("report", "--run-id", OLD_RUN, "-d", as_role))
    # Writing does: one line, naming the versions and what a DBA runs; nothing changed.
    for command in ("run --apply", f"undo --run-id {OLD_RUN} --apply"):
        line = one_error_line(
            invoke(*command.split(), "-d", as_role),
            EXIT_ENVIRONMENT,
            "at version 1",
            "needs version 2",
            f"bulkdedupe init-state --print-sql --role {role}",
        )
        assert "owner" in line
        assert state_snapshot(v1) == before
    # The DBA runs the printed SQL as the superuser; then the role gets on with it.
    execute(v1, ok(invoke("init-state", "--print-sql", "--role", role)))
    assert state_version(v1) == f"{sql.STATE_VERSION_MARKER}2"
    applied = json.loads(ok(invoke("run", "--apply", "--format", "json", "-d", as_role)))
    assert applied["rows_renamed"] == NEW_RENAMES
    keys = sync(fetch_keys(v1))
    ok(invoke("undo", "--run-id", OLD_RUN, "--apply", "-d", as_role))
    assert sync(fetch_keys(v1)) == keys | {pk: old for pk, (old, _new) in OLD_RENAMES.items()}


def test_a_newer_schema_is_refused_untouched(v1: str) -> None:
    # What a later release might have made of it: a column this one does not know, version 3.
    execute(
        v1,
        "ALTER TABLE bulkdedupe.runs ADD COLUMN pk_columns text[], ADD COLUMN scope_columns "
        "text[], ADD COLUMN partitions jsonb",
        f"COMMENT ON TABLE bulkdedupe.runs IS '{sql.STATE_VERSION_MARKER}3'",
    )
    insert_new_duplicates(v1)
    before = state_snapshot(v1)
    for command in (
        "run --apply",
        "runs",
        f"status --run-id {OLD_RUN}",
        f"report --run-id {OLD_RUN}",
        f"undo --run-id {OLD_RUN}",
        f"undo --run-id {OLD_RUN} --apply",
        "init-state",
    ):
        one_error_line(
            invoke(*command.split(), "-d", v1),
            EXIT_ENVIRONMENT,
            "at version 3, newer than this bulkdedupe knows (up to 2)",
            "nothing was changed",
        )
        assert state_snapshot(v1) == before, command
    # The DBA's script refuses it too, before any statement of its own.
    script = ok(invoke("init-state", "--print-sql"))
    with pytest.raises(asyncpg.RaiseError, match="at version 3, newer than this bulkdedupe"):
        execute(v1, script)
    assert state_snapshot(v1) == before
