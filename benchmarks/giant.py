"""The giant-group part of a benchmark run (issue 12): one junk value shared by a large share of a
table's rows (a single group) renamed by the tool at full speed, against the same number of
renames spread as pairs on a table of the same size, and against the one-statement UPDATE on the
junk data; the issue's floors and the report's section.

Records are those of ``run.measure`` with ``part == "giant"``; ``shape`` tells the data sets
apart: "junk" (the one group, every other key unique) and "pairs".
"""

from __future__ import annotations

from typing import Any, Final

from benchmarks.report import (
    MAX_RSS_BYTES,
    MB,
    _error_line,
    _f,
    _shown,
    _size,
    _table,
    part_records,
    part_sizes,
)

__all__ = ["MIN_SHARE_OF_PAIRS", "PART", "markdown", "targets"]

# Issue 12's floors: the group renamed at >= half the rows/s of ordinary pair-renames of the same
# table size (both --max-impact off), the tool's peak RSS within MAX_RSS_BYTES.
MIN_SHARE_OF_PAIRS: Final = 0.5


PART: Final = "giant"


def _one(group: list[dict[str, Any]], method: str, shape: str) -> dict[str, Any] | None:
    return next((r for r in group if r["method"] == method and r.get("shape") == shape), None)


def _dataset(results: dict[str, Any], rows: int, shape: str) -> dict[str, Any] | None:
    return next(
        (
            ds
            for ds in results["datasets"]
            if ds.get("shape") == shape and ds["spec"]["rows"] == rows
        ),
        None,
    )


def _ran(r: dict[str, Any] | None) -> bool:
    return r is not None and r.get("available", True) and "rows_renamed" in r


def _group_rows(results: dict[str, Any], rows: int, group: list[dict[str, Any]]) -> int:
    ds = _dataset(results, rows, "junk")
    if ds is not None:
        return int(ds["stats"]["largest_group"])
    g = _one(group, "bulkdedupe", "junk") or _one(group, "one-statement", "junk")
    return int(g["largest_group"]) if g and g.get("largest_group") else 0


def _what(rows: int, group_rows: int) -> str:
    """How the floors name one table size: "200k group (20% of 1M rows)"."""
    share = group_rows / rows if rows else 0.0
    return f"{_size(group_rows)} group ({share:.0%} of {_size(rows)} rows)"


def _why_not(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if not r.get("available", True):
        return "; ".join(r.get("notes", [])) or "not available"
    return "the run failed" + (f" ({_error_line(r['error'])})" if r.get("error") else "")


def _rate(r: dict[str, Any]) -> str:
    return f"{_f(r.get('rows_per_s'))} rows/s"


# --- targets ------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's floors per table size of the giant part. Status PASS, FAIL, SKIP or SHOWN."""
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "status": status, "detail": detail})

    for rows in part_sizes(results, PART):
        group = part_records(results, PART, rows)
        s = _what(rows, _group_rows(results, rows, group))
        g = _one(group, "bulkdedupe", "junk")
        pairs = _one(group, "bulkdedupe", "pairs")
        one = _one(group, "one-statement", "junk")
        speed = (
            f"{s}: rows/s >= {MIN_SHARE_OF_PAIRS:.0%} of the same renames as pairs "
            "(--max-impact off)"
        )
        rss = f"{s}: peak RSS of the tool <= {MAX_RSS_BYTES // MB} MB"
        if not _ran(g):
            failed = g is not None and g.get("available", True)
            add(speed, False if failed else None, _why_not(g))
            add(rss, False if failed else None, _why_not(g))
            continue
        assert g is not None
        stopped = bool(g.get("extrapolated"))
        passed = bool(g.get("correctness", {}).get("passed"))
        if not _ran(pairs) or not pairs or not pairs.get("rows_per_s"):
            add(speed, None, f"group {_rate(g)}; pairs: {_why_not(pairs)}")
        else:
            ratio = (g.get("rows_per_s") or 0.0) / pairs["rows_per_s"]
            detail = (
                f"{_f(g['rows_renamed'])} renames in {g['duration_s']:.1f} s = {_rate(g)} vs "
                f"pairs {_f(pairs['rows_renamed'])} in {pairs['duration_s']:.1f} s = "
                f"{_rate(pairs)}: {ratio:.2f}x"
            )
            if pairs.get("extrapolated"):
                detail += " (the pairs run was stopped by --max-runtime too)"
            if stopped:
                detail = f"stopped by --max-runtime before the end; {detail}"
            elif not passed:
                detail = f"wrong result; {detail}"
            ok = ratio >= MIN_SHARE_OF_PAIRS and not stopped and passed
            add(speed, ok, detail)
        mb = g["peak_rss_bytes"] / MB
        detail = f"{mb:.0f} MB"
        if _ran(pairs) and pairs and pairs.get("peak_rss_bytes"):
            detail += f" (pairs: {pairs['peak_rss_bytes'] / MB:.0f} MB)"
        within = g["peak_rss_bytes"] <= MAX_RSS_BYTES
        if stopped and within:
            # A run stopped early may not have reached its peak.
            add(rss, None, f"{detail} before it was stopped")
        else:
            add(rss, within, detail)
        if _ran(one) and one and one.get("duration_s"):
            est = g["estimated_duration_s"]
            _shown(
                out,
                f"{s}: the tool vs the one-statement UPDATE on the same data",
                f"{'~' if stopped else ''}{est:.1f} s vs {one['duration_s']:.1f} s = "
                f"{est / one['duration_s']:.2f}x; the UPDATE renamed "
                f"{_f(one['rows_renamed'])} rows in one transaction (its row locks held "
                f"{one['duration_s']:.1f} s), the tool's batches p99 {_f(g['txn_ms_p99'])} ms, "
                f"max {_f(g['txn_ms_max'])} ms",
            )
    return out


