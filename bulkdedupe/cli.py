"""The command line: click only. Parse options into config objects, call the library, print
the result, exit with the documented code. Only bulkdedupe's own errors are caught."""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import io
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import structlog

from . import __version__, control, logs, pipeline, privileges
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONCURRENCY_WHILE_SCANNING,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_ENFORCE_LOCK_TIMEOUT,
    DEFAULT_IMPACT_BASELINE,
    DEFAULT_IMPACT_REMEASURE,
    DEFAULT_KEY,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_IMPACT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MIN_BATCH_SIZE,
    DEFAULT_ORDER,
    DEFAULT_SCAN_PAGE_SIZE,
    DEFAULT_SCANNERS,
    DEFAULT_STATE_SCHEMA,
    DEFAULT_STATEMENT_TIMEOUT,
    DEFAULT_SYNCHRONOUS_COMMIT,
    DEFAULT_TABLE,
    DEFAULT_TEMPLATE,
    DEFAULT_TOP,
    DEFAULT_WAL_COMPRESSION,
    MAX_IMPACT_ENV,
    ORDERS,
    SYNCHRONOUS_COMMIT_CHOICES,
    WAL_COMPRESSION_CHOICES,
    ConnectConfig,
    EnforceConfig,
    ImpactConfig,
    RunConfig,
    ScanConfig,
    ThrottleConfig,
    UndoConfig,
    libpq_env_configured,
    parse_column,
    parse_columns,
    parse_duration,
    parse_keep,
    parse_max_impact,
    parse_role,
    parse_table,
)
from .enforce import enforce as enforce_unique
from .errors import (
    EXIT_DUPLICATES,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BulkDedupeError,
    UsageError,
    from_driver,
)
from .report import DEFAULT_RUNS_LIMIT, list_runs, open_report
from .results import Change
from .undo import undo as undo_run

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in stubs
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(
                str(value),
                f"--{param.name.replace('_', '-')}" if param and param.name else "duration",
            )
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def connection_options(f: F) -> F:
    """Options every command takes (on the subcommand, so they can go after it)."""
    opts = [
        click.option(
            "-d",
            "--database-url",
            envvar="DATABASE_URL",
            default=None,
            help="PostgreSQL URL (env DATABASE_URL); ?host=/socket/dir works. Optional when "
            "libpq's PGHOST/PGPORT/PGUSER/PGDATABASE/PGSERVICE are set; '' takes everything "
            "from them. Passwords: in the URL, PGPASSWORD or ~/.pgpass (PGPASSFILE).",
        ),
        click.option(
            "--table",
            default=DEFAULT_TABLE,
            show_default=True,
            help="Table, may be schema-qualified (billing.payments).",
        ),
        click.option(
            "--key",
            default=DEFAULT_KEY,
            show_default=True,
            help="The text/varchar/char column that must become unique.",
        ),
        click.option(
            "--pk",
            default=None,
            help="Not-null column(s) with a unique index identifying rows, e.g. --pk id,region "
            "[default: the primary key, any number of columns].",
        ),
        click.option(
            "--scope",
            default=None,
            metavar="COLUMN[,COLUMN...]",
            help="Columns that, together with --key, must be unique (e.g. --scope merchant_id): "
            "duplicates are rows equal on all of them; only --key is rewritten.",
        ),
        click.option(
            "--state-schema",
            default=DEFAULT_STATE_SCHEMA,
            show_default=True,
            help="Schema of the runs and audit tables.",
        ),
        click.option(
            "--connect-timeout",
            type=DURATION,
            default=DEFAULT_CONNECT_TIMEOUT,
            show_default=True,
            help="Seconds to wait for the server.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def format_option(f: F) -> F:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json"]),
        default="table",
        show_default=True,
        help="Summary as a human table or one JSON object.",
    )(f)


def scan_options(f: F) -> F:
    f = click.option(
        "--scan-page-size",
        type=click.IntRange(min=1),
        default=DEFAULT_SCAN_PAGE_SIZE,
        show_default=True,
        help="Index entries read by one scan query.",
    )(f)
    return click.option(
        "--scanners",
        type=click.IntRange(min=1, max=32),
        default=DEFAULT_SCANNERS,
        show_default=True,
        help="Key ranges scanned at once.",
    )(f)


