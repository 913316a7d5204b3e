"""The composition root: opens the pool, resolves the target, runs scanners and workers joined
by a bounded stream inside one task group, handles signals, and returns the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import asyncpg
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup

from . import catalog, db, errors, scanindex, signals, spool, sql, state, triggers
from .batching import LockBudget
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
from .governor import Governor, first_of
from .health import HealthSampler
from .monitor import Monitor
from .pace import Pace
from .progress import Reporter, Stats, percentile
from .results import RunSummary, ScanReport, UpdateTrigger, VerifyResult
from .scanner import Group, KeyRange, LargestGroups, plan_ranges, scan_range
from .spool import Spool
from .sweep import Sweep
from .throttle import Stopping, Throttle
from .worker import PlanWriter, Rename, Worker, WorkItem, session_settings

log = structlog.get_logger(__name__)

CHECKPOINT_INTERVAL = 2.0
FLUSH_AFTER = 0.5  # seconds a partly filled batch may wait for more groups


def _no_index_error(target: Target) -> TargetError:
    if target.partitions is not None:
        return catalog.partition_index_error(target)
    cols = (*target.scope, target.key)
    what = f"({', '.join(cols)})" if target.scope else target.key
    return TargetError(
        f"{target.display}.{target.key} has no usable btree index to scan"
        f"{' on ' + what + ' (leading columns, any order)' if target.scope else ''}; create "
        f"one with CREATE INDEX CONCURRENTLY ON {target.qualified} "
        f"({', '.join(sql.quote_ident(c) for c in cols)}), or pass --create-scan-index to `run`"
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
    top = LargestGroups(scan_cfg.top)
    rows_to_rename = 0

    async def on_page(_: int, groups: list[Group], __: str | None) -> None:
        nonlocal rows_to_rename
        rows_to_rename += sum(g.count - 1 for g in groups)
        top.add(groups)

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
        update_triggers = await triggers.update_triggers(conn, target)
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
    return ScanReport(
        table=target.display,
        key=target.key,
        index=target.scan_index,
        estimated_rows=target.estimated_rows,
        scanned_rows=stats.scanned_rows,
        groups=stats.groups_found,
        rows_to_rename=rows_to_rename,
        largest_groups=top.largest(),
        duration_s=stats.elapsed(),
        update_triggers=update_triggers,
        scope=target.scope,
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

    In three steps: `_prepare` (resolve, refuse, register, plan, pace), `_engine` (scan,
    spool, workers and what watches them), `_finish_run` (final status, summary, scan index).
    """
    stop = stop or anyio.Event()
    stats = Stats()  # the run's clock: its duration counts from here
    run_id = run_cfg.run_id or state.new_run_id()
    if run_cfg.output is not None:
        _check_output(run_cfg.output)
    async with (
        errors.boundary("run"),
        _listening(stop, handle_signals),
        db.connect(cfg) as control,
        db.pool(
            cfg,
            size=run_cfg.scan.scanners + 2,
            statement_timeout=run_cfg.scan.statement_timeout,
            # pages take transaction-level locks only: no reset query after each
            stateless=True,
        ) as pool,
        contextlib.AsyncExitStack() as resources,
    ):
        r = await _prepare(
            cfg,
            run_cfg,
            run_id,
            stats=stats,
            stop=stop,
            control=control,
            pool=pool,
            resources=resources,
        )
        # The workers' own pool, its sessions set up for batches once (no SET LOCAL each):
        # opened now that the server's limits (wal_compression) are known.
        r.worker_pool = await resources.enter_async_context(
            db.pool(
                cfg,
                size=_worker_tasks(r.run_cfg),
                stateless=True,
                # r.run_cfg: as _prepare settled it (a resume keeps --disable-triggers)
                settings=session_settings(
                    r.run_cfg.lock_timeout,
                    r.run_cfg.statement_timeout,
                    r.wal_method,
                    r.run_cfg.disable_triggers,
                    "off" if r.run_cfg.synchronous_commit == "off" and r.apply else None,
                ),
            )
        )
        try:
            await _engine(r)
        finally:
            summary = await _finish_run(r)
        structlog.contextvars.unbind_contextvars("run_id", "table")
    if r.monitor.error is not None:
        raise r.monitor.error  # the run is saved as failed (resumable); say why
    return summary


