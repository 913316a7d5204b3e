"""The consumer: one batch = one short transaction. It takes the advisory locks of the batch's
keys in sorted order, re-reads their rows FOR UPDATE, decides on that current data, renames the
losers and writes the audit rows in the same transaction. Retries by exception class."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import IO, Any, NamedTuple

import anyio
import asyncpg
import structlog

from . import retry, sql
from .batching import BatchSizer
from .catalog import Target
from .config import DEFAULT_TEMPLATE
from .db import Conn
from .errors import (
    CONNECTION_LOST,
    DRIVER_ERRORS,
    Action,
    ConnectError,
    Verdict,
    classify,
    from_driver,
)
from .literals import text_array, tid_array, value_array
from .planner import GroupPlan, Row, candidates, equality_key, pk_label, plan_groups
from .progress import Stats
from .scanner import Group
from .spool import DiskList
from .state import SkipLog
from .throttle import Stopping

log = structlog.get_logger(__name__)

MAX_CANDIDATE_ROUNDS = 20
# A group with more losers than one batch (and than this) is worked off in chunks: decided once,
# its losers streamed to a file, each chunk re-reading only its own rows (O(group), not O(group²)).
GIANT_GROUP_MIN_LOSERS = 200
# Passes over a giant group: each one after the first picks up rows that joined the group while
# the one before was worked off (live inserts) or follows a survivor the application changed.
MAX_GROUP_PASSES = 5
LOSERS_PREFETCH = 5000  # cursor rows fetched at a time while a giant group's losers are listed


class StaleBatch(Exception):
    """The UPDATE touched fewer rows than were read under lock (a row or a survivor changed
    in between): roll back and retry, deciding again on the data as it is now."""


STALE = Verdict(Action.RETRY, "stale_batch")
RETRY_OR_FAIL: tuple[type[BaseException], ...] = (*DRIVER_ERRORS, StaleBatch)


def batch_settings(
    lock_timeout: float,
    statement_timeout: float,
    wal_compression: str | None,
    disable_triggers: bool = False,
) -> tuple[str, ...]:
    """The query and arguments that open every batch transaction: its timeouts; when the
    run compresses its own full-page images, that too; with --disable-triggers, replica mode
    (session_replication_role: the table's ordinary triggers do not fire). All SET LOCAL:
    they end with the transaction."""
    timeouts = (f"{int(lock_timeout * 1000)}ms", f"{int(statement_timeout * 1000)}ms")
    if wal_compression is None:
        query = sql.SET_BATCH_TIMEOUTS_REPLICA if disable_triggers else sql.SET_BATCH_TIMEOUTS
        return (query, *timeouts)
    query = (
        sql.SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION_REPLICA
        if disable_triggers
        else sql.SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION
    )
    return (query, *timeouts, wal_compression)


def session_settings(
    lock_timeout: float,
    statement_timeout: float,
    wal_compression: str | None,
    disable_triggers: bool = False,
    synchronous_commit: str | None = None,
) -> dict[str, str]:
    """batch_settings as a session's startup settings, for a pool that only runs batches
    (the run's workers): no SET LOCAL round trip per batch. `synchronous_commit` "off": a
    batch's COMMIT returns before its WAL is flushed (see README, --synchronous-commit)."""
    out = {
        "lock_timeout": f"{int(lock_timeout * 1000)}ms",
        "statement_timeout": f"{int(statement_timeout * 1000)}ms",
    }
    if wal_compression is not None:
        out["wal_compression"] = wal_compression
    if disable_triggers:
        out["session_replication_role"] = "replica"
    if synchronous_commit is not None:
        out["synchronous_commit"] = synchronous_commit
    return out


@dataclass(frozen=True, slots=True)
class WorkItem:
    """Groups handed to a worker; `seq` orders the items of one key range for checkpoints."""

    range_index: int
    seq: int
    groups: tuple[Group, ...]
    last_key: str | None
    retry: bool = False  # groups a previous process skipped (from `<state>.skipped`)

    def __reduce__(
        self,
    ) -> tuple[type[WorkItem], tuple[int, int, tuple[Group, ...], str | None, bool]]:
        # spooled to disk: pickle as a plain tuple, not through dataclasses.fields()
        return (WorkItem, (self.range_index, self.seq, self.groups, self.last_key, self.retry))


class Rename(NamedTuple):
    pk: Any
    old: str
    new: str
    survivor_pk: Any
    group: str  # the group's key as the scan spelled it (bpchar: may differ from `old`)
    # a decided rename's heap positions (block, offset) of its row and of its survivor
    at: tuple[int, int] | None = None
    survivor_at: tuple[int, int] | None = None


def heap_position(rel: int, block: int, offset: int) -> int:
    """Where a row lies as one int (partition oid, block, line pointer: 32, 32 and 16 bits),
    the heap-order sweep's sort key: an int compares several times faster than a tuple's
    fields (0.6 s for each run of 200k, a tenth of the tool's CPU at 5M rows, was sorting
    tuples)."""
    return (rel << 48) | (block << 16) | offset


class Entry(NamedTuple):
    """A rename decided without a lock, to be made by a chunk transaction that re-checks it
    under its group's advisory lock. Sorted by `position`: where the row lies in the heap
    (heap_position: the partition's oid, then the ctid's page and line pointer), which is
    unique, so the fields after it are never compared.

    A million of them at 20M rows go through the tool's one process: built, sorted on disk
    and read back as plain tuples (`new_entry`, no Python-level constructor call per entry)."""

    position: int
    pk: Any
    group: str  # as the scan spells it
    survivor: Any  # the survivor's primary key
    value: str  # the row's key as read when decided
    survivor_at: tuple[int, int] | None = None  # where the survivor lay (block, offset)

    @property
    def at(self) -> tuple[int, int]:
        """The row's (block, offset) in its relation: its ctid."""
        return (self.position >> 16) & 0xFFFFFFFF, self.position & 0xFFFF


_group_of = attrgetter("group")

# Entry and Rename from a tuple of their fields, without the Python-level __new__ a
# NamedTuple's constructor runs: the sweep makes, sorts and reads back a million of each at
# 20M rows, and that call was a tenth of the tool's CPU.
new_entry: Callable[[tuple[Any, ...]], Entry] = partial(tuple.__new__, Entry)
new_rename: Callable[[tuple[Any, ...]], Rename] = partial(tuple.__new__, Rename)


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What one chunk transaction did with its entries."""

    renamed: int
    redo: set[str]  # groups whose survivor no longer holds the value: decide them again
    gone: int  # rows no longer in their group (the application deleted or changed them)
    unplaceable: list[tuple[str, Row]]  # (group, row) that no candidate value fits


def entry_of(
    record: Any, group: str, survivor: Any, survivor_at: tuple[int, int] | None = None
) -> Entry:
    """The entry of a row read with the heap position columns (`rel`, `tid`)."""
    block, offset = record["tid"]
    where = heap_position(record["rel"], block, offset)
    return Entry(where, record["pk"], group, survivor, record["k"], survivor_at)


@dataclass(slots=True)
class _Progress:
    """One group of a work item while it is worked off, over one or more transactions."""

    count: int  # rows holding the key, as last known
    # losers that got no value: never again (a set of their own once there is one: most
    # groups never have one, and a heap-order decision makes a _Progress per group scanned)
    decided: AbstractSet[Any] = frozenset()
    unplaceable: int = 0
    examples: tuple[str, ...] = ()  # a few of their pks, for the operator
    skipped: bool = False

    @property
    def undecided(self) -> int:
        """The renames it may still need (at least 1: a group is never free to take)."""
        return max(self.count - 1 - len(self.decided), 1)


class _Groups(dict[str, _Progress]):
    """An item's groups by key, each one's _Progress made when first asked for."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts  # rows holding the key, as the scan found them

    def __missing__(self, key: str) -> _Progress:
        g = self[key] = _Progress(self.counts[key])
        return g


@dataclass(frozen=True, slots=True)
class TxResult:
    renames: list[Rename]
    no_longer_duplicate: list[str]
    unplaceable: list[tuple[str, Row]]  # (group key, row) that no candidate value fits
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
        skips: SkipLog,
        template: str,
        lock_timeout: float,
        statement_timeout: float,
        wal_compression: str | None,
        disable_triggers: bool = False,
        max_retries: int,
        stats: Stats,
        plan: PlanWriter | None = None,
        sample: list[Rename] | None = None,
        sample_size: int = 10,
        before_batch: Callable[[], Awaitable[None]] | None = None,
        spool_dir: str | None = None,
        set_local: bool = True,
    ) -> None:
        self.pool = pool
        self.target = target
        self.q = queries
        self.run_id = run_id
        self.apply = apply
        self.sizer = sizer
        self.skips = skips
        self.template = template
        # False: the pool's sessions start with these settings (session_settings)
        self.settings = (
            batch_settings(lock_timeout, statement_timeout, wal_compression, disable_triggers)
            if set_local
            else None
        )
        self.max_retries = max_retries
        self.stats = stats
        self.plan = plan
        self.sample = sample
        self.sample_size = sample_size
        # The throttle's gate: may wait (paused, max-rate, --sleep) or raise to stop the run.
        # Called before each attempt, before a connection is taken from the pool.
        self.before_batch = before_batch
        self.spool_dir = spool_dir  # where a giant group's list of losers is written

    async def _set_local(self, conn: Conn) -> None:
        if self.settings is not None:
            await conn.fetch(*self.settings)

    async def handle(self, item: WorkItem) -> None:
        """Work off every group of the item, in transactions of at most the sizer's current
        size (a group larger than that takes several). Every row is decided once: renamed, or
        skipped with its reason; skipped groups are on record (`SkipLog`) when this returns."""
        groups = {g.key: _Progress(g.count) for g in item.groups}
        giant = [k for k, g in groups.items() if self._is_giant(g)]
        pending = [k for k in groups if k not in giant]
        while pending:
            take = self._take(pending, groups)
            leftover = await self._with_retries(pending[:take], groups)
            pending = leftover + pending[take:]
        for key in giant:
            await self._work_off(key, groups[key])
        await self._settle(item, groups)

    async def _settle(self, item: WorkItem, groups: dict[str, _Progress]) -> None:
        """Put on record the item's groups left with rows no value fits, and (a resume's
        retried item) those resolved now."""
        for key, g in groups.items():
            if g.unplaceable and not g.skipped:
                g.skipped = True
                await self.record_unplaceable(key, g.unplaceable, g.examples)
        if item.retry:
            # groups a previous process skipped: those not skipped again are resolved now
            await self.skips.resolved(
                [g.key for g in item.groups if not ((p := groups.get(g.key)) and p.skipped)]
            )

    def _take(self, pending: list[str], groups: dict[str, _Progress]) -> int:
        """How many of the pending groups the next transaction takes: at least one, then as
        many as fit the batch size (a group's undecided losers count)."""
        budget = self.sizer.size
        take, rows = 0, 0
        while take < len(pending):
            n = groups[pending[take]].undecided
            if take and rows + n > budget:
                break
            rows += n
            take += 1
        return take

    async def _with_retries(
        self,
        keys: list[str],
        groups: dict[str, _Progress],
        once: Callable[[], Awaitable[list[str]]] | None = None,
    ) -> list[str]:
        """One transaction (`once`, by default an ordinary batch of `keys`), retried as the
        error's class says; returns the keys left for another transaction."""
        attempt = 0
        while True:
            try:
                return await (once() if once is not None else self._once(keys, groups))
            except Stopping:
                raise
            except RETRY_OR_FAIL as exc:
                error: BaseException = exc
                verdict = STALE if isinstance(exc, StaleBatch) else classify(exc)
            if verdict.action is Action.FATAL:
                raise from_driver(error, what="batch transaction") from error
            if verdict.action is Action.SKIP_GROUP:
                if len(keys) > 1:
                    return await self._one_by_one(keys, groups)  # find the group it belongs to
                await self._skip(keys, groups, verdict.reason, error)
                return []
            attempt += 1
            self.stats.retries += 1
            self.sizer.failed()
            if attempt > self.max_retries:
                if isinstance(error, CONNECTION_LOST):
                    raise self._connection_lost(error, attempt) from error
                if len(keys) > 1:
                    # One hot key must not sink the whole batch: go group by group.
                    return await self._one_by_one(keys, groups)
                await self._skip(keys, groups, verdict.reason, error)
                return []
            delay = await retry.wait(attempt, retry.BATCH)
            log.debug(
                "batch retry",
                attempt=attempt,
                error=type(error).__name__,
                reason=verdict.reason,
                delay=delay,
            )

    async def _one_by_one(self, keys: list[str], groups: dict[str, _Progress]) -> list[str]:
        leftover: list[str] = []
        for key in keys:
            leftover += await self._with_retries([key], groups)
        return leftover

    async def _skip(
        self, keys: list[str], groups: dict[str, _Progress], reason: str, exc: BaseException
    ) -> None:
        detail = f"{type(exc).__name__}: {exc}"
        for key in keys:
            g = groups[key]
            await self._skip_group(key, g, reason, g.undecided, detail)
            self.stats.groups_done += 1
        log.warning("groups skipped", reason=reason, groups=len(keys), error=detail)

    async def record_unplaceable(self, key: str, rows: int, examples: Sequence[str]) -> None:
        """Skip a group on record: `rows` of its rows got no new value that fits the column."""
        reason = "no_unique_value_fits"
        self.stats.skip(reason, rows)
        error = (
            f"no new value from --template fits the column ({self.target.key_max_length} "
            f"characters) for {rows} row(s), e.g. pk {', '.join(examples[:5])}"
        )
        if await self.skips.record(key, reason, rows, error):
            self.stats.skipped_groups += 1

    async def _skip_group(self, key: str, g: _Progress, reason: str, rows: int, error: str) -> None:
        g.skipped = True
        self.stats.skip(reason, rows)
        if await self.skips.record(key, reason, rows, error):
            self.stats.skipped_groups += 1

    async def _once(self, keys: list[str], groups: dict[str, _Progress]) -> list[str]:
        if self.before_batch is not None:
            await self.before_batch()
        started = anyio.current_time()
        decided = {pk for k in keys for pk in groups[k].decided}
        result = await self._transaction(keys, self.sizer.size, decided)
        return self._account(keys, groups, result, anyio.current_time() - started)

    def _account(
        self, keys: list[str], groups: dict[str, _Progress], result: TxResult, seconds: float
    ) -> list[str]:
        """What a committed (or, dry run, planned) transaction did, into the stats, the sizer,
        the groups' progress, the plan and the sample; returns its leftover keys."""
        self.sizer.observe(len(result.renames), seconds)
        self.stats.batch_seconds.append(seconds)
        self.stats.batch_size = self.sizer.size
        self.stats.batches += 1
        self.stats.renamed += len(result.renames)
        for key in result.no_longer_duplicate:
            self.stats.skip("no_longer_duplicate", max(groups[key].count - 1, 0))
        for key, row in result.unplaceable:
            self._unplaceable(key, groups[key], row)
        if result.unplaceable:
            log.warning(
                "rows left unrenamed: no candidate value fits the column",
                pks=[str(r.pk) for _, r in result.unplaceable[:10]],
                max_length=self.target.key_max_length,
            )
        for key, renamed in _count_by_key(result.renames).items():
            g = groups[key]
            g.count = max(g.count - renamed, 1)
        done = len(keys) - len(result.leftover)
        self.stats.groups_done += done
        if self.plan is not None and result.renames:
            for key, renames in _by_key(result.renames).items():
                self.plan.write(key, renames)
        if self.sample is not None and len(self.sample) < self.sample_size:
            self.sample.extend(result.renames[: self.sample_size - len(self.sample)])
        return result.leftover

    async def _transaction(self, keys: list[str], size: int, decided: set[Any]) -> TxResult:
        budget = size if self.apply else 1 << 62
        async with self.pool.acquire() as conn, conn.transaction(readonly=not self.apply):
            await self._set_local(conn)
            if self.apply:
                await conn.fetch(self.q.lock_keys, keys, self.target.lock_prefix)
            # Read, not FOR UPDATE: the UPDATE below locks each row it renames and re-checks
            # that it still holds the old value (else the batch rolls back and retries). Locking
            # the survivors too would write and WAL-log (full-page image) heap pages that this
            # tool never changes: about one more page per group.
            rows = await conn.fetch(self.q.read_groups, keys)
            # grouped as the unique index compares (bpchar: trailing blanks do not count), and
            # named by this batch's keys, so `seen` and the leftovers speak the scan's spelling
            plans, single = plan_groups(
                [Row(r["pk"], r["k"], r["g"] if self.q.scoped else None) for r in rows],
                budget,
                char_semantics=self.target.key_is_char,
                asked=keys,
                decided=decided,
            )
            seen = {p.key for p in plans} | set(single)
            gone = [k for k in keys if k not in seen]  # no row holds the key any more
            renames, unplaceable = await self._assign(conn, plans)
            if self.apply and renames:
                await self._rename(conn, renames)
        leftover = [p.key for p in plans if p.rest > 0] if self.apply else []
        return TxResult(renames, single + gone, unplaceable, leftover)

    async def _rename(self, conn: Conn, renames: list[Rename]) -> None:
        """The batch's UPDATE with its audit rows; every row it was asked to rename, or none."""
        status = await conn.execute(self.q.apply_renames, *self._rename_args(renames))
        if int(status.split()[-1]) != len(renames):
            raise StaleBatch(f"expected {len(renames)} renames, wrote {status}")

    # --- heap order: decide now (no lock), rename later in chunks sorted by heap position --

    async def decide(
        self,
        item: WorkItem,
        sink: Callable[[list[Entry]], None],
        giants: set[str] | None = None,
    ) -> None:
        """The first half of a heap-order sweep: each group's survivor (by --keep order) and
        losers as they are now, read without a lock or a write (one query for the item's
        ordinary groups, a cursor for each giant one), handed to `sink` a list at a time.
        Every entry is checked again under its group's lock by the chunk that renames it.

        A query that keeps failing falls back to what a key-order run does with those groups
        (renamed in batches under their locks, or skipped with a reason): correct, only not in
        heap order. The giant groups' keys are added to `giants`: rows the application adds
        to such a value while the sweep runs are picked up by deciding it again after it."""
        # a _Progress only for the groups that need one (a giant one, one skipped or split
        # off by a retry): the ordinary ones are decided by one query, a million at 20M rows
        groups = _Groups({g.key: g.count for g in item.groups})
        giant_above = max(self.sizer.size, GIANT_GROUP_MIN_LOSERS) + 1  # as _is_giant
        giant = [k for k, n in groups.counts.items() if n > giant_above]
        big = set(giant)
        pending = [k for k in groups.counts if k not in big] if big else list(groups.counts)
        if pending:
            decided: list[list[Entry]] = []

            async def once(decided: list[list[Entry]] = decided) -> list[str]:
                entries, single = await self._decide_groups(pending)
                decided.append(entries)
                for key in single:
                    self.stats.skip("no_longer_duplicate", max(groups.counts[key] - 1, 0))
                return []

            await self._with_retries(pending, groups, once)
            if decided:
                sink(decided[-1])
            self.stats.groups_done += len(pending)
        for key in giant:
            if giants is not None:
                giants.add(key)
            await self._decide_giant(key, groups[key], sink)
        await self._settle(item, groups)

    async def _decide_groups(self, keys: list[str]) -> tuple[list[Entry], list[str]]:
        """The losers of these groups as entries, and the groups no longer duplicated."""
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            await self._set_local(conn)
            rows = await conn.fetch(self.q.decide_losers, keys)
        char = self.target.key_is_char
        spelling = {equality_key(k, char_semantics=True): k for k in keys} if char else {}
        entries: list[Entry] = []
        if not self.q.scoped and not char:  # the common case, a million times at 20M rows
            entries = [
                new_entry(((rel << 48) | (block << 16) | offset, pk, k, survivor, k, survivor_at))
                for pk, k, rel, (block, offset), survivor, survivor_at in rows
            ]
        for r in rows if self.q.scoped or char else ():
            if self.q.scoped:
                group = r["g"]
            else:  # char: named as the scan spelled it, padding is not significant
                group = spelling.get(equality_key(r["k"], char_semantics=True), r["k"])
            block, offset = r["tid"]
            where = heap_position(r["rel"], block, offset)
            survivor_at = tuple(r["survivor_tid"])
            entries.append(Entry(where, r["pk"], group, r["survivor"], r["k"], survivor_at))
        seen = set(map(_group_of, entries))
        return entries, [k for k in keys if k not in seen]

    async def _decide_retried(
        self, key: str, g: _Progress
    ) -> tuple[Row | None, DiskList[Entry]] | None:
        """`_decide` with the retries of a batch; None when the group was skipped instead."""
        found: list[tuple[Row | None, DiskList[Entry]]] = []

        async def decide(found: list[tuple[Row | None, DiskList[Entry]]] = found) -> list[str]:
            found.append(await self._decide(key, g))
            return []

        await self._with_retries([key], {key: g}, decide)
        return None if g.skipped or not found else found[-1]

    async def _decide_giant(
        self, key: str, g: _Progress, sink: Callable[[list[Entry]], None]
    ) -> None:
        if (decision := await self._decide_retried(key, g)) is None:
            return
        survivor, losers = decision
        try:
            if survivor is None or not losers:
                self.stats.skip("no_longer_duplicate", max(g.count - 1, 0))
            else:
                log.info("giant group", key=key[:80], losers=len(losers), survivor=str(survivor.pk))
                while entries := losers.take(LOSERS_PREFETCH):
                    sink(entries)
        finally:
            losers.close()
        self.stats.groups_done += 1

    async def rename_entries(self, entries: list[Entry]) -> ChunkResult:
        """One chunk of a heap-order sweep, retried as the error's class says.

        Contention (a lock timeout behind a row the application holds, a deadlock, a row
        changed under the batch) is retried once here; if it persists, the chunk's groups are
        handed back to be decided again in key order after the sweep (`redo`), where a hot
        group gets every retry of an ordinary batch: one held group must not stall worker
        after worker, as its losers are spread over several chunks. A chunk failing for a
        reason of one of its rows (a trigger's error) is cut in two, and so on down to the
        group at fault, which alone is skipped, on record with its reason."""
        attempt = 0
        while True:
            try:
                return await self._entries_once(entries)
            except Stopping:
                raise
            except RETRY_OR_FAIL as exc:
                error: BaseException = exc
                verdict = STALE if isinstance(exc, StaleBatch) else classify(exc)
            if verdict.action is Action.FATAL:
                raise from_driver(error, what="batch transaction") from error
            if verdict.action is not Action.SKIP_GROUP:
                attempt += 1
                self.stats.retries += 1
                self.sizer.failed()
                lost = isinstance(error, CONNECTION_LOST)
                if attempt <= (self.max_retries if lost else min(self.max_retries, 1)):
                    delay = await retry.wait(attempt, retry.BATCH)
                    log.debug(
                        "batch retry",
                        attempt=attempt,
                        error=type(error).__name__,
                        reason=verdict.reason,
                        delay=delay,
                        chunk=len(entries),
                    )
                    continue
                if lost:
                    raise self._connection_lost(error, attempt) from error
                groups = {e.group for e in entries}
                log.info(
                    "chunk left for key order",
                    groups=len(groups),
                    error=type(error).__name__,
                    reason=verdict.reason,
                )
                return ChunkResult(0, groups, 0, [])
            groups = {e.group for e in entries}
            if len(groups) > 1:
                half = len(entries) // 2
                first = await self.rename_entries(entries[:half])
                second = await self.rename_entries(entries[half:])
                return ChunkResult(
                    first.renamed + second.renamed,
                    first.redo | second.redo,
                    first.gone + second.gone,
                    first.unplaceable + second.unplaceable,
                )
            (key,) = groups
            detail = f"{type(error).__name__}: {error}"
            if await self.skips.record(key, verdict.reason, len(entries), detail):
                self.stats.skipped_groups += 1
            self.stats.skip(verdict.reason, len(entries))
            log.warning("group skipped", reason=verdict.reason, rows=len(entries), error=detail)
            return ChunkResult(0, set(), 0, [])

    def _connection_lost(self, error: BaseException, attempt: int) -> ConnectError:
        # The server is gone, not one hot key: splitting the batch and skipping group after
        # group (each after its own retries) would only take hours.
        resume = f"resume with --run-id {self.run_id}" if self.apply else "run again"
        return ConnectError(
            f"lost the connection to the server ({type(error).__name__}: {error}) "
            f"and {attempt} attempts failed; every committed batch is whole and "
            f"audited: {resume} once the server is back"
        )

    def _rename_args(self, renames: list[Rename]) -> tuple[Any, ...]:
        return (
            [r.pk for r in renames],
            [r.old for r in renames],
            [r.new for r in renames],
            self.run_id,
            [r.survivor_pk for r in renames],
            [r.old for r in renames],
            [r.group for r in renames],
        )

    @staticmethod
    def _hand_back(renames: list[Rename], places: set[int], redo: set[str]) -> list[Rename]:
        """The renames but those at `places` (1-based), whose groups go to `redo`."""
        redo |= {r.group for i, r in enumerate(renames, 1) if i in places}
        return [r for i, r in enumerate(renames, 1) if i not in places]

    async def _rename_some(self, conn: Conn, renames: list[Rename]) -> set[int]:
        """The chunk's UPDATE with its audit rows: the places (1-based) of the renames it did
        not make. On a table that is not partitioned, rows and survivors are found by heap
        position."""
        if not renames:
            return set()
        # the columns, transposed in C: a million renames at 20M rows
        pks, olds, news, survivors, groups, ats, survivor_ats = zip(*renames, strict=True)
        if self.q.by_position and None not in ats and None not in survivor_ats:
            # each array one text literal (literals.py: asyncpg's array encoding was a quarter
            # of the tool's CPU while renaming)
            pk_array = value_array if self.q.literal_pk else list
            left_alone = await conn.fetchval(
                self.q.apply_renames_at,
                tid_array(ats),
                pk_array(pks),
                text_array(olds),
                text_array(news),
                tid_array(survivor_ats),
                pk_array(survivors),
                self.run_id,
                *((text_array(groups),) if self.q.scoped else ()),
            )
            return set(left_alone or ())
        rows = await conn.fetch(self.q.apply_renames_returning, *self._rename_args(renames))
        made = {r["i"] for r in rows}
        return {i for i in range(1, len(renames) + 1) if i not in made}

    # --- a giant group: more losers than one batch --------------------------------------

    def _is_giant(self, g: _Progress) -> bool:
        return g.count - 1 > max(self.sizer.size, GIANT_GROUP_MIN_LOSERS)

    async def _work_off(self, key: str, g: _Progress) -> None:
        """A group larger than a batch, in O(its rows) in all and flat memory: its survivor is
        decided once (by --keep order) and its losers streamed to a file, then renamed in chunks
        of the batch size, each one short transaction under the key's advisory lock that re-reads
        only its own rows by primary key, with the survivor check of every batch. A pass after
        that picks up rows that joined the group meanwhile (at most MAX_GROUP_PASSES passes);
        a survivor the application deleted or re-keyed starts a pass over what is left.

        An interrupted run's checkpoint has not passed the group: a resume finds it again with
        only its unrenamed rows, keeps the same survivor and goes on from there."""
        for n in range(MAX_GROUP_PASSES):
            if self.before_batch is not None:
                await self.before_batch()
            if (decision := await self._decide_retried(key, g)) is None:
                return
            survivor, losers = decision
            try:
                if survivor is None or not losers:
                    if n == 0:
                        # gone or single since the scan (rows unplaceable in a pass count there)
                        self.stats.skip("no_longer_duplicate", max(g.count - 1, 0))
                    break
                g.count = 1 + len(losers) + len(g.decided)
                log.info("giant group", key=key[:80], losers=len(losers), survivor=str(survivor.pk))
                await self._chunks(key, g, survivor, losers)
            finally:
                losers.close()
            if g.skipped or not self.apply:
                return  # a dry run plans each loser once
        else:
            log.warning(
                "rows kept joining a giant group while it was renamed; enforce converges on "
                "the rest",
                key=key[:80],
                passes=MAX_GROUP_PASSES,
            )
        self.stats.groups_done += 1

    async def _decide(self, key: str, g: _Progress) -> tuple[Row | None, DiskList[Entry]]:
        """The group's survivor and its other rows (on disk), from one snapshot; no lock: each
        chunk re-checks both under the key's lock."""
        losers: DiskList[Entry] = DiskList(directory=self.spool_dir)
        try:
            async with (
                self.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                await self._set_local(conn)
                first = await conn.fetchrow(self.q.group_survivor, key)
                if first is None:
                    return None, losers
                async for r in conn.cursor(
                    self.q.group_losers, key, first["pk"], prefetch=LOSERS_PREFETCH
                ):
                    if r["pk"] not in g.decided:
                        losers.append(entry_of(r, key, first["pk"], tuple(first["tid"])))
        except BaseException:
            losers.close()
            raise
        return Row(first["pk"], first["k"]), losers

    async def _chunks(self, key: str, g: _Progress, survivor: Row, losers: DiskList[Entry]) -> None:
        """Rename the listed losers, a batch-size chunk a transaction, until the list ends, the
        group is skipped or its survivor no longer holds the value."""
        while not g.skipped:
            entries = losers.take(self.sizer.size)
            if not entries:
                return
            outcome: list[ChunkResult] = []

            async def once(
                entries: list[Entry] = entries, outcome: list[ChunkResult] = outcome
            ) -> list[str]:
                outcome.append(await self._entries_once(entries))
                return []

            await self._with_retries([key], {key: g}, once)
            if not outcome:
                continue  # skipped (g.skipped) or given up: the loop says which
            result = outcome[-1]
            for _, row in result.unplaceable:
                self._unplaceable(key, g, row)
            g.count = max(g.count - result.renamed, 1)
            if result.redo:
                return  # the survivor is gone: the next pass decides again

    # --- the chunk transaction: decided renames, re-checked under their groups' locks -------

    async def _entries_once(self, entries: list[Entry]) -> ChunkResult:
        """One transaction over decided renames of any groups (a giant group's chunk; a chunk
        of a heap-order sweep): the groups' advisory locks (shared: see lock_keys_shared) in
        hash order, then the renames, each made only where its row still holds the value, its
        survivor too and the new value is free — checked by the UPDATE itself, with the audit
        rows in the same statement. Renames it could not make hand their groups back (`redo`).
        A dry run, and a char(n) key, read the rows first (read_entries)."""
        if self.before_batch is not None:
            await self.before_batch()
        started = anyio.current_time()
        async with self.pool.acquire() as conn, conn.transaction(readonly=not self.apply):
            await self._set_local(conn)
            redo: set[str] = set()
            plans: dict[str, tuple[Row, list[Row]]] = {}
            keys = list(set(map(_group_of, entries)))
            if self.apply and not self.target.key_is_char:
                # No re-read: the UPDATE itself renames a row only if it still holds the value,
                # its survivor too and the new value is free; the rows it leaves go back to be
                # decided again under lock. (A char(n) key is re-read: its padding may differ
                # from the decision's, and the audit keeps the exact bytes.)
                renames, unplaceable = self._first_candidates(entries)
                scoped = (text_array([r.group for r in renames]),) if self.q.scoped else ()
                refused = await conn.fetchval(
                    self.q.lock_chunk,
                    text_array(keys),
                    self.target.lock_prefix,
                    text_array([r.new for r in renames]),
                    *scoped,
                )
                if refused:  # another session asks for that value now
                    renames = self._hand_back(renames, set(refused), redo)
                if renames:
                    left_alone = await self._rename_some(conn, renames)
                    if left_alone:
                        renames = self._hand_back(renames, left_alone, redo)
                gone = 0
            else:
                if self.apply:
                    await conn.fetch(self.q.lock_keys_shared, keys, self.target.lock_prefix)
                rows = await conn.fetch(
                    self.q.read_entries,
                    [e.pk for e in entries],
                    [e.group for e in entries],
                    [e.survivor for e in entries],
                )
                for r in rows:
                    e = entries[r["i"] - 1]
                    if not r["survivor"]:
                        redo.add(e.group)
                    elif e.group not in redo:
                        plan = plans.setdefault(e.group, (Row(e.survivor, r["k"]), []))
                        plan[1].append(Row(e.pk, r["k"]))
                gone = len(entries) - len(rows)
                current = [
                    GroupPlan(key, survivor, tuple(losers), 0)
                    for key, (survivor, losers) in plans.items()
                    if key not in redo
                ]
                renames, unplaceable = await self._assign(conn, current)
                if self.apply and renames:
                    await self._rename(conn, renames)
        if unplaceable:
            log.warning(
                "rows left unrenamed: no candidate value fits the column",
                pks=[str(r.pk) for _, r in unplaceable[:10]],
                max_length=self.target.key_max_length,
            )
        seconds = anyio.current_time() - started
        self.sizer.observe(len(renames), seconds)
        self.stats.batch_seconds.append(seconds)
        self.stats.batch_size = self.sizer.size
        self.stats.batches += 1
        self.stats.renamed += len(renames)
        if self.plan is not None and renames:
            for key, mine in _by_key(renames).items():
                self.plan.write(key, mine)
        if self.sample is not None and len(self.sample) < self.sample_size:
            self.sample.extend(renames[: self.sample_size - len(self.sample)])
        return ChunkResult(len(renames), redo, gone, unplaceable)

    def _unplaceable(self, key: str, g: _Progress, row: Row) -> None:
        # decided for good: never picked again, so the group's next transaction moves on
        if not isinstance(g.decided, set):
            g.decided = set(g.decided)
        g.decided.add(row.pk)
        g.unplaceable += 1
        if len(g.examples) < 5:
            g.examples += (str(row.pk),)

    def _first_candidates(self, entries: list[Entry]) -> tuple[list[Rename], list[tuple[str, Row]]]:
        """Each loser's first candidate that fits the column and no other loser of the chunk
        gets; whether it is free is for the UPDATE to say (a taken one goes back to a key-order
        batch, which tries the next ones). In heap order, as the entries come: the UPDATE
        visits their pages in that order. The first candidate is rendered once, and the
        candidates' generator walked only when it does not do (a million renames at 20M
        rows: this is the sweep's own loop)."""
        t = self.target
        template, max_length, composite = self.template, t.key_max_length, t.composite_pk
        # the default template by an f-string: str.format parses the template and builds its
        # keyword arguments each call, 0.67 against 0.14 µs (f"{x}" formats x as format does)
        default = template == DEFAULT_TEMPLATE
        used: set[str] = set()
        renames: list[Rename] = []
        unplaceable: list[tuple[str, Row]] = []
        for position, pk, group, survivor, value, survivor_at in entries:
            label = pk_label(pk, composite=True, without=t.key_in_pk) if composite else pk
            first = f"{value}-{label}" if default else template.format(value=value, pk=label)
            if (
                first
                and first != value
                and (max_length is None or len(first) <= max_length)
                and first not in used
            ):
                chosen: str | None = first
            else:
                gen = candidates(template, value, label, max_length)
                chosen = next((c for c in gen if c not in used), None)
            if chosen is None:
                unplaceable.append((group, Row(pk, value)))
                continue
            used.add(chosen)
            at = ((position >> 16) & 0xFFFFFFFF, position & 0xFFFF)  # Entry.at, inline
            renames.append(new_rename((pk, value, chosen, survivor, group, at, survivor_at)))
        return renames, unplaceable

    async def _assign(
        self, conn: Conn, plans: list[GroupPlan]
    ) -> tuple[list[Rename], list[tuple[str, Row]]]:
        """Give every loser a new value that no row holds, that no other row of this batch
        gets, and (on --apply) whose advisory lock we could take, so concurrent workers never
        pick the same value."""
        t = self.target
        gens = {}
        owner: dict[Any, tuple[Row, Any, str]] = {}
        for p in plans:
            for row in p.losers:
                gens[row.pk] = candidates(
                    self.template,
                    row.value,
                    pk_label(row.pk, composite=t.composite_pk, without=t.key_in_pk),
                    t.key_max_length,
                    char_semantics=t.key_is_char,
                )
                owner[row.pk] = (row, p.survivor.pk, p.key)
        chosen: dict[Any, str] = {}
        used: set[str] = set()
        unplaceable: list[Any] = []
        pending = list(gens)
        for _ in range(MAX_CANDIDATE_ROUNDS):
            if not pending:
                break
            asking: dict[Any, str] = {}  # pk -> the candidate asked for it
            asked: set[str] = set()
            for pk in pending:
                for c in gens[pk]:
                    if c not in used and c not in asked:
                        asking[pk] = c
                        asked.add(c)
                        break
                else:
                    unplaceable.append(pk)
            if not asking:
                pending = []
                break
            checked = await conn.fetch(
                self.q.check_candidates,
                list(asking.values()),
                t.lock_prefix,
                self.apply,
                [owner[pk][2] for pk in asking],
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
        unplaceable += pending
        renames = [
            Rename(pk, owner[pk][0].value, new, owner[pk][1], owner[pk][2])
            for pk, new in chosen.items()
        ]
        return renames, [(owner[pk][2], owner[pk][0]) for pk in unplaceable]


def _by_key(renames: list[Rename]) -> dict[str, list[Rename]]:
    out: dict[str, list[Rename]] = {}
    for r in renames:
        out.setdefault(r.group, []).append(r)
    return out


def _count_by_key(renames: list[Rename]) -> dict[str, int]:
    return {k: len(v) for k, v in _by_key(renames).items()}
