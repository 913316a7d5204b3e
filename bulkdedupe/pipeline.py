"""The composition root: opens the pool, resolves the target, runs scanners and workers joined
by a bounded stream inside one task group, handles signals, and returns the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg
import structlog
from anyio.abc import ObjectReceiveStream

from . import catalog, db, errors, scanindex, signals, sql, state
from .batching import BatchSizer, LockBudget
from .catalog import Target
from .config import (
    DEFAULT_STATE_SCHEMA,
    MAX_CONCURRENCY,
    ConnectConfig,
    RunConfig,
    ScanConfig,
    redact_dsn,
)
from .control import Knobs, RunControl, live_snapshot
from .db import Conn
from .errors import ConnectError, TargetError, UsageError
from .governor import Governor
from .health import HealthSampler
from .monitor import Monitor
from .progress import Reporter, Stats, percentile
from .results import RunSummary, ScanReport, VerifyResult
from .scanner import Group, KeyRange, plan_ranges, scan_range
from .spool import Spool
from .throttle import Stopping, Throttle
from .worker import PlanWriter, Rename, Worker, WorkItem

log = structlog.get_logger(__name__)

CHECKPOINT_INTERVAL = 2.0
FLUSH_AFTER = 0.5  # seconds a partly filled batch may wait for more groups


def _no_index_error(target: Target) -> TargetError:
    return TargetError(
        f"{target.display}.{target.key} has no usable btree index to scan; create one with "
        f"CREATE INDEX CONCURRENTLY ON {target.qualified} ({sql.quote_ident(target.key)}), "
        "or pass --create-scan-index to `run`"
    )


async def _resolve(
    conn: Conn, cfg: ConnectConfig, keep: tuple[Any, ...] = (), *, write: bool
) -> Target:
    info = await catalog.server_info(conn)
    target = await catalog.resolve(conn, cfg, keep)
    await catalog.check_privileges(conn, target, write=write)
    if write:
        catalog.check_writable(info)
    log.debug(
        "target",
        table=target.display,
        key=target.key,
        pk=target.pk,
        index=target.scan_index,
        server=info.version,
    )
    return target


# --- scan and verify -----------------------------------------------------------------------


async def _scan_groups(
    pool: asyncpg.Pool,
    target: Target,
    ranges: list[KeyRange],
    page_size: int,
    stats: Stats,
    on_page: Callable[[int, list[Group], str | None], Awaitable[None]],
    on_range_done: Callable[[int, str | None], Awaitable[None]] | None = None,
    stop: anyio.Event | None = None,
    pause: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Run one scanner per key range concurrently; call on_page for each page and
    on_range_done (with the range's last key) when a range has been read to its end. `pause`
    waits between pages while the run is paused (False: stopping)."""
    q = target.queries("unused")  # scan queries never touch the state schema

    async def one(rng: KeyRange) -> None:
        last = rng.cursor
        async for page in scan_range(pool, q, rng, page_size=page_size):
            stats.scanned_rows += page.rows_read
            stats.found(page.groups)
            stats.longest_page_seconds = max(stats.longest_page_seconds, page.seconds)
            if stop is not None and stop.is_set():
                return
            await on_page(rng.index, page.groups, page.last_key)
            last = page.last_key or last
            if pause is not None and not await pause():
                return
        if on_range_done is not None:
            await on_range_done(rng.index, last)

    async with anyio.create_task_group() as tg:
        for rng in ranges:
            tg.start_soon(one, rng)