def _worker_tasks(run_cfg: RunConfig) -> int:
    # --apply can be told `set --concurrency N` while running: worker tasks (and pool room) up
    # to the cap; the limiter keeps only N of them working, so only N connections are used.
    return MAX_CONCURRENCY if run_cfg.apply else run_cfg.concurrency


@dataclass(kw_only=True)
class _Run:
    """One run as `_prepare` set it up, for the engine and the finish. Only `status` changes
    afterwards: the engine's verdict, which the finish settles and writes."""

    cfg: ConnectConfig
    run_cfg: RunConfig
    control: Conn  # holds the run lock; checkpoints and the final status are written on it
    pool: asyncpg.Pool
    stop: anyio.Event
    stats: Stats
    st: sql.StateSql
    target: Target
    run_id: str
    resumed: state.RunRecord | None
    run_lock: state.RunLock | None
    scan_lease: scanindex.ScanIndexLease | None
    ranges: list[KeyRange]
    checkpoints: state.Checkpoints
    wal_method: str | None
    pace: Pace
    throttle: Throttle
    knobs: Knobs
    governor: Governor | None
    monitor: Monitor
    skips: state.SkipLog
    spool: Spool[WorkItem]
    reporter: Reporter
    plan_fh: IO[str] | None
    sample: list[Rename]
    update_triggers: tuple[UpdateTrigger, ...]
    largest: LargestGroups  # of the scan (a dry run shows them, with their share)
    worker_pool: asyncpg.Pool | None = None  # opened after _prepare (see run)
    status: str = "failed"  # until the engine has seen the work end

    @property
    def apply(self) -> bool:
        return self.run_cfg.apply

    def worker(self) -> Worker:
        rc = self.run_cfg
        return Worker(
            pool=self.worker_pool or self.pool,
            target=self.target,
            queries=self.target.queries(self.cfg.state_schema),
            run_id=self.run_id,
            apply=rc.apply,
            sizer=self.pace.sizer,
            skips=self.skips,
            template=rc.template,
            lock_timeout=rc.lock_timeout,
            statement_timeout=rc.statement_timeout,
            wal_compression=self.wal_method,
            disable_triggers=rc.disable_triggers,
            max_retries=rc.max_retries,
            stats=self.stats,
            plan=PlanWriter(self.plan_fh) if self.plan_fh else None,
            sample=self.sample,
            before_batch=self.throttle.gate(),
            spool_dir=rc.spool_dir,
            set_local=self.worker_pool is None,
        )

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint as the runs row keeps it, with what `status` shows of the run."""
        return self.checkpoints.to_json() | {"live": live_snapshot(self.stats, self.knobs)}


# --- run: prepare --------------------------------------------------------------------------


async def _prepare(
    cfg: ConnectConfig,
    run_cfg: RunConfig,
    run_id: str,
    *,
    stats: Stats,
    stop: anyio.Event,
    control: Conn,
    pool: asyncpg.Pool,
    resources: contextlib.AsyncExitStack,
) -> _Run:
    """Everything before the first batch, in this order: the target and the server's limits,
    the checks that can refuse the run, then its first writes (the state schema, the scan
    index, the run's registration), its key ranges, and the pieces that pace and watch it."""
    apply = run_cfg.apply
    st = sql.StateSql(cfg.state_schema)
    target = await _resolve(control, cfg, run_cfg.keep, write=apply)
    run_cfg = await _kept_options(control, st, run_cfg)
    update_triggers = await triggers.update_triggers(control, target)
    lock_budget, wal_method = await _server_limits(control, run_cfg)
    pace = Pace.for_run(run_cfg, lock_budget, stats)
    throttle = Throttle(run_cfg.throttle, stats, stop, pace)
    sampler = HealthSampler(cfg, target.oid, run_cfg.throttle)
    resources.push_async_callback(sampler.close)
    # Every check that can refuse the run comes before the first write.
    await _refuse_before_writing(control, target, run_cfg, sampler)
    if apply:
        await state.ensure_schema(control, st)
    # Built when missing, else reused; held for the whole run so no other run drops it.
    scan_lease = await resources.enter_async_context(
        scanindex.lease(control, target, create=apply and run_cfg.create_scan_index)
    )
    run_id, resumed, run_lock = await _register(
        control, st, cfg, run_cfg, target, run_id, wal_method, resources
    )
    ranges = resumed.remaining_ranges() if resumed else None
    if ranges is None:
        ranges = await plan_ranges(control, target, run_cfg.scan.scanners)
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
        batch_ceiling=pace.ceiling,
        concurrency=run_cfg.concurrency,
        wal_compression=wal_method or "server",
        disable_triggers=run_cfg.disable_triggers,
        # each fires once per renamed row
        update_triggers=[
            t.name for t in update_triggers if t.fires_during(run_cfg.disable_triggers)
        ],
    )
    plan_fh = _open_plan(run_cfg.output)
    knobs, governor = _pace(cfg, run_cfg, run_id, stats, pace, throttle)
    run_control = RunControl(st, run_id, knobs) if apply else None
    if run_control is not None:
        await run_control.reset(control)
    monitor = await resources.enter_async_context(
        Monitor(cfg, throttle=throttle, stats=stats, sampler=sampler, control=run_control)
    )
    await monitor.tick()  # no batch before the health is known
    return _Run(
        cfg=cfg,
        run_cfg=run_cfg,
        control=control,
        pool=pool,
        stop=stop,
        stats=stats,
        st=st,
        target=target,
        run_id=run_id,
        resumed=resumed,
        run_lock=run_lock,
        scan_lease=scan_lease,
        ranges=ranges,
        checkpoints=state.Checkpoints(ranges),
        wal_method=wal_method,
        pace=pace,
        throttle=throttle,
        knobs=knobs,
        governor=governor,
        monitor=monitor,
        skips=state.SkipLog(pool if apply else None, st, run_id),
        spool=Spool(directory=run_cfg.spool_dir),
        reporter=Reporter(
            stats, verb="renamed" if apply else "would rename", interval=run_cfg.progress_interval
        ),
        plan_fh=plan_fh,
        sample=[],
        update_triggers=update_triggers,
        largest=LargestGroups(run_cfg.scan.top),
    )


