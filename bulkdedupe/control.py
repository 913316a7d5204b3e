"""Live control of a run through `<state-schema>.control`: an operator's pause, resume, stop and
`set` from another terminal or host, obeyed by the running process within a second; and
`status`, read from what the process writes into its runs row every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import asyncpg
import structlog

from . import db, errors, sql, state
from .config import MAX_CONCURRENCY, ConnectConfig, ThrottleConfig
from .db import Conn
from .errors import RunStateError, UsageError
from .pace import Pace
from .progress import Stats
from .results import ControlResult, RunStatus
from .throttle import Throttle

if TYPE_CHECKING:
    from .governor import Governor

log = structlog.get_logger(__name__)

ACK_TIMEOUT = 10.0  # how long `pause`/`set`/... wait for the running process to obey
ACK_POLL = 0.1
COMMANDS = {"pause": "pause", "resume": "run", "stop": "stop"}  # verb -> stored command

# Knobs `set` may change on a running run. Throttle limits take None ("off").
_RUN_KNOBS = ("batch_size", "concurrency", "concurrency_while_scanning")
_THROTTLE_KNOBS = (
    "max_rate",
    "sleep",
    "max_lock_waiters",
    "max_active_backends",
    "max_replication_lag",
    "max_wal_rate",
)
_INT_KNOBS = frozenset(
    {*_RUN_KNOBS, "max_lock_waiters", "max_active_backends"},
)
# The impact governor's budget (None: off; only a run started with a budget has a governor).
_GOVERNOR_KNOBS = ("max_impact",)
SETTABLE = (*_RUN_KNOBS, *_THROTTLE_KNOBS, *_GOVERNOR_KNOBS)


def validate_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check `set` values (the CLI before writing, the process again before obeying: the table
    can be written by hand). Raises UsageError naming the option."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        opt = "--" + name.replace("_", "-")
        if name not in SETTABLE:
            raise UsageError(f"{opt}: not a setting of a running run ({', '.join(SETTABLE)})")
        if value is None:
            if name in _RUN_KNOBS or name == "sleep":
                raise UsageError(f"{opt} cannot be turned off")
            out[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{opt} {value!r}: expected a number")
        if name in _INT_KNOBS and value != int(value):
            raise UsageError(f"{opt} {value!r}: expected a whole number")
        value = int(value) if name in _INT_KNOBS else float(value)
        if name in _RUN_KNOBS and value < 1:
            raise UsageError(f"{opt} {value}: must be at least 1")
        if name == "concurrency" and value > MAX_CONCURRENCY:
            raise UsageError(f"{opt} {value}: at most {MAX_CONCURRENCY} worker connections")
        if name == "max_impact" and not value > 1.0:
            raise UsageError(f"{opt} {value}: must be a ratio greater than 1 (or off)")
        out[name] = value
    throttle = {k: v for k, v in out.items() if k in _THROTTLE_KNOBS}
    if throttle:
        ThrottleConfig(**throttle)  # its own range checks, with the same messages as `run`
    return out


# --- in the running process ----------------------------------------------------------------


class Knobs:
    """The settings of a running run that `set` may change, each handed to its owner: the
    batch size and the concurrency to the run's Pace (which fits them under the lock budget),
    the guardrails' limits to the Throttle (which hands --max-rate to the Pace), --max-impact
    to the governor (which asks the Pace for the pace it decides)."""

    def __init__(self, *, pace: Pace, throttle: Throttle, governor: Governor | None = None) -> None:
        self.pace = pace
        self.throttle = throttle
        self.governor = governor  # None: --max-impact off (no probe runs)

    def current(self) -> dict[str, Any]:
        limits = dataclasses.asdict(self.throttle.limits)
        return {
            "batch_size": self.pace.batch_size,
            "concurrency": self.pace.concurrency,
            "concurrency_while_scanning": self.pace.concurrency_while_scanning,
            "max_impact": self.governor.budget if self.governor is not None else None,
        } | {k: limits[k] for k in _THROTTLE_KNOBS}

    def apply(self, settings: Mapping[str, Any]) -> None:
        """Obey `settings` (all of them, as last written); log each one that changes."""
        try:
            wanted = validate_settings(settings)
        except UsageError as exc:
            log.error("control settings ignored", error=str(exc), settings=dict(settings))
            return
        now = self.current()
        changed = {k: v for k, v in wanted.items() if now[k] != v}
        for k, v in changed.items():
            log.warning("setting changed by operator", setting=k, old=now[k], new=v)
        self.pace.change(
            batch_size=changed.get("batch_size"),
            concurrency=changed.get("concurrency"),
            concurrency_while_scanning=changed.get("concurrency_while_scanning"),
        )
        throttle = {k: v for k, v in changed.items() if k in _THROTTLE_KNOBS}
        if throttle:
            self.throttle.set_limits(dataclasses.replace(self.throttle.limits, **throttle))
        if "max_impact" in changed:
            if self.governor is None:
                log.error(
                    "--max-impact ignored: this run was started with --max-impact off (no probe "
                    "runs); stop it and resume it with --run-id and --max-impact RATIO"
                )
            else:
                self.governor.set_budget(changed["max_impact"])


class RunControl:
    """Polls the run's control row (on the monitor's connection) and acknowledges each
    request once obeyed."""

    def __init__(self, st: sql.StateSql, run_id: str, knobs: Knobs) -> None:
        self.q = sql.ControlSql(st)
        self.run_id = run_id
        self.knobs = knobs
        self.version = 0
        self.command = "run"

    @property
    def paused(self) -> bool:
        return self.command == "pause"

    @property
    def stop(self) -> bool:
        return self.command == "stop"

    async def reset(self, conn: Conn) -> None:
        self.version = int(await conn.fetchval(self.q.reset, self.run_id))

    async def poll(self, conn: Conn) -> None:
        row = await conn.fetchrow(self.q.get, self.run_id)
        if row is None or row["version"] <= self.version:
            return
        command = row["command"] if row["command"] in COMMANDS.values() else "run"
        if command != self.command:
            log.warning("operator request", command=command, previous=self.command)
            self.command = command
        settings = row["settings"]
        self.knobs.apply(json.loads(settings) if isinstance(settings, str) else settings)
        self.version = row["version"]
        await conn.execute(self.q.ack, self.run_id, self.version)


def _eta(stats: Stats, scanning: bool) -> float | None:
    if stats.eta_now is not None:
        return stats.eta_now
    if scanning:
        return stats.eta()
    left = stats.groups_found - stats.groups_done
    if left <= 0:
        return 0.0
    if not stats.groups_done:
        return None
    return left * stats.elapsed() / stats.groups_done


def live_snapshot(stats: Stats, knobs: Knobs) -> dict[str, Any]:
    """What the process writes into its runs row (checkpoint.live) for `status`."""
    pace = knobs.pace
    return {
        "at": datetime.now(UTC).isoformat(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "scanned_rows": stats.scanned_rows,
        "estimated_rows": stats.estimated_rows,
        "groups_found": stats.groups_found,
        "groups_done": stats.groups_done,
        "renamed": stats.renamed,
        "skipped_rows": stats.skipped_rows,
        "batches": stats.batches,
        "retries": stats.retries,
        "rows_per_s": round(stats.rate(), 1),
        # the progress display's ETA (both phases, the current pace), else the run's average
        "eta_s": None if (eta := _eta(stats, pace.scanning)) is None else round(eta),
        "scan_finished": not pace.scanning,
        "batch_size": pace.sizer.size,
        "batch_ceiling": pace.sizer.maximum,
        "concurrency": pace.concurrency,
        "workers_now": int(pace.limiter.total_tokens),
        "throttle": knobs.throttle.snapshot(),
        "impact": knobs.governor.snapshot() if knobs.governor is not None else None,
    }


# --- from another terminal -----------------------------------------------------------------


@asynccontextmanager
async def _connected(cfg: ConnectConfig, what: str) -> AsyncIterator[Conn]:
    async with errors.boundary(what), db.connect(cfg) as conn:
        yield conn


async def _run_row(conn: Conn, st: sql.StateSql, run_id: str | None) -> asyncpg.Record:
    if not await state.schema_exists(conn, st):
        raise RunStateError(
            f"no runs: the state schema {st.schema} does not exist (nothing was ever applied "
            "on this database; check --state-schema)"
        )
    if run_id is None:
        rows = await conn.fetch(st.list_runs, 1)
        if not rows:
            raise RunStateError(f"no runs recorded in {st.runs}")
        return rows[0]
    row = await conn.fetchrow(st.get_run, run_id)
    if row is None:
        raise RunStateError(
            f"run {run_id} not found in {st.runs}; list runs with `bulkdedupe runs`"
        )
    return row


def _json(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return dict(json.loads(value) if isinstance(value, str) else value)


async def status(cfg: ConnectConfig, run_id: str | None = None) -> RunStatus:
    """Progress of a running or finished run (the newest when `run_id` is None). Read-only."""
    st = sql.StateSql(cfg.state_schema)
    async with _connected(cfg, "status") as conn:
        row = await _run_row(conn, st, run_id)
        alive = bool(await conn.fetchval(sql.RUN_ALIVE, row["run_id"]))
        now = await conn.fetchval("SELECT now()")
        skipped = await state.skipped_counts(conn, st, [row["run_id"]])
    live = _json(row["checkpoint"]).get("live") or {}
    summary = _json(row["summary"])
    impact = live.get("impact") or {}
    throttle = live.get("throttle") or {}
    stop_reason = (throttle.get("stop_reason") or {}).get("detail")
    reasons = tuple(r["detail"] for r in throttle.get("reasons", ()))
    throttled_by = tuple(throttle.get("throttled_by", ()))
    if alive and row["status"] == "running":
        if throttle.get("stopping"):
            run_state = "stopping"
        elif throttle.get("paused"):
            run_state = "paused"
        elif throttle.get("rate_waiting") or throttled_by:
            run_state = "throttled"
        else:
            run_state = "running"
    else:
        reasons = ()
        run_state = "gone" if row["status"] == "running" else row["status"]
    return RunStatus(
        run_id=row["run_id"],
        command=row["command"],
        table=row["table_name"],
        key=row["key_column"],
        status=row["status"],
        state=run_state,
        alive=alive,
        reasons=reasons,
        throttled_by=throttled_by if alive else (),
        stop_reason=stop_reason,
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        seconds_since_update=round((now - row["updated_at"]).total_seconds(), 1),
        scanned_rows=live.get("scanned_rows", summary.get("scanned_rows")),
        estimated_rows=live.get("estimated_rows"),
        groups_found=live.get("groups_found", summary.get("groups", row["groups"])),
        groups_done=live.get("groups_done", row["groups"]),
        rows_renamed=row["renamed"],
        rows_skipped=row["skipped"],
        rows_per_s=live.get("rows_per_s", summary.get("rows_per_s")),
        eta_s=live.get("eta_s") if alive else None,
        batch_size=live.get("batch_size"),
        batch_ceiling=live.get("batch_ceiling"),
        concurrency=live.get("concurrency"),
        pid=live.get("pid"),
        host=live.get("host"),
        skipped_groups=skipped.get(row["run_id"], 0),
        impact_p99_ms=impact.get("probe_p99_ms", summary.get("impact_p99_ms")),
        impact_baseline_ms=impact.get("baseline_ms", summary.get("impact_baseline_ms")),
        impact_target=impact.get("max_impact", summary.get("impact_target")),
        pace=impact.get("pace") if alive else None,
    )


async def request(
    cfg: ConnectConfig,
    run_id: str,
    *,
    verb: str,
    settings: Mapping[str, Any] | None = None,
    ack_timeout: float = ACK_TIMEOUT,
) -> ControlResult:
    """Ask the process executing `run_id` to pause, resume, stop, or change `settings` (verb
    "set"), and wait until it says it obeyed."""
    if verb != "set" and verb not in COMMANDS:
        raise UsageError(f"unknown control verb {verb!r}")
    if verb == "set":
        if not settings:
            raise UsageError("set: give at least one setting to change (see `set --help`)")
        settings = validate_settings(settings)
    st = sql.StateSql(cfg.state_schema)
    q = sql.ControlSql(st)
    async with _connected(cfg, verb) as conn:
        row = await _run_row(conn, st, run_id)
        if row["status"] != "running":
            raise RunStateError(
                f"run {run_id} is {row['status']}: only a running run can be told to {verb}"
            )
        if not await conn.fetchval(sql.RUN_ALIVE, run_id):
            raise RunStateError(
                f"run {run_id} is marked running but no process is executing it (it crashed or "
                f"was killed); resume it with `bulkdedupe run --apply --run-id {run_id}`"
            )
        if not await conn.fetchval(q.exists, st.control):
            raise RunStateError(
                f"run {run_id} was started by a bulkdedupe without live control "
                f"({st.control} is missing); stop it with SIGTERM instead"
            )
        version = await conn.fetchval(
            q.request,
            run_id,
            COMMANDS.get(verb),
            json.dumps(dict(settings)) if settings else None,
        )
        acknowledged = False
        with anyio.move_on_after(ack_timeout):
            while True:
                ctl = await conn.fetchrow(q.get, run_id)
                if ctl is not None and ctl["applied_version"] >= version:
                    acknowledged = True
                    break
                await anyio.sleep(ACK_POLL)
    if not acknowledged:
        raise RunStateError(
            f"run {run_id} has not obeyed `{verb}` within {ack_timeout:g}s; the request stays "
            "recorded and is obeyed when the process next polls (see `bulkdedupe status`)"
        )
    return ControlResult(run_id=run_id, verb=verb, settings=dict(settings or {}))
