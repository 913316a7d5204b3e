"""Turns a benchmark run's results into the issues' targets (PASS/FAIL), a markdown summary and
PNG plots (throughput vs concurrency; OLTP latency over time per method; the impact frontier,
whose section and floors live in ``impact.py``; the giant-group part's in ``giant.py``; the
partitioned part's in ``partitioned.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

__all__ = ["broken", "markdown", "one_line", "plots", "targets"]

MB: Final = 1024 * 1024
# The issues' floors. Issue 10: the engine at full speed (--max-impact off) within 0.4x the
# one-statement UPDATE at 5M rows (shown, not judged, on smaller tables); the "10x the per-row
# script" floor retired (this machine's 0.4 ms fsync makes that script only 2-3x slower than
# the UPDATE), and the OLTP floors now the governor's (impact.py).
MAX_TIME_VS_ONE_STATEMENT: Final = 0.4
TIME_FLOOR_FROM_ROWS: Final = 5_000_000
MAX_BATCH_P99_MS: Final = 250.0
MAX_BATCH_MS: Final = 1000.0
MAX_OLTP_P99_VS_IDLE: Final = 3.0
MAX_RSS_BYTES: Final = 200 * MB
# "The same at 1M and 5M rows": within a quarter.
MAX_RSS_GROWTH: Final = 1.25
# 5M / 1M <= 5.5x: linear, with 10% slack.
LINEAR_SLACK: Final = 1.1


def _size(rows: int) -> str:
    if rows >= 1_000_000 and rows % 100_000 == 0:
        return f"{rows / 1_000_000:g}M"
    if rows >= 1000 and rows % 100 == 0:
        return f"{rows / 1000:g}k"
    return str(rows)


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def broken(r: dict[str, Any]) -> bool:
    """A method that ran and did not leave the expected table."""
    ran = r["method"] != "idle" and r.get("available", True)
    return ran and not r.get("correctness", {}).get("passed")


def one_line(r: dict[str, Any]) -> str:
    if not r.get("available", True):
        return f"{_size(r['rows'])} {r['label']}: " + "; ".join(r.get("notes", []))
    o = r.get("oltp", {})
    oltp = f"OLTP p99 {_f(o.get('p99_ms'), 1)} ms, max {_f(o.get('max_ms'), 1)} ms"
    if "oltp" not in r:
        oltp = "no load"  # the partitioned part
    if r["method"] == "idle":
        return f"{_size(r['rows'])} {r['label']}: {oltp}"
    if "rows_renamed" not in r:
        return f"{_size(r['rows'])} {r['label']}: FAILED"
    ok = "ok" if r.get("correctness", {}).get("passed") else "WRONG RESULT"
    est = f" (est. {r['estimated_duration_s']:.0f} s)" if r["extrapolated"] else ""
    return (
        f"{_size(r['rows'])} {r['label']}: {r['rows_renamed']:,} rows in {r['duration_s']:.1f} s"
        f"{est}"
        f", txn p99 {_f(r['txn_ms_p99'], 1)} ms, RSS {r['peak_rss_bytes'] / MB:.0f} MB, "
        f"{oltp}, {ok}"
    )


# --- targets ------------------------------------------------------------------------------


def _find(results: dict[str, Any], rows: int, pred: Any) -> dict[str, Any] | None:
    """The first method of the matrix part at ``rows`` that ran and matches ``pred``."""
    return next(
        (r for r in _matrix(results) if r["rows"] == rows and pred(r) and "oltp" in r), None
    )


def part_records(
    results: dict[str, Any], part: str, rows: int | None = None
) -> list[dict[str, Any]]:
    """The records of one part of the suite (impact, giant, partitioned), of one size or all."""
    return [
        r
        for r in results["methods"]
        if r.get("part") == part and (rows is None or r["rows"] == rows)
    ]


def part_sizes(results: dict[str, Any], part: str) -> list[int]:
    """The table sizes a part of the suite ran at, smallest first."""
    return sorted({r["rows"] for r in part_records(results, part)})


def _matrix(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["methods"] if r.get("part", "matrix") == "matrix"]


def _standard_datasets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The data sets of the matrix and impact parts (the giant part's have other shapes)."""
    return [ds for ds in results["datasets"] if ds.get("shape", "standard") == "standard"]


