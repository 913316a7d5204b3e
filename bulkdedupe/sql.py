"""Every query bulkdedupe sends, named, in one place.

Identifiers are quoted by :func:`quote_ident` and nothing else; values are always `$n`
parameters. Type names come from the catalog's ``format_type()``, which quotes them itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

from .config import OrderItem
from .literals import LITERAL_PK_TYPES


def quote_ident(name: str) -> str:
    """Quote one identifier, always (so reserved words and mixed case are safe)."""
    return '"' + name.replace('"', '""') + '"'


def qualify(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


# --- connection and catalog ----------------------------------------------------------------

SERVER_INFO = """
SELECT current_setting('server_version_num')::int AS version_num,
       current_setting('server_version') AS version,
       pg_is_in_recovery() AS in_recovery,
       current_setting('default_transaction_read_only') = 'on' AS default_read_only,
       current_setting('transaction_read_only') = 'on' AS transaction_read_only,
       current_user AS role,
       current_database() AS database,
       -- the shared lock table's size: every advisory lock a batch holds takes one slot
       current_setting('max_locks_per_transaction')::int
         * (current_setting('max_connections')::int
            + current_setting('max_prepared_transactions')::int) AS lock_slots
"""

# to_regclass parses the quoted name itself: no SQL is ever executed from user input.
RESOLVE_TABLE = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind, c.reltuples::bigint AS reltuples,
       c.relpages::bigint AS relpages, c.relhassubclass AS has_children
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass($1)
"""

TABLE_COLUMNS = """
SELECT a.attname, a.attnum, a.atttypid, t.typname, a.atttypmod, a.attnotnull,
       format_type(a.atttypid, NULL) AS base_type,
       format_type(a.atttypid, a.atttypmod) AS full_type,
       a.attcollation,
       coalesce(coll.collisdeterministic, true) AS deterministic
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation coll ON coll.oid = a.attcollation
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

PRIMARY_KEY_COLUMNS = """
SELECT array_agg(a.attname ORDER BY k.ord) AS columns
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1 AND i.indisprimary
GROUP BY i.indexrelid
"""

# A unique, valid, non-partial single-column index on the column (for a user-given --pk).
# A valid, non-partial unique index whose key columns are exactly $2 (attnums, any order).
UNIQUE_INDEX_ON_COLUMNS = """
SELECT EXISTS (
    SELECT 1 FROM pg_index i
    WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
      AND i.indexprs IS NULL AND i.indnkeyatts = cardinality($2::int2[])
      AND (SELECT array_agg(k.attnum) FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
           WHERE k.n <= i.indnkeyatts) @> $2::int2[]
)
"""

# btree indexes whose leading column is the key, usable for ORDER BY key (valid, not partial,
# default operator class, same collation as the column).
KEY_INDEXES = """
SELECT ic.relname AS index_name, i.indisunique, i.indisvalid
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam
JOIN pg_opclass opc ON opc.oid = i.indclass[0]
WHERE i.indrelid = $1 AND i.indkey[0] = $2 AND am.amname = 'btree'
  AND i.indisvalid AND i.indisready AND i.indpred IS NULL
  AND opc.opcdefault AND i.indcollation[0] = $3
ORDER BY i.indnatts, ic.relname
"""

PRIVILEGES = """
SELECT has_table_privilege($1::oid, 'SELECT') AS can_select,
       has_column_privilege($1::oid, $2::name, 'UPDATE') AS can_update_key,
       current_user AS role
"""

# Btree indexes whose leading key columns are exactly the attnums $2 (--scope and --key, in any
# order), ascending, default operator classes, the key ($4) in its column's collation ($3);
# `columns` names them in the index's order, which the keyset scan follows.
SCOPED_KEY_INDEXES = """
SELECT ic.relname AS index_name,
       ARRAY(SELECT a.attname::text
             FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.n <= cardinality($2::int2[]) ORDER BY k.n) AS columns
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_am am ON am.oid = ic.relam
WHERE i.indrelid = $1 AND am.amname = 'btree'
  AND i.indisvalid AND i.indisready AND i.indpred IS NULL AND i.indexprs IS NULL
  AND i.indnkeyatts >= cardinality($2::int2[])
  AND (SELECT array_agg(k.attnum) FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
       WHERE k.n <= cardinality($2::int2[])) @> $2::int2[]
  AND NOT EXISTS (
      SELECT 1 FROM unnest(i.indclass::oid[], i.indoption::int2[]) WITH ORDINALITY
          AS c(opclass, option, n)
      JOIN pg_opclass o ON o.oid = c.opclass
      WHERE c.n <= cardinality($2::int2[]) AND (NOT o.opcdefault OR c.option <> 0))
  AND EXISTS (
      SELECT 1 FROM unnest(i.indkey::int2[], i.indcollation::oid[]) AS u(attnum, coll)
      WHERE u.attnum = $4 AND u.coll = $3)
ORDER BY i.indnatts, ic.relname
"""

# Whether a column's type ($1) has a default btree operator class: rows can be grouped and
# walked in order by it (json, point, xml... cannot).
BTREE_ORDERABLE = """
SELECT EXISTS (
    SELECT 1 FROM pg_type t, pg_opclass o JOIN pg_am am ON am.oid = o.opcmethod
    WHERE t.oid = $1 AND am.amname = 'btree' AND o.opcdefault
      AND (o.opcintype IN (t.oid, t.typbasetype)
           OR (o.opcintype = 'text'::regtype AND t.typname = 'varchar')
           OR (o.opcintype = 'anyarray'::regtype AND t.typcategory = 'A')
           OR (o.opcintype = 'anyenum'::regtype AND t.typtype = 'e')))
"""

HISTOGRAM_BOUNDS = """
SELECT histogram_bounds::text::text[] AS bounds
FROM pg_stats
WHERE schemaname = $1 AND tablename = $2 AND attname = $3
"""


# --- the table's own triggers and foreign keys (triggers.py) -------------------------------

# The enabled row-level UPDATE triggers a rename can fire ($1: the table's oid), on the table
# and, when it is partitioned, its partitions (where a parent's trigger is cloned: listed once,
# from the parent). Internal triggers (foreign-key checks) are FOREIGN_KEYS_ON_KEY's. tgtype
# bits (pg_trigger.h): 1 row, 2 before, 16 update, 64 instead of; tgenabled: O fires in origin
# (the default) and local mode, R only in replica mode, A always, D never.
# pg_partition_tree() of a table that is not partitioned is empty: the table itself is added.
_TABLE_TREE = """
    SELECT $1::oid AS relid, 0 AS level
    UNION SELECT relid, level FROM pg_partition_tree($1::oid::regclass)"""
UPDATE_TRIGGERS = f"""
WITH tree AS ({_TABLE_TREE})
SELECT name, relation, function, timing, enabled, columns, conditional FROM (
    SELECT DISTINCT ON (t.tgname, t.tgfoid)
           t.tgname::text AS name,
           t.tgrelid::regclass::text AS relation,
           t.tgfoid::regproc::text AS function,
           CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE'
                WHEN t.tgtype & 64 <> 0 THEN 'INSTEAD OF'
                ELSE 'AFTER' END AS timing,
           t.tgenabled::text AS enabled,
           -- UPDATE OF these columns only; empty: any UPDATE
           ARRAY(SELECT a.attname::text FROM unnest(t.tgattr::int2[]) AS c(attnum)
                 JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = c.attnum
                 ORDER BY a.attnum) AS columns,
           t.tgqual IS NOT NULL AS conditional
    FROM pg_trigger t
    JOIN tree ON tree.relid = t.tgrelid
    WHERE NOT t.tgisinternal AND t.tgtype & 1 <> 0 AND t.tgtype & 16 <> 0
      AND t.tgenabled <> 'D'
    ORDER BY t.tgname, t.tgfoid, tree.level
) s
ORDER BY name, relation
"""

# Foreign keys whose columns include the key ($1: the table's oid, $2: the key's name), either
# way: from the table (a rename changes the referencing value) or to it (only through a unique
# key of several columns: one on the key alone cannot exist while the key has duplicates).
# Partitions' clones of a parent's foreign key (conparentid <> 0) are the parent's.
FOREIGN_KEYS_ON_KEY = f"""
WITH tree AS ({_TABLE_TREE})
SELECT c.conname::text AS name,
       c.conrelid::regclass::text AS referencing,
       c.confrelid::regclass::text AS referenced,
       pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c
WHERE c.contype = 'f' AND c.conparentid = 0 AND (
    (c.conrelid IN (SELECT relid FROM tree) AND EXISTS (
        SELECT 1 FROM pg_attribute a
        WHERE a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey) AND a.attname = $2::name))
    OR (c.confrelid IN (SELECT relid FROM tree) AND EXISTS (
        SELECT 1 FROM pg_attribute a
        WHERE a.attrelid = c.confrelid AND a.attnum = ANY (c.confkey) AND a.attname = $2::name)))
ORDER BY c.conname
"""

# --disable-triggers sets session_replication_role, a superuser-only setting unless granted
# (PostgreSQL 15+: GRANT SET ON PARAMETER session_replication_role).
REPLICATION_ROLE_ALLOWED = """
SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       current_user AS role,
       current_setting('server_version_num')::int AS version_num