def batch_transaction_options(f: F) -> F:
    """How each batch transaction of `run` and `undo` waits, times out and retries."""
    opts = [
        click.option(
            "--lock-timeout",
            type=DURATION,
            default=DEFAULT_LOCK_TIMEOUT,
            show_default=True,
            help="lock_timeout of each batch transaction.",
        ),
        click.option(
            "--statement-timeout",
            type=DURATION,
            default=DEFAULT_STATEMENT_TIMEOUT,
            show_default=True,
            help="statement_timeout of each batch (and of each scan query of `run`).",
        ),
        click.option(
            "--max-retries",
            type=int,
            default=DEFAULT_MAX_RETRIES,
            show_default=True,
            help="Retries of a batch on lock timeout, deadlock or lost connection.",
        ),
        click.option(
            "--wal-compression",
            type=click.Choice(WAL_COMPRESSION_CHOICES),
            default=DEFAULT_WAL_COMPRESSION,
            show_default=True,
            help="How the batches compress the full-page images they write to WAL (most of a "
            "run's WAL). auto: lz4 or zstd when the server has it, is not compressing already "
            "and the role may set it (superuser or GRANT SET ON PARAMETER); server: leave the "
            "server's setting.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def disable_triggers_option(f: F) -> F:
    """--disable-triggers of `run`, `enforce` (its dedupe step) and `undo`."""
    return click.option(
        "--disable-triggers",
        is_flag=True,
        help="Each batch in replica mode (SET LOCAL session_replication_role = replica): the "
        "table's ordinary triggers do not fire for the renames (ENABLE ALWAYS ones do). Needs "
        "superuser or GRANT SET ON PARAMETER session_replication_role; refused when a foreign "
        "key involves the key column.",
    )(f)


def allow_row_movement_option(f: F) -> F:
    """--allow-row-movement of `run`, `enforce` (its dedupe step) and `undo`."""
    return click.option(
        "--allow-row-movement",
        is_flag=True,
        help="Rename a key that is (part of) the table's partition key: each rename moves its "
        "row to another partition (a delete and an insert), and an application transaction "
        "updating that row at the same moment fails with a serialization error.",
    )(f)


def throttle_options(f: F) -> F:
    """The guardrails of `run` (all off by default; see docs/production.md)."""
    opts = [
        click.option(
            "--max-rate",
            type=float,
            default=None,
            help="Most rows renamed per second, all workers together.",
        ),
        click.option(
            "--sleep",
            type=DURATION,
            default=0.0,
            help="Pause of each worker between two of its batches (e.g. 100ms).",
        ),
        click.option(
            "--max-replication-lag",
            type=DURATION,
            default=None,
            help="Pause while a standby replays more than this behind (pg_stat_replication).",
        ),
        click.option(
            "--replica-url",
            "replica_urls",
            multiple=True,
            help="Ask this standby for its lag instead (repeatable).",
        ),
        click.option(
            "--max-lock-waiters",
            type=int,
            default=None,
            help="Pause while more sessions than this wait on locks on the table.",
        ),
        click.option(
            "--max-active-backends",
            type=int,
            default=None,
            help="Pause while more backends than this run a statement (ours excluded).",
        ),
        click.option(
            "--max-wal-rate",
            type=float,
            default=None,
            help="Pause while WAL is written faster than this many MiB/s, or piles up unarchived.",
        ),
        click.option(
            "--pause-during-autovacuum",
            is_flag=True,
            help="Pause while autovacuum works on the table (can be hours on a big table).",
        ),
        click.option(
            "--throttle-query",
            default=None,
            help="Your own check: pause while it returns true (run read-only, 2s timeout).",
        ),
        click.option(
            "--critical-active-backends",
            type=int,
            default=None,
            help="Stop the run (resumable, exit 130) when more backends than this are active.",
        ),
        click.option(
            "--max-runtime",
            type=DURATION,
            default=None,
            help="Stop the run (resumable, exit 130) after this long (e.g. 8h).",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


class MaxImpact(click.ParamType):  # type: ignore[type-arg]  # generic only in stubs
    """--max-impact: a ratio greater than 1, or off."""

    name = "ratio|off"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float | None:
        if value is None or isinstance(value, float):
            return value
        try:
            return parse_max_impact(str(value))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


def impact_options(f: F) -> F:
    """The impact governor of `run`, `undo` and `enforce`'s dedupe step (on by default)."""
    opts = [
        click.option(
            "--max-impact",
            type=MaxImpact(),
            default="off" if DEFAULT_MAX_IMPACT is None else str(DEFAULT_MAX_IMPACT),
            envvar=MAX_IMPACT_ENV,
            show_default=True,
            show_envvar=True,
            help="Hold the p99 latency of a probe transaction (a tiny synchronous write, as the "
            "application commits) within RATIO x its baseline, going as fast as that allows; "
            "off = full speed. Settable live: `set --max-impact`.",
        ),
        click.option(
            "--impact-baseline",
            type=DURATION,
            default=DEFAULT_IMPACT_BASELINE,
            show_default=True,
            help="How long the probe measures the baseline before the first rename.",
        ),
        click.option(
            "--impact-remeasure",
            type=str,
            default=f"{DEFAULT_IMPACT_REMEASURE:g}s",
            show_default=True,
            help="Re-measure the baseline this often, in a 1 s pause of the renames; off = never.",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_impact(kw: dict[str, Any]) -> ImpactConfig:
    remeasure = str(kw.pop("impact_remeasure")).strip().lower()
    return ImpactConfig(
        max_impact=kw.pop("max_impact"),
        baseline=kw.pop("impact_baseline"),
        remeasure_every=(
            None
            if remeasure in ("off", "none", "0")
            else parse_duration(remeasure, "--impact-remeasure")
        ),
    )


def make_throttle(kw: dict[str, Any]) -> ThrottleConfig:
    return ThrottleConfig(
        max_rate=kw.pop("max_rate"),
        sleep=kw.pop("sleep"),
        max_replication_lag=kw.pop("max_replication_lag"),
        replica_urls=tuple(kw.pop("replica_urls")),
        max_lock_waiters=kw.pop("max_lock_waiters"),
        max_active_backends=kw.pop("max_active_backends"),
        max_wal_rate=kw.pop("max_wal_rate"),
        pause_during_autovacuum=kw.pop("pause_during_autovacuum"),
        throttle_query=kw.pop("throttle_query"),
        critical_active_backends=kw.pop("critical_active_backends"),
        max_runtime=kw.pop("max_runtime"),
    )


def make_connect(kw: dict[str, Any], *, need_url: bool = True) -> ConnectConfig:
    url = kw.pop("database_url")
    if url is None:
        if need_url and not libpq_env_configured():
            raise UsageError(
                "no database given: pass -d/--database-url URL or set DATABASE_URL, or set "
                "libpq's PGHOST (PGPORT, PGUSER, PGDATABASE, PGSERVICE)"
            )
        url = ""  # everything from libpq's environment, as psql would
    return ConnectConfig(
        database_url=url,
        table=parse_table(kw.pop("table")),
        key=parse_column(kw.pop("key"), "--key"),
        pk=parse_columns(pk, "--pk") if (pk := kw.pop("pk")) else None,
        scope=parse_columns(scope, "--scope") if (scope := kw.pop("scope", None)) else (),
        state_schema=parse_column(kw.pop("state_schema"), "--state-schema"),
        connect_timeout=kw.pop("connect_timeout"),
    )


# The cyclic garbage collector's thresholds while a command runs. At the defaults (700, 10,
# 10) a heap-order run collects every 700 new objects and, with hundreds of thousands of
# decided renames alive at once, walks them all again and again: a quarter of the tool's CPU
# (1.6 of 7 s at 5M rows, timed by gc.callbacks). Collecting the young every 50,000 keeps the
# same peak memory (cycles are still found, young ones at once) and, measured at 5M rows on
# 2 cores, took the tool's CPU from 7.1-7.3 s to 4.5-4.8 s and the run from 20 s to 16-17 s.
GC_THRESHOLDS = (50_000, 20, 100)


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        return anyio.run(fn, backend="asyncio")
    finally:
        gc.set_threshold(*before)  # the CLI may run inside another program (tests do)


def handle_errors(f: Callable[..., int]) -> Callable[..., None]:
    """Turn bulkdedupe errors into one line and an exit code; tracebacks only at debug."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        debug = ctx.find_root().params.get("log_level") == "debug"
        try:
            with _sigterm_interrupts():
                code = f(*args, **kwargs)
        except BulkDedupeError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"bulkdedupe: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.exceptions.Exit:
            raise
        except Exception as exc:
            # A bug: say so, and where to find the traceback (never an environment error).
            if debug:
                traceback.print_exc()
            error = from_driver(exc, what=ctx.info_name or "bulkdedupe")
            click.echo(f"bulkdedupe: error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("bulkdedupe: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except BaseExceptionGroup as group:
            # Ctrl-C that surfaced inside a task group: an interruption all the same
            _, rest = group.split(KeyboardInterrupt)
            if rest is not None:
                raise
            click.echo("bulkdedupe: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        ctx.exit(code)

    return wrapper


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM outside a run's own handler (before it starts, after it ended) is Ctrl-C:
    "interrupted", exit 130, as documented, never a silent death by signal. Only the main
    thread may set handlers: a command invoked in-process from another thread keeps them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def emit(result: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(result.to_json(), default=str, ensure_ascii=False))
    else:
        click.echo(result.to_text())


class _OneLineErrors(click.Group):
    """Usage errors as one `bulkdedupe: error:` line like every other error (click's default
    is a usage block); exit codes unchanged (2)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # bare `bulkdedupe`: the help text, as click does
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = exc.ctx if isinstance(exc, click.UsageError) else None
            hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(f"bulkdedupe: error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("bulkdedupe: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(
    cls=_OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="bulkdedupe")
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default=None,
    help="Log lines on stderr [default: console on a TTY, json otherwise].",
)
@click.option("--log-level", type=click.Choice(logs.LEVELS), default="info", show_default=True)
def main(log_format: str | None, log_level: str) -> None:
    """Make a duplicated key column of a large, live PostgreSQL table safe for a UNIQUE index:
    scan, rename duplicates online in small audited batches, verify."""
    logs.configure(fmt=log_format, level=log_level)


@main.command()
@connection_options
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=DEFAULT_TOP,
    show_default=True,
    help="How many of the largest groups to list.",
)
@scan_options
@format_option
@handle_errors
def scan(top: int, scan_page_size: int, scanners: int, fmt: str, **kw: Any) -> int:
    """Read-only report of duplicate groups. Exit 0: none; 1: some."""
    cfg = make_connect(kw)
    scan_cfg = ScanConfig(top=top, page_size=scan_page_size, scanners=scanners)
    report = run_async(lambda: pipeline.scan(cfg, scan_cfg))
    emit(report, fmt)
    return EXIT_OK if report.ok else EXIT_DUPLICATES


@main.command()
@connection_options
@scan_options
@format_option
@handle_errors
def verify(scan_page_size: int, scanners: int, fmt: str, **kw: Any) -> int:
    """Exit 0 if no duplicate groups remain, 1 if some do."""
    cfg = make_connect(kw)
    result = run_async(
        lambda: pipeline.verify(cfg, ScanConfig(page_size=scan_page_size, scanners=scanners))
    )
    emit(result, fmt)
    return EXIT_OK if result.ok else EXIT_DUPLICATES


@main.command()
@connection_options
@click.option(
    "--dry-run/--apply",
    "dry_run",
    default=True,
    show_default=True,
    help="Dry run writes nothing anywhere; --apply renames.",
)
@click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Most rows changed in one transaction (>= 1); the ceiling of adaptive sizing.",
)
@click.option(
    "--min-batch-size",
    type=int,
    default=DEFAULT_MIN_BATCH_SIZE,
    show_default=True,
    help="Floor of adaptive batch sizing.",
)
@click.option(
    "--target-batch-time",
    default="250ms",
    show_default=True,
    help="Size batches so each transaction takes about this long; 'off' for fixed batches.",
)
@click.option(
    "--concurrency",
    type=int,
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Worker connections (>= 1).",
)
@click.option(
    "--concurrency-while-scanning",
    type=int,
    default=DEFAULT_CONCURRENCY_WHILE_SCANNING,
    show_default=True,
    help="Workers renaming while the scan still runs (renames slow the scan down).",
)
@click.option(
    "--order",
    type=click.Choice(ORDERS),
    default=DEFAULT_ORDER,
    show_default=True,
    help=(
        "--apply: 'heap' decides groups as the scan finds them and renames in heap order "
        "(fewer full-page images: each page about once); 'key' renames group by group."
    ),
)
@click.option(
    "--synchronous-commit",
    type=click.Choice(SYNCHRONOUS_COMMIT_CHOICES),
    default=DEFAULT_SYNCHRONOUS_COMMIT,
    show_default=True,
    help=(
        "--apply: 'off' commits batches without waiting for their WAL flush (a server crash "
        "can undo the last ones, data and audit together: resumable); 'server' keeps its own."
    ),
)
@click.option(
    "--keep",
    default=None,
    help=(
        'Order picking the survivor, e.g. "created_at desc, id"; NULLs sort last unless '
        '"nulls first" is given [default: primary key].'
    ),
)
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="New value; {value} and {pk} are replaced.",
)
@click.option("--run-id", default=None, help="Name the run, or resume an unfinished one.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write every (would-be) change as JSON lines.",
)
@batch_transaction_options
@click.option(
    "--create-scan-index",
    is_flag=True,
    help="Build a btree index on the key CONCURRENTLY if there is none.",
)
@click.option(
    "--keep-scan-index", is_flag=True, help="Keep the index built by --create-scan-index."
)
@disable_triggers_option
@allow_row_movement_option
@throttle_options
@impact_options
@scan_options
@format_option
@handle_errors
def run(
    dry_run: bool,
    batch_size: int,
    min_batch_size: int,
    target_batch_time: str,
    concurrency: int,
    concurrency_while_scanning: int,
    order: str,
    synchronous_commit: str,
    keep: str | None,
    template: str,
    run_id: str | None,
    output: Path | None,
    lock_timeout: float,
    statement_timeout: float,
    max_retries: int,
    wal_compression: str,
    create_scan_index: bool,
    keep_scan_index: bool,
    disable_triggers: bool,
    allow_row_movement: bool,
    scan_page_size: int,
    scanners: int,
    fmt: str,
    **kw: Any,
) -> int:
    """Rename duplicates: --dry-run (default) reports, --apply writes."""
    cfg = make_connect(kw)
    run_cfg = RunConfig(
        apply=not dry_run,
        batch_size=batch_size,
        min_batch_size=min_batch_size,
        target_batch_time=(
            None
            if target_batch_time.strip().lower() in ("off", "0", "none")
            else parse_duration(target_batch_time, "--target-batch-time")
        ),
        concurrency=concurrency,
        concurrency_while_scanning=concurrency_while_scanning,
        order=order,
        synchronous_commit=synchronous_commit,
        keep=parse_keep(keep) if keep else (),
        template=template,
        run_id=run_id,
        output=output,
        lock_timeout=lock_timeout,
        statement_timeout=statement_timeout,
        max_retries=max_retries,
        wal_compression=wal_compression,
        create_scan_index=create_scan_index,
        keep_scan_index=keep_scan_index,
        disable_triggers=disable_triggers,
        allow_row_movement=allow_row_movement,
        throttle=make_throttle(kw),
        impact=make_impact(kw),
        scan=ScanConfig(
            page_size=scan_page_size, scanners=scanners, statement_timeout=statement_timeout
        ),
    )
    summary = run_async(lambda: pipeline.run(cfg, run_cfg, handle_signals=True))
    emit(summary, fmt)
    if summary.status == "interrupted":
        structlog.get_logger().warning(
            "run interrupted; resume with --run-id", run_id=summary.run_id
        )
        return EXIT_INTERRUPTED
    if summary.status == "incomplete":
        structlog.get_logger().warning(
            "run incomplete: groups were skipped and stay duplicated",
            run_id=summary.run_id,
            groups=summary.skipped_groups,
            reasons=summary.skipped_groups_by_reason,
            retry=summary.retry_command,
        )
        return EXIT_DUPLICATES
    return EXIT_DUPLICATES if summary.failed_rows else EXIT_OK


# --- enforce, undo, runs, report -----------------------------------------------------------


@main.command()
@connection_options
@click.option(
    "--index-name",
    default=None,
    help="Name of the unique index [default: <table>_<key>_key, cut to 63 bytes].",
)
@click.option(
    "--constraint",
    is_flag=True,
    help="Then attach the index as a UNIQUE constraint (ALTER TABLE ... USING INDEX).",
)
@click.option(
    "--max-attempts",
    type=int,
    default=DEFAULT_MAX_ATTEMPTS,
    show_default=True,
    help="Builds tried; between two, duplicates that arrived meanwhile are renamed.",
)
@click.option(
    "--lock-timeout",
    type=DURATION,
    default=DEFAULT_ENFORCE_LOCK_TIMEOUT,
    show_default=True,
    help="Longest wait for the table lock that attaching the constraint needs.",
)
@click.option(
    "--keep",
    default=None,
    help="Survivor order for renaming late duplicates, as in `run` [default: primary key].",
)
@click.option(
    "--template",
    default=DEFAULT_TEMPLATE,
    show_default=True,
    help="New value for late duplicates, as in `run`.",
)
@click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Rows per transaction when renaming late duplicates.",
)
@click.option(
    "--concurrency",
    type=int,
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Worker connections when renaming late duplicates.",
)
@disable_triggers_option
@allow_row_movement_option
@impact_options
@format_option
@handle_errors
def enforce(
    index_name: str | None,
    constraint: bool,
    max_attempts: int,
    lock_timeout: float,
    keep: str | None,
    template: str,
    batch_size: int,
    concurrency: int,
    disable_triggers: bool,
    allow_row_movement: bool,
    fmt: str,
    **kw: Any,
) -> int:
    """Build the UNIQUE index CONCURRENTLY, converging against live duplicates, and prove it.
    Exit 0: enforced; 1: did not converge within --max-attempts."""
    cfg = make_connect(kw)
    ecfg = EnforceConfig(
        index_name=parse_column(index_name, "--index-name") if index_name else None,
        constraint=constraint,
        max_attempts=max_attempts,
        lock_timeout=lock_timeout,
        dedupe=RunConfig(
            apply=True,
            keep=parse_keep(keep) if keep else (),
            template=template,
            batch_size=batch_size,
            concurrency=concurrency,
            disable_triggers=disable_triggers,
            allow_row_movement=allow_row_movement,
            impact=make_impact(kw),
        ),
    )
    result = run_async(lambda: enforce_unique(cfg, ecfg, handle_signals=True))
    emit(result, fmt)
    if result.status == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_OK if result.ok else EXIT_DUPLICATES


@main.command()
@connection_options
@click.option("--run-id", required=True, help="The applied run to revert (see `runs`).")
@click.option(
    "--dry-run/--apply",
    "dry_run",
    default=True,
    show_default=True,
    help="Dry run writes nothing; --apply restores.",
)
@click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Most rows restored in one transaction (>= 1).",
)
@batch_transaction_options
@disable_triggers_option
@allow_row_movement_option
@impact_options
@format_option
@handle_errors
def undo(
    run_id: str,
    dry_run: bool,
    batch_size: int,
    lock_timeout: float,
    statement_timeout: float,
    max_retries: int,
    wal_compression: str,
    disable_triggers: bool,
    allow_row_movement: bool,
    fmt: str,
    **kw: Any,
) -> int:
    """Put back the values a run replaced, where rows still hold what the run wrote.
    Rows changed since are reported, not overwritten."""
    cfg = make_connect(kw)
    ucfg = UndoConfig(
        run_id=run_id,
        apply=not dry_run,
        batch_size=batch_size,
        lock_timeout=lock_timeout,
        statement_timeout=statement_timeout,
        max_retries=max_retries,
        wal_compression=wal_compression,
        disable_triggers=disable_triggers,
        allow_row_movement=allow_row_movement,
        impact=make_impact(kw),
    )
    summary = run_async(lambda: undo_run(cfg, ucfg, handle_signals=True))
    emit(summary, fmt)
    if summary.status == "interrupted":
        return EXIT_INTERRUPTED
    if summary.blocked_by:
        click.echo(f"bulkdedupe: error: --apply would be refused: {summary.blocked_by}", err=True)
        return EXIT_ENVIRONMENT
    return EXIT_OK


@main.command()
@connection_options
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=DEFAULT_RUNS_LIMIT,
    show_default=True,
    help="How many of the latest runs to list.",
)
@format_option
@handle_errors
def runs(limit: int, fmt: str, **kw: Any) -> int:
    """The runs recorded in the state schema, newest first (all tables). Read-only."""
    cfg = make_connect(kw)
    emit(run_async(lambda: list_runs(cfg, limit)), fmt)
    return EXIT_OK