async def scan(cfg: ConnectConfig, scan_cfg: ScanConfig = ScanConfig()) -> ScanReport:
    """Read-only: count duplicate groups and rows to rename. Never writes anything."""
    stats = Stats()
    top: list[tuple[int, str]] = []
    rows_to_rename = 0

    async def on_page(_: int, groups: list[Group], __: str | None) -> None:
        nonlocal rows_to_rename
        for g in groups:
            rows_to_rename += g.count - 1
            if scan_cfg.top:
                item = (g.count, g.key)
                if len(top) < scan_cfg.top:
                    heapq.heappush(top, item)
                elif item > top[0]:
                    heapq.heapreplace(top, item)

    async with (
        errors.boundary("scan"),
        db.pool(
            cfg, size=scan_cfg.scanners + 1, statement_timeout=scan_cfg.statement_timeout
        ) as pool,
        pool.acquire() as conn,
        contextlib.AsyncExitStack() as resources,
    ):
        target = await _resolve(conn, cfg, write=False)
        if target.scan_index is None:
            raise _no_index_error(target)
        ranges = await plan_ranges(conn, target, scan_cfg.scanners)
        # a bulkdedupe scan index is held while it is read: a run ending now must not drop it
        await resources.enter_async_context(scanindex.lease(conn, target, create=False))
        stats.estimated_rows = target.estimated_rows
        reporter = Reporter(stats, verb=None)
        async with anyio.create_task_group() as tg:
            if reporter.tty:
                tg.start_soon(reporter.run)
            await _scan_groups(pool, target, ranges, scan_cfg.page_size, stats, on_page)
            tg.cancel_scope.cancel()
        if reporter.tty:
            reporter.close(scan_finished=True)
    largest = tuple((k, n) for n, k in sorted(top, key=lambda t: (-t[0], t[1])))
    return ScanReport(
        table=target.display,
        key=target.key,
        index=target.scan_index,
        estimated_rows=target.estimated_rows,
        scanned_rows=stats.scanned_rows,
        groups=stats.groups_found,
        rows_to_rename=rows_to_rename,
        largest_groups=largest,
        duration_s=stats.elapsed(),
    )


async def verify(cfg: ConnectConfig, scan_cfg: ScanConfig = ScanConfig()) -> VerifyResult:
    """Read-only: are any duplicate groups left?"""
    r = await scan(
        cfg,
        ScanConfig(
            top=0,
            page_size=scan_cfg.page_size,
            scanners=scan_cfg.scanners,
            statement_timeout=scan_cfg.statement_timeout,
        ),
    )
    return VerifyResult(
        table=r.table,
        key=r.key,
        groups=r.groups,
        rows_to_rename=r.rows_to_rename,
        scanned_rows=r.scanned_rows,
        duration_s=r.duration_s,
    )


# --- run -----------------------------------------------------------------------------------


class _Producer:
    """Packs the groups of each key range into work items of about `batch_size` renames."""

    def __init__(
        self, spool: Spool[WorkItem], checkpoints: state.Checkpoints, batch_size: int
    ) -> None:
        self.spool = spool
        self.cp = checkpoints
        self.batch_size = batch_size
        self.pending: dict[int, list[Group]] = {}
        self.since: dict[int, float] = {}

    async def _emit(self, rng: int, last_key: str | None) -> None:
        groups = self.pending.pop(rng, [])
        self.since.pop(rng, None)
        seq = self.cp.issue(rng)
        if not groups:
            self.cp.complete(rng, seq, last_key)  # nothing to do up to here
            return
        await self.spool.put(WorkItem(rng, seq, tuple(groups), last_key))

    async def on_page(self, rng: int, groups: list[Group], last_key: str | None) -> None:
        pending = self.pending.setdefault(rng, [])
        self.since.setdefault(rng, anyio.current_time())
        renames = sum(g.count - 1 for g in pending)
        for g in groups:
            pending.append(g)
            renames += g.count - 1
            if renames >= self.batch_size:
                await self._emit(rng, g.key)
                pending = self.pending.setdefault(rng, [])
                self.since[rng] = anyio.current_time()
                renames = 0
        if not pending or anyio.current_time() - self.since[rng] >= FLUSH_AFTER:
            await self._emit(rng, last_key)

    async def finish_range(self, rng: int, last_key: str | None) -> None:
        await self._emit(rng, last_key)
        self.cp.range_finished(rng)


def _check_output(path: Path) -> None:
    """Refuse an unwritable --output before the run writes anything to the database (the
    state schema and a runs row would otherwise be left behind by a typo)."""
    try:
        with Path(path).open("a", encoding="utf-8"):  # "a": an existing plan is kept as is
            pass
    except OSError as exc:
        raise UsageError(f"--output {path}: {exc.strerror}") from None