"""
REPLICATION_ROLE_GRANTED = "SELECT has_parameter_privilege('session_replication_role', 'SET')"


def create_index_concurrently(index: str, table: str, columns: tuple[str, ...]) -> str:
    cols = ", ".join(quote_ident(c) for c in columns)
    return f"CREATE INDEX CONCURRENTLY {quote_ident(index)} ON {table} ({cols})"


def drop_index_concurrently(schema: str, index: str) -> str:
    return f"DROP INDEX CONCURRENTLY IF EXISTS {qualify(schema, index)}"


# --- the scan index --create-scan-index builds (scanindex.py) -------------------------------

# Checking, building, replacing or dropping a table's scan index: one session at a time
# ($1: the quoted table). Only ever tried, never waited for inside pg_advisory_lock(): a
# waiting statement holds a snapshot, which the holder's CREATE INDEX CONCURRENTLY waits out.
SCAN_INDEX_DDL_LOCK = (
    "SELECT pg_try_advisory_lock(hashtextextended('bulkdedupe.scan-index-ddl:' || $1, 0))"
)
SCAN_INDEX_DDL_UNLOCK = (
    "SELECT pg_advisory_unlock(hashtextextended('bulkdedupe.scan-index-ddl:' || $1, 0))"
)
# Every run that scans by the index holds this shared for its whole life ($1: the quoted
# index); dropping the index needs it exclusive, so an index a live run uses is never dropped.
SCAN_INDEX_USE_LOCK = (
    "SELECT pg_try_advisory_lock_shared(hashtextextended('bulkdedupe.scan-index:' || $1, 0))"
)
SCAN_INDEX_USE_UNLOCK = (
    "SELECT pg_advisory_unlock_shared(hashtextextended('bulkdedupe.scan-index:' || $1, 0))"
)
SCAN_INDEX_DROP_LOCK = (
    "SELECT pg_try_advisory_lock(hashtextextended('bulkdedupe.scan-index:' || $1, 0))"
)
SCAN_INDEX_DROP_UNLOCK = (
    "SELECT pg_advisory_unlock(hashtextextended('bulkdedupe.scan-index:' || $1, 0))"
)
RESET_STATEMENT_TIMEOUT = "RESET statement_timeout"


# --- state schema --------------------------------------------------------------------------


@dataclass(frozen=True)
class StateSql:
    """Queries on `<state-schema>.runs` and `<state-schema>.changes`."""

    schema: str

    # The version of the state schema `create` makes. Bump it with every change to `create`:
    # an older schema is brought up to date by the statements of `create` it lacks (all
    # IF NOT EXISTS, so additive and safe to repeat), then marked (`mark_version`).
    VERSION: ClassVar[int] = 2

    @cached_property
    def runs(self) -> str:
        return qualify(self.schema, "runs")

    @cached_property
    def changes(self) -> str:
        return qualify(self.schema, "changes")

    @cached_property
    def control(self) -> str:
        return qualify(self.schema, "control")

    @cached_property
    def skipped(self) -> str:
        return qualify(self.schema, "skipped")

    @cached_property
    def heartbeat(self) -> str:
        return qualify(self.schema, "heartbeat")

    @cached_property
    def probe(self) -> str:
        # the governor's probe: a tiny write committed as the application commits (one row per
        # run, HOT-updated in place); a replica can read `beat_at` to see how far behind it is
        return f"""INSERT INTO {self.heartbeat} AS h (run_id, beat, beat_at) VALUES ($1, $2, now())
            ON CONFLICT (run_id) DO UPDATE SET beat = excluded.beat, beat_at = excluded.beat_at"""

    # The privilege checks and init-state's GRANTs are derived from this DDL (state_objects):
    # write CREATE SCHEMA/TABLE/INDEX and ALTER TABLE ... ADD COLUMN, all IF NOT EXISTS;
    # any other statement counts as never done, so it would run (and need ownership) each time.
    @cached_property
    def create(self) -> list[str]:
        s = quote_ident(self.schema)
        return [
            f"CREATE SCHEMA IF NOT EXISTS {s}",
            f"""CREATE TABLE IF NOT EXISTS {self.runs} (
                run_id       text PRIMARY KEY,
                command      text NOT NULL,
                table_name   text NOT NULL,
                key_column   text NOT NULL,
                pk_column    text NOT NULL,
                status       text NOT NULL,
                options      jsonb NOT NULL DEFAULT '{{}}',
                database_url text,
                started_at   timestamptz NOT NULL DEFAULT now(),
                finished_at  timestamptz,
                updated_at   timestamptz NOT NULL DEFAULT now(),
                groups       bigint NOT NULL DEFAULT 0,
                renamed      bigint NOT NULL DEFAULT 0,
                skipped      bigint NOT NULL DEFAULT 0,
                checkpoint   jsonb,
                summary      jsonb
            )""",
            # One index, (run_id, id), serves both the primary key and a run's report: each
            # audit row costs one index insert, not two.
            f"""CREATE TABLE IF NOT EXISTS {self.changes} (
                id          bigserial,
                run_id      text NOT NULL,
                pk          text NOT NULL,
                old_value   text NOT NULL,
                new_value   text NOT NULL,
                changed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
                CONSTRAINT changes_run_id_idx PRIMARY KEY (run_id, id)
            )""",
            # Live control of a running run (pause/resume/stop/set from another terminal):
            # `version` counts requests, `applied_version` is the last one the process obeyed.
            f"""CREATE TABLE IF NOT EXISTS {self.control} (
                run_id          text PRIMARY KEY,
                command         text NOT NULL DEFAULT 'run',
                settings        jsonb NOT NULL DEFAULT '{{}}',
                version         bigint NOT NULL DEFAULT 0,
                applied_version bigint NOT NULL DEFAULT 0,
                updated_at      timestamptz NOT NULL DEFAULT now(),
                applied_at      timestamptz
            )""",
            # Groups a run skipped (a lock it could not get, an error of the group's rows, no
            # new value that fits): kept until a resume of the run resolves them, so the
            # checkpoint can move past them and a resume still retries exactly these.
            f"""CREATE TABLE IF NOT EXISTS {self.skipped} (
                run_id     text NOT NULL,
                group_key  text NOT NULL,
                reason     text NOT NULL,
                rows       bigint NOT NULL,
                attempts   int NOT NULL DEFAULT 1,
                error      text,
                first_at   timestamptz NOT NULL DEFAULT now(),
                last_at    timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT skipped_pkey PRIMARY KEY (run_id, group_key)
            )""",
            # The impact governor's probe writes here: one row per run, updated in place.
            f"""CREATE TABLE IF NOT EXISTS {self.heartbeat} (
                run_id   text PRIMARY KEY,
                beat     bigint NOT NULL,
                beat_at  timestamptz NOT NULL
            )""",
            # --- version 2 ---
            # The columns that identify a run's rows and its groups (composite primary keys,
            # --scope). NULL on a run recorded before: its single pk_column, and no scope.
            f"""ALTER TABLE {self.runs} ADD COLUMN IF NOT EXISTS pk_columns text[],
                ADD COLUMN IF NOT EXISTS scope_columns text[]""",
        ]

    @cached_property
    def mark_version(self) -> str:
        """Record that the state schema is at `VERSION`: a comment on its runs table.

        A comment, not a `meta` table, because every role can read it: pg_description is
        world-readable, so the version is known from the catalog alone (as `inspect_state`
        knows everything else) before any privilege check, and a read-only role that was
        granted SELECT on the tables of an older release is not refused for lacking SELECT on
        a new one. Setting it needs what the upgrade itself needs (ownership of runs, to ALTER
        it) and nothing more; it commits with the DDL it describes, under the same lock. On
        runs, not on the schema: --state-schema may name a schema that is not ours (public),
        whose comment and owner are someone else's. A runs table without it is version 1.
        """
        return f"COMMENT ON TABLE {self.runs} IS '{STATE_VERSION_MARKER}{self.VERSION}'"

    @cached_property
    def objects(self) -> list[tuple[str, list[StateObject]]]:
        """Each statement of `create` with what it creates (see :func:`state_objects`)."""
        return state_objects(self.schema, self.create)

    @cached_property
    def tables(self) -> list[StateObject]:
        """The tables `create` makes, in order."""
        return [o for _, objs in self.objects for o in objs if o.kind == "table"]

    @cached_property
    def exists(self) -> str:
        return "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL"

    @cached_property
    def insert_run(self) -> str:
        return f"""INSERT INTO {self.runs}
            (run_id, command, table_name, key_column, pk_column, pk_columns, scope_columns,
             status, options, database_url)
            VALUES ($1, $2, $3, $4, $5, $8::text[], $9::text[], 'running', $6::jsonb, $7)"""

    @cached_property
    def get_run(self) -> str:
        return f"SELECT * FROM {self.runs} WHERE run_id = $1"

    @cached_property
    def list_runs(self) -> str:
        return f"SELECT * FROM {self.runs} ORDER BY started_at DESC, run_id LIMIT $1"

    @cached_property
    def resume_run(self) -> str:
        return f"""UPDATE {self.runs} SET status = 'running', finished_at = NULL,
            updated_at = now() WHERE run_id = $1"""

    @cached_property
    def merge_options(self) -> str:
        # a resume that adds an option the run must keep from now on (--disable-triggers)
        return f"UPDATE {self.runs} SET options = options || $2::jsonb WHERE run_id = $1"

    @cached_property
    def save_progress(self) -> str:
        return f"""UPDATE {self.runs} SET groups = $2, renamed = $3, skipped = $4,
            checkpoint = $5::jsonb, updated_at = now() WHERE run_id = $1"""

    @cached_property
    def finish_run(self) -> str:
        return f"""UPDATE {self.runs} SET status = $2, groups = $3, renamed = $4, skipped = $5,
            checkpoint = $6::jsonb, summary = $7::jsonb, finished_at = now(), updated_at = now()
            WHERE run_id = $1"""

    @cached_property
    def record_skip(self) -> str:
        return f"""INSERT INTO {self.skipped} AS s (run_id, group_key, reason, rows, error)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (run_id, group_key) DO UPDATE SET reason = excluded.reason,
                rows = excluded.rows, error = excluded.error, attempts = s.attempts + 1,
                last_at = now()"""

    @cached_property
    def resolve_skipped(self) -> str:
        return f"DELETE FROM {self.skipped} WHERE run_id = $1 AND group_key = ANY($2::text[])"

    @cached_property
    def skipped_page(self) -> str:
        return f"""SELECT group_key, rows FROM {self.skipped}
            WHERE run_id = $1 AND group_key > $2 ORDER BY group_key LIMIT $3"""

    @cached_property
    def skipped_first_page(self) -> str:
        return f"""SELECT group_key, rows FROM {self.skipped}
            WHERE run_id = $1 ORDER BY group_key LIMIT $2"""

    @cached_property
    def skipped_by_reason(self) -> str:
        return f"""SELECT reason, count(*)::bigint AS groups, sum(rows)::bigint AS rows
            FROM {self.skipped} WHERE run_id = $1 GROUP BY reason ORDER BY reason"""

    @cached_property
    def skipped_groups_of_runs(self) -> str:
        return f"""SELECT run_id, count(*)::bigint AS groups FROM {self.skipped}
            WHERE run_id = ANY($1::text[]) GROUP BY run_id"""

    @cached_property
    def count_changes(self) -> str:
        return f"SELECT count(*) FROM {self.changes} WHERE run_id = $1"

    @cached_property
    def mark_failed(self) -> str:
        # only a run still marked running: a final status already written stays
        return f"""UPDATE {self.runs} SET status = 'failed', finished_at = now(),
            updated_at = now() WHERE run_id = $1 AND status = 'running'"""

    @cached_property
    def changes_page(self) -> str:
        return f"""SELECT id, pk, old_value, new_value, changed_at FROM {self.changes}
            WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3"""


# A session-level lock held by the process executing a run, so a second process refuses
# to execute the same run and a crashed run (lock released with its connection) can resume.
RUN_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('bulkdedupe.run:' || $1, 0))"
RUN_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('bulkdedupe.run:' || $1, 0))"

# Whether a live process holds the run lock above, without taking it: a bigint advisory key
# shows in pg_locks as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1.
RUN_ALIVE = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks l, (SELECT hashtextextended('bulkdedupe.run:' || $1, 0) AS h) k
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint = (k.h >> 32) & 4294967295 AND l.objid::bigint = k.h & 4294967295
)"""


