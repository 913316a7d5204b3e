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
   groups' advisory locks in hash order and renames, in one UPDATE with the audit rows, the
   rows still in their group whose survivor still holds the value (each row and its survivor
   found by heap position where the table is not partitioned, by primary key where it is).
3. Groups whose survivor the application deleted or re-keyed in between, and the giant groups
   (rows the application added to them meanwhile), are decided again, under their locks, by
   ordinary key-order batches (`Sweep.redo`, `Sweep.giants`). Rows it added to other groups are
   late duplicates, as they are after a key-order batch: for the next run or `enforce`.

The checkpoint moves only when all three are done: an interrupted run is resumed by scanning
again (renamed groups are no longer duplicates; a group half done keeps its survivor).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import anyio
import structlog

from .spool import ExternalSort
from .throttle import Stopping
from .worker import Entry, Worker, new_entry

log = structlog.get_logger(__name__)


# Entries sorted in memory at a time before a run of them goes to disk (~30 MB of Python
# objects); a 500M-row table's 25M renames make 125 runs, merged one record of each at a time.
SORT_RUN_ITEMS = 200_000


class Sweep:
    """The decided renames, sorted on disk, and what the chunks leave for later."""

    def __init__(self, *, directory: str | None = None) -> None:
        # sorted by Entry.position, its first field (itemgetter: no Python call per entry)
        self.entries: ExternalSort[Entry] = ExternalSort(
            directory=directory, run_items=SORT_RUN_ITEMS, key=itemgetter(0), rebuild=new_entry
        )
        self.redo: set[str] = set()  # groups to decide again (their survivor changed)
        # giant groups (a junk value the application may go on inserting): decided again too
        self.giants: set[str] = set()
        self.gone = 0  # rows the application deleted or moved out of their group meanwhile
        self.unplaceable: dict[str, list[str]] = {}  # group -> pks no new value fits
        self.taken = 0
        self._last: int | None = None  # the position of the last entry taken

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: list[Entry]) -> None:
        self.entries.add_many(entries)

    def take(self, n: int) -> list[Entry]:
        """The next `n` entries in heap order (a row decided twice is taken once)."""
        out: list[Entry] = []
        while len(out) < n:
            batch = self.entries.take(n - len(out))
            if not batch:
                break
            for e in batch:
                if e.position != self._last:
                    out.append(e)
                    self._last = e.position
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
