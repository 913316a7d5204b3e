"""The partitioned part of a benchmark run (issue 11): a ``payments`` table ``PARTITION BY HASH
(merchant_id)``, primary key ``(id, merchant_id)``, transaction_id unique *per merchant*. On
identical fresh copies: the one-statement UPDATE adapted to the scope, ``bulkdedupe run --apply
--scope merchant_id --max-impact off`` and ``bulkdedupe enforce --scope merchant_id --max-impact
off`` (dedupe, then the partitioned unique index: ON ONLY parent, each leaf CONCURRENTLY, ATTACH),
with enforce's phases as its JSON summary reports them; the SQL that checks each end state and
the report's section.

Records are those of ``run.measure_partitioned`` with ``part == "partitioned"``; ``method`` tells
them apart: "one-statement", "bulkdedupe" (run) and "enforce". No load runs beside them: the
pgbench scripts know no merchant_id (their inserts would fail, their lookups by transaction_id
alone would scan every partition).
"""

from __future__ import annotations

import re
from typing import Any, Final

from benchmarks.generate import SCOPE_COLUMN
from benchmarks.report import MB, _error_line, _f, _shown, _size, _table, part_records, part_sizes

__all__ = [
    "CROSS_SCOPE_FRACTION",
    "MERCHANTS",
    "PART",
    "PARTITIONS",
    "PK",
    "SCOPE",
    "markdown",
    "stages",
    "targets",
]

PARTITIONS: Final = 8
MERCHANTS: Final = 1000
# 1 % of the rows in pairs sharing a transaction_id under two merchants: not duplicates within a
# merchant, so a fix that ignored the scope would rename them and fail the check.
CROSS_SCOPE_FRACTION: Final = 0.01
SCOPE: Final = SCOPE_COLUMN
PK: Final = f"id,{SCOPE_COLUMN}"
TABLE: Final = "payments"

# The end state every method must leave, computed on the template: per (merchant_id,
# transaction_id) group the lowest (id, merchant_id) keeps its value, the others become
# {value}-{id}-{merchant_id} (the tool's {value}-{pk} with a composite key). Summed 64-bit hashes
# of (id, merchant_id, value): order-independent and exact.
_CHECKSUM: Final = (
    "sum(hashtextextended(id::text || ':' || merchant_id::text || ':' || "
    "coalesce({value}, '<null>'), 0)::numeric)::text"
)
_RENAMED: Final = "transaction_id || '-' || id::text || '-' || merchant_id::text"
EXPECTED_SQL: Final = f"""
    SELECT {_CHECKSUM.format(value=f"CASE WHEN rn > 1 THEN {_RENAMED} ELSE transaction_id END")}
               AS checksum,
           max(id) AS max_id
    FROM (
        SELECT id, merchant_id, transaction_id,
               row_number() OVER (PARTITION BY merchant_id, transaction_id
                                  ORDER BY id, merchant_id) AS rn
        FROM {TABLE}
    ) AS t
"""
# transaction_ids under more than one merchant: not duplicates, they must stay as they are.
CROSS_SCOPE_SQL: Final = f"""
    SELECT count(*) FROM (
        SELECT transaction_id FROM {TABLE} WHERE transaction_id IS NOT NULL
        GROUP BY transaction_id HAVING count(DISTINCT merchant_id) > 1
    ) AS x
"""
PARTITIONS_SQL: Final = f"SELECT count(*) FROM pg_partition_tree('{TABLE}') WHERE isleaf"
DUPLICATES_SQL: Final = f"""
    SELECT count(*) AS groups, coalesce(sum(n - 1), 0)::bigint AS extra
    FROM (
        SELECT count(*) AS n FROM {TABLE}
        WHERE transaction_id IS NOT NULL
        GROUP BY merchant_id, transaction_id HAVING count(*) > 1
    ) AS d
"""
STATE_SQL: Final = f"""
    SELECT count(*) FILTER (
               WHERE transaction_id LIKE '%-' || id::text || '-' || merchant_id::text
           ) AS renamed,
           {_CHECKSUM.format(value="transaction_id")} AS checksum
    FROM {TABLE}
"""
# The unique index enforce built: valid and unique on the parent, one valid index per leaf
# attached under it, on exactly (merchant_id, transaction_id).
INDEX_SQL: Final = f"""
    SELECT i.indisvalid AS valid, i.indisunique AS is_unique,
           pg_get_indexdef(i.indexrelid) AS definition,
           (SELECT count(*) FROM pg_partition_tree('{TABLE}') WHERE isleaf) AS leaves,
           (SELECT count(*) FROM pg_partition_tree(i.indexrelid) AS t
              JOIN pg_index AS x ON x.indexrelid = t.relid
             WHERE t.isleaf AND x.indisvalid AND x.indisunique) AS valid_leaf_indexes
    FROM pg_index AS i WHERE i.indexrelid = to_regclass($1)
"""


