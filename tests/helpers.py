"""Helpers for tests: build small payments tables by hand, fingerprint them, run the CLI.

Big, realistic tables come from ``benchmarks.generate``; these are for exact, hand-written cases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from benchmarks.generate import quote_ident, quote_table

__all__ = [
    "EPOCH",
    "REPO_ROOT",
    "create_payments",
    "dsn_as",
    "dsn_with_database",
    "execute",
    "fetch",
    "fetch_keys",
    "fetchval",
    "run_cli",
    "sync",
    "table_checksum",
]

T = TypeVar("T")

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
# created_at of hand-made rows without one: EPOCH + i seconds, so the order is id order.
EPOCH: Final = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


async def execute(dsn: str, *statements: str) -> None:
    """Run statements one after the other on a connection of their own."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from a sync test (the CLI tests run subprocesses)."""
    return asyncio.run(coro)


def dsn_with_database(dsn: str, database: str) -> str:
    """The same server and credentials as ``dsn``, another database.

    Handles both ``postgresql://u:p@host:5432/db`` and the unix-socket form
    ``postgresql://u:@/db?host=/run/pg``; a ``dbname``/``database`` query parameter would
    override the path, so it is replaced too.
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep or scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn!r}")
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, _, _old_path = rest.partition("/")
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)]
    params = [(k, v) for k, v in params if k not in ("dbname", "database")]
    # urlunsplit would drop the empty authority of "postgresql://@/db?host=...", so build by hand.
    url = f"{scheme}://{netloc}/{quote(database, safe='')}"
    if params:
        url += "?" + urlencode(params, safe="/")
    if fragment:
        url += "#" + fragment
    return url


def dsn_as(dsn: str, user: str, password: str | None = None) -> str:
    """The same server and database as ``dsn``, another role (and password)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, parts.fragment))


def _qualified(table: str, schema: str | None) -> str:
    if schema is None:
        return quote_table(table)
    if "." in table:
        raise ValueError("pass either schema= or a schema-qualified table, not both")
    return f"{quote_ident(schema)}.{quote_ident(table)}"


async def create_payments(
    dsn: str,
    *,
    table: str = "payments",
    rows: Sequence[tuple[Any, ...]] | None = None,
    schema: str | None = None,
    key_type: str = "varchar(64)",
    key_column: str = "transaction_id",
    index: bool = True,
) -> None:
    """Create a payments table shaped like production's and insert ``rows``.

    Each row is ``(key,)`` or ``(key, created_at)``; ids follow the given order, and rows without
    a created_at get ``EPOCH + i seconds``. The other columns take realistic defaults. The key
    gets a plain (non-unique) btree index named ``<table>_<key_column>_idx``, as in the wild.
    """
    target = _qualified(table, schema)
    name = table.rsplit(".", 1)[-1]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            if schema is not None or "." in table:
                schema_name = schema if schema is not None else table.split(".", 1)[0]
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema_name)}")
            # key_type is test-authored SQL (e.g. "varchar(40)", "text"), never user input.
            await conn.execute(
                f"""
                CREATE TABLE {target} (
                    id bigserial PRIMARY KEY,
                    {quote_ident(key_column)} {key_type},
                    amount numeric(12, 2) NOT NULL DEFAULT 10.00,
                    currency text NOT NULL DEFAULT 'EUR',
                    status text NOT NULL DEFAULT 'settled',
                    created_at timestamptz NOT NULL DEFAULT now(),
                    payload jsonb DEFAULT '{{}}'::jsonb
                )
                """
            )
            if index:
                index_name = quote_ident(f"{name}_{key_column}_idx")
                await conn.execute(
                    f"CREATE INDEX {index_name} ON {target} ({quote_ident(key_column)})"
                )
            if rows:
                records = [
                    (r[0], r[1] if len(r) > 1 else EPOCH + dt.timedelta(seconds=i))
                    for i, r in enumerate(rows)
                ]
                await conn.executemany(
                    f"INSERT INTO {target} ({quote_ident(key_column)}, created_at) VALUES ($1, $2)",
                    records,
                )
        await conn.execute(f"ANALYZE {target}")
    finally:
        await conn.close()


async def table_checksum(dsn: str, table: str = "payments") -> str:
    """md5 of every row's text form in id order: equal checksums mean identical tables."""
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            f"SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY id), '')) "
            f"FROM {quote_table(table)} AS t"
        )
    finally:
        await conn.close()
    assert isinstance(value, str)
    return value


async def fetch_keys(
    dsn: str, table: str = "payments", *, key_column: str = "transaction_id"
) -> dict[int, str | None]:
    """``{id: key}`` for every row."""
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch(
            f"SELECT id, {quote_ident(key_column)} AS key FROM {quote_table(table)} ORDER BY id"
        )
    finally:
        await conn.close()
    return {r["id"]: r["key"] for r in records}


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bulkdedupe ARGS`` as a user would; never raises on a non-zero exit."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bulkdedupe", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=input,
        cwd=REPO_ROOT,
        check=False,
    )


# What the application does to a group's survivor while the tool works on the group: each
# test formats the survivor's id in ({pk}) and runs it at the moment it means.
SURVIVOR_CHANGES = pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM payments WHERE id = {pk}",
        "UPDATE payments SET transaction_id = 'moved' WHERE id = {pk}",
    ],
    ids=["survivor-deleted", "survivor-rekeyed"],
)
