"""Bad input, through the CLI as an operator would type it: the documented exit code, exactly one
line on stderr that starts with ``bulkdedupe: error:``, no traceback, and nothing changed in the
database (same table checksum, no new relation, no state schema)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from click.testing import CliRunner

from benchmarks.generate import quote_ident
from bulkdedupe.cli import main
from bulkdedupe.config import DEFAULT_CONNECT_TIMEOUT
from tests.helpers import create_payments, execute, fetchval, run_cli, sync, table_checksum

EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
SECRET = "s3cret-Passw0rd"
ROLE_PASSWORD = "role-Passw0rd"

# Two groups (a x2, c x3), a singleton, a NULL key: 3 rows would be renamed.
ROWS = [("a",), ("a",), ("b",), ("c",), ("c",), ("c",), (None,)]


# --- helpers ---------------------------------------------------------------------------------


async def _fingerprint(dsn: str) -> dict[str, Any]:
    """Everything a failed command must leave as it was: every user relation (tables, indexes,
    sequences) with its row count, the payments checksum, and the list of schemas."""
    conn = await asyncpg.connect(dsn)
    try:
        relations = await conn.fetch(
            """
            SELECT n.nspname, c.relname, c.relkind::text AS relkind
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
            ORDER BY 1, 2
            """
        )
        schemas = await conn.fetch("SELECT nspname FROM pg_namespace ORDER BY 1")
        counts = {
            f"{r['nspname']}.{r['relname']}": await conn.fetchval(
                f"SELECT count(*) FROM {quote_ident(r['nspname'])}.{quote_ident(r['relname'])}"
            )
            for r in relations
            if r["relkind"] == "r"
        }
    finally:
        await conn.close()
    return {
        "relations": [tuple(r) for r in relations],
        "schemas": [r["nspname"] for r in schemas],
        "counts": counts,
        "payments": await table_checksum(dsn),
    }


def fingerprint(dsn: str) -> dict[str, Any]:
    return sync(_fingerprint(dsn))


def state_schema_exists(dsn: str, schema: str = "bulkdedupe") -> bool:
    return bool(sync(fetchval(dsn, "SELECT to_regnamespace($1) IS NOT NULL", f'"{schema}"')))


def assert_one_error_line(
    result: subprocess.CompletedProcess[str], code: int, *fragments: str
) -> str:
    """The documented exit code and exactly one actionable line on stderr, nothing on stdout."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("bulkdedupe: error: "), line
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process (milliseconds instead of an interpreter start-up per case);
    tests that need the real ``python -m bulkdedupe`` use ``run_cli``."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the user would have seen a traceback
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def check_cases(
    dsn: str,
    cases: list[tuple[Any, ...]],
    run: Callable[..., subprocess.CompletedProcess[str]] | None = None,
    *,
    expect_state_schema: bool = False,
) -> None:
    """Run each ``(args, exit_code, *fragments)`` case against ``dsn`` in turn: each must fail
    with one error line and leave the database exactly as it was. All failures are reported."""
    before = fingerprint(dsn)
    assert state_schema_exists(dsn) == expect_state_schema
    failures: list[str] = []
    for args, code, *fragments in cases:
        try:
            assert_one_error_line((run or invoke)(*args, "-d", dsn), code, *fragments)
            assert fingerprint(dsn) == before, "the database changed"
        except AssertionError as exc:
            failures.append(f"{' '.join(args)}: {exc}")
    assert not failures, "\n".join(failures)


def dsn_as(dsn: str, user: str, password: str | None = None) -> str:
    """The same server and database as ``dsn``, another role (and password)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def database_of(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """In-process runs point structlog at the runner's stderr; leave no such global behind."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def payments(dsn: str) -> str:
    """The payments table with duplicates, plus a table ``x`` for injected SQL to aim at."""
    sync(create_payments(dsn, rows=ROWS))
    sync(execute(dsn, "CREATE TABLE x (id int)", "INSERT INTO x VALUES (1)"))
    return dsn