# --- markdown -----------------------------------------------------------------------------

_COLUMNS: Final = (
    "method",
    "renames",
    "time s",
    "rows/s",
    "vs pairs",
    "time vs 1-stmt",
    "txns",
    "txn ms p50 / p99 / max",
    "WAL B/row",
    "peak RSS MB",
    "pgbench p99 ms",
    "correct",
)


def _row(r: dict[str, Any], pairs: dict[str, Any] | None) -> list[str]:
    if not r.get("available", True):
        return [r["label"], "not available", *[""] * 10]
    if "rows_renamed" not in r:
        return [r["label"], "failed", *[""] * 9, "no"]
    time_s = _f(r["duration_s"], 1)
    if r.get("extrapolated"):
        time_s = f"~{r['estimated_duration_s']:,.0f} (est.; ran {r['duration_s']:.0f})"
    vs_pairs = "–"
    if r["method"] == "bulkdedupe" and pairs and pairs.get("rows_per_s") and r is not pairs:
        share = (r.get("rows_per_s") or 0.0) / pairs["rows_per_s"]
        met = share >= MIN_SHARE_OF_PAIRS and not r.get("extrapolated")
        vs_pairs = f"**{share:.2f}×**" if met else f"{share:.2f}×"
    ratio = r.get("time_vs_one_statement")
    passed = r.get("correctness", {}).get("passed")
    return [
        r["label"],
        _f(r["rows_renamed"]),
        time_s,
        _f(r.get("rows_per_s")),
        vs_pairs,
        "–" if ratio is None else f"{ratio:.2f}×",
        _f(r["transactions"]),
        f"{_f(r['txn_ms_p50'], 1)} / {_f(r['txn_ms_p99'], 1)} / {_f(r['txn_ms_max'], 0)}",
        _f(r.get("wal_bytes_per_row")),
        _f(r["peak_rss_bytes"] / MB, 0),
        _f((r.get("oltp") or {}).get("p99_ms"), 1),
        ("yes" if passed else "**NO**") + (" (partial)" if r.get("extrapolated") else ""),
    ]


def _status(results: dict[str, Any], prefix: str) -> str:
    found = [t for t in results.get("targets", []) if t["target"].startswith(prefix)]
    return ", ".join(f"{t['status']}" for t in found) or "not judged"


def markdown(results: dict[str, Any]) -> list[str]:
    """The giant part's section: per table size, the data, the table, the floors."""
    lines: list[str] = []
    p = results["parameters"].get("giant", {})
    junk = p.get("junk_value", "")
    for rows in part_sizes(results, PART):
        group = part_records(results, PART, rows)
        group_rows = _group_rows(results, rows, group)
        pairs_ds = _dataset(results, rows, "pairs")
        renames = max(0, group_rows - 1)
        pair_renames = pairs_ds["stats"]["rows_to_rename"] if pairs_ds else renames
        lines += [
            "",
            f"## Giant groups: one junk value in {group_rows / rows if rows else 0:.0%} of "
            f"{rows:,} rows, a {group_rows:,}-row group (issue 12)",
            "",
            f"The junk data: `transaction_id = {_quoted(junk)}` in {group_rows:,} of {rows:,} "
            f"rows (one group, {renames:,} renames), every other key unique. The pairs data: a "
            f"table of the same size with {pair_renames:,} renames spread as pairs. Each method "
            "on its own fresh copy, under the same load (whose inserts and lookups never use "
            "the junk value: one lookup of it would read the whole group); the tool at its "
            "defaults with `--max-impact off`, stopped after "
            f"{p.get('max_seconds', 0):g} s (`--max-runtime`) at the latest. rows/s = renames "
            "/ the tool's own duration, scan included; **bold**: the floor met.",
            "",
        ]
        pairs = _one(group, "bulkdedupe", "pairs")
        lines += _table(_COLUMNS, [_row(r, pairs) for r in group])
        s = _what(rows, group_rows)
        lines += [
            "",
            f"Floors: the group at >= {MIN_SHARE_OF_PAIRS:.0%} of the pairs' rows/s: "
            f"**{_status(results, s + ': rows/s')}**; the tool's peak RSS <= "
            f"{MAX_RSS_BYTES // MB} MB: **{_status(results, s + ': peak RSS')}** (details under "
            "Targets).",
        ]
        notes = [f"{r['label']}: {n}" for r in group for n in r.get("notes", [])]
        notes += [f"{r['label']}: {_error_line(r['error'])}" for r in group if r.get("error")]
        notes += [
            f"{r['label']}: correctness {r['correctness']}"
            for r in group
            if r.get("available", True) and not r.get("correctness", {}).get("passed")
        ]
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
    return lines


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
