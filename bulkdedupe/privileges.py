"""Least privilege: what the state schema asks of the role, checked before anything changes, and
`init-state`: the state DDL plus the GRANTs that let a role that owns nothing run bulkdedupe.

What each command needs (docs/privileges.md tells the whole story):

    scan, verify, run --dry-run    SELECT on the table
    run --apply                    + UPDATE (key) on the table; USAGE on the state schema,
                                   SELECT, INSERT, UPDATE on its tables and USAGE on its serial
                                   sequences -- or CREATE on the database, to create it
    undo                           as run (its dry run: SELECT on the table and the state tables)
    runs, report                   USAGE on the state schema, SELECT on its tables
    enforce, --create-scan-index   ownership of the table (no GRANT allows CREATE INDEX)

Everything about the state schema is derived from `StateSql.create`, so a table added there is
checked and granted without touching this module. So is its upgrade: a state schema at an older
`StateSql.VERSION` is brought up to date by the statements of `create` it lacks, then marked
(`upgrade_statements`), by whichever command writes to it first, when the role may (it owns the
runs table), else by a DBA with the SQL of `init-state --print-sql`. Readers never upgrade, and
nothing touches a state schema newer than this release knows.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from . import catalog, db, errors, sql
from .config import DEFAULT_STATE_SCHEMA, ConnectConfig
from .db import Conn
from .errors import BulkDedupeError, PrivilegeError, StateVersionError, UsageError
from .results import InitStateResult

STATE_WRITE = ("SELECT", "INSERT", "UPDATE")
STATE_READ = ("SELECT",)
UPGRADE_LOCK_TIMEOUT = "5s"  # see sql.STATE_UPGRADE_LOCK_TIMEOUT


@dataclass(frozen=True, kw_only=True)
class TableAccess:
    schema: str
    name: str
    privileges: frozenset[str]  # which of SELECT, INSERT, UPDATE the role has

    @property
    def qualified(self) -> str:
        return sql.qualify(self.schema, self.name)


@dataclass(frozen=True, kw_only=True)
class SequenceAccess:
    schema: str
    name: str
    usable: bool


@dataclass(frozen=True, kw_only=True)
class StateAccess:
    """What of the state schema exists, and what the current role may do with it."""

    role: str
    database: str
    schema: str
    schema_exists: bool
    schema_usage: bool
    schema_create: bool
    database_create: bool
    missing: tuple[sql.StateObject, ...]  # created by the DDL but not there (yet)
    tables: tuple[TableAccess, ...]  # the state tables that exist
    sequences: tuple[SequenceAccess, ...]  # behind their serial columns
    # The state's version (sql.StateSql.mark_version), None while there is no runs table; and
    # whether this role may upgrade it in place (it owns runs, or is a member of the owner).
    version: int | None = None
    runs_owned: bool = False
    runs_owner: str | None = None

    def has(self, qualified: str) -> bool:
        return any(t.qualified == qualified for t in self.tables)

    @property
    def outdated(self) -> bool:
        """A state schema an earlier release made, which this one upgrades before writing."""
        return self.version is not None and self.version < sql.StateSql.VERSION


async def inspect_state(conn: Conn, st: sql.StateSql) -> StateAccess:
    """Read-only, from the catalog alone (works without any privilege on the schema)."""
    head = await conn.fetchrow(sql.STATE_ACCESS, st.schema)
    assert head is not None
    objects = [o for _, objs in st.objects for o in objs]
    rels = [o for o in objects if o.kind in ("table", "index")]
    rows = await conn.fetch(sql.STATE_RELATIONS, [o.schema for o in rels], [o.name for o in rels])
    present = {(r["schema"], r["name"]) for r in rows if r["present"]}
    cols = [o for o in objects if o.kind == "column"]
    col_rows = (
        await conn.fetch(
            sql.STATE_COLUMNS,
            [o.schema for o in cols],
            [o.name for o in cols],
            [o.column for o in cols],
        )
        if cols
        else []
    )
    present_cols = {(r["schema"], r["name"], r["col"]) for r in col_rows if r["present"]}

    def exists(o: sql.StateObject) -> bool:
        if o.kind == "schema":
            return o.name == st.schema and bool(head["schema_exists"])
        if o.kind in ("table", "index"):
            return (o.schema, o.name) in present
        if o.kind == "column":
            return (o.schema, o.name, o.column) in present_cols
        return False  # a statement we cannot probe: run it whenever creating anything

    tables = tuple(
        TableAccess(
            schema=r["schema"],
            name=r["name"],
            privileges=frozenset(p for p in STATE_WRITE if r[f"can_{p.lower()}"]),
        )
        for o, r in zip(rels, rows, strict=True)
        if o.kind == "table" and r["present"]
    )
    seq_rows = await conn.fetch(
        sql.STATE_SEQUENCES, [t.schema for t in tables], [t.name for t in tables]
    )
    return StateAccess(
        role=head["role"],
        database=head["database"],
        schema=st.schema,
        schema_exists=head["schema_exists"],
        schema_usage=head["schema_usage"],
        schema_create=head["schema_create"],
        database_create=head["database_create"],
        missing=tuple(o for o in objects if not exists(o)),
        tables=tables,
        sequences=tuple(
            SequenceAccess(schema=r["schema"], name=r["name"], usable=r["can_use"])
            for r in seq_rows
        ),
        version=sql.parse_state_version(head["runs_comment"]) if head["runs_exists"] else None,
        runs_owned=head["runs_owned"],
        runs_owner=head["runs_owner"],
    )


def missing_statements(access: StateAccess, st: sql.StateSql) -> list[str]:
    """The DDL statements that create something not there yet, in order."""
    missing = set(access.missing)
    return [stmt for stmt, objs in st.objects if any(o in missing for o in objs)]


def upgrade_statements(access: StateAccess, st: sql.StateSql) -> list[str]:
    """What brings the state schema to this release's version: the DDL statements that create
    what is missing, then (on a new or older state) the version marker. Empty: up to date."""
    stmts = missing_statements(access, st)
    if access.version is None or access.outdated:
        stmts.append(st.mark_version)
    return stmts


def require_known_version(access: StateAccess) -> None:
    """StateVersionError when a newer bulkdedupe made (or upgraded) the state schema: its
    tables may mean what this release cannot know, so no command reads or writes them."""
    found, known = access.version, sql.StateSql.VERSION
    if found is not None and found > known:
        raise StateVersionError(
            f"the state schema {access.schema} is at version {found}, newer than this "
            f"bulkdedupe knows (up to {known}); use the bulkdedupe release that upgraded it, or "
            "a newer one (nothing was changed)",
            found=found,
            supported=known,
        )


def _upgrade_refused(access: StateAccess, why: str) -> PrivilegeError:
    return PrivilegeError(
        f"the state schema {access.schema} is at version {access.version} and this bulkdedupe "
        f"needs version {sql.StateSql.VERSION}; role {access.role} may not upgrade it in place "
        f"({why}); have a DBA run the SQL of "
        f"`{_init_command(access.schema, access.role, print_sql=True)}` (one transaction, no "
        f"data changed), or run `{_init_command(access.schema, access.role)}` as the owner; "
        "nothing was changed"
    )


def ddl_refused(access: StateAccess, exc: BaseException) -> PrivilegeError:
    """The DDL that brings the state up to date was refused (the checks before it could not
    tell): what to do instead. Nothing was changed."""
    return _upgrade_refused(access, str(exc)) if access.outdated else create_error(access, exc)


def require_upgrade(access: StateAccess) -> None:
    """Before upgrading an older state schema in place: may this role? ALTER TABLE and
    COMMENT ON its runs table are for the table's owner; PrivilegeError naming the fix if not."""
    if access.outdated and not access.runs_owned:
        raise _upgrade_refused(
            access,
            f"only the owner of {access.schema}.runs, {access.runs_owner}, may alter it",
        )