@pytest.fixture
def role(dsn: str) -> Iterator[str]:
    """A fresh login role (cluster-wide, so uniquely named), dropped with what it was granted."""
    name = f"bd_role_{uuid.uuid4().hex[:10]}"
    # A password too: a server that asks for one (CI's PostgreSQL 15 over TCP) gets it.
    sync(execute(dsn, f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{ROLE_PASSWORD}'"))
    try:
        yield name
    finally:
        sync(execute(dsn, f'DROP OWNED BY "{name}"', f'DROP ROLE "{name}"'))


def _x_exists(dsn: str) -> bool:
    return bool(sync(fetchval(dsn, "SELECT to_regclass('public.x') IS NOT NULL")))


# --- identifiers, columns, keys --------------------------------------------------------------

INJECTION = "payments; DROP TABLE x; --"

BAD_TARGETS: list[tuple[Any, ...]] = [
    # missing things
    (["scan", "--table", "nope"], EXIT_ENVIRONMENT, "table nope does not exist"),
    (["run", "--apply", "--table", "nope"], EXIT_ENVIRONMENT, "table nope does not exist"),
    (["run", "--apply", "--table", "billing.payments"], EXIT_ENVIRONMENT, "does not exist"),
    (["run", "--apply", "--key", "nope"], EXIT_ENVIRONMENT, "--key"),
    (["verify", "--key", "nope"], EXIT_ENVIRONMENT, "--key"),
    (["run", "--apply", "--pk", "nope"], EXIT_ENVIRONMENT, "--pk"),
    # a --pk that is not unique is no way to name a row
    (["run", "--apply", "--pk", "amount"], EXIT_ENVIRONMENT, "unique"),
    (["run", "--apply", "--pk", "transaction_id"], EXIT_ENVIRONMENT, "--pk"),
    # composite: every column must exist, be NOT NULL, and carry a unique index of exactly them
    (["run", "--apply", "--pk", "id,nope"], EXIT_ENVIRONMENT, "'nope' does not exist"),
    (["run", "--apply", "--pk", "id,amount"], EXIT_ENVIRONMENT, "unique index on exactly them"),
    (["run", "--apply", "--pk", "id,id"], EXIT_USAGE, "named twice"),
    (["run", "--apply", "--pk", "id,"], EXIT_USAGE, "--pk"),
    (["run", "--apply", "--keep", "nope"], EXIT_ENVIRONMENT, "--keep"),
    (["run", "--apply", "--keep", "created_at desc, nope"], EXIT_ENVIRONMENT, "nope"),
    # the key must be text-like: amount is numeric
    (["run", "--apply", "--key", "amount"], EXIT_ENVIRONMENT, "numeric"),
    (["run", "--apply", "--key", "payload"], EXIT_ENVIRONMENT, "jsonb"),
    # identifiers carrying SQL: refused before any query ...
    (["run", "--apply", "--table", INJECTION], EXIT_USAGE, "not a plain identifier"),
    (["scan", "--table", INJECTION], EXIT_USAGE, "not a plain identifier"),
    (["run", "--apply", "--key", 'transaction_id"; --'], EXIT_USAGE, "--key"),
    (["run", "--apply", "--key", "transaction_id; DROP TABLE x"], EXIT_USAGE, "--key"),
    (["run", "--apply", "--pk", "id; DROP TABLE x; --"], EXIT_USAGE, "--pk"),
    (["run", "--apply", "--keep", "id; DROP TABLE x"], EXIT_USAGE, "--keep"),
    (["run", "--apply", "--keep", "id) ; DROP TABLE x; --"], EXIT_USAGE, "--keep"),
    (["run", "--apply", "--state-schema", "s; DROP TABLE x"], EXIT_USAGE, "--state-schema"),
    (["run", "--apply", "--table", "a.b.c"], EXIT_USAGE, "--table"),
    (["run", "--apply", "--table", '"unterminated'], EXIT_USAGE, "--table"),
    (["run", "--apply", "--table", ""], EXIT_USAGE, "--table"),
    # ... or, double-quoted, just names that do not exist (never executed as SQL)
    (["run", "--apply", "--table", f'"{INJECTION}"'], EXIT_ENVIRONMENT, "does not exist"),
    (
        ["run", "--apply", "--key", '"transaction_id""; DROP TABLE x; --"'],
        EXIT_ENVIRONMENT,
        "does not exist",
    ),
    (["run", "--apply", "--table", 'public."x; DROP TABLE x"'], EXIT_ENVIRONMENT, "does not"),
]


def test_bad_target_changes_nothing(payments: str) -> None:
    check_cases(payments, BAD_TARGETS)
    assert _x_exists(payments)


def test_quoted_identifiers_are_names_not_sql(payments: str) -> None:
    """A double-quoted identifier full of SQL is a legal (odd) name: it is created and used as
    such, and nothing else happens."""
    schema = "st; DROP TABLE x; --"
    result = run_cli(
        "run", "--apply", "--state-schema", f'"{schema}"', "--format", "json", "-d", payments
    )
    assert result.returncode == 0, result.stderr
    assert _x_exists(payments)
    assert state_schema_exists(payments, schema)
    assert not state_schema_exists(payments)
    changes = sync(fetchval(payments, f'SELECT count(*) FROM "{schema}".changes'))
    assert changes == 3


SHAPES = {
    "t_no_pk": "CREATE TABLE t_no_pk (id int, transaction_id text)",
    "t_int": "CREATE TABLE t_int (id int PRIMARY KEY, transaction_id int)",
    "t_uuid": "CREATE TABLE t_uuid (id int PRIMARY KEY, transaction_id uuid)",
    "t_bytea": "CREATE TABLE t_bytea (id int PRIMARY KEY, transaction_id bytea)",
    "t_view": "CREATE VIEW t_view AS SELECT * FROM payments",
    "t_seq": "CREATE SEQUENCE t_seq",
}
SHAPE_ERRORS = {
    "t_no_pk": ("no primary key", "--pk"),
    "t_int": ("type integer", "text, varchar and char"),
    "t_uuid": ("type uuid",),
    "t_bytea": ("type bytea",),
    "t_view": ("not a table",),
    "t_seq": ("not a table",),
}


def test_unsuitable_table_shape(payments: str) -> None:
    """No primary key, keys that are not text, relations that are not tables (a composite
    primary key is fine: tests/test_composite_pk.py).
    Each table holds what would be duplicates and has an index on the key: only the shape is
    wrong."""
    sync(execute(payments, *SHAPES.values()))
    sync(
        execute(
            payments,
            "INSERT INTO t_no_pk VALUES (1, 'd'), (2, 'd')",
            "INSERT INTO t_int VALUES (1, 7), (2, 7)",
            "INSERT INTO t_uuid SELECT i, '00000000-0000-0000-0000-000000000001' "
            "FROM generate_series(1, 2) i",
            "INSERT INTO t_bytea VALUES (1, '\\x01'), (2, '\\x01')",
            *(
                f"CREATE INDEX ON {t} (transaction_id)"
                for t in SHAPES
                if SHAPES[t].startswith("CREATE TABLE")
            ),
        )
    )
    check_cases(
        payments,
        [
            ([*command, "--table", table], EXIT_ENVIRONMENT, *fragments)
            for table, fragments in SHAPE_ERRORS.items()
            for command in (["scan"], ["run", "--apply"], ["run", "--dry-run"])
        ],
    )


def test_without_primary_key_a_unique_pk_column_works(payments: str) -> None:
    """The counterpart of the no-primary-key refusal: --pk naming a unique, not-null column is
    accepted, and --pk naming a column without a unique index is not."""
    sync(
        execute(
            payments,
            "CREATE TABLE t (ref int NOT NULL, other int, transaction_id text)",
            "INSERT INTO t VALUES (1, 1, 'k'), (2, 1, 'k'), (3, 2, 'z')",
            "CREATE UNIQUE INDEX ON t (ref)",
            "CREATE INDEX ON t (transaction_id)",
        )
    )
    before = fingerprint(payments)
    refused = invoke("run", "--apply", "--table", "t", "--pk", "other", "-d", payments)
    assert_one_error_line(refused, EXIT_ENVIRONMENT, "--pk other")
    assert fingerprint(payments) == before

    ok = invoke("run", "--apply", "--table", "t", "--pk", "ref", "-d", payments)
    assert ok.returncode == 0, ok.stderr
    keys = sync(fetchval(payments, "SELECT array_agg(transaction_id ORDER BY ref) FROM t"))
    assert keys == ["k", "k-2", "z"]


# --- option values out of range --------------------------------------------------------------

BAD_OPTIONS: list[list[str]] = [
    ["run", "--apply", "--batch-size", "0"],
    ["run", "--apply", "--batch-size", "-5"],
    ["run", "--apply", "--batch-size", "many"],
    ["run", "--apply", "--concurrency", "0"],
    ["run", "--apply", "--concurrency", "-1"],
    ["run", "--apply", "--concurrency", "1000"],
    ["run", "--apply", "--lock-timeout", "0"],
    ["run", "--apply", "--lock-timeout", "banana"],
    ["run", "--apply", "--lock-timeout", "-1s"],
    ["run", "--apply", "--statement-timeout", "0ms"],
    ["run", "--apply", "--max-retries", "-1"],
    ["run", "--apply", "--template", "{value}"],
    ["run", "--apply", "--template", "{oops}"],
    ["run", "--apply", "--template", "{pk}-{oops}"],
    ["run", "--apply", "--template", "{value-{pk}"],
    ["run", "--apply", "--template", ""],
    ["run", "--apply", "--run-id", "bad id;"],
    ["run", "--apply", "--run-id", "x" * 65],
    ["run", "--apply", "--run-id", "r'; DROP TABLE x; --"],
    ["run", "--apply", "--order", "sideways"],
    ["run", "--apply", "--synchronous-commit", "maybe"],
    ["run", "--apply", "--keep", "created_at sideways"],
    ["run", "--apply", "--keep", "id,,created_at"],
    ["run", "--apply", "--format", "xml"],
    ["run", "--apply", "--scanners", "0"],
    ["run", "--apply", "--scan-page-size", "0"],
    ["run", "--apply", "--connect-timeout", "0"],
    ["run", "--apply", "--no-such-option"],
    ["scan", "--top", "-1"],
    ["scan", "--connect-timeout", "soon"],
    ["verify", "--scanners", "0"],
    ["--log-level", "loud", "scan"],
    ["--log-format", "xml", "scan"],
    ["frobnicate"],
]


def test_option_out_of_range_is_a_usage_error(payments: str) -> None:
    check_cases(payments, [(args, EXIT_USAGE) for args in BAD_OPTIONS])


def test_missing_database_url_is_a_usage_error(
    payments: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = run_cli("run", "--apply")
    assert_one_error_line(result, EXIT_USAGE, "--database-url")


# --- reaching the server ---------------------------------------------------------------------


def _assert_secret_kept(result: subprocess.CompletedProcess[str]) -> None:
    assert SECRET not in result.stdout
    assert SECRET not in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@127.0.0.1:1/db",
        f"postgresql://u:{SECRET}@/db?host=/nonexistent/socket/dir",
        f"postgresql://u:{SECRET}@no-such-host.invalid:5432/db",
    ],
    ids=["refused-port", "missing-socket-dir", "unknown-host"],
)
def test_unreachable_server(url: str) -> None:
    started = time.monotonic()
    result = invoke("run", "--apply", "-d", url, "--connect-timeout", "2")
    elapsed = time.monotonic() - started
    assert_one_error_line(result, EXIT_ENVIRONMENT, "is the server up")
    _assert_secret_kept(result)
    # The 2 s asked for ended the wait, not the default, which alone takes 10 s. Timed in this
    # process: an interpreter start-up on a busy machine cannot eat the margin.
    assert elapsed < DEFAULT_CONNECT_TIMEOUT


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_silent_server_fails_within_connect_timeout(family: str, tmp_path: Path) -> None:
    """A listener that accepts connections and never answers: only the connect timeout ends
    the wait."""
    if family == "tcp":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        url = f"postgresql://u:{SECRET}@127.0.0.1:{listener.getsockname()[1]}/db"
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / ".s.PGSQL.5432"))
        url = f"postgresql://u:{SECRET}@/db?host={tmp_path}&port=5432"
    listener.listen(16)
    try:
        started = time.monotonic()
        result = invoke("run", "--apply", "-d", url, "--connect-timeout", "1")
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert_one_error_line(result, EXIT_ENVIRONMENT, "no answer within 1s (--connect-timeout)")
    _assert_secret_kept(result)
    assert elapsed < DEFAULT_CONNECT_TIMEOUT  # as above: the default alone would take 10 s