async def run(
    cfg: ConnectConfig,
    run_cfg: RunConfig = RunConfig(),
    *,
    handle_signals: bool = False,
    stop: anyio.Event | None = None,
) -> RunSummary:
    """Deduplicate the key column: a dry run (default; writes nothing anywhere) or --apply.

    Set `stop` (or send SIGINT/SIGTERM with `handle_signals`) to stop taking work: in-flight
    batches finish, the run is marked interrupted with its checkpoint and can be resumed.
    """
    stop = stop or anyio.Event()
    stats = Stats()
    apply = run_cfg.apply
    scan_cfg = run_cfg.scan
    plan_fh: IO[str] | None = None
    sample: list[Rename] = []
    # --apply can be told `set --concurrency N` while running: worker tasks (and pool room) up
    # to the cap; the limiter keeps only N of them working, so only N connections are used.
    workers = MAX_CONCURRENCY if apply else run_cfg.concurrency
    size = workers + scan_cfg.scanners + 1
    monitor: Monitor | None = None
    scan_lease: scanindex.ScanIndexLease | None = None
    status = "failed"
    run_id = run_cfg.run_id or state.new_run_id()
    st = sql.StateSql(cfg.state_schema)
    if run_cfg.output is not None:
        _check_output(run_cfg.output)

    async with (
        errors.boundary("run"),
        db.connect(cfg) as control,
        db.pool(cfg, size=size, statement_timeout=scan_cfg.statement_timeout) as pool,
        contextlib.AsyncExitStack() as resources,
    ):
        target = await _resolve(control, cfg, run_cfg.keep, write=apply)
        lock_budget = LockBudget(None)  # a dry run takes no locks
        wal_method: str | None = None
        if apply:
            info = await catalog.server_info(control)
            wal_method = await catalog.wal_compression(
                control, run_cfg.wal_compression, info.version_num
            )
            # "out of shared memory" mid-run would fail batches over and over: stay under it
            # (shown as batch_ceiling in the "run started" line; `set` goes through it too)
            lock_budget = LockBudget(info.lock_slots)
        ceiling = lock_budget.clamp(run_cfg.batch_size, run_cfg.concurrency)
        throttle = Throttle(run_cfg.throttle, stats, stop)
        sampler = HealthSampler(cfg, target.oid, run_cfg.throttle)
        resources.push_async_callback(sampler.close)
        if run_cfg.throttle.watches_database:
            # a broken --throttle-query or --replica-url fails here, before anything changes
            await sampler.check(control, run_cfg.throttle)
        # Every check that can refuse the run comes before the first write.
        if target.scan_index is None:
            if not run_cfg.create_scan_index:
                raise _no_index_error(target)
            if not apply:
                raise UsageError(
                    "--create-scan-index writes (it builds an index): use it with --apply"
                )
            await catalog.check_owner(
                control, target, why="--create-scan-index builds an index on it"
            )
        if apply:
            await state.ensure_schema(control, st)
        # Built when missing, else reused; held for the whole run so no other run drops it.
        scan_lease = await resources.enter_async_context(
            scanindex.lease(control, target, create=apply and run_cfg.create_scan_index)
        )
        run_lock: state.RunLock | None = None
        resumed: state.RunRecord | None = None
        if apply:
            run_lock = state.RunLock(control, run_id)
            await run_lock.acquire()
            options = {
                "batch_size": run_cfg.batch_size,
                "concurrency": run_cfg.concurrency,
                "keep": [asdict(k) for k in run_cfg.keep],
                "template": run_cfg.template,
                "lock_timeout": run_cfg.lock_timeout,
                "statement_timeout": run_cfg.statement_timeout,
                "wal_compression": wal_method or "server",
                "throttle": _throttle_options(run_cfg),
            }
            run_id, resumed = await state.start_run(
                control,
                st,
                target,
                run_id=run_id,
                command="run",
                options=options,
                database_url=redact_dsn(cfg.database_url),
            )
            # Anything that fails from here until the run's end is recorded marks it failed
            # (resumable), never leaves it "running" behind a process that has exited.
            resources.push_async_exit(_MarkFailedUnlessFinished(control, st, run_id, run_lock))
        ranges = resumed.remaining_ranges() if resumed else None
        if ranges is None:
            ranges = await plan_ranges(control, target, scan_cfg.scanners)
        checkpoints = state.Checkpoints(ranges)
        stats.estimated_rows = target.estimated_rows
        structlog.contextvars.bind_contextvars(run_id=run_id, table=target.display)
        if apply:  # the summary shows the WAL written until the end (by every session)
            stats.wal_start = await control.fetchval(sql.HEALTH_WAL_POSITION)
        log.info(
            "run started",
            mode="apply" if apply else "dry-run",
            resumed=resumed is not None,
            ranges=len(ranges),
            batch_size=run_cfg.batch_size,
            # lower than batch_size when the server's lock table is small (LockBudget)
            batch_ceiling=ceiling,
            concurrency=run_cfg.concurrency,
            wal_compression=wal_method or "server",
        )

        if run_cfg.output is not None:
            try:
                # a plan line is small and written whole; a thread per write would cost more
                plan_fh = Path(run_cfg.output).open("w", encoding="utf-8")  # noqa: SIM115, ASYNC230
            except OSError as exc:
                raise UsageError(f"--output {run_cfg.output}: {exc.strerror}") from None
        skips = state.SkipLog(pool if apply else None, st, run_id)
        worker_kw: dict[str, Any] = {
            "pool": pool,
            "target": target,
            "queries": target.queries(cfg.state_schema),
            "run_id": run_id,
            "apply": apply,
            "sizer": BatchSizer(
                target=run_cfg.target_batch_time,
                minimum=run_cfg.min_batch_size,
                maximum=ceiling,
            ),
            "skips": skips,
            "template": run_cfg.template,
            "lock_timeout": run_cfg.lock_timeout,
            "statement_timeout": run_cfg.statement_timeout,
            "wal_compression": wal_method,
            "max_retries": run_cfg.max_retries,
            "stats": stats,
            "plan": PlanWriter(plan_fh) if plan_fh else None,
            "sample": sample,
        }
        spool: Spool[WorkItem] = Spool(directory=run_cfg.spool_dir)
        send, recv = anyio.create_memory_object_stream[WorkItem](max(2, run_cfg.concurrency * 2))
        producer = _Producer(spool, checkpoints, run_cfg.batch_size)
        reporter = Reporter(
            stats, verb="renamed" if apply else "would rename", interval=run_cfg.progress_interval
        )

        async def produce() -> None:
            try:
                if resumed is not None:
                    # the groups the earlier process skipped, before the unfinished ranges
                    await _produce_retries(pool, st, run_id, spool, run_cfg.batch_size, stats)
                await _scan_groups(
                    pool,
                    target,
                    ranges,
                    scan_cfg.page_size,
                    stats,
                    producer.on_page,
                    producer.finish_range,
                    stop,
                    throttle.wait_open,
                )
                stats.scan_seconds = stats.elapsed()
                knobs.scan_finished()
                log.info(
                    "scan finished",
                    seconds=round(stats.scan_seconds, 2),
                    groups=stats.groups_found,
                    spooled_bytes=spool.peak_disk_bytes,
                )
            finally:
                spool.close()

        async def pump() -> None:
            # spool -> bounded stream: the workers' backpressure stops here, not at the scan
            async with send:
                while (item := await spool.get()) is not None:
                    if stop.is_set():
                        return
                    await send.send(item)

        # Renames clear the visibility map of the pages they touch, and every cleared page
        # turns the scan's index-only reads into heap reads: few workers while the scan runs,
        # all of them once it is done.
        limiter = anyio.CapacityLimiter(
            min(run_cfg.concurrency, run_cfg.concurrency_while_scanning)
        )
        knobs = Knobs(
            sizer=worker_kw["sizer"],
            budget=lock_budget,
            limiter=limiter,
            throttle=throttle,
            stats=stats,
            batch_size=run_cfg.batch_size,
            concurrency=run_cfg.concurrency,
            concurrency_while_scanning=run_cfg.concurrency_while_scanning,
        )
        run_control = RunControl(st, run_id, knobs) if apply else None
        if run_control is not None:
            await run_control.reset(control)
        monitor = await resources.enter_async_context(
            Monitor(cfg, throttle=throttle, stats=stats, sampler=sampler, control=run_control)
        )
        await monitor.tick()  # no batch before the health is known

        async def consume(items: ObjectReceiveStream[WorkItem]) -> None:
            worker = Worker(**worker_kw, before_batch=throttle.gate())
            async with items:
                while not stop.is_set():
                    # The limiter before an item: only as many workers as it allows hold work
                    # (its size follows `set --concurrency` and the end of the scan).
                    async with limiter:
                        try:
                            item = await items.receive()
                        except anyio.EndOfStream:
                            return
                        if stop.is_set():
                            return
                        try:
                            await worker.handle(item)
                        except Stopping:
                            return  # not checkpointed: a resume does the rest of the item
                    if not item.retry:  # retried groups are tracked in <state>.skipped
                        checkpoints.complete(item.range_index, item.seq, item.last_key)

        async def save_checkpoints() -> None:
            while True:
                await anyio.sleep(CHECKPOINT_INTERVAL)
                # shielded: a cancel mid-query would leave the control connection unusable
                with (
                    anyio.CancelScope(shield=True),
                    contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError),
                ):
                    await state.save_progress(
                        control,
                        st,
                        run_id,
                        groups=stats.groups_done,
                        renamed=stats.renamed,
                        skipped=stats.skipped_rows,
                        checkpoint=checkpoints.to_json() | {"live": live_snapshot(stats, knobs)},
                    )
                if control.is_closed():
                    # The run lock went with that session (server restart, terminated backend):
                    # another process may take the run now, so this one must not go on.
                    log.error("lost the connection holding the run lock; stopping")
                    stop.set()
                    return

        async def stop_when_asked(scope: anyio.CancelScope) -> None:
            await stop.wait()
            # Stop taking work: cancel the scan, drop what waits in the spool (the checkpoint
            # has not passed it: a resume scans it again); in-flight batches finish.
            scope.cancel()
            spool.discard()
            throttle.wake()  # workers waiting out a pause leave their items

        governor: Governor | None = None
        if apply and run_cfg.impact.max_impact is not None:
            governor = Governor(cfg, run_cfg.impact, stats, run_id, cfg.state_schema)
            governor.sizer = worker_kw["sizer"]
            throttle.governor = governor
            knobs.governor = governor

        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(reporter.run)
                outer.start_soon(monitor.run)
                if apply:
                    outer.start_soon(save_checkpoints)
                if handle_signals:
                    outer.start_soon(signals.set_on_signal, stop)
                if governor is not None:
                    # the baseline is the application's latency before this run writes (or
                    # reads) anything; the probe and the controller then run until the end
                    outer.start_soon(governor.run)
                    await _first_of(governor.wait_baseline, stop.wait)
                async with anyio.create_task_group() as work:
                    producer_scope = anyio.CancelScope()

                    async def guarded_produce() -> None:
                        with producer_scope:
                            await produce()

                    work.start_soon(guarded_produce)
                    work.start_soon(pump)
                    outer.start_soon(stop_when_asked, producer_scope)
                    async with recv:
                        for _ in range(workers):
                            work.start_soon(consume, recv.clone())
                if monitor.error is not None:
                    status = "failed"
                else:
                    status = "interrupted" if stop.is_set() else "completed"
                outer.cancel_scope.cancel()
        finally:
            spool.discard()
            if plan_fh is not None:
                plan_fh.close()
            reporter.close()
            control_lost = apply and control.is_closed()
            skipped = await _skipped_on_record(control, st, run_id, skips, stats, apply=apply)
            if status == "completed" and skipped.total_groups:
                status = "incomplete"  # a resume retries exactly the groups on record
            if stats.wal_start is not None and not control.is_closed():
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(FINISH_BUDGET),
                    contextlib.suppress(*errors.DRIVER_ERRORS),
                ):
                    stats.wal_end = await control.fetchval(sql.HEALTH_WAL_POSITION)
            summary = _summary(
                run_id, apply, status, target, stats, run_cfg, sample, cfg=cfg, skipped=skipped
            )
            if governor is not None:
                p99_ms, baseline_ms, budget = governor.figures()
                summary = dataclasses.replace(
                    summary,
                    impact_p99_ms=p99_ms,
                    impact_baseline_ms=baseline_ms,
                    impact_target=budget,
                )
            if apply and not control_lost:
                control_lost = not await _finish(
                    control,
                    st,
                    run_id,
                    status=status,
                    stats=stats,
                    base_renamed=resumed.renamed if resumed else 0,
                    checkpoint=checkpoints.to_json() | {"live": live_snapshot(stats, knobs)},
                    summary=summary,
                    run_lock=run_lock,
                )
            if scan_lease is not None and not control_lost:
                # A run that asked for a temporary index drops it, unless another run still
                # uses it: the last of them to end drops it.
                drop = (
                    apply
                    and status == "completed"
                    and run_cfg.create_scan_index
                    and not run_cfg.keep_scan_index
                )
                with anyio.CancelScope(shield=True), anyio.move_on_after(60):
                    await scan_lease.release(drop=drop)
            if control_lost:
                # The run cannot be marked: it stays "running", resumable from its last saved
                # checkpoint (work after it is found again by the scan, already-renamed groups
                # are no longer duplicates).
                raise ConnectError(
                    f"lost the connection to the server during run {run_id} (server restarted "
                    "or session terminated); "
                    "every committed batch is whole and audited: resume with "
                    f"--run-id {run_id} once the server is back"
                )
        structlog.contextvars.unbind_contextvars("run_id", "table")
    if monitor is not None and monitor.error is not None:
        raise monitor.error  # the run is saved as failed (resumable); say why
    return summary


