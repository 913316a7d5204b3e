"""The invariants of the randomized interleaving test (tests/test_interleave.py), checked on
the data after every step: the table, a trigger's history of every write to it, the audit, the
runs and the skipped groups, read in one snapshot and compared with the application's model.

The history records who wrote each row (the session's application_name), in which transaction,
when the statement started, and the row before and after; so the checks assume nothing about
timing. Table and column names here are test-authored SQL, never user input.
"""

from __future__ import annotations

import datetime as dt
import itertools
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import asyncpg

from tests.faults_support import EXIT_DUPLICATES, EXIT_INTERRUPTED, EXIT_OK

if TYPE_CHECKING:
    from tests.interleave_support import Invocation, Model, Outcome

APP_NAME: Final = "interleave-app"
TOOL_NAME: Final = "bulkdedupe"
CHECK_NAME: Final = "interleave-check"
KEY: Final = "transaction_id"
NON_KEY: Final = ("amount", "currency", "status", "created_at", "payload")
# Statuses an invocation may end with, by exit code (issue 9's contract).
STATUS_BY_EXIT: Final = {
    EXIT_OK: "completed",
    EXIT_DUPLICATES: "incomplete",
    EXIT_INTERRUPTED: "interrupted",
}
STATUS_EXIT: Final = {status: code for code, status in STATUS_BY_EXIT.items()}
# A row the app inserts after a rename statement started, but commits before its snapshot is
# taken, may be what that statement saw as the survivor: this much benefit of the doubt.
SNAPSHOT_SLACK: Final = dt.timedelta(milliseconds=50)

HISTORY_DDL: Final = """
CREATE TABLE interleave_history (
    seq     bigserial PRIMARY KEY,
    app     text NOT NULL,
    op      text NOT NULL,
    id      bigint NOT NULL,
    xid     text NOT NULL,
    stmt_at timestamptz NOT NULL,
    old_row payments,
    new_row payments
);
CREATE FUNCTION interleave_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO interleave_history (app, op, id, xid, stmt_at, old_row, new_row)
    VALUES (current_setting('application_name'), TG_OP,
            CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END,
            pg_current_xact_id()::text, statement_timestamp(),
            CASE WHEN TG_OP <> 'INSERT' THEN OLD END,
            CASE WHEN TG_OP <> 'DELETE' THEN NEW END);
    RETURN NULL;
END $$;
CREATE TRIGGER interleave_record AFTER INSERT OR UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION interleave_record();
"""

_REST = "ROW(({r}).amount, ({r}).currency, ({r}).status, ({r}).created_at, ({r}).payload)::text"
HISTORY_READ: Final = f"""
SELECT seq, app, op, id, xid, stmt_at,
       (old_row).transaction_id AS old_key, (new_row).transaction_id AS new_key,
       old_row::text AS old_full, new_row::text AS new_full,
       {_REST.format(r="old_row")} AS old_rest, {_REST.format(r="new_row")} AS new_rest
FROM interleave_history ORDER BY seq"""


# --- what the database says ------------------------------------------------------------------


@dataclass
class Snapshot:
    """The table, its history, the audit and the runs, read in one snapshot."""

    rows: dict[int, asyncpg.Record]
    history: list[asyncpg.Record]
    audit: list[asyncpg.Record]
    runs: dict[str, asyncpg.Record]
    skipped: list[asyncpg.Record] | None  # None: there is no skipped table

    def keys(self) -> dict[int, str | None]:
        return {pk: r[KEY] for pk, r in self.rows.items()}

    def groups(self) -> dict[str, int]:
        counts = Counter(k for k in self.keys().values() if k is not None)
        return {k: n for k, n in counts.items() if n > 1}

    def skipped_of(self, run_id: str) -> dict[str, asyncpg.Record]:
        return {r["group_key"]: r for r in self.skipped or () if r["run_id"] == run_id}

    def audit_count(self, run_id: str) -> int:
        return sum(1 for a in self.audit if a["run_id"] == run_id)


