"""The spool between scanner and workers: FIFO across memory and disk, bounded memory."""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.lowlevel
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bulkdedupe import spool as spool_module
from bulkdedupe.errors import BulkDedupeError
from bulkdedupe.spool import DiskList, ExternalSort, Spool
from bulkdedupe.worker import Entry, heap_position, new_entry

T = TypeVar("T")

pytestmark = pytest.mark.anyio


@settings(max_examples=50, deadline=None)
@given(
    items=st.lists(st.text(max_size=20), max_size=200), mem=st.integers(min_value=1, max_value=8)
)
def test_fifo_order_across_memory_and_disk(items: list[str], mem: int) -> None:
    async def go() -> list[str]:
        spool: Spool[str] = Spool(memory_items=mem)
        out: list[str] = []
        # interleave puts and gets so items move between memory and the file
        for i, item in enumerate(items):
            await spool.put(item)
            assert len(spool._mem) <= mem  # memory stays bounded whatever is queued
            if i % 3 == 2:
                got = await spool.get()
                assert got is not None
                out.append(got)
        spool.close()
        while (got := await spool.get()) is not None:
            out.append(got)
        spool.discard()
        return out

    assert anyio.run(go) == items


async def test_consumer_waits_for_producer_and_ends_on_close() -> None:
    spool: Spool[int] = Spool(memory_items=2)
    received: list[int] = []

    async def consume() -> None:
        while (item := await spool.get()) is not None:
            received.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for i in range(10):
            await spool.put(i)
            await anyio.lowlevel.checkpoint()
        spool.close()
    assert received == list(range(10))
    assert spool.peak_disk_bytes >= 0


async def test_disk_budget_applies_backpressure() -> None:
    spool: Spool[bytes] = Spool(memory_items=1, max_bytes=2_000)
    await spool.put(b"x")  # in memory
    await spool.put(b"y" * 1_500)  # on disk, within budget
    await spool.put(b"z" * 1_500)  # over budget afterwards: allowed, the budget was not spent
    with anyio.move_on_after(0.2) as scope:
        await spool.put(b"w")  # the budget is spent: waits for a consumer
    assert scope.cancelled_caught
    assert await spool.get() == b"x"
    assert await spool.get() == b"y" * 1_500
    with anyio.fail_after(5):
        await spool.put(b"w")  # room again
    spool.close()
    assert [await spool.get(), await spool.get(), await spool.get()] == [b"z" * 1_500, b"w", None]


def test_disk_list_returns_every_item_once_in_order_across_records(tmp_path: Path) -> None:
    items: DiskList[int] = DiskList(record_items=7, directory=str(tmp_path))
    for i in range(100):
        items.append(i)
    assert len(items) == 100
    assert len(items._buffer) == 2  # 14 full records went to disk; the last 2 items not yet
    taken: list[int] = []
    for n in (1, 6, 7, 30, 100):
        chunk = items.take(n)
        assert len(chunk) == min(n, 100 - len(taken))
        taken += chunk
    assert taken == list(range(100))
    assert items.take(5) == []
    items.close()
    assert items.take(5) == []


def test_disk_list_holds_only_one_record_in_memory() -> None:
    items: DiskList[int] = DiskList(record_items=1000)
    for i in range(25_000):
        items.append(i)
    assert len(items._buffer) == 0  # everything appended so far is on disk
    assert items.take(1500) == list(range(1500))
    assert len(items._reading) == 500  # the rest of the second record, no more
    items.close()


async def test_spool_has_no_fixed_cap_but_keeps_its_disk_reserve_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    free = {"bytes": 10 << 30}
    monkeypatch.setattr(spool_module, "free_bytes", lambda directory: free["bytes"])
    monkeypatch.setattr(spool_module, "_RECHECK_BYTES", 0)  # look at every put
    sp: Spool[bytes] = Spool(memory_items=1, reserve_bytes=1 << 30)
    for _ in range(50):  # far past any count or size limit the test would know of
        await sp.put(b"x" * 1000)
    assert len(sp) == 50 and sp.disk_waits == 0  # noqa: PT018
    free["bytes"] = 512 << 20  # the file system fills up (with anything)
    put_done = anyio.Event()

    async def put_one() -> None:
        await sp.put(b"late")
        put_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_one)
        await anyio.wait_all_tasks_blocked()
        assert not put_done.is_set()  # backpressure, not a full disk
        assert sp.disk_waits >= 1
        free["bytes"] = 10 << 30  # the workers drained it, the disk has room again
        got = await sp.get()
        assert got is not None
        with anyio.fail_after(5):
            await put_done.wait()
    sp.discard()


