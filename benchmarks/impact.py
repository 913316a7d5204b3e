"""The impact part of a benchmark run (issue 10): what the application (pgbench) feels while each
method runs, against itself alone right before it; the governor's floors and the frontier plot.

Records are those of ``run.measure`` with ``part == "impact"``; ``role`` tells them apart:
"one-statement", "off" (``--max-impact off``), "default" (the governor at its default budget),
"governor" (another budget), "rate" (a fixed ``--max-rate``, governor off).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from benchmarks.report import (
    MAX_OLTP_P99_VS_IDLE,
    _activity_line,
    _f,
    _shown,
    _size,
    _table,
    part_records,
    part_sizes,
)

__all__ = ["PART", "frontier_plot", "is_frontier", "markdown", "targets"]

# Issue 10's floors, for the defaults on the 2M-row table under the pgbench mix.
MAX_P99_RATIO: Final = MAX_OLTP_P99_VS_IDLE
MAX_MS: Final = 1000.0
MIN_RENAMES_PER_S: Final = 2500.0  # 100k renames in <= 40 s
# The governor against the best fixed pace of the same run that also kept the budget.
MIN_SHARE_OF_BEST_RATE: Final = 0.8


PART: Final = "impact"


def _ran(r: dict[str, Any]) -> bool:
    return r.get("available", True) and "rows_renamed" in r and "oltp_p99_ratio" in r


def _budget(value: Any) -> str:
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return str(value)


def _tool_default(results: dict[str, Any]) -> str | None:
    value = results["parameters"].get("tool_options", {}).get("max_impact_default")
    return None if value is None else _budget(value)


def _ran_at(r: dict[str, Any], results: dict[str, Any]) -> str | None:
    """The `--max-impact` a bulkdedupe run had (None: a tool without the option)."""
    ran = r.get("max_impact_effective")
    if ran is None and results["parameters"].get("tool_options", {}).get("max_impact"):
        ran = _tool_default(results)  # a record from before the field
    return None if ran is None else _budget(ran)


def _label(r: dict[str, Any], results: dict[str, Any]) -> str:
    if r.get("role") != "default":
        return str(r["label"])
    ran = _ran_at(r, results)
    if ran is None:
        return str(r["label"])
    tool = _tool_default(results)
    if tool is not None and tool != _budget(ran):
        # The tool ships the governor off: the suite measures issue 10's default budget.
        return f"bulkdedupe --max-impact {_budget(ran)} (issue 10's default; the tool's: {tool})"
    return f"{r['label']} (--max-impact {_budget(ran)})"


def _time(r: dict[str, Any]) -> str:
    if r.get("extrapolated"):
        return f"~{r['estimated_duration_s']:,.0f} (est.; ran {r['duration_s']:.0f})"
    return _f(r["duration_s"], 1)


def _p99s(r: dict[str, Any]) -> str:
    return f"{_f(r['oltp_alone']['p99_ms'], 1)} → {_f(r['oltp']['p99_ms'], 1)}"


# --- targets ------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The governor's floors, per table size of the impact part. Status PASS, FAIL, SKIP or
    SHOWN (a figure no floor judges)."""
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "status": status, "detail": detail})

    for rows in part_sizes(results, PART):
        s = f"{_size(rows)} impact"
        group = part_records(results, PART, rows)
        d = next((r for r in group if r.get("role") == "default"), None)
        rates = [r for r in group if r.get("role") == "rate" and _ran(r)]
        within = [r for r in rates if r["oltp_p99_ratio"] <= MAX_P99_RATIO]
        best = max(within, key=lambda r: r["rows_per_s"] or 0.0, default=None)
        at = _ran_at(d, results) if d is not None else None
        who = f"{s}: defaults" + (f" (--max-impact {at})" if at else "")
        floors = (
            f"{who}: pgbench p99 during the run <= {MAX_P99_RATIO:g}x alone",
            f"{who}: no pgbench transaction over {MAX_MS / 1000:g} s",
            f"{who}: nothing lost (the table as expected, every insert there)",
            f"{who}: >= {MIN_RENAMES_PER_S:,.0f} renames/s (100k renames in <= 40 s)",
            f"{who}: >= {MIN_SHARE_OF_BEST_RATE:.0%} of the fastest --max-rate "
            f"within {MAX_P99_RATIO:g}x",
        )
        if d is None or not _ran(d):
            why = "; ".join(d.get("notes", [])) if d else "no defaults run"
            if d is not None and d.get("available", True):
                why = "the defaults' run failed"
            for name in floors:
                add(name, None, why)
        else:
            o = d["oltp"]
            add(floors[0], d["oltp_p99_ratio"] <= MAX_P99_RATIO, _ratio_detail(d))
            add(
                floors[1],
                o["over_1s"] == 0 and o["unfinished"] == 0,
                f"{o['over_1s']} over 1 s (+{o['unfinished']} unfinished), max {o['max_ms']:.0f} "
                f"ms of {o['requests']:,}",
            )
            c = d.get("correctness", {})
            add(
                floors[2],
                bool(c.get("passed")),
                f"{c.get('load_inserts_committed', 0):,} inserts committed, "
                f"{c.get('load_rows_in_table', 0):,} in the table, "
                f"{c.get('live_duplicates_left', 0):,} inserted after the run passed their key",
            )
            add(
                floors[3],
                not d["extrapolated"] and (d["rows_per_s"] or 0) >= MIN_RENAMES_PER_S,
                f"{d['rows_renamed']:,} renames in {d['duration_s']:.1f} s = "
                f"{_f(d['rows_per_s'])}/s",
            )
            if best is None:
                add(floors[4], None, f"no fixed rate of the sweep stayed within {MAX_P99_RATIO:g}x")
            else:
                share = (d["rows_per_s"] or 0) / best["rows_per_s"]
                add(
                    floors[4],
                    share >= MIN_SHARE_OF_BEST_RATE,
                    f"{_f(d['rows_per_s'])}/s vs {_f(best['rows_per_s'])}/s of "
                    f"{best['label']} ({best['oltp_p99_ratio']:.1f}x) = {share:.0%}",
                )
        off = next((r for r in group if r.get("role") == "off" and _ran(r)), None)
        if off is not None:
            _shown(
                out,
                f"{s}: --max-impact off (full speed)",
                f"{off['duration_s']:.1f} s; {_ratio_detail(off)}",
            )
        if rates:
            _shown(
                out,
                f"{s}: the fixed rates within {MAX_P99_RATIO:g}x (the frontier)",
                ", ".join(
                    f"{r['max_rate']:g}/s {r['oltp_p99_ratio']:.1f}x"
                    + (" ok" if r in within else "")
                    for r in sorted(rates, key=lambda r: r["max_rate"])
                ),
            )
    return out