async def _server_limits(control: Conn, run_cfg: RunConfig) -> tuple[LockBudget, str | None]:
    """On --apply: the lock budget of the server's lock table, and the wal_compression the
    batches set for themselves (None: the server's). Refuses a method the server lacks."""
    if not run_cfg.apply:
        return LockBudget(None), None  # a dry run takes no locks
    info = await catalog.server_info(control)
    wal_method = await catalog.wal_compression(control, run_cfg.wal_compression, info.version_num)
    # "out of shared memory" mid-run would fail batches over and over: stay under it
    # (shown as batch_ceiling in the "run started" line; `set` goes through it too)
    return LockBudget(info.lock_slots), wal_method


async def _refuse_before_writing(
    control: Conn, target: Target, run_cfg: RunConfig, sampler: HealthSampler
) -> None:
    """The guardrails' queries and the scan index: refused here, before anything changes (a
    typo must not leave a state schema or a runs row behind)."""
    spool.check_room(run_cfg.spool_dir)  # the scan must be able to run ahead of the renames
    if run_cfg.throttle.watches_database:
        # a broken --throttle-query or --replica-url fails here, before anything changes
        await sampler.check(control, run_cfg.throttle)
    catalog.check_row_movement(target, run_cfg.allow_row_movement)  # the dry run too
    if target.scan_index is None:
        if not run_cfg.create_scan_index or target.partitions is not None:
            raise _no_index_error(target)
        if not run_cfg.apply:
            raise UsageError("--create-scan-index writes (it builds an index): use it with --apply")
        await catalog.check_owner(control, target, why="--create-scan-index builds an index on it")
    if run_cfg.disable_triggers:  # the dry run too: it says what --apply would do
        await triggers.check_may_disable(control, target)


