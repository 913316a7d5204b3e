"""`undo`: put back the values an applied run replaced, from its audit trail, newest change
first, in small locked batches audited as a run of their own. Rows the application changed
since are reported, never overwritten. Dry run by default."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import asyncpg
import structlog

from . import catalog, db, errors, retry, signals, sql, state, triggers
from .batching import LockBudget
from .catalog import Target
from .config import ConnectConfig, UndoConfig, redact_dsn
from .db import Conn
from .errors import BulkDedupeError, RunStateError, TargetError, from_driver
from .governor import Governor, first_of
from .pace import Pace
from .planner import equality_key
from .progress import Stats
from .results import UndoSummary
from .worker import batch_settings

log = structlog.get_logger(__name__)

CHANGED_SAMPLE = 10
UNDO_CONCURRENCY = 1  # one batch at a time, on a pool of one connection


@dataclass(frozen=True, slots=True)
class _Change:
    id: int
    pk: str
    old: str
    new: str


class _StaleBatch(Exception):
    """Fewer rows restored than were found holding the run's value under lock: retry."""


_FAILURES: tuple[type[BaseException], ...] = (*errors.DRIVER_ERRORS, _StaleBatch)


@dataclass
class _Tally:
    changes: int = 0
    restored: int = 0
    already: int = 0
    changed: int = 0
    deleted: int = 0
    batches: int = 0
    retries: int = 0
    changed_sample: list[str] = field(default_factory=list)
    sample: list[dict[str, Any]] = field(default_factory=list)
    char_semantics: bool = False  # bpchar: trailing blanks do not count, as in the column

    def same(self, current: str | None, value: str) -> bool:
        """Whether the row's current value is `value`, as the column's equality says."""
        return current is not None and equality_key(
            current, char_semantics=self.char_semantics
        ) == equality_key(value, char_semantics=self.char_semantics)

    def classify(self, c: _Change, present: bool, current: str | None) -> bool:
        """Count one audit row against the row's current value; True if it is to be restored."""
        self.changes += 1
        if not present:
            self.deleted += 1
            return False
        if self.same(current, c.new):
            return True
        if self.same(current, c.old):
            self.already += 1
        else:
            self.changed += 1
            if len(self.changed_sample) < CHANGED_SAMPLE:
                self.changed_sample.append(c.pk)
        return False

    def restored_rows(self, rows: list[_Change], sample_size: int) -> None:
        self.restored += len(rows)
        for c in rows[: max(sample_size - len(self.sample), 0)]:
            self.sample.append({"pk": c.pk, "from": c.new, "to": c.old})


def _blocking_hint(target: Target, rows: list[asyncpg.Record]) -> tuple[str, str]:
    """What stands in the way (the first unique index or constraint on the key) and the
    statement that removes it."""
    r = rows[0]
    if r["conname"]:
        what = f"unique constraint {r['conname']}"
        how = f"ALTER TABLE {target.qualified} DROP CONSTRAINT {sql.quote_ident(r['conname'])}"
    elif target.partitions is not None:
        # a partitioned index cannot be dropped CONCURRENTLY (its partitions' go with it)
        what = f"unique index {r['schema']}.{r['index_name']}"
        how = sql.drop_partitioned_index(r["schema"], r["index_name"])
    else:
        what = f"unique index {r['schema']}.{r['index_name']}"
        how = f"DROP INDEX CONCURRENTLY {sql.qualify(r['schema'], r['index_name'])}"
    return what, how


async def _find_run(conn: Conn, st: sql.StateSql, run_id: str, *, write: bool) -> asyncpg.Record:
    # With `write`, also the privileges to record the undo as a run of its own, checked here,
    # before anything changes.
    if not await state.schema_exists(conn, st, write=write):
        raise RunStateError(
            f"run {run_id} not found: the state schema {st.schema} does not exist "
            "(no run was applied on this database; check --state-schema)"
        )
    row = await conn.fetchrow(st.get_run, run_id)
    if row is None:
        raise RunStateError(
            f"run {run_id} not found in {st.runs}; list the runs with `bulkdedupe runs`"
        )
    if row["command"] == "undo":
        raise RunStateError(
            f"run {run_id} is itself an undo; it cannot be undone (to rename the duplicates "
            "again, use `bulkdedupe run --apply`)"
        )
    return row