@pytest.mark.parametrize(
    "url",
    [
        "not a url",
        f"mysql://u:{SECRET}@localhost/db",
        f"postgresql://u:{SECRET}@localhost:notaport/db",
        f"postgresql://u:{SECRET}@[::1/db",
        f"postgresql://u:{SECRET}@localhost/db?sslmode=bogus",
    ],
)
def test_bad_database_url(url: str) -> None:
    result = invoke("scan", "-d", url, "--connect-timeout", "2")
    assert_one_error_line(result, EXIT_USAGE, "--database-url")
    _assert_secret_kept(result)


def test_missing_database(payments: str) -> None:
    url = payments.replace(database_of(payments), "no_such_database_here")
    result = invoke("run", "--apply", "-d", url)
    assert_one_error_line(result, EXIT_ENVIRONMENT, "no_such_database_here")


def test_unknown_role_is_an_authentication_error(payments: str) -> None:
    before = fingerprint(payments)
    result = invoke("run", "--apply", "-d", dsn_as(payments, "no_such_role_x", SECRET))
    assert_one_error_line(result, EXIT_ENVIRONMENT, "authentication failed")
    _assert_secret_kept(result)
    assert fingerprint(payments) == before


@pytest.fixture
def password_auth(pg_admin_dsn: str, role: str) -> Iterator[str]:
    """Make the test server ask ``role`` for a password (scram), for this test only.

    Possible on the embedded server this session started (its pg_hba.conf is ours to edit);
    not on a server named by BULKDEDUPE_TEST_DSN, whose configuration is not ours to touch.
    """
    if os.environ.get("BULKDEDUPE_TEST_DSN"):
        pytest.skip("password authentication needs a pg_hba.conf we may edit (embedded server)")
    hba = Path(sync(fetchval(pg_admin_dsn, "SHOW hba_file")))
    try:
        original = hba.read_text()
        hba.write_text(
            f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n" + original
        )
    except OSError as exc:
        pytest.skip(f"cannot edit {hba}: {exc}")
    try:
        sync(
            execute(
                pg_admin_dsn,
                f"ALTER ROLE \"{role}\" PASSWORD '{SECRET}'",
                "SELECT pg_reload_conf()",
            )
        )
        yield role
    finally:
        hba.write_text(original)
        sync(execute(pg_admin_dsn, "SELECT pg_reload_conf()"))


