"""Where each second and each WAL byte of a run goes (issue 13): the one-statement UPDATE against
``bulkdedupe run --apply --max-impact off`` and the scan alone, on identical fresh copies; and
the heap-order floor (``benchmarks.baselines heap-floor``: the same renames in heap order with
their audit rows, found by position, no locks and no checks), the least any heap-order client
can make the server do; and the checked heap-order floor (``heap-floor-checked``: the same with
the tool's locks and checks, sent by a client that sorts nothing), the least a *safe* one can.

    python -m benchmarks.anatomy --rows 5000000 [--rows 1000000] [--repeat 2] [--no-waldump]

For each table size and method, on a fresh copy of the suite's template (vacuumed, analyzed,
checkpointed, as ``benchmarks.run`` restores it), with no load beside it:

- the server's counters around the run: ``pg_stat_wal`` (records, full-page images, bytes),
  ``pg_stat_io`` by backend type (writes, fsyncs, WAL writes), ``pg_stat_checkpointer``,
  ``pg_stat_bgwriter``, ``pg_stat_statements`` by statement (calls, time, blocks, WAL, FPIs);
- every 100 ms: ``pg_stat_activity`` (what each session waits on), the WAL insert position,
  ``pg_stat_wal``, the checkpointer's counters, the table's block reads and the CPU (from
  ``/proc``) of the tool's process, of each server process and of the whole machine; the tool
  run is split at its ``scan finished`` log line into "scan" (one worker renaming beside it)
  and "renames" (all workers, no scan);
- the tool's round trips, timed client-side: the tool runs under ``benchmarks.tracer``, which
  times every query asyncpg sends (BEGIN, each statement, COMMIT, the pool's reset on release)
  and the event loop's lag, without changing the tool;
- with ``--waldump`` (the default, on a local server): one more run of each method with
  ``wal_keep_size`` raised so that its WAL survives, read with ``pg_waldump``: bytes and
  full-page images per resource manager (``--stats=record``) and per relation (heap, each
  index, the audit table), and how many distinct blocks they hit. The extra run is not timed
  (keeping the segments instead of recycling them changes the WAL I/O, not the WAL).

Without ``-d`` it starts (or reuses) the suite's embedded server in ``.pgdata-bench`` with the
suite's durable default settings, plus ``pg_stat_statements``, ``track_io_timing`` and
``track_wal_io_timing`` (observability only; reset at the end), and reuses the suite's cached
templates. Results: ``benchmarks/results/<timestamp>-anatomy.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg

from benchmarks import pgserver
from benchmarks import run as suite_run
from benchmarks.tracer import SCAN_LABELS, WORKER_LABELS, classify

REPO_ROOT: Final = suite_run.REPO_ROOT
TABLE: Final = suite_run.TABLE
HARNESS: Final = suite_run.HARNESS
SAMPLE_INTERVAL: Final = 0.1
# Sampled before each run: what the machine's other work costs while nothing of ours runs.
IDLE_BEFORE: Final = 2.0
# After each run: the backends' last statistics reach the shared counters (at most 1 s late).
SETTLE: Final = 1.5
# Observability only, set for the measurement and reset after it.
TIMING_SETTINGS: Final = {"track_io_timing": "on", "track_wal_io_timing": "on"}
# Enough to keep every segment of a 20M run's WAL for pg_waldump (the forensic runs only).
WAL_KEEP: Final = "64GB"
BLCKSZ: Final = 8192
METHODS: Final = (
    "one-statement",
    "bulkdedupe",
    "bulkdedupe-key",
    "heap-floor",
    "heap-floor-checked",
    "scan",
)
# the baselines: run as benchmarks.baselines METHOD, untraced
BASELINES: Final = ("one-statement", "heap-floor", "heap-floor-checked")


def log(msg: str) -> None:
    print(f"anatomy: {msg}", file=sys.stderr, flush=True)


# --- the tracer's timings -------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _ms(values: Sequence[float]) -> dict[str, Any]:
    """count, total, mean, p50, p99, max of durations in seconds, as milliseconds."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "total_ms": round(sum(values) * 1000, 1),
        "mean_ms": round(sum(values) / len(values) * 1000, 3),
        "p50_ms": round((_pct(values, 50) or 0) * 1000, 3),
        "p99_ms": round((_pct(values, 99) or 0) * 1000, 3),
        "max_ms": round(max(values) * 1000, 3),
    }


def summarize_trace(raw: dict[str, Any], split_at: float | None) -> dict[str, Any]:
    """Round trips per batch and per scan page, and where a batch's time goes: in its queries
    (client-observed: server time + network + waiting for the event loop) or between them
    (the tool's own Python work inside the transaction), and the idle time between batches.
    ``split_at`` (seconds on the trace's clock): the end of the scan."""
    by_conn: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for c, t0, t1, label in raw["events"]:
        by_conn[c].append((t0, t1, label))
    per_label: dict[str, list[float]] = defaultdict(list)
    batches: list[dict[str, Any]] = []
    resets: dict[str, list[float]] = defaultdict(list)
    idle_between: list[float] = []
    pages = 0
    for events in by_conn.values():
        events.sort()
        txn: list[tuple[float, float, str]] | None = None
        last_end: float | None = None
        owner = "other"
        for t0, t1, label in events:
            per_label[label].append(t1 - t0)
            if label == "reset":
                resets[owner].append(t1 - t0)
                last_end = t1
                continue
            if label == "begin":
                if last_end is not None:
                    idle_between.append(t0 - last_end)
                txn = []
            if label in SCAN_LABELS:
                owner = "scan"
                pages += label == "scan_page"
            elif label in WORKER_LABELS:
                owner = "worker"
            if txn is not None:
                txn.append((t0, t1, label))
            if label in ("commit", "rollback") and txn:
                if any(x[2] in ("lock_keys", "lock_chunk", "apply_renames") for x in txn):
                    batches.append(_batch(txn))
                txn = None
    phases: dict[str, list[dict[str, Any]]] = {"all": batches}
    if split_at is not None:
        phases["scan"] = [b for b in batches if b["t0"] < split_at]
        phases["renames"] = [b for b in batches if b["t0"] >= split_at]
    lags = [x / 1000 for x in raw["lags_ms"]]
    return {
        "queries": {k: _ms(v) for k, v in sorted(per_label.items())},
        "resets_after": {k: _ms(v) for k, v in resets.items()},
        "batches": {k: _batches(v) for k, v in phases.items()},
        "idle_between_batches": _ms(idle_between),
        "scan_pages": pages,
        "event_loop_lag": _ms(lags) | {"over_5ms": sum(x > 0.005 for x in lags)},
        "tool_cpu_s": round(raw["cpu_user_s"] + raw["cpu_system_s"], 2),
        "other_queries": raw.get("other_queries", []),
    }


