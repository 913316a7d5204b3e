"""`runs` and `report`: what the state schema recorded, read-only. A run's audit is streamed in
keyset pages over `changes.id`, so a report of ten million changes needs one page of memory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from . import db, errors, sql, state
from .config import ConnectConfig
from .db import Conn
from .errors import RunStateError, UsageError
from .results import Change, RunInfo, RunsList

DEFAULT_RUNS_LIMIT = 20
DEFAULT_PAGE_SIZE = 5000


def _run_info(row: asyncpg.Record, skipped_groups: int = 0) -> RunInfo:
    options: Any = row["options"]
    return RunInfo(
        run_id=row["run_id"],
        command=row["command"],
        table=row["table_name"],
        key=row["key_column"],
        pk=row["pk_column"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        rows_changed=row["renamed"],
        skipped_groups=skipped_groups,
        options=json.loads(options) if isinstance(options, str) else dict(options or {}),
        pk_columns=state.recorded_pk(row),
    )


@asynccontextmanager
async def _reading(cfg: ConnectConfig, what: str) -> AsyncIterator[Conn]:
    # BrokenPipeError: our reader went away (`report | head`), not the server
    async with errors.boundary(what, passthrough=(BrokenPipeError,)), db.connect(cfg) as conn:
        yield conn


async def list_runs(cfg: ConnectConfig, limit: int = DEFAULT_RUNS_LIMIT) -> RunsList:
    """The most recent runs of every table, newest first. Creates nothing: without a state
    schema there are simply no runs."""
    if limit < 1:
        raise UsageError(f"--limit {limit}: must be at least 1")
    st = sql.StateSql(cfg.state_schema)
    async with _reading(cfg, "runs") as conn:
        if not await state.schema_exists(conn, st):
            return RunsList(
                state_schema=cfg.state_schema,
                runs=(),
                note=f"schema {cfg.state_schema} does not exist yet (nothing was ever applied)",
            )
        rows = await conn.fetch(st.list_runs, limit)
        skipped = await state.skipped_counts(conn, st, [r["run_id"] for r in rows])
    return RunsList(
        state_schema=cfg.state_schema,
        runs=tuple(_run_info(r, skipped.get(r["run_id"], 0)) for r in rows),
    )


class Report:
    """One run and its audit rows, read page by page while the connection is open."""

    def __init__(self, conn: Conn, st: sql.StateSql, run: RunInfo, page_size: int) -> None:
        self._conn = conn
        self._st = st
        self.run = run
        self.page_size = page_size

    async def pages(self) -> AsyncIterator[list[Change]]:
        """Pages of changes in id order. Each page is its own short query (keyset on id, over
        the (run_id, id) index): no transaction or cursor stays open between pages."""
        after = 0
        columns = self.run.pk_columns
        composite = len(columns) > 1
        while True:
            rows = await self._conn.fetch(
                self._st.changes_page, self.run.run_id, after, self.page_size
            )
            if not rows:
                return
            yield [
                Change(
                    id=r["id"],
                    pk=r["pk"],
                    old_value=r["old_value"],
                    new_value=r["new_value"],
                    changed_at=r["changed_at"],
                    pk_values=dict(zip(columns, json.loads(r["pk"]), strict=True))
                    if composite
                    else None,
                )
                for r in rows
            ]
            after = rows[-1]["id"]

    async def __aiter__(self) -> AsyncIterator[Change]:
        async for page in self.pages():
            for change in page:
                yield change


@asynccontextmanager
async def open_report(
    cfg: ConnectConfig, run_id: str, *, page_size: int = DEFAULT_PAGE_SIZE
) -> AsyncIterator[Report]:
    """`async with open_report(cfg, run_id) as r: ... async for change in r: ...`"""
    if page_size < 1:
        raise UsageError(f"page size {page_size}: must be at least 1")
    st = sql.StateSql(cfg.state_schema)
    async with _reading(cfg, "report") as conn:
        if not await state.schema_exists(conn, st):
            raise RunStateError(
                f"run {run_id} not found: the state schema {cfg.state_schema} does not exist "
                "(nothing was ever applied on this database; check --state-schema)"
            )
        row = await conn.fetchrow(st.get_run, run_id)
        if row is None:
            raise RunStateError(
                f"run {run_id} not found in {st.runs}; list the runs with `bulkdedupe runs`"
            )
        yield Report(conn, st, _run_info(row), page_size)
