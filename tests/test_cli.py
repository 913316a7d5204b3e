"""The CLI contract other tools and scripts rely on: --version and --help, DATABASE_URL, the
JSON summaries of scan/run/verify, JSON log lines, exit codes, passwords never shown, and
connections tagged application_name=bulkdedupe."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import anyio
import asyncpg
import pytest
import structlog
from click.testing import CliRunner

from bulkdedupe import __version__
from bulkdedupe.cli import GC_THRESHOLDS, main, run_async
from tests.helpers import REPO_ROOT, create_payments, fetch, fetch_keys, run_cli, table_checksum

pytestmark = pytest.mark.anyio

SECRET = "pw-N0t-To-Be-Sh0wn"
# Groups: a x2, b x3 (3 renames); c is single; NULL keys never count.
ROWS = [("a",), ("b",), ("a",), ("b",), ("c",), ("b",), (None,), (None,)]
RUN_FIELDS = {
    "run_id",
    "groups",
    "rows_renamed",
    "rows_skipped",
    "skipped",
    "batches",
    "retries",
    "duration_s",
    "rows_per_s",
    "batch_ms_p50",
    "batch_ms_p99",
    "batch_ms_max",
}


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """In-process runs point structlog at the runner's stderr; leave no such global behind."""
    yield
    structlog.reset_defaults()


def one_json_object(stdout: str) -> dict[str, Any]:
    """stdout is exactly one line holding one JSON object."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    value = json.loads(lines[0])
    assert isinstance(value, dict)
    return value


def url_with_password(dsn: str) -> tuple[str, str]:
    """A URL of the test database that carries a password, and that password: the fixture's
    own when the server asks for one (CI's PostgreSQL 15), else a made-up one (the embedded
    server trusts local connections and ignores it)."""
    parts = urlsplit(dsn)
    if parts.password:
        return dsn, unquote(parts.password)
    user, _, hosts = parts.netloc.rpartition("@")
    user = user.partition(":")[0] or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{SECRET}@{hosts}")), SECRET


def password_as_parameter(url: str) -> str:
    """The same URL with the password moved to a `password=` query parameter (libpq style)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    query = f"{parts.query}&password={password}" if parts.query else f"password={password}"
    return urlunsplit(parts._replace(netloc=f"{user}@{hosts}", query=query))