def _typical(group: list[dict[str, Any]]) -> float | None:
    return next(
        (r["oltp_alone_typical_p99_ms"] for r in group if "oltp_alone_typical_p99_ms" in r), None
    )


def _ratio_detail(r: dict[str, Any]) -> str:
    typical = r.get("oltp_p99_ratio_typical")
    return (
        f"p99 {r['oltp_alone']['p99_ms']:.1f} ms alone -> {r['oltp']['p99_ms']:.1f} ms during "
        f"= {r['oltp_p99_ratio']:.1f}x ({r['oltp']['requests']:,} transactions)"
        + (f"; {typical:.1f}x the median baseline" if typical is not None else "")
    )


# --- markdown -----------------------------------------------------------------------------

_COLUMNS: Final = (
    "method",
    "tool time s",
    "renames",
    "renames/s",
    "pgbench p99 alone → during ms",
    "ratio",
    "ratio vs median alone",
    "pgbench max ms",
    "> 1 s",
    "batch p99 ms",
    "correct",
)


def _row(r: dict[str, Any], results: dict[str, Any]) -> list[str]:
    label = _label(r, results)
    if not r.get("available", True):
        return [label, "not available", *[""] * 9]
    if "rows_renamed" not in r:
        return [label, "failed", *[""] * 8, "no"]
    o = r["oltp"]
    slow = _f(o["over_1s"]) + (f" (+{o['unfinished']} unfinished)" if o["unfinished"] else "")
    ratio = r.get("oltp_p99_ratio")
    typical = r.get("oltp_p99_ratio_typical")
    passed = r.get("correctness", {}).get("passed")
    return [
        label,
        _time(r),
        _f(r["rows_renamed"]),
        _f(r.get("rows_per_s")),
        _p99s(r),
        _ratio(ratio),
        _ratio(typical),
        _f(o["max_ms"], 0),
        slow,
        _f(r.get("txn_ms_p99"), 0),
        ("yes" if passed else "**NO**") + (" (partial)" if r.get("extrapolated") else ""),
    ]


def _ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"**{value:.1f}×**" if value <= MAX_P99_RATIO else f"{value:.1f}×"