async def _kept_options(control: Conn, st: sql.StateSql, run_cfg: RunConfig) -> RunConfig:
    """A resume keeps --disable-triggers when the run was started with it (half of a run's
    renames firing the triggers and half not is never what was meant). Read-only."""
    if not run_cfg.apply or run_cfg.run_id is None or run_cfg.disable_triggers:
        return run_cfg
    if (await state.recorded_options(control, st, run_cfg.run_id)).get("disable_triggers"):
        log.info("the resumed run keeps --disable-triggers", run_id=run_cfg.run_id)
        return dataclasses.replace(run_cfg, disable_triggers=True)
    return run_cfg


async def _register(
    control: Conn,
    st: sql.StateSql,
    cfg: ConnectConfig,
    run_cfg: RunConfig,
    target: Target,
    run_id: str,
    wal_method: str | None,
    resources: contextlib.AsyncExitStack,
) -> tuple[str, state.RunRecord | None, state.RunLock | None]:
    """On --apply: take the run's lock, then register the run or re-open it to resume.
    Returns its id, the record it resumes from, and its lock. A dry run records nothing."""
    if not run_cfg.apply:
        return run_id, None, None
    run_lock = state.RunLock(control, run_id)
    await run_lock.acquire()
    run_id, resumed = await state.start_run(
        control,
        st,
        target,
        run_id=run_id,
        command="run",
        options=_run_options(run_cfg, wal_method),
        database_url=redact_dsn(cfg.database_url),
    )
    if resumed is not None and run_cfg.disable_triggers:
        # from now on the run's renames skip the triggers: a later resume must keep that
        await control.execute(st.merge_options, run_id, json.dumps({"disable_triggers": True}))
    # Anything that fails from here until the run's end is recorded marks it failed
    # (resumable), never leaves it "running" behind a process that has exited.
    resources.push_async_exit(_MarkFailedUnlessFinished(control, st, run_id, run_lock))
    return run_id, resumed, run_lock


def _run_options(run_cfg: RunConfig, wal_method: str | None) -> dict[str, Any]:
    """The options the runs row keeps (no URL passwords)."""
    return {
        "batch_size": run_cfg.batch_size,
        "concurrency": run_cfg.concurrency,
        "keep": [asdict(k) for k in run_cfg.keep],
        "template": run_cfg.template,
        "lock_timeout": run_cfg.lock_timeout,
        "statement_timeout": run_cfg.statement_timeout,
        "wal_compression": wal_method or "server",
        "disable_triggers": run_cfg.disable_triggers,
        "allow_row_movement": run_cfg.allow_row_movement,
        "order": run_cfg.order,
        "synchronous_commit": run_cfg.synchronous_commit,
        "throttle": _throttle_options(run_cfg),
    }


def _open_plan(output: Path | None) -> IO[str] | None:
    """The dry run's plan file (--output), truncated now that the run has started."""
    if output is None:
        return None
    try:
        # a plan line is small and written whole; a thread per write would cost more
        return Path(output).open("w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--output {output}: {exc.strerror}") from None


def _pace(
    cfg: ConnectConfig,
    run_cfg: RunConfig,
    run_id: str,
    stats: Stats,
    pace: Pace,
    throttle: Throttle,
) -> tuple[Knobs, Governor | None]:
    """What may change the run's pace once it runs (the Pace owns it, and is the only thing
    they touch): with --max-impact on --apply, the governor, which asks the pace for a rate
    and a batch cap and to hold the run; and the knobs a live `set` turns, which hand each
    setting to the pace, the throttle or the governor."""
    governor: Governor | None = None
    if run_cfg.apply and run_cfg.impact.max_impact is not None:
        governor = Governor(cfg, run_cfg.impact, stats, run_id, cfg.state_schema, pace=pace)
    return Knobs(pace=pace, throttle=throttle, governor=governor), governor


