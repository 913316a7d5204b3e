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
    pk_columns: tuple[str, ...]  # one column, or a composite key's columns in index order
    pk_types: tuple[str, ...]
    scope: tuple[str, ...] = ()  # --scope: with the key, what must be unique
    scope_types: tuple[str, ...] = ()
    scope_attnums: tuple[int, ...] = ()
    # the scan's order: the scan index's leading columns (scope and key, in its order)
    scan_columns: tuple[str, ...] = ()
    # with --scope: an index leads with the key, so new values are cheaply checked against the
    # whole table, not only their scope
    key_indexed: bool = True
    keep: tuple[OrderItem, ...]
    estimated_rows: int
    scan_index: str | None
    # a partitioned table's tree (see Partitioning); None: a plain table
    partitions: Partitioning | None = None
    # a plain table without inheritance children: a heap position names one of its rows
    by_position: bool = False

    @property
    def qualified(self) -> str:
        return sql.qualify(self.schema, self.table)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def pk(self) -> str:
        """The primary key's column(s) as recorded (`runs.pk_column`) and shown: `id`,
        `id,merchant_id`."""
        return ",".join(self.pk_columns)

    @property
    def composite_pk(self) -> bool:
        return len(self.pk_columns) > 1

    @property
    def key_in_pk(self) -> int | None:
        """The key's place in the primary key (only a table partitioned by it has it there)."""
        return self.pk_columns.index(self.key) if self.key in self.pk_columns else None

    @property
    def lock_prefix(self) -> str:
        """Hashed with the value into the advisory lock key: `schema.table.column:`."""
        return f"{self.schema}.{self.table}.{self.key}:"

    def queries(self, state_schema: str) -> sql.TargetSql:
        return sql.TargetSql(
            table=self.qualified,
            key=self.key,
            pk=self.pk_columns,
            key_type=self.key_type,
            pk_type=self.pk_types,
            keep=self.keep,
            state=sql.StateSql(state_schema),
            scope=self.scope,
            scope_types=self.scope_types,
            scan_columns=self.scan_columns or (*self.scope, self.key),
            new_values_table_wide=self.key_indexed,
            by_position=self.by_position,
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
    partitions = await partitioning(conn, oid, cfg.key) if table_row["relkind"] == "p" else None

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

    pk_names = await _primary_key(conn, cfg, oid, display, columns)
    # (a key that partitions the table is in its primary key: PostgreSQL requires it there)
    if cfg.key in pk_names and not (partitions and partitions.key_levels(cfg.key)):
        raise TargetError(
            f"--key {cfg.key} is a column of the primary key ({', '.join(pk_names)}); "
            "bulkdedupe never rewrites the columns that identify a row"
        )
    pks = [columns[name] for name in pk_names]

    for item in keep:
        if item.column not in columns:
            raise TargetError(f"--keep: column {item.column!r} does not exist in {display}")

    scope = [await _scope_column(conn, name, columns, display, pk_names) for name in cfg.scope]
    scan_columns: tuple[str, ...] = ()
    key_indexed = True
    if scope:
        key_indexed = bool(
            await conn.fetch(sql.KEY_INDEXES, oid, key["attnum"], key["attcollation"])
        )
        wanted = [c["attnum"] for c in scope] + [key["attnum"]]
        index_rows = await conn.fetch(
            sql.SCOPED_KEY_INDEXES, oid, wanted, key["attcollation"], key["attnum"]
        )
        if index_rows:
            scan_columns = tuple(index_rows[0]["columns"])
        else:
            for c in scope:
                if not await conn.fetchval(sql.BTREE_ORDERABLE, c["atttypid"]):
                    raise TargetError(
                        f"--scope {c['attname']}: its type {c['full_type']} has no btree "
                        "ordering, so rows cannot be grouped by it; scope by other columns"
                    )
    else:
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
        pk_columns=pk_names,
        pk_types=tuple(_array_safe_type(c) for c in pks),
        keep=keep,
        scope=tuple(cfg.scope),
        scope_types=tuple(_array_safe_type(c) for c in scope),
        scope_attnums=tuple(c["attnum"] for c in scope),
        scan_columns=scan_columns,
        key_indexed=key_indexed,
        estimated_rows=_estimated_rows(table_row, partitions),
        scan_index=_scan_index(index_rows, None if scope else partitions),
        partitions=partitions,
        by_position=table_row["relkind"] == "r" and not table_row["has_children"],
    )


