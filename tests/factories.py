"""Expectations computed by plain SQL on the original data, independently of bulkdedupe, and
small builders of hand-made duplicate layouts. Table and column arguments are test-authored SQL
(already quoted where needed), never user input."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from bulkdedupe import ConnectConfig, RunConfig, ScanConfig
from bulkdedupe.config import parse_column, parse_table


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def fetch_all(dsn: str, table: str = "payments") -> dict[int, dict[str, Any]]:
    """Every column of every row, by id."""
    return {r["id"]: dict(r) for r in await _fetch(dsn, f"SELECT * FROM {table} ORDER BY id")}


async def duplicate_groups(
    dsn: str, table: str = "payments", key: str = "transaction_id"
) -> dict[str, int]:
    """{value: rows} of every duplicated non-NULL value, by a plain GROUP BY."""
    rows = await _fetch(
        dsn,
        f"SELECT {key} AS k, count(*) AS n FROM {table} WHERE {key} IS NOT NULL "
        f"GROUP BY {key} HAVING count(*) > 1",
    )
    return {r["k"]: r["n"] for r in rows}


@dataclass(frozen=True)
class Expected:
    """What a correct run does, from a window query: which rows are renamed and who survives."""

    losers: dict[int, tuple[str, int]]  # pk -> (old value, survivor pk)
    survivors: dict[str, int]  # duplicated value -> surviving pk

    @property
    def renamed(self) -> int:
        return len(self.losers)


async def expected_plan(
    dsn: str, table: str = "payments", key: str = "transaction_id", order: str = "id"
) -> Expected:
    """`order` is the keep order as SQL (e.g. "created_at DESC"); ties go to the lower id."""
    rows = await _fetch(
        dsn,
        f"""
        SELECT id, k, rn, survivor FROM (
            SELECT id, {key} AS k,
                   row_number() OVER w AS rn,
                   first_value(id) OVER w AS survivor,
                   count(*) OVER (PARTITION BY {key}) AS n
            FROM {table} WHERE {key} IS NOT NULL
            WINDOW w AS (PARTITION BY {key} ORDER BY {order}, id)
        ) s WHERE n > 1
        """,
    )
    losers = {r["id"]: (r["k"], r["survivor"]) for r in rows if r["rn"] > 1}
    survivors = {r["k"]: r["id"] for r in rows if r["rn"] == 1}
    return Expected(losers, survivors)


async def state_schema_exists(dsn: str, schema: str = "bulkdedupe") -> bool:
    rows = await _fetch(dsn, "SELECT to_regnamespace($1) IS NOT NULL AS e", f'"{schema}"')
    return bool(rows[0]["e"])


async def audit_rows(
    dsn: str, run_id: str, schema: str = "bulkdedupe"
) -> list[tuple[str, str, str]]:
    """(pk, old, new) of every audit row of the run, sorted."""
    rows = await _fetch(
        dsn,
        f'SELECT pk, old_value, new_value FROM "{schema}".changes WHERE run_id = $1',
        run_id,
    )
    return sorted((r["pk"], r["old_value"], r["new_value"]) for r in rows)


async def run_record(dsn: str, run_id: str, schema: str = "bulkdedupe") -> dict[str, Any]:
    rows = await _fetch(dsn, f'SELECT * FROM "{schema}".runs WHERE run_id = $1', run_id)
    assert len(rows) == 1
    return dict(rows[0])


def shuffled(layout: Mapping[str | None, int], *, seed: int = 1) -> list[tuple[str | None]]:
    """Rows for create_payments: each value `n` times, scattered over the ids."""
    rows: list[tuple[str | None]] = [(k,) for k, n in layout.items() for _ in range(n)]
    random.Random(seed).shuffle(rows)
    return rows


# Small pages and batches, several scanners and workers: the paths a big table takes.
SMALL = ScanConfig(page_size=100, scanners=2)


def connect(
    dsn: str, table: str = "payments", key: str = "transaction_id", **kw: Any
) -> ConnectConfig:
    """The library's ConnectConfig for a test table."""
    return ConnectConfig(
        database_url=dsn, table=parse_table(table), key=parse_column(key, "--key"), **kw
    )


def apply_cfg(**kw: Any) -> RunConfig:
    """An --apply RunConfig with small batches and several workers (override any field)."""
    kw.setdefault("batch_size", 100)
    kw.setdefault("concurrency", 3)
    kw.setdefault("scan", SMALL)
    return RunConfig(apply=True, **kw)