# --- run: engine ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _listening(stop: anyio.Event, handle_signals: bool) -> AsyncIterator[None]:
    # SIGINT/SIGTERM set `stop` from before the first query to the final status written
    with signals.stop_on_signal(stop, enabled=handle_signals):
        yield


async def _engine(r: _Run) -> None:
    """The side tasks (progress, monitor, checkpoints, signals, governor) around the work;
    sets r.status when the work has ended."""
    async with anyio.create_task_group() as side:
        side.start_soon(r.reporter.run)
        side.start_soon(r.monitor.run)
        if r.apply:
            side.start_soon(_save_checkpoints, r)
        if r.governor is not None:
            # the baseline is the application's latency before this run writes (or
            # reads) anything; the probe and the controller then run until the end
            side.start_soon(r.governor.run)
            await first_of(r.governor.wait_baseline, r.stop.wait)
        await _work(r, side)
        if r.monitor.error is not None:
            r.status = "failed"
        else:
            r.status = "interrupted" if r.stop.is_set() else "completed"
        side.cancel_scope.cancel()


async def _work(r: _Run, side: TaskGroup) -> None:
    """Scan -> spool -> pump -> bounded stream -> workers, until the scan has been worked off
    or the run stops (`_stop_when_asked`, in the side tasks, cancels the scan)."""
    if r.apply and r.run_cfg.order == "heap":
        await _work_in_heap_order(r, side)
        return
    await _scan_into(r, side, _worker_tasks(r.run_cfg), lambda items: _consume(r, items))


async def _scan_into(
    r: _Run,
    side: TaskGroup,
    consumers: int,
    consume: Callable[[ObjectReceiveStream[WorkItem]], Coroutine[Any, Any, None]],
) -> None:
    """The scan's work items, through the spool and a bounded stream, to `consumers` tasks
    running `consume`; returns when the scan is worked off or the run stops."""
    send, recv = anyio.create_memory_object_stream[WorkItem](max(2, r.run_cfg.concurrency * 2))
    async with anyio.create_task_group() as work:
        scan_scope = anyio.CancelScope()
        work.start_soon(_produce, r, scan_scope)
        work.start_soon(_pump, r.spool, send, r.stop)
        side.start_soon(_stop_when_asked, r, scan_scope)
        async with recv:
            for _ in range(consumers):
                work.start_soon(consume, recv.clone())


async def _work_in_heap_order(r: _Run, side: TaskGroup) -> None:
    """--apply in heap order (sweep.py): scan and decide, then rename in chunks sorted by
    where the rows lie, then decide again the groups whose survivor changed meanwhile. The
    checkpoint moves only once all of it is done (a resume scans again)."""
    sweep = Sweep(directory=r.run_cfg.spool_dir)
    decided: list[tuple[int, int, str | None]] = []  # the work items, for the checkpoint
    try:
        # reads only: nothing clears the visibility map under the scan, so no reason to
        # decide with fewer connections while it runs
        await _scan_into(
            r, side, r.run_cfg.concurrency, lambda items: _decide(r, items, sweep, decided)
        )
        if r.stop.is_set():
            return
        log.info(
            "groups decided; renaming in heap order",
            renames=len(sweep),
            groups=r.stats.groups_done,
            sorted_on_disk_bytes=sweep.entries.disk_bytes,
            seconds=round(r.stats.elapsed(), 2),
        )
        async with anyio.create_task_group() as work:
            for _ in range(_worker_tasks(r.run_cfg)):
                work.start_soon(sweep.rename, r.worker(), r.pace.limiter, r.stop)
        if sweep.gone:
            r.stats.skip("no_longer_duplicate", sweep.gone)
        worker = r.worker()
        for group, pks in sweep.unplaceable.items():
            await worker.record_unplaceable(group, len(pks), pks)
        if r.stop.is_set():
            return
        await _decide_again(r, sorted(sweep.redo | sweep.giants))
        if r.stop.is_set():
            return
        for rng, seq, last_key in decided:
            r.checkpoints.complete(rng, seq, last_key)
    finally:
        sweep.close()


