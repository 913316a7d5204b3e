"""The producer: keyset pages over the key's btree index, in one or more key ranges at once,
turned into duplicate groups. Each page is one short autocommit query; memory is bounded by the
page size, never by the table."""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
import structlog

from . import retry, sql
from .catalog import Target
from .db import CONNECTION_LOST, Conn
from .errors import BulkDedupeError

log = structlog.get_logger(__name__)

MIN_PAGE_SIZE = 100
PAGE_RETRIES = 5


@dataclass(frozen=True, slots=True)
class Group:
    """A key held by more than one row when the scan saw it (the count may be stale)."""

    key: str
    count: int

    def __reduce__(self) -> tuple[type[Group], tuple[str, int]]:
        # spooled by the hundred thousand: the dataclass default pickles via fields(), slowly
        return (Group, (self.key, self.count))


class LargestGroups:
    """The `top` largest groups seen so far (a heap of `top` entries: flat memory)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self._heap: list[tuple[int, str]] = []

    def add(self, groups: list[Group]) -> None:
        if not self.top:
            return
        for g in groups:
            item = (g.count, g.key)
            if len(self._heap) < self.top:
                heapq.heappush(self._heap, item)
            elif item > self._heap[0]:
                heapq.heapreplace(self._heap, item)

    def largest(self) -> tuple[tuple[str, int], ...]:
        """(value, rows), largest first (ties by value)."""
        return tuple((k, n) for n, k in sorted(self._heap, key=lambda t: (-t[0], t[1])))


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys `lo <= k < hi` (None: unbounded), scanned from after `cursor` when resuming."""

    index: int
    lo: str | None
    hi: str | None
    cursor: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "lo": self.lo, "hi": self.hi, "cursor": self.cursor}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRange:
        return cls(index=d["index"], lo=d["lo"], hi=d["hi"], cursor=d.get("cursor"))


@dataclass(frozen=True, slots=True)
class Page:
    """One page's duplicate groups; `last_key`: every key up to it has been read (the
    checkpoint a finished page allows; None: no further than before)."""

    range_index: int
    groups: list[Group]
    last_key: str | None
    rows_read: int
    seconds: float


async def plan_ranges(conn: Conn, target: Target, scanners: int) -> list[KeyRange]:
    """Split the key space into `scanners` ranges of about equal size, from the planner's
    histogram (no table read). Without statistics, one range; with --scope, one range (the
    keyset is over the scan index's leading columns, which have no histogram together)."""
    if scanners <= 1 or target.scope:
        return [KeyRange(0, None, None)]
    bounds = await conn.fetchval(sql.HISTOGRAM_BOUNDS, target.schema, target.table, target.key)
    if not bounds or len(bounds) < scanners + 1:
        return [KeyRange(0, None, None)]
    step = (len(bounds) - 1) / scanners
    # The bounds come sorted by the column's own collation (ANALYZE sorts them so): keep
    # their order, never re-sort them in Python.
    cuts: list[str] = []
    for i in range(1, scanners):
        b = bounds[round(step * i)]
        if not cuts or cuts[-1] != b:
            cuts.append(b)
    edges: list[str | None] = [None, *cuts, None]
    return [KeyRange(i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _page(rows: list[Any], size: int) -> tuple[list[Group], str | None, int, int]:
    """A scan_page's answer: its duplicate groups but the last key's when the page is full
    (that key's run may go on past it), the last key, that key's entries in the page, the
    page's entries."""
    *dups, (_, entries, last) = rows
    groups, in_page = [], 1
    for k, n, _ in dups:
        if entries == size and k == last:
            in_page = n
        else:
            groups.append(Group(k, n))
    return groups, last, in_page, entries


def _scoped_page(rows: list[Any], size: int) -> tuple[list[Group], str | None, int, int | None]:
    """The same of a scoped scan page (row_number() over its entries: `rn` = $3 marks the
    group of the page's last entry); how many entries a short page read, it does not say."""
    groups, last, in_page = [], None, 1
    for k, n, rn in rows:
        if rn == size:
            last, in_page = k, n
        else:
            groups.append(Group(k, n))
    return groups, last, in_page, size if last is not None else None


async def scan_range(
    pool: asyncpg.Pool,
    q: sql.TargetSql,
    rng: KeyRange,
    *,
    page_size: int,
) -> AsyncIterator[Page]:
    """Yield the pages of one key range in key order. A page that hits statement_timeout is
    split (half the size) and retried; connection errors are retried a few times.

    A full page usually ends inside its last key's run of entries: that key is left to the
    next page, which starts at it (inclusive) and so reads it whole, instead of a second
    query counting it (one round trip a page, a thousand at 20M rows). Only a page that holds
    nothing but that one key (a group larger than a page) has it counted by `count_key` and
    skips past it."""
    cursor = rng.cursor  # keys <= cursor are read
    restart: str | None = None  # the next page starts at this key (inclusive)
    size = page_size
    failures = 0
    while True:
        if restart is not None:
            lower: sql.LowerBound = "inclusive"
            bound: str | None = restart
        elif cursor is not None:
            lower, bound = "exclusive", cursor
        elif rng.lo is not None:
            lower, bound = "inclusive", rng.lo
        else:
            lower, bound = "none", None
        query = q.scan_page(lower, rng.hi is not None)
        started = anyio.current_time()
        try:
            rows = await pool.fetch(query, bound, rng.hi, size)
        except asyncpg.QueryCanceledError as exc:
            if size <= MIN_PAGE_SIZE:
                # Never skip the page: the keys in it would silently stay duplicated.
                raise BulkDedupeError(
                    f"a scan page of {size} index entries still ran past statement_timeout "
                    f"({exc}); the table may be locked (ALTER TABLE, VACUUM FULL...) or the "
                    "server overloaded: retry later or raise --statement-timeout"
                ) from exc
            size = max(MIN_PAGE_SIZE, size // 2)
            log.warning("scan page timed out; splitting", range=rng.index, page_size=size)
            continue
        except CONNECTION_LOST:
            failures += 1
            if failures > PAGE_RETRIES:
                raise
            await retry.wait(failures, retry.PAGE, jitter=False)
            continue
        failures = 0
        if q.scoped:
            groups, last, in_page, entries = _scoped_page(rows, size)
        else:
            groups, last, in_page, entries = _page(rows, size)
        full = entries == size and last is not None
        done: str | None  # the checkpoint: every key up to it read and in `groups`
        if full and not q.scoped and in_page < size:
            # the last key's run may go on past the page: read it whole in the next one
            restart = last
            done = groups[-1].key if groups else None
            read = size - in_page
        elif full and last is not None:
            # the page ended in this key's run of entries: count it whole (an index probe)
            n = await pool.fetchval(q.count_key, last)
            if n > 1:
                groups.append(Group(last, n))
            read = size + n - in_page  # the rest of the last key's entries, skipped next
            cursor, restart, done = last, None, last
        else:
            if entries is None:
                entries = await pool.fetchval(q.scan_page_count(lower), bound, rng.hi, size)
            read, done = entries, None
        seconds = anyio.current_time() - started
        yield Page(rng.index, groups, done, read, seconds)
        if not full:
            return