@main.command("init-state")
@connection_options
@click.option(
    "--print-sql",
    is_flag=True,
    help="Print the SQL instead of running it (no connection): for a DBA to run.",
)
@click.option(
    "--role",
    default=None,
    help="Also GRANT this (login) role what run --apply and undo --apply need, no more.",
)
@format_option
@handle_errors
def init_state(print_sql: bool, role: str | None, fmt: str, **kw: Any) -> int:
    """Create the state schema (runs, audit trail, control) as a privileged role, or upgrade
    in place one an earlier release made, and with --role grant a least-privileged role what
    it needs; --print-sql prints that SQL instead."""
    cfg = make_connect(kw, need_url=not print_sql)
    grantee = parse_role(role) if role is not None else None
    if print_sql:
        click.echo(privileges.init_script(cfg, role=grantee), nl=False)
        return EXIT_OK
    emit(run_async(lambda: privileges.init_state(cfg, role=grantee)), fmt)
    return EXIT_OK


def _report_fields(pk_columns: tuple[str, ...]) -> tuple[str, ...]:
    """The CSV header: one `pk` field, or for a composite key one `pk.<column>` per column."""
    pk = ("pk",) if len(pk_columns) <= 1 else tuple(f"pk.{c}" for c in pk_columns)
    return ("id", *pk, "old_value", "new_value", "changed_at")