async def _decide(
    r: _Run,
    items: ObjectReceiveStream[WorkItem],
    sweep: Sweep,
    decided: list[tuple[int, int, str | None]],
) -> None:
    """Heap order's consumer: decides each item's groups into the sweep (a resume's retried
    groups are renamed at once, in key order: they are few and on record one by one)."""
    worker = r.worker()
    async with items:
        async for item in items:
            if r.stop.is_set() or not await r.throttle.wait_open():
                return
            try:
                if item.retry:
                    await worker.handle(item)
                else:
                    await worker.decide(item, sweep.add, sweep.giants)
            except Stopping:
                return
            if not item.retry:
                decided.append((item.range_index, item.seq, item.last_key))


async def _decide_again(r: _Run, keys: list[str]) -> None:
    """Groups the sweep hands back — their survivor changed, a chunk met contention that
    persisted, a giant group (rows may have joined it) — by key-order batches, each reading its
    groups under their locks and deciding on the data as it is now; --concurrency workers."""
    if not keys:
        return
    log.info("deciding again in key order", groups=len(keys))
    q = r.target.queries(r.cfg.state_schema)
    send, recv = anyio.create_memory_object_stream[WorkItem](max(2, r.run_cfg.concurrency))

    async def pack() -> None:
        async with send, r.pool.acquire() as conn:
            pending: list[Group] = []
            renames = 0
            for key in keys:
                n = int(await conn.fetchval(q.count_key, key))
                if n < 2:
                    continue  # no longer a duplicate
                pending.append(Group(key, n))
                renames += n - 1
                if renames >= r.pace.batch_size:
                    if not await _send_unless_stopping(
                        send, WorkItem(-1, 0, tuple(pending), None), r.stop
                    ):
                        return
                    pending, renames = [], 0
            if pending:
                await _send_unless_stopping(send, WorkItem(-1, 0, tuple(pending), None), r.stop)

    async def consume(items: ObjectReceiveStream[WorkItem]) -> None:
        worker = r.worker()
        async with items:
            async for item in items:
                if r.stop.is_set():
                    return
                async with r.pace.limiter:
                    try:
                        await worker.handle(item)
                    except Stopping:
                        return

    async with anyio.create_task_group() as tg:
        tg.start_soon(pack)
        async with recv:
            for _ in range(_worker_tasks(r.run_cfg)):
                tg.start_soon(consume, recv.clone())


async def _produce(r: _Run, scope: anyio.CancelScope) -> None:
    """Fill the spool: a resume's retried groups first, then the scan of the key ranges."""
    producer = _Producer(r.spool, r.checkpoints, r.pace)

    async def on_page(rng: int, groups: list[Group], last_key: str | None) -> None:
        r.largest.add(groups)
        await producer.on_page(rng, groups, last_key)

    with scope:
        try:
            if r.resumed is not None:
                # the groups the earlier process skipped, before the unfinished ranges
                await _produce_retries(r.pool, r.st, r.run_id, r.spool, r.pace, r.stats)
            await _scan_groups(
                r.pool,
                r.target,
                r.ranges,
                r.run_cfg.scan.page_size,
                r.stats,
                on_page,
                producer.finish_range,
                r.stop,
                r.throttle.wait_open,
            )
            r.stats.scan_seconds = r.stats.elapsed()
            # Renames clear the visibility map of the pages they touch, and every cleared page
            # turns the scan's index-only reads into heap reads: few workers while the scan
            # runs, all of them once it is done.
            r.pace.scan_finished()
            log.info(
                "scan finished",
                seconds=round(r.stats.scan_seconds, 2),
                groups=r.stats.groups_found,
                spooled_bytes=r.spool.peak_disk_bytes,
            )
        finally:
            r.spool.close()


