"""A small, steady OLTP load on the payments table, to measure what a method costs production.

Requests start at a fixed rate whatever happens (an open loop), cycling through: update a random
payment's status and amount by id, insert a payment, look one up by transaction_id. A request's
latency runs from its *scheduled* start to its end, so time spent waiting for a connection that a
blocked request still holds counts too (no coordinated omission).
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import asyncpg

from benchmarks.baselines import percentile
from benchmarks.generate import quote_table

__all__ = ["KINDS", "OltpConfig", "OltpResult", "Sample", "run_load"]

KINDS: Final = ("update", "insert", "lookup")
SLOW_MS: Final = 1000.0
APPLICATION_NAME: Final = "bench-oltp"
# Keys looked up by the load: sampled once at start, so lookups hit real rows (and their groups).
_LOOKUP_KEYS: Final = 1000


@dataclass(frozen=True, kw_only=True)
class OltpConfig:
    rate: float = 60.0  # requests per second, all kinds together
    connections: int = 4
    # Hard bound on one load, whatever the method under test does.
    max_seconds: float = 1800.0
    # How long to wait for requests still running when the load is stopped.
    drain_seconds: float = 600.0
    table: str = "payments"
    seed: int = 1
    # A key the lookups never use (see PgbenchConfig.exclude_key).
    exclude_key: str | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.connections < 1:
            raise ValueError("rate must be > 0 and connections >= 1")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # scheduled start, seconds after the load's origin
    kind: str
    latency_ms: float  # scheduled start -> done
    service_ms: float  # the statement alone, once it had a connection
    error: str | None = None


@dataclass(kw_only=True)
class OltpResult:
    samples: list[Sample] = field(default_factory=list)
    # Requests still running when the drain timed out: the worst latencies, not to be lost.
    unfinished: int = 0
    duration_s: float = 0.0
    # What went wrong with the load itself (e.g. a pgbench client that aborted).
    notes: list[str] = field(default_factory=list)

    def window(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.t <= end]

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
        """p50/p99/max latency and slow-request count of the requests scheduled in [start, end]."""
        chosen = self.window(start, end)
        return {
            "requests": len(chosen),
            "errors": sum(1 for s in chosen if s.error),
            "unfinished": self.unfinished,
            **_stats(chosen),
            "by_kind": {k: _stats([s for s in chosen if s.kind == k]) for k in KINDS},
        }


def _stats(samples: Sequence[Sample]) -> dict[str, Any]:
    latencies = [s.latency_ms for s in samples]
    service = [s.service_ms for s in samples]
    return {
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=0.0), 2),
        "over_1s": sum(1 for v in latencies if v > SLOW_MS),
        # The statement alone, without waiting for a free connection: tells a request blocked
        # by a lock from one queued behind blocked requests.
        "statement_p99_ms": round(percentile(service, 99), 2),
        "statement_max_ms": round(max(service, default=0.0), 2),
    }


async def _sample_keys(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    table: str,
    max_id: int,
    rng: random.Random,
    exclude: str | None = None,
) -> list[str]:
    ids = [rng.randint(1, max_id) for _ in range(_LOOKUP_KEYS)]
    rows = await conn.fetch(
        f"SELECT transaction_id FROM {table} WHERE id = ANY($1::bigint[]) "
        "AND transaction_id IS NOT NULL AND transaction_id IS DISTINCT FROM $2::text",
        ids,
        exclude,
    )
    return [r["transaction_id"] for r in rows] or ["none"]


async def run_load(
    dsn: str,
    cfg: OltpConfig,
    stop: anyio.Event,
    *,
    max_id: int,
    origin: float | None = None,
    ready: anyio.Event | None = None,
) -> OltpResult:
    """Run the load until ``stop`` is set (or ``cfg.max_seconds``), then drain and return it.

    ``origin`` (a ``time.monotonic()`` value) is time zero of the samples, shared with the
    caller so it can place a method's start and end on the same axis; ``ready`` is set once the
    connections are open and the load is about to start.
    """
    table = quote_table(cfg.table)
    rng = random.Random(cfg.seed)
    result = OltpResult()
    pool = await asyncpg.create_pool(
        dsn,
        min_size=cfg.connections,
        max_size=cfg.connections,
        server_settings={"application_name": APPLICATION_NAME},
    )
    try:
        async with pool.acquire() as conn:
            keys = await _sample_keys(conn, table, max(1, max_id), rng, cfg.exclude_key)
            update = f"UPDATE {table} SET status = $2, amount = $3 WHERE id = $1"
            insert = (
                f"INSERT INTO {table} (transaction_id, amount, currency, status, created_at, "
                "payload) VALUES ($1, $2, 'EUR', 'pending', now(), '{}')"
            )
            lookup = f"SELECT id, amount, status FROM {table} WHERE transaction_id = $1"
        statements = {"update": update, "insert": insert, "lookup": lookup}

        def args_for(kind: str) -> tuple[Any, ...]:
            amount = rng.randint(100, 1_000_000) / 100
            if kind == "update":
                status = rng.choice(("settled", "refunded", "failed"))
                return (rng.randint(1, max(1, max_id)), status, amount)
            if kind == "insert":
                # "oltp_" + hex: never equal to a generated key nor to a renamed one ("-<id>").
                return (f"oltp_{uuid.UUID(int=rng.getrandbits(128)).hex}", amount)
            return (rng.choice(keys),)

        async def request(t: float, kind: str, args: tuple[Any, ...], scheduled: float) -> None:
            error: str | None = None
            service_started = scheduled
            try:
                async with pool.acquire() as conn:
                    service_started = time.monotonic()
                    await conn.execute(statements[kind], *args)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                error = type(exc).__name__
            done = time.monotonic()
            result.samples.append(
                Sample(
                    t=round(t, 4),
                    kind=kind,
                    latency_ms=round((done - scheduled) * 1000, 3),
                    service_ms=round((done - service_started) * 1000, 3),
                    error=error,
                )
            )

        zero = time.monotonic() if origin is None else origin
        began = time.monotonic()
        interval = 1 / cfg.rate
        launched = 0
        if ready is not None:
            ready.set()
        async with anyio.create_task_group() as tg:
            i = 0
            while not stop.is_set() and time.monotonic() - began < cfg.max_seconds:
                scheduled = began + i * interval
                delay = scheduled - time.monotonic()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await stop.wait()
                    if stop.is_set():
                        break
                kind = KINDS[i % len(KINDS)]
                tg.start_soon(request, scheduled - zero, kind, args_for(kind), scheduled)
                launched += 1
                i += 1
            # Stragglers (e.g. updates blocked behind a long transaction) must finish, or the
            # worst latencies would vanish from the figures; bounded all the same.
            tg.cancel_scope.deadline = anyio.current_time() + cfg.drain_seconds
        result.unfinished = launched - len(result.samples)
        result.duration_s = round(time.monotonic() - began, 3)
    finally:
        with anyio.move_on_after(10, shield=True) as closing:
            await pool.close()
        if closing.cancelled_caught:
            pool.terminate()
    return result
