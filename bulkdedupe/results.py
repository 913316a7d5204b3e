"""What the commands return: frozen dataclasses that render as a human table or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


def _num(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.2f}"


def table_text(title: str, rows: list[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title]
    for k, v in rows:
        shown = _num(v) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)
        lines.append(f"  {k.ljust(width)}  {shown}")
    return "\n".join(lines)


# A group this large is hardly a double submit: a junk default shared by a share of the rows.
GIANT_GROUP_ROWS = 10_000
GIANT_GROUP_SHARE = 0.01  # of the table, for groups of at least GIANT_GROUP_MIN_ROWS
GIANT_GROUP_MIN_ROWS = 100  # so that in a small table a pair is not "giant"
JUNK_HINT = "a junk value ('' / 'N/A' / blank char(n)) is the likely cause"


def _shown_value(value: str) -> str:
    """A key for a human line: blanks counted (a char(n) junk value is all blanks), long
    values cut."""
    if value and not value.strip():
        return f"<{len(value)} blanks>"
    return repr(value) if len(value) <= 60 else repr(value[:57]) + "..."


@dataclass(frozen=True, kw_only=True)
class LargeGroup:
    """One of the largest groups, with its share of the table's rows."""

    value: str
    rows: int
    share: float | None  # rows / the table's rows; None: the table's size is unknown

    @property
    def giant(self) -> bool:
        if self.rows >= GIANT_GROUP_ROWS:
            return True
        return (
            self.rows >= GIANT_GROUP_MIN_ROWS
            and self.share is not None
            and self.share >= GIANT_GROUP_SHARE
        )

    @property
    def hint(self) -> str | None:
        if not self.giant:
            return None
        held = f"{self.share:.1%} of the table" if self.share is not None else "many rows"
        return (
            f"{_shown_value(self.value)} holds {self.rows:,} rows ({held}): {JUNK_HINT}; "
            f"its {self.rows - 1:,} rows will be renamed chunk by chunk"
        )

    def to_json(self) -> dict[str, Any]:
        share = round(self.share, 6) if self.share is not None else None
        return {
            "value": self.value,
            "rows": self.rows,
            "share": share,
            "giant": self.giant,
            "hint": self.hint,
        }


def large_groups(groups: tuple[tuple[str, int], ...], table_rows: int) -> list[LargeGroup]:
    """`groups` ((value, rows), largest first) with their share of `table_rows` (the scan's
    count or the planner's estimate, whichever is larger; 0: unknown)."""
    return [
        LargeGroup(value=k, rows=n, share=n / table_rows if table_rows else None) for k, n in groups
    ]


def _large_groups_text(groups: list[LargeGroup]) -> str:
    """The groups, one a line, then a hint for each giant one."""
    out = ""
    if groups:
        out += "\n  largest groups (rows, share of the table):"
        for g in groups:
            share = f"{g.share:>7.2%}" if g.share is not None else "      -"
            flag = "  <- giant" if g.giant else ""
            out += f"\n    {g.rows:>10,}  {share}  {_shown_value(g.value)}{flag}"
    for g in groups:
        if g.hint:
            out += f"\n  hint: {g.hint}"
    return out


@dataclass(frozen=True, kw_only=True)
class UpdateTrigger:
    """A row-level UPDATE trigger of the table: each rename is an UPDATE of one row."""

    name: str
    relation: str  # where it is defined (a partition's own trigger too)
    function: str
    timing: str  # BEFORE | AFTER | INSTEAD OF
    # ALTER TABLE ... ENABLE [REPLICA | ALWAYS] TRIGGER: origin fires in the default
    # session_replication_role, replica only under --disable-triggers, always in both
    enabled: str  # "origin" | "replica" | "always"
    columns: tuple[str, ...]  # UPDATE OF these columns only; (): any UPDATE
    conditional: bool  # has a WHEN condition: fires only for the rows it holds for
    on_key: bool  # an UPDATE of the key column fires it (no column list, or the key in it)

    @property
    def fires(self) -> bool:
        """Fires for every rename in the default session_replication_role (origin)."""
        return self.on_key and self.enabled in ("origin", "always")

    @property
    def fires_with_disable_triggers(self) -> bool:
        """Fires even under --disable-triggers (session_replication_role = replica)."""
        return self.on_key and self.enabled in ("always", "replica")

    def fires_during(self, disable_triggers: bool) -> bool:
        return self.fires_with_disable_triggers if disable_triggers else self.fires

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "columns": list(self.columns),
            "fires": self.fires,
            "fires_with_disable_triggers": self.fires_with_disable_triggers,
        }

    def describe(self, disable_triggers: bool) -> str:
        what = f"{self.timing} {self.function}"
        if self.columns:
            what += f", UPDATE OF {', '.join(self.columns)}"
        if self.conditional:
            what += ", WHEN ..."
        if not self.on_key:
            verdict = "does not fire: not an UPDATE of the key"
        elif self.fires_during(disable_triggers):
            verdict = "fires" + (" (only when its WHEN holds)" if self.conditional else "")
            if self.enabled == "always":
                verdict += "; ENABLE ALWAYS: even with --disable-triggers"
            elif self.enabled == "replica":
                verdict += "; ENABLE REPLICA: only with --disable-triggers"
            elif not disable_triggers:
                verdict += "; not with --disable-triggers"
        elif disable_triggers:
            verdict = "off: --disable-triggers"
        else:
            verdict = "does not fire: ENABLE REPLICA (fires only with --disable-triggers)"
        return f"{self.name} ({what}): {verdict}"


