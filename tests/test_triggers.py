"""The table's own triggers against real PostgreSQL: `scan` and the dry run list the row-level
UPDATE triggers every rename fires; `--disable-triggers` (replica mode in each batch) keeps them
silent for `run`, `enforce`'s dedupe and `undo` while every foreign key still holds; it is
refused before anything changes when the role may not set it or a foreign key involves the key.
And the giant groups a junk value makes are shown with their share of the table.

What fired is read from what the triggers wrote (an outbox table, updated_at), never from the
tool's own report."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from bulkdedupe import (
    EnforceConfig,
    PrivilegeError,
    RunConfig,
    TargetError,
    UndoConfig,
    enforce,
    run,
    scan,
    undo,
)
from bulkdedupe.results import LargeGroup
from tests.factories import SMALL, apply_cfg, connect, run_record, shuffled, state_schema_exists
from tests.faults_support import check_audit_of
from tests.helpers import (
    create_payments,
    dsn_as,
    execute,
    fetch,
    fetch_keys,
    fetchval,
    run_cli,
    table_checksum,
)

pytestmark = pytest.mark.anyio

# 40 groups of 3 (80 renames) and 20 singles.
ROWS = [(f"tx-{i % 40}",) for i in range(120)] + [(f"solo-{i}",) for i in range(20)]
RENAMES = 80
ROLE_PASSWORD = "no-Replica-r0le-pw"

# A parent the payments refer to, a child referring to the payments' primary key, an
# updated_at trigger and an outbox trigger emitting one event per changed key.
SCHEMA = [
    "CREATE TABLE customers (id bigint PRIMARY KEY)",
    "INSERT INTO customers SELECT g FROM generate_series(1, 5) g",
    "ALTER TABLE payments ADD COLUMN customer_id bigint REFERENCES customers (id)",
    "ALTER TABLE payments ADD COLUMN updated_at timestamptz NOT NULL DEFAULT '2000-01-01'",
    "UPDATE payments SET customer_id = 1 + id % 5",
    """CREATE TABLE refunds (
        id bigserial PRIMARY KEY,
        payment_id bigint NOT NULL REFERENCES payments (id))""",
    "INSERT INTO refunds (payment_id) SELECT id FROM payments WHERE id % 3 = 0",
    """CREATE TABLE outbox (
        id bigserial PRIMARY KEY, payment_id bigint NOT NULL, old_value text, new_value text)""",
    """CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$""",
    """CREATE FUNCTION emit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO outbox (payment_id, old_value, new_value)
        VALUES (NEW.id, OLD.transaction_id, NEW.transaction_id);
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER payments_touch BEFORE UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION touch()",
    "CREATE TRIGGER payments_outbox AFTER UPDATE OF transaction_id ON payments "
    "FOR EACH ROW EXECUTE FUNCTION emit()",
]

# Every way a foreign key could be broken by a rename: none may be.
ORPHANS = """
SELECT (SELECT count(*) FROM payments p WHERE p.customer_id IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = p.customer_id))
     + (SELECT count(*) FROM refunds r
          WHERE NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = r.payment_id))
"""


async def _payments(dsn: str) -> dict[int, str | None]:
    await create_payments(dsn, rows=ROWS)
    await execute(dsn, *SCHEMA)
    return await fetch_keys(dsn)


async def _outbox(dsn: str) -> int:
    return int(await fetchval(dsn, "SELECT count(*) FROM outbox"))


async def _touched(dsn: str) -> int:
    return int(await fetchval(dsn, "SELECT count(*) FROM payments WHERE updated_at > '2001-01-01'"))


async def _foreign_keys_hold(dsn: str) -> None:
    assert await fetchval(dsn, ORPHANS) == 0
    # replica mode was the batches' own: the foreign keys are checked for everyone else
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await execute(dsn, "INSERT INTO refunds (payment_id) VALUES (-1)")
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await execute(dsn, "UPDATE payments SET customer_id = 99 WHERE id = 1")


# --- the triggers made visible -----------------------------------------------------------------