async def _produce_retries(
    pool: asyncpg.Pool,
    st: sql.StateSql,
    run_id: str,
    spool: Spool[WorkItem],
    batch_size: int,
    stats: Stats,
) -> None:
    """Queue the groups an earlier process of this run skipped (`<state>.skipped`), in work
    items of about `batch_size` renames, marked `retry`: the checkpoint does not track them,
    the skipped table does (each resolved group's row is deleted)."""
    async with pool.acquire() as conn:
        pending: list[Group] = []
        renames = 0
        async for page in state.skipped_groups(conn, st, run_id):
            for key, rows in page:
                pending.append(Group(key, rows + 1))
                stats.found((pending[-1],))
                renames += rows
                if renames >= batch_size:
                    await spool.put(WorkItem(-1, 0, tuple(pending), None, retry=True))
                    pending, renames = [], 0
        if pending:
            await spool.put(WorkItem(-1, 0, tuple(pending), None, retry=True))


async def _skipped_on_record(
    control: Conn,
    st: sql.StateSql,
    run_id: str,
    skips: state.SkipLog,
    stats: Stats,
    *,
    apply: bool,
) -> state.SkippedSummary:
    """The groups left skipped at the end: on --apply those on record for the run (earlier
    processes' included, minus those resolved since), else this process's own count."""
    if apply and not control.is_closed():
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_BUDGET):
            try:
                return await state.skipped_summary(control, st, run_id)
            except (*errors.DRIVER_ERRORS,) as exc:
                log.warning("could not read the skipped groups back", error=str(exc))
    rows = {k: v for k, v in stats.skipped.items() if k != "no_longer_duplicate"}
    return state.SkippedSummary(groups=dict(skips.groups), rows=rows)


