"""What the commands return: frozen dataclasses that render as a human table or as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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

    @property
    def ok(self) -> bool:
        return self.groups == 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["largest_groups"] = [{"value": k, "rows": n} for k, n in self.largest_groups]
        d["ok"] = self.ok
        return d

    def to_text(self) -> str:
        out = table_text(
            f"scan of {self.table}.{self.key}",
            [
                ("estimated rows", self.estimated_rows),
                ("index entries scanned", self.scanned_rows),
                ("duplicate groups", self.groups),
                ("rows to rename", self.rows_to_rename),
                ("scan index", self.index or "-"),
                ("duration (s)", round(self.duration_s, 2)),
            ],
        )
        if self.largest_groups:
            out += "\n  largest groups:"
            for k, n in self.largest_groups:
                out += f"\n    {n:>8,}  {k!r}"
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
    status: str  # "completed" | "interrupted" | "failed"
    table: str
    key: str
    groups: int
    rows_renamed: int
    rows_skipped: int
    skipped: dict[str, int]
    batches: int
    retries: int
    scanned_rows: int
    duration_s: float
    rows_per_s: float
    batch_ms_p50: float
    batch_ms_p99: float
    batch_ms_max: float
    longest_scan_page_ms: float
    output: str | None = None
    sample: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def failed_rows(self) -> int:
        """Rows left duplicated because of errors (not because the group went away)."""
        return sum(n for reason, n in self.skipped.items() if reason != "no_longer_duplicate")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"sample": list(self.sample)}

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
        ]
        if self.output:
            rows.append(("plan written to", self.output))
        out = table_text(f"run of {self.table}.{self.key}", rows)
        if self.sample:
            out += "\n  sample:"
            for s in self.sample:
                out += f"\n    pk {s['pk']}: {s['old_value']!r} -> {s['new_value']!r}"
        return out