def test_wrong_password(payments: str, password_auth: str) -> None:
    sync(execute(payments, f'GRANT SELECT ON payments TO "{password_auth}"'))
    # The setup is real: the right password gets in (scan is read-only: 1 = duplicates found).
    right = invoke("scan", "-d", dsn_as(payments, password_auth, SECRET))
    assert right.returncode == 1, right.stderr
    _assert_secret_kept(right)

    before = fingerprint(payments)
    wrong_password = "Wr0ng-" + SECRET
    result = invoke("run", "--apply", "-d", dsn_as(payments, password_auth, wrong_password))
    assert_one_error_line(result, EXIT_ENVIRONMENT, "authentication failed")
    assert wrong_password not in result.stderr
    assert fingerprint(payments) == before

    missing = invoke("scan", "-d", dsn_as(payments, password_auth))
    assert_one_error_line(missing, EXIT_ENVIRONMENT)


# --- privileges and read-only ----------------------------------------------------------------


def test_select_only_role_cannot_apply(payments: str, role: str) -> None:
    sync(execute(payments, f'GRANT SELECT ON payments TO "{role}"'))
    as_role = dsn_as(payments, role, ROLE_PASSWORD)
    before = fingerprint(payments)

    result = invoke("run", "--apply", "-d", as_role)
    assert_one_error_line(result, EXIT_ENVIRONMENT, "lacks UPDATE", "GRANT UPDATE")
    assert fingerprint(payments) == before
    assert not state_schema_exists(payments)

    # Reading is all scan and a dry run need.
    assert invoke("scan", "-d", as_role).returncode == 1
    dry = invoke("run", "--dry-run", "-d", as_role)
    assert dry.returncode == 0, dry.stderr
    assert fingerprint(payments) == before