def _report_page(page: list[Change], fmt: str) -> str:
    if fmt == "json":
        return "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in page)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(
            (
                c.id,
                *((c.pk,) if c.pk_values is None else c.pk_values.values()),
                c.old_value,
                c.new_value,
                c.changed_at.isoformat(),
            )
            for c in page
        )
        return buf.getvalue()
    return "".join(
        f"  {c.pk_shown:>12}  {c.changed_at:%Y-%m-%d %H:%M:%S}  "
        f"{c.old_value!r} -> {c.new_value!r}\n"
        for c in page
    )


@main.command()
@connection_options
@click.option("--run-id", required=True, help="The run whose audit to print (see `runs`).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Human lines, JSON lines (one change each), or CSV with a header.",
)
@handle_errors
def report(run_id: str, fmt: str, **kw: Any) -> int:
    """The audit of one run (pk, old value, new value, when), streamed page by page."""
    cfg = make_connect(kw)
    out = sys.stdout

    async def stream() -> None:
        async with open_report(cfg, run_id) as rep:
            r = rep.run
            if fmt == "csv":
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerow(_report_fields(r.pk_columns))
                out.write(buf.getvalue())
            elif fmt == "table":
                out.write(
                    f"run {r.run_id} ({r.command}, {r.status}) on {r.table}.{r.key}: "
                    f"{r.rows_changed:,} rows changed\n"
                    f"  {'pk':>12}  {'changed at':<19}  old -> new\n"
                )
            async for page in rep.pages():
                out.write(_report_page(page, fmt))

    try:
        run_async(stream)
        out.flush()
    except BrokenPipeError:
        # `report ... | head`: the reader has what it wanted; do not die with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


