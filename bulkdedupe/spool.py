"""A FIFO between the scanner and the bounded worker stream that keeps a few items in memory
and the rest in a temporary file, so the scan can run ahead of the workers with flat memory.

Why: once workers start renaming, every page they touch loses its all-visible bit, and the
scan's index-only pages turn into random heap reads. A scan that finishes early reads the index
while the visibility map is still intact; the spool is what lets it run ahead.
"""

from __future__ import annotations

import bisect
import pickle
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from typing import IO, Any, Generic, TypeVar

import anyio
import structlog

from .errors import BulkDedupeError

log = structlog.get_logger(__name__)

T = TypeVar("T")

_LEN = struct.Struct("<I")

# What the spool leaves free on its file system: it waits (backpressure on the scan) rather
# than fill the disk. No other cap: at 500M rows a scan may spool 25M groups (~1.5 GB), and a
# fixed cap would make the scan wait on the renames exactly when that hurts most. 1 GiB, or a
# tenth of a small file system.
DEFAULT_RESERVE = 1 << 30


def reserve_for(directory: str | None) -> int:
    return min(DEFAULT_RESERVE, shutil.disk_usage(spool_directory(directory)).total // 10)


_RECHECK_BYTES = 8 << 20  # free space is looked at again after this much is written


def spool_directory(directory: str | None) -> str:
    return directory if directory is not None else tempfile.gettempdir()


def free_bytes(directory: str | None) -> int:
    return shutil.disk_usage(spool_directory(directory)).free


def check_room(directory: str | None, reserve: int | None = None) -> None:
    """Refuse up front, before any change, when the spool's file system has less free space
    than the spool keeps free (it could not spool a single group)."""
    where = spool_directory(directory)
    try:
        free = free_bytes(directory)
        reserve = reserve_for(directory) if reserve is None else reserve
    except OSError as exc:
        raise BulkDedupeError(
            f"the spool directory {where} cannot be used ({exc}); set TMPDIR to a writable "
            "directory with free space"
        ) from exc
    if free < reserve:
        raise BulkDedupeError(
            f"the spool directory {where} has {free / 2**20:,.0f} MiB free, less than the "
            f"{reserve / 2**20:,.0f} MiB bulkdedupe leaves free on it; free some space or set "
            "TMPDIR to a file system with room (about 60 bytes per duplicate group)"
        )


class Spool(Generic[T]):
    """put() never blocks until the items waiting on disk reach `max_bytes` (None: no cap) or
    the file system's free space falls to `reserve_bytes`; get() returns None once closed and
    drained. One producer side, any number of consumers (all in one event loop)."""

    def __init__(
        self,
        *,
        memory_items: int = 64,
        max_bytes: int | None = None,
        reserve_bytes: int | None = None,
        directory: str | None = None,
    ) -> None:
        self.memory_items = memory_items
        self.max_bytes = max_bytes
        self._reserve = reserve_bytes  # None: reserve_for(directory), looked up when needed
        self.directory = directory
        self._free_at: int | None = None  # _write_pos when free space was last looked at
        self.disk_waits = 0  # times put() waited for disk room
        self._mem: deque[T] = deque()
        self._file: IO[bytes] | None = None
        self._write_pos = 0
        self._read_pos = 0
        self._on_disk = 0
        self._closed = False
        self._changed = anyio.Event()
        self.peak_disk_bytes = 0

    def __len__(self) -> int:
        return len(self._mem) + self._on_disk

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def put(self, item: T) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")
        while self._on_disk and self._full():
            if not self.disk_waits:
                log.warning(
                    "spool waits for disk room: the scan pauses until the renames catch up",
                    directory=spool_directory(self.directory),
                    reserve_mib=self.reserve_bytes >> 20,
                )
            self.disk_waits += 1
            await self._changed.wait()  # the disk budget is spent: backpressure
        if not self._on_disk and len(self._mem) < self.memory_items:
            self._mem.append(item)
        else:
            if self._file is None:
                # closed by discard(); lives as long as the run
                self._file = tempfile.TemporaryFile(prefix="bulkdedupe-spool-", dir=self.directory)  # noqa: SIM115
            data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            self._file.seek(self._write_pos)
            self._file.write(_LEN.pack(len(data)) + data)
            self._write_pos += _LEN.size + len(data)
            self._on_disk += 1
            self.peak_disk_bytes = max(self.peak_disk_bytes, self._write_pos - self._read_pos)
        self._notify()

    @property
    def reserve_bytes(self) -> int:
        if self._reserve is None:
            self._reserve = reserve_for(self.directory)
        return self._reserve

    def _full(self) -> bool:
        waiting = self._write_pos - self._read_pos
        if self.max_bytes is not None and waiting >= self.max_bytes:
            return True
        if self._free_at is not None and self._write_pos - self._free_at < _RECHECK_BYTES:
            return False
        self._free_at = self._write_pos
        if free_bytes(self.directory) >= self.reserve_bytes:
            return False
        self._free_at = None  # look again on the next put, once a get made room
        return True

    def _read_one(self) -> T:
        assert self._file is not None
        self._file.seek(self._read_pos)
        (n,) = _LEN.unpack(self._file.read(_LEN.size))
        item: T = pickle.loads(self._file.read(n))  # noqa: S301 - our own file, our own objects
        self._read_pos += _LEN.size + n
        self._on_disk -= 1
        if not self._on_disk:
            # drained: start the file over so it never grows past what is waiting
            self._file.truncate(0)
            self._write_pos = self._read_pos = 0
            self._free_at = None
        return item

    async def get(self) -> T | None:
        while True:
            if self._mem:
                item = self._mem.popleft()
            elif self._on_disk:
                item = self._read_one()
            elif self._closed:
                self._release()
                return None
            else:
                await self._changed.wait()
                continue
            self._notify()
            return item

    def close(self) -> None:
        """No more items will be put; consumers drain what is there."""
        self._closed = True
        self._notify()

    def discard(self) -> None:
        """Drop everything (stop requested) and release the file."""
        self._mem.clear()
        self._on_disk = 0
        self._closed = True
        self._release()
        self._notify()

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DiskList(Generic[T]):
    """Items appended once, then taken in the same order, a few at a time; everything but the
    current record lives in a temporary file (a giant group's losers: a million primary keys
    must not be held in memory). Appends are pickled in records of `record_items`."""

    def __init__(self, *, record_items: int = 1000, directory: str | None = None) -> None:
        self.record_items = record_items
        self.directory = directory
        self._buffer: list[T] = []
        self._file: IO[bytes] | None = None
        self._read_pos = 0
        self._reading: deque[T] = deque()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, item: T) -> None:
        self._buffer.append(item)
        self.count += 1
        if len(self._buffer) >= self.record_items:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._file is None:
            # closed by close(); lives as long as one group's work-off
            self._file = tempfile.TemporaryFile(prefix="bulkdedupe-losers-", dir=self.directory)  # noqa: SIM115
        data = pickle.dumps(self._buffer, protocol=pickle.HIGHEST_PROTOCOL)
        self._file.seek(0, 2)
        self._file.write(_LEN.pack(len(data)) + data)
        self._buffer = []

    def take(self, n: int) -> list[T]:
        """The next `n` items (fewer at the end; [] once all were taken)."""
        out: list[T] = []
        while len(out) < n:
            if not self._reading and not self._load():
                break
            while self._reading and len(out) < n:
                out.append(self._reading.popleft())
        return out

    def _load(self) -> bool:
        if self._file is not None:
            self._file.seek(self._read_pos)
            head = self._file.read(_LEN.size)
            if head:
                (n,) = _LEN.unpack(head)
                self._reading.extend(pickle.loads(self._file.read(n)))  # noqa: S301 - our own file
                self._read_pos += _LEN.size + n
                return True
        if self._buffer:  # the last, partial record never went to disk
            self._reading.extend(self._buffer)
            self._buffer = []
            return True
        return False

    def close(self) -> None:
        self._buffer = []
        self._reading.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


