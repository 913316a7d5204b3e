#!/usr/bin/env bash
# `make demo`: the whole bulkdedupe workflow on a generated payments table with duplicates.
#
#   DATABASE_URL  server to use; unset = embedded PostgreSQL in $PG_DATADIR (default .pgdata),
#                 left running afterwards (`make pg-stop` stops it)
#   DEMO_ROWS     rows to generate (default 300000)
#
# The generator only ever drops a `payments` table that it made itself, so pointing
# DATABASE_URL at a real database cannot destroy a real payments table.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The project's venv first, so the commands shown are the ones a user would type.
if [ -d .venv/bin ]; then
    PATH="$PWD/.venv/bin:$PATH"
fi
ROWS="${DEMO_ROWS:-300000}"
DATADIR="${PG_DATADIR:-.pgdata}"
PLAN_FILE="demo-plan.jsonl"

step() { printf '\n==> %s\n' "$*"; }

# Echo a command before running it, with any password in a DSN masked.
run() {
    printf '$ %s\n' "$*" | sed -E 's#(://[^:/@]*):[^@/]+@#\1:***@#g'
    "$@"
}

if [ -n "${DATABASE_URL:-}" ]; then
    DSN="$DATABASE_URL"
    step "using DATABASE_URL"
else
    step "starting embedded PostgreSQL in $DATADIR (stop it with: make pg-stop)"
    DSN="$(python -m benchmarks.pgserver start --datadir "$DATADIR")"
fi

step "generating a payments table: $ROWS rows, 5% duplicates, a few huge groups"
run python -m benchmarks.generate -d "$DSN" --rows "$ROWS" --drop

step "scan: report duplicate groups (exit 1 means duplicates were found)"
scan_rc=0
run bulkdedupe scan -d "$DSN" || scan_rc=$?
case "$scan_rc" in
    0) echo "(no duplicates found)" ;;
    1) echo "(exit 1: duplicates found, as expected)" ;;
    *) echo "scan failed with exit code $scan_rc" >&2; exit "$scan_rc" ;;
esac

step "dry run: write the rename plan to $PLAN_FILE without changing anything"
run bulkdedupe run -d "$DSN" --dry-run --output "$PLAN_FILE"
echo "($(wc -l <"$PLAN_FILE") lines in $PLAN_FILE; first one:)"
head -n 1 "$PLAN_FILE"

step "apply: rename duplicates online, in batches of 1000, 4 workers"
run bulkdedupe run -d "$DSN" --apply --batch-size 1000 --concurrency 4

step "verify: no duplicates left, the UNIQUE index can be built"
run bulkdedupe verify -d "$DSN"

step "enforce: build the UNIQUE index CONCURRENTLY (converging on late duplicates) and prove it"
run bulkdedupe enforce -d "$DSN"

step "a duplicate insert is now rejected by the database"
python - "$DSN" <<'PY'
import asyncio, sys

import asyncpg


async def main(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        key = await conn.fetchval(
            "SELECT transaction_id FROM payments WHERE transaction_id IS NOT NULL LIMIT 1"
        )
        print(f"INSERT INTO payments (transaction_id, ...) VALUES ({key!r}, ...)")
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO payments (transaction_id, amount, currency, status, created_at)"
                " VALUES ($1, 1, 'EUR', 'new', now())",
                key,
            )
        sys.exit("the duplicate was accepted: the unique index is missing")
    except asyncpg.UniqueViolationError as exc:
        print(f"rejected, as it should be: {exc}")
    finally:
        await conn.close()


asyncio.run(main(sys.argv[1]))
PY

step "done: the table is deduplicated and the UNIQUE index enforces it"
