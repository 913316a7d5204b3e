"""The command line: click only. Parse options into config objects, call the library, print
the result, exit with the documented code. Only bulkdedupe's own errors are caught."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click
import structlog

from . import __version__, logs, pipeline
from .config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEY,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_SCAN_PAGE_SIZE,
    DEFAULT_SCANNERS,
    DEFAULT_STATE_SCHEMA,
    DEFAULT_STATEMENT_TIMEOUT,
    DEFAULT_TABLE,
    DEFAULT_TEMPLATE,
    DEFAULT_TOP,
    ConnectConfig,
    RunConfig,
    ScanConfig,
    parse_column,
    parse_duration,
    parse_keep,
    parse_table,
)
from .errors import (
    EXIT_DUPLICATES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BulkDedupeError,
    UsageError,
)

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
            required=True,
            help="PostgreSQL URL (env DATABASE_URL); ?host=/socket/dir works.",
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
            help="Unique not-null column identifying rows [default: the primary key].",
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


def make_connect(kw: dict[str, Any]) -> ConnectConfig:
    return ConnectConfig(
        database_url=kw.pop("database_url"),
        table=parse_table(kw.pop("table")),
        key=parse_column(kw.pop("key"), "--key"),
        pk=parse_column(pk, "--pk") if (pk := kw.pop("pk")) else None,
        state_schema=parse_column(kw.pop("state_schema"), "--state-schema"),
        connect_timeout=kw.pop("connect_timeout"),
    )


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return anyio.run(fn, backend="asyncio")


def handle_errors(f: Callable[..., int]) -> Callable[..., None]:
    """Turn bulkdedupe errors into one line and an exit code; tracebacks only at debug."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        ctx = click.get_current_context()
        try:
            code = f(*args, **kwargs)
        except BulkDedupeError as exc:
            if ctx.find_root().params.get("log_level") == "debug":
                import traceback

                traceback.print_exc()
            click.echo(f"bulkdedupe: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bulkdedupe: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        ctx.exit(code)

    return wrapper


def emit(result: Any, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(result.to_json(), default=str, ensure_ascii=False))
    else:
        click.echo(result.to_text())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    help="Most rows changed in one transaction (>= 1).",
)
@click.option(
    "--concurrency",
    type=int,
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Worker connections (>= 1).",
)
@click.option(
    "--keep",
    default=None,
    help='Order picking the survivor, e.g. "created_at, id" [default: primary key].',
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
@click.option(
    "--lock-timeout",
    type=DURATION,
    default=DEFAULT_LOCK_TIMEOUT,
    show_default=True,
    help="lock_timeout of each batch transaction.",
)
@click.option(
    "--statement-timeout",
    type=DURATION,
    default=DEFAULT_STATEMENT_TIMEOUT,
    show_default=True,
    help="statement_timeout of each batch and scan query.",
)
@click.option(
    "--max-retries",
    type=int,
    default=DEFAULT_MAX_RETRIES,
    show_default=True,
    help="Retries of a batch on lock timeout, deadlock or lost connection.",
)
@click.option(
    "--create-scan-index",
    is_flag=True,
    help="Build a btree index on the key CONCURRENTLY if there is none.",
)
@click.option(
    "--keep-scan-index", is_flag=True, help="Keep the index built by --create-scan-index."
)
@scan_options
@format_option
@handle_errors
def run(
    dry_run: bool,
    batch_size: int,
    concurrency: int,
    keep: str | None,
    template: str,
    run_id: str | None,
    output: Path | None,
    lock_timeout: float,
    statement_timeout: float,
    max_retries: int,
    create_scan_index: bool,
    keep_scan_index: bool,
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
        concurrency=concurrency,
        keep=parse_keep(keep) if keep else (),
        template=template,
        run_id=run_id,
        output=output,
        lock_timeout=lock_timeout,
        statement_timeout=statement_timeout,
        max_retries=max_retries,
        create_scan_index=create_scan_index,
        keep_scan_index=keep_scan_index,
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
    return EXIT_DUPLICATES if summary.failed_rows else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