async def snapshot(conn: asyncpg.Connection) -> Snapshot:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = {r["id"]: r for r in await conn.fetch("SELECT t.*, t::text AS full FROM payments t")}
        history = list(await conn.fetch(HISTORY_READ))
        exists = await conn.fetchrow(
            "SELECT to_regclass('bulkdedupe.changes') IS NOT NULL AS changes, "
            "to_regclass('bulkdedupe.runs') IS NOT NULL AS runs, "
            "to_regclass('bulkdedupe.skipped') IS NOT NULL AS skipped"
        )
        assert exists is not None
        audit = (
            list(
                await conn.fetch(
                    "SELECT id, run_id, pk, old_value, new_value FROM bulkdedupe.changes "
                    "ORDER BY id"
                )
            )
            if exists["changes"]
            else []
        )
        runs = (
            {r["run_id"]: r for r in await conn.fetch("SELECT * FROM bulkdedupe.runs")}
            if exists["runs"]
            else {}
        )
        skipped = (
            list(await conn.fetch("SELECT * FROM bulkdedupe.skipped"))
            if exists["skipped"]
            else None
        )
    return Snapshot(rows, history, audit, runs, skipped)


# --- the invariants, after every step --------------------------------------------------------


def _by_row(history: Iterable[asyncpg.Record]) -> dict[int, list[asyncpg.Record]]:
    out: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for h in history:
        out[int(h["id"])].append(h)
    return out


def check_always(snap: Snapshot, model: Model) -> list[str]:
    """The invariants that hold at every moment, whatever is running."""
    problems: list[str] = []
    by_row = _by_row(snap.history)
    tool = [h for h in snap.history if h["app"] == TOOL_NAME]

    # The history is whole: each row's writes chain, and the last one is the row as it is.
    for pk, hs in by_row.items():
        if hs[0]["op"] != "INSERT":
            problems.append(f"[history] row {pk} starts with {hs[0]['op']}")
        for prev, h in itertools.pairwise(hs):
            if prev["op"] == "DELETE" or h["op"] == "INSERT" or h["old_full"] != prev["new_full"]:
                problems.append(
                    f"[history] row {pk}: write {h['seq']} does not follow {prev['seq']}"
                )
        last = hs[-1]
        current = snap.rows.get(pk)
        if (last["op"] == "DELETE") != (current is None) or (
            current is not None and current["full"] != last["new_full"]
        ):
            problems.append(f"[history] row {pk} is not what its last write left")
    for h in snap.history:
        if h["app"] not in (TOOL_NAME, APP_NAME):
            problems.append(f"[history] write {h['seq']} by an unknown session {h['app']!r}")

    # The tool writes the key column of existing rows, nothing else, ever.
    for h in tool:
        if h["op"] != "UPDATE":
            problems.append(f"[tool-write] the tool did {h['op']} row {h['id']}")
        elif h["old_rest"] != h["new_rest"]:
            problems.append(
                f"[tool-write] the tool wrote a non-key column of row {h['id']}: "
                f"{h['old_rest']} -> {h['new_rest']}"
            )
        elif h["old_key"] == h["new_key"]:
            problems.append(f"[tool-write] the tool rewrote row {h['id']} without changing its key")

    # Every key the tool changed has exactly one audit row, and every audit row such a change.
    changed = Counter(
        (int(h["id"]), h["old_key"], h["new_key"]) for h in tool if h["op"] == "UPDATE"
    )
    audited = Counter((int(a["pk"]), a["old_value"], a["new_value"]) for a in snap.audit)
    for change, n in (changed - audited).items():
        problems.append(f"[audit] tool change {change} x{n} without its audit row")
    for change, n in (audited - changed).items():
        problems.append(f"[audit] audit row {change} x{n} for a change that did not happen")
    for run_id in {a["run_id"] for a in snap.audit} - snap.runs.keys():
        problems.append(f"[audit] audit rows of unknown run {run_id}")

    # No application write is lost: every row is as the app left it, but for its key, which
    # only audited renames (tool writes after the app's last key write) may have changed.
    for pk in snap.rows.keys() - model.rows.keys():
        problems.append(f"[lost-write] row {pk} appeared from nowhere")
    for pk, row in model.rows.items():
        current = snap.rows.get(pk)
        if row.deleted:
            if current is not None:
                problems.append(f"[lost-write] row {pk}, deleted by the app, is back")
            continue
        if current is None:
            problems.append(f"[lost-write] row {pk} vanished (the app never deleted it)")
            continue
        for c in NON_KEY:
            if current[c] != row.values[c]:
                problems.append(
                    f"[lost-write] row {pk}.{c} is {current[c]!r}, the app wrote {row.values[c]!r}"
                )
        hs = by_row.get(pk, [])
        at = [i for i, h in enumerate(hs) if h["xid"] == row.key_xid and h["app"] == APP_NAME]
        if not at or hs[at[-1]]["new_key"] != row.key:
            problems.append(
                f"[lost-write] the app's key write {row.key!r} of row {pk} is not there"
            )
            continue
        for h in hs[at[-1] + 1 :]:
            if h["old_key"] != h["new_key"] and h["app"] != TOOL_NAME:
                problems.append(f"[lost-write] row {pk}: key changed by {h['app']} behind the app")

    # A survivor the app left alone keeps its value (lowest pk survives).
    keys = snap.keys()
    for value, pk in model.protected().items():
        if keys.get(pk) != value:
            problems.append(
                f"[survivor] row {pk}, the lowest the app gave {value!r} and untouched since, "
                f"now holds {keys.get(pk)!r}"
            )

    # The documented advisory lock: a value found-or-created under it is never duplicated.
    groups = snap.groups()
    for value in model.found_or_created & groups.keys():
        problems.append(
            f"[advisory-lock] {value!r}, created under the lock, has {groups[value]} rows"
        )

    problems += _vanished_values(snap, model, by_row)
    return problems


