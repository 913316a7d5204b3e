"""Configuration: frozen, keyword-only dataclasses with their defaults, and the parsing of
identifiers, orderings, templates and durations given on the command line."""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_plus, urlsplit

from .errors import UnsafeIdentifierError, UsageError

DEFAULT_TABLE = "payments"
DEFAULT_KEY = "transaction_id"
DEFAULT_STATE_SCHEMA = "bulkdedupe"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_BATCH_SIZE = 1000
DEFAULT_CONCURRENCY = 4
DEFAULT_CONCURRENCY_WHILE_SCANNING = 1
DEFAULT_TARGET_BATCH_TIME = 0.25
DEFAULT_MIN_BATCH_SIZE = 10
ORDERS = ("heap", "key")
DEFAULT_ORDER = "heap"
SYNCHRONOUS_COMMIT_CHOICES = ("off", "server")
DEFAULT_SYNCHRONOUS_COMMIT = "server"
DEFAULT_TEMPLATE = "{value}-{pk}"
DEFAULT_LOCK_TIMEOUT = 2.0
DEFAULT_STATEMENT_TIMEOUT = 30.0
DEFAULT_SCAN_PAGE_SIZE = 20_000
DEFAULT_SCANNERS = 2
DEFAULT_MAX_RETRIES = 5
DEFAULT_WAL_COMPRESSION = "auto"
WAL_COMPRESSION_CHOICES = ("auto", "server", "lz4", "zstd", "pglz")
DEFAULT_TOP = 10
APPLICATION_NAME = "bulkdedupe"

_PLAIN_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_MAX_IDENT_BYTES = 63
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


