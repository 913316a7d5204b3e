"""The randomized interleaving test's actors (tests/test_interleave.py): the application, with
a model of everything it wrote; the CLI as subprocesses (run, resume, SIGTERM, kill -9,
SIGSTOP, undo); and the scenario that interleaves them, checking tests/interleave_checks.py's
invariants after every step. Names in SQL here are test-authored, never user input.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import signal
from collections import Counter, defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import anyio
import asyncpg
from anyio.abc import Process
from asyncpg.transaction import Transaction

from tests.factories import shuffled
from tests.faults_support import (
    EXIT_OK,
    catches,
    output,
    slow_down_renames,
    spawn,
    wait_until,
    wait_until_tool_gone,
)
from tests.helpers import create_payments
from tests.interleave_checks import (
    APP_NAME,
    CHECK_NAME,
    HISTORY_DDL,
    KEY,
    NON_KEY,
    STATUS_BY_EXIT,
    STATUS_EXIT,
    Snapshot,
    check_always,
    check_outcome,
    snapshot,
)

# The duplicated values whose advisory lock (README, "The advisory lock") a tool session holds,
# with their lowest row: the groups of the batches in flight and their survivors. `window`: the
# session is between statements, past its timeouts and key locks and not yet renaming (its
# last statement read the groups or checked new values), i.e. its rename is still to come.
LOCKED_GROUPS: Final = """
SELECT p.transaction_id AS k, min(p.id) AS survivor,
       bool_or(a.state = 'idle in transaction' AND a.query NOT ILIKE '%update%'
               AND a.query NOT ILIKE '%set_config%'
               AND a.query NOT ILIKE '%pg_advisory_xact_lock(%') AS window
FROM payments p
JOIN pg_locks l ON l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
 AND ((l.classid::bigint << 32) | l.objid::bigint)
     = hashtextextended('public.payments.transaction_id:' || p.transaction_id, 0)
JOIN pg_stat_activity a ON a.pid = l.pid AND a.application_name = 'bulkdedupe'
WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY 1 HAVING count(*) > 1 ORDER BY 1"""
LOCK_TIMEOUT: Final = 0.2  # the tool's --lock-timeout; every app lock is held at least twice that
# The documented lock expression (README, "The advisory lock"), as an application takes it.
ADVISORY_LOCK: Final = (
    "SELECT pg_advisory_xact_lock(hashtextextended('public.payments.transaction_id:' "
    "|| $1::text, 0))"
)
TOOL_TIMEOUT: Final = 45.0  # one invocation of the CLI, at most
DROP_ALL: Final = """
DROP SCHEMA IF EXISTS bulkdedupe CASCADE;
DROP TABLE IF EXISTS interleave_history;
DROP TABLE IF EXISTS payments CASCADE;
DROP FUNCTION IF EXISTS interleave_record();
DROP FUNCTION IF EXISTS slow_rename();
"""

RETURNING: Final = "RETURNING *, pg_current_xact_id()::text AS xid"


class StepFailed(AssertionError):
    """The invariants found problems after a step."""


async def connect(dsn: str, name: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        dsn, server_settings={"application_name": name, "lock_timeout": "10s"}
    )


# --- the application's model ---------------------------------------------------------------


@dataclass
class AppRow:
    values: dict[str, Any]  # every column as the application last wrote it (its RETURNING)
    key_xid: str  # the transaction of its last write of the key
    deleted: bool = False

    @property
    def key(self) -> str | None:
        value = self.values[KEY]
        assert value is None or isinstance(value, str)
        return value


@dataclass
class Model:
    """What the application did, told only by the application."""

    rows: dict[int, AppRow] = field(default_factory=dict)
    ever: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    committed_by: dict[str, dt.datetime] = field(default_factory=dict)  # xid -> after commit
    disturbed: dict[str, int] = field(default_factory=dict)  # value -> tick: may be duplicated
    touched: dict[str, int] = field(default_factory=dict)  # value -> tick of any app write
    found_or_created: set[str] = field(default_factory=set)
    initial_dups: list[str] = field(default_factory=list)
    initial_singles: list[str] = field(default_factory=list)
    tick: int = 0

    def commit(self, xid: str, at: dt.datetime) -> int:
        self.committed_by[xid] = at
        self.tick += 1
        return self.tick

    def _touch(self, *values: str | None) -> None:
        for v in values:
            if v is not None:
                self.touched[v] = self.tick

    def write(
        self,
        rec: asyncpg.Record,
        *,
        key_write: bool,
        disturbing: bool,
        old_key: str | None = None,
    ) -> None:
        """A row as the app's statement returned it; call after `commit` of its xid."""
        pk = int(rec["id"])
        values = {c: rec[c] for c in (KEY, *NON_KEY)}
        prior = self.rows.get(pk)
        if not key_write and prior is not None:
            values[KEY] = prior.values[KEY]  # what it returned may be a rename of the tool's
        key_xid = rec["xid"] if key_write or prior is None else prior.key_xid
        self.rows[pk] = AppRow(values, key_xid)
        key = values[KEY]
        if key_write and key is not None:
            self.ever[key].add(pk)
            if disturbing:
                self.disturbed[key] = self.tick
        self._touch(key, old_key)

    def delete(self, pk: int, old_key: str | None) -> None:
        self.rows[pk].deleted = True
        self._touch(old_key, self.rows[pk].key)

    def alive(self) -> list[int]:
        return sorted(pk for pk, r in self.rows.items() if not r.deleted)

    def holders(self, value: str) -> list[int]:
        """Rows the app believes hold `value` (it set it and has not changed it since)."""
        return sorted(
            pk
            for pk in self.ever.get(value, ())
            if not self.rows[pk].deleted and self.rows[pk].key == value
        )

    def protected(self) -> dict[str, int]:
        """value -> the row that must still hold it: the lowest pk the app ever gave the value,
        if the app has neither deleted it nor changed its key since (default keep order)."""
        out = {}
        for value, pks in self.ever.items():
            first = min(pks)
            row = self.rows[first]
            if not row.deleted and row.key == value:
                out[value] = first
        return out