def _vanished_values(
    snap: Snapshot, model: Model, by_row: dict[int, list[asyncpg.Record]]
) -> list[str]:
    """A run never renames a group's losers when, at the rename statement's snapshot, no other
    row can have held the value (its survivor deleted or re-keyed before): issue 9, item 3.

    Writes to one value by the tool are serialized by its advisory lock, so an earlier tool
    write to it committed before a later statement; an application write is known to have
    committed before `committed_by[xid]`, and not to have started before its statement time."""
    undo_runs = {r for r, rec in snap.runs.items() if rec["command"] == "undo"}
    undo_changes = {
        (int(a["pk"]), a["old_value"], a["new_value"])
        for a in snap.audit
        if a["run_id"] in undo_runs
    }
    tool = [h for h in snap.history if h["app"] == TOOL_NAME and h["op"] == "UPDATE"]
    statements: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for h in tool:
        if (int(h["id"]), h["old_key"], h["new_key"]) not in undo_changes:
            statements[(h["xid"], h["old_key"])].append(h)
    holders_ever: dict[str, set[int]] = defaultdict(set)
    for h in snap.history:
        if h["new_key"] is not None:
            holders_ever[h["new_key"]].add(int(h["id"]))
    app_values = {  # values the app gave rows (not those its other writes merely kept)
        h["new_key"]
        for h in snap.history
        if h["app"] == APP_NAME and (h["op"] == "INSERT" or h["old_key"] != h["new_key"])
    }
    problems = []
    for (xid, value), renamed in statements.items():
        if value not in app_values:  # a value the tool made, moved on by an undo
            continue
        at = min(h["stmt_at"] for h in renamed)
        first_seq = min(h["seq"] for h in renamed)
        moved = {int(h["id"]) for h in renamed}
        if not any(
            _may_hold(by_row[pk], value, at, first_seq, xid, model)
            for pk in holders_ever[value] - moved
        ):
            writes = [
                _describe(h, model)
                for pk in sorted(holders_ever[value])
                for h in by_row[pk]
                if value in (h["old_key"], h["new_key"])
            ]
            problems.append(
                f"[vanished] transaction {xid} renamed rows {sorted(moved)} off {value!r} "
                f"(statement at {at:%H:%M:%S.%f}) when no other row could still hold it; "
                "the writes of that value: " + "; ".join(writes[:8])
            )
    return problems


def _describe(h: asyncpg.Record, model: Model) -> str:
    done = model.committed_by.get(h["xid"])
    committed = f", committed by {done:%H:%M:%S.%f}" if done is not None else ""
    return (
        f"row {h['id']} {h['op']} {h['old_key']!r}->{h['new_key']!r} by {h['app']} "
        f"xid {h['xid']} at {h['stmt_at']:%H:%M:%S.%f}{committed}"
    )