# --- live control: status, pause, resume, stop, set ----------------------------------------


class Knob(click.ParamType):  # type: ignore[type-arg]  # generic only in stubs
    """A `set` value: a number (or a duration), or "off" to lift a limit."""

    name = "value"

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "int", "float" or "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> int | float | None:
        opt = f"--{param.name.replace('_', '-')}" if param and param.name else "value"
        text = str(value).strip().lower()
        if text in ("off", "none"):
            return None
        try:
            if self.kind == "duration":
                return 0.0 if text in ("0", "0s") else parse_duration(text, opt)
            return int(text) if self.kind == "int" else float(text)
        except (UsageError, ValueError):
            self.fail(f"{opt} {value!r}: expected a {self.kind} or off", param, ctx)


def run_id_option(required: bool) -> Callable[[F], F]:
    return click.option(
        "--run-id",
        required=required,
        help="The run (see `bulkdedupe runs`)" + ("." if required else " [default: the newest]."),
    )


@main.command()
@connection_options
@run_id_option(required=False)
@format_option
@handle_errors
def status(run_id: str | None, fmt: str, **kw: Any) -> int:
    """Progress of a running or finished run: rows scanned and renamed, rate, ETA, batch size,
    and whether and why it is throttled or paused. Read-only."""
    cfg = make_connect(kw)
    emit(run_async(lambda: control.status(cfg, run_id)), fmt)
    return EXIT_OK