async def _resolve(conn: Conn, cfg: ConnectConfig, run: asyncpg.Record, write: bool) -> Target:
    # The audit's pk column(s) are the run's, whatever --pk says now.
    recorded = state.recorded_pk(run)
    target = await catalog.resolve(conn, replace(cfg, pk=cfg.pk_columns or recorded))
    if run["table_name"] != target.display or run["key_column"] != target.key:
        raise RunStateError(
            f"run {run['run_id']} was on {run['table_name']}.{run['key_column']}, not "
            f"{target.display}.{target.key}; pass --table and --key of that run"
        )
    if recorded != target.pk_columns:
        raise RunStateError(
            f"run {run['run_id']} recorded rows by {','.join(recorded)}, not {target.pk}; "
            f"pass --pk {','.join(recorded)}"
        )
    await catalog.check_privileges(conn, target, write=write)
    if write:
        catalog.check_writable(await catalog.server_info(conn))
    return target


class _Undoer:
    def __init__(self, ucfg: UndoConfig, target: Target, state_schema: str) -> None:
        self.ucfg = ucfg
        self.target = target
        self.run_id: str | None = None  # the undo's own run, once registered
        self.tally = _Tally(char_semantics=target.key_is_char)
        self.q = target.queries(state_schema)
        self.u = sql.UndoSql(self.q)
        # set by run() once the server says which --wal-compression it can have
        self.settings = batch_settings(ucfg.lock_timeout, ucfg.statement_timeout, None)
        # the governor's figures once it has paced the restores: probe p99, baseline, budget
        self.impact: tuple[float | None, float | None, float | None] = (None, None, None)

    async def preview(self, conn: Conn, stop: anyio.Event) -> None:
        """Dry run: classify every audit row against current data, without locks or writes."""
        cursor = sql.MAX_BIGINT
        while not stop.is_set():
            rows = await conn.fetch(
                self.u.preview_page, self.ucfg.run_id, cursor, self.ucfg.batch_size
            )
            if not rows:
                return
            restore = []
            for r in rows:
                c = _Change(r["id"], r["pk"], r["old_value"], r["new_value"])
                if self.tally.classify(c, r["present"], r["current"]):
                    restore.append(c)
            self.tally.restored_rows(restore, self.ucfg.sample_size)
            self.tally.batches += 1
            cursor = rows[-1]["id"]

    async def apply(self, control: Conn, pool: asyncpg.Pool, stop: anyio.Event, pace: Pace) -> None:
        """Restore, newest change first, each batch as big and as soon as `pace` allows."""
        cursor = sql.MAX_BIGINT
        while not stop.is_set():
            pace.stats.renamed = self.tally.restored  # what the pace has been spent on
            await pace.wait_turn(stop)
            if stop.is_set():
                return
            size = pace.sizer.size  # under the lock budget and the governor's cap
            page = await control.fetch(self.u.changes_page_desc, self.ucfg.run_id, cursor, size)
            if not page:
                return
            batch: list[_Change] = []
            seen: set[str] = set()
            for r in page:
                if r["pk"] in seen:  # a row renamed twice: its older change goes next batch
                    break
                seen.add(r["pk"])
                batch.append(_Change(r["id"], r["pk"], r["old_value"], r["new_value"]))
            await self._with_retries(pool, batch)
            cursor = batch[-1].id

    async def _with_retries(self, pool: asyncpg.Pool, batch: list[_Change]) -> None:
        attempt = 0
        while True:
            try:
                restore, counted = await self._transaction(pool, batch)
            except asyncpg.UniqueViolationError as exc:
                raise TargetError(
                    f"restoring violates unique index {exc.constraint_name} (created during the "
                    "undo?); drop it first, then undo again: the batch was rolled back"
                ) from exc
            except _FAILURES as exc:
                if not isinstance(exc, _StaleBatch) and not errors.retryable(exc):
                    raise from_driver(exc, what="undo batch") from exc
                attempt += 1
                self.tally.retries += 1
                if attempt > self.ucfg.max_retries:
                    raise BulkDedupeError(
                        f"undo batch failed {attempt} times ({type(exc).__name__}: {exc}); "
                        "nothing of that batch was written: run the same undo again, it goes on "
                        "where it stopped"
                    ) from exc
                await retry.wait(attempt, retry.BATCH)
                continue
            # Counted only once the batch committed, so retries do not count twice.
            self.tally.changes += len(restore)
            for c, present, current in counted:
                self.tally.classify(c, present, current)
            self.tally.restored_rows(restore, self.ucfg.sample_size)
            self.tally.batches += 1
            return

    async def _transaction(
        self, pool: asyncpg.Pool, batch: list[_Change]
    ) -> tuple[list[_Change], list[tuple[_Change, bool, str | None]]]:
        """One batch, one transaction: advisory locks on every value involved (old and new, in
        the engine's global order), the rows locked and re-read, restored only where they
        still hold the value the run gave them."""
        assert self.run_id is not None
        values = sorted({c.old for c in batch} | {c.new for c in batch})
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetch(*self.settings)
            await conn.fetch(self.q.lock_keys, values, self.target.lock_prefix)
            rows = await conn.fetch(self.u.lock_rows, [c.pk for c in batch])
            current = {r["pk"]: r["current"] for r in rows}
            restore: list[_Change] = []
            counted: list[tuple[_Change, bool, str | None]] = []
            for c in batch:
                present = c.pk in current
                value = current.get(c.pk)
                if present and self.tally.same(value, c.new):
                    restore.append(c)
                else:
                    counted.append((c, present, value))
            if restore:
                status = await conn.execute(
                    self.u.restore,
                    [c.pk for c in restore],
                    [c.new for c in restore],
                    [c.old for c in restore],
                    self.run_id,
                )
                if int(status.split()[-1]) != len(restore):
                    raise _StaleBatch(f"expected {len(restore)} restores, wrote {status}")
        return restore, counted