def _may_hold(
    writes: list[asyncpg.Record],
    value: str,
    at: dt.datetime,
    first_seq: int,
    xid: str,
    model: Model,
) -> bool:
    """Whether the row may have held `value` in the snapshot of a statement started `at`."""
    writes = [w for w in writes if w["xid"] != xid]

    def before(w: asyncpg.Record) -> bool:  # certainly committed before the statement
        if w["app"] == APP_NAME:
            done = model.committed_by.get(w["xid"])
            return done is not None and done < at
        return w["seq"] < first_seq and value in (w["old_key"], w["new_key"])

    low = max((i + 1 for i, w in enumerate(writes) if before(w)), default=0)
    high = max(
        (i + 1 for i, w in enumerate(writes) if w["stmt_at"] < at + SNAPSHOT_SLACK), default=0
    )
    states = [None, *(w["new_key"] for w in writes)]
    return any(states[k] == value for k in range(low, max(low, high) + 1))


def check_outcome(
    inv: Invocation, out: Outcome, snap: Snapshot, model: Model, *, quiet: bool
) -> list[str]:
    """After an invocation ended: its exit code, status and summary agree; every group left
    duplicated is either recorded as skipped (with a reason) or was written by the app since
    the run began; a resume retried every group its run had skipped. `quiet`: nothing got in
    the tool's way, so the run must complete."""
    run = inv.run
    problems: list[str] = []
    record = snap.runs.get(run.run_id)
    where = f"{inv.name} (exit {out.rc})"
    if out.rc == -signal.SIGKILL:  # any status: it may have finished before the signal
        return problems
    if out.rc not in STATUS_BY_EXIT:
        return [f"[status] {where}: {out.error}"]
    expected = STATUS_BY_EXIT[out.rc]
    if quiet and out.rc != EXIT_OK:
        problems.append(f"[resolved] {where}: nothing stood in its way, yet it did not complete")
    if out.summary is None:
        return [*problems, f"[status] {where}: no JSON summary on stdout"]
    if out.summary.get("status") != expected:
        problems.append(
            f"[status] {where}: summary status {out.summary.get('status')!r}, expected {expected!r}"
        )
    if record is None or record["status"] != expected:
        problems.append(
            f"[status] {where}: runs.status {record and record['status']!r}, expected {expected!r}"
        )
    elif record["renamed"] != snap.audit_count(run.run_id):
        problems.append(
            f"[status] {where}: runs.renamed {record['renamed']} but "
            f"{snap.audit_count(run.run_id)} audit rows"
        )
    if snap.skipped is None:
        if out.rc == EXIT_DUPLICATES:
            problems.append(f"[skipped] {where}: there is no table bulkdedupe.skipped")
        skipped = {}
    else:
        skipped = snap.skipped_of(run.run_id)
    for key, r in skipped.items():
        if not r["reason"] or r["reason"] == "no_longer_duplicate":
            problems.append(f"[skipped] group {key!r} recorded with reason {r['reason']!r}")
        if (r["rows"] or 0) < 1 or (r["attempts"] or 0) < 1:
            problems.append(f"[skipped] group {key!r}: rows {r['rows']}, attempts {r['attempts']}")
        if key not in run.hot and model.touched.get(key, -1) <= run.first_tick:
            problems.append(
                f"[skipped] group {key!r} skipped ({r['reason']}: {r['error']}) though the app "
                "neither locked nor wrote it during the run"
            )
    if out.rc == EXIT_INTERRUPTED:
        return problems
    n = out.summary.get("skipped_groups")
    if n != len(skipped):
        problems.append(
            f"[skipped] {where}: summary skipped_groups {n!r}, table has {len(skipped)}"
        )
    if out.rc == EXIT_OK and skipped:
        problems.append(
            f"[skipped] {where}: completed but groups are recorded as skipped: {sorted(skipped)}"
        )
    if out.rc == EXIT_DUPLICATES and not skipped and snap.skipped is not None:
        problems.append(f"[skipped] {where}: incomplete, but no group is recorded as skipped")
    for key, attempts in inv.skipped_before.items():
        if key in skipped and skipped[key]["attempts"] <= attempts:
            problems.append(
                f"[skipped] group {key!r} skipped again by the resume, attempts still "
                f"{skipped[key]['attempts']}"
            )
    for key, rows in sorted(snap.groups().items()):
        since = inv.start_tick if key in inv.skipped_before else run.first_tick
        if key not in skipped and model.disturbed.get(key, -1) <= since:
            why = "skipped earlier, not retried" if key in inv.skipped_before else "not resolved"
            problems.append(
                f"[resolved] {where}: group {key!r} ({rows} rows) {why}, not recorded as skipped"
            )
    return problems
