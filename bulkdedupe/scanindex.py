"""The scan index `--create-scan-index` builds, shared by every run on the table: its DDL done by
one session at a time, a valid one reused, and dropped only by the last run that uses it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import asyncpg
import structlog

from . import sql
from .catalog import Target
from .db import Conn
from .errors import RunStateError, TargetError

log = structlog.get_logger(__name__)

DDL_POLL = 0.25  # seconds between two tries for the table's scan-index DDL lock
RELEASE_TIMEOUT = 10.0  # letting go of a lease nobody released (an error on the way)
_MAX_IDENT_BYTES = 63


def index_name(target: Target) -> str:
    """`bulkdedupe_scan_<table>[_<scope>...]_<key>`, cut to the 63 bytes PostgreSQL keeps of a
    name."""
    name = "_".join(("bulkdedupe_scan", target.table, *target.scope, target.key))
    return name.encode()[:_MAX_IDENT_BYTES].decode("utf-8", "ignore")


@dataclass
class ScanIndexLease:
    """A run's shared hold on the scan index, for the run's whole life (a session lock: a
    crashed run lets go with its connection). No run drops an index another one holds."""

    conn: Conn
    target: Target
    name: str
    held: bool = True

    @property
    def qualified(self) -> str:
        return sql.qualify(self.target.schema, self.name)

    async def release(self, *, drop: bool) -> bool:
        """Let go of the index; with `drop`, drop it too unless another run still holds it
        (then it is that run's to drop, if it wants to). Returns whether it was dropped."""
        if not self.held:
            return False
        if not drop:
            await self.conn.fetchval(sql.SCAN_INDEX_USE_UNLOCK, self.qualified)
            self.held = False
            return False
        async with _ddl_lock(self.conn, self.target):
            # Under the DDL lock no run can take a new hold meanwhile: if the exclusive lock
            # is free now, nobody uses the index.
            await self.conn.fetchval(sql.SCAN_INDEX_USE_UNLOCK, self.qualified)
            self.held = False
            if not await self.conn.fetchval(sql.SCAN_INDEX_DROP_LOCK, self.qualified):
                log.info("scan index kept: another run is using it", index=self.qualified)
                return False
            try:
                log.info("dropping scan index concurrently", index=self.qualified)
                await _ddl(self.conn, sql.drop_index_concurrently(self.target.schema, self.name))
            except asyncpg.InsufficientPrivilegeError:
                # reused, never built, by a role that does not own the table
                log.warning("scan index kept: this role may not drop it", index=self.qualified)
                return False
            finally:
                await self.conn.fetchval(sql.SCAN_INDEX_DROP_UNLOCK, self.qualified)
        return True


@asynccontextmanager
async def lease(
    conn: Conn, target: Target, *, create: bool
) -> AsyncIterator[ScanIndexLease | None]:
    """Hold the table's bulkdedupe scan index for as long as the block runs: the one the
    catalog found (target.scan_index), or, with `create`, one built now if there is none.
    None when the scan walks an index of the table's own, which is never built nor dropped.

    Raises TargetError when the index is gone (dropped by a run that just ended) and may not
    be built, or when its name is taken by something else; RunStateError when another session
    is building it outside this protocol."""
    name = index_name(target)
    if target.scan_index is not None and target.scan_index != name:
        yield None
        return
    async with _ddl_lock(conn, target):
        await _ensure(conn, target, name, create=create)
        held = ScanIndexLease(conn, target, name)
        # never refused: whoever drops the index holds the DDL lock, which is ours now
        if not await conn.fetchval(sql.SCAN_INDEX_USE_LOCK, held.qualified):
            raise RunStateError(f"could not take a shared lock on the scan index {name}")
    try:
        yield held
    finally:
        if held.held and not conn.is_closed():
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(RELEASE_TIMEOUT),
                contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError),
            ):
                await held.release(drop=False)


async def _ensure(conn: Conn, target: Target, name: str, *, create: bool) -> None:
    """Make sure a valid scan index of that name exists: reused if there is one, else built;
    an invalid one (a build that failed or was cancelled) is dropped and built again."""
    where = sql.qualify(target.schema, name)
    row = await conn.fetchrow(sql.INDEX_BY_NAME, target.schema, name)
    if row is not None:
        _check_definition(row, target, where)
        if row["indisvalid"]:
            log.info("reusing scan index", index=where, table=target.display)
            return
    if not create:
        # the catalog showed it a moment ago: a run that just ended dropped it
        raise TargetError(
            f"the scan index {where} was dropped by another bulkdedupe run as this one "
            "started; run again, with --create-scan-index to build it anew"
        )
    if row is not None:
        await _drop_invalid(conn, target, name, row["oid"])
    log.info("creating scan index concurrently", index=where, table=target.display)
    await _ddl(
        conn, sql.create_index_concurrently(name, target.qualified, (*target.scope, target.key))
    )


def _check_definition(row: asyncpg.Record, target: Target, where: str) -> None:
    """What carries the name must be what CREATE INDEX would have made, else it is not ours."""
    ours = (
        row["relkind"] in ("i", "I")
        and row["indrelid"] == target.oid
        and row["first_attnum"] == (target.scope_attnums or (target.key_attnum,))[0]
        and row["indnkeyatts"] == len(target.scope) + 1
        and row["is_full"]
        and row["is_plain"]
        and row["amname"] == "btree"
        and row["collation"] == target.key_collation
    )
    if not ours:
        raise TargetError(
            f"{where} exists and is not a plain btree index on {target.display}.{target.key} "
            f"({row['definition'] or 'not an index'}), so not bulkdedupe's scan index; drop or "
            "rename it, or create an index on the key yourself"
        )


async def _drop_invalid(conn: Conn, target: Target, name: str, oid: int) -> None:
    where = sql.qualify(target.schema, name)
    busy = await conn.fetchrow(sql.INDEX_BUILD_IN_PROGRESS, oid)
    if busy is not None:
        raise RunStateError(
            f"the scan index {where} is being built by backend pid {busy['pid']} "
            f"({busy['phase']}); wait for it to end, then run again"
        )
    if not await conn.fetchval(sql.SCAN_INDEX_DROP_LOCK, where):
        raise RunStateError(f"the invalid scan index {where} is held by another run")
    try:
        log.info("dropping invalid scan index concurrently", index=where)
        await _ddl(conn, sql.drop_index_concurrently(target.schema, name))
    finally:
        await conn.fetchval(sql.SCAN_INDEX_DROP_UNLOCK, where)


async def _ddl(conn: Conn, statement: str) -> None:
    """CREATE/DROP INDEX CONCURRENTLY may take long on a big, busy table: no statement_timeout."""
    await conn.fetchval(sql.SET_DDL_SESSION)
    try:
        await conn.execute(statement)
    finally:
        # not over the statement's own error (a broken connection fails this too)
        with contextlib.suppress(asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            await conn.execute(sql.RESET_STATEMENT_TIMEOUT)


@asynccontextmanager
async def _ddl_lock(conn: Conn, target: Target) -> AsyncIterator[None]:
    """The table's scan-index DDL lock, tried until it is free (see SCAN_INDEX_DDL_LOCK)."""
    waiting = False
    while not await conn.fetchval(sql.SCAN_INDEX_DDL_LOCK, target.qualified):
        if not waiting:
            log.info("waiting for another run's scan index work on the table", table=target.display)
            waiting = True
        await anyio.sleep(DDL_POLL)
    try:
        yield
    finally:
        await conn.fetchval(sql.SCAN_INDEX_DDL_UNLOCK, target.qualified)
