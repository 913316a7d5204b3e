"""Health signals: what the throttle's guardrails read from the server (and from standbys given
with --replica-url), one small query each, on the monitor's single connection."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import anyio
import asyncpg
import structlog

from . import db, sql
from .config import APPLICATION_NAME, ConnectConfig, ThrottleConfig, redact_dsn
from .db import Conn
from .errors import BulkDedupeError, ConnectError, PrivilegeError, UsageError, from_driver
from .throttle import Sample, archive_backlog, wal_rate

log = structlog.get_logger(__name__)

THROTTLE_QUERY_TIMEOUT = "2s"  # a health check that takes longer is itself a problem
WAL_WINDOW = 5.0  # seconds of WAL positions the rate is measured over
REPLICA_TIMEOUT = 3.0  # a standby that does not answer within this is "lag unknown"

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
# what sampling may fail with: health unknown (a standby: "lag unknown"), not a stop
SAMPLE_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    asyncpg.PostgresError,
    BulkDedupeError,
)


class ThrottleQueryError(BulkDedupeError):
    """--throttle-query failed; fix it or leave it out."""


@dataclass
class _Replica:
    url: str
    conn: asyncpg.Connection | None = None

    @property
    def name(self) -> str:
        return redact_dsn(self.url)


class HealthSampler:
    """Reads the signals the current limits watch. Connection failures are the caller's
    (the monitor reconnects); a broken --throttle-query raises ThrottleQueryError."""

    def __init__(self, cfg: ConnectConfig, table_oid: int, limits: ThrottleConfig) -> None:
        self.cfg = cfg
        self.table_oid = table_oid
        self.replicas = [_Replica(u) for u in limits.replica_urls]
        self.wal: collections.deque[tuple[float, int]] = collections.deque()
        self.stats_visible: bool | None = None

    async def check(self, conn: Conn, limits: ThrottleConfig) -> None:
        """Before anything changes: the role can see what the limits watch, the throttle query
        runs, and every --replica-url is a standby. Raises an operator's error if not."""
        needs_stats = [
            opt
            for opt, on in (
                ("--max-active-backends", limits.max_active_backends is not None),
                ("--critical-active-backends", limits.critical_active_backends is not None),
                (
                    "--max-replication-lag",
                    limits.max_replication_lag is not None and not limits.replica_urls,
                ),
                ("--pause-during-autovacuum", limits.pause_during_autovacuum),
            )
            if on
        ]
        if needs_stats and not await self._stats_visible(conn):
            raise PrivilegeError(
                f"{', '.join(needs_stats)} must see every session: GRANT pg_read_all_stats "
                "(or pg_monitor) TO the role bulkdedupe connects as"
            )
        if limits.throttle_query is not None:
            try:
                await self._throttle_query(conn, limits.throttle_query)
            except ThrottleQueryError as exc:
                raise UsageError(str(exc)) from None
        for rep in self.replicas:
            try:
                row = await self._replica_row(rep)
            except SAMPLE_ERRORS as exc:
                raise ConnectError(
                    f"--replica-url {rep.name}: {from_driver(exc, what='connecting')}"
                ) from None
            if not row["in_recovery"]:
                raise UsageError(
                    f"--replica-url {rep.name} is not a standby (pg_is_in_recovery() is false); "
                    "give the URLs of the replicas, or leave --replica-url out to read "
                    "pg_stat_replication on the primary"
                )

    async def _stats_visible(self, conn: Conn) -> bool:
        if self.stats_visible is None:
            self.stats_visible = bool(await conn.fetchval(sql.HEALTH_STATS_VISIBLE))
        return self.stats_visible

    async def sample(self, conn: Conn, limits: ThrottleConfig, elapsed: float) -> Sample:
        lags: dict[str, float | None] = {}
        if limits.max_replication_lag is not None:
            lags = await self._replication_lags(conn, limits)
        waiters = None
        if limits.max_lock_waiters is not None:
            waiters = await conn.fetchval(sql.HEALTH_LOCK_WAITERS, self.table_oid, APPLICATION_NAME)
        active = None
        if limits.max_active_backends is not None or limits.critical_active_backends is not None:
            active = await conn.fetchval(sql.HEALTH_ACTIVE_BACKENDS, APPLICATION_NAME)
        rate = backlog = None
        if limits.max_wal_rate is not None:
            rate = await self._wal_rate(conn)
            backlog = await self._archive_backlog(conn)
        vacuum = None
        if limits.pause_during_autovacuum:
            vacuum = bool(await conn.fetchval(sql.HEALTH_AUTOVACUUM, self.table_oid))
        query = None
        if limits.throttle_query is not None:
            query = await self._throttle_query(conn, limits.throttle_query)
        return Sample(
            replica_lags=lags,
            lock_waiters=waiters,
            active_backends=active,
            wal_bytes_per_s=rate,
            archive_backlog=backlog,
            autovacuum=vacuum,
            throttle_query=query,
            elapsed=elapsed,
        )

    async def _replication_lags(
        self, conn: Conn, limits: ThrottleConfig
    ) -> dict[str, float | None]:
        if not self.replicas:
            rows = await conn.fetch(sql.HEALTH_REPLICATION)
            if any(r["hidden"] for r in rows):
                # A standby whose lag we may not read: unknown, so the run pauses (and says so).
                return {r["name"]: None for r in rows if r["hidden"]}
            return {r["name"]: max(0.0, r["lag"] or 0.0) for r in rows}
        lags: dict[str, float | None] = {}
        for rep in self.replicas:
            try:
                row = await self._replica_row(rep)
            except SAMPLE_ERRORS as exc:
                log.debug("replica unreachable", replica=rep.name, error=str(exc))
                await self._drop(rep)
                lags[rep.name] = None
                continue
            if row["caught_up"]:
                lags[rep.name] = 0.0
            elif row["lag"] is None or not row["in_recovery"]:
                lags[rep.name] = None  # promoted, or never replayed anything: not knowable
            else:
                lags[rep.name] = max(0.0, float(row["lag"]))
        return lags

    async def _replica_row(self, rep: _Replica) -> asyncpg.Record:
        if rep.conn is None or rep.conn.is_closed():
            rep.conn = await asyncpg.connect(
                rep.url,
                timeout=min(self.cfg.connect_timeout, REPLICA_TIMEOUT),
                server_settings={"application_name": APPLICATION_NAME},
            )
        with anyio.fail_after(REPLICA_TIMEOUT):
            row = await rep.conn.fetchrow(sql.HEALTH_REPLICA)
        assert row is not None
        return row

    async def _drop(self, rep: _Replica) -> None:
        if rep.conn is not None:
            rep.conn.terminate()
            rep.conn = None

    async def _wal_rate(self, conn: Conn) -> float | None:
        position = await conn.fetchval(sql.HEALTH_WAL_POSITION)
        if position is None:
            return None
        now = anyio.current_time()
        self.wal.append((now, int(position)))
        while len(self.wal) > 2 and now - self.wal[1][0] >= WAL_WINDOW:
            self.wal.popleft()
        return wal_rate(list(self.wal))

    async def _archive_backlog(self, conn: Conn) -> int | None:
        row = await conn.fetchrow(sql.HEALTH_ARCHIVER)
        if row is None or row["archive_mode"] == "off" or row["current_wal"] is None:
            return None
        return archive_backlog(row["last_archived_wal"], row["current_wal"], row["segment_size"])

    async def _throttle_query(self, conn: Conn, query: str) -> bool:
        """The user's check, read-only, under a short statement_timeout. True: pause."""
        try:
            async with conn.transaction(readonly=True):
                await conn.execute(sql.SET_LOCAL_STATEMENT_TIMEOUT, THROTTLE_QUERY_TIMEOUT)
                value = await conn.fetchval(query)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            raise ThrottleQueryError(
                f"--throttle-query failed: {type(exc).__name__}: {exc} "
                f"(it runs read-only with statement_timeout {THROTTLE_QUERY_TIMEOUT})"
            ) from None
        if value is None:
            return False  # no row, or NULL: nothing says "pause"
        if isinstance(value, bool | int):
            return bool(value)
        raise ThrottleQueryError(
            f"--throttle-query returned {type(value).__name__} {value!r}; "
            "it must return one boolean (true: pause)"
        )

    async def close(self) -> None:
        for rep in self.replicas:
            if rep.conn is not None:
                with anyio.move_on_after(db.POOL_CLOSE_TIMEOUT, shield=True):
                    await rep.conn.close()
                rep.conn = None