def _defaults(results: dict[str, Any], rows: int) -> dict[str, Any] | None:
    return _find(results, rows, lambda r: r.get("default_config") and "duration_s" in r)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate the issue's targets on what this run measured. Status PASS, FAIL or SKIP."""
    out: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        out.append({"target": name, "status": status, "detail": detail})

    sizes = sorted({r["rows"] for r in _matrix(results)})
    wrong = [f"{_size(r['rows'])} {r['label']}" for r in results["methods"] if broken(r)]
    add(
        "every method leaves the expected table (no duplicates, same renames, nothing lost)",
        not wrong,
        "all checked" if not wrong else "failed: " + ", ".join(wrong),
    )
    for rows in sizes:
        s = _size(rows)
        d = _defaults(results, rows)
        if d is None:
            add(f"{s}: bulkdedupe defaults measured", None, "no defaults run at this size")
            continue
        one = _find(results, rows, lambda r: r["method"] == "one-statement")
        per = _find(results, rows, lambda r: r["method"] == "per-row")
        idle = [
            r["oltp"]["p99_ms"]
            for r in _matrix(results)
            if r["rows"] == rows and r["method"] == "idle" and "oltp" in r
        ]
        ratio = d.get("time_vs_one_statement")
        judged = rows >= TIME_FLOOR_FROM_ROWS
        ok = None if ratio is None else ratio <= MAX_TIME_VS_ONE_STATEMENT
        detail = (
            f"{d['duration_s']:.1f} s vs {one['duration_s']:.1f} s = {ratio:.2f}x"
            if one and ratio is not None
            else "no one-statement run"
        )
        name = f"{s}: run time (--max-impact off) <= {MAX_TIME_VS_ONE_STATEMENT}x the UPDATE"
        if judged or ok is None:
            add(name, ok, detail)
        else:
            _shown(out, name + f" (judged from {_size(TIME_FLOOR_FROM_ROWS)} rows)", detail)
        if per and "estimated_duration_s" in per and d["duration_s"] > 0:
            speedup = per["estimated_duration_s"] / d["duration_s"]
            est = " (extrapolated)" if per["extrapolated"] else ""
            _shown(
                out,
                f"{s}: speed-up over the per-row script (the 10x floor is retired)",
                f"{per['estimated_duration_s']:.0f} s{est} / {d['duration_s']:.1f} s = "
                f"{speedup:.1f}x",
            )
        add(
            f"{s}: p99 batch transaction <= {MAX_BATCH_P99_MS:g} ms",
            d["txn_ms_p99"] <= MAX_BATCH_P99_MS,
            f"p99 {d['txn_ms_p99']:.0f} ms over {d['transactions']} batches",
        )
        add(
            f"{s}: max batch transaction <= {MAX_BATCH_MS / 1000:g} s",
            d["txn_ms_max"] <= MAX_BATCH_MS,
            f"max {d['txn_ms_max']:.0f} ms",
        )
        o = d["oltp"]
        # At full speed: the governor's floors (impact part) judge what the application feels.
        if idle and min(idle) > 0:
            # Before and after all methods, averaged: a shared machine's noise shows in the gap.
            base = sum(idle) / len(idle)
            seen = " and ".join(f"{v:.1f}" for v in idle)
            _shown(
                out,
                f"{s}: OLTP p99 during the run vs idle (at full speed; floor: impact part)",
                f"{o['p99_ms']:.1f} ms vs idle {seen} ms (mean {base:.1f}) = "
                f"{o['p99_ms'] / base:.1f}x ({o['requests']} requests)",
            )
        _shown(
            out,
            f"{s}: OLTP requests over 1 s during the run (at full speed)",
            f"{o['over_1s']} over 1 s (+{o['unfinished']} unfinished), max {o['max_ms']:.0f} ms",
        )
        add(
            f"{s}: peak RSS of the tool <= {MAX_RSS_BYTES // MB} MB",
            d["peak_rss_bytes"] <= MAX_RSS_BYTES,
            f"{d['peak_rss_bytes'] / MB:.0f} MB",
        )
        if one is not None:
            # Not a target of the tool: the demonstration the issue asks for.
            oo = one["oltp"]
            out.append(
                {
                    "target": f"{s}: the one-statement UPDATE blocks OLTP updates of its rows",
                    "status": "SHOWN" if oo["over_1s"] else "NOT SEEN",
                    "detail": f"held its locks {one['duration_s']:.1f} s; OLTP max "
                    f"{oo['max_ms'] / 1000:.1f} s, {oo['over_1s']} requests over 1 s",
                }
            )
        floor = _find(results, rows, lambda r: r["method"] == "batched")
        if floor is not None and floor.get("duration_s"):
            # Not a target either: the least work any batched, audited fix does for the renames
            # alone (after its GROUP BY), next to the defaults' whole run; and what that least
            # work allows against the per-row script even if finding the groups were free.
            group_by_s = (floor.get("longest_scan_ms") or 0) / 1000
            renames_s = floor["duration_s"] - group_by_s
            detail = (
                f"its renames alone {renames_s:.1f} s (after a {group_by_s:.1f} s GROUP BY); "
                f"bulkdedupe defaults, scan included: {d['duration_s']:.1f} s; floor "
                f"OLTP p99 {floor['oltp']['p99_ms']:.1f} ms"
            )
            if per and per.get("estimated_duration_s") and renames_s > 0:
                detail += (
                    f"; per-row / floor renames = "
                    f"{per['estimated_duration_s'] / renames_s:.1f}x (the most any batched fix "
                    "can be faster than the per-row script here)"
                )
            out.append(
                {
                    "target": f"{s}: the batched floor (no locks, no checks, same audit)",
                    "status": "SHOWN",
                    "detail": detail,
                }
            )
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        ds, db = _defaults(results, small), _defaults(results, big)
        allowed = big / small * LINEAR_SLACK
        if ds and db:
            growth = db["duration_s"] / ds["duration_s"]
            one_s = _find(results, small, lambda r: r["method"] == "one-statement")
            one_b = _find(results, big, lambda r: r["method"] == "one-statement")
            extra = (
                f"; one-statement {one_b['duration_s'] / one_s['duration_s']:.1f}x"
                if one_s and one_b
                else ""
            )
            add(
                f"time grows linearly: {_size(big)}/{_size(small)} <= {allowed:.1f}x",
                growth <= allowed,
                f"{ds['duration_s']:.1f} s -> {db['duration_s']:.1f} s = {growth:.1f}x{extra}",
            )
            rss = db["peak_rss_bytes"] / ds["peak_rss_bytes"]
            add(
                f"peak RSS the same at {_size(small)} and {_size(big)} (<= {MAX_RSS_GROWTH}x)",
                rss <= MAX_RSS_GROWTH,
                f"{ds['peak_rss_bytes'] / MB:.0f} MB -> {db['peak_rss_bytes'] / MB:.0f} MB",
            )
    elif sizes:
        add("time grows linearly with table size", None, "one table size (run --full)")
        add("peak RSS the same at 1M and 5M rows", None, "one table size (run --full)")
    # They format with this module's helpers.
    from benchmarks import giant, impact, partitioned

    return out + impact.targets(results) + giant.targets(results) + partitioned.targets(results)