PART: Final = "partitioned"


def _one(group: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    return next((r for r in group if r["method"] == method), None)


def _dataset(results: dict[str, Any], rows: int) -> dict[str, Any] | None:
    return next(
        (
            ds
            for ds in results["datasets"]
            if ds.get("shape") == "partitioned" and ds["spec"]["rows"] == rows
        ),
        None,
    )


def _ran(r: dict[str, Any] | None) -> bool:
    return r is not None and r.get("available", True) and "rows_renamed" in r


def _passed(r: dict[str, Any] | None) -> bool:
    return bool(r and r.get("correctness", {}).get("passed"))


def _why_not(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if not r.get("available", True):
        return "; ".join(r.get("notes", [])) or "not available"
    return "the run failed" + (f" ({_error_line(r['error'])})" if r.get("error") else "")


# --- enforce's phases ---------------------------------------------------------------------

_BUILD: Final = re.compile(r"^build (?P<partition>.+) \(attempt (?P<number>\d+)\)$")


def stages(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Enforce's phases (its JSON ``phases``, in order) grouped into the procedure's stages:
    ``{"stage", "seconds", "count", "detail"}``; the time outside every phase comes last."""
    outcome = {
        (a.get("partition"), int(a["number"])): a["outcome"] for a in summary.get("attempts", [])
    }
    renamed = sum(int(a.get("rows_renamed", 0)) for a in summary.get("attempts", []))
    order = (
        "inspect, create the partitioned index (ON ONLY)",
        "failed builds (duplicates)",
        "drop the invalid index",
        "dedupe (audited run)",
        "build the partitions' unique indexes CONCURRENTLY",
        "attach partition indexes",
        "check valid, prove",
    )
    seconds: dict[str, float] = dict.fromkeys(order, 0.0)
    count: dict[str, int] = dict.fromkeys(order, 0)
    builds: list[float] = []
    other: list[str] = []
    for p in summary.get("phases", []):
        name, s = p["phase"], float(p["seconds"])
        build = _BUILD.match(name)
        if name == "inspect" or name.startswith("create "):
            stage = order[0]
        elif build:
            key = (build["partition"], int(build["number"]))
            stage = order[4] if outcome.get(key, "built") == "built" else order[1]
            if stage == order[4]:
                builds.append(s)
        elif name.startswith("drop invalid index"):
            stage = order[2]
        elif name.startswith("dedupe"):
            stage = order[3]
        elif name.startswith("attach "):
            stage = order[5]
        elif name in ("check valid", "prove"):
            stage = order[6]
        else:
            other.append(name)
            seconds[name] = seconds.get(name, 0.0) + s
            count[name] = count.get(name, 0) + 1
            continue
        seconds[stage] += s
        count[stage] += 1
    out = []
    for stage in [*order, *dict.fromkeys(other)]:
        if not count[stage]:
            continue
        detail = ""
        if stage == order[3]:
            detail = f"{renamed:,} renames"
        elif stage == order[4] and builds:
            detail = (
                f"{len(builds)} partitions, {min(builds):.2f}–{max(builds):.2f} s each"
                if len(builds) > 1
                else "1 partition"
            )
        elif count[stage] > 1:
            detail = f"{count[stage]} steps"
        out.append(
            {"stage": stage, "seconds": seconds[stage], "count": count[stage], "detail": detail}
        )
    total = float(summary.get("duration_s") or 0.0)
    rest = total - sum(seconds.values())
    if total and rest > 0:
        out.append(
            {
                "stage": "outside the phases (connect, locks, catalog)",
                "seconds": rest,
                "count": 0,
                "detail": "",
            }
        )
    return out


# --- targets ------------------------------------------------------------------------------


def _what(rows: int) -> str:
    return f"{_size(rows)} rows over {PARTITIONS} hash partitions, unique per merchant"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per table size: the ratio and enforce's phases shown; enforce's index judged."""
    out: list[dict[str, Any]] = []
    for rows in part_sizes(results, PART):
        group = part_records(results, PART, rows)
        s = _what(rows)
        one, tool, enforce = (_one(group, m) for m in ("one-statement", "bulkdedupe", "enforce"))
        if _ran(one) and _ran(tool) and one and tool and one["duration_s"] > 0:
            _shown(
                out,
                f"{s}: run --apply --scope (--max-impact off) vs the one-statement UPDATE",
                f"{tool['duration_s']:.1f} s vs {one['duration_s']:.1f} s = "
                f"{tool['duration_s'] / one['duration_s']:.2f}x; the UPDATE held the row locks of "
                f"its {_f(one['rows_renamed'])} renames {one['duration_s']:.1f} s, the tool's "
                f"batches p99 {_f(tool['txn_ms_p99'])} ms, max {_f(tool['txn_ms_max'])} ms",
            )
        name = (
            f"{s}: enforce builds the partitioned unique index (all {PARTITIONS} partitions "
            "valid and attached) and proves a duplicate is rejected"
        )
        if not _ran(enforce) or enforce is None:
            failed = enforce is not None and enforce.get("available", True)
            status = "FAIL" if failed else "SKIP"
            out.append({"target": name, "status": status, "detail": _why_not(enforce)})
            continue
        idx = enforce.get("correctness", {}).get("index") or {}
        ok = bool(enforce.get("correctness", {}).get("index_ok"))
        out.append(
            {
                "target": name,
                "status": "PASS" if ok else "FAIL",
                "detail": f"{enforce['summary'].get('status')}; valid {idx.get('valid')}, "
                f"{idx.get('valid_leaf_indexes')}/{idx.get('leaves')} leaf indexes valid and "
                f"attached; proof: {enforce['summary'].get('proof')}",
            }
        )
        parts = "; ".join(
            f"{st['stage']} {st['seconds']:.1f} s" for st in enforce.get("stages", [])
        )
        _shown(
            out,
            f"{s}: enforce's phases",
            f"{enforce['duration_s']:.1f} s in all: {parts}",
        )
    return out


# --- markdown -----------------------------------------------------------------------------

_COLUMNS: Final = (
    "method",
    "renames",
    "time s",
    "rows/s",
    "time vs 1-stmt",
    "txns",
    "txn ms p50 / p99 / max",
    "WAL MB",
    "WAL B/row",
    "peak RSS MB",
    "correct",
)


def _row(r: dict[str, Any]) -> list[str]:
    if not r.get("available", True):
        return [r["label"], "not available", *[""] * 9]
    if "rows_renamed" not in r:
        return [r["label"], "failed", *[""] * 8, "no"]
    ratio = r.get("time_vs_one_statement")
    txn = "–"
    if r.get("txn_ms_p99") is not None:
        txn = f"{_f(r['txn_ms_p50'], 1)} / {_f(r['txn_ms_p99'], 1)} / {_f(r['txn_ms_max'], 0)}"
    return [
        r["label"],
        _f(r["rows_renamed"]),
        _f(r["duration_s"], 1),
        _f(r.get("rows_per_s")),
        "–" if ratio is None else f"{ratio:.2f}×",
        _f(r.get("transactions")),
        txn,
        _f((r.get("wal_bytes") or 0) / MB, 0),
        _f(r.get("wal_bytes_per_row")),
        _f(r["peak_rss_bytes"] / MB, 0),
        "yes" if _passed(r) else "**NO**",
    ]


def markdown(results: dict[str, Any]) -> list[str]:
    """The partitioned part's section: per table size, the data, the table, enforce's phases."""
    lines: list[str] = []
    for rows in part_sizes(results, PART):
        group = part_records(results, PART, rows)
        ds = _dataset(results, rows)
        lines += [
            "",
            f"## Partitioned: {rows:,} rows over {PARTITIONS} hash partitions, transaction_id "
            "unique per merchant (issue 11)",
            "",
        ]
        if ds is not None:
            st = ds["stats"]
            lines += [
                f"`payments PARTITION BY HASH (merchant_id)`, {ds.get('partitions', PARTITIONS)} "
                f"partitions, `PRIMARY KEY (id, merchant_id)`, an index on `(merchant_id, "
                f"transaction_id)` created on the parent; {MERCHANTS:,} merchants; "
                f"{st['rows_to_rename']:,} rows to rename ({st['dup_fraction']:.1%}) in "
                f"{st['duplicate_groups']:,} groups within a merchant, largest "
                f"{st['largest_group']:,}; {ds.get('cross_scope_keys', 0):,} transaction_ids "
                "under two merchants each (not duplicates: they must stay); database "
                f"{ds['database_bytes'] / MB:,.0f} MB.",
                "",
            ]
        lines += [
            "Each method on its own fresh copy (vacuumed, analyzed, checkpointed), with no load "
            "beside it (the pgbench scripts know no merchant_id): the one-statement UPDATE "
            "renaming every loser per `(merchant_id, transaction_id)` to "
            "`{value}-{id}-{merchant_id}`; `bulkdedupe run --apply --scope merchant_id "
            "--max-impact off`; `bulkdedupe enforce --scope merchant_id --max-impact off`, "
            "which renames the duplicates when its first partition's build fails on them, then "
            "builds the unique index (`ON ONLY` parent, each partition `CONCURRENTLY`, `ATTACH "
            "PARTITION`) and proves it. Each end state checked: no duplicate within a merchant, "
            "exactly the expected renames (the same table for all three).",
            "",
        ]
        lines += _table(_COLUMNS, [_row(r) for r in group])
        one, tool, enforce = (_one(group, m) for m in ("one-statement", "bulkdedupe", "enforce"))
        if _ran(one) and _ran(tool) and one and tool and one["duration_s"] > 0:
            lines += [
                "",
                f"**bulkdedupe run / one-statement UPDATE: "
                f"{tool['duration_s'] / one['duration_s']:.2f}×** ({tool['duration_s']:.1f} s "
                f"vs {one['duration_s']:.1f} s; the UPDATE holds every renamed row's lock "
                f"until it commits, the tool's longest batch was {_f(tool['txn_ms_max'])} ms).",
            ]
        checksums = {r["correctness"].get("checksum") for r in group if _passed(r)}
        if len(checksums) == 1 and sum(1 for r in group if _passed(r)) > 1:
            lines += ["", "Every method left the same table (end-state checksums equal)."]
        if _ran(enforce) and enforce is not None:
            lines += [
                "",
                f"`enforce`: {enforce['duration_s']:.1f} s in all "
                f"({enforce['duration_s'] / one['duration_s']:.2f}× the UPDATE, which builds no "
                "index), by stage (from its `--format json` phases):"
                if _ran(one) and one and one["duration_s"] > 0
                else f"`enforce`: {enforce['duration_s']:.1f} s in all, by stage (from its "
                "`--format json` phases):",
                "",
            ]
            total = enforce["duration_s"] or 1.0
            lines += _table(
                ("stage", "seconds", "share", ""),
                [
                    [
                        st["stage"],
                        f"{st['seconds']:.2f}",
                        f"{st['seconds'] / total:.0%}",
                        st["detail"],
                    ]
                    for st in enforce.get("stages", [])
                ],
            )
            summary = enforce.get("summary", {})
            phases = "; ".join(
                f"{p['phase']} {p['seconds']:.2f}" for p in summary.get("phases", [])
            )
            idx = enforce["correctness"].get("index") or {}
            lines += [
                "",
                f"Its phases as printed, s: {phases}.",
                "",
                f"Index `{summary.get('index')}`: valid {idx.get('valid')}, unique "
                f"{idx.get('is_unique')}, {idx.get('valid_leaf_indexes')} of "
                f"{idx.get('leaves')} partitions' indexes valid and attached; duplicate "
                f"rejected: {summary.get('proof')}.",
            ]
        notes = [f"{r['label']}: {n}" for r in group for n in r.get("notes", [])]
        notes += [f"{r['label']}: {_error_line(r['error'])}" for r in group if r.get("error")]
        notes += [
            f"{r['label']}: correctness {r['correctness']}"
            for r in group
            if r.get("available", True) and not _passed(r)
        ]
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
    return lines