@dataclass(frozen=True)
class ControlSql:
    """Queries on `<state-schema>.control`: operators write requests, the run obeys them."""

    state: StateSql

    @cached_property
    def exists(self) -> str:
        return "SELECT to_regclass($1) IS NOT NULL"

    @cached_property
    def reset(self) -> str:
        # A (re)started process obeys its command line: what earlier requests asked is done.
        return f"""INSERT INTO {self.state.control} AS c (run_id) VALUES ($1)
            ON CONFLICT (run_id) DO UPDATE SET command = 'run', settings = '{{}}',
                applied_version = c.version, applied_at = now(), updated_at = now()
            RETURNING version"""

    @cached_property
    def get(self) -> str:
        return f"""SELECT command, settings, version, applied_version
            FROM {self.state.control} WHERE run_id = $1"""

    @cached_property
    def ack(self) -> str:
        return f"""UPDATE {self.state.control} SET applied_version = greatest(applied_version, $2),
            applied_at = now() WHERE run_id = $1"""

    @cached_property
    def request(self) -> str:
        # $2: a command (pause/resume/stop) or NULL; $3: settings merged into the current ones.
        return f"""INSERT INTO {self.state.control} AS c (run_id, command, settings, version)
            VALUES ($1, coalesce($2, 'run'), coalesce($3::jsonb, '{{}}'), 1)
            ON CONFLICT (run_id) DO UPDATE SET command = coalesce($2, c.command),
                settings = c.settings || coalesce($3::jsonb, '{{}}'),
                version = c.version + 1, updated_at = now()
            RETURNING version"""


# --- health signals watched by the throttle (monitor.py; the README explains each) ----------

# Without pg_read_all_stats (or superuser) pg_stat_activity and pg_stat_replication hide other
# roles' sessions' state: the guardrails that read them would see nothing and never pause.
HEALTH_STATS_VISIBLE = "SELECT pg_has_role('pg_read_all_stats', 'USAGE')"

# On the primary, one row per walsender. replay_lag is NULL once a standby has caught up and
# no WAL flows (not lag); `hidden` says the role may not see the columns.
HEALTH_REPLICATION = """
SELECT coalesce(nullif(application_name, ''), 'standby') || '@'
           || coalesce(host(client_addr), 'local') || ':' || pid AS name,
       state IS NULL AS hidden,
       extract(epoch FROM replay_lag)::float8 AS lag
FROM pg_stat_replication
"""

# On a standby (--replica-url). now() - pg_last_xact_replay_timestamp() grows on an idle
# primary although nothing is behind: a standby that has replayed all it received is caught up.
HEALTH_REPLICA = """
SELECT pg_is_in_recovery() AS in_recovery,
       coalesce(pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn(), false) AS caught_up,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS lag
"""

# Sessions waiting for a lock (not granted) while they hold or want a lock on the table: a
# relation-level wait on the table itself, or a row-lock wait (shown as a wait on the holder's
# transaction id) by a session working on the table. pg_locks needs no privilege. $1 table
# oid, $2 our application_name (our own workers' waits end at their lock_timeout).
HEALTH_LOCK_WAITERS = """
SELECT count(DISTINCT w.pid)::int
FROM pg_locks w
WHERE NOT w.granted AND w.pid <> pg_backend_pid()
  AND EXISTS (
      SELECT 1 FROM pg_locks t
      WHERE t.pid = w.pid AND t.relation = $1 AND t.locktype IN ('relation', 'tuple')
        AND t.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
  AND NOT EXISTS (
      SELECT 1 FROM pg_stat_activity a WHERE a.pid = w.pid AND a.application_name = $2)
"""

# Client backends running a statement right now, server-wide (pt-online-schema-change's
# Threads_running), ours excluded. $1 our application_name.
HEALTH_ACTIVE_BACKENDS = """
SELECT count(*)::int FROM pg_stat_activity
WHERE backend_type = 'client backend' AND state IN ('active', 'fastpath function call')
  AND pid <> pg_backend_pid() AND application_name IS DISTINCT FROM $1
"""

# The WAL position in bytes (sampled: the rate is the difference over time). On a primary the
# insert position: WAL generated, whether or not it has been written out yet (with
# synchronous_commit=off pg_current_wal_lsn() moves only when the WAL writer wakes).
HEALTH_WAL_POSITION = """
SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn()
        END - '0/0'::pg_lsn)::bigint
"""

# The archiver: the last segment archived and the one being written (the backlog is between).
HEALTH_ARCHIVER = """
SELECT current_setting('archive_mode') AS archive_mode,
       a.last_archived_wal, a.failed_count,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_walfile_name(pg_current_wal_lsn()) END
           AS current_wal,
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') AS segment_size
FROM pg_stat_archiver a
"""

# An autovacuum worker (not a manual VACUUM) vacuuming the table now. $1 table oid.
HEALTH_AUTOVACUUM = """
SELECT EXISTS (
    SELECT 1 FROM pg_stat_progress_vacuum v JOIN pg_stat_activity a ON a.pid = v.pid
    WHERE v.relid = $1 AND v.datname = current_database()
      AND a.backend_type = 'autovacuum worker'
)"""

SET_LOCAL_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', $1, true)"

RELATION_EXISTS = "SELECT to_regclass($1) IS NOT NULL"


# --- the target table ----------------------------------------------------------------------

LowerBound = Literal["none", "inclusive", "exclusive"]