def test_check_room_refuses_a_spool_directory_without_its_reserve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spool_module, "free_bytes", lambda directory: 100 << 20)
    monkeypatch.setattr(spool_module, "reserve_for", lambda directory: 1 << 30)
    with pytest.raises(BulkDedupeError, match="has 100 MiB free, less than the 1,024 MiB"):
        spool_module.check_room("/somewhere")
    spool_module.check_room("/somewhere", reserve=50 << 20)  # enough: no error


def _take_all(s: ExternalSort[T], n: int) -> list[T]:
    """Everything the sort holds, taken `n` at a time: no chunk larger, nothing after the end."""
    out: list[T] = []
    while chunk := s.take(n):
        assert len(chunk) <= n
        out.extend(chunk)
    assert s.take(1) == []
    return out


@settings(max_examples=50, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 300)), max_size=400),
    run_items=st.integers(min_value=1, max_value=64),
    take=st.integers(min_value=1, max_value=50),
)
def test_external_sort_takes_every_item_once_in_sorted_order(
    items: list[tuple[int, int]], run_items: int, take: int
) -> None:
    s: ExternalSort[tuple[int, int]] = ExternalSort(run_items=run_items, record_items=7)
    for item in items:
        s.add(item)
    out = _take_all(s, take)
    s.close()
    assert out == sorted(items)
    assert len(s) == len(items)


@settings(max_examples=60, deadline=None)
@given(
    places=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=2**32 - 1),  # partition oid
            st.integers(min_value=0, max_value=2**32 - 1),  # block
            st.integers(min_value=1, max_value=2**16 - 1),  # line pointer
        ),
        unique=True,
        max_size=300,
    ),
    run_items=st.integers(min_value=1, max_value=40),
)
def test_heap_position_key_sorts_entries_as_their_places(
    places: list[tuple[int, int, int]], run_items: int
) -> None:
    """The sweep's sort (entries by their position, one int, spilled as plain tuples and
    rebuilt as entries) orders them exactly as (partition, block, offset) would, over the whole
    range of each, in memory and across spilled runs, every field coming back as it went in."""
    s: ExternalSort[Entry] = ExternalSort(
        run_items=run_items, record_items=3, key=itemgetter(0), rebuild=new_entry
    )
    added = []
    for i, (rel, block, offset) in enumerate(places):
        e = Entry(heap_position(rel, block, offset), i, f"g{i}", -i, f"v{i}", (i, 1))
        added.append(e)
    s.add_many(added[: len(added) // 2])
    for e in added[len(added) // 2 :]:
        s.add(e)
    out = _take_all(s, 7)
    s.close()
    assert [(e.position >> 48, *e.at) for e in out] == sorted(places)
    assert all(type(e) is Entry for e in out)
    assert sorted(out, key=lambda e: e.pk) == added


def test_external_sort_keeps_at_most_one_run_in_memory(tmp_path: Path) -> None:
    s: ExternalSort[int] = ExternalSort(run_items=100, record_items=10, directory=str(tmp_path))
    for i in range(1_000, 0, -1):
        s.add(i)
        assert len(s._buffer) < 100
    assert len(s._runs) == 10
    assert s.disk_bytes > 0
    assert s.take(5) == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError):
        s.add(0)  # taking has started: the order is fixed
    assert s.take(10_000) == list(range(6, 1_001))
    assert s.take(1) == []
    s.close()
    assert s._runs == []


@settings(max_examples=100, deadline=None)
@given(
    # few distinct keys (ties across runs and records), and more
    items=st.lists(st.integers(0, 3), max_size=300) | st.lists(st.integers(0, 20), max_size=300),
    run_items=st.integers(min_value=1, max_value=30),
    record_items=st.integers(min_value=1, max_value=9),
    take=st.integers(min_value=1, max_value=40),
)
# Two runs of two one-item records, all one key: the bound's ties go on into each run's next
# record, and must still come out run after run (a first block-wise merge gave 0, 2, 1, 3).
@example(items=[5, 5, 5, 5], run_items=2, record_items=1, take=1)
def test_external_sort_merge_is_stable_by_key(
    items: list[int], run_items: int, record_items: int, take: int
) -> None:
    """Sorted by a key with many ties, over many runs and records of any size: the items come
    out as a stable sort of the order they went in (the block-wise merge takes the ties of a
    block's bound run after run, each run's to the last, in its next records too)."""
    s: ExternalSort[tuple[int, int]] = ExternalSort(
        run_items=run_items, record_items=record_items, key=itemgetter(0)
    )
    added = [(k, i) for i, k in enumerate(items)]
    for item in added:
        s.add(item)
    out = _take_all(s, take)
    s.close()
    assert out == sorted(added, key=itemgetter(0))
