"""One exception tree, written for the operator who reads it at 3 a.m.

    BulkDedupeError              exit 3: the environment or the data is not as needed
    ├── UsageError               exit 2: an option value that makes no sense
    │   └── UnsafeIdentifierError        an identifier that is not a plain identifier
    ├── ConnectError             the server cannot be reached or refuses us
    ├── TargetError              table, column, primary key or index missing or unsuitable
    ├── PrivilegeError           the role lacks a privilege the command needs
    ├── ReadOnlyError            --apply against a read-only server or database
    └── RunStateError            a --run-id that cannot be resumed, or is running elsewhere

Every message is one actionable line. Driver errors are mapped by :func:`from_driver` so the CLI
never shows a traceback for a known condition.
"""

from __future__ import annotations

import asyncpg

EXIT_OK = 0
EXIT_DUPLICATES = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130


class BulkDedupeError(Exception):
    """bulkdedupe failed; nothing was changed by the step that failed."""

    exit_code = EXIT_ENVIRONMENT

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(BulkDedupeError):
    """An option value is out of range."""

    exit_code = EXIT_USAGE


class UnsafeIdentifierError(UsageError):
    """An identifier is not a plain (or double-quoted) SQL identifier."""


class ConnectError(BulkDedupeError):
    """Cannot connect to the database: check --database-url and that the server is up."""


class TargetError(BulkDedupeError):
    """The table, key column or primary key is missing or unsuitable."""


class PrivilegeError(BulkDedupeError):
    """The database role lacks a privilege this command needs."""


class ReadOnlyError(BulkDedupeError):
    """The server or database is read-only; --apply needs a writable primary."""


class RunStateError(BulkDedupeError):
    """The run cannot be resumed."""


def from_driver(exc: BaseException, *, what: str) -> BulkDedupeError:
    """Translate an asyncpg/OS error raised while doing `what` into an operator's error."""
    if isinstance(exc, BulkDedupeError):
        return exc
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return PrivilegeError(
            f"{what}: permission denied ({exc}); grant the privilege or use another role"
        )
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return ReadOnlyError(
            f"{what}: the server is read-only ({exc}); run --apply against the primary"
        )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return ConnectError(f"{what}: authentication failed ({exc}); check the user and password")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConnectError(f"{what}: {exc}; check the database name in --database-url")
    if isinstance(exc, asyncpg.PostgresError):
        return BulkDedupeError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"{what}: timed out; is the server up and reachable?")
    if isinstance(exc, OSError):
        return ConnectError(f"{what}: {exc.strerror or exc}; is the server up and reachable?")
    return BulkDedupeError(f"{what}: {type(exc).__name__}: {exc}")