async def _pump(
    spool: Spool[WorkItem], send: ObjectSendStream[WorkItem], stop: anyio.Event
) -> None:
    # spool -> bounded stream: the workers' backpressure stops here, not at the scan
    async with send:
        while (item := await spool.get()) is not None:
            if stop.is_set() or not await _send_unless_stopping(send, item, stop):
                return


async def _send_unless_stopping(
    send: ObjectSendStream[WorkItem], item: WorkItem, stop: anyio.Event
) -> bool:
    """Send, unless every consumer has left because the run is stopping (a consumer returns
    on a stop while the sender waits for room: the stream is then broken, which is no error)."""
    try:
        await send.send(item)
    except anyio.BrokenResourceError:
        if stop.is_set():
            return False
        raise
    return True


async def _consume(r: _Run, items: ObjectReceiveStream[WorkItem]) -> None:
    worker = r.worker()
    limiter, stop = r.pace.limiter, r.stop
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
                r.checkpoints.complete(item.range_index, item.seq, item.last_key)


async def _save_checkpoints(r: _Run) -> None:
    while True:
        await anyio.sleep(CHECKPOINT_INTERVAL)
        # shielded: a cancel mid-query would leave the control connection unusable
        with (
            anyio.CancelScope(shield=True),
            contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError),
        ):
            await state.save_progress(
                r.control,
                r.st,
                r.run_id,
                groups=r.stats.groups_done,
                renamed=r.stats.renamed,
                skipped=r.stats.skipped_rows,
                checkpoint=r.checkpoint(),
            )
        if r.control.is_closed():
            # The run lock went with that session (server restart, terminated backend):
            # another process may take the run now, so this one must not go on.
            log.error("lost the connection holding the run lock; stopping")
            r.stop.set()
            return


async def _stop_when_asked(r: _Run, scan_scope: anyio.CancelScope) -> None:
    await r.stop.wait()
    # Stop taking work: cancel the scan, drop what waits in the spool (the checkpoint
    # has not passed it: a resume scans it again); in-flight batches finish.
    scan_scope.cancel()
    r.spool.discard()
    r.throttle.wake()  # workers waiting out a pause leave their items


# --- run: finish ---------------------------------------------------------------------------


async def _finish_run(r: _Run) -> RunSummary:
    """However the run ended (its work done, a stop, an error): let go of what it holds here,
    settle its final status (`incomplete` while skipped groups remain on record), write it with
    the summary, and release the scan index. Raises ConnectError when the server cannot be
    told (the control connection is gone)."""
    r.spool.discard()
    if r.plan_fh is not None:
        r.plan_fh.close()
    r.reporter.close()
    control_lost = r.apply and r.control.is_closed()
    skipped = await _skipped_on_record(r.control, r.st, r.run_id, r.skips, r.stats, apply=r.apply)
    status = r.status
    if status == "completed" and skipped.total_groups:
        status = "incomplete"  # a resume retries exactly the groups on record
    await _sample_wal_end(r.control, r.stats)
    summary = _summary(r, status, skipped)
    if r.apply and not control_lost:
        control_lost = not await _finish(
            r.control,
            r.st,
            r.run_id,
            status=status,
            stats=r.stats,
            base_renamed=r.resumed.renamed if r.resumed else 0,
            checkpoint=r.checkpoint(),
            summary=summary,
            run_lock=r.run_lock,
        )
    if r.scan_lease is not None and not control_lost:
        await _release_scan_index(r.scan_lease, r.run_cfg, status)
    if control_lost:
        # The run cannot be marked: it stays "running", resumable from its last saved
        # checkpoint (work after it is found again by the scan, already-renamed groups
        # are no longer duplicates).
        raise ConnectError(
            f"lost the connection to the server during run {r.run_id} (server restarted "
            "or session terminated); "
            "every committed batch is whole and audited: resume with "
            f"--run-id {r.run_id} once the server is back"
        )
    return summary