def _triggers_text(
    triggers: tuple[UpdateTrigger, ...], disable_triggers: bool, renames: int, verb: str
) -> str:
    if not triggers:
        return ""
    firing = sum(t.fires_during(disable_triggers) for t in triggers)
    head = f"\n  update triggers of the table: {len(triggers)}"
    if firing:
        head += (
            f"; {firing} fire{'s' if firing == 1 else ''} once per renamed row "
            f"({renames:,} rows {verb})"
        )
        if not disable_triggers:
            head += "; --disable-triggers switches ordinary ones off"
    out = head
    for t in triggers:
        out += f"\n    {t.describe(disable_triggers)}"
    return out


@dataclass(frozen=True, kw_only=True)
class ScanReport:
    """Read-only report of the duplicates in the key column."""

    table: str
    key: str
    index: str | None
    estimated_rows: int
    scanned_rows: int
    groups: int
    rows_to_rename: int
    largest_groups: tuple[tuple[str, int], ...]
    duration_s: float
    # the table's enabled row-level UPDATE triggers: each fires once per renamed row
    update_triggers: tuple[UpdateTrigger, ...] = ()
    # --scope: groups are rows equal on these and the key; a group's value is then shown as
    # the JSON array of the scope's values and the key's
    scope: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.groups == 0

    @property
    def table_rows(self) -> int:
        """The table's rows as far as known: the scan's count of non-NULL keys, or the
        planner's estimate when it is larger (NULL keys are not in the scan)."""
        return max(self.estimated_rows, self.scanned_rows)

    @property
    def large_groups(self) -> list[LargeGroup]:
        return large_groups(self.largest_groups, self.table_rows)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["table_rows"] = self.table_rows
        d["largest_groups"] = [g.to_json() for g in self.large_groups]
        d["update_triggers"] = [t.to_json() for t in self.update_triggers]
        d["update_triggers_firing"] = sum(t.fires for t in self.update_triggers)
        d["ok"] = self.ok
        return d

    def to_text(self) -> str:
        out = table_text(
            f"scan of {self.table}.{self.key}"
            + (f", unique per ({', '.join(self.scope)})" if self.scope else ""),
            [
                ("estimated rows", self.estimated_rows),
                ("index entries scanned", self.scanned_rows),
                ("duplicate groups", self.groups),
                ("rows to rename", self.rows_to_rename),
                ("scan index", self.index or "-"),
                ("duration (s)", round(self.duration_s, 2)),
            ],
        )
        out += _large_groups_text(self.large_groups)
        out += _triggers_text(self.update_triggers, False, self.rows_to_rename, "to rename")
        return out


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    table: str
    key: str
    groups: int
    rows_to_rename: int
    scanned_rows: int
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.groups == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}

    def to_text(self) -> str:
        verdict = "OK: no duplicates" if self.ok else "DUPLICATES REMAIN"
        return table_text(
            f"verify {self.table}.{self.key}: {verdict}",
            [
                ("duplicate groups", self.groups),
                ("rows to rename", self.rows_to_rename),
                ("index entries scanned", self.scanned_rows),
                ("duration (s)", round(self.duration_s, 2)),
            ],
        )


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """The end of a `run`: what was (or, on a dry run, would be) changed."""

    run_id: str
    mode: str  # "dry-run" | "apply"
    # "completed" | "incomplete" (groups skipped: see retry_command) | "interrupted" | "failed"
    status: str
    table: str
    key: str
    groups: int
    rows_renamed: int
    rows_skipped: int
    skipped: dict[str, int]  # reason -> rows (no_longer_duplicate: resolved by themselves)
    batches: int
    retries: int
    scanned_rows: int
    duration_s: float
    rows_per_s: float
    batch_ms_p50: float
    batch_ms_p99: float
    batch_ms_max: float
    longest_scan_page_ms: float
    scan_s: float = 0.0
    output: str | None = None
    sample: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # groups left duplicated with a reason (on --apply: on record in <state>.skipped)
    skipped_groups: int = 0
    skipped_groups_by_reason: dict[str, int] = field(default_factory=dict)
    retry_command: str | None = None  # resumes the run: retries exactly those groups
    # WAL the server wrote during the run (--apply): every session's, the application's too
    wal_bytes: int | None = None
    wal_bytes_per_rename: float | None = None
    # the impact governor: its probe's p99 during the run, the baseline, the budget (a ratio)
    impact_p99_ms: float | None = None
    impact_baseline_ms: float | None = None
    impact_target: float | None = None
    # the largest groups the scan found ((value, rows), largest first) and the table's rows
    largest_groups: tuple[tuple[str, int], ...] = ()
    table_rows: int = 0
    # the table's row-level UPDATE triggers, and whether the batches ran in replica mode
    update_triggers: tuple[UpdateTrigger, ...] = ()
    disable_triggers: bool = False

    @property
    def large_groups(self) -> list[LargeGroup]:
        return large_groups(self.largest_groups, self.table_rows)

    @property
    def failed_rows(self) -> int:
        """Rows left duplicated because of errors (not because the group went away)."""
        return sum(n for reason, n in self.skipped.items() if reason != "no_longer_duplicate")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "sample": list(self.sample),
            "largest_groups": [g.to_json() for g in self.large_groups],
            "update_triggers": [t.to_json() for t in self.update_triggers],
            # fired once per renamed row each, in the batches' session_replication_role
            "update_triggers_firing": sum(
                t.fires_during(self.disable_triggers) for t in self.update_triggers
            ),
        }

    def to_text(self) -> str:
        verb = "rows renamed" if self.mode == "apply" else "rows that would be renamed"
        rows: list[tuple[str, Any]] = [
            ("run id", self.run_id),
            ("mode", self.mode),
            ("status", self.status),
            ("duplicate groups", self.groups),
            (verb, self.rows_renamed),
            ("rows skipped", self.rows_skipped),
        ]
        rows += [(f"  skipped: {k}", v) for k, v in sorted(self.skipped.items())]
        if self.skipped_groups:
            rows.append(("groups left skipped", self.skipped_groups))
            rows += [
                (f"  groups skipped: {k}", v)
                for k, v in sorted(self.skipped_groups_by_reason.items())
            ]
        rows += [
            ("batches", self.batches),
            ("retries", self.retries),
            ("index entries scanned", self.scanned_rows),
            ("duration (s)", round(self.duration_s, 2)),
            ("rows/s", round(self.rows_per_s, 1)),
            (
                "batch ms p50/p99/max",
                f"{self.batch_ms_p50:.1f} / {self.batch_ms_p99:.1f} / {self.batch_ms_max:.1f}",
            ),
            ("longest scan page (ms)", round(self.longest_scan_page_ms, 1)),
            ("scan finished after (s)", round(self.scan_s, 2)),
        ]
        if self.wal_bytes is not None:
            wal = f"{self.wal_bytes / 2**20:,.1f} MiB"
            if self.wal_bytes_per_rename is not None:
                wal += f" ({self.wal_bytes_per_rename:,.0f} bytes per rename)"
            rows.append(("WAL written (server)", wal))
        if self.impact_p99_ms is not None or self.impact_target is not None:
            impact = _impact(self.impact_p99_ms, self.impact_baseline_ms, self.impact_target)
            rows.append(("impact", impact))
        if self.output:
            rows.append(("plan written to", self.output))
        if self.retry_command:
            rows.append(("retry them with", self.retry_command))
        if self.disable_triggers:
            rows.append(("triggers", "disabled (session_replication_role = replica)"))
        out = table_text(f"run of {self.table}.{self.key}", rows)
        if self.mode != "apply":  # what the run will meet (its JSON keeps them either way)
            out += _large_groups_text(self.large_groups)
        out += _triggers_text(
            self.update_triggers,
            self.disable_triggers,
            self.rows_renamed,
            "renamed" if self.mode == "apply" else "to rename",
        )
        if self.sample:
            out += "\n  sample:"
            for s in self.sample:
                out += f"\n    pk {s['pk']}: {s['old_value']!r} -> {s['new_value']!r}"
        return out