async def test_scan_and_dry_run_list_the_update_triggers_that_fire_per_rename(dsn: str) -> None:
    await _payments(dsn)
    await execute(
        dsn,
        # listed, with when they fire
        "CREATE TRIGGER payments_always AFTER UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION emit()",
        "ALTER TABLE payments ENABLE ALWAYS TRIGGER payments_always",
        "CREATE TRIGGER payments_replica AFTER UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION emit()",
        "ALTER TABLE payments ENABLE REPLICA TRIGGER payments_replica",
        "CREATE TRIGGER payments_status AFTER UPDATE OF status ON payments "
        "FOR EACH ROW EXECUTE FUNCTION emit()",
        # not listed: disabled, statement-level, not on UPDATE
        "CREATE TRIGGER payments_off AFTER UPDATE ON payments FOR EACH ROW EXECUTE FUNCTION emit()",
        "ALTER TABLE payments DISABLE TRIGGER payments_off",
        "CREATE TRIGGER payments_stmt AFTER UPDATE ON payments "
        "FOR EACH STATEMENT EXECUTE FUNCTION emit()",
        "CREATE TRIGGER payments_insert BEFORE INSERT ON payments "
        "FOR EACH ROW EXECUTE FUNCTION touch()",
    )
    before = await table_checksum(dsn)
    # name -> (fires, fires with --disable-triggers)
    expected = {
        "payments_always": (True, True),
        "payments_outbox": (True, False),
        "payments_replica": (False, True),
        "payments_status": (False, False),  # UPDATE OF status: a rename does not fire it
        "payments_touch": (True, False),
    }

    report = await scan(connect(dsn))
    got = {t.name: (t.fires, t.fires_with_disable_triggers) for t in report.update_triggers}
    assert got == expected
    touch = next(t for t in report.update_triggers if t.name == "payments_touch")
    assert (touch.timing, touch.function, touch.enabled) == ("BEFORE", "touch", "origin")
    status = next(t for t in report.update_triggers if t.name == "payments_status")
    assert status.columns == ("status",)

    as_json = json.loads(
        run_cli("scan", "--format", "json", "-d", dsn).stdout
    )  # exit 1: duplicates
    assert {
        t["name"]: (t["fires"], t["fires_with_disable_triggers"])
        for t in as_json["update_triggers"]
    } == expected
    assert as_json["update_triggers_firing"] == 3
    text = run_cli("scan", "-d", dsn).stdout
    assert f"3 fire once per renamed row ({RENAMES} rows to rename)" in text
    assert "payments_outbox (AFTER emit, UPDATE OF transaction_id): fires" in text
    assert "payments_status (AFTER emit, UPDATE OF status): does not fire" in text
    for hidden in ("payments_off", "payments_stmt", "payments_insert"):
        assert hidden not in text

    dry = json.loads(run_cli("run", "--format", "json", "-d", dsn).stdout)
    assert dry["mode"] == "dry-run"
    assert dry["disable_triggers"] is False
    assert dry["update_triggers_firing"] == 3
    assert {t["name"] for t in dry["update_triggers"]} == set(expected)
    dry_off = run_cli("run", "--disable-triggers", "-d", dsn)
    assert dry_off.returncode == 0, dry_off.stderr
    assert "disabled (session_replication_role = replica)" in dry_off.stdout
    assert "2 fire once per renamed row" in dry_off.stdout  # ALWAYS and REPLICA ones
    assert "payments_touch (BEFORE touch): off: --disable-triggers" in dry_off.stdout
    assert await table_checksum(dsn) == before
    assert await _outbox(dsn) == 0
    assert not await state_schema_exists(dsn)


async def test_without_the_flag_each_trigger_fires_once_per_renamed_row(dsn: str) -> None:
    baseline = await _payments(dsn)
    summary = await run(connect(dsn), apply_cfg())
    assert summary.status == "completed"
    assert summary.rows_renamed == RENAMES
    assert await _outbox(dsn) == RENAMES
    events = await fetch(dsn, "SELECT payment_id, old_value, new_value FROM outbox")
    renamed = {pk: (baseline[pk], key) for pk, key in (await fetch_keys(dsn)).items()}
    assert {r["payment_id"]: (r["old_value"], r["new_value"]) for r in events} == {
        pk: v for pk, v in renamed.items() if v[0] != v[1]
    }
    assert await _touched(dsn) == RENAMES
    await _foreign_keys_hold(dsn)
    assert await check_audit_of(dsn, baseline) == RENAMES


