"""`enforce`: build the UNIQUE index on the key CONCURRENTLY, converging against live traffic
(duplicates that broke the build are renamed by the engine, then it builds again), optionally
attach it as a constraint, and prove that a duplicate is rejected. Never leaves an invalid index.
A partitioned table gets the partitioned form of the same (see _PartitionedIndex)."""

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
    return index_name_for(table, (key,))


def index_name_for(table: str, columns: tuple[str, ...]) -> str:
    """`<table>_<col>_<col>_key`, as PostgreSQL names a unique constraint, cut to 63 bytes."""
    suffix = "_key"
    head = "_".join((table, *columns)).encode()[: _MAX_IDENT_BYTES - len(suffix)]
    return head.decode("utf-8", "ignore") + suffix


def index_columns(target: Target) -> tuple[str, ...]:
    """The unique index's columns: the scope's, then the key."""
    return (*target.scope, target.key)


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
    attached_to: int | None = None  # the partitioned index it is a partition of

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
        and list(row["attnums"]) == [*target.scope_attnums, target.key_attnum]
        and row["is_full"]
        and row["is_plain"]
        and row["amname"] == "btree"
        # the key's own collation, at the key's place (after the scope's columns)
        and list(row["collations"])[len(target.scope_attnums)] == target.key_collation
    )
    return _index_state(row, on_table=on_table, matches=matches, constraint=row["conname"])


def _index_state(
    row: asyncpg.Record,
    *,
    on_table: bool,
    matches: bool,
    constraint: str | None,
    attached_to: int | None = None,
) -> IndexState:
    return IndexState(
        oid=row["oid"],
        relkind=row["relkind"],
        on_table=on_table,
        unique=bool(row["indisunique"]),
        valid=bool(row["indisvalid"]),
        matches=matches,
        definition=row["definition"],
        constraint=constraint,
        attached_to=attached_to,
    )


@dataclass(frozen=True, kw_only=True)
class _Spot:
    """Where one index of a partitioned table's goes: the table (or partition) it is on, its
    name (in that table's schema) and columns."""

    schema: str
    name: str
    table_oid: int
    table: str  # quoted, qualified
    partition: str  # schema.name, for people
    columns: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return sql.qualify(self.schema, self.name)

    @property
    def where(self) -> str:
        return f"{self.schema}.{self.name}"


async def inspect_spot(conn: Conn, spot: _Spot) -> IndexState | None:
    """As inspect_index, for an index of a partitioned table's tree: matched by column names
    (a partition's attnums may differ from its parent's), in the order ATTACH requires."""
    row = await conn.fetchrow(sql.PARTITION_INDEX_BY_NAME, spot.schema, spot.name)
    if row is None:
        return None
    on_table = row["indrelid"] == spot.table_oid
    matches = bool(
        on_table
        and row["indisunique"]
        and tuple(row["columns"]) == spot.columns
        and row["no_include"]
        and row["is_full"]
        and row["is_plain"]
        and row["amname"] == "btree"
        and row["column_collations"]
    )
    return _index_state(
        row, on_table=on_table, matches=matches, constraint=None, attached_to=row["attached_to"]
    )