# --- enforce, undo, runs, report -----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EnforceAttempt:
    """One CREATE UNIQUE INDEX CONCURRENTLY and, if live duplicates broke it, the dedupe run."""

    number: int
    outcome: str  # "built" | "duplicates" | "retryable" | "interrupted"
    build_s: float
    error: str | None = None
    dedupe_run_id: str | None = None
    rows_renamed: int = 0
    rows_skipped: int = 0
    dedupe_s: float = 0.0
    partition: str | None = None  # a partitioned table's: the partition whose index it built


@dataclass(frozen=True, kw_only=True)
class EnforceResult:
    """The end of `enforce`: whether the key is now guarded by a valid unique index."""

    table: str
    key: str
    index: str
    status: str  # "created" | "already_enforced" | "not_converged" | "interrupted"
    attempts: tuple[EnforceAttempt, ...]
    dropped_invalid: int
    constraint: str | None
    constraint_status: str | None  # "attached" | "already_attached"
    index_valid: bool
    index_unique: bool
    duplicate_rejected: bool | None  # None: the table has too few rows to try
    proof: str
    phases: tuple[tuple[str, float], ...]
    duration_s: float
    # a partitioned table: the partitions' indexes attached under `index` (qualified names);
    # while not ok, `index` itself stays INVALID (enforce again resumes)
    partitioned: bool = False
    partition_indexes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("created", "already_enforced")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [{"phase": p, "seconds": round(s, 3)} for p, s in self.phases]
        d["ok"] = self.ok
        return d

    def to_text(self) -> str:
        verdict = {
            "created": "OK: unique index built",
            "already_enforced": "OK: already enforced, nothing to do",
            "not_converged": "NOT CONVERGED: duplicates keep arriving",
            "interrupted": "INTERRUPTED: no index left behind",
        }.get(self.status, self.status)
        if self.partitioned and not self.ok:
            verdict = verdict.split(":")[0] + (
                ": the partitioned index stays INVALID (no invalid partition index is left); "
                "enforce again resumes"
            )
        rows: list[tuple[str, Any]] = [
            ("index", self.index),
            ("valid / unique", f"{self.index_valid} / {self.index_unique}"),
            ("duplicate rejected", self.proof),
            ("invalid indexes dropped", self.dropped_invalid),
        ]
        if self.constraint:
            rows.append(("constraint", f"{self.constraint} ({self.constraint_status})"))
        if self.partitioned:
            rows.append(("partition indexes attached", len(self.partition_indexes)))
        rows.append(("attempts", len(self.attempts)))
        for a in self.attempts:
            line = f"{a.partition}: " if a.partition else ""
            line += f"{a.outcome}, build {a.build_s:.2f}s"
            if a.dedupe_run_id:
                line += (
                    f"; dedupe run {a.dedupe_run_id}: {a.rows_renamed:,} renamed, "
                    f"{a.rows_skipped:,} skipped, {a.dedupe_s:.2f}s"
                )
            if a.error:
                line += f" ({a.error})"
            rows.append((f"  attempt {a.number}", line))
        rows += [(f"  {p} (s)", round(s, 3)) for p, s in self.phases]
        rows.append(("duration (s)", round(self.duration_s, 2)))
        return table_text(f"enforce {self.table}.{self.key}: {verdict}", rows)


