"""What the catalog says about the target: the table, its key and primary key columns, the
index a scan can walk, and whether this role and server may write. Read-only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import sql
from .config import ConnectConfig, Name, OrderItem
from .db import Conn
from .errors import PrivilegeError, ReadOnlyError, TargetError, UsageError

TEXT_TYPES = {"text", "varchar", "bpchar"}


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    version_num: int
    version: str
    read_only: bool
    in_recovery: bool
    role: str
    database: str
    lock_slots: int


@dataclass(frozen=True, kw_only=True)
class Target:
    """The resolved table and columns: names as stored in the catalog."""

    oid: int
    schema: str
    table: str
    key: str
    key_attnum: int
    key_type: str  # type name for casts, no modifier: text, character varying, bpchar
    key_max_length: int | None  # declared n of varchar(n)/char(n); None: text, varchar, bpchar
    key_is_char: bool  # char(n) or bpchar: trailing blanks are insignificant (equality_key)
    key_collation: int
    pk: str
    pk_type: str
    keep: tuple[OrderItem, ...]
    estimated_rows: int
    scan_index: str | None

    @property
    def qualified(self) -> str:
        return sql.qualify(self.schema, self.table)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def lock_prefix(self) -> str:
        """Hashed with the value into the advisory lock key: `schema.table.column:`."""
        return f"{self.schema}.{self.table}.{self.key}:"

    def queries(self, state_schema: str) -> sql.TargetSql:
        return sql.TargetSql(
            table=self.qualified,
            key=self.key,
            pk=self.pk,
            key_type=self.key_type,
            pk_type=self.pk_type,
            keep=self.keep,
            state=sql.StateSql(state_schema),
        )


async def server_info(conn: Conn) -> ServerInfo:
    row = await conn.fetchrow(sql.SERVER_INFO)
    assert row is not None
    return ServerInfo(
        version_num=row["version_num"],
        version=row["version"],
        read_only=bool(
            row["in_recovery"] or row["default_read_only"] or row["transaction_read_only"]
        ),
        in_recovery=row["in_recovery"],
        role=row["role"],
        database=row["database"],
        lock_slots=row["lock_slots"],
    )


# --wal-compression auto: the fast methods only; pglz saves WAL but costs the server CPU.
AUTO_WAL_COMPRESSION = ("lz4", "zstd")


async def wal_compression(conn: Conn, requested: str, version_num: int) -> str | None:
    """The `wal_compression` the batches set for themselves, or None to leave the server's.

    Nearly all the WAL of a run is full-page images of the pages it renames in (see
    docs/production.md); compressing them is the biggest saving a run can make on its own.
    `auto` compresses with lz4 (or zstd) when the server has it, does not compress already and
    this role may set it; an explicit method must be possible, else the run is refused."""
    if requested == "server":
        return None
    row = await conn.fetchrow(sql.WAL_COMPRESSION)
    assert row is not None
    methods = set(row["methods"] or ())
    allowed = bool(row["superuser"])
    if not allowed and version_num >= 150000:
        allowed = bool(await conn.fetchval(sql.WAL_COMPRESSION_GRANTED))
    if requested == "auto":
        if row["current"] != "off" or not allowed:
            return None
        return next((m for m in AUTO_WAL_COMPRESSION if m in methods), None)
    if requested not in methods:
        have = ", ".join(sorted(methods - {"on", "off"})) or "none (before PostgreSQL 15)"
        raise UsageError(
            f"--wal-compression {requested}: this server does not offer it (it has: {have}); "
            "use --wal-compression auto or server"
        )
    if not allowed:
        raise UsageError(
            f"--wal-compression {requested}: role {row['role']} may not "
            "set wal_compression (superuser, or PostgreSQL 15+: GRANT SET ON PARAMETER "
            "wal_compression TO <role>); use --wal-compression auto or server"
        )
    return requested


def _array_safe_type(column: Any) -> str:
    """The column's type name for `$n::<type>[]` casts. format_type() names bpchar without a
    modifier `character`, which means char(1) and would truncate every value to one letter."""
    return "bpchar" if column["typname"] == "bpchar" else str(column["base_type"])


def _quoted_name(name: Name) -> str:
    return sql.qualify(name.schema, name.name) if name.schema else sql.quote_ident(name.name)


async def resolve(conn: Conn, cfg: ConnectConfig, keep: tuple[OrderItem, ...] = ()) -> Target:
    """Look the target up in the catalog and check it can be deduplicated."""
    table_row = await conn.fetchrow(sql.RESOLVE_TABLE, _quoted_name(cfg.table))
    if table_row is None:
        raise TargetError(
            f"table {cfg.table} does not exist (or is not on the search_path); "
            "check --table, e.g. --table billing.payments"
        )
    if table_row["relkind"] not in ("r", "p"):
        raise TargetError(f"{cfg.table} is not a table (relkind {table_row['relkind']!r})")
    oid = table_row["oid"]
    display = f"{table_row['nspname']}.{table_row['relname']}"
    columns: dict[str, Any] = {r["attname"]: r for r in await conn.fetch(sql.TABLE_COLUMNS, oid)}

    key = columns.get(cfg.key)
    if key is None:
        raise TargetError(f"column {cfg.key!r} does not exist in {display}; check --key")
    if key["typname"] not in TEXT_TYPES:
        raise TargetError(
            f"column {display}.{cfg.key} is of type {key['full_type']}; bulkdedupe renames "
            "text, varchar and char keys only"
        )
    if not key["deterministic"]:
        raise TargetError(
            f"column {display}.{cfg.key} uses a nondeterministic collation; "
            "equality there is not byte equality, which bulkdedupe relies on"
        )

    if cfg.pk is None:
        pk_cols = await conn.fetchval(sql.PRIMARY_KEY_COLUMNS, oid)
        if not pk_cols:
            raise TargetError(
                f"{display} has no primary key; pass --pk COLUMN naming a unique, not-null column"
            )
        if len(pk_cols) != 1:
            raise TargetError(
                f"{display} has a composite primary key ({', '.join(pk_cols)}); pass --pk "
                "COLUMN naming a single-column unique, not-null column"
            )
        pk_name = pk_cols[0]
    else:
        pk_name = cfg.pk
        pk = columns.get(pk_name)
        if pk is None:
            raise TargetError(f"column {pk_name!r} does not exist in {display}; check --pk")
        if not pk["attnotnull"] or not await conn.fetchval(
            sql.UNIQUE_SINGLE_COLUMN_INDEX, oid, pk["attnum"]
        ):
            raise TargetError(
                f"--pk {pk_name}: the column must be NOT NULL with a unique index of its own"
            )
    if pk_name == cfg.key:
        raise TargetError("--pk and --key name the same column")
    pk = columns[pk_name]

    for item in keep:
        if item.column not in columns:
            raise TargetError(f"--keep: column {item.column!r} does not exist in {display}")

    index_rows = await conn.fetch(sql.KEY_INDEXES, oid, key["attnum"], key["attcollation"])
    max_length = key["atttypmod"] - 4 if key["typname"] != "text" and key["atttypmod"] > 4 else None
    return Target(
        oid=oid,
        schema=table_row["nspname"],
        table=table_row["relname"],
        key=cfg.key,
        key_attnum=key["attnum"],
        key_type=_array_safe_type(key),
        key_max_length=max_length,
        key_is_char=key["typname"] == "bpchar",
        key_collation=key["attcollation"],
        pk=pk_name,
        pk_type=_array_safe_type(pk),
        keep=keep,
        estimated_rows=max(int(table_row["reltuples"]), 0),
        scan_index=index_rows[0]["index_name"] if index_rows else None,
    )


async def check_privileges(conn: Conn, target: Target, *, write: bool) -> None:
    """SELECT on the table; with `write`, UPDATE on the key column (a column privilege is
    enough: nothing else is ever written). Raises PrivilegeError naming the GRANT."""
    row = await conn.fetchrow(sql.PRIVILEGES, target.oid, target.key)
    assert row is not None
    role = row["role"]
    if not row["can_select"]:
        raise PrivilegeError(
            f"role {role} lacks SELECT on {target.display}; as the table's owner run: "
            f"{sql.grant_table(('SELECT',), target.qualified, role)}"
        )
    if write and not row["can_update_key"]:
        raise PrivilegeError(
            f"role {role} lacks UPDATE ({target.key}) on {target.display} (renames write the "
            f"key column only); as the table's owner run: "
            f"{sql.grant_column_update(target.qualified, target.key, role)}"
        )


async def check_owner(conn: Conn, target: Target, *, why: str) -> None:
    """CREATE INDEX and ALTER TABLE need ownership of the table, which no GRANT gives."""
    row = await conn.fetchrow(sql.TABLE_OWNER, target.oid)
    assert row is not None
    if not row["is_owner"]:
        raise PrivilegeError(
            f"role {row['role']} does not own {target.display} and {why}, which only its "
            f"owner may do (no GRANT allows it); run it as {row['owner']}, the owner, or as a "
            "role that is a member of it"
        )


def check_writable(info: ServerInfo) -> None:
    if info.in_recovery:
        raise ReadOnlyError(
            "the server is a standby (in recovery); run --apply against the primary"
        )
    if info.read_only:
        raise ReadOnlyError(
            f"database {info.database!r} is read-only (default_transaction_read_only=on); "
            "run --apply against a writable primary"
        )
