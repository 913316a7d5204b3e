"""The pure planner, property-tested: survivors, the batch budget, and candidate new values that
always fit the column, never repeat and never equal the old value."""

from __future__ import annotations

import itertools

from hypothesis import example, given
from hypothesis import strategies as st

from bulkdedupe.planner import (
    MAX_ATTEMPTS,
    Row,
    candidate,
    candidates,
    equality_key,
    group_rows,
    plan_groups,
)

DEFAULT_TEMPLATE = "{value}-{pk}"

# Keys as they come out of PostgreSQL: any text without NUL, including blanks, combining marks
# and characters outside the BMP.
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
int_pks = st.integers(min_value=1, max_value=10**15)
pks = int_pks | st.text(alphabet="abcdef0123456789-", min_size=1, max_size=36)
templates = st.sampled_from(
    [
        DEFAULT_TEMPLATE,
        "{pk}",
        "{pk}-{value}",
        "dup:{value}:{pk}",
        "{value}{pk}",
        "{value}/{value}/{pk}",
        "{{{value}}}-{pk}",  # literal braces around the value
    ]
)
max_lengths = st.none() | st.integers(min_value=1, max_value=80)


def fits(s: str, max_length: int | None) -> bool:
    return max_length is None or len(s) <= max_length


# --- candidate / candidates ---------------------------------------------------------------------


@given(template=templates, value=values, pk=pks, max_length=max_lengths)
@example(template=DEFAULT_TEMPLATE, value="abcdefghijkl", pk=2, max_length=12)
@example(template=DEFAULT_TEMPLATE, value="é" * 12, pk=123, max_length=12)
@example(template=DEFAULT_TEMPLATE, value="tx1-2", pk=2, max_length=None)
@example(template="{pk}", value="7", pk=7, max_length=None)
def test_candidates_fit_are_distinct_and_never_the_old_value(
    template: str, value: str, pk: object, max_length: int | None
) -> None:
    got = list(candidates(template, value, pk, max_length))
    assert all(fits(c, max_length) for c in got)
    assert len(got) == len(set(got))
    assert value not in got
    assert all(c for c in got)
    assert len(got) <= MAX_ATTEMPTS


@given(template=templates, value=values, pk=pks, max_length=max_lengths)
def test_candidates_are_deterministic(
    template: str, value: str, pk: object, max_length: int | None
) -> None:
    first = list(candidates(template, value, pk, max_length))
    second = list(candidates(template, value, pk, max_length))
    assert first == second


@given(template=templates, value=values, pk=pks, max_length=max_lengths)
def test_first_candidate_is_the_template_when_it_fits(
    template: str, value: str, pk: object, max_length: int | None
) -> None:
    rendered = template.format(value=value, pk=pk)
    first = candidate(template, value, pk, 0, max_length)
    if fits(rendered, max_length):
        assert first == rendered
        if rendered != value:
            assert next(candidates(template, value, pk, max_length)) == rendered
    else:
        assert first != rendered


@given(value=values, pk=pks, attempt=st.integers(0, MAX_ATTEMPTS), max_length=max_lengths)
def test_shortened_candidate_keeps_pk_and_counter(
    value: str, pk: object, attempt: int, max_length: int | None
) -> None:
    c = candidate(DEFAULT_TEMPLATE, value, pk, attempt, max_length)
    suffix = f"-{pk}" + (f"~{attempt}" if attempt else "")
    if c is None:
        # Only when not even the fixed part (separator, pk, counter) fits.
        assert max_length is not None
        assert len(suffix) > max_length
        return
    assert fits(c, max_length)
    # The original value is only ever cut from the end, never altered, and the suffix is whole.
    assert c.endswith(suffix)
    assert value.startswith(c[: -len(suffix)])
    if max_length is not None and len(value) + len(suffix) > max_length:
        assert len(c) == max_length  # shortened exactly as much as needed


@given(value=values, pk=pks, max_length=st.integers(min_value=1, max_value=80))
def test_some_candidate_exists_when_there_is_room_for_pk_and_counter(
    value: str, pk: object, max_length: int
) -> None:
    # Room for "-<pk>~k" (k < 10): at most one of attempts 0..9 can equal the old value.
    if len(f"-{pk}~9") <= max_length:
        assert any(True for _ in candidates(DEFAULT_TEMPLATE, value, pk, max_length))


