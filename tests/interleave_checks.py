"""The invariants of the randomized interleaving test (tests/test_interleave.py), checked on
the data after every step: the table, a trigger's history of every write to it, the audit, the
runs and the skipped groups, read in one snapshot and compared with the application's model.

The history records who wrote each row (the session's application_name), in which transaction,
when the statement started, and the row before and after; so the checks assume nothing about
timing. Table and column names here are test-authored SQL, never user input.

Two table shapes (`Shape`): the plain one, whose groups are key values and whose rows are named
by `id`; and the scoped one, run with `--scope merchant_id` on a composite primary key (id,
merchant_id), whose groups are (merchant, key) as the tool spells them, `["42", "k001"]`. Every
check is about groups, so it holds for both as it stands.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

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

SCOPE: Final = "merchant_id"  # the scoped shape's --scope


@dataclass(frozen=True)
class Shape:
    """The table a scenario runs on, and how the test names its rows and groups.

    plain: payments(id bigserial PRIMARY KEY, transaction_id, ...), no --scope: a group is a
    key value, a row is named by its id, the audit's pk is the id's text.

    scoped: payments(rid, id bigint, merchant_id int NOT NULL, transaction_id, ..., PRIMARY KEY
    (id, merchant_id)), run with --scope merchant_id and its primary key by default. The loaded
    rows' ids are counted per merchant, so only (id, merchant_id) names a row. A group is the
    JSON text of the merchant's and the key's text forms, as the tool carries it (`["42",
    "k001"]`); the audit's pk the JSON text of the primary key's (`["7", "42"]`). The
    application may move a row to another merchant, which changes its primary key: `rid` (no
    index, never written after the insert) names rows for the test alone, its history and
    model; the tool never hears of it."""

    name: str
    scoped: bool = False
    scan_columns: tuple[str, ...] = ()  # scoped: the scan index's columns, in its order
    key_index: bool = False  # scoped: an index on the key too (new values free table-wide)

    @property
    def row(self) -> str:
        """The column naming a row for the test."""
        return "rid" if self.scoped else "id"

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the application's model follows, the key first."""
        return (KEY, *NON_KEY, *(("id", SCOPE) if self.scoped else ()))

    def of(self, scope: int | None, key: str) -> str:
        """The group of a row with this scope and (non-NULL) key."""
        return json.dumps([str(scope), key]) if self.scoped else key

    def group(self, scope: int | None, key: str | None) -> str | None:
        """The group of a row with this scope and key: None for a NULL key (never a
        duplicate; the scoped shape's merchant_id is NOT NULL)."""
        return None if key is None else self.of(scope, key)

    def group_of(self, row: Mapping[str, Any] | asyncpg.Record) -> str | None:
        return self.group(row[SCOPE] if self.scoped else None, row[KEY])

    def parts(self, group: str) -> tuple[int | None, str]:
        """(scope, key) of a group."""
        if not self.scoped:
            return None, group
        scope, key = json.loads(group)
        return int(scope), key

    def canonical(self, group_key: str) -> str:
        """A group as the tool recorded it (skipped.group_key), spelled as the model does."""
        return json.dumps(json.loads(group_key)) if self.scoped else group_key

    def group_sql(self, alias: str) -> str:
        """Row `alias`'s group, as the tool computes it (and hashes for its advisory lock)."""
        if not self.scoped:
            return f"{alias}.{KEY}"
        return f"jsonb_build_array({alias}.{SCOPE}::text, {alias}.{KEY}::text)::text"

    def pk_sql(self, r: str) -> str:
        """Row `r`'s primary key as the audit spells it: the id's text, or the JSON array of
        the columns' text forms."""
        if not self.scoped:
            return f"{r}.id::text"
        return f"jsonb_build_array({r}.id::text, {r}.{SCOPE}::text)::text"

    def tool_args(self) -> list[str]:
        return ["--scope", SCOPE] if self.scoped else []

    def describe(self) -> str:
        if not self.scoped:
            return "plain: payments(id PRIMARY KEY), unscoped"
        return (
            f"scoped: payments PRIMARY KEY (id, merchant_id), --scope {SCOPE}, "
            f"scan index ({', '.join(self.scan_columns)})"
            + (" and one on the key" if self.key_index else "")
        )


PLAIN: Final = Shape("plain")


def history_ddl(shape: Shape) -> str:
    """The history table and the trigger filling it; its `id` is the row's name (`shape.row`)."""
    row = shape.row
    return f"""
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
            CASE WHEN TG_OP = 'DELETE' THEN OLD.{row} ELSE NEW.{row} END,
            pg_current_xact_id()::text, statement_timestamp(),
            CASE WHEN TG_OP <> 'INSERT' THEN OLD END,
            CASE WHEN TG_OP <> 'DELETE' THEN NEW END);
    RETURN NULL;
END $$;
CREATE TRIGGER interleave_record AFTER INSERT OR UPDATE OR DELETE ON payments
    FOR EACH ROW EXECUTE FUNCTION interleave_record();
"""