@dataclass(frozen=True)
class TargetSql:
    """Queries on the table being deduplicated.

    `table` is the quoted qualified name; `key`, `pk` the bare column names (`pk` one name, or
    a composite key's names); `key_type` and `pk_type` the catalog's type names without
    modifiers (one per pk column); `lock_prefix` the text that, with the value appended, is
    hashed into the advisory lock key (see README, "The advisory lock").

    A row's primary key travels as `pk_of` spells it: the column's own value, or for a
    composite key the JSON array of its columns' text forms (`["7", "eu", "0b4e…"]`), which is
    also how the audit records it; `pk_is` finds the row it names, by the primary key's index.
    """

    table: str
    key: str
    pk: str | tuple[str, ...]
    key_type: str
    pk_type: str | tuple[str, ...]
    keep: tuple[OrderItem, ...]
    state: StateSql
    scope: tuple[str, ...] = ()  # --scope: groups are rows equal on these and the key
    scope_types: tuple[str, ...] = ()
    scan_columns: tuple[str, ...] = ()  # the scan index's order of scope and key columns
    # with --scope: check new values free in the whole table (an index leads with the key, so
    # the probe is cheap), not only in their scope
    new_values_table_wide: bool = True
    # a table that is not partitioned: a decided rename finds its row and its survivor by heap
    # position (apply_renames_at), the way neither prunes a page it only reads
    by_position: bool = False

    @cached_property
    def k(self) -> str:
        return quote_ident(self.key)

    # --- groups: a key value, or with --scope the scope's values and the key's ---------------

    @cached_property
    def scoped(self) -> bool:
        return bool(self.scope)

    @cached_property
    def group_param(self) -> str:
        """The element type of a parameter array of groups."""
        return "text" if self.scoped else self.key_type

    def group_of(self, alias: str) -> str:
        """Row `alias`'s group as the tool carries it (scan, batches, checkpoints, skipped
        groups, advisory locks): its key, or with --scope the JSON array of the scope columns'
        and the key's text forms, in --scope order: `["42", "tx-9"]`."""
        if not self.scoped:
            return f"{alias}.{self.k}"
        cols = ", ".join(f"{alias}.{quote_ident(c)}::text" for c in (*self.scope, self.key))
        return f"jsonb_build_array({cols})::text"

    def _group_parts(self, value: str) -> list[tuple[str, str]]:
        """(column, the typed value of that column in group `value`), scope then key."""
        types = (*self.scope_types, self.key_type)
        return [
            (c, f"(({value})::jsonb ->> {i})::{t}")
            for i, (c, t) in enumerate(zip((*self.scope, self.key), types, strict=True))
        ]

    def group_is(self, alias: str, value: str) -> str:
        """Row `alias` is in group `value` (an expression of type `group_param`)."""
        if not self.scoped:
            return f"{alias}.{self.k} = {value}"
        parts = self._group_parts(value)
        cols = ", ".join(f"{alias}.{quote_ident(c)}" for c, _ in parts)
        return f"({cols}) = ({', '.join(v for _, v in parts)})"

    def _scope_is(self, alias: str, value: str) -> str:
        """Row `alias` is in the scope of group `value` (whatever its key); scoped only."""
        parts = self._group_parts(value)[:-1]
        cols = ", ".join(f"{alias}.{quote_ident(c)}" for c, _ in parts)
        return f"({cols}) = ({', '.join(v for _, v in parts)})"

    @cached_property
    def pks(self) -> tuple[str, ...]:
        return (self.pk,) if isinstance(self.pk, str) else self.pk

    @cached_property
    def pk_types(self) -> tuple[str, ...]:
        return (self.pk_type,) if isinstance(self.pk_type, str) else self.pk_type

    @cached_property
    def composite(self) -> bool:
        return len(self.pks) > 1

    @cached_property
    def p(self) -> str:
        """The primary key's column list (for ORDER BY)."""
        return ", ".join(quote_ident(c) for c in self.pks)

    @cached_property
    def pk_param(self) -> str:
        """The element type of a parameter array of primary keys."""
        return "text" if self.composite else self.pk_types[0]

    @cached_property
    def literal_pk(self) -> bool:
        """Primary keys go to the chunk statements as one text literal an array (literals.py)."""
        return self.composite or self.pk_param in LITERAL_PK_TYPES

    def _pk_array(self, n: int) -> str:
        return f"${n}::text::{self.pk_param}[]" if self.literal_pk else f"${n}::{self.pk_param}[]"

    def pk_of(self, alias: str) -> str:
        """Row `alias`'s primary key as the tool carries it (see the class docstring)."""
        if not self.composite:
            return f"{alias}.{self.p}"
        cols = ", ".join(f"{alias}.{quote_ident(c)}::text" for c in self.pks)
        return f"jsonb_build_array({cols})::text"

    def pk_is(self, alias: str, value: str) -> str:
        """Row `alias` is the one `value` (an expression of type `pk_param`) names; a test on
        the primary key's columns, so its index answers it."""
        if not self.composite:
            return f"{alias}.{self.p} = {value}"
        cols = ", ".join(f"{alias}.{quote_ident(c)}" for c in self.pks)
        vals = ", ".join(f"(({value})::jsonb ->> {i})::{t}" for i, t in enumerate(self.pk_types))
        return f"({cols}) = ({vals})"

    def pk_is_text(self, alias: str, text: str) -> str:
        """As `pk_is`, for a primary key in its text form (the audit's `pk`)."""
        if not self.composite:
            return f"{alias}.{self.p} = ({text})::{self.pk_types[0]}"
        return self.pk_is(alias, text)

    @cached_property
    def _scan_order(self) -> tuple[str, ...]:
        return self.scan_columns or (*self.scope, self.key)

    def _scoped_scan_page(self, lower: LowerBound) -> str:
        """scan_page with --scope: keyset over the row value of the scan index's leading columns
        (scope and key, in the index's order), grouped on all of them; one key range."""
        cols = self._scan_order
        alias = {c: f"c{i}" for i, c in enumerate(cols)}
        inner = ", ".join(f"t.{quote_ident(c)} AS {alias[c]}" for c in cols)
        order_t = ", ".join(f"t.{quote_ident(c)}" for c in cols)
        order_p = ", ".join(f"p.{alias[c]}" for c in cols)
        group = ", ".join(f"p.{alias[c]}::text" for c in (*self.scope, self.key))
        return f"""
SELECT jsonb_build_array({group})::text AS k, count(*) AS n, max(p.rn) AS rn FROM (
    SELECT {inner}, row_number() OVER (ORDER BY {order_t}) AS rn
    FROM {self.table} t WHERE {self._scoped_where(lower)} ORDER BY {order_t} LIMIT $3
) p
GROUP BY {order_p} HAVING count(*) > 1 OR max(p.rn) = $3
ORDER BY {order_p}"""

    def _scoped_where(self, lower: LowerBound) -> str:
        # NULL in any scope column or the key: never a duplicate (NULLS DISTINCT)
        conds = [f"t.{quote_ident(c)} IS NOT NULL" for c in self._scan_order]
        if lower == "exclusive":
            decoded = dict(self._group_parts("$1::text"))
            cols = ", ".join(f"t.{quote_ident(c)}" for c in self._scan_order)
            vals = ", ".join(decoded[c] for c in self._scan_order)
            conds.append(f"({cols}) > ({vals})")
        else:
            conds.append("$1::text IS NULL")
        conds.append("$2::text IS NULL")
        return " AND ".join(conds)

    def scan_page(self, lower: LowerBound, upper: bool) -> str:
        """One keyset page over the key index: the first $3 index entries after the cursor,
        grouped as they stream out of the index (no sort, no materialization). Returns the
        duplicate groups (`k`, `n`), then one last row for the page as a whole (the ROLLUP's
        grand total, `k` NULL): `n` the entries read, `last` the last key. When `n` = $3 the
        page ended inside or after the last key's run of entries, so that key's count may be
        cut short: the next page starts at it ($1 inclusive), or, when the page held nothing
        else, `count_key` counts it. $1 = lower bound / cursor, $2 = upper bound (exclusive).

        Not a row_number() window over the entries to find the page's last one: that doubled
        the scan's server time (20M rows in one statement: 21.0 s against 11.2 s; the GROUP BY
        alone, 10.7 s), and the total row also counts a range's short last page, which then
        needs no second query.

        Groups come out in key order, which the producer's checkpoints rely on: said by the
        outer ORDER BY, a sort of the page's duplicate groups only (the aggregate's input is the
        index's order; a hash aggregate, free to reorder, would checkpoint past unfinished
        groups without it)."""
        if self.scoped:
            return self._scoped_scan_page(lower)
        return f"""
SELECT p.k, count(*) AS n, max(p.k) AS last FROM (
    SELECT {self.k} AS k FROM {self.table} WHERE {self._page_where(lower, upper)}
    ORDER BY {self.k} LIMIT $3
) p
GROUP BY ROLLUP (p.k) HAVING count(*) > 1 OR GROUPING(p.k) = 1
ORDER BY GROUPING(p.k), p.k"""

    def scan_page_count(self, lower: LowerBound) -> str:
        """With --scope: the entries in the last, short page (for progress; at most $3 read).
        (The unscoped scan_page counts its own.)"""
        return f"""SELECT count(*) FROM (
    SELECT 1 FROM {self.table} t WHERE {self._scoped_where(lower)} LIMIT $3) p"""

    def _page_where(self, lower: LowerBound, upper: bool) -> str:
        conds = [f"{self.k} IS NOT NULL"]
        if lower == "inclusive":
            conds.append(f"{self.k} >= $1")
        elif lower == "exclusive":
            conds.append(f"{self.k} > $1")
        else:
            conds.append("$1::text IS NULL")
        conds.append(f"{self.k} < $2" if upper else "$2::text IS NULL")
        return " AND ".join(conds)

    @cached_property
    def count_key(self) -> str:
        if self.scoped:
            return f"SELECT count(*) FROM {self.table} t WHERE {self.group_is('t', '$1::text')}"
        return f"SELECT count(*) FROM {self.table} WHERE {self.k} = $1"

    @cached_property
    def lock_keys(self) -> str:
        # Sorted by lock key: every worker takes its locks in the same global order, so
        # workers never deadlock each other.
        return f"""
SELECT pg_advisory_xact_lock(h) FROM (
    SELECT DISTINCT hashtextextended($2 || v::text, 0) AS h
    FROM unnest($1::{self.group_param}[]) AS v ORDER BY h
) s"""

    @cached_property
    def lock_keys_shared(self) -> str:
        """lock_keys, shared: a chunk of decided renames (sweep.py) needs no lock against the
        tool's other chunks — they rename other rows of a group, each checking the survivor —
        only against the application's find-or-create, which takes the lock exclusively, and
        against a key-order batch deciding the group, which does too. Neighbouring chunks of a
        heap-order sweep share groups (a group's rows lie all over the heap): exclusive, they
        would queue behind each other. Same ascending order: no deadlock with either."""
        return self.lock_keys.replace("pg_advisory_xact_lock(", "pg_advisory_xact_lock_shared(")

    def _order(self) -> str:
        # Qualified by the queries' alias `t`: a bare name in ORDER BY would first mean an
        # output column (a key column named "pk" would sort by the primary key).
        return f"{self._group_columns()}, {self._keep_order()}"

    def _group_columns(self) -> str:
        return ", ".join([f"t.{quote_ident(c)}" for c in self.scope] + [f"t.{self.k}"])

    def _keep_order(self) -> str:
        # NULLS always spelled out: PostgreSQL's default for DESC is NULLS FIRST (see OrderItem)
        parts = [
            "t."
            + quote_ident(o.column)
            + (" DESC" if o.descending else " ASC")
            + (" NULLS FIRST" if o.nulls_first else " NULLS LAST")
            for o in self.keep
        ]
        parts += [f"t.{quote_ident(c)}" for c in self.pks]
        return ", ".join(parts)

    # where the row lies: the heap-order sweep's sort key (the partition, then the page and
    # the line pointer); read with the decision, so deciding costs no other query
    _where_in_heap = ", t.tableoid::oid::bigint AS rel, t.ctid AS tid"

    @cached_property
    def decide_losers(self) -> str:
        """Heap order's decision, in one read: the rows of these groups but the first of each by
        --keep order (the survivor, whose primary key each row carries), with where each lies.
        The same order as read_groups, so the same survivor as a key-order batch picks."""
        if self.scoped:
            source = (
                f"unnest($1::text[]) AS q(g) JOIN {self.table} t ON {self.group_is('t', 'q.g')}"
            )
        else:
            source = f"{self.table} t WHERE t.{self.k} = ANY($1::{self.key_type}[])"
        group = f", {self.group_of('t')} AS g" if self.scoped else ""
        g = ", d.g" if self.scoped else ""
        return f"""SELECT d.pk, d.k, d.rel, d.tid, d.survivor, d.survivor_tid{g} FROM (
    SELECT {self.pk_of("t")} AS pk, t.{self.k} AS k{self._where_in_heap}{group},
           first_value({self.pk_of("t")}) OVER w AS survivor,
           first_value(t.ctid) OVER w AS survivor_tid, row_number() OVER w AS rn
    FROM {source}
    WINDOW w AS (PARTITION BY {self._group_columns()} ORDER BY {self._keep_order()})
) d WHERE d.rn > 1"""

    @cached_property
    def read_groups(self) -> str:
        if self.scoped:
            return f"""SELECT {self.pk_of("t")} AS pk, t.{self.k} AS k, {self.group_of("t")} AS g
FROM unnest($1::text[]) AS q(g) JOIN {self.table} t ON {self.group_is("t", "q.g")}
ORDER BY {self._order()}"""
        return f"""SELECT {self.pk_of("t")} AS pk, t.{self.k} AS k FROM {self.table} t
WHERE t.{self.k} = ANY($1::{self.key_type}[]) ORDER BY {self._order()}"""

    # --- a giant group (more rows than one batch): decided once, then worked off in chunks ---

    @cached_property
    def group_survivor(self) -> str:
        # the row an ordinary batch would keep (first by --keep order); a top-1 sort, no more
        return f"""SELECT {self.pk_of("t")} AS pk, t.{self.k} AS k, t.ctid AS tid
FROM {self.table} t
WHERE {self.group_is("t", f"$1::{self.group_param}")} ORDER BY {self._order()} LIMIT 1"""

    @cached_property
    def group_losers(self) -> str:
        # streamed through a cursor into a file: the key index returns a value's entries in
        # heap order, so each chunk's rows sit on neighbouring pages (no ORDER BY, no sort)
        return f"""SELECT {self.pk_of("t")} AS pk, t.{self.k} AS k{self._where_in_heap}
FROM {self.table} t
WHERE {self.group_is("t", f"$1::{self.group_param}")}
  AND NOT ({self.pk_is("t", f"$2::{self.pk_param}")})"""

    @cached_property
    def read_entries(self) -> str:
        """Under the advisory locks of their groups: the rows of a chunk of decided renames
        ($1 primary keys, $2 their groups, $3 their survivors) that are still in their group,
        each with its current value and whether its survivor still holds the group's value.
        `i` is the entry's place in the arrays (1-based). Rows are found by primary key: O(the
        chunk), however large the groups, and in heap order the pages are neighbours.

        `(… = …) IS TRUE`, not `… = …`: the same test, but not one an index can answer, so even
        a generic plan (which cannot know that a value is held by a million rows) looks rows
        and survivors up by primary key instead of walking a whole group in the key's index."""
        same_t = f"({self.group_is('t', 'e.g')}) IS TRUE"
        same_s = f"({self.group_is('s', 'e.g')}) IS TRUE"
        return f"""
SELECT e.i::int AS i, t.{self.k} AS k,
       EXISTS (SELECT 1 FROM {self.table} s WHERE {self.pk_is("s", "e.s")} AND {same_s})
           AS survivor
FROM unnest($1::{self.pk_param}[], $2::{self.group_param}[], $3::{self.pk_param}[])
     WITH ORDINALITY AS e(pk, g, s, i)
JOIN {self.table} t ON {self.pk_is("t", "e.pk")} AND {same_t}"""

    @cached_property
    def _candidate_lock(self) -> str:
        """The text whose hash is candidate c.v's advisory lock: the group it would make."""
        if not self.scoped:
            return "c.v::text"
        scope = ", ".join(f"(c.g::jsonb ->> {i})" for i in range(len(self.scope)))
        return f"jsonb_build_array({scope}, c.v::text)::text"

    @cached_property
    def lock_chunk(self) -> str:
        """A chunk's locks in one statement: its groups' (shared, in hash order: see
        lock_keys_shared), then a non-blocking try on each new value ($3; with --scope, of
        groups $4). One row: `refused`, the places (1-based) of the candidates whose lock
        another session holds, NULL when none (a chunk's usual answer: no row per candidate to
        send and decode). Only the groups' locks wait, so the order of the tries does not
        matter. Whether a value is free is the UPDATE's own check (apply_renames), with a
        snapshot taken after these locks."""
        if self.scoped:
            candidates = (
                f"unnest($3::text::{self.key_type}[], $4::text::text[])"
                " WITH ORDINALITY AS c(v, g, i)"
            )
        else:
            candidates = f"unnest($3::text::{self.key_type}[]) WITH ORDINALITY AS c(v, i)"
        shared = (
            self.lock_keys_shared.strip()
            .replace(
                f"unnest($1::{self.group_param}[])", f"unnest($1::text::{self.group_param}[])", 1
            )
            .replace(
                "SELECT pg_advisory_xact_lock_shared(h) FROM",
                "SELECT count(pg_advisory_xact_lock_shared(h)) AS n FROM",
                1,
            )
        )
        return f"""
WITH held AS MATERIALIZED (
{shared}
)
SELECT array_agg(c.i::int) FILTER (
           WHERE NOT pg_try_advisory_xact_lock(hashtextextended($2 || {self._candidate_lock}, 0))
       ) AS refused
FROM held LEFT JOIN {candidates} ON true"""

    @cached_property
    def check_candidates(self) -> str:
        # $3: take a non-blocking advisory lock on each candidate (apply); dry-run takes none.
        # A candidate is usable when it is locked by us and no row holds it.
        # $4: each candidate's group (with --scope: the candidate must be free in its scope,
        # and its lock is the group it would make, as group_of spells it)
        lock, taken = self._candidate_lock, f"t.{self.k} = c.v"
        if self.scoped and not self.new_values_table_wide:
            taken += f" AND {self._scope_is('t', 'c.g')}"
        return f"""
SELECT c.v::text AS v,
       CASE WHEN $3 THEN pg_try_advisory_xact_lock(hashtextextended($2 || {lock}, 0))
            ELSE true END AS locked,
       EXISTS (SELECT 1 FROM {self.table} t WHERE {taken}) AS taken
FROM unnest($1::{self.key_type}[], $4::text[]) AS c(v, g)"""

    def _new_value_scope(self) -> str:
        # where a new value must be free: its scope (by the scan index), or the whole table
        if not self.scoped or self.new_values_table_wide:
            return ""
        return self._same_scope("o", indexed=True)

    def _same_scope(self, alias: str, *, indexed: bool = False) -> str:
        # with --scope: the row is (still) in the scope of the rename's group, v.grp; found by
        # primary key (IS TRUE: not an index's business) or, `indexed`, by the scan index
        if not self.scoped:
            return ""
        test = self._scope_is(alias, "v.grp")
        return f" AND {test}" if indexed else f" AND ({test}) IS TRUE"

    @cached_property
    def apply_renames(self) -> str:
        # Only the key column is written, only where it still holds the old value and no row
        # holds the new one; the audit row is inserted by the same statement, so data and audit
        # commit together. Fewer rows than asked for: the caller rolls back and retries.
        return f"""
WITH v AS (
    SELECT * FROM unnest($1::{self.pk_param}[], $2::{self.key_type}[], $3::{self.key_type}[],
                         $5::{self.pk_param}[], $6::text[], $7::text[])
        WITH ORDINALITY AS v(pk, old, new, survivor, old_text, grp, i)
), u AS (
    UPDATE {self.table} t SET {self.k} = v.new FROM v
    -- `(… = v.old) IS TRUE`: the same test, but not one the key's index can answer (nor the
    -- planner chain, s.k = t.k), so both rows are found by primary key: with a generic plan the
    -- key index would walk every row of a giant group, once per row renamed
    WHERE {self.pk_is("t", "v.pk")} AND (t.{self.k} = v.old) IS TRUE{self._same_scope("t")}
      -- the survivor still holds the old value (read, not locked: locking it would dirty a
      -- page this tool never changes); if the application deleted or re-keyed it since the
      -- batch read it, the losers stay as they are and the batch is tried again
      AND EXISTS (SELECT 1 FROM {self.table} s WHERE {self.pk_is("s", "v.survivor")}
                  AND (s.{self.k} = v.old) IS TRUE{self._same_scope("s")})
      -- re-checked with this statement's snapshot, taken after the candidate's advisory lock:
      -- a worker that wrote the same value and released its lock just before is seen here
      AND NOT EXISTS (SELECT 1 FROM {self.table} o
                      WHERE o.{self.k} = v.new{self._new_value_scope()})
    RETURNING {self.pk_of("t")} AS pk, v.old_text, v.new, v.i
)
-- old_text: the old value's exact text ($6; a bpchar::text cast would drop trailing blanks,
-- and undo must put back the bytes the row held)
INSERT INTO {self.state.changes} (run_id, pk, old_value, new_value)
SELECT $4, u.pk::text, u.old_text, u.new::text FROM u"""

    @cached_property
    def apply_renames_returning(self) -> str:
        """apply_renames, returning the place (1-based, `i`) of each rename it made: a chunk of
        decided renames keeps those and hands the others' groups back (sweep.py). The audit
        INSERT is a data-modifying WITH: run once and to completion, read or not."""
        head, insert = self.apply_renames.rsplit("\n-- old_text", 1)
        return f"{head},\naudit AS (\n-- old_text{insert}\n)\nSELECT u.i::int AS i FROM u"

    @cached_property
    def apply_renames_at(self) -> str:
        """apply_renames_returning for a chunk of decided renames on a table that is not
        partitioned (`by_position`), a key that is not char(n) (its text is its bytes): each
        row and its survivor found by heap position ($1, $5) and checked by primary key ($2,
        $6), so the UPDATE reads the one page of each. An index scan's heap fetch would also
        prune the page (opportunistic pruning): a survivor's page, swept long before, written
        again, with a full-page image after a checkpoint (18 % of the WAL, measured at 5M
        rows). A row that moved since its decision (the application updated it) is not found:
        its group is decided again under lock, as when its value changed. $7 the run; $8 with
        --scope, the groups. Only the arrays it needs, and one row back: `left_alone`, the
        places (1-based) of the renames it did not make, NULL when it made them all (a million
        renames at 20M rows: no row per rename to send and decode)."""
        grp, grp_name = (", $8::text::text[]", ", grp") if self.scoped else ("", "")
        return f"""
WITH v AS (
    SELECT * FROM unnest($1::text::tid[], {self._pk_array(2)}, $3::text::{self.key_type}[],
                         $4::text::{self.key_type}[], $5::text::tid[], {self._pk_array(6)}{grp})
        WITH ORDINALITY AS v(tid, pk, old, new, stid, survivor{grp_name}, i)
), u AS (
    UPDATE {self.table} t SET {self.k} = v.new FROM v
    WHERE t.ctid = v.tid AND {self.pk_is("t", "v.pk")}
      AND (t.{self.k} = v.old) IS TRUE{self._same_scope("t")}
      AND EXISTS (SELECT 1 FROM {self.table} s
                  WHERE s.ctid = v.stid AND {self.pk_is("s", "v.survivor")}
                    AND (s.{self.k} = v.old) IS TRUE{self._same_scope("s")})
      AND NOT EXISTS (SELECT 1 FROM {self.table} o
                      WHERE o.{self.k} = v.new{self._new_value_scope()})
    RETURNING {self.pk_of("t")} AS pk, v.old, v.new, v.i
), audit AS (
    INSERT INTO {self.state.changes} (run_id, pk, old_value, new_value)
    SELECT $7, u.pk::text, u.old::text, u.new::text FROM u
)
SELECT array_agg(v.i::int) FILTER (WHERE u.i IS NULL) AS left_alone
FROM v LEFT JOIN u ON u.i = v.i"""


