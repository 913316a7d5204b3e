"""Runs, checkpoints and the audit trail in `<state-schema>`: creating them, registering and
resuming a run, and saving where it got to."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from . import privileges, sql
from .catalog import Target
from .db import Conn
from .errors import RunStateError
from .scanner import KeyRange

log = structlog.get_logger(__name__)

# "incomplete": it ran to the end but skipped groups, which a resume retries.
RESUMABLE = ("running", "interrupted", "failed", "incomplete")
SKIPPED_PAGE = 1000  # skipped groups read per query when a resume retries them


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


async def ensure_schema(conn: Conn, state: sql.StateSql) -> None:
    """Create what is missing of the state schema, or upgrade in place one an earlier release
    made, then check that this role may record runs and their audit in it. Raises
    PrivilegeError, before anything changes, when it may not; StateVersionError when a newer
    release made it (left untouched).

    Nothing is created when everything exists, so a role that owns nothing works on a schema a
    DBA made with `init-state` (CREATE SCHEMA IF NOT EXISTS alone needs CREATE on the database).
    An upgrade is one transaction: every statement, then the version marker, or nothing.
    """
    access = await privileges.inspect_state(conn, state)
    privileges.require_known_version(access)
    if privileges.upgrade_statements(access, state):
        privileges.require_upgrade(access)  # first: the SQL it names also creates the rest
        privileges.require_create(access)
        # Serialize concurrent first runs: CREATE ... IF NOT EXISTS races on the catalog, and
        # the second of two upgrades finds, under the lock, nothing left to do.
        try:
            async with conn.transaction():
                found, done = await privileges.bring_up_to_date(conn, state)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise privileges.ddl_refused(access, exc) from exc
        if done and found.outdated:
            log.info(
                "state schema upgraded in place",
                state_schema=state.schema,
                from_version=found.version,
                to_version=state.VERSION,
            )
        access = await privileges.inspect_state(conn, state)
    privileges.require_state(access, write=True)


async def schema_exists(conn: Conn, state: sql.StateSql, *, write: bool = False) -> bool:
    """Whether the runs and their audit exist. Raises PrivilegeError when they do but this role
    may not read them (with `write`: record runs and audit rows in them, which needs an older
    state schema upgraded first), StateVersionError when a newer release made them.

    Reading needs no upgrade: the readers use only what the first state schema had."""
    return await privileges.check_state(conn, state, write=write)


@dataclass
class Checkpoints:
    """Per key range, the highest key below which every group has been committed.

    Work items of one range are numbered in scan order; a range's checkpoint moves only over
    the contiguous prefix of finished items, so a resume never skips unfinished work.
    """

    ranges: list[KeyRange]
    _next: dict[int, int] = field(default_factory=dict)
    _done: dict[int, dict[int, str | None]] = field(default_factory=dict)
    _cursor: dict[int, str | None] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)
    _issued: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for r in self.ranges:
            self._next[r.index] = 0
            self._done[r.index] = {}
            self._cursor[r.index] = r.cursor
            self._issued[r.index] = 0

    def issue(self, range_index: int) -> int:
        seq = self._issued[range_index]
        self._issued[range_index] = seq + 1
        return seq

    def complete(self, range_index: int, seq: int, last_key: str | None) -> None:
        done = self._done[range_index]
        done[seq] = last_key
        nxt = self._next[range_index]
        while nxt in done:
            key = done.pop(nxt)
            if key is not None:
                self._cursor[range_index] = key
            nxt += 1
        self._next[range_index] = nxt

    def range_finished(self, range_index: int) -> None:
        self._finished.add(range_index)

    def to_json(self) -> dict[str, Any]:
        out = []
        for r in self.ranges:
            finished = r.index in self._finished and self._next[r.index] == self._issued[r.index]
            out.append(
                KeyRange(r.index, r.lo, r.hi, self._cursor[r.index]).to_json() | {"done": finished}
            )
        return {"ranges": out}


def recorded_pk(row: asyncpg.Record) -> tuple[str, ...]:
    """The primary key column(s) a run identified rows by: `runs.pk_columns` (state schema
    version 2), else the single `pk_column` (runs of earlier releases, or a version 1 schema
    read without upgrading it)."""
    columns = row.get("pk_columns")
    return tuple(columns) if columns else (row["pk_column"],)


def recorded_scope(row: asyncpg.Record) -> tuple[str, ...]:
    """The --scope a run grouped by (`runs.scope_columns`; none before --scope)."""
    return tuple(row.get("scope_columns") or ())


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    run_id: str
    status: str
    command: str
    table_name: str
    key_column: str
    pk_columns: tuple[str, ...]
    scope: tuple[str, ...]
    checkpoint: dict[str, Any] | None
    renamed: int
    groups: int
    skipped: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> RunRecord:
        cp = row["checkpoint"]
        return cls(
            run_id=row["run_id"],
            status=row["status"],
            command=row["command"],
            table_name=row["table_name"],
            key_column=row["key_column"],
            pk_columns=recorded_pk(row),
            scope=recorded_scope(row),
            checkpoint=json.loads(cp) if cp else None,
            renamed=row["renamed"],
            groups=row["groups"],
            skipped=row["skipped"],
        )

    def remaining_ranges(self) -> list[KeyRange] | None:
        if not self.checkpoint:
            return None
        return [
            KeyRange.from_json(r) for r in self.checkpoint.get("ranges", []) if not r.get("done")
        ]


class RunLock:
    """The session advisory lock that marks a run as being executed by a live process."""

    def __init__(self, conn: Conn, run_id: str) -> None:
        self.conn = conn
        self.run_id = run_id

    async def acquire(self) -> None:
        if not await self.conn.fetchval(sql.RUN_LOCK, self.run_id):
            raise RunStateError(
                f"run {self.run_id} is being executed by another bulkdedupe process; "
                "wait for it, or stop it first"
            )

    async def release(self) -> None:
        await self.conn.fetchval(sql.RUN_UNLOCK, self.run_id)


async def start_run(
    conn: Conn,
    state: sql.StateSql,
    target: Target,
    *,
    run_id: str | None,
    command: str,
    options: dict[str, Any],
    database_url: str,
) -> tuple[str, RunRecord | None]:
    """Register a new run, or re-open the unfinished run `run_id`. Returns the id and, when
    resuming, the record it resumes from. The caller must hold the RunLock of the id."""
    if run_id is not None:
        row = await conn.fetchrow(state.get_run, run_id)
        if row is not None:
            rec = RunRecord.from_row(row)
            if rec.table_name != target.display or rec.key_column != target.key:
                raise RunStateError(
                    f"run {run_id} was on {rec.table_name}.{rec.key_column}, "
                    f"not {target.display}.{target.key}"
                )
            if rec.pk_columns != target.pk_columns:
                raise RunStateError(
                    f"run {run_id} identified rows by {','.join(rec.pk_columns)}, not "
                    f"{target.pk}; pass --pk {','.join(rec.pk_columns)}"
                )
            if rec.scope != target.scope:
                was = f"--scope {','.join(rec.scope)}" if rec.scope else "no --scope"
                raise RunStateError(
                    f"run {run_id} grouped its duplicates with {was}; resume it the same way"
                )
            if rec.status not in RESUMABLE:
                raise RunStateError(
                    f"run {run_id} is {rec.status}; nothing to resume "
                    "(omit --run-id to start a new run)"
                )
            await conn.execute(state.resume_run, run_id)
            return run_id, rec
    rid = run_id or new_run_id()
    await conn.execute(
        state.insert_run,
        rid,
        command,
        target.display,
        target.key,
        target.pk,
        json.dumps(options, default=str),
        database_url,
        list(target.pk_columns),
        list(target.scope) or None,  # NULL: no --scope
    )
    return rid, None


async def recorded_options(conn: Conn, state: sql.StateSql, run_id: str) -> dict[str, Any]:
    """The options run `run_id` was recorded with; {} when there is no such run (nor a state
    schema yet). Read-only: a resume reads them before it writes anything."""
    if not await schema_exists(conn, state):  # says which GRANT is missing, if one is
        return {}
    row = await conn.fetchrow(state.get_run, run_id)
    if row is None:
        return {}
    options: Any = row["options"]
    return dict(json.loads(options) if isinstance(options, str) else options or {})


async def save_progress(
    conn: Conn,
    state: sql.StateSql,
    run_id: str,
    *,
    groups: int,
    renamed: int,
    skipped: int,
    checkpoint: dict[str, Any],
) -> None:
    await conn.execute(
        state.save_progress, run_id, groups, renamed, skipped, json.dumps(checkpoint)
    )


async def count_changes(conn: Conn, state: sql.StateSql, run_id: str, *, within: str) -> int:
    """The run's audit rows, counted within `within` (statement_timeout syntax)."""
    async with conn.transaction(readonly=True):
        await conn.fetchval(sql.SET_LOCAL_STATEMENT_TIMEOUT, within)
        return int(await conn.fetchval(state.count_changes, run_id))


