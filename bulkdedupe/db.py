"""Connections: a pool for scanners and workers, tagged `application_name=bulkdedupe`, opened
within the connect timeout, with driver failures turned into one-line operator errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import asyncpg

from .config import APPLICATION_NAME, ConnectConfig, redact_dsn
from .errors import CONNECTION_LOST, ConnectError, UsageError, from_driver

POOL_CLOSE_TIMEOUT = 10.0

# A connection of our own or one borrowed from the pool: the queries do not care which.
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

__all__ = ["CONNECTION_LOST", "Conn", "connect", "pool"]


def _settings(statement_timeout: float | None) -> dict[str, str]:
    s = {"application_name": APPLICATION_NAME}
    if statement_timeout is not None:
        s["statement_timeout"] = str(int(statement_timeout * 1000))
    return s


def _translate(exc: BaseException, cfg: ConnectConfig) -> Exception:
    where = f"connecting to {redact_dsn(cfg.database_url)}"
    if isinstance(exc, ValueError | asyncpg.ClientConfigurationError):
        # asyncpg echoes the DSN in some parse errors: never print it with a password.
        if not cfg.database_url:
            return UsageError(
                f"no --database-url, and the {redact_dsn('')} does not describe a valid "
                "connection; check PGHOST, PGPORT, PGUSER, PGDATABASE or pass -d URL"
            )
        return UsageError(
            f"--database-url is not a valid PostgreSQL URL ({redact_dsn(cfg.database_url)})"
        )
    if isinstance(exc, TimeoutError):
        return ConnectError(
            f"{where}: no answer within {cfg.connect_timeout:g}s (--connect-timeout); "
            "is the server up and reachable?"
        )
    return from_driver(exc, what=where)


@asynccontextmanager
async def connect(
    cfg: ConnectConfig, *, statement_timeout: float | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """One connection outside the pool (the run lock lives on it; DDL runs on it)."""
    try:
        with anyio.fail_after(cfg.connect_timeout + 1):
            conn = await asyncpg.connect(
                cfg.database_url,
                timeout=cfg.connect_timeout,
                server_settings=_settings(statement_timeout),
            )
    except Exception as exc:
        raise _translate(exc, cfg) from None
    try:
        yield conn
    finally:
        with anyio.move_on_after(POOL_CLOSE_TIMEOUT, shield=True):
            await conn.close()


async def _keep_session(_: asyncpg.Connection) -> None:
    """A pool's `reset` that sends nothing: asyncpg still rolls back an open transaction and
    drops listeners on release, but skips its reset query (advisory unlock all, CLOSE ALL,
    UNLISTEN, RESET ALL), one round trip per batch, for a pool whose sessions keep no state:
    only transaction-level locks, SET LOCAL and cursors inside transactions."""


@asynccontextmanager
async def pool(
    cfg: ConnectConfig,
    *,
    size: int,
    statement_timeout: float | None = None,
    stateless: bool = False,
    settings: dict[str, str] | None = None,
) -> AsyncIterator[asyncpg.Pool]:
    """`stateless`: the pool's users leave no session state behind (see `_keep_session`).
    `settings`: more startup settings for every session (they win over statement_timeout)."""
    try:
        with anyio.fail_after(cfg.connect_timeout + 1):
            p = await asyncpg.create_pool(
                cfg.database_url,
                min_size=1,
                max_size=size,
                timeout=cfg.connect_timeout,
                server_settings=_settings(statement_timeout) | (settings or {}),
                # Pages and batches reuse a handful of statements: let asyncpg prepare them once
                # per connection.
                statement_cache_size=256,
                reset=_keep_session if stateless else None,
            )
    except Exception as exc:
        raise _translate(exc, cfg) from None
    assert p is not None
    try:
        yield p
    finally:
        closed = False
        with anyio.move_on_after(POOL_CLOSE_TIMEOUT, shield=True):
            try:
                await p.close()
                closed = True
            except Exception:  # noqa: S110 - a broken pool is terminated just below
                pass
        if not closed:  # do not leave sockets behind
            p.terminate()