SET_BATCH_TIMEOUTS = (
    "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)"
)

# The same, and how this transaction's full-page images are compressed ($3; --wal-compression).
SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION = """
SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true),
       set_config('wal_compression', $3, true)"""

# --disable-triggers: either of the above, and replica mode for the transaction (no parameter
# of its own): ordinary triggers and rules, foreign-key checks included, do not fire in it.
_REPLICA_ROLE = ",\n       set_config('session_replication_role', 'replica', true)"
SET_BATCH_TIMEOUTS_REPLICA = SET_BATCH_TIMEOUTS + _REPLICA_ROLE
SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION_REPLICA = (
    SET_BATCH_TIMEOUTS_AND_WAL_COMPRESSION + _REPLICA_ROLE
)

# What --wal-compression may use: the server's setting, the methods it was built with (an enum
# from PostgreSQL 15; a boolean before), and whether this role may change it for its own
# sessions (wal_compression is superuser-only unless granted, PostgreSQL 15+).
WAL_COMPRESSION = """
SELECT current_setting('wal_compression') AS current,
       (SELECT enumvals FROM pg_settings WHERE name = 'wal_compression') AS methods,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
       current_user AS role
"""
WAL_COMPRESSION_GRANTED = "SELECT has_parameter_privilege('wal_compression', 'SET')"