def _shown(out: list[dict[str, Any]], name: str, detail: str) -> None:
    """A figure worth reading beside the targets that no floor judges."""
    out.append({"target": name, "status": "SHOWN", "detail": detail})


# --- markdown -----------------------------------------------------------------------------

_COLUMNS: Final = (
    "method",
    "time s",
    "rows/s",
    "time vs 1-stmt",
    "txns",
    "txn ms p50 / p99 / max",
    "WAL MB",
    "WAL B/row",
    "scan rows/s",
    "longest scan ms",
    "peak RSS MB",
    "OLTP ms p50 / p99 / max",
    "OLTP > 1 s",
    "correct",
)


def _row(r: dict[str, Any]) -> list[str]:
    o = r.get("oltp") or {}
    oltp = f"{_f(o.get('p50_ms'), 1)} / {_f(o.get('p99_ms'), 1)} / {_f(o.get('max_ms'), 0)}"
    slow = _f(o.get("over_1s")) + (
        f" (+{o['unfinished']} unfinished)" if o.get("unfinished") else ""
    )
    if r["method"] == "idle":
        return [f"{r['label']}: OLTP load only", *[""] * 10, oltp, slow, ""]
    if "rows_renamed" not in r:
        return [r["label"], "failed", *[""] * 9, oltp, slow, "no"]
    time_s = _f(r["duration_s"], 1)
    if r["extrapolated"]:
        time_s = f"~{r['estimated_duration_s']:,.0f} (est.; ran {r['duration_s']:.0f})"
    ratio = r.get("time_vs_one_statement")
    c = r.get("correctness", {})
    return [
        r["label"],
        time_s,
        _f(r.get("rows_per_s")),
        "–" if ratio is None else f"{ratio:.2f}x",
        _f(r["transactions"]),
        f"{_f(r['txn_ms_p50'], 1)} / {_f(r['txn_ms_p99'], 1)} / {_f(r['txn_ms_max'], 0)}",
        _f(r["wal_bytes"] / MB, 0),
        _f(r.get("wal_bytes_per_row")),
        _f(r.get("scan_rows_per_s")),
        _f(r.get("longest_scan_ms"), 0),
        _f(r["peak_rss_bytes"] / MB, 0),
        oltp,
        slow,
        ("yes" if c.get("passed") else "**NO**") + ("" if not r["extrapolated"] else " (partial)"),
    ]


