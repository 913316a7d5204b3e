"""Pure planning, no I/O: which row of a group survives, which are renamed, and the sequence of
deterministic candidate values for a renamed row that fit the column's declared length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

# How many candidates are tried for one row before it is skipped as "no_unique_value".
MAX_ATTEMPTS = 50


# NamedTuples, not frozen dataclasses: a batch builds thousands of them while its transaction
# is open, and a frozen dataclass costs several times more to create.
class Row(NamedTuple):
    pk: Any
    value: str


class GroupPlan(NamedTuple):
    """One duplicate group as read under lock: the survivor and the rows to rename now
    (`rest` counts the rows left for a later transaction when the batch budget is reached)."""

    key: str
    survivor: Row
    losers: tuple[Row, ...]
    rest: int


def group_rows(rows: Sequence[Row]) -> list[list[Row]]:
    """Split rows sorted by key (then by the keep order) into runs of equal keys."""
    groups: list[list[Row]] = []
    for row in rows:
        if groups and groups[-1][0].value == row.value:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def plan_groups(rows: Sequence[Row], budget: int) -> tuple[list[GroupPlan], list[str]]:
    """Plan renames for rows sorted by key then keep order, at most `budget` renames in all.

    Returns the plans and the keys that are no longer duplicated (skipped). The first row of
    each group survives; groups that do not fit the budget are cut (their `rest` > 0) so that a
    group larger than the batch size is worked off over several transactions.
    """
    plans: list[GroupPlan] = []
    single: list[str] = []
    for group in group_rows(rows):
        if len(group) < 2:
            single.append(group[0].value)
            continue
        take = min(len(group) - 1, budget)
        if take <= 0:
            # the budget is spent: leave the whole group for the next transaction
            plans.append(GroupPlan(group[0].value, group[0], (), len(group) - 1))
            continue
        losers = tuple(group[1 : 1 + take])
        plans.append(GroupPlan(group[0].value, group[0], losers, len(group) - 1 - take))
        budget -= take
    return plans, single


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

    With `char_semantics` (char(n) columns) trailing blanks are insignificant, as in
    PostgreSQL: they are stripped before rendering and when comparing to the old value.
    """
    base = value.rstrip(" ") if char_semantics else value
    seen: set[str] = set()
    for attempt in range(MAX_ATTEMPTS):
        c = candidate(template, base, pk, attempt, max_length)
        if c is None:
            if attempt == 0:
                continue
            return
        if char_semantics:
            c = c.rstrip(" ")
        if c == base or c in seen or not c:
            continue
        seen.add(c)
        yield c