# --- the application -----------------------------------------------------------------------


@dataclass
class Hold:
    """An application transaction kept open across steps, holding locks."""

    conn: asyncpg.Connection
    tx: Transaction
    what: str
    pks: set[int]  # rows it locks
    key: str | None  # the value whose advisory lock it holds
    hot: set[str]  # groups the tool may have to skip because of it
    pending: list[tuple[asyncpg.Record, bool, bool]]  # (row, key_write, disturbing) at commit
    since: float


def _amount(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(1, 10**7)) / 100


class App:
    """The application: short transactions on one connection, held ones on their own."""

    def __init__(self, dsn: str, model: Model, rng: random.Random) -> None:
        self.dsn = dsn
        self.model = model
        self.rng = rng
        self.holds: list[Hold] = []
        self.counter = 0
        self._conn: asyncpg.Connection | None = None

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None
        return self._conn

    async def open(self) -> None:
        self._conn = await connect(self.dsn, APP_NAME)

    async def close(self) -> None:
        for h in self.holds:
            h.conn.terminate()
        self.holds.clear()
        if self._conn is not None:
            await self._conn.close()

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter:04d}"

    async def _done(self, conn: asyncpg.Connection, xid: str) -> None:
        at = await conn.fetchval("SELECT clock_timestamp()")
        self.model.commit(xid, at)

    async def load(self, layout_rows: list[tuple[str | None]]) -> None:
        rng = self.rng
        recs = await self.conn.fetch(
            "INSERT INTO payments (transaction_id, amount, status, created_at, payload) "
            "SELECT * FROM unnest($1::text[], $2::numeric[], $3::text[], $4::timestamptz[], "
            f"$5::jsonb[]) {RETURNING}",
            [r[0] for r in layout_rows],
            [_amount(rng) for _ in layout_rows],
            ["settled"] * len(layout_rows),
            [
                dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
                for i in range(len(layout_rows))
            ],
            [json.dumps({"n": i}) for i in range(len(layout_rows))],
        )
        await self._done(self.conn, recs[0]["xid"])
        for rec in recs:
            self.model.write(rec, key_write=True, disturbing=False)
        counts = Counter(r[0] for r in layout_rows if r[0] is not None)
        self.model.initial_dups = sorted(k for k, n in counts.items() if n > 1)
        self.model.initial_singles = sorted(k for k, n in counts.items() if n == 1)
        self.model.disturbed.clear()
        self.model.touched.clear()

    # -- choosing what to work on (from the model only, so a seed replays its choices) ------

    def held(self) -> set[int]:
        return set().union(*(h.pks for h in self.holds)) if self.holds else set()

    def held_keys(self) -> set[str]:
        return {h.key for h in self.holds if h.key is not None}

    def free_rows(self) -> list[int]:
        held = self.held()
        return [pk for pk in self.model.alive() if pk not in held]

    def duplicated(self) -> list[str]:
        """Values the app believes are duplicated (at least two of its rows hold them)."""
        return [
            v
            for v in self.model.initial_dups
            + sorted(set(self.model.ever) - set(self.model.initial_dups))
            if len(self.model.holders(v)) > 1
        ]

    def _value(self, *, fresh_prefix: str = "f") -> str:
        roll = self.rng.random()
        if roll < 0.5 and self.model.initial_dups:
            return self.rng.choice(self.model.initial_dups)
        if roll < 0.8 and self.model.initial_singles:
            return self.rng.choice(self.model.initial_singles)
        return self._next(fresh_prefix)

    def _row(self, kind: str) -> int | None:
        """A free row: the survivor or a loser of a duplicated value, or any row."""
        held = self.held()
        dups = self.duplicated()
        if kind in ("survivor", "loser") and dups:
            holders = self.model.holders(self.rng.choice(dups))
            rows = holders[:1] if kind == "survivor" else holders[1:]
            rows = [pk for pk in rows if pk not in held]
            if rows:
                return self.rng.choice(rows)
        free = self.free_rows()
        return self.rng.choice(free) if free else None

    def _kind(self) -> str:
        return self.rng.choice(["survivor", "survivor", "loser", "any"])

    # -- operations: each returns what it did, for the step list ---------------------------

    async def insert_duplicate(self) -> str:
        value = self._value()
        rec = await self.conn.fetchrow(
            "INSERT INTO payments (transaction_id, amount, status, payload) "
            f"VALUES ($1, $2, 'new', $3::jsonb) {RETURNING}",
            value,
            _amount(self.rng),
            json.dumps({"op": self._next("i")}),
        )
        assert rec is not None
        await self._done(self.conn, rec["xid"])
        self.model.write(rec, key_write=True, disturbing=True)
        return f"insert row {rec['id']} with {value!r}"

    async def insert_many(self) -> str:
        """Live traffic: a burst of new duplicates of existing values, one statement."""
        values = [self._value() for _ in range(self.rng.randint(20, 150))]
        recs = await self.conn.fetch(
            "INSERT INTO payments (transaction_id, amount, status) "
            f"SELECT v, 1.00, 'burst' FROM unnest($1::text[]) AS v {RETURNING}",
            values,
        )
        await self._done(self.conn, recs[0]["xid"])
        for rec in recs:
            self.model.write(rec, key_write=True, disturbing=True)
        return f"insert {len(recs)} rows (ids {recs[0]['id']}..{recs[-1]['id']}) of existing values"

    async def delete(self, pk: int | None = None, *, why: str = "") -> str:
        kind = why or self._kind()
        if pk is None:
            pk = self._row(kind)
        if pk is None:
            return "delete: no free row"
        rec = await self.conn.fetchrow(f"DELETE FROM payments WHERE id = $1 {RETURNING}", pk)
        if rec is None:
            raise StepFailed(f"[lost-write] row {pk}, which the app never deleted, is gone")
        await self._done(self.conn, rec["xid"])
        self.model.delete(pk, rec[KEY])
        return f"delete row {pk} ({kind}, holding {rec[KEY]!r})"

    async def rekey(self, pk: int | None = None, *, why: str = "") -> str:
        kind = why or self._kind()
        if pk is None:
            pk = self._row(kind)
        if pk is None:
            return "rekey: no free row"
        value = self._value()
        while value == self.model.rows[pk].key:
            value = self._next("f")
        rec = await self.conn.fetchrow(
            "UPDATE payments p SET transaction_id = $2 FROM (SELECT id, transaction_id "
            "FROM payments WHERE id = $1 FOR UPDATE) o WHERE p.id = o.id "
            "RETURNING p.*, o.transaction_id AS old_key, pg_current_xact_id()::text AS xid",
            pk,
            value,
        )
        if rec is None:
            raise StepFailed(f"[lost-write] row {pk}, which the app never deleted, is gone")
        await self._done(self.conn, rec["xid"])
        self.model.write(rec, key_write=True, disturbing=True, old_key=rec["old_key"])
        return f"rekey row {pk} ({kind}) {rec['old_key']!r} -> {value!r}"

    async def update_other(self) -> str:
        pk = self._row(self.rng.choice(["survivor", "loser", "any"]))
        if pk is None:
            return "update: no free row"
        currency = self.rng.choice(["EUR", "USD", "GBP"])
        rec = await self.conn.fetchrow(
            "UPDATE payments SET amount = $2, status = $3, payload = $4::jsonb, currency = $5 "
            f"WHERE id = $1 {RETURNING}",
            pk,
            _amount(self.rng),
            self._next("u"),
            json.dumps({"op": self.counter}),
            currency,
        )
        if rec is None:
            raise StepFailed(f"[lost-write] row {pk}, which the app never deleted, is gone")
        await self._done(self.conn, rec["xid"])
        self.model.write(rec, key_write=False, disturbing=False)
        return f"update row {pk}: status {rec['status']!r}, currency {currency}"

    async def hold_rows(self) -> str:
        dups = self.duplicated()
        if not dups:
            return "hold: nothing duplicated"
        value = self.rng.choice(dups)
        held = self.held()
        pks = [pk for pk in self.model.holders(value) if pk not in held]
        part = self.rng.choice(["group", "losers", "survivor"])
        pks = pks[1:] if part == "losers" else pks[:1] if part == "survivor" else pks
        if not pks:
            return "hold: rows taken"
        mode = self.rng.choice(["update", "update", "FOR UPDATE", "FOR NO KEY UPDATE"])
        conn = await connect(self.dsn, APP_NAME)
        tx = conn.transaction()
        await tx.start()
        if mode == "update":
            recs = await conn.fetch(
                f"UPDATE payments SET status = $2 WHERE id = ANY($1::bigint[]) {RETURNING}",
                pks,
                self._next("held"),
            )
            pending = [(r, False, False) for r in recs]
        else:
            recs = await conn.fetch(
                f"SELECT id, transaction_id FROM payments WHERE id = ANY($1::bigint[]) {mode}",
                pks,
            )
            pending = []
        hot = {r[KEY] for r in recs if r[KEY] is not None}
        what = f"rows {sorted(pks)} of {value!r} ({part}, {mode})"
        self.holds.append(Hold(conn, tx, what, set(pks), None, hot, pending, anyio.current_time()))
        self.model._touch(*hot)
        return f"hold {what}"

    async def find_or_create(self, *, hold: bool) -> str:
        roll = self.rng.random()
        dups = self.duplicated()
        if roll < 0.4 and dups:
            value = self.rng.choice(dups)  # found: the lock alone stops the tool
        elif roll < 0.7 and dups:
            # the value the tool would give one of the group's losers (the default template)
            target = self.rng.choice(dups)
            value = f"{target}-{self.rng.choice(self.model.holders(target)[1:])}"
        else:
            value = self._next("c")
        if value in self.held_keys():
            return f"find-or-create {value!r}: already locked by the app"
        conn = await connect(self.dsn, APP_NAME)
        tx = conn.transaction()
        await tx.start()
        await conn.execute(ADVISORY_LOCK, value)
        found = await conn.fetchval(
            "SELECT id FROM payments WHERE transaction_id = $1 LIMIT 1", value
        )
        pending = []
        if found is None:
            rec = await conn.fetchrow(
                "INSERT INTO payments (transaction_id, amount, status, payload) "
                f"VALUES ($1, $2, 'created', '{{}}'::jsonb) {RETURNING}",
                value,
                _amount(self.rng),
            )
            assert rec is not None
            pending = [(rec, True, False)]
        did = f"found row {found}" if found is not None else f"created row {pending[0][0]['id']}"
        hot = {value, value.rsplit("-", 1)[0]}
        h = Hold(
            conn, tx, f"find-or-create {value!r}", set(), value, hot, pending, anyio.current_time()
        )
        self.model._touch(value)
        if hold:
            self.holds.append(h)
            return f"find-or-create {value!r} under its advisory lock, held: {did}"
        await self._finish(h, commit=True)
        return f"find-or-create {value!r} under its advisory lock: {did}"

    async def _finish(self, h: Hold, *, commit: bool) -> None:
        if not commit:
            await h.tx.rollback()
            await h.conn.close()
            return
        await h.tx.commit()
        if h.pending:
            await self._done(h.conn, h.pending[0][0]["xid"])
            for rec, key_write, disturbing in h.pending:
                self.model.write(rec, key_write=key_write, disturbing=disturbing)
                if key_write and not disturbing:
                    self.model.found_or_created.add(rec[KEY])
        await h.conn.close()

    async def release(self, h: Hold | None = None, *, commit: bool | None = None) -> str:
        if not self.holds:
            return "release: nothing held"
        h = h or self.holds[0]
        # Longer than the tool's --lock-timeout, whatever the steps in between took.
        await anyio.sleep(max(0.0, 2 * LOCK_TIMEOUT - (anyio.current_time() - h.since)))
        commit = self.rng.random() < 0.75 if commit is None else commit
        self.holds.remove(h)
        await self._finish(h, commit=commit)
        return f"release ({'commit' if commit else 'rollback'}) {h.what}"

    async def release_all(self) -> list[str]:
        return [await self.release(h, commit=True) for h in list(self.holds)]

    async def attack_locked(self) -> list[str] | None:
        """Delete or re-key the survivors of groups a stopped tool has read and not renamed
        yet: the moment at which a survivor's key could vanish from under a batch (issue 9,
        3). None: no batch of the tool is at that moment."""
        window = [r for r in await self.conn.fetch(LOCKED_GROUPS) if r["window"]]
        held = self.held()
        done = []
        for r in self.rng.sample(window, min(len(window), self.rng.randint(1, 3))):
            pk = int(r["survivor"])
            if pk in held or pk not in self.model.rows or self.model.rows[pk].deleted:
                continue
            op = self.delete if self.rng.random() < 0.5 else self.rekey
            done.append(await op(pk, why=f"survivor of {r['k']!r}, read by a stopped batch"))
        return done or None

    async def attack_frontier(self, run_id: str) -> list[str]:
        """Delete or re-key the survivors of the next groups the running tool will reach:
        the moment at which a survivor's key can vanish from under a batch (issue 9, 3)."""
        last = ""
        if await self.conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
            last = (
                await self.conn.fetchval(
                    "SELECT old_value FROM bulkdedupe.changes WHERE run_id = $1 "
                    "ORDER BY id DESC LIMIT 1",
                    run_id,
                )
                or ""
            )
        ahead = await self.conn.fetch(
            "SELECT transaction_id AS k, min(id) AS survivor FROM payments "
            "WHERE transaction_id > $1 GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT $2",
            last,
            self.rng.randint(1, 3),
        )
        held = self.held()
        done = []
        for r in ahead:
            pk = int(r["survivor"])
            if pk in held or pk not in self.model.rows or self.model.rows[pk].deleted:
                continue
            op = self.delete if self.rng.random() < 0.5 else self.rekey
            done.append(await op(pk, why=f"survivor of {r['k']!r}, ahead of the tool"))
        return done or [f"frontier after {last!r}: nothing to attack"]