# Each final step has a budget of its own: a slow count over a huge audit must not cost the
# run its final status (the count has a fallback: the run's own counters).
FINISH_BUDGET = 30.0
COUNT_TIMEOUT = "20s"


async def _finish(
    control: Conn,
    st: sql.StateSql,
    run_id: str,
    *,
    status: str,
    stats: Stats,
    base_renamed: int,
    checkpoint: dict[str, Any],
    summary: RunSummary,
    run_lock: state.RunLock | None,
) -> bool:
    """Write the run's final status, then release its lock: always attempted, shielded from
    cancellation, each step within its own budget. False: the server could not be told (the
    connection is gone), the run stays resumable as it was last saved."""
    renamed = base_renamed + stats.renamed  # the fallback: this run's counters
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(FINISH_BUDGET):
            try:
                renamed = await state.count_changes(control, st, run_id, within=COUNT_TIMEOUT)
            except (*errors.DRIVER_ERRORS,) as exc:
                log.warning("audit count failed; using the run's counters", error=str(exc))
        recorded = False
        with anyio.move_on_after(FINISH_BUDGET):
            try:
                await state.finish_run(
                    control,
                    st,
                    run_id,
                    status=status,
                    groups=stats.groups_done,
                    renamed=renamed,
                    skipped=stats.skipped_rows,
                    checkpoint=checkpoint,
                    summary=summary.to_json(),
                )
                recorded = True
            except (*errors.DRIVER_ERRORS,) as exc:
                log.error("could not record the run's final status", status=status, error=str(exc))
        if not recorded:
            return False
        if run_lock is not None:
            with anyio.move_on_after(FINISH_BUDGET), contextlib.suppress(*errors.DRIVER_ERRORS):
                await run_lock.release()
    return True