def test_role_without_select(payments: str, role: str) -> None:
    before = fingerprint(payments)
    for command in ("scan", "run --apply", "run --dry-run"):
        result = invoke(*command.split(), "-d", dsn_as(payments, role, ROLE_PASSWORD))
        assert_one_error_line(result, EXIT_ENVIRONMENT, "lacks SELECT")
    assert fingerprint(payments) == before


def test_role_that_may_not_create_the_state_schema(payments: str, role: str) -> None:
    """UPDATE on the table but no CREATE on the database: the state schema cannot be made, so
    nothing is renamed (an unaudited rename would break the contract)."""
    sync(
        execute(
            payments,
            f'GRANT SELECT, UPDATE ON payments TO "{role}"',
            f'REVOKE CREATE ON DATABASE "{database_of(payments)}" FROM PUBLIC',
        )
    )
    before = fingerprint(payments)
    result = invoke("run", "--apply", "-d", dsn_as(payments, role, ROLE_PASSWORD))
    assert_one_error_line(result, EXIT_ENVIRONMENT, "CREATE ON DATABASE", "init-state")
    assert fingerprint(payments) == before
    assert not state_schema_exists(payments)


def test_read_only_database(payments: str) -> None:
    database = database_of(payments)
    sync(execute(payments, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
    before = fingerprint(payments)

    result = invoke("run", "--apply", "-d", payments)
    assert_one_error_line(result, EXIT_ENVIRONMENT, "read-only")
    assert fingerprint(payments) == before
    assert not state_schema_exists(payments)

    scan = invoke("scan", "--format", "json", "-d", payments)
    assert scan.returncode == 1, scan.stderr
    assert '"rows_to_rename": 3' in scan.stdout
    dry = invoke("run", "--dry-run", "--format", "json", "-d", payments)
    assert dry.returncode == 0, dry.stderr
    assert '"rows_renamed": 3' in dry.stdout
    assert invoke("verify", "-d", payments).returncode == 1
    assert fingerprint(payments) == before


def test_read_only_via_url_options(payments: str) -> None:
    """The session is read-only (e.g. a connection pooler's setting): --apply refuses too."""
    sep = "&" if "?" in payments else "?"
    url = payments + sep + "options=" + quote("-c default_transaction_read_only=on")
    before = fingerprint(payments)
    result = invoke("run", "--apply", "-d", url)
    assert_one_error_line(result, EXIT_ENVIRONMENT, "read-only")
    assert fingerprint(payments) == before


# --- no usable index on the key ---------------------------------------------------------------


def _indexes(dsn: str) -> list[str]:
    names = sync(
        fetchval(
            dsn,
            "SELECT coalesce(array_agg(indexname::text ORDER BY indexname), '{}') "
            "FROM pg_indexes WHERE tablename = 'payments'",
        )
    )
    return list(names)


@pytest.fixture
def unindexed(dsn: str) -> str:
    sync(create_payments(dsn, rows=ROWS, index=False))
    return dsn


# Indexes on the key a keyset scan cannot walk in the column's order.
UNUSABLE_INDEXES = {
    "none": None,
    "partial": "CREATE INDEX ON {t} (transaction_id) WHERE amount > 0",
    "pattern_ops": "CREATE INDEX ON {t} (transaction_id text_pattern_ops)",
    "hash": "CREATE INDEX ON {t} USING hash (transaction_id)",
    "not_leading": "CREATE INDEX ON {t} (status, transaction_id)",
    "other_collation": 'CREATE INDEX ON {t} (transaction_id COLLATE "C")',
    "invalid": None,  # made invalid below, as a failed CREATE INDEX CONCURRENTLY leaves it
}


def test_no_usable_index(unindexed: str) -> None:
    for name, ddl in UNUSABLE_INDEXES.items():
        sync(create_payments(unindexed, table=f"p_{name}", rows=ROWS, index=False))
        if ddl:
            sync(execute(unindexed, ddl.format(t=f"p_{name}")))
    sync(
        execute(
            unindexed,
            "CREATE INDEX p_invalid_idx ON p_invalid (transaction_id)",
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'p_invalid_idx'::regclass",
        )
    )
    check_cases(
        unindexed,
        [
            (
                [*command, "--table", f"p_{name}"],
                EXIT_ENVIRONMENT,
                "no usable btree index",
                "--create-scan-index",
            )
            for name in UNUSABLE_INDEXES
            for command in (["scan"], ["verify"], ["run", "--apply"], ["run", "--dry-run"])
        ],
    )


def test_create_scan_index_needs_apply(unindexed: str) -> None:
    before = fingerprint(unindexed)
    result = invoke("run", "--dry-run", "--create-scan-index", "-d", unindexed)
    assert_one_error_line(result, EXIT_USAGE, "--apply")
    assert fingerprint(unindexed) == before


@pytest.mark.parametrize("keep_index", [False, True])
def test_create_scan_index_apply(unindexed: str, keep_index: bool) -> None:
    args = ["run", "--apply", "--create-scan-index", "--format", "json", "-d", unindexed]
    if keep_index:
        args.append("--keep-scan-index")
    result = invoke(*args)
    assert result.returncode == 0, result.stderr
    assert '"rows_renamed": 3' in result.stdout
    remaining = sync(
        fetchval(
            unindexed,
            "SELECT count(*) FROM (SELECT transaction_id FROM payments "
            "WHERE transaction_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) d",
        )
    )
    assert remaining == 0
    indexes = _indexes(unindexed)
    built = [i for i in indexes if i.startswith("bulkdedupe_scan_")]
    if keep_index:
        assert len(built) == 1, indexes
        valid = sync(
            fetchval(
                unindexed,
                "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass",
                built[0],
            )
        )
        assert valid
        assert invoke("verify", "-d", unindexed).returncode == 0
    else:
        assert built == [], indexes
        assert indexes == ["payments_pkey"]


def test_the_real_entry_point_agrees(payments: str) -> None:
    """Most cases above run the CLI in-process; `python -m bulkdedupe` behaves the same."""
    cases = [
        (["run", "--apply", "--table", INJECTION], EXIT_USAGE, "--table"),
        (["run", "--apply", "--batch-size", "0"], EXIT_USAGE, "--batch-size"),
        (["run", "--apply", "--lock-timeout", "banana"], EXIT_USAGE, "--lock-timeout"),
        (["run", "--apply", "--key", "nope"], EXIT_ENVIRONMENT, "--key"),
    ]
    check_cases(payments, cases, run=run_cli)
    assert _x_exists(payments)


def test_unwritable_output_changes_nothing(payments: str, tmp_path: Path) -> None:
    """A typo in --output is found before the state schema or a runs row is written."""
    missing_dir = tmp_path / "no" / "such" / "dir" / "plan.jsonl"
    check_cases(
        payments,
        [
            (["run", "--apply", "--output", str(missing_dir)], EXIT_USAGE, "--output"),
            (["run", "--dry-run", "--output", str(missing_dir)], EXIT_USAGE, "--output"),
            (["run", "--apply", "--output", str(tmp_path)], EXIT_USAGE, "--output"),
        ],
    )


def test_run_id_that_cannot_be_resumed(payments: str) -> None:
    """--run-id of a finished run, or of a run on another table: refused, nothing changed."""
    first = invoke("run", "--apply", "--run-id", "done-1", "-d", payments)
    assert first.returncode == 0, first.stderr
    sync(
        execute(
            payments,
            "CREATE TABLE other (id int PRIMARY KEY, transaction_id text)",
            "INSERT INTO other VALUES (1, 'o'), (2, 'o')",
            "CREATE INDEX ON other (transaction_id)",
        )
    )
    check_cases(
        payments,
        [
            (["run", "--apply", "--run-id", "done-1"], EXIT_ENVIRONMENT, "done-1 is completed"),
            (
                ["run", "--apply", "--run-id", "done-1", "--table", "other"],
                EXIT_ENVIRONMENT,
                "public.payments",
            ),
        ],
        expect_state_schema=True,
    )