# --- --disable-triggers --------------------------------------------------------------------


async def test_disable_triggers_silences_them_and_every_foreign_key_still_holds(dsn: str) -> None:
    """Replica mode switches the foreign keys' own triggers off too: none is needed. payments
    -> customers is not re-checked since customer_id does not change, refunds -> payments(id)
    since the primary key never changes, and nothing can reference the key (it has no unique
    index while it has duplicates)."""
    baseline = await _payments(dsn)
    result = run_cli(
        "run", "--apply", "--disable-triggers", "--batch-size", "10", "--format", "json", "-d", dsn
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert summary["rows_renamed"] == RENAMES
    assert summary["disable_triggers"] is True
    assert summary["update_triggers_firing"] == 0
    assert await _outbox(dsn) == 0
    assert await _touched(dsn) == 0
    await _foreign_keys_hold(dsn)
    assert await check_audit_of(dsn, baseline) == RENAMES
    assert json.loads((await run_record(dsn, summary["run_id"]))["options"])["disable_triggers"]
    # and for everyone else the triggers are as they were
    await execute(dsn, "UPDATE payments SET transaction_id = 'by-the-app' WHERE id = 1")
    assert await _outbox(dsn) == 1


async def test_undo_with_disable_triggers_restores_silently(dsn: str) -> None:
    baseline = await _payments(dsn)
    before = await table_checksum(dsn)
    applied = await run(connect(dsn), apply_cfg(disable_triggers=True))
    assert applied.rows_renamed == RENAMES
    undone = await undo(
        connect(dsn), UndoConfig(run_id=applied.run_id, apply=True, disable_triggers=True)
    )
    assert undone.restored == RENAMES
    assert await fetch_keys(dsn) == baseline
    assert await table_checksum(dsn) == before  # updated_at untouched: touch() never ran
    assert await _outbox(dsn) == 0
    await _foreign_keys_hold(dsn)
    assert undone.run_id is not None
    assert json.loads((await run_record(dsn, undone.run_id))["options"])["disable_triggers"]


async def test_enforce_renames_late_duplicates_with_disable_triggers(dsn: str) -> None:
    await _payments(dsn)
    result = await enforce(
        connect(dsn), EnforceConfig(dedupe=RunConfig(apply=True, disable_triggers=True))
    )
    assert result.ok
    assert sum(a.rows_renamed for a in result.attempts) == RENAMES
    assert await _outbox(dsn) == 0
    await _foreign_keys_hold(dsn)


async def test_a_resume_keeps_disable_triggers(dsn: str) -> None:
    """Started with --disable-triggers, resumed without it (as the printed retry command does):
    the resume's renames stay silent too."""
    baseline = await _payments(dsn)
    # fires in replica mode too, and refuses one group: the run ends incomplete
    await execute(
        dsn,
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.transaction_id = 'tx-7' THEN RAISE EXCEPTION 'not yet'; END IF;
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER payments_refuse BEFORE UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION refuse()",
        "ALTER TABLE payments ENABLE ALWAYS TRIGGER payments_refuse",
    )
    first = await run(
        connect(dsn), apply_cfg(run_id="keeps-it", disable_triggers=True, max_retries=0)
    )
    assert first.status == "incomplete"
    assert first.rows_renamed == RENAMES - 2
    assert "--disable-triggers" not in (first.retry_command or "")
    await execute(dsn, "DROP TRIGGER payments_refuse ON payments")

    resumed = await run(connect(dsn), apply_cfg(run_id="keeps-it"))
    assert resumed.status == "completed"
    assert resumed.disable_triggers is True
    assert await _outbox(dsn) == 0
    assert await check_audit_of(dsn, baseline) == RENAMES


async def test_a_resume_may_add_disable_triggers_and_keeps_it_after(dsn: str) -> None:
    await _payments(dsn)
    await execute(
        dsn,
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.transaction_id IN ('tx-7', 'tx-8') THEN RAISE EXCEPTION 'not yet'; END IF;
            RETURN NEW;
        END $$""",
        "CREATE TRIGGER payments_refuse BEFORE UPDATE ON payments "
        "FOR EACH ROW EXECUTE FUNCTION refuse()",
        "ALTER TABLE payments ENABLE ALWAYS TRIGGER payments_refuse",
    )
    first = await run(connect(dsn), apply_cfg(run_id="adds-it", max_retries=0))
    assert first.status == "incomplete"
    assert await _outbox(dsn) == RENAMES - 4
    await execute(
        dsn,
        """CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF OLD.transaction_id = 'tx-8' THEN RAISE EXCEPTION 'not yet'; END IF;
            RETURN NEW;
        END $$""",
    )
    second = await run(
        connect(dsn), apply_cfg(run_id="adds-it", disable_triggers=True, max_retries=0)
    )
    assert second.status == "incomplete"
    record = await run_record(dsn, "adds-it")
    assert json.loads(record["options"])["disable_triggers"] is True
    await execute(dsn, "DROP TRIGGER payments_refuse ON payments")
    third = await run(connect(dsn), apply_cfg(run_id="adds-it"))
    assert third.status == "completed"
    assert third.disable_triggers is True
    assert await _outbox(dsn) == RENAMES - 4  # tx-7 and tx-8 renamed silently


# --- refused before anything changes ---------------------------------------------------------


def _one_error_line(result: Any, code: int, *fragments: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bulkdedupe: error: --disable-triggers: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


async def test_a_role_that_may_not_set_it_is_refused_before_any_change(dsn: str) -> None:
    await _payments(dsn)
    version = int(await fetchval(dsn, "SELECT current_setting('server_version_num')::int"))
    role = f"no_replica_{uuid.uuid4().hex[:8]}"
    await execute(
        dsn,
        f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{ROLE_PASSWORD}'",
        f'GRANT SELECT, UPDATE (transaction_id) ON payments TO "{role}"',
    )
    granted = False
    try:
        before = await table_checksum(dsn)
        as_role = dsn_as(dsn, role, ROLE_PASSWORD)
        hint = (
            f'GRANT SET ON PARAMETER session_replication_role TO "{role}"'
            if version >= 150000
            else "only a superuser may"
        )
        for args in (["run", "--apply"], ["run"]):  # the dry run says so too
            result = run_cli(*args, "--disable-triggers", "-d", as_role)
            _one_error_line(result, 3, f"role {role} may not set session_replication_role", hint)
        assert await table_checksum(dsn) == before
        assert not await state_schema_exists(dsn)
        assert await _outbox(dsn) == 0
        with pytest.raises(PrivilegeError):
            await run(connect(as_role), apply_cfg(disable_triggers=True))
        if version < 150000:
            return
        # the GRANT is what it takes
        await execute(dsn, f'GRANT SET ON PARAMETER session_replication_role TO "{role}"')
        granted = True
        result = run_cli("run", "--disable-triggers", "--format", "json", "-d", as_role)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["rows_renamed"] == RENAMES
    finally:
        # roles are cluster-wide: leave none behind, granted or not, whatever failed above
        cleanup = [f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"']
        if granted:
            cleanup.insert(0, f'REVOKE SET ON PARAMETER session_replication_role FROM "{role}"')
        await execute(dsn, *cleanup)


async def test_a_foreign_key_on_the_key_column_is_refused(dsn: str) -> None:
    """The one case replica mode would break: a foreign key whose columns include the key
    (from the table, or to it through a unique key of several columns). Without the flag, the
    key's foreign key checks each rename as usual."""
    await create_payments(dsn, rows=ROWS)
    await execute(
        dsn,
        "CREATE TABLE provider_tx (id varchar(64) PRIMARY KEY)",
        "INSERT INTO provider_tx SELECT DISTINCT transaction_id FROM payments",
        "ALTER TABLE payments ADD CONSTRAINT payments_provider_fk "
        "FOREIGN KEY (transaction_id) REFERENCES provider_tx (id)",
    )
    before = await table_checksum(dsn)
    result = run_cli("run", "--apply", "--disable-triggers", "-d", dsn)
    _one_error_line(result, 3, "foreign key payments_provider_fk of payments", "leave --disable")
    assert await table_checksum(dsn) == before
    assert not await state_schema_exists(dsn)

    await execute(
        dsn,
        "ALTER TABLE payments DROP CONSTRAINT payments_provider_fk",
        "ALTER TABLE payments ADD CONSTRAINT payments_tx_id_key UNIQUE (transaction_id, id)",
        """CREATE TABLE receipts (tx varchar(64), payment_id bigint,
            FOREIGN KEY (tx, payment_id) REFERENCES payments (transaction_id, id))""",
    )
    result = run_cli("run", "--apply", "--disable-triggers", "-d", dsn)
    _one_error_line(result, 3, "of receipts", "involves public.payments.transaction_id")
    with pytest.raises(TargetError, match="receipts"):
        await enforce(
            connect(dsn), EnforceConfig(dedupe=RunConfig(disable_triggers=True, apply=True))
        )
    assert await table_checksum(dsn) == before
    assert not await state_schema_exists(dsn)


# --- giant groups ----------------------------------------------------------------------------


def test_what_counts_as_a_giant_group() -> None:
    assert LargeGroup(value="", rows=10_000, share=0.0001).giant  # big, whatever the table
    assert LargeGroup(value="N/A", rows=150, share=0.02).giant  # 2 % of the table
    assert not LargeGroup(value="tx", rows=2, share=0.25).giant  # a pair in a tiny table
    assert not LargeGroup(value="tx", rows=99, share=0.5).giant
    assert not LargeGroup(value="tx", rows=5_000, share=0.001).giant
    hint = LargeGroup(value=" " * 12, rows=300, share=0.3).hint
    assert hint == (
        "<12 blanks> holds 300 rows (30.0% of the table): a junk value ('' / 'N/A' / blank "
        "char(n)) is the likely cause; its 299 rows will be renamed chunk by chunk"
    )


async def test_scan_and_dry_run_show_a_junk_value_with_its_share_of_the_table(dsn: str) -> None:
    # a blank char(12) in 300 of 1,000 rows, 50 pairs, 600 singles
    layout: dict[str | None, int] = {"": 300}
    layout |= {f"pair-{i}": 2 for i in range(50)}
    layout |= {f"single-{i}": 1 for i in range(600)}
    await create_payments(dsn, rows=shuffled(layout, seed=3), key_type="char(12)")

    report = await scan(connect(dsn), SMALL)
    giant = report.large_groups[0]
    assert (giant.value, giant.rows, giant.share, giant.giant) == (" " * 12, 300, 0.3, True)
    assert not any(g.giant for g in report.large_groups[1:])
    as_json = report.to_json()
    assert as_json["table_rows"] == 1000
    assert as_json["largest_groups"][0]["share"] == 0.3
    assert "junk value" in as_json["largest_groups"][0]["hint"]
    assert as_json["largest_groups"][1]["hint"] is None
    text = run_cli("scan", "--top", "3", "-d", dsn).stdout
    assert "       300   30.00%  <12 blanks>  <- giant" in text
    assert "hint: <12 blanks> holds 300 rows (30.0% of the table)" in text
    assert "its 299 rows will be renamed chunk by chunk" in text

    dry = await run(connect(dsn), RunConfig(scan=SMALL))
    assert dry.rows_renamed == 299 + 50
    assert dry.large_groups[0].giant
    assert dry.to_json()["largest_groups"][0] == {
        "value": " " * 12,
        "rows": 300,
        "share": 0.3,
        "giant": True,
        "hint": giant.hint,
    }
    assert "hint: <12 blanks> holds 300 rows" in dry.to_text()
    assert "largest groups (rows, share of the table)" in dry.to_text()