class ExternalSort(Generic[T]):
    """Items added in any order, then taken in sorted order, a few at a time, in flat memory:
    every `run_items` added are sorted and written to a temporary file of their own (a run),
    and taking merges the runs a block at a time (`_merge`: one record of each run in memory at
    a time). The renames of a heap-order sweep: a million at 20M rows, ~25M at 500M."""

    def __init__(
        self,
        *,
        run_items: int = 200_000,
        # what the merge holds of each run at a time: 500 entries x ~300 bytes x 125 runs (25M
        # renames, a 500M-row table) ≈ 19 MB, besides the one run sorted in memory (~60 MB)
        record_items: int = 500,
        directory: str | None = None,
        key: Callable[[T], Any] | None = None,
        rebuild: Callable[[tuple[Any, ...]], T] | None = None,
    ) -> None:
        self.run_items = run_items
        # what to sort by (as list.sort's key): an int compares faster than a tuple's fields
        self.key = key
        # items that are tuples (NamedTuples): written as plain tuples and rebuilt from them on
        # reading, so neither pickle calls a Python-level method per item (a NamedTuple's
        # __getnewargs__, its __new__): pickling stays in C
        self.rebuild = rebuild
        self.record_items = record_items
        self.directory = directory
        self._buffer: list[T] = []
        self._runs: list[IO[bytes]] = []
        self._merged: Iterator[list[T]] | None = None
        self._block: list[T] = []  # what the merge gave and `take` has not yet handed out
        self._at = 0  # where in it the next take starts
        self.count = 0
        self.disk_bytes = 0

    def __len__(self) -> int:
        return self.count

    def add(self, item: T) -> None:
        if self._merged is not None:
            raise RuntimeError("items cannot be added once taking has started")
        self._buffer.append(item)
        self.count += 1
        if len(self._buffer) >= self.run_items:
            self._spill()

    def add_many(self, items: list[T]) -> None:
        """`add` each of them (a run may hold up to len(items) - 1 more than run_items)."""
        if self._merged is not None:
            raise RuntimeError("items cannot be added once taking has started")
        self._buffer.extend(items)
        self.count += len(items)
        if len(self._buffer) >= self.run_items:
            self._spill()

    def _spill(self) -> None:
        self._buffer.sort(key=self.key)
        # closed by close(); lives until the sweep has taken every item
        fh = tempfile.TemporaryFile(prefix="bulkdedupe-sort-", dir=self.directory)  # noqa: SIM115
        plain = self.rebuild is not None
        for i in range(0, len(self._buffer), self.record_items):
            record: list[Any] = self._buffer[i : i + self.record_items]
            if plain:
                record = list(map(tuple, record))
            data = pickle.dumps(record, pickle.HIGHEST_PROTOCOL)
            fh.write(_LEN.pack(len(data)) + data)
            self.disk_bytes += _LEN.size + len(data)
        fh.flush()
        self._runs.append(fh)
        self._buffer = []

    def _read(self, fh: IO[bytes]) -> Iterator[list[T]]:
        """A run's records (lists of items, sorted), one at a time."""
        pos = 0
        while True:
            fh.seek(pos)  # runs share nothing, but each read seeks: merge interleaves them
            head = fh.read(_LEN.size)
            if not head:
                return
            (n,) = _LEN.unpack(head)
            records: list[Any] = pickle.loads(fh.read(n))  # noqa: S301 - our own file
            pos += _LEN.size + n
            if records:
                yield records if self.rebuild is None else list(map(self.rebuild, records))

    def _merge(self, runs: list[Iterator[list[T]]]) -> Iterator[list[T]]:
        """The runs merged, a block of items at a time, in sorted order. Each step takes from
        every run's current record the items up to the smallest of those records' last items,
        the bound (none of the records still to come can hold a smaller one), and sorts those
        below it in one C call: at least one whole record a step, and no Python-level
        comparison per item (heapq.merge made one, and was a tenth of the tool's CPU at 20M
        rows). Items that compare equal keep the order of their runs, as heapq.merge kept it:
        list.sort is stable for those below the bound, and the bound's own ties are taken run
        after run, each run's to its last one (which may lie in its next records)."""
        key = self.key
        heads: list[tuple[list[T], Iterator[list[T]]]] = []  # (what is left of a record, run)
        for run in runs:
            if (first := next(run, None)) is not None:
                heads.append((first, run))
        while len(heads) > 1:
            bound = min(
                (key(r[-1]) for r, _ in heads) if key is not None else (r[-1] for r, _ in heads)
            )
            below: list[T] = []
            ties: list[T] = []
            left: list[tuple[list[T], Iterator[list[T]]]] = []
            for record, run in heads:
                lo = bisect.bisect_left(record, bound, key=key)
                hi = bisect.bisect_right(record, bound, lo=lo, key=key)
                below += record[:lo]
                ties += record[lo:hi]
                rest: list[T] | None = record[hi:]
                while not rest:  # the record ended at the bound: its run's next ones may too
                    if (rest := next(run, None)) is None:
                        break
                    hi = bisect.bisect_right(rest, bound, key=key)
                    ties += rest[:hi]
                    rest = rest[hi:]
                if rest:
                    left.append((rest, run))
            below.sort(key=key)
            yield below + ties
            heads = left
        for record, run in heads:  # the last run: already in order
            yield record
            yield from run

    def _start(self) -> Iterator[list[T]]:
        if not self._runs:
            self._buffer.sort(key=self.key)
            items, self._buffer = self._buffer, []
            return iter([items])
        if self._buffer:
            self._spill()
        return self._merge([self._read(fh) for fh in self._runs])

    def take(self, n: int) -> list[T]:
        """The next `n` items in sorted order (fewer at the end; [] once all were taken)."""
        if self._merged is None:
            self._merged = self._start()
        out: list[T] = []
        while len(out) < n:
            if self._at >= len(self._block):
                block = next(self._merged, None)
                if block is None:
                    break
                self._block, self._at = block, 0
            end = self._at + n - len(out)
            out += self._block[self._at : end]
            self._at = min(end, len(self._block))
        return out

    def close(self) -> None:
        self._buffer = []
        self._merged = None
        self._block, self._at = [], 0
        for fh in self._runs:
            fh.close()
        self._runs = []