@given(
    value=values,
    pks_=st.lists(int_pks, min_size=2, max_size=30, unique=True),
    max_length=max_lengths,
    attempt=st.integers(0, 5),
)
def test_rows_of_one_group_get_distinct_candidates(
    value: str, pks_: list[int], max_length: int | None, attempt: int
) -> None:
    # The pk is kept whole after the last "-", so two rows of one group never compete.
    got = [candidate(DEFAULT_TEMPLATE, value, pk, attempt, max_length) for pk in pks_]
    placed = [c for c in got if c is not None]
    assert len(placed) == len(set(placed))


@given(
    stem=st.text(alphabet="ab é", max_size=10),
    pad=st.integers(0, 10),
    pk=int_pks,
    max_length=st.none() | st.integers(min_value=1, max_value=30),
)
def test_char_semantics_ignore_trailing_blanks(
    stem: str, pad: int, pk: int, max_length: int | None
) -> None:
    # char(n): 'ab' and 'ab   ' are the same value, so no candidate may equal the stripped
    # old value, and candidates never carry trailing blanks (PostgreSQL would drop them).
    value = stem + " " * pad
    got = list(candidates(DEFAULT_TEMPLATE, value, pk, max_length, char_semantics=True))
    stripped = value.rstrip(" ")
    assert stripped not in got
    assert all(c == c.rstrip(" ") and c for c in got)
    assert all(fits(c, max_length) for c in got)
    assert len(got) == len(set(got))
    # The padding never changes the result: 'ab' and 'ab   ' plan alike.
    assert got == list(candidates(DEFAULT_TEMPLATE, stripped, pk, max_length, char_semantics=True))


def test_counter_sequence_on_collision() -> None:
    # The documented order: the template, then the template with ~1, ~2, ...
    got = list(itertools.islice(candidates(DEFAULT_TEMPLATE, "tx1", 2, None), 4))
    assert got == ["tx1-2", "tx1-2~1", "tx1-2~2", "tx1-2~3"]


def test_no_candidate_when_nothing_fits() -> None:
    assert list(candidates(DEFAULT_TEMPLATE, "a", 2, 1)) == []
    assert candidate("{pk}", "abc", 12345, 0, 3) is None


# --- plan_groups ----------------------------------------------------------------------------------


@st.composite
def sorted_rows(draw: st.DrawFn) -> list[Row]:
    """Rows sorted by key (as the worker reads them), with unique pks in keep order."""
    sizes = draw(st.lists(st.integers(1, 12), max_size=12))
    key = st.text(alphabet="aAb é", max_size=3)
    keys = sorted(draw(st.lists(key, min_size=len(sizes), max_size=len(sizes), unique=True)))
    pk_iter = iter(draw(st.permutations(range(1, sum(sizes) + 1))))
    return [
        Row(next(pk_iter), key) for key, size in zip(keys, sizes, strict=True) for _ in range(size)
    ]


@given(rows=sorted_rows(), budget=st.integers(0, 60))
def test_plan_groups_keeps_first_row_respects_budget_and_counts_rest(
    rows: list[Row], budget: int
) -> None:
    plans, single = plan_groups(rows, budget)

    by_key: dict[str, list[Row]] = {}
    for r in rows:
        by_key.setdefault(r.value, []).append(r)
    duplicated = {k: g for k, g in by_key.items() if len(g) > 1}

    assert sorted(single) == sorted(k for k, g in by_key.items() if len(g) == 1)
    assert [p.key for p in plans] == [k for k in by_key if k in duplicated]  # key order kept
    renamed = 0
    for p in plans:
        group = duplicated[p.key]
        assert p.survivor == group[0]  # the first row in keep order survives
        assert p.survivor not in p.losers
        # losers are the next rows in keep order, and rest is exactly what is left over
        assert p.losers == tuple(group[1 : 1 + len(p.losers)])
        assert len(p.losers) + p.rest == len(group) - 1
        assert all(r.value == p.key for r in p.losers)
        renamed += len(p.losers)
    assert renamed <= budget
    # The budget is used greedily: either everything is planned or the budget is spent.
    total = sum(len(g) - 1 for g in duplicated.values())
    assert renamed == min(total, budget)
    # A cut group is never followed by a planned one (groups are worked off in key order).
    cut = [i for i, p in enumerate(plans) if p.rest > 0]
    if cut:
        assert all(not p.losers for p in plans[cut[0] + 1 :])


