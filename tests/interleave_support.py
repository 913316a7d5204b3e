"""The randomized interleaving test's actors (tests/test_interleave.py): the application, with
a model of everything it wrote; the CLI as subprocesses (run, resume, SIGTERM, kill -9,
SIGSTOP, undo); and the scenario that interleaves them, checking tests/interleave_checks.py's
invariants after every step. Names in SQL here are test-authored, never user input.

Each scenario runs on one of two table shapes (interleave_checks.Shape): the plain payments
table, or payments with PRIMARY KEY (id, merchant_id) run with --scope merchant_id, where the
application's duplicates, advisory locks and key changes are per merchant, and a key change may
also move a row to another merchant.
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
    KEY,
    PLAIN,
    SCOPE,
    STATUS_BY_EXIT,
    STATUS_EXIT,
    Shape,
    Snapshot,
    check_always,
    check_outcome,
    history_ddl,
    snapshot,
)


def locked_groups(shape: Shape) -> str:
    """The duplicated groups whose advisory lock (README, "The advisory lock") a tool session
    holds, with their lowest row: the groups of the batches in flight and their survivors.
    `window`: the session is between statements, past its timeouts and key locks and not yet
    renaming (its last statement read the groups or checked new values), i.e. its rename is
    still to come."""
    group = shape.group_sql("p")
    return f"""
SELECT {group} AS k, (array_agg(p.{shape.row} ORDER BY p.id))[1] AS survivor,
       bool_or(a.state = 'idle in transaction' AND a.query NOT ILIKE '%update%'
               AND a.query NOT ILIKE '%set_config%'
               AND a.query NOT ILIKE '%pg_advisory_xact_lock(%') AS window
FROM payments p
JOIN pg_locks l ON l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
 AND ((l.classid::bigint << 32) | l.objid::bigint)
     = hashtextextended('public.payments.transaction_id:' || {group}, 0)
JOIN pg_stat_activity a ON a.pid = l.pid AND a.application_name = 'bulkdedupe'
WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
GROUP BY 1 HAVING count(*) > 1 ORDER BY 1"""


LOCK_TIMEOUT: Final = 0.2  # the tool's --lock-timeout; every app lock is held at least twice that
# The documented lock expressions (README, "The advisory lock"), as an application takes
# them: of a value ($1); with --scope merchant_id, of a merchant's ($1) value ($2).
ADVISORY_LOCK: Final = (
    "SELECT pg_advisory_xact_lock(hashtextextended('public.payments.transaction_id:' "
    "|| $1::text, 0))"
)
SCOPED_ADVISORY_LOCK: Final = (
    "SELECT pg_advisory_xact_lock(hashtextextended('public.payments.transaction_id:' "
    "|| jsonb_build_array($1::int::text, $2::text)::text, 0))"
)
TOOL_TIMEOUT: Final = 45.0  # one invocation of the CLI, at most
DROP_ALL: Final = """
DROP SCHEMA IF EXISTS bulkdedupe CASCADE;
DROP TABLE IF EXISTS interleave_history;
DROP TABLE IF EXISTS payments CASCADE;
DROP SEQUENCE IF EXISTS payments_app_id;
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
    key_xid: str  # the transaction of its last write of the key (or, scoped, of its merchant)
    group: str | None  # the group that write gave it: its key, or scoped (merchant, key)
    deleted: bool = False

    @property
    def key(self) -> str | None:
        value = self.values[KEY]
        assert value is None or isinstance(value, str)
        return value


@dataclass
class AdvisoryHold:
    """The app held the documented advisory lock of `group` from `since` (taken after it got
    the lock) to `until` (taken before its commit or rollback; None: it still holds it)."""

    group: str
    since: dt.datetime
    until: dt.datetime | None = None