# --- enforce: the unique index, its constraint, the proof ----------------------------------

# Anything of that name in the schema (an index shares the namespace of tables and sequences),
# with, when it is an index, what it is: table, uniqueness, columns, state, owning constraint.
INDEX_BY_NAME = """
SELECT c.oid, c.relkind::text AS relkind,
       i.indrelid, i.indisunique, i.indisvalid, i.indisready, i.indnatts, i.indnkeyatts,
       i.indkey[0] AS first_attnum, i.indpred IS NULL AS is_full, i.indexprs IS NULL AS is_plain,
       i.indkey::int2[] AS attnums, i.indcollation::oid[] AS collations,
       i.indcollation[0] AS collation, am.amname,
       CASE WHEN i.indexrelid IS NOT NULL THEN pg_get_indexdef(i.indexrelid) END AS definition,
       con.conname, con.contype::text AS contype
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_am am ON am.oid = c.relam
LEFT JOIN pg_constraint con
       ON con.conindid = c.oid AND con.conrelid = i.indrelid AND con.contype IN ('u', 'p', 'x')
WHERE n.nspname = $1 AND c.relname = $2
"""

# A CREATE INDEX CONCURRENTLY of this index running in another session right now.
INDEX_BUILD_IN_PROGRESS = """
SELECT pid, phase FROM pg_stat_progress_create_index WHERE index_relid = $1 LIMIT 1
"""

CONSTRAINT_BY_NAME = """
SELECT conname, contype::text AS contype, conindid FROM pg_constraint
WHERE conrelid = $1 AND conname = $2
"""

# Unique indexes (valid or merely ready: a failed concurrent build still enforces uniqueness on
# new writes) whose key columns include the column, with the constraint that owns them.
UNIQUE_INDEXES_ON_COLUMN = """
SELECT n.nspname AS schema, ic.relname AS index_name, i.indisvalid, con.conname,
       i.indisprimary
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
LEFT JOIN pg_constraint con
       ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('u', 'p')
WHERE i.indrelid = $1 AND i.indisunique AND i.indisready
  AND $2::int2 = ANY (i.indkey[0:i.indnkeyatts - 1])
ORDER BY ic.relname
"""

# One enforce per table at a time (session lock, gone with the connection): two would build the
# same index name, and one's cleanup could drop the other's build.
ENFORCE_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('bulkdedupe.enforce:' || $1, 0))"

SET_DDL_SESSION = "SELECT set_config('statement_timeout', '0', false)"
SET_LOCAL_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"


def add_unique_constraint_using_index(table: str, name: str) -> str:
    return (
        f"ALTER TABLE {table} ADD CONSTRAINT {quote_ident(name)} "
        f"UNIQUE USING INDEX {quote_ident(name)}"
    )


def prove_duplicate_rejected(
    table: str, key: str, pk: tuple[str, ...], scope: tuple[str, ...] = ()
) -> str:
    """Give one row the key of another (run in a savepoint that is rolled back): a unique index
    must reject it. An UPDATE of the key alone cannot trip over NOT NULL columns the way an
    INSERT of a copy would; SKIP LOCKED keeps it off rows the application is working on. With
    `scope`, the two rows share their scope (a scope holding another row, found first)."""
    k = quote_ident(key)
    cols = [quote_ident(c) for c in pk]
    picked = ", ".join(f"t.{c} AS pk{i}" for i, c in enumerate(cols))
    same = " AND ".join(f"t.{c} = b.pk{i}" for i, c in enumerate(cols))
    sc = [quote_ident(c) for c in scope]
    a_cols = "".join(f", x.{c} AS s{i}" for i, c in enumerate(sc))
    a_where = "".join(f" AND x.{c} IS NOT NULL" for c in sc)
    if sc:
        others = " AND ".join(f"y.{c} = x.{c}" for c in sc)
        a_where += f" AND EXISTS (SELECT 1 FROM {table} y WHERE {others} AND y.{k} <> x.{k})"
    b_where = "".join(f" AND t.{c} = a.s{i}" for i, c in enumerate(sc))
    return f"""
WITH a AS (
    SELECT x.{k} AS v{a_cols} FROM {table} x WHERE x.{k} IS NOT NULL{a_where} LIMIT 1
), b AS (
    SELECT {picked} FROM {table} t, a WHERE t.{k} IS DISTINCT FROM a.v{b_where}
    LIMIT 1 FOR UPDATE OF t SKIP LOCKED
)
UPDATE {table} t SET {k} = a.v FROM a, b WHERE {same} RETURNING t.{cols[0]}"""