def _init_command(schema: str, role: str, *, print_sql: bool = False) -> str:
    opts = "" if schema == DEFAULT_STATE_SCHEMA else f" --state-schema {schema}"
    return f"bulkdedupe init-state{' --print-sql' if print_sql else ''} --role {role}{opts}"


def require_create(access: StateAccess) -> None:
    """Before creating what is missing: may this role? PrivilegeError naming the fix if not."""
    if not access.missing:
        return
    role, q_role = access.role, sql.quote_ident(access.role)
    how = (
        f"have a privileged role run `{_init_command(access.schema, role)}` (with this "
        f"command's --table and --key) first, or give a DBA the SQL of "
        f"`{_init_command(access.schema, role, print_sql=True)}`"
    )
    if not access.schema_exists and not access.database_create:
        raise PrivilegeError(
            f"the state schema {access.schema} does not exist and role {role} may not create "
            f"it (it lacks CREATE on database {access.database}); {how}; or "
            f"{sql.grant_create_on_database(access.database, role)}"
        )
    new_tables = [o for o in access.missing if o.kind == "table"]
    if access.schema_exists and new_tables and not access.schema_create:
        what = ", ".join(_display(o) for o in new_tables)
        raise PrivilegeError(
            f"the state schema {access.schema} lacks {what} and role {role} may not create "
            f"it (it lacks CREATE on schema {access.schema}); {how}; or "
            f"GRANT CREATE ON SCHEMA {sql.quote_ident(access.schema)} TO {q_role}"
        )
    # A column or an index added to an existing state table needs its ownership: left to the
    # DDL itself, whose refusal rolls everything back (see create_error).