@dataclass
class Model:
    """What the application did, told only by the application. Values are groups: key values,
    or with the scoped shape (merchant, key) as the tool spells them; a row is named by
    `shape.row`."""

    shape: Shape = PLAIN
    rows: dict[int, AppRow] = field(default_factory=dict)
    ever: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    committed_by: dict[str, dt.datetime] = field(default_factory=dict)  # xid -> after commit
    disturbed: dict[str, int] = field(default_factory=dict)  # group -> tick: may be duplicated
    touched: dict[str, int] = field(default_factory=dict)  # group -> tick of any app write
    found_or_created: set[str] = field(default_factory=set)
    initial_dups: list[str] = field(default_factory=list)
    initial_singles: list[str] = field(default_factory=list)
    merchants: list[int] = field(default_factory=list)  # scoped: the merchants loaded
    advisory: list[AdvisoryHold] = field(default_factory=list)
    tick: int = 0

    def commit(self, xid: str, at: dt.datetime) -> int:
        self.committed_by[xid] = at
        self.tick += 1
        return self.tick

    def _touch(self, *groups: str | None) -> None:
        for g in groups:
            if g is not None:
                self.touched[g] = self.tick

    def write(
        self,
        rec: asyncpg.Record,
        *,
        key_write: bool,
        disturbing: bool,
        old_group: str | None = None,
    ) -> None:
        """A row as the app's statement returned it; call after `commit` of its xid.
        `key_write`: it wrote the row's group (its key, or scoped its key or merchant)."""
        pk = int(rec[self.shape.row])
        values = {c: rec[c] for c in self.shape.columns}
        prior = self.rows.get(pk)
        if not key_write and prior is not None:
            values[KEY] = prior.values[KEY]  # what it returned may be a rename of the tool's
        key_xid = rec["xid"] if key_write or prior is None else prior.key_xid
        group = self.shape.group_of(values)
        self.rows[pk] = AppRow(values, key_xid, group)
        if key_write and group is not None:
            self.ever[group].add(pk)
            if disturbing:
                self.disturbed[group] = self.tick
        self._touch(group, old_group)

    def delete(self, pk: int, old_group: str | None) -> None:
        self.rows[pk].deleted = True
        self._touch(old_group, self.rows[pk].group)

    def alive(self) -> list[int]:
        return sorted(pk for pk, r in self.rows.items() if not r.deleted)

    def pk_order(self, pk: int) -> tuple[int, int]:
        """Where the tool's default keep order puts a row within its group: by primary key,
        which within one group (one merchant) is by id."""
        return (int(self.rows[pk].values.get("id", pk)), pk)

    def pk_taken(self, id_: int, merchant: int) -> bool:
        """Scoped: whether a live row has this primary key."""
        return any(
            not r.deleted and r.values["id"] == id_ and r.values[SCOPE] == merchant
            for r in self.rows.values()
        )

    def holders(self, group: str) -> list[int]:
        """Rows the app believes are in `group` (it set it and has not changed it since), the
        survivor first."""
        return sorted(
            (
                pk
                for pk in self.ever.get(group, ())
                if not self.rows[pk].deleted and self.rows[pk].group == group
            ),
            key=self.pk_order,
        )

    def protected(self) -> dict[str, int]:
        """group -> the row that must still hold it: the lowest pk the app ever gave the group,
        if the app has neither deleted it nor changed its key (or merchant) since (default keep
        order)."""
        out = {}
        for group, pks in self.ever.items():
            first = min(pks, key=self.pk_order)
            row = self.rows[first]
            if not row.deleted and row.group == group:
                out[group] = first
        return out


# --- the application -----------------------------------------------------------------------


@dataclass
class Hold:
    """An application transaction kept open across steps, holding locks."""

    conn: asyncpg.Connection
    tx: Transaction
    what: str
    pks: set[int]  # rows it locks
    key: str | None  # the group whose advisory lock it holds
    hot: set[str]  # groups the tool may have to skip because of it
    pending: list[tuple[asyncpg.Record, bool, bool]]  # (row, key_write, disturbing) at commit
    since: float
    lock: AdvisoryHold | None = None


def _amount(rng: random.Random) -> Decimal:
    return Decimal(rng.randint(1, 10**7)) / 100