def _control_command(verb: str, doc: str) -> None:
    @connection_options
    @run_id_option(required=True)
    @format_option
    @handle_errors
    def command(run_id: str, fmt: str, **kw: Any) -> int:
        cfg = make_connect(kw)
        emit(run_async(lambda: control.request(cfg, run_id, verb=verb)), fmt)
        return EXIT_OK

    command.__doc__ = doc
    main.command(verb)(command)


_control_command(
    "pause", "Pause a running run (its process stays, holding no locks); `resume` goes on."
)
_control_command("resume", "Let a paused run go on.")
_control_command(
    "stop",
    "Stop a running run gracefully: in-flight batches finish, the checkpoint is saved, the "
    "process exits 130; resume with `run --apply --run-id ID`.",
)


@main.command("set")
@connection_options
@run_id_option(required=True)
@click.option("--batch-size", type=Knob("int"), help="New batch ceiling (rows).")
@click.option("--concurrency", type=Knob("int"), help="Worker connections (1-64).")
@click.option("--concurrency-while-scanning", type=Knob("int"), help="Workers while the scan runs.")
@click.option("--max-rate", type=Knob("float"), help="Rows per second, or off.")
@click.option("--sleep", type=Knob("duration"), help="Between batches per worker, or 0.")
@click.option("--max-lock-waiters", type=Knob("int"), help="N, or off.")
@click.option("--max-active-backends", type=Knob("int"), help="N, or off.")
@click.option("--max-replication-lag", type=Knob("duration"), help="Seconds, or off.")
@click.option("--max-wal-rate", type=Knob("float"), help="MiB/s, or off.")
@click.option(
    "--max-impact", type=Knob("float"), help="Ratio (> 1) of probe p99 to baseline, or off."
)
@format_option
@handle_errors
def set_(run_id: str, fmt: str, **kw: Any) -> int:
    """Change knobs of a running run without restarting it; it obeys within a second."""
    cfg = make_connect(kw)
    ctx = click.get_current_context()
    settings = {
        k: v
        for k, v in kw.items()
        if k in control.SETTABLE
        and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT
    }
    if "sleep" in settings and settings["sleep"] is None:
        settings["sleep"] = 0.0  # "off" for a sleep is no sleep
    if not settings:
        raise UsageError("set: give at least one setting to change (see `bulkdedupe set --help`)")
    emit(run_async(lambda: control.request(cfg, run_id, verb="set", settings=settings)), fmt)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