KIND_NAMES: Final = ("update", "insert", "lookup")


def _error_line(error: str) -> str:
    """The operator-facing line of a failed process's output, on one line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    chosen = next((line for line in lines if ": error:" in line), lines[-1] if lines else "")
    return "error: " + chosen[-400:]


def _activity_line(r: dict[str, Any]) -> str | None:
    tool = (r.get("activity") or {}).get("tool")
    if not tool:
        return None
    total = sum(tool.values())
    top = sorted(tool.items(), key=lambda kv: -kv[1])[:5]
    parts = ", ".join(f"{what} {n / total:.0%}" for what, n in top)
    cpu = r.get("process_cpu_s")
    dur = r.get("duration_s") or 0
    own = f"; process CPU {cpu:.1f} s in {dur:.1f} s" if cpu is not None and dur else ""
    return f"{r['label']}: {parts}{own}"


def _table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(results: dict[str, Any]) -> str:
    srv, st, m = results["server"], results["server"]["settings"], results["machine"]
    p = results["parameters"]
    lines = [
        f"# bulkdedupe benchmark: {results['suite']} suite, {results['started_at']}",
        "",
        f"- Server: {srv['version'].split(' on ')[0]}"
        f"{' (embedded)' if srv.get('embedded') else ''}; shared_buffers "
        f"{st.get('shared_buffers_pretty')}, fsync {st.get('fsync')}, synchronous_commit "
        f"{st.get('synchronous_commit')}, full_page_writes {st.get('full_page_writes')}, "
        f"wal_compression {st.get('wal_compression')}, "
        f"max_wal_size {st.get('max_wal_size_pretty')}",
        f"- Machine: {m['cpus']} CPUs, {m['ram_bytes'] / 1024**3:.0f} GB RAM, 1-min load average "
        f"{m['load_avg_at_start'][0]} at start, {m.get('load_avg_at_end', ['?'])[0]} at end "
        f"(other work on the machine moves every figure); suite took "
        f"{results.get('elapsed_s', 0) / 60:.1f} min; code {m.get('git') or '?'}",
    ]
    # A run of the partitioned part alone had no load and no batched floor: say only what ran.
    if any("oltp" in r for r in results["methods"]):
        lines.append(_load_line(p))
    if any(r["method"] == "batched" for r in results["methods"]):
        lines.append(
            "- batched floor: the same renames and audit rows as 1000-row `UPDATE ... FROM "
            "unnest` transactions on 4 connections, without advisory locks, re-reads or checks "
            "of the new values (unsafe on a live table): the least work any batched, audited "
            "fix does."
        )
    lines.append(
        "- Time vs 1-stmt: the method's time over the one-statement UPDATE's in the same run. "
        "WAL excludes the OLTP load's own (its idle rate times the method's duration)."
    )
    extra = p.get("bulkdedupe_extra_args")
    if extra:
        lines.append(
            "- Every bulkdedupe run also had `" + " ".join(extra) + '` (so "defaults" below '
            "means the default concurrency and batch size with these options)."
        )
    for ds in _standard_datasets(results):
        s = ds["stats"]
        lines += [
            "",
            f"## {ds['spec']['rows']:,} rows",
            "",
            f"{s['rows_to_rename']:,} rows to rename ({s['dup_fraction']:.1%}) in "
            f"{s['duplicate_groups']:,} groups, largest {s['largest_group']:,}; database "
            f"{ds['database_bytes'] / MB:,.0f} MB.",
            "",
        ]
        rows = [r for r in _matrix(results) if r["rows"] == ds["spec"]["rows"]]
        if not rows:
            continue  # the impact part's table: below
        lines += _table(_COLUMNS, [_row(r) for r in rows])
        notes = [f"{r['label']}: {n}" for r in rows for n in r.get("notes", [])]
        notes += [
            f"{r['label']}: {len(r['repeats'])} runs, "
            + ", ".join(_f(x["duration_s"], 1) for x in r["repeats"])
            + " s (the median run shown)"
            for r in rows
            if r.get("repeats")
        ]
        notes += [f"{r['label']}: {_error_line(r['error'])}" for r in rows if r.get("error")]
        notes += [
            f"{r['label']}: correctness {r['correctness']}"
            for r in rows
            if r["method"] != "idle" and not r.get("correctness", {}).get("passed")
        ]
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
        lines += [
            "",
            "OLTP latency by request kind, ms: p99 / max (requests over 1 s); then the slowest "
            "statement alone, without its wait for a free connection:",
            "",
        ]
        lines += _table(
            ("method", *KIND_NAMES, "statement max: " + " / ".join(KIND_NAMES)),
            [
                [r["label"]]
                + [
                    f"{_f(k['p99_ms'], 1)} / {_f(k['max_ms'], 0)} ({k['over_1s']})"
                    for k in (r["oltp"]["by_kind"][name] for name in KIND_NAMES)
                ]
                + [
                    " / ".join(
                        _f(r["oltp"]["by_kind"][name].get("statement_max_ms"), 0)
                        for name in KIND_NAMES
                    )
                ]
                for r in rows
                if "oltp" in r
            ],
        )
        lines += [
            "",
            "Where the time went: share of the method's database sessions sampled in each "
            "state (pg_stat_activity every 100 ms; 'idle (client)' = waiting for the tool), and "
            "the tool process's own CPU time:",
            "",
        ]
        lines += [f"- {line}" for r in rows if (line := _activity_line(r))]
        for r in rows:
            if r.get("statements") and r["method"] != "idle":
                lines += ["", f"Top statements during {r['label']} (pg_stat_statements):", ""]
                lines += _table(
                    ("calls", "total ms", "mean ms", "max ms", "blks read", "query"),
                    [
                        [
                            _f(q["calls"]),
                            _f(q["total_ms"]),
                            _f(q["mean_ms"], 1),
                            _f(q["max_ms"]),
                            _f(q["shared_blks_read"]),
                            "`" + q["query"].replace("|", "\\|") + "`",
                        ]
                        for q in r["statements"][:6]
                    ],
                )
    sizes = [ds["spec"]["rows"] for ds in _standard_datasets(results)]
    if len(sizes) > 1:
        lines += ["", "## Scaling", ""]
        header = ["method", *[f"{_size(n)} s" for n in sizes]]
        header += [f"{_size(sizes[-1])}/{_size(sizes[0])}", *[f"RSS {_size(n)} MB" for n in sizes]]
        body = []
        for pick, name in (
            (lambda r: r.get("default_config"), "bulkdedupe defaults"),
            (lambda r: r["method"] == "one-statement", "one-statement UPDATE"),
        ):
            found = [_find(results, n, pick) for n in sizes]
            if any(f is None or "duration_s" not in f for f in found):
                continue
            times = [f["duration_s"] for f in found if f]
            rss = [f["peak_rss_bytes"] / MB for f in found if f]
            body.append(
                [name, *[_f(t, 1) for t in times], f"{times[-1] / times[0]:.1f}x"]
                + [_f(x, 0) for x in rss]
            )
        lines += _table(header, body)
    from benchmarks import giant, impact, partitioned  # they format with this module's helpers

    lines += impact.markdown(results)
    lines += giant.markdown(results)
    lines += partitioned.markdown(results)
    lines += ["", "## Targets (issues 3, 10, 11 and 12)", "", "```"]
    lines += [f"{t['status']:<8} {t['target']}: {t['detail']}" for t in results["targets"]]
    lines += ["```"]
    others = [name for name in results.get("plots", []) if not impact.is_frontier(name)]
    if others:
        lines += ["", *[f"![{name}]({name})" for name in others]]
    lines.append("")
    return "\n".join(lines)


def _load_line(p: dict[str, Any]) -> str:
    load = p.get("load", {"kind": "python"})
    o = p["oltp"]
    if load["kind"] == "pgbench":
        return (
            f"- Load during every method: pgbench ({load.get('version', '?')}) at "
            f"{o['rate']:g} transactions/s over {o['connections']} clients: 60 % update a "
            "payment by id, 20 % insert one reusing an existing transaction_id (a live "
            "duplicate), 20 % look one up by transaction_id; latency from each transaction's "
            "scheduled start (`-R`, no latency limit), so time queued behind a blocked one "
            "counts."
        )
    return (
        f"- OLTP load during every method: {o['rate']:g} requests/s over "
        f"{o['connections']} connections (update by id, insert, look up by "
        "transaction_id); latency from each request's scheduled start, so queueing counts: "
        "when blocked updates hold every connection, as in an application's pool, the other "
        "requests wait too."
    )


# --- plots --------------------------------------------------------------------------------


def plots(results: dict[str, Any], stem: Path) -> list[Path]:
    """Write the PNGs next to ``stem`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    sizes = [ds["spec"]["rows"] for ds in _standard_datasets(results)]

    # Throughput vs concurrency, one line per batch size, at the size with most configurations.
    def configs(n: int) -> int:
        return sum(1 for r in _matrix(results) if r["rows"] == n and r["method"] == "bulkdedupe")

    rows = max(sizes, key=configs) if sizes else 0
    bulk = [
        r
        for r in _matrix(results)
        if r["rows"] == rows and r["method"] == "bulkdedupe" and r.get("rows_per_s")
    ]
    if bulk:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for b in sorted({r["batch_size"] for r in bulk}):
            pts = sorted((r["concurrency"], r["rows_per_s"]) for r in bulk if r["batch_size"] == b)
            ax.plot([c for c, _ in pts], [v for _, v in pts], marker="o", label=f"batch {b}")
        for kind, style in (("one-statement", "--"), ("batched", "-."), ("per-row", ":")):
            base = _find(results, rows, lambda r, k=kind: r["method"] == k)
            if base and base.get("rows_per_s"):
                ax.axhline(base["rows_per_s"], linestyle=style, color="grey", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["concurrency"] for r in bulk}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrency (worker connections)")
        ax.set_ylabel("renamed rows / s")
        ax.set_title(f"bulkdedupe throughput, {rows:,} rows")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = stem.parent / f"{stem.name}-throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    # OLTP latency over time, one panel per method, one figure per table size.
    colors = {"u": "tab:red", "i": "tab:blue", "l": "tab:green"}
    names = {"u": "update", "i": "insert", "l": "lookup"}
    parts = [("matrix", n) for n in sizes] + [("impact", n) for n in sizes]
    for part, n in parts:
        runs = [
            r
            for r in results["methods"]
            if r["rows"] == n and r.get("oltp_timeline") and r.get("part", "matrix") == part
        ]
        if not runs:
            continue
        fig, axes = plt.subplots(
            len(runs), 1, figsize=(8, 1.7 * len(runs) + 0.6), sharey=True, squeeze=False
        )
        for ax, r in zip(axes[:, 0], runs, strict=True):
            for k, color in colors.items():
                pts = [(p[0], max(p[1], 0.01)) for p in r["oltp_timeline"] if p[3] == k]
                ax.scatter(
                    [t for t, _ in pts], [v for _, v in pts], s=3, color=color, label=names[k]
                )
            start, end = r["window_s"]
            ax.axvspan(start, end, color="grey", alpha=0.12)
            if part == "impact":
                ax.axvspan(*r["alone_window_s"], color="tab:green", alpha=0.08)
            ax.axhline(1000, color="black", linewidth=0.6, linestyle=":")
            ax.set_yscale("log")
            ax.set_title(r["label"], fontsize="small", loc="left")
            ax.tick_params(labelsize="small")
        axes[0, 0].legend(fontsize="x-small", loc="upper right", markerscale=3)
        green = "; green: the load alone" if part == "impact" else ""
        axes[-1, 0].set_xlabel(f"seconds (grey: the method running{green}; dotted: 1 s)")
        fig.supylabel("OLTP latency ms")
        what = "impact part, " if part == "impact" else ""
        fig.suptitle(f"OLTP latency over time, {what}{n:,} rows", fontsize="medium")
        fig.tight_layout()
        suffix = "impact-" if part == "impact" else ""
        path = stem.parent / f"{stem.name}-oltp-{suffix}{_size(n)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    from benchmarks import impact

    frontier = impact.frontier_plot(results, stem)
    return [*written, *([frontier] if frontier else [])]