def _batch(txn: list[tuple[float, float, str]]) -> dict[str, Any]:
    in_queries = sum(t1 - t0 for t0, t1, _ in txn)
    span = txn[-1][1] - txn[0][0]
    return {
        "t0": txn[0][0],
        "round_trips": len(txn),
        "labels": Counter(label for *_, label in txn),
        "span": span,
        "in_queries": in_queries,
        "between": span - in_queries,
    }


def _batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    if not batches:
        return {"n": 0}
    n = len(batches)
    labels: Counter[str] = Counter()
    for b in batches:
        labels.update(b["labels"])
    return {
        "n": n,
        "round_trips_mean": round(sum(b["round_trips"] for b in batches) / n, 2),
        "round_trips_by_statement": {k: round(v / n, 2) for k, v in sorted(labels.items())},
        "span": _ms([b["span"] for b in batches]),
        "in_queries": _ms([b["in_queries"] for b in batches]),
        "between_queries": _ms([b["between"] for b in batches]),
    }


# --- /proc: CPU of processes and of the machine ---------------------------------------------

_TICK: Final = os.sysconf("SC_CLK_TCK")
_BOOT: Final = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def proc_cpu(pid: int) -> tuple[float, float, float] | None:
    """(user s, system s, start time as epoch seconds) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # after "pid (comm) ": state is field 3, utime 14, stime 15, starttime 22 (1-based)
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK, _BOOT + int(fields[19]) / _TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    total = sum(parts[:8])
    return (total - idle) / _TICK, total / _TICK


# --- sampling every 100 ms ------------------------------------------------------------------

# The checkpointer's counters: its own view from PostgreSQL 17, pg_stat_bgwriter's before.
CHECKPOINTER: Final = (
    "(SELECT num_timed, num_requested, num_done, write_time, sync_time, buffers_written"
    " FROM pg_stat_checkpointer)"
)
CHECKPOINTER_16: Final = (
    "(SELECT checkpoints_timed AS num_timed, checkpoints_req AS num_requested,"
    " checkpoints_timed + checkpoints_req AS num_done, checkpoint_write_time AS write_time,"
    " checkpoint_sync_time AS sync_time, buffers_checkpoint AS buffers_written"
    " FROM pg_stat_bgwriter)"
)


def checkpointer(version_num: int) -> str:
    return CHECKPOINTER if version_num >= 170000 else CHECKPOINTER_16


SAMPLE_SQL: Final = f"""
SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS lsn,
       w.wal_records, w.wal_fpi, w.wal_bytes::bigint AS wal_bytes, w.wal_buffers_full,
       c.num_timed + c.num_requested AS ckpt_started, c.num_done AS ckpt_done,
       c.buffers_written AS ckpt_buffers,
       coalesce(s.heap_blks_read, 0) + coalesce(s.heap_blks_hit, 0) AS heap_blks,
       coalesce(s.idx_blks_read, 0) + coalesce(s.idx_blks_hit, 0) AS idx_blks,
       coalesce(s.heap_blks_read, 0) + coalesce(s.idx_blks_read, 0) AS blks_read,
       coalesce(u.n_tup_upd, 0) AS updates,
       (SELECT coalesce(json_agg(json_build_array(
                   a.pid, a.backend_type, a.application_name, a.state,
                   a.wait_event_type, a.wait_event, left(a.query, 1000))), '[]')
        FROM pg_stat_activity a
        WHERE a.pid <> pg_backend_pid()
          AND a.application_name IS DISTINCT FROM '{HARNESS["application_name"]}'
          AND (a.datname = current_database() OR a.backend_type <> 'client backend')
       ) AS activity
FROM pg_stat_wal w, {{checkpointer}} c
LEFT JOIN pg_statio_user_tables s ON s.relname = '{TABLE}'
LEFT JOIN pg_stat_user_tables u ON u.relid = s.relid
"""


@dataclass
class Sample:
    t: float
    row: dict[str, Any]
    activity: list[list[Any]]
    cpu: dict[int, tuple[float, float, float]]  # pid -> (user, system, start)
    machine: tuple[float, float]
    harness: float


@dataclass
class Sampler:
    """Samples the server and /proc every 100 ms until stopped. ``child`` holds the tool's pid
    once its process runs."""

    dsn: str
    version_num: int
    origin: float  # time.monotonic() at t = 0
    wall0: float  # time.time() at t = 0
    child: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    async def run(self, stop: anyio.Event) -> None:
        conn = await asyncpg.connect(self.dsn, server_settings=HARNESS)
        try:
            while True:
                await self.sample(conn)
                if stop.is_set():
                    return
                with anyio.move_on_after(SAMPLE_INTERVAL):
                    await stop.wait()
        finally:
            await conn.close()

    async def sample(self, conn: asyncpg.Connection) -> None:
        row = await conn.fetchrow(SAMPLE_SQL.format(checkpointer=checkpointer(self.version_num)))
        assert row is not None
        t = time.monotonic() - self.origin
        activity = json.loads(row["activity"])
        pids = {int(a[0]) for a in activity}
        if "pid" in self.child:
            pids.add(self.child["pid"])
        cpu = {pid: c for pid in pids if (c := proc_cpu(pid)) is not None}
        me = os.times()
        self.samples.append(
            Sample(
                t=t,
                row={k: v for k, v in row.items() if k != "activity"},
                activity=activity,
                cpu=cpu,
                machine=machine_cpu(),
                harness=me.user + me.system,
            )
        )


def _who(backend_type: str, app: str | None) -> str:
    if app and app.startswith("bulkdedupe"):
        return "tool"
    if app == "bench-baseline":
        return "baseline"
    if backend_type == "client backend":
        return "other client"
    return backend_type


def _state(state: str | None, wtype: str | None, wevent: str | None) -> str:
    if state == "idle":
        return "idle (client)"
    if state and state.startswith("idle in transaction"):
        return "idle in transaction (client)"
    if wtype is None:
        return "CPU"
    return f"{wtype}:{wevent}"


def _role(who: str, state: str | None, query: str | None) -> str:
    """A tool session's current job: its statement's, or "pool" when idle between jobs (the
    pool serves scanners and workers alike, so an idle session belongs to neither)."""
    if who != "tool":
        return who
    if state == "idle":
        return "tool: idle in the pool"
    label = classify(query)
    if label in SCAN_LABELS:
        return "tool: scanner"
    if label in WORKER_LABELS or (state or "").startswith("idle in transaction"):
        return "tool: worker"
    return "tool: other"


def _cpu_between(inside: list[Sample], pid: int, wall_t0: float) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid`` over the samples; all of it when the process was
    born after the first one."""
    first = next((s.cpu[pid] for s in inside if pid in s.cpu), None)
    last = next((s.cpu[pid] for s in reversed(inside) if pid in s.cpu), None)
    if first is None or last is None:
        return None
    base = (0.0, 0.0) if first[2] > wall_t0 else first[:2]
    return last[0] - base[0], last[1] - base[1]


