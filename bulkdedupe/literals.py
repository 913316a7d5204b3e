"""Array parameters sent as one text value each (`$n::text::<type>[]`), for the statements that
carry a value per rename: a chunk's locks and its UPDATE.

Why not asyncpg's binary arrays: before it encodes an array, asyncpg checks every element for
being a nested array, two `isinstance(..., collections.abc.Iterable/Sized)` calls (Python-level
ABC checks) per string or tuple. At eight arrays a rename that was a quarter of the tool's own
CPU while renaming (profiled with py-spy at 5M rows), on a 2-core machine where the tool's CPU
is the server's loss. The literal of a whole array is built by a few C-level joins instead, and
the server parses it with the element type's own input function (the same values, exactly:
tested against the server with quotes, backslashes, braces, commas, blanks and "NULL").

Only for values whose text form is their input form: strings, ints, UUIDs, and (block, line)
positions; `TargetSql.literal_pk` says whether a table's primary key is of such a type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# the primary-key types whose Python values (asyncpg's decoding) print as their input form
LITERAL_PK_TYPES = frozenset({"smallint", "integer", "bigint", "text", "character varying", "uuid"})


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text_array(values: Sequence[str]) -> str:
    """`{"a","b"}`: every element quoted, so blanks, commas, braces and the word NULL stay
    values; quotes and backslashes escaped (only when some value has one: the usual key has
    neither, and is joined in one go)."""
    if not values:
        return "{}"
    joined = '","'.join(values)
    if "\\" in joined or joined.count('"') != 2 * (len(values) - 1):
        return "{" + ",".join(map(_quoted, values)) + "}"
    return '{"' + joined + '"}'


def int_array(values: Iterable[int]) -> str:
    return "{" + ",".join(map(str, values)) + "}"


def value_array(values: Sequence[object]) -> str:
    """Primary keys: ints bare, anything else (a string, a UUID) by its text, quoted."""
    if values and isinstance(values[0], int):
        return int_array(values)  # type: ignore[arg-type]  # one pk type per table
    return text_array([v if isinstance(v, str) else str(v) for v in values])


def tid_array(positions: Iterable[tuple[int, int]]) -> str:
    """Heap positions (block, line pointer) as a `tid[]` literal."""
    return "{" + ",".join([f'"({block},{line})"' for block, line in positions]) + "}"