async def finish_run(
    conn: Conn,
    state: sql.StateSql,
    run_id: str,
    *,
    status: str,
    groups: int,
    renamed: int,
    skipped: int,
    checkpoint: dict[str, Any],
    summary: dict[str, Any],
) -> None:
    await conn.execute(
        state.finish_run,
        run_id,
        status,
        groups,
        renamed,
        skipped,
        json.dumps(checkpoint),
        json.dumps(summary, default=str),
    )


class SkipLog:
    """The groups a run skipped, and why. On --apply each is written to `<state>.skipped`
    before the worker returns the item, so the checkpoint never passes a skipped group that
    is not on record: a resume retries exactly these, and deletes each one it resolves. A dry
    run writes nothing and only counts them."""

    def __init__(self, pool: asyncpg.Pool | None, state: sql.StateSql, run_id: str) -> None:
        self.pool = pool
        self.state = state
        self.run_id = run_id
        self.groups: Counter[str] = Counter()  # reason -> groups skipped by this process
        self._keys: set[str] = set()

    async def record(self, key: str, reason: str, rows: int, error: str) -> bool:
        """Put the group on record (again: its latest reason and rows); True the first time
        this process skips it (a heap-order sweep may meet one group in several chunks)."""
        first = key not in self._keys
        if first:
            self._keys.add(key)
            self.groups[reason] += 1
        if self.pool is not None:
            await self.pool.execute(
                self.state.record_skip, self.run_id, key, reason, rows, error[:2000]
            )
        return first

    async def resolved(self, keys: Sequence[str]) -> None:
        if self.pool is not None and keys:
            await self.pool.execute(self.state.resolve_skipped, self.run_id, list(keys))


