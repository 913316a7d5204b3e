"""`enforce`: build the UNIQUE index on the key CONCURRENTLY, converging against live traffic
(duplicates that broke the build are renamed by the engine, then it builds again), optionally
attach it as a constraint, and prove that a duplicate is rejected. Never leaves an invalid index."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
import asyncpg
import structlog

from . import catalog, db, errors, pipeline, retry, signals, sql, state, triggers
from .catalog import Target
from .config import ConnectConfig, EnforceConfig
from .db import Conn
from .errors import BulkDedupeError, RunStateError, TargetError
from .results import EnforceAttempt, EnforceResult, RunSummary

log = structlog.get_logger(__name__)

# A failed build for one of these reasons is simply tried again (it still counts as an attempt).
RETRYABLE_BUILD: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,  # someone ran pg_cancel_backend on the build
)
PROOF_STATEMENT_TIMEOUT = "30s"
_MAX_IDENT_BYTES = 63


def default_index_name(table: str, key: str) -> str:
    """`<table>_<key>_key`, PostgreSQL's own name for a unique constraint, cut to 63 bytes
    (the suffix is kept so the name still says what it is)."""
    suffix = "_key"
    head = f"{table}_{key}".encode()[: _MAX_IDENT_BYTES - len(suffix)]
    return head.decode("utf-8", "ignore") + suffix


@dataclass(frozen=True, kw_only=True)
class IndexState:
    """What the catalog says about the relation that carries the index's name."""

    oid: int
    relkind: str
    on_table: bool
    unique: bool
    valid: bool
    matches: bool  # unique btree on exactly the key column, no predicate, no expression
    definition: str | None
    constraint: str | None

    @property
    def is_index(self) -> bool:
        return self.relkind in ("i", "I")


async def inspect_index(conn: Conn, target: Target, name: str) -> IndexState | None:
    row = await conn.fetchrow(sql.INDEX_BY_NAME, target.schema, name)
    if row is None:
        return None
    on_table = row["indrelid"] == target.oid
    matches = bool(
        on_table
        and row["indisunique"]
        and row["indnatts"] == 1
        and row["first_attnum"] == target.key_attnum
        and row["is_full"]
        and row["is_plain"]
        and row["amname"] == "btree"
        and row["collation"] == target.key_collation
    )
    return IndexState(
        oid=row["oid"],
        relkind=row["relkind"],
        on_table=on_table,
        unique=bool(row["indisunique"]),
        valid=bool(row["indisvalid"]),
        matches=matches,
        definition=row["definition"],
        constraint=row["conname"],
    )


