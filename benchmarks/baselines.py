"""The naive fixes bulkdedupe is compared with, run as their own process like the tool itself.

    python -m benchmarks.baselines one-statement -d DSN   # one UPDATE in one transaction
    python -m benchmarks.baselines one-statement -d DSN --scope merchant_id --pk id,merchant_id
    python -m benchmarks.baselines per-row -d DSN [--max-seconds S] [--max-rows N]
    python -m benchmarks.baselines batched -d DSN [--concurrency N] [--batch-size N]
    python -m benchmarks.baselines heap-floor -d DSN [--concurrency N] [--batch-size N]
    python -m benchmarks.baselines heap-floor-checked -d DSN [--concurrency N] [--batch-size N]

All keep the lowest id of each group and rename the others to ``{value}-{id}``, exactly as
``bulkdedupe run`` does with its defaults, so every method must end with the same table. Each
prints one JSON object on stdout with the fields of bulkdedupe's run summary it can fill.

The one-statement UPDATE also takes a scope and a composite primary key (issue 11), as
``bulkdedupe run --scope merchant_id`` on a table whose primary key is ``(id, merchant_id)``:
groups are rows equal on (scope..., key), the survivor is the lowest primary key, the others
become ``{value}-{id}-{merchant_id}`` (the key's values joined by ``-``, the tool's ``{pk}``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import asyncpg

from benchmarks.generate import quote_ident, quote_table

__all__ = [
    "BaselineResult",
    "batched",
    "extrapolate",
    "floor",
    "heap_floor",
    "heap_floor_checked",
    "one_statement",
    "per_row",
    "percentile",
]

APPLICATION_NAME: Final = "bench-baseline"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of unsorted ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def extrapolate(seconds: float, scan_s: float, done: int, total: int) -> float:
    """The full per-row run's time from a partial one: its GROUP BY, then `total` updates at
    the rate of the `done` it made. Never less than the time measured. Full precision: the
    report rounds what it prints (rounded here, a fast run's estimate fell below its time)."""
    if done >= total:
        return seconds
    per_row_s = (seconds - scan_s) / done if done else math.inf
    return max(seconds, scan_s + per_row_s * total)


@dataclass(kw_only=True)
class BaselineResult:
    """What a baseline did, named like bulkdedupe's RunSummary where the meaning is the same.
    Figures at full precision; the report rounds what it prints."""

    method: str
    rows_renamed: int
    rows_to_rename: int
    duration_s: float
    # The per-row script may stop early (--max-seconds/--max-rows); then the full run's time is
    # extrapolated from its measured rate and `extrapolated` says so.
    extrapolated: bool = False
    estimated_duration_s: float = 0.0
    # Transactions: one for the single UPDATE, one per row for the per-row script, one per batch
    # for the batched floor.
    transactions: int = 0
    txn_ms_p50: float = 0.0
    txn_ms_p99: float = 0.0
    txn_ms_max: float = 0.0
    # The query that finds the duplicates (the per-row script's GROUP BY); the one-statement
    # UPDATE finds and renames in the same statement, so it has none of its own.
    scan_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _columns(names: str | Sequence[str]) -> list[str]:
    """``"id,merchant_id"`` or ``["id", "merchant_id"]`` -> ``["id", "merchant_id"]``."""
    found = [c.strip() for c in names.split(",")] if isinstance(names, str) else list(names)
    if not all(found):
        raise ValueError(f"expected column names, got {names!r}")
    return found


def _one_statement_sql(
    table: str, key: str, pk: str | Sequence[str], scope: Sequence[str] = ()
) -> str:
    t, k = quote_table(table), quote_ident(key)
    pks = [quote_ident(c) for c in _columns(pk)]
    if len(pks) == 1 and not scope:
        # The plain table's statement, as it always was.
        p = pks[0]
        return f"""
        UPDATE {t} AS t
        SET {k} = t.{k} || '-' || t.{p}
        FROM (
            SELECT {p} AS pk, row_number() OVER (PARTITION BY {k} ORDER BY {p}) AS rn
            FROM {t}
            WHERE {k} IS NOT NULL
        ) AS d
        WHERE t.{p} = d.pk AND d.rn > 1
    """
    # A group: rows equal on (scope..., key), none of them NULL (NULLS DISTINCT, as the tool and
    # a unique index see it); survivor: the lowest primary key; new value: {value}-{pk}, the pk's
    # values joined by '-'.
    sc = [quote_ident(c) for c in scope]
    by = ", ".join([*sc, k])
    not_null = " AND ".join(f"{c} IS NOT NULL" for c in [*sc, k])
    suffix = " || '-' || ".join(f"t.{p}" for p in pks)
    match = " AND ".join(f"t.{p} = d.pk{i}" for i, p in enumerate(pks))
    selected = ", ".join(f"{p} AS pk{i}" for i, p in enumerate(pks))
    return f"""
        UPDATE {t} AS t
        SET {k} = t.{k} || '-' || {suffix}
        FROM (
            SELECT {selected},
                   row_number() OVER (PARTITION BY {by} ORDER BY {", ".join(pks)}) AS rn
            FROM {t}
            WHERE {not_null}
        ) AS d
        WHERE {match} AND d.rn > 1
    """


async def one_statement(
    dsn: str,
    *,
    table: str = "payments",
    key: str = "transaction_id",
    pk: str | Sequence[str] = "id",
    scope: Sequence[str] = (),
) -> BaselineResult:
    """The hand-written fix: every rename in one UPDATE, one transaction. The ceiling of raw
    throughput, and every renamed row stays locked until the very end. With ``scope`` (and a
    composite ``pk``), duplicates within the scope, renamed as the tool renames them."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        began = time.monotonic()
        async with conn.transaction():
            status = await conn.execute(_one_statement_sql(table, key, pk, scope))
        seconds = time.monotonic() - began
    finally:
        await conn.close()
    renamed = int(status.rsplit(" ", 1)[-1])
    ms = seconds * 1000
    return BaselineResult(
        method="one-statement",
        rows_renamed=renamed,
        rows_to_rename=renamed,
        duration_s=seconds,
        estimated_duration_s=seconds,
        transactions=1,
        txn_ms_p50=ms,
        txn_ms_p99=ms,
        txn_ms_max=ms,
    )


async def per_row(
    dsn: str,
    *,
    table: str = "payments",
    key: str = "transaction_id",
    pk: str = "id",
    max_seconds: float | None = None,
    max_rows: int | None = None,
) -> BaselineResult:
    """What people write first: one GROUP BY to list the groups, then one autocommit UPDATE per
    row. Stops after ``max_seconds`` or ``max_rows`` and extrapolates the full run's time."""
    t, k, p = quote_table(table), quote_ident(key), quote_ident(pk)
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        began = time.monotonic()
        groups = await conn.fetch(
            f"SELECT {k} AS k, array_agg({p} ORDER BY {p}) AS ids FROM {t} "
            f"WHERE {k} IS NOT NULL GROUP BY {k} HAVING count(*) > 1"
        )
        scan_s = time.monotonic() - began
        todo = [(g["k"], pk_) for g in groups for pk_ in g["ids"][1:]]
        update = await conn.prepare(f"UPDATE {t} SET {k} = $1 WHERE {p} = $2")
        latencies: list[float] = []
        deadline = None if max_seconds is None else began + max_seconds
        limit = len(todo) if max_rows is None else min(max_rows, len(todo))
        for value, row_pk in todo[:limit]:
            if deadline is not None and time.monotonic() >= deadline:
                break
            t0 = time.monotonic()
            await update.fetch(f"{value}-{row_pk}", row_pk)
            latencies.append((time.monotonic() - t0) * 1000)
        seconds = time.monotonic() - began
    finally:
        await conn.close()
    done = len(latencies)
    result = BaselineResult(
        method="per-row",
        rows_renamed=done,
        rows_to_rename=len(todo),
        duration_s=seconds,
        estimated_duration_s=seconds,
        transactions=done,
        txn_ms_p50=percentile(latencies, 50),
        txn_ms_p99=percentile(latencies, 99),
        txn_ms_max=max(latencies, default=0.0),
        scan_ms=scan_s * 1000,
    )
    if done < len(todo):
        result.extrapolated = True
        result.estimated_duration_s = extrapolate(seconds, scan_s, done, len(todo))
        per_row_s = (seconds - scan_s) / done if done else float("inf")
        result.notes.append(
            f"stopped after {done} of {len(todo)} rows ({seconds:.1f} s); full time "
            f"extrapolated from {per_row_s * 1000:.2f} ms/row"
        )
    return result


async def _run_batches(
    dsn: str,
    statement: str,
    batches: Sequence[Sequence[Any]],
    concurrency: int,
    *,
    before: tuple[str, int] | None = None,
) -> tuple[int, list[float]]:
    """Each batch (rows of the statement's parameters, one column per parameter array) as its
    own transaction, on `concurrency` connections taking the next batch as they finish: the
    rows the statement changed, and each transaction's milliseconds. `before`: a statement
    the transaction runs first, with the batch's first N columns (the checked floor's locks,
    which must come before the statement's snapshot, as the tool's do)."""
    latencies: list[float] = []
    renamed = 0
    queue = iter(batches)

    async def work() -> None:
        nonlocal renamed
        c = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
        try:
            for batch in queue:
                columns = [list(column) for column in zip(*batch, strict=True)]
                t0 = time.monotonic()
                async with c.transaction():
                    if before is not None:
                        await c.fetchval(before[0], *columns[: before[1]])
                    status = await c.execute(statement, *columns)
                latencies.append((time.monotonic() - t0) * 1000)
                renamed += int(status.rsplit(" ", 1)[-1])
        finally:
            await c.close()

    await asyncio.gather(*(work() for _ in range(concurrency)))
    return renamed, latencies


def _batched_result(
    method: str, renamed: int, todo: int, seconds: float, latencies: list[float], scan_s: float
) -> BaselineResult:
    return BaselineResult(
        method=method,
        rows_renamed=renamed,
        rows_to_rename=todo,
        duration_s=seconds,
        estimated_duration_s=seconds,
        transactions=len(latencies),
        txn_ms_p50=percentile(latencies, 50),
        txn_ms_p99=percentile(latencies, 99),
        txn_ms_max=max(latencies, default=0.0),
        scan_ms=scan_s * 1000,
    )


async def _audit_table(conn: asyncpg.Connection) -> str:
    audit = quote_ident("bench_batched_audit")
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {audit} (id bigserial PRIMARY KEY, pk bigint NOT NULL, "
        "old_value text NOT NULL, new_value text NOT NULL, "
        "changed_at timestamptz NOT NULL DEFAULT now())"
    )
    return audit


# The floors' batch sizes: the key-order floor's is the tool's default maximum; the heap-order
# floor's about what the tool's sizer settles on (~375 at 20M rows).
FLOOR_BATCH_SIZE: Final = {"key": 1000, "heap": 400}


async def floor(
    dsn: str,
    *,
    order: str = "key",
    table: str = "payments",
    key: str = "transaction_id",
    pk: str = "id",
    concurrency: int = 4,
    batch_size: int | None = None,
    checked: bool = False,
) -> BaselineResult:
    """The floor of any batched, audited fix: the renames as `batch_size`-row transactions on
    `concurrency` connections, each one `UPDATE ... FROM unnest(...)` that writes its audit rows
    in the same statement. No advisory locks, no re-read, no check of survivor or new value, no
    retry: unsafe on a live table, and so the least work an online tool that does those things
    can hope to do. It shows how much of bulkdedupe's time is the server's own cost of the
    renames (WAL, full-page images, buffer writes) rather than the tool's.

    `order` "key" (method "batched"): the per-row script's GROUP BY, then the renames in key
    order, rows found by primary key. "heap" (method "heap-floor", issue 13): one query decides
    (the duplicated values from the key's index, their rows but the lowest id of each, with
    where they lie), the renames in heap order, rows found by position (a TID scan: no index
    descent): the least bulkdedupe's heap-order sweep can hope to do. It logs "groups decided"
    (JSON, stderr) when the renames start, so the anatomy splits its phases where it splits
    the tool's.

    `checked` (heap order only, method "heap-floor-checked"): the same, plus the checks that
    make a rename safe on a live table, as the tool's chunk transaction makes them — each
    group's advisory lock (shared, in hash order) and a try on each new value's, in a statement
    of their own before the UPDATE's snapshot; the row found by position *and* still holding
    its value; its survivor (the group's lowest id, found by position) still holding it; the
    new value free. Still no re-decision, retry or hand-back (a lock refused is counted, not
    acted on): the least a safe heap-order client can make the server do, with a client that
    sends binary arrays and sorts nothing itself."""
    if order not in FLOOR_BATCH_SIZE:
        raise ValueError(f"order: key or heap, not {order!r}")
    if checked and order != "heap":
        raise ValueError("checked: heap order only")
    t, k, p = quote_table(table), quote_ident(key), quote_ident(pk)
    size = batch_size or FLOOR_BATCH_SIZE[order]
    conn = await asyncpg.connect(dsn, server_settings={"application_name": APPLICATION_NAME})
    try:
        audit = await _audit_table(conn)
        began = time.monotonic()
        todo: Sequence[Any]  # a row of parameters each (tuples, or the heap query's records)
        if order == "key":
            groups = await conn.fetch(
                f"SELECT {k} AS k, array_agg({p} ORDER BY {p}) AS ids FROM {t} "
                f"WHERE {k} IS NOT NULL GROUP BY {k} HAVING count(*) > 1 ORDER BY {k}"
            )
            todo = [(pk_, g["k"]) for g in groups for pk_ in g["ids"][1:]]
            del groups
            params, columns = "$1::bigint[], $2::text[]", "pk, old"
            found = f"t.{p} = v.pk AND t.{k} = v.old"
        else:
            # the duplicated values from the key's index alone (a GroupAggregate over an
            # index-only scan), then their rows, each group's first by id left out
            if not checked:
                todo = await conn.fetch(
                    f"""SELECT d.tid, d.pk, d.k FROM (
                            SELECT t.ctid AS tid, t.{p} AS pk, t.{k} AS k,
                                   row_number() OVER (PARTITION BY t.{k} ORDER BY t.{p}) AS rn
                            FROM (SELECT {k} AS k FROM {t} WHERE {k} IS NOT NULL
                                  GROUP BY {k} HAVING count(*) > 1) g
                            JOIN {t} t ON t.{k} = g.k
                        ) d WHERE d.rn > 1 ORDER BY d.tid"""
                )
                params, columns = "$1::tid[], $2::bigint[], $3::text[]", "tid, pk, old"
                found = "t.ctid = v.tid"
            else:
                # each loser with its survivor (the group's lowest id) and where both lie; the
                # value and the id first: the lock statement takes those two columns
                todo = await conn.fetch(
                    f"""SELECT d.k, d.pk, d.tid, d.stid, d.spk FROM (
                            SELECT t.ctid AS tid, t.{p} AS pk, t.{k} AS k,
                                   row_number() OVER w AS rn,
                                   first_value(t.ctid) OVER w AS stid,
                                   first_value(t.{p}) OVER w AS spk
                            FROM (SELECT {k} AS k FROM {t} WHERE {k} IS NOT NULL
                                  GROUP BY {k} HAVING count(*) > 1) g
                            JOIN {t} t ON t.{k} = g.k
                            WINDOW w AS (PARTITION BY t.{k} ORDER BY t.{p})
                        ) d WHERE d.rn > 1 ORDER BY d.tid"""
                )
                params = "$1::text[], $2::bigint[], $3::tid[], $4::tid[], $5::bigint[]"
                columns = "old, pk, tid, stid, spk"
                found = f"""t.ctid = v.tid AND t.{p} = v.pk AND (t.{k} = v.old) IS TRUE
                  AND EXISTS (SELECT 1 FROM {t} s WHERE s.ctid = v.stid AND s.{p} = v.spk
                              AND (s.{k} = v.old) IS TRUE)
                  AND NOT EXISTS (SELECT 1 FROM {t} o WHERE o.{k} = v.old || '-' || v.pk)"""
            stamp = dt.datetime.now(dt.UTC).isoformat()
            print(json.dumps({"event": "groups decided", "timestamp": stamp}), file=sys.stderr)
        scan_s = time.monotonic() - began
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        statement = f"""
            WITH v AS (SELECT * FROM unnest({params}) AS v({columns})),
            u AS (
                UPDATE {t} AS t SET {k} = v.old || '-' || v.pk FROM v
                WHERE {found}
                RETURNING v.pk, v.old, t.{k} AS new
            )
            INSERT INTO {audit} (pk, old_value, new_value) SELECT pk, old, new FROM u"""
        before = None
        if checked:
            # as the tool's lock_chunk: the groups' locks shared, in hash order, then a try on
            # each new value's (what the tool would do with a refusal is not the floor's)
            before = (
                """WITH held AS MATERIALIZED (
                        SELECT count(pg_advisory_xact_lock_shared(h)) AS n FROM (
                            SELECT DISTINCT hashtextextended('bench.group:' || g, 0) AS h
                            FROM unnest($1::text[]) AS g ORDER BY 1) AS x)
                    SELECT count(*) FILTER (WHERE NOT pg_try_advisory_xact_lock(
                               hashtextextended('bench.value:' || c.old || '-' || c.pk, 0)))
                    FROM held LEFT JOIN unnest($1::text[], $2::bigint[]) AS c(old, pk) ON true""",
                2,
            )
        renamed, latencies = await _run_batches(dsn, statement, batches, concurrency, before=before)
        seconds = time.monotonic() - began
    finally:
        await conn.close()
    method = "batched" if order == "key" else "heap-floor-checked" if checked else "heap-floor"
    return _batched_result(method, renamed, len(todo), seconds, latencies, scan_s)


# the two floors under their methods' names
batched = functools.partial(floor, order="key")
heap_floor = functools.partial(floor, order="heap")
heap_floor_checked = functools.partial(floor, order="heap", checked=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__)
    parser.add_argument(
        "method",
        choices=["one-statement", "per-row", "batched", "heap-floor", "heap-floor-checked"],
    )
    parser.add_argument("-d", "--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--table", default="payments")
    parser.add_argument("--key", default="transaction_id")
    parser.add_argument(
        "--pk", default="id", help="primary key column(s); one-statement: e.g. id,merchant_id"
    )
    parser.add_argument(
        "--scope",
        default="",
        help="one-statement: columns that, with --key, must be unique, e.g. merchant_id",
    )
    parser.add_argument("--max-seconds", type=float, default=None, help="per-row: stop after")
    parser.add_argument("--max-rows", type=int, default=None, help="per-row: stop after")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="batched, heap-floor(-checked): connections"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batched (1000), heap-floor (400): rows a txn"
    )
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error("no DSN: pass -d/--dsn or set DATABASE_URL")
    scope = [c.strip() for c in args.scope.split(",") if c.strip()]
    if args.method != "one-statement" and (scope or "," in args.pk):
        parser.error("--scope and a composite --pk: only with one-statement")
    names = {"table": args.table, "key": args.key, "pk": args.pk}
    try:
        if args.method == "one-statement":
            result = asyncio.run(one_statement(args.dsn, **names, scope=scope))
        elif args.method in ("batched", "heap-floor", "heap-floor-checked"):
            order = "key" if args.method == "batched" else "heap"
            result = asyncio.run(
                floor(
                    args.dsn,
                    order=order,
                    checked=args.method == "heap-floor-checked",
                    **names,
                    concurrency=args.concurrency,
                    batch_size=args.batch_size,
                )
            )
        else:
            result = asyncio.run(
                per_row(args.dsn, **names, max_seconds=args.max_seconds, max_rows=args.max_rows)
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"baselines: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
