"""The target's own row-level UPDATE triggers, which every rename fires, and whether
--disable-triggers (replica mode in each batch) may and can safely switch them off. Read-only."""

from __future__ import annotations

from . import sql
from .catalog import Target
from .db import Conn
from .errors import PrivilegeError, TargetError
from .results import UpdateTrigger

ENABLED = {"O": "origin", "R": "replica", "A": "always"}  # pg_trigger.tgenabled, minus D


async def update_triggers(conn: Conn, target: Target) -> tuple[UpdateTrigger, ...]:
    """The table's enabled row-level UPDATE triggers (its partitions' too), by name."""
    rows = await conn.fetch(sql.UPDATE_TRIGGERS, target.oid)
    return tuple(
        UpdateTrigger(
            name=r["name"],
            relation=r["relation"],
            function=r["function"],
            timing=r["timing"],
            enabled=ENABLED[r["enabled"]],
            columns=tuple(r["columns"]),
            conditional=r["conditional"],
            on_key=not r["columns"] or target.key in r["columns"],
        )
        for r in rows
    )


async def check_may_disable(conn: Conn, target: Target) -> None:
    """Refuse --disable-triggers before anything changes: when the role may not set
    session_replication_role, or when a foreign key involves the key column (replica mode
    skips its check: a rename would leave rows referring to a value that no longer exists).

    Any other foreign key needs no check on a rename: one from the table on other columns is
    not re-checked when they do not change, one to the table's primary key is not either (the
    primary key never changes), and none can reference the key alone (that needs a unique
    index on it, which cannot exist while the key has duplicates)."""
    row = await conn.fetchrow(sql.REPLICATION_ROLE_ALLOWED)
    assert row is not None
    allowed = bool(row["superuser"])
    if not allowed and row["version_num"] >= 150000:
        allowed = bool(await conn.fetchval(sql.REPLICATION_ROLE_GRANTED))
    if not allowed:
        grant = f"GRANT SET ON PARAMETER session_replication_role TO {sql.quote_ident(row['role'])}"
        how = (
            f"as a superuser run: {grant}"
            if row["version_num"] >= 150000
            else "before PostgreSQL 15 only a superuser may"
        )
        raise PrivilegeError(
            f"--disable-triggers: role {row['role']} may not set session_replication_role "
            f"({how}); or leave --disable-triggers out and let the triggers fire"
        )
    fks = await conn.fetch(sql.FOREIGN_KEYS_ON_KEY, target.oid, target.key)
    if fks:
        fk = fks[0]
        raise TargetError(
            f"--disable-triggers: foreign key {fk['name']} of {fk['referencing']} "
            f"({fk['definition']}) involves {target.display}.{target.key}; replica mode skips "
            "its check, so renames would break it: leave --disable-triggers out"
        )