class App:
    """The application: short transactions on one connection, held ones on their own."""

    def __init__(self, dsn: str, model: Model, rng: random.Random) -> None:
        self.dsn = dsn
        self.model = model
        self.shape = model.shape
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

    async def load(
        self,
        keys: list[str | None],
        merchants: list[int] | None = None,
        ids: list[int] | None = None,
    ) -> None:
        """The initial rows, in this order; scoped: each row's merchant and id too."""
        rng = self.rng
        n = len(keys)
        amounts = [_amount(rng) for _ in keys]
        created = [
            dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i) for i in range(n)
        ]
        payloads = [json.dumps({"n": i}) for i in range(n)]
        if merchants is None:
            recs = await self.conn.fetch(
                "INSERT INTO payments (transaction_id, amount, status, created_at, payload) "
                "SELECT * FROM unnest($1::text[], $2::numeric[], $3::text[], $4::timestamptz[], "
                f"$5::jsonb[]) {RETURNING}",
                keys,
                amounts,
                ["settled"] * n,
                created,
                payloads,
            )
        else:
            recs = await self.conn.fetch(
                "INSERT INTO payments (merchant_id, id, transaction_id, amount, status, "
                "created_at, payload) SELECT * FROM unnest($1::int[], $2::bigint[], $3::text[], "
                f"$4::numeric[], $5::text[], $6::timestamptz[], $7::jsonb[]) {RETURNING}",
                merchants,
                ids,
                keys,
                amounts,
                ["settled"] * n,
                created,
                payloads,
            )
            self.model.merchants = sorted(set(merchants))
        await self._done(self.conn, recs[0]["xid"])
        for rec in recs:
            self.model.write(rec, key_write=True, disturbing=False)
        counts = Counter(g for rec in recs if (g := self.shape.group_of(rec)) is not None)
        self.model.initial_dups = sorted(g for g, n in counts.items() if n > 1)
        self.model.initial_singles = sorted(g for g, n in counts.items() if n == 1)
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
        """Groups the app believes are duplicated (at least two of its rows are in them)."""
        return [
            v
            for v in self.model.initial_dups
            + sorted(set(self.model.ever) - set(self.model.initial_dups))
            if len(self.model.holders(v)) > 1
        ]

    def _value(self, *, merchant: int | None = None, fresh_prefix: str = "f") -> str:
        """A group to write to: a duplicated one, a single one or a fresh value; scoped, of
        `merchant` if given, else of any merchant (a key may be under several)."""
        roll = self.rng.random()
        dups, singles = self.model.initial_dups, self.model.initial_singles
        if merchant is not None:
            dups = [g for g in dups if self.shape.parts(g)[0] == merchant]
            singles = [g for g in singles if self.shape.parts(g)[0] == merchant]
        if roll < 0.5 and dups:
            return self.rng.choice(dups)
        if roll < 0.8 and singles:
            return self.rng.choice(singles)
        if not self.shape.scoped:
            return self._next(fresh_prefix)
        m = merchant if merchant is not None else self.rng.choice(self.model.merchants)
        return self.shape.of(m, self._next(fresh_prefix))

    def _row(self, kind: str) -> int | None:
        """A free row: the survivor or a loser of a duplicated group, or any row."""
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

    def _tool_value(self, target: str, pk: int) -> str:
        """The value the tool's default template gives row `pk` of group `target`: the key and
        the primary key's values, joined by '-'."""
        key = self.shape.parts(target)[1]
        if not self.shape.scoped:
            return f"{key}-{pk}"
        row = self.model.rows[pk].values
        return f"{key}-{row['id']}-{row[SCOPE]}"

    # -- operations: each returns what it did, for the step list ---------------------------

    async def _insert(
        self, conn: asyncpg.Connection, group: str, amount: Decimal, status: str, payload: str
    ) -> asyncpg.Record:
        scope, value = self.shape.parts(group)
        if scope is None:
            rec = await conn.fetchrow(
                "INSERT INTO payments (transaction_id, amount, status, payload) "
                f"VALUES ($1, $2, $3, $4::jsonb) {RETURNING}",
                value,
                amount,
                status,
                payload,
            )
        else:
            rec = await conn.fetchrow(
                "INSERT INTO payments (merchant_id, transaction_id, amount, status, payload) "
                f"VALUES ($1, $2, $3, $4, $5::jsonb) {RETURNING}",
                scope,
                value,
                amount,
                status,
                payload,
            )
        assert rec is not None
        return rec

    async def insert_duplicate(self) -> str:
        group = self._value()
        amount = _amount(self.rng)
        rec = await self._insert(
            self.conn, group, amount, "new", json.dumps({"op": self._next("i")})
        )
        await self._done(self.conn, rec["xid"])
        self.model.write(rec, key_write=True, disturbing=True)
        return f"insert row {rec[self.shape.row]} with {group!r}"

    async def insert_many(self) -> str:
        """Live traffic: a burst of new duplicates of existing groups, one statement."""
        groups = [self._value() for _ in range(self.rng.randint(20, 150))]
        if not self.shape.scoped:
            recs = await self.conn.fetch(
                "INSERT INTO payments (transaction_id, amount, status) "
                f"SELECT v, 1.00, 'burst' FROM unnest($1::text[]) AS v {RETURNING}",
                groups,
            )
        else:
            parts = [self.shape.parts(g) for g in groups]
            recs = await self.conn.fetch(
                "INSERT INTO payments (merchant_id, transaction_id, amount, status) "
                "SELECT m, v, 1.00, 'burst' FROM unnest($1::int[], $2::text[]) AS u(m, v) "
                f"{RETURNING}",
                [m for m, _ in parts],
                [v for _, v in parts],
            )
        await self._done(self.conn, recs[0]["xid"])
        for rec in recs:
            self.model.write(rec, key_write=True, disturbing=True)
        row = self.shape.row
        return (
            f"insert {len(recs)} rows ({row}s {recs[0][row]}..{recs[-1][row]}) of existing values"
        )

    async def delete(self, pk: int | None = None, *, why: str = "") -> str:
        kind = why or self._kind()
        if pk is None:
            pk = self._row(kind)
        if pk is None:
            return "delete: no free row"
        rec = await self.conn.fetchrow(
            f"DELETE FROM payments WHERE {self.shape.row} = $1 {RETURNING}", pk
        )
        if rec is None:
            raise StepFailed(f"[lost-write] row {pk}, which the app never deleted, is gone")
        await self._done(self.conn, rec["xid"])
        group = self.shape.group_of(rec)
        self.model.delete(pk, group)
        return f"delete row {pk} ({kind}, holding {group!r})"

    async def rekey(self, pk: int | None = None, *, why: str = "") -> str:
        kind = why or self._kind()
        if pk is None:
            pk = self._row(kind)
        if pk is None:
            return "rekey: no free row"
        if self.shape.scoped:
            return await self._rekey_scoped(pk, kind)
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
        self.model.write(rec, key_write=True, disturbing=True, old_group=rec["old_key"])
        return f"rekey row {pk} ({kind}) {rec['old_key']!r} -> {value!r}"

    async def _rekey_scoped(self, pk: int, kind: str) -> str:
        """A key change within the row's merchant, a move to another merchant keeping the key
        (a scope change; its primary key changes with it), or both."""
        row = self.model.rows[pk]
        merchant, id_ = row.values[SCOPE], row.values["id"]
        # merchants it can move to: its primary key free there, and not into a group the app
        # found-or-created (or holds the advisory lock of) without taking that lock itself
        guarded = self.model.found_or_created | self.held_keys()
        moves = [
            m
            for m in self.model.merchants
            if m != merchant
            and not self.model.pk_taken(id_, m)
            and self.shape.group(m, row.key) not in guarded
        ]
        roll = self.rng.random()
        if roll < 0.3 and moves:
            to = self.rng.choice(moves)
            rec = await self.conn.fetchrow(
                "UPDATE payments p SET merchant_id = $2 FROM (SELECT rid, merchant_id, "
                "transaction_id FROM payments WHERE rid = $1 FOR UPDATE) o WHERE p.rid = o.rid "
                "RETURNING p.*, o.transaction_id AS old_key, o.merchant_id AS old_scope, "
                "pg_current_xact_id()::text AS xid",
                pk,
                to,
            )
            what = "to merchant"
        else:
            if roll < 0.45 and moves:
                scope, value = self.shape.parts(self._value())
                to = scope if scope in moves else self.rng.choice(moves)
                what = "and merchant"
            else:
                to, value = merchant, self.shape.parts(self._value(merchant=merchant))[1]
                what = "in merchant"
            while self.shape.group(to, value) in (row.group, *guarded):
                value = self._next("f")
            rec = await self.conn.fetchrow(
                "UPDATE payments p SET transaction_id = $2, merchant_id = $3 FROM (SELECT rid, "
                "merchant_id, transaction_id FROM payments WHERE rid = $1 FOR UPDATE) o "
                "WHERE p.rid = o.rid RETURNING p.*, o.transaction_id AS old_key, "
                "o.merchant_id AS old_scope, pg_current_xact_id()::text AS xid",
                pk,
                value,
                to,
            )
        if rec is None:
            raise StepFailed(f"[lost-write] row {pk}, which the app never deleted, is gone")
        await self._done(self.conn, rec["xid"])
        old = self.shape.group(rec["old_scope"], rec["old_key"])
        self.model.write(rec, key_write=True, disturbing=True, old_group=old)
        new = self.shape.group_of(rec)
        return f"rekey row {pk} ({kind}, id {id_}) {what} {to}: {old!r} -> {new!r}"

    async def update_other(self) -> str:
        pk = self._row(self.rng.choice(["survivor", "loser", "any"]))
        if pk is None:
            return "update: no free row"
        currency = self.rng.choice(["EUR", "USD", "GBP"])
        rec = await self.conn.fetchrow(
            "UPDATE payments SET amount = $2, status = $3, payload = $4::jsonb, currency = $5 "
            f"WHERE {self.shape.row} = $1 {RETURNING}",
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
        row = self.shape.row
        if mode == "update":
            recs = await conn.fetch(
                f"UPDATE payments SET status = $2 WHERE {row} = ANY($1::bigint[]) {RETURNING}",
                pks,
                self._next("held"),
            )
            pending = [(r, False, False) for r in recs]
        else:
            recs = await conn.fetch(
                f"SELECT * FROM payments WHERE {row} = ANY($1::bigint[]) {mode}",
                pks,
            )
            pending = []
        hot = {g for r in recs if (g := self.shape.group_of(r)) is not None}
        what = f"rows {sorted(pks)} of {value!r} ({part}, {mode})"
        self.holds.append(Hold(conn, tx, what, set(pks), None, hot, pending, anyio.current_time()))
        self.model._touch(*hot)
        return f"hold {what}"

    async def find_or_create(self, *, hold: bool) -> str:
        roll = self.rng.random()
        dups = self.duplicated()
        target = None
        if roll < 0.4 and dups:
            group = self.rng.choice(dups)  # found: the lock alone stops the tool
        elif roll < 0.7 and dups:
            # the value the tool would give one of the group's losers (the default template)
            target = self.rng.choice(dups)
            value = self._tool_value(target, self.rng.choice(self.model.holders(target)[1:]))
            group = self.shape.of(self.shape.parts(target)[0], value)
        elif not self.shape.scoped:
            group = self._next("c")
        else:
            group = self.shape.of(self.rng.choice(self.model.merchants), self._next("c"))
        if group in self.held_keys():
            return f"find-or-create {group!r}: already locked by the app"
        scope, value = self.shape.parts(group)
        conn = await connect(self.dsn, APP_NAME)
        tx = conn.transaction()
        await tx.start()
        if scope is None:
            await conn.execute(ADVISORY_LOCK, value)
            lock = AdvisoryHold(group, await conn.fetchval("SELECT clock_timestamp()"))
            found = await conn.fetchval(
                "SELECT id FROM payments WHERE transaction_id = $1 LIMIT 1", value
            )
        else:
            await conn.execute(SCOPED_ADVISORY_LOCK, scope, value)
            lock = AdvisoryHold(group, await conn.fetchval("SELECT clock_timestamp()"))
            found = await conn.fetchval(
                "SELECT rid FROM payments WHERE merchant_id = $1 AND transaction_id = $2 LIMIT 1",
                scope,
                value,
            )
        pending = []
        if found is None:
            rec = await self._insert(conn, group, _amount(self.rng), "created", "{}")
            pending = [(rec, True, False)]
        row = self.shape.row
        did = f"found row {found}" if found is not None else f"created row {pending[0][0][row]}"
        if not self.shape.scoped:
            hot = {group, group.rsplit("-", 1)[0]}
        else:
            hot = {group} | ({target} if target is not None else set())
        h = Hold(
            conn,
            tx,
            f"find-or-create {group!r}",
            set(),
            group,
            hot,
            pending,
            anyio.current_time(),
            lock,
        )
        self.model.advisory.append(lock)
        self.model._touch(group)
        if hold:
            self.holds.append(h)
            return f"find-or-create {group!r} under its advisory lock, held: {did}"
        await self._finish(h, commit=True)
        return f"find-or-create {group!r} under its advisory lock: {did}"

    async def _finish(self, h: Hold, *, commit: bool) -> None:
        if h.lock is not None:
            h.lock.until = await h.conn.fetchval("SELECT clock_timestamp()")
        if not commit:
            await h.tx.rollback()
            await h.conn.close()
            return
        await h.tx.commit()
        if h.pending:
            await self._done(h.conn, h.pending[0][0]["xid"])
            for rec, key_write, disturbing in h.pending:
                self.model.write(rec, key_write=key_write, disturbing=disturbing)
                if key_write and not disturbing and (g := self.shape.group_of(rec)) is not None:
                    self.model.found_or_created.add(g)
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
        """Delete or re-key (scoped: or move to another merchant) the survivors of groups a
        stopped tool has read and not renamed yet: the moment at which a survivor's key could
        vanish from under a batch (issue 9, 3). None: no batch of the tool is at that moment."""
        window = [r for r in await self.conn.fetch(locked_groups(self.shape)) if r["window"]]
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
        """Delete or re-key the survivors of the next groups the running tool will reach (in
        the order of its scan index): the moment at which a survivor's key can vanish from
        under a batch (issue 9, 3)."""
        last: asyncpg.Record | None = None
        if await self.conn.fetchval("SELECT to_regclass('bulkdedupe.changes') IS NOT NULL"):
            last = await self.conn.fetchrow(
                "SELECT pk, old_value FROM bulkdedupe.changes WHERE run_id = $1 "
                "ORDER BY id DESC LIMIT 1",
                run_id,
            )
        n = self.rng.randint(1, 3)
        if not self.shape.scoped:
            after = (last["old_value"] if last is not None else None) or ""
            ahead = await self.conn.fetch(
                "SELECT transaction_id AS k, min(id) AS survivor FROM payments "
                "WHERE transaction_id > $1 GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT $2",
                after,
                n,
            )
            where = repr(after)
        else:
            cols = ", ".join(self.shape.scan_columns)
            params = {SCOPE: "$1::int", KEY: "$2::text"}
            bound = ", ".join(params[c] for c in self.shape.scan_columns)
            merchant = int(json.loads(last["pk"])[1]) if last is not None else None
            value = last["old_value"] if last is not None else None
            ahead = await self.conn.fetch(
                f"SELECT {self.shape.group_sql('p')} AS k, "
                "(array_agg(p.rid ORDER BY p.id))[1] AS survivor FROM payments p "
                f"WHERE p.transaction_id IS NOT NULL AND ($1::int IS NULL OR ({cols}) > ({bound})) "
                f"GROUP BY {cols} HAVING count(*) > 1 ORDER BY {cols} LIMIT $3",
                merchant,
                value,
                n,
            )
            where = repr(self.shape.group(merchant, value) if last is not None else "")
        held = self.held()
        done = []
        for r in ahead:
            pk = int(r["survivor"])
            if pk in held or pk not in self.model.rows or self.model.rows[pk].deleted:
                continue
            op = self.delete if self.rng.random() < 0.5 else self.rekey
            done.append(await op(pk, why=f"survivor of {r['k']!r}, ahead of the tool"))
        return done or [f"frontier after {where}: nothing to attack"]


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

    def __init__(
        self, dsn: str, tmp_path: Path, rng: random.Random, seed: int, shape: Shape = PLAIN
    ) -> None:
        self.dsn = dsn
        self.tmp_path = tmp_path
        self.rng = rng
        self.seed = seed
        self.shape = shape
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
        args += self.shape.tool_args()  # scoped: --scope merchant_id, the primary key by default
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
    it put back to the value it had — every other byte as it was. The undo finds each row by
    its primary key as audited (scoped: a row moved to another merchant since is not there)."""
    shape = model.shape
    scope = f"t.{SCOPE}" if shape.scoped else "NULL::int"
    current = await conn.fetch(
        f"SELECT t.{shape.row} AS id, t::text AS full, t.{KEY} AS k, {scope} AS scope, "
        f"{shape.pk_sql('t')} AS pk FROM payments t"
    )
    before = {r["id"]: r["full"] for r in current}
    keys = {r["id"]: r["k"] for r in current}
    scopes = {r["id"]: r["scope"] for r in current}
    by_pk = {r["pk"]: r["id"] for r in current}
    audit = await conn.fetch(
        "SELECT pk, old_value, new_value FROM bulkdedupe.changes WHERE run_id = $1 "
        "ORDER BY id DESC",
        run.run_id,
    )
    original = dict(keys)
    tally = Counter[str]()
    for a in audit:
        pk = by_pk.get(a["pk"])
        if pk is None:
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
        "SELECT m.id, jsonb_populate_record(t, jsonb_build_object('transaction_id', m.k))::text "
        "AS full FROM payments t JOIN unnest($1::bigint[], $2::text[]) AS m(id, k) "
        f"ON t.{shape.row} = m.id",
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
        r["id"]: r["full"]
        for r in await conn.fetch(f"SELECT {shape.row} AS id, t::text AS full FROM payments t")
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
    for pk, value in restored.items():
        if (group := shape.group(scopes[pk], value)) is not None:
            model.disturbed[group] = model.tick
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


def scoped_layout(rng: random.Random) -> list[tuple[int, int, str | None]]:
    """(merchant, id, key) rows: per merchant pairs to groups of five, one group bigger than
    any batch (its key also a small group of another merchant), single rows and NULLs; many
    keys are held under several merchants, duplicated in some, single in others (never a
    duplicate across merchants). Ids are drawn per merchant from one range, so most ids are
    some other merchant's too: only (id, merchant_id) names a row, and a row can move to a
    merchant only where its id is free."""
    merchants = sorted(rng.sample(range(1, 100), rng.randint(3, 6)))
    sizes: dict[tuple[int, str | None], int] = {}
    groups = rng.randint(70, 170)
    for i in range(groups):
        for m in rng.sample(merchants, rng.choice([1, 1, 2, 3])):
            sizes[(m, f"k{i:03d}")] = rng.choice([1, 2, 2, 2, 3, 3, 4, 5])
    giant, other = rng.sample(merchants, 2)
    sizes[(giant, f"k{groups:03d}")] = rng.randint(25, 60)
    sizes[(other, f"k{groups:03d}")] = 2
    for i in range(rng.randint(150, 450)):
        for m in rng.sample(merchants, rng.choice([1, 1, 2])):
            sizes[(m, f"s{i:03d}")] = 1
    for m in merchants:
        sizes[(m, None)] = rng.randint(1, 5)
    rows = [mk for mk, n in sizes.items() for _ in range(n)]
    random.Random(rng.randrange(2**31)).shuffle(rows)
    per = Counter(m for m, _ in rows)
    span = 2 * max(per.values())
    ids = {m: iter(rng.sample(range(1, span + 1), n)) for m, n in sorted(per.items())}
    return [(m, next(ids[m]), k) for m, k in rows]


def make_shape(name: str, rng: random.Random) -> Shape:
    """The table of a scenario; the scoped one's indexes vary by seed: the scan index leads
    with the merchant or the key, and an index on the key alone makes the tool check new
    values free in the whole table rather than in their merchant."""
    if name == PLAIN.name:
        return PLAIN
    assert name == "scoped", name
    order = rng.choice([(SCOPE, KEY), (KEY, SCOPE)])
    return Shape("scoped", scoped=True, scan_columns=order, key_index=rng.random() < 0.5)


async def create_scoped_payments(conn: asyncpg.Connection, shape: Shape) -> None:
    """payments with PRIMARY KEY (id, merchant_id), as a table partitioned by merchant must
    have it; the application's inserts take ids above every loaded one."""
    await conn.execute(
        f"""
        CREATE SEQUENCE payments_app_id START 1000001;
        CREATE TABLE payments (
            rid bigserial NOT NULL,
            id bigint NOT NULL DEFAULT nextval('payments_app_id'),
            merchant_id int NOT NULL,
            transaction_id varchar(64),
            amount numeric(12, 2) NOT NULL DEFAULT 10.00,
            currency text NOT NULL DEFAULT 'EUR',
            status text NOT NULL DEFAULT 'settled',
            created_at timestamptz NOT NULL DEFAULT now(),
            payload jsonb DEFAULT '{{}}'::jsonb,
            PRIMARY KEY (id, merchant_id)
        );
        ALTER SEQUENCE payments_app_id OWNED BY payments.id;
        CREATE INDEX payments_scope_idx ON payments ({", ".join(shape.scan_columns)});
        """
    )
    if shape.key_index:
        await conn.execute(f"CREATE INDEX payments_{KEY}_idx ON payments ({KEY})")


async def set_up(
    conn: asyncpg.Connection, dsn: str, app: App, rng: random.Random, shape: Shape = PLAIN
) -> str:
    await conn.execute(DROP_ALL)
    if shape.scoped:
        await create_scoped_payments(conn, shape)
    else:
        await create_payments(dsn, rows=None, key_type="varchar(64)")
    await conn.execute(history_ddl(shape))
    slow = rng.choice([0.0, 0.0, 0.003, 0.006, 0.01])
    if slow:
        await slow_down_renames(conn, slow)
    if shape.scoped:
        rows = scoped_layout(rng)
        await app.load([k for _, _, k in rows], [m for m, _, _ in rows], [i for _, i, _ in rows])
        n, where = len(rows), f" in {len(app.model.merchants)} merchants"
    else:
        keys = [k for (k,) in layout(rng)]
        await app.load(keys)
        n, where = len(keys), ""
    await conn.execute("ANALYZE payments")
    dups = len(app.model.initial_dups)
    return (
        f"{shape.describe()}; {n} rows, {dups} duplicated groups{where}, "
        f"renames slowed by {slow * 1000:g} ms"
    )


@dataclass
class Scenario:
    """One seeded sequence of steps, each followed by the checks."""

    seed: int
    dsn: str
    tmp_path: Path
    max_seconds: float
    keep_going: bool = False  # record problems and go on (to see every invariant that fails)
    shape_name: str = PLAIN.name  # "plain" or "scoped" (see make_shape)
    shape: Shape = PLAIN  # the table, once set up
    steps: list[str] = field(default_factory=list)
    undos: int = 0
    problems: list[str] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)  # problem tag -> how many
    seen: set[str] = field(default_factory=set)

    def log(self, text: str) -> None:
        self.steps.append(f"{len(self.steps):02d} {text}")

    async def execute(self) -> None:
        rng = random.Random(self.seed)
        self.shape = make_shape(self.shape_name, rng)
        model = Model(self.shape)
        conn = await connect(self.dsn, CHECK_NAME)
        app = App(self.dsn, model, rng)
        tool = Tool(self.dsn, self.tmp_path, rng, self.seed, self.shape)
        try:
            await app.open()
            self.log("set up: " + await set_up(conn, self.dsn, app, rng, self.shape))
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
        snap = await snapshot(conn, self.shape)
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
        snap = await snapshot(conn, self.shape)
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
        snap = await snapshot(conn, self.shape)
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
            if proc.returncode is not None or await app.conn.fetch(locked_groups(self.shape)):
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
        snap = await snapshot(conn, self.shape)
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
            per = " (per merchant)" if self.shape.scoped else ""
            end.append(f"[resolved] duplicates{per} left at the end: {sorted(snap.groups())[:10]}")
        if not self.undos:
            end.append("[undo] the scenario never undid a run")
        await self.check(conn, app.model, end)