@dataclass(frozen=True, kw_only=True)
class UndoSummary:
    """The end of `undo`: what was (or, on a dry run, would be) put back."""

    run_id: str | None  # the undo's own run (None on a dry run: nothing is recorded)
    undo_of: str
    mode: str  # "dry-run" | "apply"
    status: str  # "completed" | "interrupted" | "blocked"
    table: str
    key: str
    changes: int  # audit rows of the undone run that were examined
    restored: int
    already_restored: int
    changed_since: int
    deleted_since: int
    changed_sample: tuple[str, ...]  # pks of rows changed since, not overwritten
    blocked_by: str | None  # the unique index that must be dropped first
    batches: int
    retries: int
    duration_s: float
    sample: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # the impact governor, as in RunSummary (None: --max-impact off, or a dry run)
    impact_p99_ms: float | None = None
    impact_baseline_ms: float | None = None
    impact_target: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"sample": list(self.sample)}

    def to_text(self) -> str:
        verb = "rows restored" if self.mode == "apply" else "rows that would be restored"
        rows: list[tuple[str, Any]] = [
            ("undo run id", self.run_id or "-"),
            ("undoes run", self.undo_of),
            ("mode", self.mode),
            ("status", self.status),
            ("audit rows examined", self.changes),
            (verb, self.restored),
            ("already restored", self.already_restored),
            ("changed since (kept)", self.changed_since),
            ("deleted since", self.deleted_since),
        ]
        if self.changed_sample:
            rows.append(("  e.g. pks", ", ".join(self.changed_sample)))
        if self.blocked_by:
            rows.append(("blocked by", self.blocked_by))
        rows += [
            ("batches", self.batches),
            ("retries", self.retries),
            ("duration (s)", round(self.duration_s, 2)),
        ]
        if self.impact_p99_ms is not None or self.impact_target is not None:
            impact = _impact(self.impact_p99_ms, self.impact_baseline_ms, self.impact_target)
            rows.append(("impact", impact))
        out = table_text(f"undo on {self.table}.{self.key}", rows)
        if self.sample:
            out += "\n  sample:"
            for s in self.sample:
                out += f"\n    pk {s['pk']}: {s['from']!r} -> {s['to']!r}"
        return out


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """One row of `<state-schema>.runs`."""

    run_id: str
    command: str
    table: str
    key: str
    pk: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    rows_changed: int
    options: dict[str, Any]
    skipped_groups: int = 0  # on record as skipped: a resume retries them
    pk_columns: tuple[str, ...] = ()  # the column(s) its audit's `pk` names (several: composite)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat()
        d["finished_at"] = self.finished_at.isoformat() if self.finished_at else None
        return d


