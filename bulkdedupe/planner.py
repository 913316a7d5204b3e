"""Pure planning, no I/O: which row of a group survives, which are renamed, and the sequence of
deterministic candidate values for a renamed row that fit the column's declared length."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from typing import Any, NamedTuple

# How many candidates are tried for one row before it is skipped as "no_unique_value".
MAX_ATTEMPTS = 50


# NamedTuples, not frozen dataclasses: a batch builds thousands of them while its transaction
# is open, and a frozen dataclass costs several times more to create.
class Row(NamedTuple):
    pk: Any
    value: str
    group: str | None = None  # with --scope: the row's group (scope values and key, as JSON)


class GroupPlan(NamedTuple):
    """One duplicate group as read under lock: the survivor and the rows to rename now
    (`rest` counts the rows left for a later transaction when the batch budget is reached)."""

    key: str
    survivor: Row
    losers: tuple[Row, ...]
    rest: int


def equality_key(value: str, *, char_semantics: bool) -> str:
    """`value` as the column's equality, and so its unique index, compares it. With
    `char_semantics` (char(n) and bpchar columns) trailing spaces are insignificant: 'a', 'a '
    and 'a  ' are one value. Only spaces, as in PostgreSQL: tabs or no-break spaces count."""
    return value.rstrip(" ") if char_semantics else value


def group_rows(rows: Sequence[Row], *, char_semantics: bool = False) -> list[list[Row]]:
    """Split rows sorted by key (then by the keep order) into runs of equal keys, equal as
    `equality_key` says."""
    groups: list[list[Row]] = []
    last = ""
    for row in rows:
        key = (
            row.group
            if row.group is not None
            else equality_key(row.value, char_semantics=char_semantics)
        )
        if groups and key == last:
            groups[-1].append(row)
        else:
            groups.append([row])
            last = key
    return groups


def plan_groups(
    rows: Sequence[Row],
    budget: int,
    *,
    char_semantics: bool = False,
    asked: Sequence[str] = (),
    decided: Collection[Any] = (),
) -> tuple[list[GroupPlan], list[str]]:
    """Plan renames for rows sorted by key then keep order, at most `budget` renames in all.

    Returns the plans and the keys that are no longer duplicated (skipped). The first row of
    each group survives; groups that do not fit the budget are cut (their `rest` > 0) so that a
    group larger than the batch size is worked off over several transactions.

    Rows are grouped as `group_rows(char_semantics=...)` does. A group is named by the key in
    `asked` it equals (the caller's spelling, which for bpchar may differ from every row's
    padding), else by its first row's value.

    Rows whose pk is in `decided` (losers an earlier transaction of the group already gave up
    on: no new value fits) are never planned again, so every transaction of a group that is
    cut decides new rows and the group's work ends.
    """
    spelling = {equality_key(k, char_semantics=char_semantics): k for k in asked}
    plans: list[GroupPlan] = []
    single: list[str] = []
    for group in group_rows(rows, char_semantics=char_semantics):
        first = group[0]
        if first.group is not None:
            key = first.group  # spelled by the same SQL as the scan's
        else:
            key = spelling.get(
                equality_key(first.value, char_semantics=char_semantics), first.value
            )
        if len(group) < 2:
            single.append(key)
            continue
        open_ = [r for r in group[1:] if r.pk not in decided] if decided else group[1:]
        take = min(len(open_), budget)
        if take <= 0 < len(open_):
            # the budget is spent: leave the whole group for the next transaction
            plans.append(GroupPlan(key, first, (), len(open_)))
            continue
        losers = tuple(open_[:take])
        plans.append(GroupPlan(key, first, losers, len(open_) - take))
        budget -= take
    return plans, single


def pk_label(pk: Any, *, composite: bool, without: int | None = None) -> Any:
    """What `{pk}` renders: the primary key's value, or for a composite key (carried as the JSON
    array of its columns' text forms) those texts joined by `-`: `7-eu`. `without`: the key's
    own place in the primary key (a table partitioned by the key has it there), left out: the
    template's {value} says it already, and it is the value being replaced."""
    if not composite:
        return pk
    parts = json.loads(pk)
    return "-".join(p for i, p in enumerate(parts) if i != without)


def render(template: str, value: str, pk: Any) -> str:
    return template.format(value=value, pk=pk)


def candidate(
    template: str, value: str, pk: Any, attempt: int, max_length: int | None
) -> str | None:
    """The `attempt`-th candidate new value (0 = the template as given), or None if no value
    derived this way fits `max_length` characters.

    Attempt k > 0 appends `~k`. When the result is too long, the original value is shortened
    (the pk and the counter are kept, so values of one group stay distinct).
    """
    suffix = f"~{attempt}" if attempt else ""
    full = render(template, value, pk) + suffix
    if max_length is None or len(full) <= max_length:
        return full
    occurrences = template.count("{value}")
    if occurrences == 0:
        return None
    fixed = len(render(template, "", pk) + suffix)
    room = (max_length - fixed) // occurrences
    if room < 0:
        return None
    return render(template, value[:room], pk) + suffix


def candidates(
    template: str, value: str, pk: Any, max_length: int | None, *, char_semantics: bool = False
) -> Iterator[str]:
    """Distinct candidates for renaming the row (`pk`, `value`), in the order they are tried.

    With `char_semantics` (char(n) and bpchar columns) trailing blanks are insignificant, as
    in PostgreSQL: they are stripped before rendering and from each candidate, so candidates
    differ from the old value and from each other as the column's equality sees them.
    """
    base = equality_key(value, char_semantics=char_semantics)
    seen: set[str] = set()
    for attempt in range(MAX_ATTEMPTS):
        c = candidate(template, base, pk, attempt, max_length)
        if c is None:
            if attempt == 0:
                continue
            return
        c = equality_key(c, char_semantics=char_semantics)
        if c == base or c in seen or not c:
            continue
        seen.add(c)
        yield c
