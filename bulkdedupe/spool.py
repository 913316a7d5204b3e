"""A FIFO between the scanner and the bounded worker stream that keeps a few items in memory
and the rest in a temporary file, so the scan can run ahead of the workers with flat memory.

Why: once workers start renaming, every page they touch loses its all-visible bit, and the
scan's index-only pages turn into random heap reads. A scan that finishes early reads the index
while the visibility map is still intact; the spool is what lets it run ahead.
"""

from __future__ import annotations

import pickle
import struct
import tempfile
from collections import deque
from typing import IO, Generic, TypeVar

import anyio

T = TypeVar("T")

_LEN = struct.Struct("<I")


class Spool(Generic[T]):
    """put() never blocks until `max_bytes` wait on disk; get() returns None once closed and
    drained. One producer side, any number of consumers (all in one event loop)."""

    def __init__(
        self, *, memory_items: int = 64, max_bytes: int = 1 << 30, directory: str | None = None
    ) -> None:
        self.memory_items = memory_items
        self.max_bytes = max_bytes
        self.directory = directory
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
        while self._on_disk and self._write_pos - self._read_pos >= self.max_bytes:
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