def history_read(shape: Shape) -> str:
    """Every write, with the key and scope before and after, the primary key after (as the
    audit spells it), the whole row and the row but its key (every other column)."""
    scope = "({r}).merchant_id" if shape.scoped else "NULL::int"
    rest = f"(to_jsonb({{r}}) - '{KEY}')::text"
    return f"""
SELECT seq, app, op, id, xid, stmt_at,
       (old_row).{KEY} AS old_key, (new_row).{KEY} AS new_key,
       {scope.format(r="old_row")} AS old_scope, {scope.format(r="new_row")} AS new_scope,
       {shape.pk_sql("(new_row)")} AS new_pk,
       old_row::text AS old_full, new_row::text AS new_full,
       {rest.format(r="old_row")} AS old_rest, {rest.format(r="new_row")} AS new_rest
FROM interleave_history ORDER BY seq"""


# --- what the database says ------------------------------------------------------------------


# A write of the history, with its groups before and after (`old_group`, `new_group`).
Write = dict[str, Any]


@dataclass
class Snapshot:
    """The table, its history, the audit and the runs, read in one snapshot."""

    shape: Shape
    rows: dict[int, asyncpg.Record]  # by the row's name (shape.row)
    history: list[Write]
    audit: list[asyncpg.Record]
    runs: dict[str, asyncpg.Record]
    skipped: list[asyncpg.Record] | None  # None: there is no skipped table

    def row_groups(self) -> dict[int, str | None]:
        return {pk: self.shape.group_of(r) for pk, r in self.rows.items()}

    def groups(self) -> dict[str, int]:
        """The duplicated groups: values, or per merchant with --scope."""
        counts = Counter(g for g in self.row_groups().values() if g is not None)
        return {g: n for g, n in counts.items() if n > 1}

    def skipped_of(self, run_id: str) -> dict[str, asyncpg.Record]:
        return {
            self.shape.canonical(r["group_key"]): r
            for r in self.skipped or ()
            if r["run_id"] == run_id
        }

    def audit_count(self, run_id: str) -> int:
        return sum(1 for a in self.audit if a["run_id"] == run_id)


async def snapshot(conn: asyncpg.Connection, shape: Shape) -> Snapshot:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = {
            r[shape.row]: r for r in await conn.fetch("SELECT t.*, t::text AS full FROM payments t")
        }
        history = [
            dict(h)
            | {
                "old_group": shape.group(h["old_scope"], h["old_key"]),
                "new_group": shape.group(h["new_scope"], h["new_key"]),
            }
            for h in await conn.fetch(history_read(shape))
        ]
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
    return Snapshot(shape, rows, history, audit, runs, skipped)


# --- the invariants, after every step --------------------------------------------------------


def _by_row(history: Iterable[Write]) -> dict[int, list[Write]]:
    out: dict[int, list[Write]] = defaultdict(list)
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

    # The tool writes the key column of existing rows, nothing else, ever (never a scope
    # column, never a primary key column).
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

    # Every key the tool changed has exactly one audit row, and every audit row such a change;
    # the audit names the row by its primary key, spelled exactly as README says.
    changed = Counter(
        (h["new_pk"], h["old_key"], h["new_key"]) for h in tool if h["op"] == "UPDATE"
    )
    audited = Counter((a["pk"], a["old_value"], a["new_value"]) for a in snap.audit)
    for change, n in (changed - audited).items():
        problems.append(f"[audit] tool change {change} x{n} without its audit row")
    for change, n in (audited - changed).items():
        problems.append(f"[audit] audit row {change} x{n} for a change that did not happen")
    for run_id in {a["run_id"] for a in snap.audit} - snap.runs.keys():
        problems.append(f"[audit] audit rows of unknown run {run_id}")

    # No application write is lost: every row is as the app left it, but for its key, which
    # only audited renames (tool writes after the app's last write of its group) may have
    # changed.
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
        for c in snap.shape.columns[1:]:
            if current[c] != row.values[c]:
                problems.append(
                    f"[lost-write] row {pk}.{c} is {current[c]!r}, the app wrote {row.values[c]!r}"
                )
        hs = by_row.get(pk, [])
        at = [i for i, h in enumerate(hs) if h["xid"] == row.key_xid and h["app"] == APP_NAME]
        if not at or hs[at[-1]]["new_group"] != row.group:
            problems.append(
                f"[lost-write] the app's key write {row.group!r} of row {pk} is not there"
            )
            continue
        for h in hs[at[-1] + 1 :]:
            if h["old_group"] != h["new_group"] and h["app"] != TOOL_NAME:
                problems.append(f"[lost-write] row {pk}: key changed by {h['app']} behind the app")

    # A survivor the app left alone keeps its value (lowest pk of its group survives).
    groups_now = snap.row_groups()
    for group, pk in model.protected().items():
        if groups_now.get(pk) != group:
            problems.append(
                f"[survivor] row {pk}, the lowest the app gave {group!r} and untouched since, "
                f"now holds {groups_now.get(pk)!r}"
            )

    # The documented advisory lock: a value found-or-created under it is never duplicated;
    # and it is the tool's lock: while the app holds a group's, no rename of the tool starts
    # that takes a row off that group or gives a row that group.
    groups = snap.groups()
    for group in model.found_or_created & groups.keys():
        problems.append(
            f"[advisory-lock] {group!r}, created under the lock, has {groups[group]} rows"
        )
    renames = _renames(snap)
    for lock in model.advisory:
        for h in renames:
            if lock.group in (h["old_group"], h["new_group"]) and (
                lock.since < h["stmt_at"] and (lock.until is None or h["stmt_at"] < lock.until)
            ):
                problems.append(
                    f"[advisory-lock] the tool renamed row {h['id']} {h['old_group']!r} -> "
                    f"{h['new_group']!r} at {h['stmt_at']:%H:%M:%S.%f} while the app held the "
                    f"lock of {lock.group!r} (from {lock.since:%H:%M:%S.%f})"
                )

    problems += _vanished_values(snap, model, by_row)
    return problems