class _MarkFailedUnlessFinished:
    """Exit callback: a run that ends by an exception before its final status was written is
    marked failed (resumable). A no-op once `finish_run` wrote any status."""

    def __init__(
        self, control: Conn, st: sql.StateSql, run_id: str, run_lock: state.RunLock | None
    ) -> None:
        self.control, self.st, self.run_id, self.run_lock = control, st, run_id, run_lock

    async def __call__(self, *exc_info: object) -> bool:
        if exc_info[1] is None or self.control.is_closed():
            return False
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_BUDGET):
            try:
                await self.control.execute(self.st.mark_failed, self.run_id)
                if self.run_lock is not None:
                    await self.run_lock.release()
            except (*errors.DRIVER_ERRORS,) as exc:
                log.warning("could not mark the run failed", error=str(exc))
        return False


async def _first_of(*waits: Callable[[], Awaitable[Any]]) -> None:
    """Return as soon as one of the waits returns (the others are cancelled)."""
    async with anyio.create_task_group() as tg:

        async def one(wait: Callable[[], Awaitable[Any]]) -> None:
            await wait()
            tg.cancel_scope.cancel()

        for wait in waits:
            tg.start_soon(one, wait)


def _throttle_options(run_cfg: RunConfig) -> dict[str, Any]:
    """The guardrails that differ from their defaults, for the runs row (no URL passwords)."""
    t = run_cfg.throttle
    out: dict[str, Any] = {}
    for f in dataclasses.fields(t):
        value = getattr(t, f.name)
        if value != f.default and f.name != "replica_urls":
            out[f.name] = value
    if t.replica_urls:
        out["replica_urls"] = [redact_dsn(u) for u in t.replica_urls]
    return out