class _Enforcer:
    def __init__(
        self, cfg: ConnectConfig, ecfg: EnforceConfig, target: Target, stop: anyio.Event
    ) -> None:
        self.cfg = cfg
        self.ecfg = ecfg
        self.target = target
        self.stop = stop
        self.name = ecfg.index_name or index_name_for(target.table, index_columns(target))
        self.phases: list[tuple[str, float]] = []
        self.attempts: list[EnforceAttempt] = []
        self.dropped = 0
        self.build_scope: anyio.CancelScope | None = None
        self.build_pid: int | None = None  # server pid of our last CREATE INDEX CONCURRENTLY
        self.building: _Spot | None = None  # a partition's index being built (else the table's)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = anyio.current_time()
        try:
            yield
        finally:
            self.phases.append((name, anyio.current_time() - started))

    def add_time(self, name: str, seconds: float) -> None:
        """A phase made of many short steps (one per partition): one line, their sum."""
        for i, (p, s) in enumerate(self.phases):
            if p == name:
                self.phases[i] = (p, s + seconds)
                return
        self.phases.append((name, seconds))

    def _where(self, spot: _Spot | None = None) -> str:
        return spot.where if spot else f"{self.target.schema}.{self.name}"

    def _drop_hint(self, spot: _Spot | None = None) -> str:
        schema, name = (spot.schema, spot.name) if spot else (self.target.schema, self.name)
        return f"DROP INDEX CONCURRENTLY {sql.qualify(schema, name)}"

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

    async def drop_if_invalid(self, conn: Conn, spot: _Spot | None = None) -> bool:
        """Drop the index of our name if it is an invalid index on our key (a failed build).
        A build still running elsewhere is left alone; our own cancelled build is waited for
        (the server may still be unwinding it), so the drop never races a build. `spot`: a
        partition's index instead of the table's."""
        while True:
            if spot is None:
                idx = await inspect_index(conn, self.target, self.name)
            else:
                idx = await inspect_spot(conn, spot)
            if idx is None or not idx.is_index or idx.valid or not idx.matches:
                return False
            busy = await conn.fetchrow(sql.INDEX_BUILD_IN_PROGRESS, idx.oid)
            if busy is None:
                break
            if busy["pid"] != self.build_pid:
                log.warning(
                    "not dropping the invalid index: another session is building it",
                    index=self._where(spot),
                    pid=busy["pid"],
                )
                return False
            await anyio.sleep(0.1)
        log.info("dropping invalid index concurrently", index=self._where(spot))
        schema, name = (spot.schema, spot.name) if spot else (self.target.schema, self.name)
        await conn.execute(sql.drop_index_concurrently(schema, name))
        self.dropped += 1
        return True

    async def cleanup(self, spot: _Spot | None = None) -> None:
        """Shielded, on a fresh connection (the build's may be broken): no invalid index may
        outlive the command, whatever stopped it. `spot`: a partition's (default: the one
        being built, if any)."""
        spot = spot or self.building
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.ecfg.cleanup_timeout) as t:
            try:
                async with db.connect(self.cfg) as conn:
                    await conn.fetchval(sql.SET_DDL_SESSION)
                    await self.drop_if_invalid(conn, spot)
            except (BulkDedupeError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                log.error(
                    "could not drop the invalid index; drop it by hand",
                    index=self._where(spot),
                    sql=self._drop_hint(spot),
                    error=str(e),
                )
        if t.cancelled_caught:
            log.error(
                "timed out dropping the invalid index; drop it by hand",
                index=self._where(spot),
                sql=self._drop_hint(spot),
            )

    async def build_once(self, spot: _Spot | None = None) -> tuple[str, str | None]:
        """One CREATE UNIQUE INDEX CONCURRENTLY on its own connection (it cannot run in a
        transaction and may take long: no statement_timeout). Returns (outcome, error).
        `spot`: a partition's index instead of the table's."""
        if spot is None:
            create = sql.create_unique_index_concurrently_on(
                self.name, self.target.qualified, index_columns(self.target)
            )
        else:
            create = sql.create_unique_index_concurrently_on(spot.name, spot.table, spot.columns)
        self.building = spot
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

    async def converge(self, spot: _Spot | None = None) -> str:
        """Build until the index stands, at most max_attempts times. Returns the status.
        `spot`: a partition's index (its duplicates are renamed through the parent, by the
        same engine and audit: PostgreSQL routes each rename)."""
        on = f" {spot.partition}" if spot else ""
        for number in range(1, self.ecfg.max_attempts + 1):
            started = anyio.current_time()
            with self.phase(f"build{on} (attempt {number})"):
                outcome, error = await self.build_once(spot)
            build_s = anyio.current_time() - started
            if outcome == "built":
                self.building = None
                self.attempts.append(
                    EnforceAttempt(
                        number=number,
                        outcome=outcome,
                        build_s=build_s,
                        partition=spot.partition if spot else None,
                    )
                )
                return "created"
            log.warning("unique index not built", attempt=number, outcome=outcome, error=error)
            with self.phase(f"drop invalid index{on} (attempt {number})"):
                await self.cleanup(spot)
            attempt = EnforceAttempt(
                number=number,
                outcome=outcome,
                build_s=build_s,
                error=error,
                partition=spot.partition if spot else None,
            )
            if outcome == "interrupted":
                self.attempts.append(attempt)
                return "interrupted"
            if number == self.ecfg.max_attempts:
                self.attempts.append(attempt)
                break
            if outcome == "duplicates":
                started = anyio.current_time()
                with self.phase(f"dedupe{on} (attempt {number})"):
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
        statement = sql.add_unique_constraint_using_index(t.qualified, self.name)
        error = await self.under_lock_timeout(conn, statement, what="constraint attach")
        if error is None:
            return "attached"
        raise BulkDedupeError(
            f"could not lock {t.display} to attach constraint {self.name} within "
            f"{self.ecfg.lock_timeout:g}s in {self.ecfg.attach_retries + 1} tries ({error}); the "
            "unique index is built and valid: run `enforce --constraint` again when it is quieter"
        )

    async def under_lock_timeout(self, conn: Conn, statement: str, *, what: str) -> str | None:
        """DDL that needs a table or index lock for an instant: each try waits at most
        lock_timeout (queries queue behind a waiting lock), then backs off and tries again,
        attach_retries times. Returns None when done, else the last lock error."""
        timeout = f"{int(self.ecfg.lock_timeout * 1000)}ms"
        error: BaseException | None = None
        for attempt in range(self.ecfg.attach_retries + 1):
            try:
                async with conn.transaction():
                    await conn.fetchval(sql.SET_LOCAL_LOCK_TIMEOUT, timeout)
                    await conn.execute(statement)
                return None
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
                log.warning(f"{what} could not get its lock", attempt=attempt + 1)
                error = exc
            if self.stop.is_set():
                break
            await retry.wait(attempt, retry.DDL_LOCK)
        return str(error)

    async def prove(self, conn: Conn) -> tuple[bool | None, str]:
        """Give one row another row's key inside a transaction that is always rolled back: a
        unique index must refuse it. Returns (rejected, explanation)."""
        t = self.target
        probe = sql.prove_duplicate_rejected(t.qualified, t.key, t.pk_columns, t.scope)
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


# Re-reads of the partition tree when partitions came or went while the indexes were built.
MAX_TREE_PASSES = 3


class _PartitionedIndex:
    """`enforce` on a partitioned table, as a careful DBA does it by hand (CREATE INDEX
    CONCURRENTLY does not work on a partitioned table):

    1. `CREATE UNIQUE INDEX <name> ON ONLY <table> (cols)`: the partitioned index, INVALID
       until every partition's index is attached (a SHARE lock on the table for an instant);
       each sub-partitioned level gets its own ON ONLY index, attached to its parent's;
    2. for each leaf, `CREATE UNIQUE INDEX CONCURRENTLY` on it, converging on late duplicates
       as for a plain table (an invalid leftover of an earlier try is dropped and built again);
    3. `ALTER INDEX <parent's> ATTACH PARTITION <partition's>` for each: when the last one is
       attached, PostgreSQL marks the partitioned index valid.

    An index already attached (made by PostgreSQL for a partition created or attached since
    step 1) is kept. The tree is read again at the end, so partitions attached or detached
    meanwhile are handled. On failure the partitioned index stays INVALID (it has no storage
    and enforces nothing; a partitioned index cannot be dropped CONCURRENTLY): enforce again
    resumes where this one stopped."""

    def __init__(self, e: _Enforcer, columns: tuple[str, ...]) -> None:
        self.e = e
        self.columns = columns
        self.attached: list[str] = []

    def spot(self, member: catalog.Partition, name: str | None = None) -> _Spot:
        return _Spot(
            schema=member.schema,
            name=name or index_name_for(member.name, self.columns),
            table_oid=member.oid,
            table=member.qualified,
            partition=member.display,
            columns=self.columns,
        )

    async def enforce(self, conn: Conn) -> str:
        """Returns the status: created, already_enforced, not_converged or interrupted."""
        e, t = self.e, self.e.target
        assert t.partitions is not None
        root = self.spot(t.partitions.root, e.name)
        with e.phase("inspect"):
            idx = await inspect_spot(conn, root)
            self._check(root, idx, partitioned=True)
            if idx is None or not idx.valid:
                await self._check_names(conn, t.partitions)
        if idx is not None and idx.valid:
            return "already_enforced"
        if idx is None:
            with e.phase("create partitioned index (ON ONLY)"):
                await self._create_level(conn, root, bool(t.partitions.children(t.oid)))
        for _ in range(MAX_TREE_PASSES):
            # read afresh: partitions may have been attached or detached since the scan
            tree = await catalog.partitioning(conn, t.oid, t.key)
            status = await self._attach_all(conn, tree, root)
            if status != "done":
                return status
            root_idx = await inspect_spot(conn, root)
            if root_idx is not None and root_idx.valid:
                return "created"
        missing = await self._unattached(conn)
        raise TargetError(
            f"index {root.where} is still INVALID after attaching every partition's index: "
            f"{missing}; run enforce again"
        )

    def _check(self, spot: _Spot, idx: IndexState | None, *, partitioned: bool) -> None:
        """What carries our name must be our index (or a failed build of it): else refuse."""
        if idx is None:
            return
        if not idx.is_index:
            raise TargetError(
                f"{spot.where} exists and is not an index (relkind {idx.relkind!r}); "
                + ("pass --index-name NAME" if spot.table_oid == self.e.target.oid else "rename it")
            )
        if not idx.matches or (idx.relkind == "I") != partitioned:
            state_word = "valid" if idx.valid else "INVALID"
            raise TargetError(
                f"index {spot.where} exists ({state_word}) with another definition: "
                f"{idx.definition}; "
                + (
                    "pass --index-name NAME, or drop it"
                    if spot.table_oid == self.e.target.oid
                    else "drop or rename it"
                )
            )

    async def _check_names(self, conn: Conn, tree: catalog.Partitioning) -> None:
        """Every partition's index name, before anything is created: what carries one must be
        that index (or a failed build of it) and not attached elsewhere."""
        for member in tree.members[1:]:
            spot = self.spot(member)
            idx = await inspect_spot(conn, spot)
            self._check(spot, idx, partitioned=member.partitioned)

    async def _create_level(self, conn: Conn, spot: _Spot, has_partitions: bool) -> None:
        # With no partitions the ordinary form builds nothing and is valid at once; ON ONLY
        # would stay invalid until a partition's index is attached.
        make = (
            sql.create_unique_index_on_only if has_partitions else sql.create_unique_index_on_empty
        )
        statement = make(spot.name, spot.table, spot.columns)
        error = await self.e.under_lock_timeout(conn, statement, what="create partitioned index")
        if error is not None:
            raise BulkDedupeError(
                f"could not lock {spot.partition} to create the partitioned index {spot.where} "
                f"within {self.e.ecfg.lock_timeout:g}s in {self.e.ecfg.attach_retries + 1} tries "
                f"({error}); nothing was built: run enforce again when it is quieter"
            )

    async def _attach_all(self, conn: Conn, tree: catalog.Partitioning, root: _Spot) -> str:
        """Give every member below the root its index, attached to its parent's. Parents come
        before their partitions, so each one's parent index exists when it is reached."""
        e = self.e
        root_idx = await inspect_spot(conn, root)
        assert root_idx is not None
        index_of: dict[int, tuple[int, str]] = {tree.root.oid: (root_idx.oid, root.qualified)}
        for member in tree.members[1:]:
            if e.stop.is_set():
                return "interrupted"
            parent = index_of.get(member.parent or 0)
            if parent is None:
                continue
            # (an index lives in its table's schema: the name says which it is)
            attached = {
                r["table_oid"]: r["name"] for r in await conn.fetch(sql.ATTACHED_INDEXES, parent[0])
            }
            if member.oid in attached:  # ours from an earlier try, or made by PostgreSQL
                spot = self.spot(member, attached[member.oid])
            else:
                spot = self.spot(member)
                status = await self._make(conn, member, spot, bool(tree.children(member.oid)))
                if status != "created":
                    return status
                started = anyio.current_time()
                statement = sql.attach_partition_index(parent[1], spot.qualified)
                try:
                    error = await e.under_lock_timeout(conn, statement, what="index attach")
                except asyncpg.ObjectNotInPrerequisiteStateError:
                    # detached since the tree was read: its index stays, a plain unique index
                    log.warning("partition detached meanwhile", partition=member.display)
                    continue
                finally:
                    e.add_time("attach partition indexes", anyio.current_time() - started)
                if error is not None:
                    raise BulkDedupeError(
                        f"could not lock {spot.where} to attach it to {parent[1]} within "
                        f"{e.ecfg.lock_timeout:g}s in {e.ecfg.attach_retries + 1} tries "
                        f"({error}); its index is built and valid: run enforce again"
                    )
            idx = await inspect_spot(conn, spot)
            if idx is None:
                continue
            index_of[member.oid] = (idx.oid, spot.qualified)
            if spot.qualified not in self.attached:
                self.attached.append(spot.qualified)
        return "done"

    async def _make(
        self, conn: Conn, member: catalog.Partition, spot: _Spot, has_partitions: bool
    ) -> str:
        """The member's own index, not yet attached: a sub-partitioned level's ON ONLY index,
        or a leaf's built CONCURRENTLY (an invalid leftover dropped first). Returns the status
        of the build (created when it stands)."""
        e = self.e
        idx = await inspect_spot(conn, spot)
        self._check(spot, idx, partitioned=member.partitioned)
        if idx is not None and idx.attached_to is not None:
            raise TargetError(
                f"index {spot.where} on {member.display} is attached to another partitioned "
                "index; drop or rename it"
            )
        if member.partitioned:
            if idx is None:
                started = anyio.current_time()
                await self._create_level(conn, spot, has_partitions)
                e.add_time("create sub-partition indexes (ON ONLY)", anyio.current_time() - started)
            return "created"
        if member.relkind != "r":
            raise TargetError(f"partition {member.display} is not a table: it cannot be indexed")
        if idx is not None and idx.valid:
            return "created"  # built by an earlier try that stopped before attaching it
        if idx is not None:
            busy = await conn.fetchrow(sql.INDEX_BUILD_IN_PROGRESS, idx.oid)
            if busy is not None:
                raise RunStateError(
                    f"index {spot.where} is being built right now by backend pid "
                    f"{busy['pid']} ({busy['phase']}); wait for it to end, then run enforce again"
                )
            with e.phase(f"drop invalid index {member.display}"):
                await e.drop_if_invalid(conn, spot)
        return await e.converge(spot)

    async def _unattached(self, conn: Conn) -> str:
        """The partitions whose index is not attached (for the error that says so)."""
        t = self.e.target
        tree = await catalog.partitioning(conn, t.oid, t.key)
        attached: set[int] = set()
        for level in tree.levels:
            idx = await inspect_spot(
                conn, self.spot(level, self.e.name if level.level == 0 else None)
            )
            if idx is not None:
                attached |= {
                    r["table_oid"] for r in await conn.fetch(sql.ATTACHED_INDEXES, idx.oid)
                }
        names = [m.display for m in tree.members[1:] if m.oid not in attached]
        return "not attached: " + (", ".join(names[:5]) or "none")


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
    # SIGINT/SIGTERM set `stop` from before the first query to the result
    with signals.stop_on_signal(stop, enabled=handle_signals):
        return await _enforce(cfg, ecfg, stop, started)


async def _enforce(
    cfg: ConnectConfig, ecfg: EnforceConfig, stop: anyio.Event, started: float
) -> EnforceResult:
    async with errors.boundary("enforce"), db.connect(cfg) as conn:
        await conn.fetchval(sql.SET_DDL_SESSION)
        target = await _resolve(conn, cfg)
        if target.partitions is not None:  # refused before any change, with the reason
            _refuse_partitioned(target, ecfg)
        if ecfg.dedupe.disable_triggers:  # its dedupe runs' renames: refused before any change
            await triggers.check_may_disable(conn, target)
        if not await conn.fetchval(sql.ENFORCE_LOCK, target.lock_prefix):
            raise RunStateError(
                f"another bulkdedupe enforce is running on {target.display}.{target.key}; "
                "wait for it to finish"
            )
        e = _Enforcer(cfg, ecfg, target, stop)
        partitioned = (
            _PartitionedIndex(e, index_columns(target)) if target.partitions is not None else None
        )

        async def final_index() -> IndexState | None:
            if partitioned is None:
                return await inspect_index(conn, target, e.name)
            assert target.partitions is not None
            return await inspect_spot(conn, partitioned.spot(target.partitions.root, e.name))

        structlog.contextvars.bind_contextvars(table=target.display, index=e.name)
        tasks: list[Callable[[], Coroutine[Any, Any, None]]] = [e.cancel_build_on_stop]
        status = "already_enforced"
        try:
            async with signals.alongside(*tasks):
                if partitioned is not None:
                    status = await partitioned.enforce(conn)
                else:
                    with e.phase("inspect"):
                        idx = await e.check_existing(conn)
                    if idx is not None and not idx.valid:
                        with e.phase("drop invalid index"):
                            await e.drop_if_invalid(conn)
                        idx = None
                    if idx is None:
                        status = await e.converge()
                if status in ("created", "already_enforced"):
                    with e.phase("check valid"):
                        idx = await final_index()
                    if idx is None or not idx.valid:  # dropped under us: say so, do not pretend
                        raise TargetError(f"index {e._where()} vanished after it was built")
                    constraint_status = None
                    if ecfg.constraint:
                        with e.phase("attach constraint"):
                            constraint_status = await e.attach_constraint(conn, idx.oid)
                    with e.phase("prove"):
                        rejected, proof = await e.prove(conn)
                    idx = await final_index()
                    assert idx is not None
                    if rejected is False:
                        raise TargetError(
                            f"index {e._where()} is valid and unique but a duplicate was accepted "
                            "(rolled back); check its definition"
                        )
                else:
                    constraint_status, rejected = None, None
                    proof = "not tried: no index"
                    if partitioned is not None:
                        idx = await final_index()
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
        partitioned=partitioned is not None,
        partition_indexes=tuple(partitioned.attached) if partitioned else (),
    )


