"""Heap-order renames (`run --apply --order heap`, the default): decide every group in key
order as the scan finds it, rename in the order the rows lie in the heap.

Why: a rename dirties the row's heap page and a leaf of every index, and the first change to
a page after each checkpoint writes the whole page to the WAL (a full-page image). Renamed
in key order, the rows of consecutive groups lie on pages all over the table, so every
checkpoint cycle of a long run images most of the heap and the primary key's index again.
Sorted by heap position (partition, then ctid) each heap page, and the primary key's leaves
when the key grows with the table as a serial does, is imaged about once in the whole run.

How, in three steps:
1. `Worker.decide`: while the scan runs, each work item's groups are read (no lock, no write)
   and each loser becomes an `Entry` (where it lies, its primary key, its group, the survivor
   that keeps the value), added to an external sort on disk: flat memory at any size.
2. `Sweep.rename`: the sorted entries are cut into chunks of the sizer's batch size, each one
   transaction (`Worker.rename_entries`: the giant groups' chunk transaction) that takes its
   groups' advisory locks in hash order, re-reads its rows by primary key, and renames those
   still in their group whose survivor still holds the value, with the audit rows.
3. Groups whose survivor the application deleted or re-keyed in between, and the giant groups
   (rows the application added to them meanwhile), are decided again, under their locks, by
   ordinary key-order batches (`Sweep.redo`, `Sweep.giants`). Rows it added to other groups are
   late duplicates, as they are after a key-order batch: for the next run or `enforce`.

The checkpoint moves only when all three are done: an interrupted run is resumed by scanning
again (renamed groups are no longer duplicates; a group half done keeps its survivor).
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from .spool import ExternalSort
from .throttle import Stopping
from .worker import Entry, Worker

log = structlog.get_logger(__name__)


# Entries sorted in memory at a time before a run of them goes to disk (~30 MB of Python
# objects); a 500M-row table's 25M renames make 125 runs, merged one record of each at a time.
SORT_RUN_ITEMS = 200_000


def heap_position(e: Entry) -> int:
    """Where the entry's row lies as one int (partition oid, block, line pointer: 32, 32 and 16
    bits), the sort's key: ints compare several times faster than tuples' fields (0.6 s for
    each run of 200k, a tenth of the tool's CPU at 5M rows, was the tuples' sort)."""
    return (e.rel << 48) | (e.block << 16) | e.offset


class Sweep:
    """The decided renames, sorted on disk, and what the chunks leave for later."""

    def __init__(self, *, directory: str | None = None) -> None:
        self.entries: ExternalSort[Entry] = ExternalSort(
            directory=directory, run_items=SORT_RUN_ITEMS, key=heap_position
        )
        self.redo: set[str] = set()  # groups to decide again (their survivor changed)
        # giant groups (a junk value the application may go on inserting): decided again too
        self.giants: set[str] = set()
        self.gone = 0  # rows the application deleted or moved out of their group meanwhile
        self.unplaceable: dict[str, list[str]] = {}  # group -> pks no new value fits
        self.taken = 0
        self._last: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: Entry) -> None:
        self.entries.add(entry)

    def take(self, n: int) -> list[Entry]:
        """The next `n` entries in heap order (a row decided twice is taken once)."""
        out: list[Entry] = []
        while len(out) < n:
            batch = self.entries.take(n - len(out))
            if not batch:
                break
            for e in batch:
                where = (e.rel, e.block, e.offset)
                if where != self._last:
                    out.append(e)
                    self._last = where
        self.taken += len(out)
        return out

    async def rename(
        self, worker: Worker, limiter: anyio.CapacityLimiter, stop: anyio.Event
    ) -> None:
        """One of the sweep's workers: chunk after chunk, as long as there are entries and the
        run is not stopping. Only as many workers as the limiter allows hold a chunk."""
        while not stop.is_set():
            async with limiter:
                entries = self.take(worker.sizer.size)
                if not entries:
                    return
                try:
                    result = await worker.rename_entries(entries)
                except Stopping:
                    return
            self.redo |= result.redo
            self.gone += result.gone
            for group, row in result.unplaceable:
                self.unplaceable.setdefault(group, []).append(str(row.pk))

    def close(self) -> None:
        self.entries.close()

    def figures(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "sorted_on_disk_bytes": self.entries.disk_bytes,
            "redo_groups": len(self.redo),
            "rows_gone": self.gone,
        }