# --- version and help -------------------------------------------------------------------------


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bulkdedupe, version {__version__}"
    # The installed console script is the same program.
    script = shutil.which("bulkdedupe", path=str(Path(sys.executable).parent))
    assert script is not None
    installed = subprocess.run(
        [script, "--version"], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    assert installed.returncode == 0
    assert installed.stdout == result.stdout


COMMON = ["--database-url", "--table", "--key", "--pk", "--state-schema", "--connect-timeout"]
HELP: dict[str, list[str]] = {
    "scan": [*COMMON, "--top", "--format", "--scanners", "--scan-page-size", "DATABASE_URL"],
    "verify": [*COMMON, "--format", "--scanners", "--scan-page-size"],
    "run": [
        *COMMON,
        "--dry-run",
        "--apply",
        "--batch-size",
        "--concurrency",
        "--keep",
        "--template",
        "--run-id",
        "--output",
        "--format",
        "--lock-timeout",
        "--statement-timeout",
        "--max-retries",
        "--create-scan-index",
        "--keep-scan-index",
        "--scanners",
        "--scan-page-size",
    ],
}


def test_help_lists_commands_and_global_options() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for word in ("scan", "run", "verify", "--log-format", "--log-level", "--version", "--help"):
        assert word in result.stdout, word


@pytest.mark.parametrize("command", sorted(HELP))
def test_subcommand_help_lists_its_options(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    for option in HELP[command]:
        assert option in result.stdout, (command, option)
    # -h is an alias
    assert CliRunner().invoke(main, [command, "-h"]).stdout == result.stdout


# --- the summaries --------------------------------------------------------------------------


async def test_json_summaries_and_exit_codes(dsn: str, tmp_path: Path) -> None:
    await create_payments(dsn, rows=ROWS)

    scan = run_cli("scan", "--format", "json", "--top", "1", "-d", dsn)
    assert scan.returncode == 1, scan.stderr  # duplicates found
    report = one_json_object(scan.stdout)
    assert report["table"] == "public.payments"
    assert report["key"] == "transaction_id"
    assert report["groups"] == 2
    assert report["rows_to_rename"] == 3
    assert [(g["value"], g["rows"]) for g in report["largest_groups"]] == [("b", 3)]
    assert report["ok"] is False
    for name in ("estimated_rows", "scanned_rows", "duration_s", "index"):
        assert name in report

    plan = tmp_path / "plan.jsonl"
    before = await table_checksum(dsn)
    dry = run_cli("run", "--format", "json", "--output", str(plan), "-d", dsn)
    assert dry.returncode == 0, dry.stderr
    summary = one_json_object(dry.stdout)
    assert summary.keys() >= RUN_FIELDS
    assert summary["mode"] == "dry-run"
    assert summary["rows_renamed"] == 3
    assert await table_checksum(dsn) == before
    lines = [json.loads(line) for line in plan.read_text().splitlines()]
    assert {(p["pk"], p["old_value"], p["new_value"], p["survivor_pk"]) for p in lines} == {
        (3, "a", "a-3", 1),
        (4, "b", "b-4", 2),
        (6, "b", "b-6", 2),
    }

    applied = run_cli(
        "run", "--apply", "--run-id", "cli-json-1", "--batch-size", "1", "--format", "json",
        "-d", dsn,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    summary = one_json_object(applied.stdout)
    assert summary.keys() >= RUN_FIELDS
    assert summary["run_id"] == "cli-json-1"
    assert summary["mode"] == "apply"
    assert summary["status"] == "completed"
    assert summary["groups"] == 2
    assert summary["rows_renamed"] == 3
    assert summary["rows_skipped"] == 0
    assert summary["skipped"] == {}
    assert summary["batches"] >= 2  # batch size 1 row: the group of 3 takes two transactions
    assert summary["retries"] == 0
    for name in ("duration_s", "rows_per_s", "batch_ms_p50", "batch_ms_p99", "batch_ms_max"):
        assert isinstance(summary[name], int | float), name
        assert summary[name] >= 0, name
    assert summary["batch_ms_p50"] <= summary["batch_ms_p99"] <= summary["batch_ms_max"]
    assert (await fetch_keys(dsn))[6] == "b-6"

    verify = run_cli("verify", "--format", "json", "-d", dsn)
    assert verify.returncode == 0, verify.stderr
    result = one_json_object(verify.stdout)
    assert result["ok"] is True
    assert result["groups"] == 0
    assert result["rows_to_rename"] == 0

    # and scan agrees: exit 0 when there is nothing to do
    clean = run_cli("scan", "--format", "json", "-d", dsn)
    assert clean.returncode == 0
    assert one_json_object(clean.stdout)["groups"] == 0


async def test_verify_exit_1_with_counts(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    result = run_cli("verify", "-d", dsn)
    assert result.returncode == 1
    assert "DUPLICATES REMAIN" in result.stdout
    as_json = run_cli("verify", "--format", "json", "-d", dsn)
    assert as_json.returncode == 1
    assert one_json_object(as_json.stdout) | {"duration_s": 0, "scanned_rows": 0} == {
        "table": "public.payments",
        "key": "transaction_id",
        "groups": 2,
        "rows_to_rename": 3,
        "scanned_rows": 0,
        "duration_s": 0,
        "ok": False,
    }


async def test_database_url_from_the_environment(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    env = {"DATABASE_URL": dsn}
    scan = run_cli("scan", "--format", "json", env=env)
    assert scan.returncode == 1, scan.stderr
    assert one_json_object(scan.stdout)["rows_to_rename"] == 3
    applied = run_cli("run", "--apply", "--format", "json", env=env)
    assert applied.returncode == 0, applied.stderr
    assert run_cli("verify", env=env).returncode == 0
    # -d wins over the environment
    wrong = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}
    assert run_cli("verify", "-d", dsn, env=wrong).returncode == 0


# --- logs -----------------------------------------------------------------------------------


async def test_log_format_json_is_json_lines_on_stderr(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    result = run_cli(
        "--log-format", "json", "--log-level", "debug", "run", "--apply", "--run-id", "logs-1",
        "--format", "json", "-d", dsn,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    one_json_object(result.stdout)  # logs never mix into stdout
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert events
    for event in events:
        assert {"event", "level", "timestamp"} <= event.keys(), event
    started = [e for e in events if e["event"] == "run started"]
    assert len(started) == 1
    assert started[0]["run_id"] == "logs-1"
    assert started[0]["mode"] == "apply"
    assert any(e["level"] == "debug" for e in events)

    quiet = run_cli("--log-format", "json", "--log-level", "warning", "verify", "-d", dsn)
    assert quiet.returncode == 0
    assert quiet.stderr == ""


async def test_log_format_console(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    result = run_cli("--log-format", "console", "run", "--apply", "-d", dsn)
    assert result.returncode == 0, result.stderr
    assert "run started" in result.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stderr.splitlines()[0])


async def test_password_never_printed_logged_or_stored(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    url, secret = url_with_password(dsn)
    outputs: list[subprocess.CompletedProcess[str]] = []
    for log_format in ("json", "console"):
        outputs.append(
            run_cli("--log-format", log_format, "--log-level", "debug", "scan", "-d", url)
        )
    apply = ["run", "--apply", "--format", "json", "--run-id", "pw-1", "-d", url]
    outputs.append(run_cli("--log-format", "json", "--log-level", "debug", *apply))
    assert outputs[-1].returncode == 0, outputs[-1].stderr
    # libpq also takes the password as a query parameter
    outputs.append(run_cli("--log-level", "debug", "scan", "-d", password_as_parameter(url)))
    # Error paths, including the debug traceback and a server that cannot be reached.
    outputs.append(run_cli("--log-level", "debug", "scan", "--table", "nope", "-d", url))
    unreachable = f"postgresql://u:{secret}@127.0.0.1:1/db"
    outputs.append(run_cli("--log-level", "debug", "scan", "-d", unreachable))
    outputs.append(
        run_cli("--log-level", "debug", "scan", "-d", unreachable.replace(":1/", ":bad/"))
    )
    assert [o.returncode for o in outputs] == [1, 1, 0, 0, 3, 3, 2]
    for output in outputs:
        assert secret not in output.stdout
        assert secret not in output.stderr
    # The runs table records where the run went, without the password.
    rows = await fetch(dsn, "SELECT r::text AS row FROM bulkdedupe.runs r")
    assert len(rows) == 1
    assert secret not in rows[0]["row"]
    assert "***" in rows[0]["row"]


async def test_traceback_only_at_debug_level(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    plain = run_cli("scan", "--table", "nope", "-d", dsn)
    assert plain.returncode == 3
    assert "Traceback" not in plain.stderr
    debug = run_cli("--log-level", "debug", "scan", "--table", "nope", "-d", dsn)
    assert debug.returncode == 3
    assert "Traceback" in debug.stderr
    # the last line is still the one-line error
    assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


# --- application_name -----------------------------------------------------------------------


async def test_connections_carry_application_name(dsn: str, tmp_path: Path) -> None:
    """Hold an exclusive lock on the table so the run stalls at its first scan page, then look
    (from a third connection: pg_stat_activity is a per-transaction snapshot) at every backend
    it opened; and record the application_name of each rename's session with a trigger."""
    await create_payments(dsn, rows=ROWS)
    locker = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    try:
        await locker.execute(
            """
            CREATE TABLE seen (application_name text);
            CREATE FUNCTION record_app() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO seen VALUES (current_setting('application_name'));
                RETURN NEW;
            END $$;
            CREATE TRIGGER record_app BEFORE UPDATE ON payments
                FOR EACH ROW EXECUTE FUNCTION record_app();
            """
        )
        tx = locker.transaction()
        await tx.start()
        await locker.execute("LOCK TABLE payments IN ACCESS EXCLUSIVE MODE")
        ours = [locker.get_server_pid(), watcher.get_server_pid()]
        with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
            async with await anyio.open_process(
                [sys.executable, "-m", "bulkdedupe", "run", "--apply", "-d", dsn],
                cwd=REPO_ROOT,
                stdout=out,
                stderr=err,
            ) as proc:
                try:
                    blocked = False
                    with anyio.move_on_after(60):
                        while not blocked and proc.returncode is None:
                            await anyio.sleep(0.05)
                            blocked = await watcher.fetchval(
                                "SELECT count(*) > 0 FROM pg_stat_activity "
                                "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                                "AND NOT pid = ANY($1::int[])",
                                ours,
                            )
                    others = await watcher.fetch(
                        "SELECT application_name FROM pg_stat_activity "
                        "WHERE datname = current_database() AND backend_type = 'client backend' "
                        "AND NOT pid = ANY($1::int[])",
                        ours,
                    )
                finally:
                    await tx.rollback()
                    with anyio.move_on_after(120):
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
        assert blocked, "the run never blocked on the table lock"
        assert proc.returncode == 0, (tmp_path / "err").read_text()
        assert len(others) >= 2  # the control connection and the pool
        assert {r["application_name"] for r in others} == {"bulkdedupe"}
        seen = await watcher.fetch("SELECT application_name FROM seen")
        assert len(seen) == 3
        assert {r["application_name"] for r in seen} == {"bulkdedupe"}
    finally:
        await locker.close()
        await watcher.close()


# --- misc -----------------------------------------------------------------------------------


async def test_dry_run_writes_nothing_anywhere(dsn: str) -> None:
    await create_payments(dsn, rows=ROWS)
    before = await table_checksum(dsn)
    result = run_cli("run", "--dry-run", "-d", dsn)
    assert result.returncode == 0, result.stderr
    assert "would be renamed" in result.stdout
    assert await table_checksum(dsn) == before
    schemas = await fetch(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = 'bulkdedupe'")
    assert schemas == []


def test_commands_run_with_the_tools_collector_thresholds_then_restore_them() -> None:
    """A command runs with GC_THRESHOLDS (the default ones cost a heap-order run a quarter of
    its CPU), and whoever called the CLI gets its own thresholds back, after an error too."""
    before = gc.get_threshold()
    assert before != GC_THRESHOLDS  # else this test could not tell

    async def seen() -> tuple[int, ...]:
        return gc.get_threshold()

    assert run_async(seen) == GC_THRESHOLDS
    assert gc.get_threshold() == before

    async def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_async(fails)
    assert gc.get_threshold() == before