@dataclass(frozen=True, slots=True)
class Name:
    """A schema-qualified relation name as stored in the catalog (already case-folded)."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


def _parse_parts(text: str, what: str) -> list[str]:
    """Split `text` into identifier parts, PostgreSQL style: unquoted parts fold to lower case,
    double-quoted parts keep their case and may contain dots or doubled quotes."""
    parts: list[str] = []
    i = 0
    n = len(text)
    while True:
        if i < n and text[i] == '"':
            j = i + 1
            buf: list[str] = []
            while True:
                if j >= n:
                    raise UnsafeIdentifierError(f"{what} {text!r}: unterminated double quote")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part = "".join(buf)
            i = j + 1
        else:
            m = _PLAIN_IDENT.match(text, i)
            if not m:
                raise UnsafeIdentifierError(
                    f"{what} {text!r} is not a plain identifier; use letters, digits and _ "
                    'or double-quote it ("Mixed Case")'
                )
            part = m.group(0).lower()
            i = m.end()
        if not part or "\x00" in part or len(part.encode()) > _MAX_IDENT_BYTES:
            raise UnsafeIdentifierError(f"{what} {text!r}: identifier is empty or too long")
        parts.append(part)
        if i == n:
            return parts
        if text[i] != ".":
            raise UnsafeIdentifierError(
                f"{what} {text!r} is not a plain identifier; use letters, digits and _ "
                'or double-quote it ("Mixed Case")'
            )
        i += 1


def parse_table(text: str) -> Name:
    """`payments`, `billing.payments`, `"Billing"."Payments"` -> Name."""
    parts = _parse_parts(text.strip(), "--table")
    if len(parts) == 1:
        return Name(None, parts[0])
    if len(parts) == 2:
        return Name(parts[0], parts[1])
    raise UnsafeIdentifierError(f"--table {text!r}: expected TABLE or SCHEMA.TABLE")


def parse_column(text: str, what: str) -> str:
    parts = _parse_parts(text.strip(), what)
    if len(parts) != 1:
        raise UnsafeIdentifierError(f"{what} {text!r}: expected a single column name")
    return parts[0]


def parse_columns(text: str, what: str) -> tuple[str, ...]:
    """`id`, `id, merchant_id`, `"Id",region` -> the column names as stored, in order. Commas
    inside double quotes belong to the name."""
    items: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    items.append("".join(buf))
    names = tuple(parse_column(item, what) for item in items)
    if len(set(names)) != len(names):
        raise UsageError(f"{what} {text!r}: a column is named twice")
    return names


# Role specifications GRANT treats as key words, and the reserved pg_ prefix: never a role to
# hand bulkdedupe's privileges to.
_NOT_A_ROLE = frozenset({"public", "none", "current_user", "current_role", "session_user"})


def parse_role(text: str) -> str:
    """`--role app_dedupe` (or `"App"`) -> the role name as stored in the catalog."""
    role = parse_column(text, "--role")
    if role in _NOT_A_ROLE or role.startswith("pg_"):
        raise UsageError(f"--role {text!r}: name the login role bulkdedupe runs as, not {role}")
    return role


@dataclass(frozen=True, slots=True)
class OrderItem:
    """One column of the `--keep` order. NULLs sort last in either direction unless
    `nulls_first`: PostgreSQL's default for DESC (NULLS FIRST) would make a row without a
    value the survivor of `--keep "created_at desc"`."""

    column: str
    descending: bool = False
    nulls_first: bool = False


_KEEP_ITEM = re.compile(r"(.+?)(?:\s+(asc|desc))?(?:\s+nulls\s+(first|last))?", re.IGNORECASE)


def parse_keep(text: str) -> tuple[OrderItem, ...]:
    """`"created_at, id"`, `"created_at desc, id"` or `"created_at desc nulls first, id"` ->
    order items (asc, nulls last by default)."""
    items: list[OrderItem] = []
    for raw in text.split(","):
        words = raw.strip()
        if not words:
            raise UsageError(f"--keep {text!r}: empty column in the list")
        m = _KEEP_ITEM.fullmatch(words)
        assert m is not None  # the pattern matches any non-empty string
        try:
            column = parse_column(m.group(1), "--keep")
        except UnsafeIdentifierError:
            raise UnsafeIdentifierError(
                f"--keep {text!r}: expected COLUMN [asc|desc] [nulls first|last] for each "
                f'item, got {words!r}; double-quote a column name that is not plain ("Paid At")'
            ) from None
        direction, nulls = (m.group(2) or "asc").lower(), (m.group(3) or "last").lower()
        items.append(OrderItem(column, direction == "desc", nulls_first=nulls == "first"))
    return tuple(items)


def validate_template(template: str) -> str:
    """The template must contain {pk} (so rows of one group get distinct values) and may
    contain {value}; nothing else."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"--template {template!r}: {exc}") from None
    unknown = sorted({f for f in fields if f not in ("value", "pk")})
    if unknown:
        raise UsageError(
            f"--template {template!r}: unknown field(s) {', '.join(unknown)}; "
            "use {value} and {pk}"
        )
    if "pk" not in fields:
        raise UsageError(f"--template {template!r} must contain {{pk}} so new values are unique")
    return template


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|min|m|h)?\s*", re.IGNORECASE)
_UNIT = {None: 1.0, "ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, what: str) -> float:
    """`500ms`, `2s`, `1.5`, `1min` -> seconds (> 0)."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise UsageError(f"{what} {text!r}: expected a duration such as 500ms, 2s or 1min")
    seconds = float(m.group(1)) * _UNIT[m.group(2).lower() if m.group(2) else None]
    if seconds <= 0:
        raise UsageError(f"{what} {text!r}: must be greater than zero")
    return seconds


# libpq's variables that say where to connect; any of them makes -d optional.
LIBPQ_TARGET_ENV = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
_ENV_SHOWN = (
    ("service", "PGSERVICE"),
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("dbname", "PGDATABASE"),
)  # never PGPASSWORD
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):(?P<secret>[^@/]*)@")
_URL_USERINFO_GREEDY = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*):(?P<secret>[^?]*)@"
)
_KEYWORD_SECRET = re.compile(
    r"(?P<head>\b(?:password|sslpassword)\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'?|\S*)", re.I
)


def libpq_env_configured() -> bool:
    """Whether libpq's environment names a server (so an empty database URL is meaningful)."""
    return any(os.environ.get(v) for v in LIBPQ_TARGET_ENV)


def describe_libpq_env() -> str:
    """Where a connection that takes everything from the environment goes; no password."""
    shown = [f"{k}={os.environ[v]}" for k, v in _ENV_SHOWN if os.environ.get(v)]
    return f"libpq environment ({' '.join(shown) or 'defaults'})"


def redact_dsn(dsn: str) -> str:
    """The URL with its password replaced, safe to print and store. An empty URL (everything
    from libpq's environment) is described by the PG* variables it uses, never PGPASSWORD."""
    if not dsn.strip():
        return describe_libpq_env()
    if "://" not in dsn:
        # Not a URL (key=value conninfo, or garbage): mask anything that looks like a password.
        return _KEYWORD_SECRET.sub(r"\g<head>***", dsn)
    # libpq ends the user info at the first '@' or '/', urllib at the last '@' of the authority
    # and at '?' or '#': a password with unescaped specials is masked whichever way it is read.
    dsn = _URL_USERINFO.sub(r"\g<head>:***@", dsn, count=1)
    dsn = _URL_USERINFO_GREEDY.sub(r"\g<head>:***@", dsn, count=1)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable database url>"
    # By string, not by .hostname/.port: those raise on multi-host URLs (h1:5432,h2:5433),
    # which libpq and asyncpg accept.
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:***@{hosts}" if at and ":" in userinfo else None
    # libpq also takes the password as a query parameter.
    items = parts.query.split("&") if parts.query else []
    redacted = [
        f"{k}=***" if (k := unquote_plus(i.partition("=")[0])) in _SECRET_PARAMS else i
        for i in items
    ]
    if netloc is None and redacted == items:
        return dsn
    # Not urlunsplit: it drops the empty authority of postgresql:///db?host=/socket.
    out = f"{parts.scheme}://{netloc or parts.netloc}{parts.path}"
    out += f"?{'&'.join(redacted)}" if redacted else ""
    return out + (f"#{parts.fragment}" if parts.fragment else "")


@dataclass(frozen=True, kw_only=True)
class ConnectConfig:
    """How to reach the database and which table/key to work on."""

    database_url: str
    table: Name = field(default_factory=lambda: Name(None, DEFAULT_TABLE))
    key: str = DEFAULT_KEY
    # the column(s) identifying a row (--pk a,b); a single name may be given as a string
    pk: str | tuple[str, ...] | None = None
    # --scope: the columns that, with the key, must be unique (groups: rows equal on all of them)
    scope: tuple[str, ...] = ()
    state_schema: str = DEFAULT_STATE_SCHEMA
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0:
            raise UsageError("--connect-timeout must be greater than zero")
        if isinstance(self.pk, tuple) and not self.pk:
            raise UsageError("--pk: name at least one column")
        if self.key in self.scope:
            raise UsageError(
                f"--scope {','.join(self.scope)}: names the key {self.key} itself; the scope "
                "is the other columns that, with --key, must be unique"
            )

    @property
    def pk_columns(self) -> tuple[str, ...] | None:
        """--pk as a tuple of column names (None: the table's primary key)."""
        if self.pk is None:
            return None
        return (self.pk,) if isinstance(self.pk, str) else self.pk

    def __repr__(self) -> str:  # never show the password, not even in a debug log
        return (
            f"ConnectConfig(database_url={redact_dsn(self.database_url)!r}, table={self.table}, "
            f"key={self.key!r}, pk={self.pk!r}, scope={self.scope!r}, "
            f"state_schema={self.state_schema!r})"
        )


@dataclass(frozen=True, kw_only=True)
class ScanConfig:
    """Read-only scan/verify options."""

    top: int = DEFAULT_TOP
    page_size: int = DEFAULT_SCAN_PAGE_SIZE
    scanners: int = DEFAULT_SCANNERS
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT

    def __post_init__(self) -> None:
        if self.top < 0:
            raise UsageError("--top must be 0 or more")
        if self.page_size < 1:
            raise UsageError("--scan-page-size must be at least 1")
        if self.scanners < 1:
            raise UsageError("--scanners must be at least 1")


MAX_CONCURRENCY = 64  # worker connections: the hard cap, also for `set --concurrency`


# --- the impact governor (governor.py) -------------------------------------------------------

# The application's p99 may grow to 3x its own, no more (the pgbench frontier in benchmarks/
# and the README: at 3 the governor ran at 90 % of the fastest fixed pace that kept within it).
DEFAULT_MAX_IMPACT: float | None = 3.0
# The default of --max-impact for this environment: "off" or a ratio. The test suite sets it to
# "off" so that only the tests of the governor wait for a baseline.
MAX_IMPACT_ENV = "BULKDEDUPE_MAX_IMPACT"
DEFAULT_IMPACT_BASELINE = 3.0  # seconds of probes before the first rename
DEFAULT_IMPACT_REMEASURE = 60.0  # a planned pause to re-measure the baseline this often
DEFAULT_IMPACT_REMEASURE_FOR = 1.0
DEFAULT_PROBE_INTERVAL = 0.05  # 20 tiny commits a second


def parse_max_impact(text: str, what: str = "--max-impact") -> float | None:
    """`off` -> None; else a ratio greater than 1 (p99 may grow to RATIO x its baseline)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        ratio = float(text)
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected a ratio such as 3 or 1.5, or off") from None
    if not ratio > 1.0 or ratio != ratio or ratio == float("inf"):
        raise UsageError(f"{what} {text}: must be a ratio greater than 1 (or off)")
    return ratio


def default_max_impact() -> float | None:
    raw = os.environ.get(MAX_IMPACT_ENV)
    return DEFAULT_MAX_IMPACT if raw is None else parse_max_impact(raw, MAX_IMPACT_ENV)


@dataclass(frozen=True, kw_only=True)
class ImpactConfig:
    """How the governor paces a run: `max_impact` None = off (full speed)."""

    max_impact: float | None = field(default_factory=default_max_impact)
    baseline: float = DEFAULT_IMPACT_BASELINE
    remeasure_every: float | None = DEFAULT_IMPACT_REMEASURE  # None: never
    remeasure_for: float = DEFAULT_IMPACT_REMEASURE_FOR
    probe_interval: float = DEFAULT_PROBE_INTERVAL

    def __post_init__(self) -> None:
        if self.max_impact is not None and not self.max_impact > 1.0:
            raise UsageError(f"--max-impact {self.max_impact}: must be greater than 1 (or off)")
        if self.baseline <= 0 or self.remeasure_for <= 0 or self.probe_interval <= 0:
            raise UsageError("--impact-baseline must be greater than zero")
        if self.remeasure_every is not None and self.remeasure_every <= 0:
            raise UsageError("--impact-remeasure must be greater than zero (or off)")


@dataclass(frozen=True, kw_only=True)
class ThrottleConfig:
    """Guardrails of `run`, all off by default. Limits are "more than": the run pauses while a
    signal exceeds its limit and goes on when it no longer does (see throttle.decide)."""

    max_rate: float | None = None  # renamed rows per second, all workers together
    sleep: float = 0.0  # seconds each worker waits between two of its batches
    max_replication_lag: float | None = None  # seconds
    replica_urls: tuple[str, ...] = ()  # ask these standbys for their lag (else the primary)
    max_lock_waiters: int | None = None  # sessions waiting on locks on the table
    max_active_backends: int | None = None  # active client backends, ours excluded
    max_wal_rate: float | None = None  # MiB of WAL per second (also: archiver backlog)
    pause_during_autovacuum: bool = False
    throttle_query: str | None = None  # pause while it returns true
    critical_active_backends: int | None = None  # stop (resumable) instead of pausing
    max_runtime: float | None = None  # seconds, then stop (resumable)

    def __post_init__(self) -> None:
        for name in ("max_rate", "max_replication_lag", "max_wal_rate", "max_runtime"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be greater than zero")
        for name in ("max_lock_waiters", "max_active_backends", "critical_active_backends"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be 0 or more")
        if self.sleep < 0:
            raise UsageError(f"--sleep {self.sleep}: must be 0 or more")
        if self.replica_urls and self.max_replication_lag is None:
            raise UsageError("--replica-url needs --max-replication-lag (the lag to pause at)")
        if self.throttle_query is not None and not self.throttle_query.strip():
            raise UsageError("--throttle-query is empty; give a query returning one boolean")

    def __repr__(self) -> str:  # replica URLs may carry passwords
        shown = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "replica_urls"}
        shown["replica_urls"] = tuple(redact_dsn(u) for u in self.replica_urls)
        return "ThrottleConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def watches_database(self) -> bool:
        """Whether any guardrail needs to sample the server (max-rate/sleep/runtime do not)."""
        return (
            self.max_replication_lag is not None
            or self.max_lock_waiters is not None
            or self.max_active_backends is not None
            or self.max_wal_rate is not None
            or self.pause_during_autovacuum
            or self.throttle_query is not None
            or self.critical_active_backends is not None
        )


def _check_wal_compression(value: str) -> None:
    if value not in WAL_COMPRESSION_CHOICES:
        raise UsageError(
            f"--wal-compression {value!r}: use one of {', '.join(WAL_COMPRESSION_CHOICES)}"
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Options of `bulkdedupe run`."""

    apply: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    concurrency_while_scanning: int = DEFAULT_CONCURRENCY_WHILE_SCANNING
    target_batch_time: float | None = DEFAULT_TARGET_BATCH_TIME  # None: fixed batch size
    min_batch_size: int = DEFAULT_MIN_BATCH_SIZE
    keep: tuple[OrderItem, ...] = ()
    template: str = DEFAULT_TEMPLATE
    run_id: str | None = None
    output: Path | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    # auto | server | lz4 | zstd | pglz: how the batches compress their full-page images
    wal_compression: str = DEFAULT_WAL_COMPRESSION
    # SET LOCAL session_replication_role = replica in each batch: the table's ordinary
    # triggers do not fire for the renames (needs superuser or GRANT SET ON PARAMETER)
    disable_triggers: bool = False
    # rename a key that partitions the table: each rename moves its row to another partition
    allow_row_movement: bool = False
    max_retries: int = DEFAULT_MAX_RETRIES
    # --apply: rename in heap order (decide in key order, sort by heap position: sweep.py)
    # or in key order, each batch deciding its groups under their locks
    order: str = DEFAULT_ORDER
    # the batches' synchronous_commit: "off" (their COMMIT does not wait for the WAL flush;
    # a server crash can lose the last ones, data and audit together) or "server"
    synchronous_commit: str = DEFAULT_SYNCHRONOUS_COMMIT
    create_scan_index: bool = False
    keep_scan_index: bool = False
    scan: ScanConfig = field(default_factory=ScanConfig)
    progress_interval: float = 10.0
    spool_dir: str | None = None  # where the scan spills groups ahead of the workers
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    impact: ImpactConfig = field(default_factory=ImpactConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.concurrency < 1:
            raise UsageError(f"--concurrency {self.concurrency}: must be at least 1")
        if self.concurrency > 64:
            raise UsageError(f"--concurrency {self.concurrency}: at most 64 worker connections")
        if self.concurrency_while_scanning < 1:
            raise UsageError("--concurrency-while-scanning must be at least 1")
        if self.min_batch_size < 1:
            raise UsageError(f"--min-batch-size {self.min_batch_size}: must be at least 1")
        if self.target_batch_time is not None and self.target_batch_time <= 0:
            raise UsageError("--target-batch-time must be greater than zero (or off)")
        if self.max_retries < 0:
            raise UsageError("--max-retries must be 0 or more")
        if self.lock_timeout <= 0 or self.statement_timeout <= 0:
            raise UsageError("--lock-timeout and --statement-timeout must be greater than zero")
        _check_wal_compression(self.wal_compression)
        if self.synchronous_commit not in SYNCHRONOUS_COMMIT_CHOICES:
            raise UsageError(
                f"--synchronous-commit {self.synchronous_commit!r}: one of "
                f"{', '.join(SYNCHRONOUS_COMMIT_CHOICES)}"
            )
        if self.order not in ORDERS:
            raise UsageError(f"--order {self.order!r}: one of {', '.join(ORDERS)}")
        if self.run_id is not None and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", self.run_id):
            raise UsageError(
                f"--run-id {self.run_id!r}: use 1-64 letters, digits, '_', '-', '.', ':'"
            )
        validate_template(self.template)


# --- enforce and undo ----------------------------------------------------------------------

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_ENFORCE_LOCK_TIMEOUT = 5.0
DEFAULT_CLEANUP_TIMEOUT = 60.0
_RUN_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True, kw_only=True)
class EnforceConfig:
    """Options of `bulkdedupe enforce`. `dedupe` holds the engine options used when live
    duplicates make the build fail (the same rules as `run --apply`)."""

    index_name: str | None = None
    constraint: bool = False
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    lock_timeout: float = DEFAULT_ENFORCE_LOCK_TIMEOUT
    attach_retries: int = DEFAULT_MAX_RETRIES
    cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT
    dedupe: RunConfig = field(default_factory=lambda: RunConfig(apply=True))

    def __post_init__(self) -> None:
        if self.index_name is not None and (
            not self.index_name
            or "\x00" in self.index_name
            or len(self.index_name.encode()) > _MAX_IDENT_BYTES
        ):
            raise UsageError(f"--index-name {self.index_name!r}: empty or longer than 63 bytes")
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts {self.max_attempts}: must be at least 1")
        if self.lock_timeout <= 0:
            raise UsageError("--lock-timeout must be greater than zero")
        if self.attach_retries < 0:
            raise UsageError("--max-retries must be 0 or more")
        if self.dedupe.run_id is not None:
            raise UsageError("enforce names its dedupe runs itself; leave run_id unset")


@dataclass(frozen=True, kw_only=True)
class UndoConfig:
    """Options of `bulkdedupe undo`: which run to revert, and whether to write."""

    run_id: str
    apply: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    wal_compression: str = DEFAULT_WAL_COMPRESSION
    disable_triggers: bool = False  # the restores in replica mode, as `run --disable-triggers`
    allow_row_movement: bool = False  # as `run --allow-row-movement`: restores move rows back
    max_retries: int = DEFAULT_MAX_RETRIES
    sample_size: int = 10
    impact: ImpactConfig = field(default_factory=ImpactConfig)  # paces --apply as `run` does

    def __post_init__(self) -> None:
        if not _RUN_ID.fullmatch(self.run_id):
            raise UsageError(
                f"--run-id {self.run_id!r}: use 1-64 letters, digits, '_', '-', '.', ':'"
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_retries < 0:
            raise UsageError("--max-retries must be 0 or more")
        if self.lock_timeout <= 0 or self.statement_timeout <= 0:
            raise UsageError("--lock-timeout and --statement-timeout must be greater than zero")
        _check_wal_compression(self.wal_compression)