async def undo(
    cfg: ConnectConfig,
    ucfg: UndoConfig,
    *,
    handle_signals: bool = False,
    stop: anyio.Event | None = None,
) -> UndoSummary:
    """Revert run `ucfg.run_id`: a dry run (default; writes nothing) or, with apply, restore.

    Refuses, before changing anything, while a unique index on the key would reject the old
    values. Set `stop` (or send SIGINT/SIGTERM with `handle_signals`) to stop after the batch
    in flight; running the same undo again goes on where it stopped.
    """
    stop = stop or anyio.Event()
    # SIGINT/SIGTERM set `stop` from before the first query to the summary
    with signals.stop_on_signal(stop, enabled=handle_signals):
        return await _undo(cfg, ucfg, stop)


async def _undo(cfg: ConnectConfig, ucfg: UndoConfig, stop: anyio.Event) -> UndoSummary:
    started = anyio.current_time()
    st = sql.StateSql(cfg.state_schema)
    status = "failed"
    undo_run_id: str | None = None
    try:
        async with errors.boundary("undo"), db.connect(cfg) as control:
            run = await _find_run(control, st, ucfg.run_id, write=ucfg.apply)
            target = await _resolve(control, cfg, run, ucfg.apply)
            # restores move rows back across partitions as the renames did (the dry run too)
            catalog.check_row_movement(target, ucfg.allow_row_movement)
            if ucfg.disable_triggers:  # refused before anything changes (the dry run too)
                await triggers.check_may_disable(control, target)
            # Hold the undone run's own lock: it must not be executing (or resumed) meanwhile.
            source_lock = state.RunLock(control, ucfg.run_id)
            await source_lock.acquire()
            undoer = _Undoer(ucfg, target, cfg.state_schema)
            tally = undoer.tally
            blocking = [
                r
                for r in await control.fetch(
                    sql.UNIQUE_INDEXES_ON_COLUMN, target.oid, target.key_attnum
                )
                # a primary key holds the key only where the key partitions the table; a row
                # keeps the rest of its primary key, so restoring its value cannot collide there
                if not (r["indisprimary"] and target.key in target.pk_columns)
            ]
            blocked_by = None
            if blocking and await control.fetchval(undoer.u.any_restorable, ucfg.run_id):
                what, how = _blocking_hint(target, blocking)
                blocked_by = f"{what}; drop it first: {how}"
                if ucfg.apply:
                    raise TargetError(
                        f"undo of run {ucfg.run_id} would put duplicates back into "
                        f"{target.display}.{target.key}, which {what} rejects; nothing was "
                        f"changed: drop it first ({how}), then undo again"
                    )
            structlog.contextvars.bind_contextvars(undo_of=ucfg.run_id, table=target.display)
            if not ucfg.apply:
                await undoer.preview(control, stop)
                status = "blocked" if blocked_by else "completed"
                if stop.is_set():
                    status = "interrupted"
            else:
                status = await _apply(cfg, ucfg, control, st, target, undoer, stop)
                undo_run_id = undoer.run_id
            await source_lock.release()
    finally:
        structlog.contextvars.unbind_contextvars("undo_of", "table")
    return UndoSummary(
        run_id=undo_run_id,
        undo_of=ucfg.run_id,
        mode="apply" if ucfg.apply else "dry-run",
        status=status,
        table=target.display,
        key=target.key,
        changes=tally.changes,
        restored=tally.restored,
        already_restored=tally.already,
        changed_since=tally.changed,
        deleted_since=tally.deleted,
        changed_sample=tuple(tally.changed_sample),
        blocked_by=blocked_by,
        batches=tally.batches,
        retries=tally.retries,
        duration_s=round(anyio.current_time() - started, 3),
        sample=tuple(tally.sample),
        impact_p99_ms=undoer.impact[0],
        impact_baseline_ms=undoer.impact[1],
        impact_target=undoer.impact[2],
    )