async def skipped_groups(
    conn: Conn, state: sql.StateSql, run_id: str, *, page: int = SKIPPED_PAGE
) -> AsyncIterator[list[tuple[str, int]]]:
    """The run's skipped groups as (key, rows) pages, in key order (keyset: the table may
    change while the pages are read)."""
    rows = await conn.fetch(state.skipped_first_page, run_id, page)
    while rows:
        yield [(r["group_key"], r["rows"]) for r in rows]
        if len(rows) < page:
            return
        rows = await conn.fetch(state.skipped_page, run_id, rows[-1]["group_key"], page)


@dataclass(frozen=True, kw_only=True)
class SkippedSummary:
    """What is on record as skipped for a run, by reason."""

    groups: dict[str, int]
    rows: dict[str, int]

    @property
    def total_groups(self) -> int:
        return sum(self.groups.values())


async def skipped_counts(conn: Conn, state: sql.StateSql, run_ids: Sequence[str]) -> dict[str, int]:
    """Groups on record as skipped, per run (none where the table predates this release)."""
    if not run_ids or not await conn.fetchval(sql.RELATION_EXISTS, state.skipped):
        return {}
    rows = await conn.fetch(state.skipped_groups_of_runs, list(run_ids))
    return {r["run_id"]: r["groups"] for r in rows}


async def skipped_summary(conn: Conn, state: sql.StateSql, run_id: str) -> SkippedSummary:
    rows = await conn.fetch(state.skipped_by_reason, run_id)
    return SkippedSummary(
        groups={r["reason"]: r["groups"] for r in rows},
        rows={r["reason"]: r["rows"] for r in rows},
    )