def create_error(access: StateAccess, exc: BaseException) -> PrivilegeError:
    """The DDL itself was refused (say, a column added to a state table the role does not
    own); nothing was created."""
    what = ", ".join(_display(o) for o in access.missing)
    return PrivilegeError(
        f"role {access.role} may not add {what} to the state schema {access.schema} ({exc}); "
        f"have a privileged role (the owner of the state tables) run "
        f"`{_init_command(access.schema, access.role)}` first"
    )


def require_state(access: StateAccess, *, write: bool) -> None:
    """PrivilegeError naming every missing privilege on the (existing) state schema and the
    GRANTs that fix them, before the command changes anything."""
    role = access.role
    lacks: list[str] = []
    grants: list[str] = []
    if not access.schema_usage:
        lacks.append(f"USAGE on schema {access.schema}")
        grants.append(sql.grant_schema("USAGE", access.schema, role))
    need = STATE_WRITE if write else STATE_READ
    for t in access.tables:
        lacking = tuple(p for p in need if p not in t.privileges)
        if lacking:
            lacks.append(f"{', '.join(lacking)} on {t.schema}.{t.name}")
            grants.append(sql.grant_table(lacking, t.qualified, role))
    if write:
        for s in access.sequences:
            if not s.usable:
                lacks.append(f"USAGE on sequence {s.schema}.{s.name}")
                grants.append(sql.grant_sequence_usage(s.schema, s.name, role))
    if lacks:
        doing = "record runs and their audit" if write else "read runs and their audit"
        raise PrivilegeError(
            f"role {role} lacks {'; '.join(lacks)} (needed to {doing} in schema "
            f"{access.schema}); as the schema's owner run: {'; '.join(grants)} (every grant "
            f"bulkdedupe needs: `{_init_command(access.schema, role, print_sql=True)}`)"
        )


async def check_state(conn: Conn, st: sql.StateSql, *, write: bool) -> bool:
    """False when there are no runs to read (the runs or changes table does not exist); raises
    PrivilegeError when they exist but this role may not read them (or, with `write`, record
    runs and audit rows in them)."""
    access = await inspect_state(conn, st)
    if not (access.has(st.runs) and access.has(st.changes)):
        return False
    require_known_version(access)
    if write:  # the command will upgrade an older state before it records anything
        require_upgrade(access)
    require_state(access, write=write)
    return True