def phase_figures(
    sampler: Sampler, t0: float, t1: float, tool_pid: int | None, flushed: float | None = None
) -> dict[str, Any]:
    """What the samples between ``t0`` and ``t1`` say: WAL, FPIs, checkpoints, block accesses,
    CPU by process kind, and sessions' states (counts of 100 ms samples). The cumulative
    statistics but the WAL position are read up to ``flushed`` when given: a backend publishes
    its counters at most once a second, and when it exits."""
    inside = [s for s in sampler.samples if t0 <= s.t <= t1]
    if len(inside) < 2:
        return {"seconds": round(t1 - t0, 3), "samples": len(inside)}
    a, b = inside[0], inside[-1]
    late = [s for s in sampler.samples if t0 <= s.t <= flushed] if flushed else inside
    d = {k: late[-1].row[k] - a.row[k] for k in a.row}
    d["lsn"] = b.row["lsn"] - a.row["lsn"]
    seconds = b.t - a.t
    activity: dict[str, Counter[str]] = defaultdict(Counter)
    kinds: dict[int, str] = {}
    for s in inside:
        for pid, btype, app, state, wtype, wevent, query in s.activity:
            who = kinds[pid] = _who(btype, app)
            if btype == "autovacuum launcher" or (
                wtype == "Activity" and btype != "client backend"
            ):
                continue  # background processes sleeping between rounds: CPU only
            activity[_role(who, state, query)][_state(state, wtype, wevent)] += 1
    cpu: dict[str, float] = defaultdict(float)
    wall_t0 = sampler.wall0 + a.t
    for pid, who in kinds.items():
        if (used := _cpu_between(inside, pid, wall_t0)) is not None:
            cpu[f"server: {who}"] += sum(used)
    if tool_pid is not None and (used := _cpu_between(inside, tool_pid, wall_t0)) is not None:
        cpu["tool process: user"], cpu["tool process: system"] = used
    cpu["harness"] = b.harness - a.harness
    busy = b.machine[0] - a.machine[0]
    cpu["machine busy"] = busy
    cpu["machine: everything else"] = busy - sum(
        v for k, v in cpu.items() if k not in ("machine busy",)
    )
    return {
        "seconds": round(seconds, 3),
        "samples": len(inside),
        "wal_bytes": d["lsn"],
        "wal_records": d["wal_records"],
        "wal_fpi": d["wal_fpi"],
        "wal_buffers_full": d["wal_buffers_full"],
        "checkpoints_started": d["ckpt_started"],
        "checkpoints_done": d["ckpt_done"],
        "table_heap_blocks": d["heap_blks"],
        "table_index_blocks": d["idx_blks"],
        "table_blocks_read": d["blks_read"],
        "updates": d["updates"],
        "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.items())},
        "activity": {k: dict(v.most_common()) for k, v in sorted(activity.items())},
    }


# --- cumulative statistics around a run ------------------------------------------------------

IO_SQL: Final = "SELECT * FROM pg_stat_io"  # PostgreSQL 16+; its columns vary by version
COUNTERS_SQL: Final = """
SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS lsn,
       w.wal_records, w.wal_fpi, w.wal_bytes::bigint AS wal_bytes, w.wal_buffers_full,
       c.num_timed, c.num_requested, c.num_done, c.write_time AS ckpt_write_ms,
       c.sync_time AS ckpt_sync_ms, c.buffers_written AS ckpt_buffers_written,
       b.buffers_clean AS bgwriter_buffers_clean, b.maxwritten_clean, b.buffers_alloc
FROM pg_stat_wal w, {checkpointer} c, pg_stat_bgwriter b
"""
PGSS_SQL: Final = """
SELECT query, calls, total_exec_time, rows, shared_blks_hit, shared_blks_read,
       shared_blks_dirtied, shared_blks_written, wal_records, wal_fpi, wal_bytes::bigint
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def counters(conn: asyncpg.Connection, version_num: int) -> dict[str, Any]:
    row = await conn.fetchrow(COUNTERS_SQL.format(checkpointer=checkpointer(version_num)))
    assert row is not None
    io = {
        f"{r['backend_type']}/{r['object']}/{r['context']}": {
            k: float(v) for k, v in r.items() if isinstance(v, int | float) and k != "op_bytes"
        }
        for r in (await conn.fetch(IO_SQL) if version_num >= 160000 else [])
    }
    return {"counters": {k: float(v) for k, v in row.items()}, "io": io}


def counters_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    diff = {k: b["counters"][k] - a["counters"][k] for k in a["counters"]}
    io = {}
    for key, after in b["io"].items():
        before = a["io"].get(key, {})
        d = {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()}
        d = {k: v for k, v in d.items() if v}
        if d:
            io[key] = d
    return {"counters": diff, "io": io}


async def statements(conn: asyncpg.Connection) -> dict[str, dict[str, float]]:
    """pg_stat_statements of the work database, summed by statement class."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in await conn.fetch(PGSS_SQL):
        label = classify(r["query"])
        if label == "other" and "pg_stat" in r["query"]:
            continue  # the sampler's own queries
        for k, v in r.items():
            if k != "query":
                out[label][k] += float(v)
    return {k: {f: round(v, 3) for f, v in c.items()} for k, c in sorted(out.items())}


# --- pg_waldump: what the WAL of a run is made of -------------------------------------------


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_STATS_LINE: Final = re.compile(
    r"^(?P<type>\S+)\s+(?P<n>\d+)\s+\(\s*[\d.]+\)\s+(?P<rec>\d+)\s+\(\s*[\d.]+\)\s+"
    r"(?P<fpi>\d+)\s+\(\s*[\d.]+\)\s+(?P<tot>\d+)\s+\(\s*[\d.]+\)"
)
_RECORD: Final = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s+(\d+)/\s*(\d+),.*desc: (\S+)")
_BLKREF: Final = re.compile(
    r"blkref #\d+: rel (\d+)/(\d+)/(\d+)(?: fork (\w+))? blk (\d+)( \(FPW\))?"
    r"(?:; hole: offset: \d+, length: (\d+))?(?:, compression saved: (\d+))?"
)


