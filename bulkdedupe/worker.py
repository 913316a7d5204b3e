"""The consumer: one batch = one short transaction. It takes the advisory locks of the batch's
keys in sorted order, re-reads their rows FOR UPDATE, decides on that current data, renames the
losers and writes the audit rows in the same transaction. Retries by exception class."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

import anyio
import asyncpg
import structlog

from . import sql
from .batching import BatchSizer
from .catalog import Target
from .db import CONNECTION_LOST, Conn
from .errors import ConnectError, from_driver
from .planner import GroupPlan, Row, candidates, plan_groups
from .progress import Stats
from .scanner import Group

log = structlog.get_logger(__name__)

# Failures that say "not now": the batch rolled back as a whole and can be tried again.
RETRYABLE: tuple[type[BaseException], ...] = (
    asyncpg.LockNotAvailableError,  # lock_timeout
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,  # statement_timeout
    asyncpg.TooManyConnectionsError,
    TimeoutError,
    *CONNECTION_LOST,  # pg_terminate_backend, a restart, a closed socket
)

# Failures that belong to the rows of one group (a CHECK constraint, a trigger refusing the new
# value...): the group is skipped with the error named, the run goes on.
GROUP_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
)

SKIP_REASONS: dict[type[BaseException], str] = {
    asyncpg.LockNotAvailableError: "lock_timeout",
    asyncpg.DeadlockDetectedError: "deadlock",
    asyncpg.SerializationError: "serialization_failure",
    asyncpg.QueryCanceledError: "statement_timeout",
}

MAX_CANDIDATE_ROUNDS = 20


class StaleBatch(Exception):
    """The UPDATE touched fewer rows than were read under lock: roll back and retry."""


RETRY_OR_STALE: tuple[type[BaseException], ...] = (*RETRYABLE, StaleBatch)


def batch_settings(
    lock_timeout: float, statement_timeout: float, wal_compression: str | None
) -> tuple[str, ...]:
    """The query and arguments that open every batch transaction: its timeouts and, when the
    run compresses its own full-page images, that too (all SET LOCAL: they end with it)."""
    timeouts = (f"{int(lock_timeout * 1000)}ms", f"{int(statement_timeout * 1000)}ms")
    if wal_compression is None:
        return (sql.SET_BATCH_TIMEOUTS, *timeouts)
    return (sql.SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION, *timeouts, wal_compression)


def skip_reason(exc: BaseException) -> str:
    for cls, reason in SKIP_REASONS.items():
        if isinstance(exc, cls):
            return reason
    if isinstance(exc, RETRYABLE):
        return "connection_lost"
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class WorkItem:
    """Groups handed to a worker; `seq` orders the items of one key range for checkpoints."""

    range_index: int
    seq: int
    groups: tuple[Group, ...]
    last_key: str | None

    def __reduce__(self) -> tuple[type[WorkItem], tuple[int, int, tuple[Group, ...], str | None]]:
        # spooled to disk: pickle as a plain tuple, not through dataclasses.fields()
        return (WorkItem, (self.range_index, self.seq, self.groups, self.last_key))


class Rename(NamedTuple):
    pk: Any
    old: str
    new: str
    survivor_pk: Any


@dataclass(frozen=True, slots=True)
class TxResult:
    renames: list[Rename]
    no_longer_duplicate: list[str]
    unplaceable: list[Row]
    leftover: list[str]  # keys whose groups exceed the batch budget: go again


class PlanWriter:
    """Writes the dry-run plan, one JSON object a line (workers share one file)."""

    def __init__(self, fh: IO[str]) -> None:
        self.fh = fh

    def write(self, key: str, renames: Sequence[Rename]) -> None:
        for r in renames:
            self.fh.write(
                json.dumps(
                    {
                        "pk": r.pk,
                        "old_value": r.old,
                        "new_value": r.new,
                        "survivor_pk": r.survivor_pk,
                        "key": key,
                    },
                    default=str,
                    ensure_ascii=False,
                )
                + "\n"
            )


class Worker:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        target: Target,
        queries: sql.TargetSql,
        run_id: str,
        apply: bool,
        sizer: BatchSizer,
        template: str,
        lock_timeout: float,
        statement_timeout: float,
        wal_compression: str | None,
        max_retries: int,
        stats: Stats,
        plan: PlanWriter | None = None,
        sample: list[Rename] | None = None,
        sample_size: int = 10,
        before_batch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.target = target
        self.q = queries
        self.run_id = run_id
        self.apply = apply
        self.sizer = sizer
        self.template = template
        self.settings = batch_settings(lock_timeout, statement_timeout, wal_compression)
        self.max_retries = max_retries
        self.stats = stats
        self.plan = plan
        self.sample = sample
        self.sample_size = sample_size
        # The throttle's gate: may wait (paused, max-rate, --sleep) or raise to stop the run.
        # Called before each attempt, before a connection is taken from the pool.
        self.before_batch = before_batch

    async def handle(self, item: WorkItem) -> None:
        """Work off every group of the item, in transactions of at most the sizer's current
        size (a group larger than that takes several)."""
        counts = {g.key: g.count for g in item.groups}
        pending = [g.key for g in item.groups]
        while pending:
            budget = self.sizer.size
            take, rows = 0, 0
            while take < len(pending) and (take == 0 or rows + counts[pending[take]] - 1 <= budget):
                rows += counts[pending[take]] - 1
                take += 1
            leftover = await self._with_retries(pending[:take], counts)
            pending = leftover + pending[take:]

    async def _with_retries(self, keys: list[str], counts: dict[str, int]) -> list[str]:
        attempt = 0
        while True:
            try:
                return await self._once(keys, counts)
            except RETRY_OR_STALE as exc:
                error: BaseException = exc
            except GROUP_ERRORS as exc:
                if len(keys) == 1:
                    self._skip(keys, counts, type(exc).__name__, exc)
                    return []
                return await self._one_by_one(keys, counts)
            except asyncpg.PostgresError as exc:
                raise from_driver(exc, what="batch transaction") from exc
            attempt += 1
            self.stats.retries += 1
            self.sizer.failed()
            if attempt > self.max_retries:
                if isinstance(error, CONNECTION_LOST):
                    # The server is gone, not one hot key: splitting the batch and skipping
                    # group after group (each after its own retries) would only take hours.
                    resume = f"resume with --run-id {self.run_id}" if self.apply else "run again"
                    raise ConnectError(
                        f"lost the connection to the server ({type(error).__name__}: {error}) "
                        f"and {attempt} attempts failed; every committed batch is whole and "
                        f"audited: {resume} once the server is back"
                    ) from error
                if len(keys) > 1:
                    # One hot key must not sink the whole batch: go group by group.
                    return await self._one_by_one(keys, counts)
                self._skip(keys, counts, skip_reason(error), error)
                return []
            delay = min(0.05 * 2**attempt, 2.0) * (0.5 + random.random())
            log.debug("batch retry", attempt=attempt, error=type(error).__name__, delay=delay)
            await anyio.sleep(delay)

    async def _one_by_one(self, keys: list[str], counts: dict[str, int]) -> list[str]:
        leftover: list[str] = []
        for key in keys:
            leftover += await self._with_retries([key], counts)
        return leftover

    def _skip(
        self, keys: list[str], counts: dict[str, int], reason: str, exc: BaseException
    ) -> None:
        rows = sum(counts.get(k, 2) - 1 for k in keys)
        self.stats.skip(reason, rows)
        self.stats.groups_done += len(keys)
        log.warning("groups skipped", reason=reason, groups=len(keys), rows=rows, error=str(exc))

    async def _once(self, keys: list[str], counts: dict[str, int]) -> list[str]:
        if self.before_batch is not None:
            await self.before_batch()
        started = anyio.current_time()
        result = await self._transaction(keys, self.sizer.size)
        seconds = anyio.current_time() - started
        self.sizer.observe(len(result.renames), seconds)
        self.stats.batch_seconds.append(seconds)
        self.stats.batch_size = self.sizer.size
        self.stats.batches += 1
        self.stats.renamed += len(result.renames)
        for key in result.no_longer_duplicate:
            self.stats.skip("no_longer_duplicate", max(counts.get(key, 2) - 1, 0))
        if result.unplaceable:
            self.stats.skip("no_unique_value_fits", len(result.unplaceable))
            log.warning(
                "rows left unrenamed: no candidate value fits the column",
                pks=[str(r.pk) for r in result.unplaceable[:10]],
                max_length=self.target.key_max_length,
            )
        done = len(keys) - len(result.leftover)
        self.stats.groups_done += done
        if self.plan is not None and result.renames:
            for key, renames in _by_key(result.renames).items():
                self.plan.write(key, renames)
        if self.sample is not None and len(self.sample) < self.sample_size:
            self.sample.extend(result.renames[: self.sample_size - len(self.sample)])
        return result.leftover

    async def _transaction(self, keys: list[str], size: int) -> TxResult:
        budget = size if self.apply else 1 << 62
        async with self.pool.acquire() as conn, conn.transaction(readonly=not self.apply):
            await conn.fetch(*self.settings)
            if self.apply:
                await conn.fetch(self.q.lock_keys, keys, self.target.lock_prefix)
            # Read, not FOR UPDATE: the UPDATE below locks each row it renames and re-checks
            # that it still holds the old value (else the batch rolls back and retries). Locking
            # the survivors too would write and WAL-log (full-page image) heap pages that this
            # tool never changes: about one more page per group.
            rows = await conn.fetch(self.q.read_groups, keys)
            plans, single = plan_groups([Row(r["pk"], r["k"]) for r in rows], budget)
            seen = {p.key for p in plans} | set(single)
            gone = [k for k in keys if k not in seen]  # no row holds the key any more
            renames, unplaceable = await self._assign(conn, plans)
            if self.apply and renames:
                status = await conn.execute(
                    self.q.apply_renames,
                    [r.pk for r in renames],
                    [r.old for r in renames],
                    [r.new for r in renames],
                    self.run_id,
                )
                if int(status.split()[-1]) != len(renames):
                    raise StaleBatch(f"expected {len(renames)} renames, wrote {status}")
        leftover = [p.key for p in plans if p.rest > 0] if self.apply else []
        return TxResult(renames, single + gone, unplaceable, leftover)

    async def _assign(self, conn: Conn, plans: list[GroupPlan]) -> tuple[list[Rename], list[Row]]:
        """Give every loser a new value that no row holds, that no other row of this batch
        gets, and (on --apply) whose advisory lock we could take, so concurrent workers never
        pick the same value."""
        t = self.target
        gens = {}
        owner: dict[Any, tuple[Row, Any]] = {}
        for p in plans:
            for row in p.losers:
                gens[row.pk] = candidates(
                    self.template, row.value, row.pk, t.key_max_length, char_semantics=t.key_is_char
                )
                owner[row.pk] = (row, p.survivor.pk)
        chosen: dict[Any, str] = {}
        used: set[str] = set()
        unplaceable: list[Row] = []
        pending = list(gens)
        for _ in range(MAX_CANDIDATE_ROUNDS):
            if not pending:
                break
            asking: dict[Any, str] = {}
            asked: set[str] = set()
            for pk in pending:
                for c in gens[pk]:
                    if c not in used and c not in asked:
                        asking[pk] = c
                        asked.add(c)
                        break
                else:
                    unplaceable.append(owner[pk][0])
            if not asking:
                pending = []
                break
            checked = await conn.fetch(
                self.q.check_candidates, list(asking.values()), t.lock_prefix, self.apply
            )
            free = {r["v"] for r in checked if r["locked"] and not r["taken"]}
            pending = []
            for pk, c in asking.items():
                if c in free:
                    chosen[pk] = c
                    used.add(c)
                else:
                    used.add(c)  # taken or locked by another worker: never ask again
                    pending.append(pk)
        unplaceable += [owner[pk][0] for pk in pending]
        renames = [Rename(pk, owner[pk][0].value, new, owner[pk][1]) for pk, new in chosen.items()]
        return renames, unplaceable


def _by_key(renames: list[Rename]) -> dict[str, list[Rename]]:
    out: dict[str, list[Rename]] = {}
    for r in renames:
        out.setdefault(r.old, []).append(r)
    return out