# --- undo and report -----------------------------------------------------------------------

MAX_BIGINT = 9_223_372_036_854_775_807


@dataclass(frozen=True)
class UndoSql:
    """Queries that put a run's old values back. Changes are read newest first, so a row
    renamed twice (by a resumed run) is unwound in the reverse order of its renames."""

    target: TargetSql

    @cached_property
    def changes_page_desc(self) -> str:
        return f"""SELECT id, pk, old_value, new_value FROM {self.target.state.changes}
            WHERE run_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"""

    @cached_property
    def preview_page(self) -> str:
        t = self.target
        return f"""
SELECT c.id, c.pk, c.old_value, c.new_value,
       r.{t.k}::text AS current, r.{quote_ident(t.pks[0])} IS NOT NULL AS present
FROM (
    SELECT id, pk, old_value, new_value FROM {t.state.changes}
    WHERE run_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3
) c
LEFT JOIN {t.table} r ON {t.pk_is_text("r", "c.pk")}
ORDER BY c.id DESC"""

    @cached_property
    def lock_rows(self) -> str:
        t = self.target
        if t.composite:
            rows = f"unnest($1::text[]) AS c(pk) JOIN {t.table} r ON {t.pk_is('r', 'c.pk')}"
        else:
            rows = f"{t.table} r WHERE r.{t.p} = ANY($1::text[]::{t.pk_param}[])"
        order = ", ".join(f"r.{quote_ident(c)}" for c in t.pks)
        return f"""SELECT {t.pk_of("r")}::text AS pk, r.{t.k}::text AS current FROM {rows}
ORDER BY {order} FOR UPDATE OF r"""

    @cached_property
    def restore(self) -> str:
        # As TargetSql.apply_renames, the other way round: only rows still holding the value the
        # run gave them; the undo's audit rows are written by the same statement.
        t = self.target
        return f"""
WITH v AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS v(pk, cur, restore)
), u AS (
    UPDATE {t.table} r SET {t.k} = v.restore::{t.key_type} FROM v
    WHERE {t.pk_is_text("r", "v.pk")} AND r.{t.k} = v.cur::{t.key_type}
    RETURNING {t.pk_of("r")} AS pk, v.cur, v.restore
)
INSERT INTO {t.state.changes} (run_id, pk, old_value, new_value)
SELECT $4, u.pk::text, u.cur, u.restore FROM u"""

    @cached_property
    def any_restorable(self) -> str:
        t = self.target
        return f"""SELECT EXISTS (
    SELECT 1 FROM {t.state.changes} c JOIN {t.table} r ON {t.pk_is_text("r", "c.pk")}
    WHERE c.run_id = $1 AND r.{t.k} = c.new_value::{t.key_type})"""


# --- privileges: what the role may do, and the GRANTs a DBA runs ----------------------------

_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_QUALIFIED = rf"({_IDENT})(?:\.({_IDENT}))?"
_CREATE_SCHEMA = re.compile(rf"\s*CREATE\s+SCHEMA\s+(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})\s*", re.I)
_CREATE_TABLE = re.compile(
    rf"\s*CREATE\s+(?:UNLOGGED\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?{_QUALIFIED}\s*\((.*)\)",
    re.I | re.S,
)
_CREATE_INDEX = re.compile(
    rf"\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?({_IDENT})"
    rf"\s+ON\s+(?:ONLY\s+)?{_QUALIFIED}",
    re.I,
)
_ALTER_TABLE = re.compile(
    rf"\s*ALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_QUALIFIED}\s+(.*)", re.I | re.S
)
_ADD_COLUMN = re.compile(rf"ADD\s+(?:COLUMN\s+)?IF\s+NOT\s+EXISTS\s+({_IDENT})", re.I)
_SERIAL_COLUMN = re.compile(rf"(?:^|,)\s*({_IDENT})\s+(?:small|big)?serial[248]?\b", re.I)


def _unquote(ident: str) -> str:
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def _relation(first: str, second: str | None, default_schema: str) -> tuple[str, str]:
    return (_unquote(first), _unquote(second)) if second else (default_schema, _unquote(first))


@dataclass(frozen=True)
class StateObject:
    """What one statement of the state DDL creates, so the statement can be skipped when that
    already exists: kind "schema", "table" or "index" (`schema`, `name`), "column" (`name` the
    table, `column`), or "statement" for anything not understood (always treated as missing)."""

    kind: Literal["schema", "table", "index", "column", "statement"]
    schema: str
    name: str
    column: str | None = None
    serial_columns: tuple[str, ...] = ()  # of a table: columns whose default is a sequence


def state_objects(schema: str, ddl: list[str]) -> list[tuple[str, list[StateObject]]]:
    """Each statement of the state DDL with the objects it creates (derived from the DDL text,
    so a table added to `StateSql.create` is covered by the privilege checks and GRANTs)."""
    out: list[tuple[str, list[StateObject]]] = []
    for stmt in ddl:
        objs: list[StateObject]
        if m := _CREATE_SCHEMA.fullmatch(stmt):
            objs = [StateObject("schema", _unquote(m.group(1)), _unquote(m.group(1)))]
        elif m := _CREATE_TABLE.fullmatch(stmt):
            s, t = _relation(m.group(1), m.group(2), schema)
            serial = tuple(_unquote(c) for c in _SERIAL_COLUMN.findall(m.group(3)))
            objs = [StateObject("table", s, t, serial_columns=serial)]
        elif m := _CREATE_INDEX.match(stmt):
            s, _ = _relation(m.group(2), m.group(3), schema)
            objs = [StateObject("index", s, _unquote(m.group(1)))]
        elif (m := _ALTER_TABLE.fullmatch(stmt)) and (cols := _ADD_COLUMN.findall(m.group(3))):
            s, t = _relation(m.group(1), m.group(2), schema)
            objs = [StateObject("column", s, t, _unquote(c)) for c in cols]
        else:
            objs = [StateObject("statement", schema, stmt)]
        out.append((stmt, objs))
    return out


def serial_sequence_name(table: str, column: str) -> str:
    """The sequence PostgreSQL creates for a serial column of a new table (for names this short;
    the privilege check itself asks the catalog)."""
    return f"{table}_{column}_seq"


# The state's version marker (StateSql.mark_version): the runs table's comment, this text
# followed by the version number.
STATE_VERSION_MARKER = "bulkdedupe state schema version "
_STATE_VERSION = re.compile(re.escape(STATE_VERSION_MARKER) + r"([0-9]+)")


def parse_state_version(comment: str | None) -> int:
    """The version a runs table's comment records; 1 (the first release, which wrote none) for
    no comment or one that is not ours."""
    m = _STATE_VERSION.match(comment or "")
    return int(m.group(1)) if m else 1


# The runs table is looked up with the rest: whether it exists, its version marker, its owner
# (only the owner may upgrade it in place: ALTER TABLE, COMMENT ON).
STATE_ACCESS = """
SELECT n.oid IS NOT NULL AS schema_exists,
       coalesce(has_schema_privilege(n.oid, 'USAGE'), false) AS schema_usage,
       coalesce(has_schema_privilege(n.oid, 'CREATE'), false) AS schema_create,
       has_database_privilege(current_database(), 'CREATE') AS database_create,
       current_user AS role, current_database() AS database,
       r.oid IS NOT NULL AS runs_exists,
       obj_description(r.oid, 'pg_class') AS runs_comment,
       coalesce(pg_has_role(r.relowner, 'USAGE'), false) AS runs_owned,
       pg_get_userbyid(r.relowner) AS runs_owner
FROM (SELECT) AS one
LEFT JOIN pg_namespace n ON n.nspname = $1
LEFT JOIN pg_class r ON r.relnamespace = n.oid AND r.relname = 'runs' AND r.relkind IN ('r', 'p')
"""

# Straight from the catalog, never to_regclass(): that raises without USAGE on the schema.
# $1 schemas, $2 relation names (pairwise).
STATE_RELATIONS = """
SELECT r.schema, r.name, c.oid IS NOT NULL AS present,
       coalesce(has_table_privilege(c.oid, 'SELECT'), false) AS can_select,
       coalesce(has_table_privilege(c.oid, 'INSERT'), false) AS can_insert,
       coalesce(has_table_privilege(c.oid, 'UPDATE'), false) AS can_update
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS r(schema, name, ord)
LEFT JOIN pg_namespace n ON n.nspname = r.schema
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.name
ORDER BY r.ord
"""

# $1 schemas, $2 tables, $3 columns (pairwise): which columns exist.
STATE_COLUMNS = """
SELECT r.schema, r.name, r.col, a.attnum IS NOT NULL AS present
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS r(schema, name, col, ord)
LEFT JOIN pg_namespace n ON n.nspname = r.schema
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.name
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = r.col AND NOT a.attisdropped
ORDER BY r.ord
"""