class _Enforcer:
    def __init__(
        self, cfg: ConnectConfig, ecfg: EnforceConfig, target: Target, stop: anyio.Event
    ) -> None:
        self.cfg = cfg
        self.ecfg = ecfg
        self.target = target
        self.stop = stop
        self.name = ecfg.index_name or default_index_name(target.table, target.key)
        self.phases: list[tuple[str, float]] = []
        self.attempts: list[EnforceAttempt] = []
        self.dropped = 0
        self.build_scope: anyio.CancelScope | None = None
        self.build_pid: int | None = None  # server pid of our last CREATE INDEX CONCURRENTLY

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = anyio.current_time()
        try:
            yield
        finally:
            self.phases.append((name, anyio.current_time() - started))

    def _where(self) -> str:
        return f"{self.target.schema}.{self.name}"

    def _drop_hint(self) -> str:
        return f"DROP INDEX CONCURRENTLY {sql.qualify(self.target.schema, self.name)}"

    async def cancel_build_on_stop(self) -> None:
        await self.stop.wait()
        if self.build_scope is not None:
            self.build_scope.cancel()

    # --- the steps ---------------------------------------------------------------------------

    async def check_existing(self, conn: Conn) -> IndexState | None:
        """The index of that name: None (build it), valid and matching (nothing to build), or
        invalid and ours to replace. Anything else is somebody else's object: refuse."""
        idx = await inspect_index(conn, self.target, self.name)
        if idx is None:
            return None
        if not idx.is_index:
            raise TargetError(
                f"{self._where()} exists and is not an index (relkind {idx.relkind!r}); "
                "pass --index-name NAME"
            )
        if not idx.matches:
            state_word = "valid" if idx.valid else "INVALID"
            raise TargetError(
                f"index {self._where()} exists ({state_word}) with another definition: "
                f"{idx.definition}; pass --index-name NAME, or drop it ({self._drop_hint()})"
            )
        if not idx.valid:
            busy = await conn.fetchrow(sql.INDEX_BUILD_IN_PROGRESS, idx.oid)
            if busy is not None:
                raise RunStateError(
                    f"index {self._where()} is being built right now by backend pid "
                    f"{busy['pid']} ({busy['phase']}); wait for it to end, then run enforce again"
                )
        return idx

    async def drop_if_invalid(self, conn: Conn) -> bool:
        """Drop the index of our name if it is an invalid index on our key (a failed build).
        A build still running elsewhere is left alone; our own cancelled build is waited for
        (the server may still be unwinding it), so the drop never races a build."""
        while True:
            idx = await inspect_index(conn, self.target, self.name)
            if idx is None or not idx.is_index or idx.valid or not idx.matches:
                return False
            busy = await conn.fetchrow(sql.INDEX_BUILD_IN_PROGRESS, idx.oid)
            if busy is None:
                break
            if busy["pid"] != self.build_pid:
                log.warning(
                    "not dropping the invalid index: another session is building it",
                    index=self._where(),
                    pid=busy["pid"],
                )
                return False
            await anyio.sleep(0.1)
        log.info("dropping invalid index concurrently", index=self._where())
        await conn.execute(sql.drop_index_concurrently(self.target.schema, self.name))
        self.dropped += 1
        return True

    async def cleanup(self) -> None:
        """Shielded, on a fresh connection (the build's may be broken): no invalid index may
        outlive the command, whatever stopped it."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.ecfg.cleanup_timeout) as t:
            try:
                async with db.connect(self.cfg) as conn:
                    await conn.fetchval(sql.SET_DDL_SESSION)
                    await self.drop_if_invalid(conn)
            except (BulkDedupeError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                log.error(
                    "could not drop the invalid index; drop it by hand",
                    index=self._where(),
                    sql=self._drop_hint(),
                    error=str(e),
                )
        if t.cancelled_caught:
            log.error(
                "timed out dropping the invalid index; drop it by hand",
                index=self._where(),
                sql=self._drop_hint(),
            )

    async def build_once(self) -> tuple[str, str | None]:
        """One CREATE UNIQUE INDEX CONCURRENTLY on its own connection (it cannot run in a
        transaction and may take long: no statement_timeout). Returns (outcome, error)."""
        create = sql.create_unique_index_concurrently(
            self.name, self.target.qualified, self.target.key
        )
        async with db.connect(self.cfg) as conn:
            await conn.fetchval(sql.SET_DDL_SESSION)
            self.build_pid = conn.get_server_pid()
            if self.stop.is_set():
                return "interrupted", None
            with anyio.CancelScope() as scope:
                self.build_scope = scope
                try:
                    await conn.execute(create)
                    return "built", None
                except asyncpg.UniqueViolationError as exc:
                    return "duplicates", exc.detail or str(exc)
                except RETRYABLE_BUILD as exc:
                    return "retryable", f"{type(exc).__name__}: {exc}"
                finally:
                    self.build_scope = None
            return "interrupted", None

    async def dedupe(self, number: int) -> tuple[str, RunSummary]:
        run_id = f"{state.new_run_id()}-enforce{number}"
        run_cfg = replace(self.ecfg.dedupe, apply=True, run_id=run_id, create_scan_index=True)
        log.info("duplicates arrived since the dedupe: renaming them", run_id=run_id)
        summary = await pipeline.run(self.cfg, run_cfg, stop=self.stop)
        return run_id, summary

    async def converge(self) -> str:
        """Build until the index stands, at most max_attempts times. Returns the status."""
        for number in range(1, self.ecfg.max_attempts + 1):
            started = anyio.current_time()
            with self.phase(f"build (attempt {number})"):
                outcome, error = await self.build_once()
            build_s = anyio.current_time() - started
            if outcome == "built":
                self.attempts.append(
                    EnforceAttempt(number=number, outcome=outcome, build_s=build_s)
                )
                return "created"
            log.warning("unique index not built", attempt=number, outcome=outcome, error=error)
            with self.phase(f"drop invalid index (attempt {number})"):
                await self.cleanup()
            attempt = EnforceAttempt(number=number, outcome=outcome, build_s=build_s, error=error)
            if outcome == "interrupted":
                self.attempts.append(attempt)
                return "interrupted"
            if number == self.ecfg.max_attempts:
                self.attempts.append(attempt)
                break
            if outcome == "duplicates":
                started = anyio.current_time()
                with self.phase(f"dedupe (attempt {number})"):
                    run_id, summary = await self.dedupe(number)
                attempt = replace(
                    attempt,
                    dedupe_run_id=run_id,
                    rows_renamed=summary.rows_renamed,
                    rows_skipped=summary.failed_rows,
                    dedupe_s=anyio.current_time() - started,
                )
                self.attempts.append(attempt)
                if summary.status == "interrupted":
                    return "interrupted"
            else:
                self.attempts.append(attempt)
                await retry.wait(number, retry.BUILD)
        return "not_converged"

    async def attach_constraint(self, conn: Conn, idx_oid: int) -> str:
        """ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX: it needs an ACCESS EXCLUSIVE
        lock for an instant, so it waits at most lock_timeout (queries queue behind a waiting
        ALTER) and tries again later."""
        t = self.target
        existing = await conn.fetchrow(sql.CONSTRAINT_BY_NAME, t.oid, self.name)
        if existing is not None:
            if existing["conindid"] == idx_oid and existing["contype"] in ("u", "p"):
                return "already_attached"
            raise TargetError(
                f"{t.display} already has a constraint named {self.name} that does not use "
                "this index; pass --index-name NAME"
            )
        timeout = f"{int(self.ecfg.lock_timeout * 1000)}ms"
        statement = sql.add_unique_constraint_using_index(t.qualified, self.name)
        for attempt in range(self.ecfg.attach_retries + 1):
            try:
                async with conn.transaction():
                    await conn.fetchval(sql.SET_LOCAL_LOCK_TIMEOUT, timeout)
                    await conn.execute(statement)
                return "attached"
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
                log.warning("constraint attach could not get its lock", attempt=attempt + 1)
                error: BaseException = exc
            if self.stop.is_set():
                break
            await retry.wait(attempt, retry.DDL_LOCK)
        raise BulkDedupeError(
            f"could not lock {t.display} to attach constraint {self.name} within "
            f"{self.ecfg.lock_timeout:g}s in {self.ecfg.attach_retries + 1} tries ({error}); the "
            "unique index is built and valid: run `enforce --constraint` again when it is quieter"
        )

    async def prove(self, conn: Conn) -> tuple[bool | None, str]:
        """Give one row another row's key inside a transaction that is always rolled back: a
        unique index must refuse it. Returns (rejected, explanation)."""
        t = self.target
        probe = sql.prove_duplicate_rejected(t.qualified, t.key, t.pk)
        tx = conn.transaction()
        await tx.start()
        try:
            await conn.fetch(
                sql.SET_BATCH_TIMEOUTS,
                f"{int(self.ecfg.lock_timeout * 1000)}ms",
                PROOF_STATEMENT_TIMEOUT,
            )
            # A DEFERRABLE INITIALLY DEFERRED constraint would only complain at COMMIT.
            await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            try:
                changed = await conn.fetchval(probe)
            except asyncpg.UniqueViolationError as exc:
                return True, f"yes (rejected by {exc.constraint_name}, rolled back)"
            except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
                return None, f"not tried: rows busy ({type(exc).__name__})"
            if changed is None:
                return None, "not tried: needs two rows, one of them with a key"
            return False, f"NO: row {changed} took a duplicate key (rolled back)"
        finally:
            await tx.rollback()


async def _resolve(conn: Conn, cfg: ConnectConfig) -> Target:
    info = await catalog.server_info(conn)
    target = await catalog.resolve(conn, cfg)
    await catalog.check_privileges(conn, target, write=True)
    await catalog.check_owner(conn, target, why="enforce builds a unique index on it")
    catalog.check_writable(info)
    return target


async def enforce(
    cfg: ConnectConfig,
    ecfg: EnforceConfig | None = None,
    *,
    handle_signals: bool = False,
    stop: anyio.Event | None = None,
) -> EnforceResult:
    """Make the key column UNIQUE with an index built CONCURRENTLY (see the module docstring).

    Set `stop` (or send SIGINT/SIGTERM with `handle_signals`) to stop: a running build is
    cancelled, a running dedupe finishes its in-flight batches, and the invalid index is dropped.
    """
    ecfg = ecfg or EnforceConfig()
    stop = stop or anyio.Event()
    started = anyio.current_time()
    async with errors.boundary("enforce"), db.connect(cfg) as conn:
        await conn.fetchval(sql.SET_DDL_SESSION)
        target = await _resolve(conn, cfg)
        if ecfg.dedupe.disable_triggers:  # its dedupe runs' renames: refused before any change
            await triggers.check_may_disable(conn, target)
        if not await conn.fetchval(sql.ENFORCE_LOCK, target.lock_prefix):
            raise RunStateError(
                f"another bulkdedupe enforce is running on {target.display}.{target.key}; "
                "wait for it to finish"
            )
        e = _Enforcer(cfg, ecfg, target, stop)
        structlog.contextvars.bind_contextvars(table=target.display, index=e.name)
        tasks: list[Callable[[], Coroutine[Any, Any, None]]] = [e.cancel_build_on_stop]
        if handle_signals:
            tasks.append(lambda: signals.set_on_signal(stop))
        status = "already_enforced"
        try:
            async with signals.alongside(*tasks):
                with e.phase("inspect"):
                    idx = await e.check_existing(conn)
                if idx is not None and not idx.valid:
                    with e.phase("drop invalid index"):
                        await e.drop_if_invalid(conn)
                    idx = None
                if idx is None:
                    status = await e.converge()
                if status in ("created", "already_enforced"):
                    idx = await inspect_index(conn, target, e.name)
                    if idx is None or not idx.valid:  # dropped under us: say so, do not pretend
                        raise TargetError(f"index {e._where()} vanished after it was built")
                    constraint_status = None
                    if ecfg.constraint:
                        with e.phase("attach constraint"):
                            constraint_status = await e.attach_constraint(conn, idx.oid)
                    with e.phase("prove"):
                        rejected, proof = await e.prove(conn)
                    idx = await inspect_index(conn, target, e.name)
                    assert idx is not None
                    if rejected is False:
                        raise TargetError(
                            f"index {e._where()} is valid and unique but a duplicate was accepted "
                            "(rolled back); check its definition"
                        )
                else:
                    constraint_status, rejected = None, None
                    proof = "not tried: no index"
        except BaseException:
            await e.cleanup()
            raise
        finally:
            structlog.contextvars.unbind_contextvars("table", "index")
    return EnforceResult(
        table=target.display,
        key=target.key,
        index=e.name,
        status=status,
        attempts=tuple(e.attempts),
        dropped_invalid=e.dropped,
        constraint=e.name if ecfg.constraint and constraint_status else None,
        constraint_status=constraint_status,
        index_valid=bool(idx and idx.valid),
        index_unique=bool(idx and idx.unique),
        duplicate_rejected=rejected,
        proof=proof,
        phases=tuple(e.phases),
        duration_s=anyio.current_time() - started,
    )