def _when(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S%z") if t else "-"


def _impact(p99: float | None, baseline: float | None, target: float | None) -> str:
    if target is None:
        return "off"
    if p99 is None or not baseline:
        return f"measuring (budget {target:g}x)"
    ratio = p99 / baseline
    return f"probe p99 {p99:.1f} / baseline {baseline:.1f} ms = {ratio:.1f}x (budget {target:g}x)"


@dataclass(frozen=True, kw_only=True)
class RunsList:
    state_schema: str
    runs: tuple[RunInfo, ...]
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state_schema": self.state_schema,
            "runs": [r.to_json() for r in self.runs],
            "note": self.note,
        }

    def to_text(self) -> str:
        if not self.runs:
            return f"no runs{': ' + self.note if self.note else ''}"
        header = (
            "run id",
            "command",
            "table.key",
            "status",
            "started",
            "finished",
            "rows",
            "skipped groups",
        )
        lines = [
            (
                r.run_id,
                r.command,
                f"{r.table}.{r.key}",
                r.status,
                _when(r.started_at),
                _when(r.finished_at),
                f"{r.rows_changed:,}",
                f"{r.skipped_groups:,}",
            )
            for r in self.runs
        ]
        widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]
        out = []
        for cells in [header, *lines]:
            out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        for r in self.runs:
            if r.options:
                opts = json.dumps(r.options, default=str, ensure_ascii=False, sort_keys=True)
                out.append(f"  {r.run_id} options: {opts}")
        return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Change:
    """One audit row: the key of row `pk` went from `old_value` to `new_value`. For a
    composite primary key, `pk` is the JSON array of its columns' text forms and `pk_values`
    names them: {"id": "7", "region": "eu"}."""

    id: int
    pk: str
    old_value: str
    new_value: str
    changed_at: datetime
    pk_values: dict[str, str] | None = None

    @property
    def pk_shown(self) -> str:
        """The pk for a human: the value, or a composite key's values as (7, eu)."""
        if self.pk_values is None:
            return self.pk
        return "(" + ", ".join(self.pk_values.values()) + ")"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pk": self.pk if self.pk_values is None else self.pk_values,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "changed_at": self.changed_at.isoformat(),
        }