def _summary(
    run_id: str,
    apply: bool,
    status: str,
    target: Target,
    stats: Stats,
    run_cfg: RunConfig,
    sample: list[Rename],
    *,
    cfg: ConnectConfig,
    skipped: state.SkippedSummary,
) -> RunSummary:
    ms = [s * 1000 for s in stats.batch_seconds]
    elapsed = stats.elapsed()
    retry = None
    if apply and skipped.total_groups and status in ("incomplete", "interrupted", "failed"):
        retry = resume_command(cfg, target, run_id)
    wal = stats.wal_bytes()
    wal_per_rename = round(wal / stats.renamed, 1) if wal is not None and stats.renamed else None
    return RunSummary(
        run_id=run_id,
        mode="apply" if apply else "dry-run",
        status=status,
        table=target.display,
        key=target.key,
        groups=stats.groups_found,
        rows_renamed=stats.renamed,
        rows_skipped=stats.skipped_rows,
        skipped=dict(stats.skipped),
        skipped_groups=skipped.total_groups,
        skipped_groups_by_reason=dict(skipped.groups),
        retry_command=retry,
        batches=stats.batches,
        retries=stats.retries,
        scanned_rows=stats.scanned_rows,
        duration_s=round(elapsed, 3),
        rows_per_s=round(stats.renamed / elapsed, 1) if elapsed > 0 else 0.0,
        batch_ms_p50=round(percentile(ms, 50), 2),
        batch_ms_p99=round(percentile(ms, 99), 2),
        batch_ms_max=round(max(ms, default=0.0), 2),
        longest_scan_page_ms=round(stats.longest_page_seconds * 1000, 2),
        scan_s=round(stats.scan_seconds, 3),
        output=str(run_cfg.output) if run_cfg.output else None,
        sample=tuple(
            {"pk": r.pk, "old_value": r.old, "new_value": r.new, "survivor_pk": r.survivor_pk}
            for r in sample
        ),
        wal_bytes=wal,
        wal_bytes_per_rename=wal_per_rename,
    )


def _cli_ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else sql.quote_ident(name)


def resume_command(cfg: ConnectConfig, target: Target, run_id: str) -> str:
    """The command line that resumes `run_id` (and so retries its skipped groups)."""
    args = [
        "bulkdedupe",
        "run",
        "--apply",
        "--table",
        f"{_cli_ident(target.schema)}.{_cli_ident(target.table)}",
        "--key",
        _cli_ident(target.key),
    ]
    if cfg.pk is not None:
        args += ["--pk", _cli_ident(target.pk)]
    if cfg.state_schema != DEFAULT_STATE_SCHEMA:
        args += ["--state-schema", _cli_ident(cfg.state_schema)]
    args += ["--run-id", run_id]
    return shlex.join(args)
