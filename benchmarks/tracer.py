"""Times every query the tool sends, from inside its own process, without changing the tool.

    python -m benchmarks.tracer OUT.json -- <bulkdedupe arguments>

Runs ``bulkdedupe`` in this process with asyncpg's query methods wrapped: ``Connection.execute``
without arguments (BEGIN, COMMIT, the pool's reset query on release) and ``Connection._execute``
(every prepared statement: fetch, fetchval, fetchrow, execute with arguments), each timed from
the call to its result, and a probe of the event loop's lag (a 10 ms sleep, how late it wakes).
When the tool exits, OUT.json gets every query as ``[connection, start, end, label]`` (seconds
from the start) and the lags. Kept apart from ``benchmarks.anatomy`` so that the traced process
imports nothing the tool does not (its RSS and start-up stay the tool's). About 2 µs a query.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import asyncpg

RESET_QUERY_MARK: Final = "pg_advisory_unlock_all"

# (label, test) in order: the first match names the query. The tool's SQL lives in
# bulkdedupe/sql.py; these are fragments of it that no other statement has, and that survive
# pg_stat_statements' normalization (its texts have every constant replaced by $n).
_CLASSES: Final[tuple[tuple[str, Callable[[str], bool]], ...]] = (
    ("reset", lambda q: RESET_QUERY_MARK in q),
    # the rest of that reset, as pg_stat_statements lists its statements one by one
    ("reset (rest)", lambda q: q in ("CLOSE ALL", "UNLISTEN *", "RESET ALL")),
    ("begin", lambda q: q.startswith("BEGIN")),
    ("commit", lambda q: q.startswith("COMMIT")),
    ("rollback", lambda q: q.startswith("ROLLBACK")),
    ("set_local", lambda q: q.startswith("SELECT set_config(") and q.count("set_config(") > 1),
    ("lock_chunk", lambda q: "WITH held AS MATERIALIZED" in q),  # heap order: groups + values
    ("lock_keys", lambda q: "pg_advisory_xact_lock(h)" in q),
    ("lock_keys", lambda q: "pg_advisory_xact_lock_shared(h)" in q),
    ("check_candidates", lambda q: "pg_try_advisory_xact_lock" in q),
    ("decide_losers", lambda q: "OVER w AS survivor" in q),
    ("read_entries", lambda q: "WITH ORDINALITY AS e(pk, g, s, i)" in q),
    ("apply_renames", lambda q: q.startswith("WITH v AS") and "UPDATE" in q),
    ("scan_page", lambda q: "HAVING count(*) > 1 OR" in q),
    ("scan_page_count", lambda q: q.startswith("SELECT count(*) FROM (") and "LIMIT $3" in q),
    ("count_key", lambda q: q.startswith("SELECT count(*) FROM") and q.endswith("= $1")),
    ("read_groups", lambda q: "= ANY($1::" in q and "ORDER BY" in q),
    ("one_statement", lambda q: q.startswith("UPDATE") and "row_number() OVER" in q),
)
WORKER_LABELS: Final = frozenset(
    {"begin", "commit", "rollback", "set_local", "lock_keys", "check_candidates"}
    | {"apply_renames", "read_groups", "lock_chunk", "decide_losers", "read_entries"}
)
SCAN_LABELS: Final = frozenset({"scan_page", "scan_page_count", "count_key"})


def classify(query: str | None) -> str:
    """A short name for one of the tool's (or the baseline's) statements; "other" otherwise."""
    q = (query or "").strip()
    for label, test in _CLASSES:
        if test(q):
            return label
    return "other"


class Trace:
    def __init__(self) -> None:
        self.events: list[tuple[int, float, float, str]] = []
        self.lags: list[float] = []
        self.conns: dict[int, int] = {}
        self.probe: asyncio.Task[None] | None = None

    def conn(self, obj: object) -> int:
        return self.conns.setdefault(id(obj), len(self.conns))

    def install(self) -> None:
        from asyncpg.connection import Connection

        clock, events = time.perf_counter, self.events
        execute, _execute = Connection.execute, getattr(Connection, "_execute")  # noqa: B009
        create_pool = asyncpg.create_pool

        async def timed_execute(con: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if args:  # goes through _execute, timed there
                return await execute(con, query, *args, **kwargs)
            t0 = clock()
            try:
                return await execute(con, query, **kwargs)
            finally:
                events.append((self.conn(con), t0, clock(), query))

        async def timed__execute(con: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return await _execute(con, query, *args, **kwargs)
            finally:
                events.append((self.conn(con), t0, clock(), query))

        async def lag_probe() -> None:
            while True:
                t0 = clock()
                await asyncio.sleep(0.01)
                self.lags.append(clock() - t0 - 0.01)

        def traced_create_pool(*args: Any, **kwargs: Any) -> Any:
            if self.probe is None:
                self.probe = asyncio.get_running_loop().create_task(lag_probe())
            return create_pool(*args, **kwargs)

        setattr(Connection, "execute", timed_execute)  # noqa: B010 - patching a class
        setattr(Connection, "_execute", timed__execute)  # noqa: B010
        setattr(asyncpg, "create_pool", traced_create_pool)  # noqa: B010


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[1] != "--":
        print("usage: python -m benchmarks.tracer OUT.json -- ARGS", file=sys.stderr)
        return 2
    from bulkdedupe.cli import main as tool_main

    trace = Trace()
    trace.install()
    origin_wall, origin = time.time(), time.perf_counter()
    code: int | str | None = 0
    try:
        tool_main(argv[2:], prog_name="bulkdedupe")
    except SystemExit as exc:
        code = exc.code
    finally:
        cpu = os.times()
        labelled = [(c, t0, t1, classify(q), q) for c, t0, t1, q in trace.events]
        Path(argv[0]).write_text(
            json.dumps(
                {
                    "origin_wall": origin_wall,
                    "events": [
                        [c, round(t0 - origin, 6), round(t1 - origin, 6), label]
                        for c, t0, t1, label, _ in labelled
                    ],
                    "other_queries": Counter(
                        q.strip()[:100] for *_, label, q in labelled if label == "other"
                    ).most_common(20),
                    "lags_ms": [round(x * 1000, 2) for x in trace.lags],
                    "cpu_user_s": cpu.user,
                    "cpu_system_s": cpu.system,
                }
            )
        )
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