def _renames(snap: Snapshot) -> list[Write]:
    """The tool's renames, not its undos' (an undo puts values back)."""
    undo_runs = {r for r, rec in snap.runs.items() if rec["command"] == "undo"}
    undo_changes = {
        (a["pk"], a["old_value"], a["new_value"]) for a in snap.audit if a["run_id"] in undo_runs
    }
    return [
        h
        for h in snap.history
        if h["app"] == TOOL_NAME
        and h["op"] == "UPDATE"
        and (h["new_pk"], h["old_key"], h["new_key"]) not in undo_changes
    ]


def _vanished_values(snap: Snapshot, model: Model, by_row: dict[int, list[Write]]) -> list[str]:
    """A run never renames a group's losers when, at the rename statement's snapshot, no other
    row can have held the group's value (its survivor deleted, re-keyed or moved to another
    merchant before): issue 9, item 3. With --scope, a row of another merchant holding the
    same key is no holder.

    Writes to one group by the tool are serialized by its advisory lock, so an earlier tool
    write to it committed before a later statement; an application write is known to have
    committed before `committed_by[xid]`, and not to have started before its statement time."""
    statements: dict[tuple[str, str], list[Write]] = defaultdict(list)
    for h in _renames(snap):
        statements[(h["xid"], h["old_group"])].append(h)
    holders_ever: dict[str, set[int]] = defaultdict(set)
    for h in snap.history:
        if h["new_group"] is not None:
            holders_ever[h["new_group"]].add(int(h["id"]))
    app_values = {  # groups the app gave rows (not those its other writes merely kept)
        h["new_group"]
        for h in snap.history
        if h["app"] == APP_NAME and (h["op"] == "INSERT" or h["old_group"] != h["new_group"])
    }
    problems = []
    for (xid, group), renamed in statements.items():
        if group not in app_values:  # a value the tool made, moved on by an undo
            continue
        at = min(h["stmt_at"] for h in renamed)
        first_seq = min(h["seq"] for h in renamed)
        moved = {int(h["id"]) for h in renamed}
        if not any(
            _may_hold(by_row[pk], group, at, first_seq, xid, model)
            for pk in holders_ever[group] - moved
        ):
            writes = [
                _describe(h, model)
                for pk in sorted(holders_ever[group])
                for h in by_row[pk]
                if group in (h["old_group"], h["new_group"])
            ]
            problems.append(
                f"[vanished] transaction {xid} renamed rows {sorted(moved)} off {group!r} "
                f"(statement at {at:%H:%M:%S.%f}) when no other row could still hold it; "
                "the writes of that value: " + "; ".join(writes[:8])
            )
    return problems


def _describe(h: Write, model: Model) -> str:
    done = model.committed_by.get(h["xid"])
    committed = f", committed by {done:%H:%M:%S.%f}" if done is not None else ""
    return (
        f"row {h['id']} {h['op']} {h['old_group']!r}->{h['new_group']!r} by {h['app']} "
        f"xid {h['xid']} at {h['stmt_at']:%H:%M:%S.%f}{committed}"
    )


def _may_hold(
    writes: list[Write],
    group: str,
    at: dt.datetime,
    first_seq: int,
    xid: str,
    model: Model,
) -> bool:
    """Whether the row may have been in `group` in the snapshot of a statement started `at`."""
    writes = [w for w in writes if w["xid"] != xid]

    def before(w: Write) -> bool:  # certainly committed before the statement
        if w["app"] == APP_NAME:
            done = model.committed_by.get(w["xid"])
            return done is not None and done < at
        return w["seq"] < first_seq and group in (w["old_group"], w["new_group"])

    low = max((i + 1 for i, w in enumerate(writes) if before(w)), default=0)
    high = max(
        (i + 1 for i, w in enumerate(writes) if w["stmt_at"] < at + SNAPSHOT_SLACK), default=0
    )
    states = [None, *(w["new_group"] for w in writes)]
    return any(states[k] == group for k in range(low, max(low, high) + 1))


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