def _refuse_partitioned(target: Target, ecfg: EnforceConfig) -> None:
    """What enforce cannot do on this partitioned table, said before anything changes."""
    assert target.partitions is not None
    columns = index_columns(target)
    shown = ", ".join(columns)
    lacking = [
        (level, [c for c in level.partition_columns if c not in columns])
        for level in target.partitions.levels
    ]
    lacking = [(level, missing) for level, missing in lacking if missing]
    if lacking:
        level = lacking[0][0]
        of = "it" if level.level == 0 else f"its partition {level.display}"
        missing = ", ".join(
            f"{', '.join(cols)}" + ("" if lv.level == 0 else f" (of {lv.display})")
            for lv, cols in lacking
        )
        raise TargetError(
            f"enforce: PostgreSQL cannot enforce UNIQUE ({shown}) on the partitioned table "
            f"{target.display}: a unique index there must contain the partition key of every "
            f"level, and {of} is partitioned by {level.partition_key} (missing: {missing}); "
            "scan, verify and run still work"
        )
    if ecfg.constraint:
        raise TargetError(
            f"enforce --constraint: {target.display} is partitioned, and PostgreSQL does not "
            "allow ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX on a partitioned table "
            "(no release up to 18 does); leave --constraint out: the partitioned unique index "
            "enforces the same"
        )
    catalog.check_row_movement(target, ecfg.dedupe.allow_row_movement)
    if target.scan_index is None:
        # its dedupe runs scan through the parent, partition by partition of the key's index
        raise catalog.partition_index_error(target)
