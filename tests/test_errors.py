"""The one table of what a failed batch means (errors.SQLSTATE_ACTIONS), the one boundary that
turns driver errors into operator errors, and the one backoff schedule. Pure: no database."""

from __future__ import annotations

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkdedupe import retry
from bulkdedupe.errors import (
    Action,
    BulkDedupeError,
    ConnectError,
    InternalError,
    TargetError,
    boundary,
    classify,
)


def pg_error(sqlstate: str) -> asyncpg.PostgresError:
    """The asyncpg exception class PostgreSQL's SQLSTATE maps to, as the driver raises it."""
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)  # type: ignore[attr-defined]
    exc = cls("test")
    exc.sqlstate = sqlstate
    return exc


@pytest.mark.parametrize(
    ("sqlstate", "action", "reason"),
    [
        ("55P03", Action.RETRY, "lock_timeout"),
        ("40P01", Action.RETRY, "deadlock"),
        ("40001", Action.RETRY, "serialization_failure"),
        ("57014", Action.RETRY, "statement_timeout"),
        ("53200", Action.RETRY, "out_of_memory"),  # out of shared memory: the lock table
        ("53300", Action.RETRY, "too_many_connections"),
        ("57P01", Action.RETRY, "connection_lost"),
        ("P0001", Action.SKIP_GROUP, "trigger_error"),  # RAISE EXCEPTION in a trigger
        ("P0004", Action.SKIP_GROUP, "trigger_error"),  # ASSERT in a trigger
        ("54000", Action.SKIP_GROUP, "program_limit_exceeded"),  # index row too large
        ("23514", Action.SKIP_GROUP, "integrity_violation"),  # a CHECK on the new value
        ("23505", Action.SKIP_GROUP, "integrity_violation"),
        ("22001", Action.SKIP_GROUP, "data_exception"),  # value too long
        ("42501", Action.FATAL, "InsufficientPrivilegeError"),
        ("25006", Action.FATAL, "ReadOnlySQLTransactionError"),
        ("42703", Action.FATAL, "UndefinedColumnError"),  # the column was dropped under us
        ("53100", Action.FATAL, "DiskFullError"),
    ],
)
def test_sqlstate_decides_retry_skip_or_stop(sqlstate: str, action: Action, reason: str) -> None:
    verdict = classify(pg_error(sqlstate))
    assert (verdict.action, verdict.reason) == (action, reason)


def test_lost_connections_and_timeouts_are_retried() -> None:
    for exc in (ConnectionResetError(), TimeoutError(), asyncpg.InterfaceError("closed")):
        assert classify(exc).action is Action.RETRY


def test_anything_else_stops_the_run() -> None:
    assert classify(ValueError("a bug")).action is Action.FATAL


def test_boundary_maps_driver_errors_and_keeps_our_own() -> None:
    with pytest.raises(ConnectError, match="is the server up"), boundary("scan"):
        raise ConnectionRefusedError(111, "Connection refused")
    own = TargetError("no such table")
    with pytest.raises(TargetError) as info, boundary("scan"):
        raise own
    assert info.value is own
    assert info.value.__cause__ is None


def test_boundary_reports_a_bug_as_internal_with_its_cause() -> None:
    with pytest.raises(InternalError, match="internal error KeyError") as info, boundary("run"):
        raise KeyError("x")
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.exit_code == 4


def test_boundary_unwraps_task_groups_without_chaining_an_error_to_itself() -> None:
    own = TargetError("the table changed")
    with pytest.raises(TargetError) as info, boundary("run"):
        raise ExceptionGroup("tasks", [ValueError("other"), own])
    assert info.value is own
    assert info.value.__cause__ is not own
    with pytest.raises(BulkDedupeError, match="DeadlockDetectedError"), boundary("run"):
        raise ExceptionGroup("tasks", [pg_error("40P01")])


def test_boundary_lets_passthrough_errors_through() -> None:
    with pytest.raises(BrokenPipeError), boundary("report", passthrough=(BrokenPipeError,)):
        raise BrokenPipeError


@given(st.integers(min_value=0, max_value=60))
def test_backoff_grows_to_its_cap_with_jitter_around_it(attempt: int) -> None:
    base, cap = retry.BATCH
    plain = retry.backoff(attempt, retry.BATCH, jitter=False)
    assert plain == min(base * 2**attempt, cap)
    jittered = retry.backoff(attempt, retry.BATCH)
    assert 0.5 * plain <= jittered <= 1.5 * plain