async def _scope_column(
    conn: Conn, name: str, columns: dict[str, Any], display: str, pk: tuple[str, ...]
) -> Any:
    """One --scope column, checked: it exists and compares by bytes."""
    column = columns.get(name)
    if column is None:
        raise TargetError(f"column {name!r} does not exist in {display}; check --scope")
    if not column["deterministic"]:
        raise TargetError(
            f"--scope {name}: the column uses a nondeterministic collation; equality there is "
            "not byte equality, which bulkdedupe relies on"
        )
    return column


async def _primary_key(
    conn: Conn, cfg: ConnectConfig, oid: int, display: str, columns: dict[str, Any]
) -> tuple[str, ...]:
    """--pk's columns, checked, or the table's primary key (any number of columns)."""
    asked = cfg.pk_columns
    if asked is None:
        pk_cols = await conn.fetchval(sql.PRIMARY_KEY_COLUMNS, oid)
        if not pk_cols:
            raise TargetError(
                f"{display} has no primary key; pass --pk COLUMN[,COLUMN...] naming not-null "
                "columns with a unique index"
            )
        return tuple(pk_cols)
    for name in asked:
        if name not in columns:
            raise TargetError(f"column {name!r} does not exist in {display}; check --pk")
    shown = ",".join(asked)
    if not all(columns[name]["attnotnull"] for name in asked) or not await conn.fetchval(
        sql.UNIQUE_INDEX_ON_COLUMNS, oid, [columns[name]["attnum"] for name in asked]
    ):
        what = "column" if len(asked) == 1 else "columns"
        raise TargetError(
            f"--pk {shown}: the {what} must be NOT NULL with a unique index on exactly "
            f"{'it' if len(asked) == 1 else 'them'}"
        )
    return asked


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