@dataclass(frozen=True, kw_only=True)
class InitStateResult:
    """What `init-state` created in the state schema and granted."""

    state_schema: str
    created: tuple[str, ...]  # e.g. "table bulkdedupe.runs"; empty: everything was there
    role: str | None
    granted: tuple[str, ...]  # the GRANT statements executed
    version: int | None = None  # of the state schema, now
    upgraded_from: int | None = None  # the version an earlier release left, upgraded in place

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        version = f" (version {self.version})" if self.version is not None else ""
        lines = [
            f"state schema {self.state_schema} ready{version}",
            f"  created  {', '.join(self.created) if self.created else 'nothing (all there)'}",
        ]
        if self.upgraded_from is not None:
            lines.append(f"  upgraded in place from version {self.upgraded_from}")
        if self.role is not None:
            lines.append(f"  granted to {self.role}:")
            lines += [f"    {g};" for g in self.granted]
        return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


@dataclass(frozen=True, kw_only=True)
class RunStatus:
    """`bulkdedupe status`: where a run is, from its runs row and the run lock.

    `state`: running, throttled (max-rate/sleep in effect), paused (with `reasons`), stopping,
    gone (marked running but no live process: crashed or killed), or the final status."""

    run_id: str
    command: str
    table: str
    key: str
    status: str
    state: str
    alive: bool
    reasons: tuple[str, ...]
    throttled_by: tuple[str, ...]
    stop_reason: str | None
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    seconds_since_update: float
    scanned_rows: int | None
    estimated_rows: int | None
    groups_found: int | None
    groups_done: int | None
    rows_renamed: int
    rows_skipped: int
    rows_per_s: float | None
    eta_s: float | None
    batch_size: int | None
    batch_ceiling: int | None
    concurrency: int | None
    pid: int | None
    host: str | None
    skipped_groups: int = 0  # on record as skipped: a resume retries them
    # the impact governor (None: off): probe p99 and baseline (ms), budget ratio, pace (rows/s)
    impact_p99_ms: float | None = None
    impact_baseline_ms: float | None = None
    impact_target: float | None = None
    pace: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("started_at", "updated_at", "finished_at"):
            d[k] = d[k].isoformat() if d[k] else None
        d["reasons"] = list(self.reasons)
        d["throttled_by"] = list(self.throttled_by)
        return d

    def to_text(self) -> str:
        state = self.state
        if self.reasons:
            state += ": " + "; ".join(self.reasons)
        elif self.state == "throttled":
            state += ": " + ", ".join(self.throttled_by)
        scanned = "-"
        if self.scanned_rows is not None:
            scanned = f"{self.scanned_rows:,}"
            if self.estimated_rows:
                pct = min(100.0, 100 * self.scanned_rows / self.estimated_rows)
                scanned += f" of ~{self.estimated_rows:,} ({pct:.0f}%)"
        rows: list[tuple[str, Any]] = [
            ("state", state),
            ("process", f"pid {self.pid} on {self.host}" if self.alive else "none alive"),
            ("started", _when(self.started_at)),
            ("last update", f"{self.seconds_since_update:g}s ago"),
        ]
        if self.finished_at:
            rows.append(("finished", _when(self.finished_at)))
        if self.stop_reason:
            rows.append(("stopped because", self.stop_reason))
        rows += [
            ("rows scanned", scanned),
            ("groups done", f"{self.groups_done or 0:,} of {self.groups_found or 0:,} found"),
            ("rows renamed", self.rows_renamed),
            ("rows skipped", self.rows_skipped),
            ("groups skipped", self.skipped_groups),
            ("impact", _impact(self.impact_p99_ms, self.impact_baseline_ms, self.impact_target)),
            ("rate (rows/s)", "-" if self.rows_per_s is None else self.rows_per_s),
            ("ETA", _duration(self.eta_s)),
            ("batch size", f"{self.batch_size or '-'} (ceiling {self.batch_ceiling or '-'})"),
            ("concurrency", "-" if self.concurrency is None else self.concurrency),
        ]
        return table_text(
            f"run {self.run_id} ({self.command}, {self.status}) on {self.table}.{self.key}", rows
        )


@dataclass(frozen=True, kw_only=True)
class ControlResult:
    """`pause`/`resume`/`stop`/`set`: the running process has obeyed the request."""

    run_id: str
    verb: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"acknowledged": True}

    def to_text(self) -> str:
        what = self.verb
        if self.settings:
            what += " " + ", ".join(
                f"{k.replace('_', '-')}={'off' if v is None else v}"
                for k, v in sorted(self.settings.items())
            )
        return f"run {self.run_id}: {what}: done (the running process obeyed)"