# --- the tool --------------------------------------------------------------------------------


@dataclass
class Run:
    run_id: str
    first_tick: int
    invocations: int = 0
    status: str | None = None  # of its last invocation; "killed" after SIGKILL
    undone: bool = False
    hot: set[str] = field(default_factory=set)  # groups the app locked during any invocation

    @property
    def resumable(self) -> bool:
        return self.status in ("killed", "interrupted", "incomplete", "failed") and not self.undone


@dataclass
class Invocation:
    run: Run
    name: str
    start_tick: int
    resumed: bool
    skipped_before: dict[str, int]  # group -> attempts, in the skipped table at the start
    stack: AsyncExitStack
    proc: Process
    started: float
    steps: int = 0  # steps taken while it ran in the background


@dataclass(frozen=True)
class Outcome:
    rc: int
    summary: dict[str, Any] | None
    error: str  # the tool's last error line or stderr tail


def tool_options(rng: random.Random) -> list[str]:
    batch = rng.choice([5, 10, 20, 50])
    args = ["--batch-size", str(batch), "--min-batch-size", str(min(batch, 5))]
    args += ["--concurrency", str(rng.choice([1, 2, 3]))]
    args += ["--target-batch-time", rng.choice(["off", "100ms"])]
    args += ["--max-retries", str(rng.choice([0, 1, 2]))]
    args += ["--scan-page-size", str(rng.choice([100, 200, 1000]))]
    args += ["--scanners", str(rng.choice([1, 2]))]
    return [*args, "--lock-timeout", f"{int(LOCK_TIMEOUT * 1000)}ms"]