def markdown(results: dict[str, Any]) -> list[str]:
    """The impact part's section: its table, notes, the frontier and where the time went."""
    lines: list[str] = []
    p = results["parameters"]
    for rows in part_sizes(results, PART):
        group = part_records(results, PART, rows)
        lines += [
            "",
            f"## Production impact: {rows:,} rows under pgbench (issue 10)",
            "",
            f"Each method on its own fresh copy of the table; the load alone for "
            f"{p.get('alone_seconds', 0):g} s right before it (p99 *alone*), then while it runs "
            f"(*during*); ratio = during / alone, **bold** within the {MAX_P99_RATIO:g}× "
            "budget (the floors' definition). One stall in a 10 s baseline moves its p99 "
            "several-fold, so the ratio against the median of the part's baselines "
            f"({_f(_typical(group), 1)} ms) is shown beside it; the frontier plots that one. "
            "The governor's default in this checkout: "
            + (
                f"`--max-impact {_tool_default(results)}`."
                if p.get("tool_options", {}).get("max_impact")
                else "not available (this checkout's `run` has no `--max-impact`)."
            )
            + " `--max-rate` runs have `--max-impact off`; tool time includes the scan (and "
            "the governor's baseline); every tool run stops itself after "
            f"{p.get('impact_max_seconds', 0):g} s (`--max-runtime`), its full time then "
            "extrapolated from its rate.",
            "",
        ]
        lines += _table(_COLUMNS, [_row(r, results) for r in group])
        notes = [f"{_label(r, results)}: {n}" for r in group for n in r.get("notes", [])]
        notes += [
            f"{r['label']}: correctness {r['correctness']}"
            for r in group
            if r.get("available", True) and not r.get("correctness", {}).get("passed")
        ]
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
        name = _frontier_name(results, rows)
        if name is not None:
            lines += ["", f"![frontier]({name})"]
        activity = [line for r in group if (line := _activity_line(r))]
        if activity:
            lines += [
                "",
                "Where the time went (share of each method's sampled sessions by state):",
                "",
            ]
            lines += [f"- {line}" for line in activity]
    return lines


# --- the frontier -------------------------------------------------------------------------


def is_frontier(name: str) -> bool:
    return "-frontier-" in name


def _frontier_name(results: dict[str, Any], rows: int) -> str | None:
    suffix = f"-frontier-{_size(rows)}.png"
    return next((n for n in results.get("plots", []) if n.endswith(suffix)), None)


_MARKERS: Final = {
    "one-statement": ("X", "black"),
    "off": ("s", "tab:grey"),
    "default": ("*", "tab:red"),
    "governor": ("D", "tab:purple"),
}


def _x(r: dict[str, Any]) -> float:
    return float(r.get("oltp_p99_ratio_typical") or r["oltp_p99_ratio"])


def frontier_plot(results: dict[str, Any], stem: Path) -> Path | None:
    """Time against the p99 ratio: the fixed rates as a curve, the other methods as points.
    Written next to ``stem``; the largest impact size with a rate that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [
        n for n in part_sizes(results, PART) if any(_ran(r) for r in part_records(results, PART, n))
    ]
    if not sizes:
        return None
    rows = sizes[-1]
    group = [r for r in part_records(results, PART, rows) if _ran(r)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    rates = sorted((r for r in group if r.get("role") == "rate"), key=lambda r: r["max_rate"])
    if rates:
        ax.plot(
            [_x(r) for r in rates],
            [r["estimated_duration_s"] for r in rates],
            marker="o",
            color="tab:blue",
            label="fixed --max-rate (governor off)",
        )
        for r in rates:
            ax.annotate(
                f"{r['max_rate']:g}/s",
                (_x(r), r["estimated_duration_s"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize="small",
            )
    for r in group:
        marker = _MARKERS.get(r.get("role") or "")
        if marker is None:
            continue
        ax.scatter(
            [_x(r)],
            [r["estimated_duration_s"]],
            marker=marker[0],
            color=marker[1],
            s=110 if marker[0] == "*" else 60,
            zorder=3,
            label=_label(r, results).removeprefix("bulkdedupe "),
        )
    ax.axvline(MAX_P99_RATIO, color="tab:red", linestyle="--", linewidth=0.8)
    ax.text(MAX_P99_RATIO, ax.get_ylim()[1], f" {MAX_P99_RATIO:g}× budget", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("pgbench p99 during / the median of the baselines alone (log)")
    ax.set_ylabel("tool time, s (log; stopped runs extrapolated)")
    ax.set_title(f"Time against the application's p99, {rows:,} rows", fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = stem.parent / f"{stem.name}-frontier-{_size(rows)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