def waldump_stats(waldump: str, waldir: str, lsn0: int, lsn1: int) -> dict[str, Any]:
    """``pg_waldump --stats=record``: records, record bytes and FPI bytes per record type."""
    out = subprocess.run(
        [waldump, "-p", waldir, "-s", lsn_text(lsn0), "-e", lsn_text(lsn1), "--stats=record"],
        capture_output=True,
        text=True,
        check=True,
        timeout=3600,
    ).stdout
    types = {}
    for line in out.splitlines():
        m = _STATS_LINE.match(line.strip())
        if m and m["type"] not in ("Type", "Total"):
            types[m["type"]] = {
                "records": int(m["n"]),
                "record_bytes": int(m["rec"]),
                "fpi_bytes": int(m["fpi"]),
                "bytes": int(m["tot"]),
            }
    return types


def waldump_relations(
    waldump: str, waldir: str, lsn0: int, lsn1: int, names: dict[tuple[int, int], str]
) -> dict[str, Any]:
    """``parse_blocks`` of ``pg_waldump -b`` between the LSNs."""
    argv = [waldump, "-p", waldir, "-s", lsn_text(lsn0), "-e", lsn_text(lsn1), "-b"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1 << 20) as proc:
        assert proc.stdout is not None
        out = parse_blocks(proc.stdout, names)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv)
    return out


def parse_blocks(lines: Iterable[str], names: dict[tuple[int, int], str]) -> dict[str, Any]:
    """Every block reference of ``pg_waldump -b`` output, by relation: the records that name
    it first and their bytes besides images, its full-page images (count, bytes, and which
    record types carry them), its block references and distinct blocks. ``names``: (database
    oid, relfilenode) -> name; a database's unnamed relations count as its catalogs.

    Checkpoint cycles are told apart by their CHECKPOINT_REDO records (PostgreSQL 17+): a page
    gets one image per cycle in which it is touched, so ``block_cycles`` (distinct pages and
    cycles) is what order and checkpoints cost, ``distinct_blocks`` the least any order could
    pay; ``fpi_hint_only`` counts the images of pages that a reader only hinted (XLOG/
    FPI_FOR_HINT, checksums on) and nothing changed in that cycle."""
    rels: dict[str, Counter[str]] = defaultdict(Counter)
    fpi_types: dict[str, Counter[str]] = defaultdict(Counter)
    # relation -> {(relfilenode, block, cycle): flags}: 1 hinted image, 2 changed
    pages: dict[str, dict[tuple[int, int, int], int]] = defaultdict(dict)
    checkpoints: Counter[str] = Counter()
    cycle = 0
    databases = {db for db, _ in names}
    record: list[Any] = []  # [first relation, total bytes, image bytes] of the current record
    rtype = ""

    def close_record() -> None:
        if record:
            rels[record[0] or "(no block)"].update(records=1, record_bytes=record[1] - record[2])

    for line in lines:
        if line.startswith("rmgr:"):
            close_record()
            m = _RECORD.match(line)
            record = [None, int(m[3]) if m else 0, 0]
            rtype = f"{m[1]}/{m[4]}" if m else "?"
            if rtype.startswith("XLOG/CHECKPOINT"):
                checkpoints[rtype] += 1
                cycle += rtype == "XLOG/CHECKPOINT_REDO"
            continue
        b = _BLKREF.search(line)
        if b is None:
            continue
        _, db, node, fork, blk, fpw, hole, saved = b.groups()
        name = names.get((int(db), int(node)))
        if name is None:
            name = "catalogs" if int(db) in databases else "other databases"
            name = "shared catalogs" if int(db) == 0 else name
        if fork and fork != "main":
            name += f" ({fork})"
        record[0] = record[0] or name
        rels[name]["refs"] += 1
        key = (int(node), int(blk), cycle)
        hint = rtype == "XLOG/FPI_FOR_HINT"
        pages[name][key] = pages[name].get(key, 0) | (1 if hint and fpw else 0 if hint else 2)
        if fpw:
            image = BLCKSZ - int(hole or 0) - int(saved or 0)
            rels[name].update(fpi=1, fpi_bytes=image)
            fpi_types[name][rtype] += 1
            record[2] += image
    close_record()
    order = sorted(rels, key=lambda k: -rels[k]["fpi_bytes"])
    return {
        "relations": {
            k: {f: rels[k][f] for f in ("records", "record_bytes", "fpi", "fpi_bytes", "refs")}
            | {
                "distinct_blocks": len({(n, b) for n, b, _ in pages[k]}),
                "block_cycles": len(pages[k]),
                "fpi_hint_only": sum(flags == 1 for flags in pages[k].values()),
                "fpi_by_record_type": dict(fpi_types[k]),
            }
            for k in order
        },
        "checkpoint_records": dict(checkpoints),
        "cycles": cycle + 1,
    }


async def relation_names(conn: asyncpg.Connection) -> dict[tuple[int, int], str]:
    dboid = int(
        await conn.fetchval("SELECT oid FROM pg_database WHERE datname = current_database()")
    )
    rows = await conn.fetch(
        """SELECT c.oid::regclass::text AS name, pg_relation_filenode(c.oid) AS node,
                  c.relnamespace = 'pg_catalog'::regnamespace AS catalog
           FROM pg_class c WHERE pg_relation_filenode(c.oid) IS NOT NULL"""
    )
    return {(dboid, int(r["node"])): "catalogs" if r["catalog"] else r["name"] for r in rows}


# --- one measured run ------------------------------------------------------------------------


@dataclass(kw_only=True)
class Ctx:
    server: suite_run.Server
    version_num: int
    results_dir: Path
    # the server is ours (embedded): its settings may be changed for the measurement
    own: bool
    statements: bool
    waldump: str | None
    waldir: str | None
    timeout: float = suite_run.METHOD_TIMEOUT


def _child(argv: Sequence[str], timeout: float, holder: dict[str, int]) -> suite_run.Child:
    """``benchmarks.run.run_child``, with the pid published for the sampler and user and
    system CPU apart."""
    return suite_run.run_child(argv, timeout, holder)