async def _sample_wal_end(control: Conn, stats: Stats) -> None:
    if stats.wal_start is not None and not control.is_closed():
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(FINISH_BUDGET),
            contextlib.suppress(*errors.DRIVER_ERRORS),
        ):
            stats.wal_end = await control.fetchval(sql.HEALTH_WAL_POSITION)


async def _release_scan_index(
    lease: scanindex.ScanIndexLease, run_cfg: RunConfig, status: str
) -> None:
    # A run that asked for a temporary index drops it, unless another run still
    # uses it: the last of them to end drops it.
    drop = (
        run_cfg.apply
        and status == "completed"
        and run_cfg.create_scan_index
        and not run_cfg.keep_scan_index
    )
    with anyio.CancelScope(shield=True), anyio.move_on_after(60):
        await lease.release(drop=drop)


class _Producer:
    """Packs the groups of each key range into work items of about the pace's current
    `batch_size` renames (a live `set --batch-size` applies from the next item on)."""

    def __init__(self, spool: Spool[WorkItem], checkpoints: state.Checkpoints, pace: Pace) -> None:
        self.spool = spool
        self.cp = checkpoints
        self.pace = pace
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
            if renames >= self.pace.batch_size:
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


async def _produce_retries(
    pool: asyncpg.Pool,
    st: sql.StateSql,
    run_id: str,
    spool: Spool[WorkItem],
    pace: Pace,
    stats: Stats,
) -> None:
    """Queue the groups an earlier process of this run skipped (`<state>.skipped`), in work
    items of about the pace's `batch_size` renames, marked `retry`: the checkpoint does not
    track them, the skipped table does (each resolved group's row is deleted)."""
    async with pool.acquire() as conn:
        pending: list[Group] = []
        renames = 0
        async for page in state.skipped_groups(conn, st, run_id):
            for key, rows in page:
                pending.append(Group(key, rows + 1))
                stats.found((pending[-1],))
                renames += rows
                if renames >= pace.batch_size:
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


def _summary(r: _Run, status: str, skipped: state.SkippedSummary) -> RunSummary:
    run_id, apply, target, stats, run_cfg = r.run_id, r.apply, r.target, r.stats, r.run_cfg
    ms = [s * 1000 for s in stats.batch_seconds]
    elapsed = stats.elapsed()
    retry = None
    if apply and skipped.total_groups and status in ("incomplete", "interrupted", "failed"):
        retry = resume_command(r.cfg, target, run_id)
    wal = stats.wal_bytes()
    wal_per_rename = round(wal / stats.renamed, 1) if wal is not None and stats.renamed else None
    # the impact governor's figures (None: --max-impact off)
    p99_ms, baseline_ms, budget = (
        r.governor.figures() if r.governor is not None else (None, None, None)
    )
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
            {"pk": s.pk, "old_value": s.old, "new_value": s.new, "survivor_pk": s.survivor_pk}
            for s in r.sample
        ),
        wal_bytes=wal,
        wal_bytes_per_rename=wal_per_rename,
        impact_p99_ms=p99_ms,
        impact_baseline_ms=baseline_ms,
        impact_target=budget,
        largest_groups=r.largest.largest(),
        table_rows=max(stats.estimated_rows, stats.scanned_rows),
        update_triggers=r.update_triggers,
        disable_triggers=run_cfg.disable_triggers,
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
        args += ["--pk", ",".join(_cli_ident(c) for c in target.pk_columns)]
    if target.scope:
        args += ["--scope", ",".join(_cli_ident(c) for c in target.scope)]
    if cfg.state_schema != DEFAULT_STATE_SCHEMA:
        args += ["--state-schema", _cli_ident(cfg.state_schema)]
    args += ["--run-id", run_id]
    return shlex.join(args)