def _error_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("bulkdedupe: error:")]
    return lines[-1] if lines else err[-1500:]


class Tool:
    """The real CLI as subprocesses: one background invocation at most, and foreground ones."""

    def __init__(self, dsn: str, tmp_path: Path, rng: random.Random, seed: int) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.rng = rng
        self.seed = seed
        self.runs: dict[str, Run] = {}
        self.bg: Invocation | None = None
        self.names = 0

    def _name(self, what: str) -> str:
        self.names += 1
        return f"s{self.seed}-{self.names:02d}-{what}"

    def undoable(self) -> bool:
        """Whether a run has completed and not been undone (undoing it makes work again)."""
        return any(r.status == "completed" and not r.undone for r in self.runs.values())

    def last_resumable(self) -> Run | None:
        runs = [r for r in self.runs.values() if r.resumable]
        return runs[-1] if runs else None

    async def start(self, model: Model, skipped: dict[str, int], run: Run | None) -> Invocation:
        if run is None:
            run = Run(f"s{self.seed}-r{len(self.runs) + 1}", model.tick)
            self.runs[run.run_id] = run
        run.invocations += 1
        name = self._name(run.run_id.rsplit("-", 1)[-1])
        args = ["--log-format", "json", "run", "--apply", "--run-id", run.run_id]
        args += [*tool_options(self.rng), "--format", "json", "-d", self.dsn]
        stack = AsyncExitStack()
        proc = await stack.enter_async_context(spawn(self.tmp_path, name, *args))
        return Invocation(
            run, name, model.tick, run.invocations > 1, skipped, stack, proc, anyio.current_time()
        )

    async def finish(self, inv: Invocation, how: str, delay: float) -> Outcome:
        """End an invocation: wait for it, or SIGTERM / SIGKILL it after `delay` s."""
        proc = inv.proc
        try:
            if how == "term":  # SIGTERM before the handler is installed would kill it

                async def listening() -> bool:
                    return proc.returncode is not None or catches(proc.pid, signal.SIGTERM)

                await wait_until(listening, "the tool to handle SIGTERM", interval=0.005)
            if how != "wait":
                with anyio.move_on_after(delay):
                    await proc.wait()
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
            with anyio.move_on_after(TOOL_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
                inv.run.status = "killed"
                return Outcome(-1, None, f"[hang] {inv.name} did not end in {TOOL_TIMEOUT:g}s")
        finally:
            await inv.stack.aclose()
        out, err = output(self.tmp_path, inv.name)
        rc = proc.returncode
        assert rc is not None
        try:
            summary = json.loads(out) if out.strip() else None
        except ValueError:
            summary = None
        inv.run.status = "killed" if rc == -signal.SIGKILL else STATUS_BY_EXIT.get(rc, "failed")
        return Outcome(rc, summary, _error_of(err))

    async def undo(self, run_id: str) -> tuple[int, dict[str, Any] | None, str]:
        name = self._name("undo")
        args = ["--log-format", "json", "undo", "--apply", "--run-id", run_id]
        args += ["--batch-size", str(self.rng.choice([3, 10, 100])), "--lock-timeout", "2s"]
        args += ["--format", "json", "-d", self.dsn]
        async with spawn(self.tmp_path, name, *args) as proc:
            with anyio.move_on_after(TOOL_TIMEOUT):
                await proc.wait()
        out, err = output(self.tmp_path, name)
        rc = proc.returncode if proc.returncode is not None else -9
        try:
            summary = json.loads(out) if out.strip() else None
        except ValueError:
            summary = None
        return rc, summary, _error_of(err)


# --- undo, checked byte for byte ------------------------------------------------------------


async def undo_and_check(
    conn: asyncpg.Connection, tool: Tool, run: Run, model: Model
) -> tuple[str, list[str]]:
    """`undo --apply` of `run` with nothing else going on: the table afterwards must be exactly
    the table before with, newest change first, each row still holding the value the run gave
    it put back to the value it had — every other byte as it was."""
    before = {
        r["id"]: r["full"] for r in await conn.fetch("SELECT id, t::text AS full FROM payments t")
    }
    keys = {
        r["id"]: r["k"] for r in await conn.fetch("SELECT id, transaction_id AS k FROM payments")
    }
    audit = await conn.fetch(
        "SELECT pk, old_value, new_value FROM bulkdedupe.changes WHERE run_id = $1 "
        "ORDER BY id DESC",
        run.run_id,
    )
    original = dict(keys)
    tally = Counter[str]()
    for a in audit:
        pk = int(a["pk"])
        if pk not in keys:
            tally["deleted_since"] += 1
        elif keys[pk] == a["new_value"]:
            keys[pk] = a["old_value"]
            tally["restored"] += 1
        elif keys[pk] == a["old_value"]:
            tally["already_restored"] += 1
        else:
            tally["changed_since"] += 1
    restored = {pk: k for pk, k in keys.items() if k != original[pk]}
    expected = dict(before)
    for r in await conn.fetch(
        "SELECT t.id, jsonb_populate_record(t, jsonb_build_object('transaction_id', m.k))::text "
        "AS full FROM payments t JOIN unnest($1::bigint[], $2::text[]) AS m(id, k) USING (id)",
        list(restored),
        list(restored.values()),
    ):
        expected[r["id"]] = r["full"]
    rc, summary, error = await tool.undo(run.run_id)
    did = f"undo {run.run_id} (exit {rc}): {dict(tally)}"
    problems = []
    if rc != EXIT_OK or summary is None:
        return did, [f"[undo] {did}: {error}"]
    for k in ("restored", "already_restored", "changed_since", "deleted_since"):
        if summary.get(k) != tally[k]:
            problems.append(
                f"[undo] {k}: the undo says {summary.get(k)}, the audit and data say {tally[k]}"
            )
    if summary.get("status") != "completed":
        problems.append(f"[undo] status {summary.get('status')!r}")
    after = {
        r["id"]: r["full"] for r in await conn.fetch("SELECT id, t::text AS full FROM payments t")
    }
    if after != expected:
        diff = sorted(
            pk for pk in after.keys() | expected.keys() if after.get(pk) != expected.get(pk)
        )
        problems.append(
            f"[undo] {len(diff)} rows differ from the model, e.g. "
            + "; ".join(f"{pk}: {after.get(pk)} != {expected.get(pk)}" for pk in diff[:3])
        )
    model.tick += 1
    for value in restored.values():
        if value is not None:
            model.disturbed[value] = model.tick
    run.undone = True
    return did, problems


# --- a scenario ------------------------------------------------------------------------------


def layout(rng: random.Random) -> list[tuple[str | None]]:
    """Pairs to groups of five, one group bigger than any batch, single rows and NULLs."""
    groups = rng.randint(100, 250)
    sizes: dict[str | None, int] = {
        f"k{i:03d}": rng.choice([2, 2, 2, 3, 3, 4, 5]) for i in range(groups)
    }
    sizes[f"k{groups:03d}"] = rng.randint(25, 60)
    sizes |= {f"s{i:03d}": 1 for i in range(rng.randint(200, 600))}
    sizes[None] = rng.randint(3, 15)
    return shuffled(sizes, seed=rng.randrange(2**31))


async def set_up(conn: asyncpg.Connection, dsn: str, app: App, rng: random.Random) -> str:
    await conn.execute(DROP_ALL)
    await create_payments(dsn, rows=None, key_type="varchar(64)")
    await conn.execute(HISTORY_DDL)
    slow = rng.choice([0.0, 0.0, 0.003, 0.006, 0.01])
    if slow:
        await slow_down_renames(conn, slow)
    rows = layout(rng)
    await app.load(rows)
    await conn.execute("ANALYZE payments")
    dups = len(app.model.initial_dups)
    return f"{len(rows)} rows, {dups} duplicated values, renames slowed by {slow * 1000:g} ms"


@dataclass
class Scenario:
    """One seeded sequence of steps, each followed by the checks."""

    seed: int
    dsn: str
    tmp_path: Path
    max_seconds: float
    keep_going: bool = False  # record problems and go on (to see every invariant that fails)
    steps: list[str] = field(default_factory=list)
    undos: int = 0
    problems: list[str] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)  # problem tag -> how many
    seen: set[str] = field(default_factory=set)

    def log(self, text: str) -> None:
        self.steps.append(f"{len(self.steps):02d} {text}")

    async def execute(self) -> None:
        rng = random.Random(self.seed)
        model = Model()
        conn = await connect(self.dsn, CHECK_NAME)
        app = App(self.dsn, model, rng)
        tool = Tool(self.dsn, self.tmp_path, rng, self.seed)
        try:
            await app.open()
            self.log("set up: " + await set_up(conn, self.dsn, app, rng))
            await self.check(conn, model)
            deadline = anyio.current_time() + self.max_seconds
            for _ in range(rng.randint(14, 26)):
                if anyio.current_time() > deadline:
                    self.log("time cap reached: on to the final runs")
                    break
                await self.step(conn, app, tool, rng)
                await self.check(conn, model)
            await self.final(conn, app, tool, rng)
            if self.problems:
                counts = ", ".join(f"{t} x{n}" for t, n in sorted(self.found.items()))
                raise StepFailed("\n".join([counts, *self.problems]))
        finally:
            if tool.bg is not None:
                await tool.bg.stack.aclose()
            await app.close()
            await wait_until_tool_gone(conn)
            await conn.close()

    async def check(
        self, conn: asyncpg.Connection, model: Model, extra: list[str] | None = None
    ) -> Snapshot:
        snap = await snapshot(conn)
        problems = (extra or []) + check_always(snap, model)
        if problems and not self.keep_going:
            raise StepFailed("\n".join(problems[:25]) + f"\n({len(problems)} problems)")
        step = len(self.steps) - 1
        for p in problems:
            if (same := p.split(";", 1)[0]) in self.seen:
                continue
            self.seen.add(same)
            tag = p.split("]", 1)[0] + "]"
            self.found[tag] = self.found.get(tag, 0) + 1
            if self.found[tag] <= 3:
                self.problems.append(f"step {step:02d}: {p}")
        return snap

    async def _start(
        self, conn: asyncpg.Connection, app: App, tool: Tool, run: Run | None
    ) -> Invocation:
        snap = await snapshot(conn)
        before = {k: r["attempts"] for k, r in snap.skipped_of(run.run_id).items()} if run else {}
        inv = await tool.start(app.model, before, run)
        for h in app.holds:
            inv.run.hot |= h.hot
        return inv

    async def _end(
        self,
        conn: asyncpg.Connection,
        app: App,
        tool: Tool,
        inv: Invocation,
        how: str,
        delay: float,
        *,
        quiet: bool = False,
    ) -> None:
        out = await tool.finish(inv, how, delay)
        await wait_until_tool_gone(conn)
        late = STATUS_EXIT.get((out.summary or {}).get("status", ""))
        if how == "term" and out.rc not in STATUS_BY_EXIT and late is not None:
            # The signal came once the run was over and its summary printed: what the process
            # then does with it is no concern of the run's.
            self.log(f"  SIGTERM came after {inv.name} had ended (exit {out.rc}): taken as {late}")
            out = dataclasses.replace(out, rc=late)
            inv.run.status = STATUS_BY_EXIT[late]
        took = anyio.current_time() - inv.started
        s = out.summary or {}
        self.log(
            f"  {inv.name}: exit {out.rc} after {took:.2f}s, status {s.get('status')!r}, "
            f"renamed {s.get('rows_renamed')}, skipped {s.get('skipped')} "
            f"groups {s.get('skipped_groups')}"
        )
        snap = await snapshot(conn)
        record = snap.runs.get(inv.run.run_id)
        if out.rc == -signal.SIGKILL and record is not None and record["status"] != "running":
            inv.run.status = record["status"]  # it had finished when the signal came
        problems = check_outcome(inv, out, snap, app.model, quiet=quiet)
        await self.check(conn, app.model, problems)

    async def step(
        self, conn: asyncpg.Connection, app: App, tool: Tool, rng: random.Random
    ) -> None:
        bg = tool.bg
        choices: dict[str, float] = {
            "insert": 2,
            "insert_many": 0.5 if bg is not None else 1.5,
            "delete": 2,
            "rekey": 2,
            "update": 2,
            "hold": 1.5 if len(app.holds) < 3 else 0,
            "find_or_create": 1.5 if len(app.holds) < 3 else 0,
            "release": 2 if app.holds else 0,
            "start": 4 if bg is None else 0,
            "run": 1.2 if bg is None else 0,
            "undo": (2 if tool.undoable() else 0.5) if bg is None and not app.holds else 0,
            "attack": 2 if bg is not None else 0,
            "pause": 4 if bg is not None else 0,
            "wait": (3 if bg.steps >= 2 else 0) if bg is not None else 0,
            "term": 2 if bg is not None else 0,
            "kill": 2 if bg is not None else 0,
        }
        kinds = [k for k, w in choices.items() if w > 0]
        kind = rng.choices(kinds, weights=[choices[k] for k in kinds])[0]
        tag = f" [{bg.name} running]" if bg is not None else ""
        if bg is not None:
            bg.steps += 1
        if kind == "insert":
            self.log(await app.insert_duplicate() + tag)
        elif kind == "insert_many":
            self.log(await app.insert_many() + tag)
        elif kind == "delete":
            self.log(await app.delete() + tag)
        elif kind == "rekey":
            self.log(await app.rekey() + tag)
        elif kind == "update":
            self.log(await app.update_other() + tag)
        elif kind == "hold":
            self.log(await app.hold_rows() + tag)
            if bg is not None and app.holds:
                bg.run.hot |= app.holds[-1].hot
        elif kind == "find_or_create":
            self.log(await app.find_or_create(hold=rng.random() < 0.6) + tag)
            if bg is not None and app.holds:
                bg.run.hot |= app.holds[-1].hot
        elif kind == "release":
            self.log(await app.release() + tag)
        elif kind in ("start", "run"):
            if len(app.holds) < 3 and rng.random() < 0.4:  # a run that meets a held lock
                held = app.hold_rows() if rng.random() < 0.5 else app.find_or_create(hold=True)
                self.log(await held)
            resume = tool.last_resumable() if rng.random() < 0.5 else None
            inv = await self._start(conn, app, tool, resume)
            verb = "resume" if inv.resumed else "run"
            self.log(
                f"tool {verb} {inv.run.run_id} as {inv.name}"
                + (" in the background" if kind == "start" else "")
            )
            if kind == "start":
                tool.bg = inv
            else:  # the app does nothing meanwhile: only its held locks can get in the way
                await self._end(conn, app, tool, inv, "wait", 0, quiet=not app.holds)
        elif kind == "attack":
            assert bg is not None
            for did in await app.attack_frontier(bg.run.run_id):
                self.log(did + tag)
        elif kind == "pause":
            assert bg is not None
            await self.pause(bg, app, rng)
        elif kind in ("wait", "term", "kill"):
            assert bg is not None
            delay = rng.uniform(0.0, 0.3)
            self.log(f"tool {kind} {bg.name}" + (f" after {delay:.2f}s" if kind != "wait" else ""))
            tool.bg = None
            await self._end(conn, app, tool, bg, kind, delay)
        else:
            await self.undo(conn, app, tool)
        await anyio.sleep(rng.uniform(0.0, 0.1))

    async def pause(self, bg: Invocation, app: App, rng: random.Random) -> None:
        """Stop the tool for a moment (as a scheduler or a GC pause would) and, meanwhile,
        delete or re-key the survivors of the groups its batches hold."""
        proc = bg.proc
        if proc.returncode is not None:
            self.log(f"pause {bg.name}: it has ended")
            return
        for _ in range(150):  # up to 1.5 s for its batches to start
            if proc.returncode is not None or await app.conn.fetch(LOCKED_GROUPS):
                break
            await anyio.sleep(0.01)
        cycles = 0
        for cycles in range(1, 31):
            if proc.returncode is not None:
                break
            proc.send_signal(signal.SIGSTOP)
            try:
                await anyio.sleep(0.005)  # the statements in flight finish
                done = await app.attack_locked()
                if done is not None:
                    self.log(f"pause {bg.name} (SIGSTOP, try {cycles}) between read and rename:")
                    for did in done:
                        self.log("  " + did)
                    await anyio.sleep(rng.uniform(0.0, 0.05))
                    return
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGCONT)
            await anyio.sleep(rng.uniform(0.001, 0.005))
        self.log(f"pause {bg.name}: {cycles} SIGSTOPs, never between a read and its rename")

    async def undo(self, conn: asyncpg.Connection, app: App, tool: Tool) -> None:
        snap = await snapshot(conn)
        candidates = [
            r for r in tool.runs.values() if snap.audit_count(r.run_id) and r.status is not None
        ]
        if not candidates:
            self.log("undo: no run has renamed anything yet")
            return
        run = max(candidates, key=lambda r: (not r.undone, snap.audit_count(r.run_id)))
        did, problems = await undo_and_check(conn, tool, run, app.model)
        self.undos += 1
        self.log(did)
        await self.check(conn, app.model, problems)

    async def final(
        self, conn: asyncpg.Connection, app: App, tool: Tool, rng: random.Random
    ) -> None:
        """Let go of everything, then: the last unfinished run resumed, one undo checked byte
        for byte (if none was yet), a fresh run; with nothing in the way, both complete and no
        duplicate is left."""
        if tool.bg is not None:
            bg, tool.bg = tool.bg, None
            self.log(f"final: wait for {bg.name}")
            await self._end(conn, app, tool, bg, "wait", 0)
        for did in await app.release_all():
            self.log("final: " + did)
        await self.check(conn, app.model)
        run = tool.last_resumable()
        if run is not None:
            inv = await self._start(conn, app, tool, run)
            self.log(f"final: resume {run.run_id} as {inv.name}")
            await self._end(conn, app, tool, inv, "wait", 0, quiet=True)
        if not self.undos:
            await self.undo(conn, app, tool)
        for _ in range(2):
            inv = await self._start(conn, app, tool, None)
            self.log(f"final: fresh run {inv.run.run_id} as {inv.name}")
            await self._end(conn, app, tool, inv, "wait", 0, quiet=True)
            if self.undos:
                break
            await self.undo(conn, app, tool)  # nothing was renamed before this run
        snap = await self.check(conn, app.model)
        end = []
        if snap.groups():
            end.append(f"[resolved] duplicates left at the end: {sorted(snap.groups())[:10]}")
        if not self.undos:
            end.append("[undo] the scenario never undid a run")
        await self.check(conn, app.model, end)
