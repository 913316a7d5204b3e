"""One exception tree, written for the operator who reads it at 3 a.m.

    BulkDedupeError              exit 3: the environment or the data is not as needed
    ├── UsageError               exit 2: an option value that makes no sense
    │   └── UnsafeIdentifierError        an identifier that is not a plain identifier
    ├── ConnectError             the server cannot be reached or refuses us
    ├── TargetError              table, column, primary key or index missing or unsuitable
    ├── PrivilegeError           the role lacks a privilege the command needs
    ├── ReadOnlyError            --apply against a read-only server or database
    ├── RunStateError            a --run-id that cannot be resumed, or is running elsewhere
    ├── StateVersionError        the state schema was made by a newer bulkdedupe
    └── InternalError            exit 4: a bug in bulkdedupe (traceback with --log-level debug)

Every message is one actionable line. Driver errors cross into this tree at one boundary,
:func:`boundary` (via :func:`from_driver`), so the CLI never shows a traceback for a known
condition. What a failed *batch* means is decided once, by SQLSTATE, in :data:`SQLSTATE_ACTIONS`
and :func:`classify`: retry the batch, skip the group, or stop the run.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import asyncpg

EXIT_OK = 0
EXIT_DUPLICATES = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
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


class StateVersionError(BulkDedupeError):
    """The state schema is at a version this bulkdedupe does not know; nothing was changed."""

    def __init__(self, message: str, *, found: int, supported: int) -> None:
        super().__init__(message)
        self.found = found
        self.supported = supported


class InternalError(BulkDedupeError):
    """bulkdedupe hit a bug; rerun with --log-level debug for the traceback and report it."""

    exit_code = EXIT_INTERNAL


# The session is gone or cannot be had (network, pg_terminate_backend, a server shutting down
# or restarting): worth a new connection, but no use splitting the work that failed.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)

# What the driver raises: everything else escaping a command is a bug (InternalError).
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection whose protocol state broke (a cut mid-query)
    OSError,
    TimeoutError,
)


class Action(enum.Enum):
    """What a failed batch transaction (rolled back whole) means for its groups."""

    RETRY = "retry"  # not now: try the batch again (smaller), then group by group
    SKIP_GROUP = "skip_group"  # it belongs to one group's rows: skip that group, go on
    FATAL = "fatal"  # the run cannot go on: stop it (resumable), say why


class Verdict(NamedTuple):
    action: Action
    reason: str  # recorded with a skipped group and counted in the summary


# The one table of what a batch's SQLSTATE means, by code, then by class (first two letters).
# Per group: the error is raised by the rows of one group (a CHECK or trigger refusing the new
# value, an index row too large for a long new value): the other groups are not concerned, and
# retrying the same rows fails the same way. Retry: the transaction lost a race or a resource
# for now. Anything not listed (privileges, a dropped column, disk full, a bug) stops the run.
SQLSTATE_ACTIONS: dict[str, Verdict] = {
    "40001": Verdict(Action.RETRY, "serialization_failure"),
    "40P01": Verdict(Action.RETRY, "deadlock"),
    "40": Verdict(Action.RETRY, "transaction_rollback"),
    "55P03": Verdict(Action.RETRY, "lock_timeout"),
    "57014": Verdict(Action.RETRY, "statement_timeout"),
    "53300": Verdict(Action.RETRY, "too_many_connections"),
    # "out of shared memory": the lock table is full; the next, halved, batch needs fewer
    "53200": Verdict(Action.RETRY, "out_of_memory"),
    "08": Verdict(Action.RETRY, "connection_lost"),
    "57P01": Verdict(Action.RETRY, "connection_lost"),  # admin shutdown
    "57P02": Verdict(Action.RETRY, "connection_lost"),  # crash shutdown
    "57P03": Verdict(Action.RETRY, "connection_lost"),  # cannot connect now
    "23": Verdict(Action.SKIP_GROUP, "integrity_violation"),
    "22": Verdict(Action.SKIP_GROUP, "data_exception"),
    "P0": Verdict(Action.SKIP_GROUP, "trigger_error"),  # RAISE EXCEPTION in PL/pgSQL
    "54": Verdict(Action.SKIP_GROUP, "program_limit_exceeded"),
}

FATAL = Verdict(Action.FATAL, "error")


def retryable(exc: BaseException) -> bool:
    """Whether trying the same transaction again may succeed."""
    return classify(exc).action is Action.RETRY


def classify(exc: BaseException) -> Verdict:
    """What `exc`, raised by a batch transaction, means: see :data:`SQLSTATE_ACTIONS`."""
    if isinstance(exc, asyncpg.PostgresError):
        code = str(getattr(exc, "sqlstate", "") or "")
        verdict = SQLSTATE_ACTIONS.get(code) or SQLSTATE_ACTIONS.get(code[:2])
        return verdict or Verdict(Action.FATAL, type(exc).__name__)
    if isinstance(exc, (TimeoutError, *CONNECTION_LOST)):
        return Verdict(Action.RETRY, "connection_lost")
    return FATAL


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
    if isinstance(exc, DRIVER_ERRORS):
        return BulkDedupeError(f"{what}: {type(exc).__name__}: {exc}")
    return InternalError(
        f"{what}: internal error {type(exc).__name__}: {exc} (a bug: rerun "
        "with --log-level debug for the traceback and report it)"
    )


def first_error(exc: BaseException) -> BaseException:
    """The error to report from (nested) exception groups: an operator-facing one if any."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if isinstance(e, BulkDedupeError)]
        exc = inner[0] if inner else exc.exceptions[0]
    return exc


class boundary:
    """The one place driver errors (and errors out of task groups) become operator errors:
    bulkdedupe's own pass through unchanged, the driver's are mapped by :func:`from_driver`,
    anything else is a bug and says so (InternalError, the original chained for debug).

    Both `with` and `async with` (so it opens an `async with` of connections)."""

    def __init__(self, what: str, *, passthrough: tuple[type[BaseException], ...] = ()) -> None:
        self.what = what
        self.passthrough = passthrough

    def __enter__(self) -> None:
        return None

    def __exit__(self, _t: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None or isinstance(exc, (BulkDedupeError, *self.passthrough)):
            return
        if isinstance(exc, BaseExceptionGroup):
            inner = first_error(exc)
            if isinstance(inner, BulkDedupeError):
                raise inner from inner.__cause__
            if isinstance(inner, Exception) and not isinstance(inner, self.passthrough):
                raise from_driver(inner, what=self.what) from inner
            return  # KeyboardInterrupt, cancellation: not ours to translate
        if isinstance(exc, Exception):
            raise from_driver(exc, what=self.what) from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, t: object, exc: BaseException | None, tb: object) -> None:
        self.__exit__(t, exc, tb)