async def bring_up_to_date(conn: Conn, st: sql.StateSql) -> tuple[StateAccess, list[str]]:
    """Within the caller's transaction: take the DDL lock, look again (another session may
    have created or upgraded the state meanwhile), refuse a newer version, and run what brings
    the state to this release's version. Returns the state as found under the lock, and the
    statements run (none: it was up to date). Any failure leaves it as it was; a statement the
    role may not run raises the driver's InsufficientPrivilegeError, for the caller to say what
    to do instead (`ddl_refused`, or init-state's own message)."""
    await conn.execute(sql.STATE_DDL_LOCK)
    access = await inspect_state(conn, st)
    require_known_version(access)
    stmts = upgrade_statements(access, st)
    if not stmts:
        return access, stmts
    await conn.execute(sql.STATE_UPGRADE_LOCK_TIMEOUT, UPGRADE_LOCK_TIMEOUT)
    try:
        for stmt in stmts:
            await conn.execute(stmt)
    except asyncpg.LockNotAvailableError as exc:
        raise BulkDedupeError(
            f"could not lock the state tables of {access.schema} within {UPGRADE_LOCK_TIMEOUT} "
            f"to upgrade them to version {st.VERSION} (another session is using them; see "
            "pg_locks); nothing was changed: try again"
        ) from exc
    return access, stmts


# --- init-state ----------------------------------------------------------------------------


def grant_statements(
    st: sql.StateSql,
    *,
    role: str,
    table: str,
    key: str,
    sequences: Sequence[tuple[str, str]],
) -> list[str]:
    """Everything `run --apply` and `undo --apply` need beyond LOGIN: `table` quoted, `sequences`
    (schema, name) of the state tables' serial columns."""
    out = [sql.grant_schema("USAGE", st.schema, role)]
    out += [sql.grant_table(STATE_WRITE, sql.qualify(t.schema, t.name), role) for t in st.tables]
    out += [sql.grant_sequence_usage(s, name, role) for s, name in sequences]
    out.append(sql.grant_table(("SELECT",), table, role))
    out.append(sql.grant_column_update(table, key, role))
    return out


def _quoted_table(cfg: ConnectConfig) -> str:
    t = cfg.table
    return sql.qualify(t.schema, t.name) if t.schema else sql.quote_ident(t.name)


def _tidy(stmt: str) -> str:
    """A statement as written in sql.py, its body re-indented for reading."""
    first, _, rest = stmt.strip().partition("\n")
    return first + ("\n" + textwrap.dedent(rest) if rest else "")