# --- partitioned tables ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Partition:
    """One member of a partitioned table's tree: the table itself (level 0), a partitioned
    partition (a sub-partitioned level) or a leaf, which holds the rows."""

    oid: int
    schema: str
    name: str
    relkind: str  # p: partitioned, r: a leaf, f: a foreign table
    parent: int | None
    level: int
    partition_columns: tuple[str, ...]  # of a partitioned member: what it partitions by
    partition_key: str | None  # pg_get_partkeydef: `HASH (transaction_id)`
    key_index: str | None  # of a leaf: a btree index on the key a scan can walk
    estimated_rows: int = 0  # of a leaf: the planner's estimate

    @property
    def qualified(self) -> str:
        return sql.qualify(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def partitioned(self) -> bool:
        return self.relkind == "p"


@dataclass(frozen=True)
class Partitioning:
    """A partitioned table's tree as the catalog has it now, parents before their partitions.

    The table is scanned and renamed through its root: the planner merges its partitions' key
    indexes in key order (a Merge Append of index scans), which only streams when every leaf
    has such an index; a rename whose key is a partition key moves its row (see README)."""

    members: tuple[Partition, ...]

    @property
    def root(self) -> Partition:
        return self.members[0]

    @property
    def leaves(self) -> tuple[Partition, ...]:
        return tuple(m for m in self.members if not m.partitioned)

    @property
    def levels(self) -> tuple[Partition, ...]:
        """The partitioned members: the root and every sub-partitioned partition."""
        return tuple(m for m in self.members if m.partitioned)

    def key_levels(self, column: str) -> tuple[Partition, ...]:
        """The levels that partition by `column` (plainly or in an expression)."""
        return tuple(m for m in self.levels if column in m.partition_columns)

    @property
    def estimated_rows(self) -> int:
        """The leaves' estimates: autovacuum never analyzes a partitioned table itself."""
        return sum(m.estimated_rows for m in self.leaves)

    def unindexed_leaves(self) -> tuple[Partition, ...]:
        return tuple(m for m in self.leaves if m.key_index is None)

    def children(self, oid: int) -> tuple[Partition, ...]:
        return tuple(m for m in self.members if m.parent == oid)


async def partitioning(conn: Conn, oid: int, key: str) -> Partitioning:
    rows = await conn.fetch(sql.PARTITION_TREE, oid, key)
    return Partitioning(
        tuple(
            Partition(
                oid=r["oid"],
                schema=r["schema"],
                name=r["name"],
                relkind=r["relkind"],
                parent=r["parent"],
                level=r["level"],
                partition_columns=tuple(r["partition_columns"]),
                partition_key=r["partition_key"],
                key_index=r["key_index"],
                estimated_rows=r["reltuples"],
            )
            for r in rows
        )
    )


def _estimated_rows(table_row: Any, partitions: Partitioning | None) -> int:
    # (reltuples of a partitioned table is -1 unless someone ANALYZEd it by hand)
    if partitions is not None:
        return partitions.estimated_rows
    return max(int(table_row["reltuples"]), 0)


def _scan_index(index_rows: list[Any], partitions: Partitioning | None) -> str | None:
    """The index the scan walks: the table's own; for a partitioned table without a valid one
    of its own, its leaves' (named as such), and none while a leaf has no key index at all.
    (With --scope, `partitions` is None: only the table's own (scope, key) index counts — on a
    partitioned table a valid one means every partition has its part of it.)"""
    if partitions is not None and partitions.unindexed_leaves():
        return None
    if index_rows:
        return str(index_rows[0]["index_name"])
    if partitions is not None:
        return f"the key indexes of {len(partitions.leaves)} partitions"
    return None


def partition_index_error(target: Target) -> TargetError:
    """A leaf without an index on the key: the parent's scan would have to sort that whole
    partition for every page (a Sort under the Merge Append). Names the statement to run."""
    assert target.partitions is not None
    if target.scope:
        cols = ", ".join(sql.quote_ident(c) for c in (*target.scope, target.key))
        return TargetError(
            f"{target.display} has no valid btree index on ({cols}) (leading columns, any "
            "order) to scan by --scope; on a partitioned table build it as enforce does: "
            f"CREATE INDEX ... ON ONLY {target.qualified} ({cols}), then CREATE INDEX "
            "CONCURRENTLY on each partition and ALTER INDEX ... ATTACH PARTITION each"
        )
    missing = target.partitions.unindexed_leaves()
    foreign = [m for m in missing if m.relkind == "f"]
    if foreign:
        return TargetError(
            f"partition {foreign[0].display} of {target.display} is a foreign table, which has "
            "no index bulkdedupe can scan; it handles partitioned tables whose partitions are "
            "all local"
        )
    if not missing:  # the partitioned table has no partitions yet: nothing can be missing
        return TargetError(f"{target.display} has no usable index on {target.key}")
    first = missing[0]
    others = ", ".join(m.display for m in missing[1:6])
    more = f"; the same for {others}{', ...' if len(missing) > 6 else ''}" if others else ""
    return TargetError(
        f"partition {first.display} of {target.display} has no btree index on {target.key}, "
        "so a scan through the parent would sort that whole partition on every page; create "
        f"one: {sql.create_index_concurrently_on(first.qualified, target.key)}{more} "
        "(--create-scan-index cannot: CREATE INDEX CONCURRENTLY does not work on a "
        "partitioned table)"
    )


def check_row_movement(target: Target, allowed: bool) -> None:
    """Refuse, unless --allow-row-movement, to rename a key that (partly) partitions the table:
    every rename would move its row to another partition."""
    levels = target.partitions.key_levels(target.key) if target.partitions else ()
    if not levels or allowed:
        return
    level = levels[0]
    of = (
        target.display if level.level == 0 else f"{level.display} (a partition of {target.display})"
    )
    raise TargetError(
        f"--key {target.key} is part of the partition key of {of}, {level.partition_key}: each "
        "rename moves its row to another partition (PostgreSQL deletes and re-inserts it), and "
        "an application transaction updating that row at the same moment fails with a "
        "serialization error; pass --allow-row-movement to proceed"
    )