def tool_source() -> str:
    """A digest of bulkdedupe's source as it is now: others may edit the tree between runs."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "bulkdedupe").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _argv(method: str, dsn: str, trace_file: Path) -> list[str]:
    py = sys.executable
    if method in BASELINES:
        return [py, "-m", "benchmarks.baselines", method, "-d", dsn]
    tool = [py, "-m", "benchmarks.tracer", str(trace_file), "--"]
    tool += ["--log-format", "json", "--log-level", "info"]
    if method == "scan":
        return [*tool, "scan", "-d", dsn, "--format", "json"]
    order = ["--order", "key"] if method == "bulkdedupe-key" else []
    return [*tool, "run", "-d", dsn, "--apply", "--format", "json", "--max-impact", "off", *order]


def _log_lines(stderr: str) -> list[dict[str, Any]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _epoch(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def _set(ctx: Ctx, settings: dict[str, str | None]) -> None:
    """ALTER SYSTEM SET (None: RESET) and reload; our constants only."""
    async with ctx.server.admin() as admin:
        for name, value in settings.items():
            if value is None:
                await admin.execute(f"ALTER SYSTEM RESET {name}")
            else:
                await admin.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await admin.execute("SELECT pg_reload_conf()")


async def measure(
    ctx: Ctx, meta: dict[str, Any], method: str, *, attempt: int, forensic: bool
) -> dict[str, Any]:
    """Restore the table, run ``method`` sampled, and return everything seen. ``forensic``:
    WAL kept (wal_keep_size) and read with pg_waldump afterwards."""
    rows = int(meta["spec"]["rows"])
    what = f"{rows:,} rows: {method}" + (" (WAL kept for pg_waldump)" if forensic else "")
    record: dict[str, Any] = {"method": method, "rows": rows, "attempt": attempt}
    record |= {"forensic": forensic, "tool_source": tool_source()}
    log(f"{what}: restoring ...")
    restore = ctx.server.restore(meta["template"], meta["database_bytes"], ctx.version_num)
    record["restore_s"] = round(await restore, 1)
    dsn = ctx.server.dsn(ctx.server.work_db)
    trace_file = ctx.results_dir / f".anatomy-trace-{os.getpid()}.json"
    trace_file.unlink(missing_ok=True)
    children: list[suite_run.Child] = []
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        if ctx.statements:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
        sizes = await conn.fetchrow(
            f"""SELECT pg_relation_size('{TABLE}') / {BLCKSZ} AS heap,
                       pg_relation_size('{TABLE}_pkey') / {BLCKSZ} AS pk_index,
                       pg_relation_size('{TABLE}_transaction_id_idx') / {BLCKSZ} AS key_index"""
        )
        record["pages"] = dict(sizes) if sizes else {}
        if forensic and ctx.own:
            await _set(ctx, {"wal_keep_size": WAL_KEEP})
        sampler = Sampler(
            dsn=dsn, version_num=ctx.version_num, origin=time.monotonic(), wall0=time.time()
        )
        before = await counters(conn, ctx.version_num)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sampler.run, stop)
            await anyio.sleep(IDLE_BEFORE)
            log(f"{what}: running ...")
            start = time.monotonic() - sampler.origin
            try:
                argv = _argv(method, dsn, trace_file)
                child = await anyio.to_thread.run_sync(_child, argv, ctx.timeout, sampler.child)
                children.append(child)
            finally:
                end = time.monotonic() - sampler.origin
                await anyio.sleep(SETTLE)
                stop.set()
        after = await counters(conn, ctx.version_num)
        if ctx.statements:
            record["statements"] = await statements(conn)
        if forensic and ctx.waldump and ctx.waldir:
            lsn0, lsn1 = int(before["counters"]["lsn"]), int(after["counters"]["lsn"])
            names = await relation_names(conn)
            await _flushed_to(conn, lsn1)
            log(f"{what}: reading {(lsn1 - lsn0) / 2**20:,.0f} MiB of WAL with pg_waldump ...")
            try:
                record["waldump"] = await anyio.to_thread.run_sync(
                    _waldump, ctx.waldump, ctx.waldir, lsn0, lsn1, names
                )
            except (OSError, subprocess.SubprocessError) as exc:
                record["waldump"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                log(f"{what}: pg_waldump failed: {record['waldump']['error']}")
    finally:
        await conn.close()
        if forensic and ctx.own:
            await _set(ctx, {"wal_keep_size": None})
            async with ctx.server.admin() as admin:
                await admin.execute("CHECKPOINT")
    child = children[0]
    record |= {
        "wall_s": round(child.wall_s, 3),
        "returncode": child.returncode,
        "peak_rss_bytes": child.maxrss_bytes,
        "tool_cpu_user_s": sampler.child.get("user_ms", 0) / 1000,
        "tool_cpu_system_s": sampler.child.get("system_ms", 0) / 1000,
        "totals": counters_diff(before, after),
        "window_s": [round(start, 3), round(end, 3)],
    }
    out = suite_run._last_json(child.stdout)
    record["summary"] = {k: v for k, v in (out or {}).items() if k != "sample"}
    # scan: exit 1 means duplicates found
    if child.returncode not in (0, 1) or out is None:
        record["error"] = (child.stderr.strip() or child.stdout.strip())[-2000:]
        log(f"{what}: failed (exit {child.returncode}): {record['error'][-300:]}")
    split: float | None = None
    lines = _log_lines(child.stderr)
    scan_line = next((x for x in lines if x.get("event") == "scan finished"), None)
    # heap order: the renames start once every group is decided, after the scan
    decided = next((x for x in lines if str(x.get("event", "")).startswith("groups decided")), None)
    if scan_line is not None:
        record["scan_finished"] = {k: v for k, v in scan_line.items() if k != "event"}
        split = _epoch(scan_line["timestamp"]) - sampler.wall0
    if decided is not None:
        record["decided"] = {k: v for k, v in decided.items() if k != "event"}
        split = _epoch(decided["timestamp"]) - sampler.wall0
    tool_pid = sampler.child.get("pid")
    flushed = end + SETTLE
    phases = {
        "idle before": phase_figures(sampler, 0.0, start, None),
        "run": phase_figures(sampler, start, end, tool_pid, flushed),
    }
    if split is not None and method not in ("one-statement", "scan"):
        phases["scan"] = phase_figures(sampler, start, split, tool_pid)
        phases["renames"] = phase_figures(sampler, split, end, tool_pid, flushed)
        record["split_s"] = round(split, 3)
    record["phases"] = phases
    if method not in BASELINES and trace_file.exists():
        raw = json.loads(trace_file.read_text())
        trace_split = None if split is None else split + sampler.wall0 - raw["origin_wall"]
        record["trace"] = summarize_trace(raw, trace_split)
        trace_file.unlink()
    if method != "scan" and out is not None:
        record["correctness"] = await _check(dsn, meta, int(out.get("rows_renamed", 0)))
    return record


async def _flushed_to(conn: asyncpg.Connection, lsn: int) -> None:
    """Wait (10 s at most) until the server has flushed its WAL up to `lsn` (the insert
    position read after the run: the last records of other sessions may still be in WAL
    buffers, and pg_waldump reads only what is on disk: asked for more, it fails)."""
    flushed = "SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), '0/0')::bigint"
    with anyio.move_on_after(10):
        for _ in range(200):
            if await conn.fetchval(flushed) >= lsn:
                return
            await anyio.sleep(0.05)


def _waldump(
    waldump: str, waldir: str, lsn0: int, lsn1: int, names: dict[tuple[int, int], str]
) -> dict[str, Any]:
    began = time.monotonic()
    out = {"lsn": [lsn_text(lsn0), lsn_text(lsn1)], "bytes": lsn1 - lsn0}
    out["record_types"] = waldump_stats(waldump, waldir, lsn0, lsn1)
    out |= waldump_relations(waldump, waldir, lsn0, lsn1, names)
    out["seconds"] = round(time.monotonic() - began, 1)
    return out


async def _check(dsn: str, meta: dict[str, Any], renamed: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        return await suite_run.check(conn, meta, renamed, partial=False)
    finally:
        await conn.close()


# --- the whole measurement -------------------------------------------------------------------


async def run_all(
    ctx: Ctx, sizes: Sequence[int], repeat: int, methods: Sequence[str], waldump: bool
) -> dict[str, Any]:
    async with ctx.server.admin() as admin:
        info = await suite_run.server_info(admin)
        info["settings"] |= {
            r["name"]: r["setting"]
            for r in await admin.fetch(
                """SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])""",
                ["data_checksums", "io_method", "track_io_timing", "track_wal_io_timing"],
            )
        }
    results: dict[str, Any] = {
        "kind": "anatomy",
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server": info,
        "machine": suite_run.machine_info(),
        "parameters": {"sizes": list(sizes), "repeat": repeat, "methods": list(methods)},
        "datasets": [],
        "runs": [],
    }
    suite = suite_run.Suite(name="anatomy", plans=())
    for rows in sizes:
        spec = suite_run._spec_for(suite, rows)
        meta = await ctx.server.template(spec, fresh=False)
        results["datasets"].append(meta)
        for attempt in range(1, repeat + 1):
            for method in methods:
                record = await measure(ctx, meta, method, attempt=attempt, forensic=False)
                results["runs"].append(record)
                log(one_line(record))
        if waldump and ctx.waldump and ctx.waldir:
            for method in methods:
                if method == "scan":
                    continue
                record = await measure(ctx, meta, method, attempt=0, forensic=True)
                results["runs"].append(record)
                log(one_line(record))
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def one_line(r: dict[str, Any]) -> str:
    s = r.get("summary", {})
    c = r["totals"]["counters"]
    parts = [f"{r['rows']:,} {r['method']}", f"{r['wall_s']:.1f} s"]
    if "split_s" in r:
        parts.append(f"scan {r['split_s'] - r['window_s'][0]:.1f} s")
    if s.get("rows_renamed"):
        n = int(s["rows_renamed"])
        parts.append(f"{n:,} renamed")
        parts.append(f"WAL {c['wal_bytes'] / n:,.0f} B/rename")
        parts.append(f"FPI {c['wal_fpi'] / n:.2f}/rename")
    parts.append(f"checkpoints {c['num_done']:.0f}")
    if r.get("correctness") is not None:
        parts.append("ok" if r["correctness"].get("passed") else "WRONG RESULT")
    return ", ".join(parts)


# --- the report ------------------------------------------------------------------------------

MIB: Final = 2**20


def _f(value: Any, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _table(header: str, rows: list[list[str]]) -> list[str]:
    """A markdown table; ``header``: the column names separated by " | "."""
    out = [f"| {header} |", "|" + "---|" * len(header.split(" | "))]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _label(r: dict[str, Any]) -> str:
    names = {
        "bulkdedupe": "bulkdedupe run",
        "bulkdedupe-key": "bulkdedupe run --order key",
        "scan": "bulkdedupe scan",
        "heap-floor": "heap-order floor",
        "heap-floor-checked": "checked heap-order floor",
    }
    name = str(names.get(r["method"], r["method"]))
    return name + (" (WAL kept, pg_waldump)" if r["forensic"] else f" #{r['attempt']}")


def _renamed(r: dict[str, Any]) -> int:
    return int(r.get("summary", {}).get("rows_renamed") or 0)


def _io(r: dict[str, Any], obj: str, name: str) -> str:
    """A pg_stat_io field of one object (relation, wal), by backend type."""
    out: Counter[str] = Counter()
    for key, d in r["totals"]["io"].items():
        btype, o, _ = key.split("/")
        if o == obj and d.get(name):
            out[btype] += d[name]
    return ", ".join(f"{k} {v:,.0f}" for k, v in out.most_common()) or "–"


def _shares(counts: dict[str, float], top: int = 6, unit: str = " %") -> str:
    total = sum(counts.values())
    if not total:
        return "–"
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {100 * v / total:.0f}{unit}" for k, v in items) + f" (n={total:,.0f})"


def markdown(results: dict[str, Any]) -> str:
    s, m = results["server"]["settings"], results["machine"]
    names = "shared_buffers_pretty max_wal_size_pretty checkpoint_timeout fsync"
    names += " synchronous_commit full_page_writes wal_compression data_checksums io_method"
    names += " track_io_timing"
    settings = ", ".join(f"{n.removesuffix('_pretty')} {s.get(n)}" for n in names.split())
    lines = [
        f"# Where the time and the WAL go — {results['started_at']}",
        "",
        f"{results['server']['version'].split(',')[0]}; {settings}; {m['cpus']} cores, load "
        f"average {m['load_avg_at_start']} → {m.get('load_avg_at_end')}; git {m.get('git')}. "
        "No load beside the methods; each run on a fresh copy (vacuumed, analyzed, "
        "checkpointed). `python -m benchmarks.anatomy`.",
    ]
    for meta in results["datasets"]:
        rows = int(meta["spec"]["rows"])
        lines += _size_section(meta, [r for r in results["runs"] if r["rows"] == rows])
    return "\n".join(lines) + "\n"


def _size_section(meta: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    st = meta["stats"]
    out = [
        "",
        f"## {int(meta['spec']['rows']):,} rows ({meta['database_bytes'] / MIB:,.0f} MiB, "
        f"{st['rows_to_rename']:,} renames, {st['duplicate_groups']:,} groups)",
        "",
    ]
    rows = []
    for r in runs:
        n, c = _renamed(r), r["totals"]["counters"]
        scan_s = r.get("scan_finished", {}).get("seconds")
        if r["method"] == "scan":
            scan_s = r["summary"].get("duration_s")
        cpu = r["phases"]["run"].get("cpu_s", {})
        server_cpu = sum(v for k, v in cpu.items() if k.startswith("server"))
        passed = r.get("correctness", {}).get("passed", r["method"] == "scan")
        rows.append(
            [
                _label(r),
                _f(r["wall_s"], 1),
                _f(scan_s, 1),
                _f(r["wall_s"] - scan_s, 1) if scan_s is not None and n else "–",
                _f(n),
                _f(r["wall_s"] * 1e6 / n) if n else "–",
                _f(c["wal_bytes"] / MIB),
                _f(c["wal_bytes"] / n) if n else "–",
                _f(c["wal_fpi"]),
                _f(c["wal_fpi"] / n, 2) if n else "–",
                _f(c["num_done"]),
                _f(c["wal_buffers_full"]),
                f"{r['tool_cpu_user_s'] + r['tool_cpu_system_s']:.1f}",
                _f(server_cpu, 1),
                _f(r["peak_rss_bytes"] / MIB),
                "ok" if passed else "WRONG",
            ]
        )
    head = "run | wall s | scan s | after scan s | renamed | µs/rename | WAL MiB | WAL B/rename"
    head += " | FPIs | FPI/rename | checkpoints | WAL buffers full | tool CPU s | server CPU s"
    out += _table(head + " | RSS MiB | result", rows)
    out += ["", "pg_stat_io by backend type (blocks; WAL: write calls):", ""]
    rows = [
        [_label(r)]
        + [_io(r, o, f) for o, f in [("relation", "writes"), ("relation", "fsyncs")]]
        + [_io(r, o, f) for o, f in [("wal", "writes"), ("wal", "fsyncs"), ("relation", "reads")]]
        for r in runs
    ]
    out += _table("run | relation writes | relation fsyncs | WAL writes | WAL fsyncs | reads", rows)
    return out + _phases(runs) + _waldump_section(runs) + _trace_section(runs)


def _timed_phases(
    runs: list[dict[str, Any]], *, idle: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """(label, phase) of the timed runs: the idle seconds before, then the whole run or its
    scan and renames phases."""
    out = []
    for r in runs:
        if r["forensic"]:
            continue
        for name, p in r["phases"].items():
            split = name == "run" and "scan" in r["phases"]
            if "cpu_s" in p and not split and (idle or name != "idle before"):
                out.append((f"{_label(r)}: {name}", p))
    return out


def _phases(runs: list[dict[str, Any]]) -> list[str]:
    out = ["", "Phases, sampled every 100 ms (CPU seconds, all cores):", ""]
    rows = []
    for label, p in _timed_phases(runs):
        cpu = p["cpu_s"]
        tool = cpu.get("tool process: user", 0) + cpu.get("tool process: system", 0)
        servers = {k[8:]: v for k, v in cpu.items() if k.startswith("server: ") and v >= 0.05}
        rows.append(
            [
                label,
                _f(p["seconds"], 1),
                _f(p["updates"]),
                _f(p["updates"] / p["seconds"]) if p["seconds"] else "–",
                _f(p["wal_bytes"] / MIB),
                _f(p["wal_fpi"]),
                _f(p["checkpoints_done"]),
                _f(p["table_heap_blocks"]),
                _f(p["table_index_blocks"]),
                _f(tool, 1),
                ", ".join(f"{k} {v:.1f}" for k, v in sorted(servers.items(), key=lambda x: -x[1])),
                _f(cpu.get("machine busy"), 1),
                _f(cpu.get("machine: everything else"), 1),
            ]
        )
    head = "phase | s | updates | updates/s | WAL MiB | FPIs | ckpts | heap blocks"
    head += " | index blocks | tool CPU | server CPU by process | machine busy | others"
    out += _table(head, rows)
    out += ["", "Sessions, share of the 100 ms samples:", ""]
    rows = [
        [label, who, _shares(act)]
        for label, p in _timed_phases(runs, idle=False)
        for who, act in p.get("activity", {}).items()
    ]
    return out + _table("phase | who | states", rows)


def _waldump_section(runs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in runs:
        w = r.get("waldump")
        if not w or "relations" not in w:
            continue
        n = _renamed(r) or 1
        fpi_bytes = sum(x["fpi_bytes"] for x in w["relations"].values())
        out += [
            "",
            f"pg_waldump, {_label(r)}: {w['bytes'] / MIB:,.0f} MiB of WAL, full-page images "
            f"{fpi_bytes / MIB:,.0f} MiB ({100 * fpi_bytes / max(w['bytes'], 1):.0f} %); "
            f"checkpoint records {dict(w['checkpoint_records'])}, {w.get('cycles', '?')} "
            "cycles; per renamed row:",
            "",
        ]
        rows = [
            [
                name,
                _f(x["fpi"]),
                _f(x["fpi"] / n, 3),
                _f(x["fpi_bytes"] / n),
                _f(x["record_bytes"] / n),
                _f(x["refs"] / n, 2),
                _f(x["distinct_blocks"]),
                _f(x.get("block_cycles")),
                _f(x.get("fpi_hint_only")),
                _f(x["fpi"] / x["distinct_blocks"], 2) if x["distinct_blocks"] else "–",
            ]
            for name, x in w["relations"].items()
            if x["fpi"] + x["records"] >= n / 100
        ]
        head = "relation | FPIs | FPIs/rename | FPI B/rename | other WAL B/rename"
        head += " | block refs/rename | distinct blocks | blocks × cycles | hint-only FPIs"
        out += _table(head + " | FPIs/distinct block", rows)
        types = sorted(w["record_types"].items(), key=lambda kv: -kv[1]["bytes"])[:8]
        summary = ", ".join(
            f"{k} {v['records']:,} ({v['bytes'] / MIB:,.0f} MiB, FPIs {v['fpi_bytes'] / MIB:,.0f})"
            for k, v in types
        )
        out += ["", f"By record type: {summary}."]
    return out


def _trace_section(runs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for r in runs:
        t = r.get("trace")
        if not t or r["forensic"]:
            continue
        pgss = r.get("statements", {})
        out += ["", f"Round trips, {_label(r)} (client-observed, from the tracer):", ""]
        rows = []
        for label, q in t["queries"].items():
            srv = pgss.get(label) or {}
            calls = srv.get("calls")
            rows.append(
                [
                    label,
                    _f(q["n"]),
                    _f(q.get("mean_ms"), 2),
                    _f(q.get("p99_ms"), 1),
                    _f(q.get("total_ms", 0) / 1000, 2),
                    _f(srv["total_exec_time"] / calls, 2) if calls else "–",
                    _f(srv["shared_blks_hit"] + srv["shared_blks_read"]) if srv else "–",
                    _f(srv.get("wal_fpi")),
                ]
            )
        head = "statement | calls | client mean ms | client p99 ms | client total s"
        out += _table(head + " | server mean ms | server blocks | server FPIs", rows)
        for phase, b in t["batches"].items():
            if b.get("n"):
                out.append(
                    f"- batches ({phase}): {b['n']:,}, {b['round_trips_mean']} round trips "
                    f"each from BEGIN to COMMIT ({b['round_trips_by_statement']}), then the "
                    f"pool's reset; mean {b['span']['mean_ms']:.1f} ms (p99 "
                    f"{b['span']['p99_ms']:.1f}): in queries {b['in_queries']['mean_ms']:.1f}, "
                    f"between them {b['between_queries']['mean_ms']:.1f}"
                )
        idle, lag = t["idle_between_batches"], t["event_loop_lag"]
        if idle.get("n"):
            out.append(
                f"- a connection's idle time between its batches: mean {idle['mean_ms']:.1f} "
                f"ms, p99 {idle['p99_ms']:.1f} ms"
            )
        if lag.get("n"):
            out.append(
                f"- event loop lag (10 ms probe): mean {lag['mean_ms']:.2f} ms, p99 "
                f"{lag['p99_ms']:.1f}, max {lag['max_ms']:.1f}; {lag['over_5ms']:,} of "
                f"{lag['n']:,} probes over 5 ms; scan pages {t['scan_pages']:,}"
            )
    return out


# --- command line ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.anatomy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rows", type=int, action="append", help="table size(s), repeatable")
    p.add_argument(
        "--repeat", type=int, default=2, help="timed runs of each method per size (0: none)"
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of {', '.join(METHODS)} [default: all]",
    )
    p.add_argument(
        "--no-waldump",
        dest="waldump",
        action="store_false",
        help="skip the extra (untimed) runs whose WAL pg_waldump reads",
    )
    p.add_argument(
        "-d",
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="server to use (env DATABASE_URL); its settings are left alone [default: the "
        "suite's embedded server in --datadir]",
    )
    p.add_argument("--datadir", type=Path, default=suite_run.DEFAULT_DATADIR)
    p.add_argument("--keep-server", action="store_true", help="leave the embedded server running")
    p.add_argument("--results-dir", type=Path, default=suite_run.DEFAULT_RESULTS)
    p.add_argument("--db-prefix", default="bench", help="prefix of the databases (as the suite)")
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RESULTS.json",
        help="run nothing: rewrite a saved measurement's markdown beside it",
    )
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-templates", dest="keep_templates", action="store_true", default=None)
    keep.add_argument("--drop-templates", dest="keep_templates", action="store_false")
    return p


def _waldump_access(dsn: str) -> tuple[str | None, str | None]:
    """A pg_waldump of the server's major version and the server's pg_wal, when both are here
    and readable (a local server); else (None, None)."""

    async def ask() -> tuple[str | None, int]:
        conn = await asyncpg.connect(dsn, server_settings=HARNESS)
        try:
            version = int(await conn.fetchval("SHOW server_version_num"))
            return str(await conn.fetchval("SHOW data_directory")), version
        except asyncpg.PostgresError:
            return None, 0
        finally:
            await conn.close()

    datadir, version = anyio.run(ask, backend="asyncio")
    try:
        waldir = os.path.join(datadir, "pg_wal") if datadir else None
        if waldir is None or not os.listdir(waldir):
            return None, None
    except OSError:
        return None, None
    major = version // 10000
    for binary in (
        pgserver.bin_dir() / "pg_waldump",
        Path(f"/usr/lib/postgresql/{major}/bin/pg_waldump"),
    ):
        try:
            out = subprocess.run(
                [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if (m := re.search(r"(\d+)\.", out)) and int(m[1]) == major:
            return str(binary), waldir
    return None, None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.report is not None:
        text = markdown(json.loads(args.report.read_text()))
        args.report.with_suffix(".md").write_text(text)
        print(text)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser().error(f"--methods: of {', '.join(METHODS)}")
    sizes = args.rows or [1_000_000, 5_000_000]
    embedded = not args.dsn
    stop_after = embedded and not args.keep_server and pgserver.dsn(args.datadir) is None
    try:
        dsn = args.dsn or suite_run._own_server(args.datadir, statements=True)
        keep = embedded if args.keep_templates is None else args.keep_templates
        server = suite_run.Server(
            admin_dsn=dsn, prefix=args.db_prefix, embedded=embedded, keep_templates=keep
        )
        waldump, waldir = _waldump_access(dsn) if args.waldump else (None, None)
        if args.waldump and waldump is None:
            log("pg_waldump or the server's pg_wal is not at hand: no WAL breakdown")

        async def go() -> dict[str, Any]:
            async with server.admin() as admin:
                version_num = int(await admin.fetchval("SHOW server_version_num"))
                preload = str(await admin.fetchval("SHOW shared_preload_libraries"))
            ctx = Ctx(
                server=server,
                version_num=version_num,
                results_dir=args.results_dir,
                own=embedded,
                statements="pg_stat_statements" in preload,
                waldump=waldump,
                waldir=waldir,
            )
            if embedded:
                await _set(ctx, dict(TIMING_SETTINGS))
            try:
                return await run_all(ctx, sizes, args.repeat, methods, args.waldump)
            finally:
                with anyio.CancelScope(shield=True):
                    if embedded:
                        await _set(ctx, dict.fromkeys(TIMING_SETTINGS))
                    await server.cleanup()

        args.results_dir.mkdir(parents=True, exist_ok=True)
        results = anyio.run(go, backend="asyncio")
    finally:
        if stop_after:
            pgserver.stop(args.datadir)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = args.results_dir / f"{stamp}-anatomy"
    stem.with_suffix(".json").write_text(suite_run.to_json(results))
    text = markdown(results)
    stem.with_suffix(".md").write_text(text)
    print(text)
    log(f"results: {stem}.json, {stem}.md")
    wrong = [r for r in results["runs"] if r.get("correctness", {}).get("passed") is False]
    return 1 if wrong or any("error" in r for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