async def _apply(
    cfg: ConnectConfig,
    ucfg: UndoConfig,
    control: Conn,
    st: sql.StateSql,
    target: Target,
    undoer: _Undoer,
    stop: anyio.Event,
) -> str:
    """Register the undo as a run of its own, restore batch by batch, record how it ended."""
    info = await catalog.server_info(control)
    method = await catalog.wal_compression(control, ucfg.wal_compression, info.version_num)
    undoer.settings = batch_settings(
        ucfg.lock_timeout, ucfg.statement_timeout, method, ucfg.disable_triggers
    )
    # Two advisory locks per change (its old and its restored value), as a rename batch;
    # fixed batches (no --target-batch-time), only ever lowered by the governor.
    pace = Pace(
        stats=Stats(),
        budget=LockBudget(info.lock_slots),
        batch_size=ucfg.batch_size,
        min_batch_size=1,
        concurrency=UNDO_CONCURRENCY,
    )
    # what a newer release added to the state schema (the probe's heartbeat, skipped groups)
    await state.ensure_schema(control, st)
    undo_run_id = state.new_run_id()
    undo_lock = state.RunLock(control, undo_run_id)
    await undo_lock.acquire()
    await state.start_run(
        control,
        st,
        target,
        run_id=undo_run_id,
        command="undo",
        options={
            "undo_of": ucfg.run_id,
            "batch_size": ucfg.batch_size,
            "lock_timeout": ucfg.lock_timeout,
            "statement_timeout": ucfg.statement_timeout,
            "wal_compression": method or "server",
            "disable_triggers": ucfg.disable_triggers,
            "allow_row_movement": ucfg.allow_row_movement,
        },
        database_url=redact_dsn(cfg.database_url),
    )
    undoer.run_id = undo_run_id
    log.info(
        "undo started",
        run_id=undo_run_id,
        wal_compression=method or "server",
        # lower than batch_size when the server's lock table is small (LockBudget)
        batch_ceiling=pace.ceiling,
    )
    status = "failed"
    t = undoer.tally
    governor = None
    if ucfg.impact.max_impact is not None:
        governor = Governor(cfg, ucfg.impact, pace.stats, undo_run_id, cfg.state_schema, pace=pace)
    try:
        async with (
            db.pool(cfg, size=UNDO_CONCURRENCY, statement_timeout=ucfg.statement_timeout) as pool,
            anyio.create_task_group() as tg,
        ):
            if governor is not None:
                # paced as a run is: the baseline first, then the probe holds the restores
                tg.start_soon(governor.run)
                await first_of(governor.wait_baseline, stop.wait)
            await undoer.apply(control, pool, stop, pace)
            tg.cancel_scope.cancel()
        status = "interrupted" if stop.is_set() else "completed"
    finally:
        if governor is not None:
            undoer.impact = governor.figures()
        p99_ms, baseline_ms, budget = undoer.impact
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await state.finish_run(
                control,
                st,
                undo_run_id,
                status=status,
                groups=0,
                renamed=t.restored,
                skipped=t.changed + t.deleted,
                checkpoint={},
                summary={
                    "undo_of": ucfg.run_id,
                    "restored": t.restored,
                    "already_restored": t.already,
                    "changed_since": t.changed,
                    "deleted_since": t.deleted,
                    "changed_sample": t.changed_sample,
                    # as a run's summary has them: `status` of the finished undo shows them
                    "impact_p99_ms": p99_ms,
                    "impact_baseline_ms": baseline_ms,
                    "impact_target": budget,
                },
            )
            await undo_lock.release()
    return status