@given(rows=sorted_rows())
def test_group_rows_splits_only_at_key_changes(rows: list[Row]) -> None:
    groups = group_rows(rows)
    assert [r for g in groups for r in g] == rows
    assert all(len({r.value for r in g}) == 1 for g in groups)
    assert all(a[0].value != b[0].value for a, b in itertools.pairwise(groups))


def test_big_group_is_worked_off_over_several_budgets() -> None:
    # What the worker does with a group larger than the batch size: re-read, plan again.
    group = [Row(pk, "big") for pk in range(1, 1001)]
    survivor = group[0]
    rounds = 0
    while len(group) > 1:
        plans, _ = plan_groups(group, 100)
        (p,) = plans
        assert p.survivor == survivor
        assert len(p.losers) == min(100, len(group) - 1)
        assert p.rest == len(group) - 1 - len(p.losers)
        renamed = set(p.losers)
        group = [r for r in group if r not in renamed]
        rounds += 1
    assert rounds == 10  # 999 losers, 100 per round


# --- char(n) and bpchar: trailing blanks are insignificant ---------------------------------------


def test_equality_key_drops_trailing_spaces_only_for_char() -> None:
    assert equality_key("a  ", char_semantics=True) == "a"
    assert equality_key("a  ", char_semantics=False) == "a  "
    # only spaces, as bpchar's equality: leading blanks, tabs and no-break spaces stay
    for value in (" a", "a\t", "a\u00a0", "a \t"):
        assert equality_key(value, char_semantics=True) == value
    assert equality_key("   ", char_semantics=True) == ""


@st.composite
def padded_rows(draw: st.DrawFn) -> list[Row]:
    """Rows of a bpchar column as the worker reads them: sorted by the key without its trailing
    blanks, each row's value carrying its own padding."""
    stems = sorted(draw(st.lists(st.text(alphabet="ab é", max_size=3), max_size=8, unique=True)))
    stems = [s for s in stems if s == s.rstrip(" ")]
    rows: list[Row] = []
    for stem in stems:
        for _ in range(draw(st.integers(1, 6))):
            rows.append(Row(len(rows) + 1, stem + " " * draw(st.integers(0, 3))))
    return rows


@given(rows=padded_rows())
def test_group_rows_with_char_semantics_ignores_padding(rows: list[Row]) -> None:
    groups = group_rows(rows, char_semantics=True)
    assert [r for g in groups for r in g] == rows
    stripped = [Row(r.pk, r.value.rstrip(" ")) for r in rows]
    assert [[r.pk for r in g] for g in groups] == [[r.pk for r in g] for g in group_rows(stripped)]


@given(rows=padded_rows(), budget=st.integers(0, 30), data=st.data())
def test_plan_groups_names_groups_as_the_caller_asked(
    rows: list[Row], budget: int, data: st.DataObject
) -> None:
    # The scan's key of a group is any one of its spellings; the worker looks its plans up by it.
    stems = sorted({r.value.rstrip(" ") for r in rows})
    asked = [s + " " * data.draw(st.integers(0, 3)) for s in stems]
    plans, single = plan_groups(rows, budget, char_semantics=True, asked=asked)

    assert sorted([p.key for p in plans] + single) == sorted(asked)
    sizes = {s: sum(r.value.rstrip(" ") == s for r in rows) for s in stems}
    for p in plans:
        stem = p.key.rstrip(" ")
        assert sizes[stem] > 1
        assert len(p.losers) + p.rest == sizes[stem] - 1
        assert all(r.value.rstrip(" ") == stem for r in (p.survivor, *p.losers))
    assert all(sizes[k.rstrip(" ")] == 1 for k in single)


def test_plan_groups_without_char_semantics_keeps_padded_values_apart() -> None:
    rows = [Row(1, "a"), Row(2, "a "), Row(3, "a ")]
    plans, single = plan_groups(rows, 10, asked=["a", "a "])
    assert single == ["a"]
    assert [(p.key, p.survivor.pk, [r.pk for r in p.losers]) for p in plans] == [("a ", 2, [3])]