# The sequences behind serial columns of the given tables ($1 schemas, $2 names), with whether
# the role may call nextval() on them. Identity columns need no privilege on their sequence.
STATE_SEQUENCES = """
SELECT sn.nspname AS schema, s.relname AS name,
       has_sequence_privilege(s.oid, 'USAGE') AS can_use
FROM unnest($1::text[], $2::text[]) AS r(schema, name)
JOIN pg_namespace n ON n.nspname = r.schema
JOIN pg_class t ON t.relnamespace = n.oid AND t.relname = r.name
JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
                AND d.classid = 'pg_class'::regclass AND d.deptype = 'a'
JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
JOIN pg_namespace sn ON sn.oid = s.relnamespace
ORDER BY sn.nspname, s.relname
"""

# Ownership (directly or through a role the current one inherits; superusers own everything).
TABLE_OWNER = """
SELECT pg_has_role(c.relowner, 'USAGE') AS is_owner, pg_get_userbyid(c.relowner) AS owner,
       current_user AS role
FROM pg_class c WHERE c.oid = $1
"""

ROLE_EXISTS = "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)"

_STATE_DDL_LOCK_KEY = "hashtextextended('bulkdedupe.ddl', 0)"
STATE_DDL_LOCK = f"SELECT pg_advisory_xact_lock({_STATE_DDL_LOCK_KEY})"
# Within the DDL lock: ALTER TABLE of a state table waits for every transaction using it, and
# queues everyone behind it meanwhile; an upgrade that cannot have it soon gives up, changing
# nothing, and says so.
STATE_UPGRADE_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"


def state_upgrade_guard(schema: str, version: int) -> str:
    """For init-state --print-sql (a script, so no parameters): take the DDL lock the tool's
    own upgrades take, then stop before anything changes if the state schema is at a version
    newer than `version` (running this script would mark it older than it is)."""
    literal = "'" + schema.replace("'", "''") + "'"
    pattern = "'^" + STATE_VERSION_MARKER + "([0-9]+)'"
    body = f"""
DECLARE found int;
BEGIN
    PERFORM pg_advisory_xact_lock({_STATE_DDL_LOCK_KEY});
    SELECT substring(obj_description(c.oid, 'pg_class') FROM {pattern})::int
    INTO found
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = {literal} AND c.relname = 'runs';
    IF found > {version} THEN
        RAISE EXCEPTION 'the state schema % is at version %, newer than this bulkdedupe knows '
            '(%); nothing was changed: use the bulkdedupe release that upgraded it',
            {literal}, found, {version};
    END IF;
END
"""
    tag = "$bulkdedupe$"
    while tag in body:  # a schema name holding the tag itself
        tag = tag[:-1] + "_$"
    return f"DO {tag}{body}{tag}"


_TABLE_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})


def grant_schema(privileges: str, schema: str, role: str) -> str:
    if privileges not in ("USAGE", "CREATE", "USAGE, CREATE"):
        raise ValueError(f"not schema privileges: {privileges}")
    return f"GRANT {privileges} ON SCHEMA {quote_ident(schema)} TO {quote_ident(role)}"


def grant_table(privileges: tuple[str, ...], table: str, role: str) -> str:
    """`table` already quoted (qualify() or the catalog's quoted name)."""
    if not privileges or not set(privileges) <= _TABLE_PRIVILEGES:
        raise ValueError(f"not table privileges: {privileges}")
    return f"GRANT {', '.join(privileges)} ON TABLE {table} TO {quote_ident(role)}"


def grant_column_update(table: str, column: str, role: str) -> str:
    return f"GRANT UPDATE ({quote_ident(column)}) ON TABLE {table} TO {quote_ident(role)}"


def grant_sequence_usage(schema: str, sequence: str, role: str) -> str:
    return f"GRANT USAGE ON SEQUENCE {qualify(schema, sequence)} TO {quote_ident(role)}"


def grant_create_on_database(database: str, role: str) -> str:
    return f"GRANT CREATE ON DATABASE {quote_ident(database)} TO {quote_ident(role)}"


# The governor's probe session commits the way the application does: synchronously.
PROBE_SESSION = "SET synchronous_commit = on"


# --- partitioned tables (catalog.partitioning, enforce) ------------------------------------

# The table's partition tree ($1: its oid; $2: the key column's name), parents before their
# partitions. For a partitioned member: the columns it partitions by, plain ones and those its
# key expressions use (each is recorded as internally dependent on the table, which is what
# keeps it from being dropped). For a leaf: the btree index a scan can walk, on its own copy of
# the key column (its attnum may differ from the parent's), as KEY_INDEXES picks one.
PARTITION_TREE = """
SELECT t.relid::oid AS oid, n.nspname AS schema, c.relname AS name,
       c.relkind::text AS relkind, t.parentrelid::oid AS parent, t.level,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = t.relid AND a.attnum > 0
               AND (a.attnum = ANY (pt.partattrs::int2[])
                    OR EXISTS (SELECT 1 FROM pg_depend d
                               WHERE d.classid = 'pg_class'::regclass AND d.objid = t.relid
                                 AND d.objsubid = a.attnum
                                 AND d.refclassid = 'pg_class'::regclass
                                 AND d.refobjid = t.relid AND d.refobjsubid = 0
                                 AND d.deptype = 'i'))
             ORDER BY a.attnum) AS partition_columns,
       pg_get_partkeydef(t.relid) AS partition_key,
       greatest(c.reltuples, 0)::bigint AS reltuples,
       (SELECT ic.relname FROM pg_attribute ka
        JOIN pg_index i ON i.indrelid = ka.attrelid AND i.indkey[0] = ka.attnum
        JOIN pg_class ic ON ic.oid = i.indexrelid
        JOIN pg_am am ON am.oid = ic.relam
        JOIN pg_opclass opc ON opc.oid = i.indclass[0]
        WHERE ka.attrelid = t.relid AND ka.attname = $2 AND NOT ka.attisdropped
          AND am.amname = 'btree' AND i.indisvalid AND i.indisready AND i.indpred IS NULL
          AND opc.opcdefault AND i.indcollation[0] = ka.attcollation
        ORDER BY i.indnatts, ic.relname LIMIT 1) AS key_index
FROM pg_partition_tree($1::oid::regclass) t
JOIN pg_class c ON c.oid = t.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_partitioned_table pt ON pt.partrelid = t.relid
ORDER BY t.level, n.nspname, c.relname
"""

# Anything named $2 in schema $1 and, when it is an index, what it is: on which table, its key
# columns by name (a partition's attnums may differ from its parent's), whether every column
# keeps its column's collation, and the partitioned index it is attached to.
PARTITION_INDEX_BY_NAME = """
SELECT c.oid, c.relkind::text AS relkind, i.indrelid, i.indisunique, i.indisvalid,
       i.indpred IS NULL AS is_full, i.indexprs IS NULL AS is_plain,
       i.indnatts = i.indnkeyatts AS no_include, am.amname,
       ARRAY(SELECT a.attname::text
             FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.n <= i.indnkeyatts ORDER BY k.n) AS columns,
       NOT EXISTS (SELECT 1
                   FROM unnest(i.indkey::int2[], i.indcollation::oid[]) AS k(attnum, coll)
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                   WHERE k.coll <> a.attcollation) AS column_collations,
       CASE WHEN i.indexrelid IS NOT NULL THEN pg_get_indexdef(i.indexrelid) END AS definition,
       (SELECT h.inhparent FROM pg_inherits h WHERE h.inhrelid = c.oid) AS attached_to
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
LEFT JOIN pg_am am ON am.oid = c.relam
WHERE n.nspname = $1 AND c.relname = $2
"""

# The indexes attached to partitioned index $1, by the table they are on.
ATTACHED_INDEXES = """
SELECT i.indrelid AS table_oid, n.nspname AS schema, c.relname AS name, i.indisvalid
FROM pg_inherits h
JOIN pg_index i ON i.indexrelid = h.inhrelid
JOIN pg_class c ON c.oid = h.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE h.inhparent = $1
"""

INDEX_IS_VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = $1"


def _columns(columns: tuple[str, ...]) -> str:
    return ", ".join(quote_ident(c) for c in columns)


def create_unique_index_on_only(index: str, table: str, columns: tuple[str, ...]) -> str:
    """The partitioned index itself, without building anything in the partitions: INVALID until
    every partition's index is attached. Takes a SHARE lock on that table for an instant."""
    return f"CREATE UNIQUE INDEX {quote_ident(index)} ON ONLY {table} ({_columns(columns)})"


def create_unique_index_on_empty(index: str, table: str, columns: tuple[str, ...]) -> str:
    """A partitioned table with no partitions: the ordinary form builds nothing and is valid."""
    return f"CREATE UNIQUE INDEX {quote_ident(index)} ON {table} ({_columns(columns)})"


def create_unique_index_concurrently_on(index: str, table: str, columns: tuple[str, ...]) -> str:
    """A table's (or one partition's: a leaf is a plain table) unique index on `columns`."""
    return f"CREATE UNIQUE INDEX CONCURRENTLY {quote_ident(index)} ON {table} ({_columns(columns)})"


def attach_partition_index(parent_index: str, index: str) -> str:
    """Both already qualified. Locks the partition's index for an instant."""
    return f"ALTER INDEX {parent_index} ATTACH PARTITION {index}"


def drop_partitioned_index(schema: str, index: str) -> str:
    """A partitioned index cannot be dropped CONCURRENTLY; this drops its partitions' too."""
    return f"DROP INDEX {qualify(schema, index)}"


def create_index_concurrently_on(table: str, column: str) -> str:
    """What to run on a partition that has no index on the key (PostgreSQL names it)."""
    return f"CREATE INDEX CONCURRENTLY ON {table} ({quote_ident(column)})"