def init_script(cfg: ConnectConfig, *, role: str | None) -> str:
    """The SQL of `init-state --print-sql`: a script a DBA runs with psql (one transaction)."""
    st = sql.StateSql(cfg.state_schema)
    table = _quoted_table(cfg)
    lines = [
        f"-- bulkdedupe init-state: the state schema {sql.quote_ident(st.schema)} (runs and the "
        "audit trail of every change)",
    ]
    if role:
        lines.append(
            f"-- and the privileges role {sql.quote_ident(role)} needs to deduplicate "
            f"{table} ({sql.quote_ident(cfg.key)})."
        )
    lines += [
        "-- Run it as a role that may create schemas in this database (CREATE on the database)"
        + ("," if role else ":"),
        *(["-- and grant on the table (its owner, or a superuser):"] if role else []),
        "--   psql -v ON_ERROR_STOP=1 -f this-file.sql",
        f"-- It also upgrades, in place, a state schema an earlier release made, to version "
        f"{st.VERSION}.",
        "BEGIN;",
        "",
        "-- one upgrade at a time (bulkdedupe's own take the same lock), and none of a state",
        "-- schema a newer bulkdedupe made",
        f"{sql.state_upgrade_guard(st.schema, st.VERSION)};",
        "",
        "-- what `bulkdedupe run --apply` would otherwise create on first use; of a state schema",
        "-- an earlier release made, what it lacks (every statement is IF NOT EXISTS)",
    ]
    lines += [f"{_tidy(stmt)};" for stmt in st.create]
    lines += ["", "-- the state schema's version, which bulkdedupe reads", f"{st.mark_version};"]
    if not role:
        lines += [
            "",
            "-- pass --role ROLE to also print the GRANTs that let ROLE run bulkdedupe",
            "-- without owning anything",
            "COMMIT;",
        ]
        return "\n".join(lines) + "\n"
    sequences = [
        (t.schema, sql.serial_sequence_name(t.name, c)) for t in st.tables for c in t.serial_columns
    ]
    grants = grant_statements(st, role=role, table=table, key=cfg.key, sequences=sequences)
    n_state = 1 + len(st.tables) + len(sequences)
    lines += [
        "",
        "-- run --apply and undo --apply record runs and their audit here; runs, report and the",
        "-- dry run of undo only read (SELECT)",
        *(f"{g};" for g in grants[:n_state]),
        "",
        "-- scan, verify and the dry run read the table; run --apply and undo --apply change the",
        "-- key column, and nothing else (column privilege)",
    ]
    if cfg.table.schema is None:
        lines.append(f"-- {table} is looked up on the search_path of the session running this")
    lines += [f"{g};" for g in grants[n_state:]]
    lines += [
        "",
        "-- enforce (CREATE UNIQUE INDEX CONCURRENTLY, ALTER TABLE ... ADD CONSTRAINT) and",
        "-- run --create-scan-index need what no GRANT gives: ownership of the table. Run them as",
        f"-- its owner, or make {role} a member of the owning role:",
        f"--   GRANT <owner of {table}> TO {sql.quote_ident(role)};",
        "",
        "-- the guardrails that must see every session (--max-active-backends,",
        "-- --critical-active-backends, --max-replication-lag without --replica-url,",
        "-- --pause-during-autovacuum) need the predefined role pg_read_all_stats (or pg_monitor):",
        f"--   GRANT pg_read_all_stats TO {sql.quote_ident(role)};",
        "COMMIT;",
    ]
    return "\n".join(lines) + "\n"


def _display(o: sql.StateObject) -> str:
    if o.kind == "schema":
        return f"schema {o.name}"
    if o.kind == "column":
        return f"column {o.schema}.{o.name}.{o.column}"
    return f"{o.kind} {o.schema}.{o.name}"


async def init_state(cfg: ConnectConfig, *, role: str | None = None) -> InitStateResult:
    """Create what is missing of the state schema and, with `role`, grant that role everything
    `run --apply` and `undo --apply` need. Runs as a privileged role (a DBA); one transaction."""
    st = sql.StateSql(cfg.state_schema)
    async with errors.boundary("init-state"), db.connect(cfg) as conn:
        try:
            catalog.check_writable(await catalog.server_info(conn))
            target: catalog.Target | None = None
            if role is not None:
                if not await conn.fetchval(sql.ROLE_EXISTS, role):
                    raise UsageError(
                        f"--role {role}: no such role; create it first "
                        f"(CREATE ROLE {sql.quote_ident(role)} LOGIN PASSWORD '...')"
                    )
                target = await catalog.resolve(conn, cfg)
            granted: list[str] = []
            async with conn.transaction():
                access, _ = await bring_up_to_date(conn, st)
                if target is not None and role is not None:
                    seqs = await conn.fetch(
                        sql.STATE_SEQUENCES,
                        [t.schema for t in st.tables],
                        [t.name for t in st.tables],
                    )
                    granted = grant_statements(
                        st,
                        role=role,
                        table=target.qualified,
                        key=target.key,
                        sequences=[(r["schema"], r["name"]) for r in seqs],
                    )
                    for g in granted:
                        await conn.execute(g)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise PrivilegeError(
                f"init-state: permission denied ({exc}); run it as a role that may create "
                "schemas in this database and grant on the table (the DBA), or hand them the "
                "SQL of `bulkdedupe init-state --print-sql`"
            ) from None
    return InitStateResult(
        state_schema=st.schema,
        created=tuple(_display(o) for o in access.missing if o.kind != "statement"),
        role=role,
        granted=tuple(granted),
        version=st.VERSION,
        upgraded_from=access.version if access.outdated else None,
    )
