"""Parsing of what the operator types: identifiers (never SQL), --keep, --template, durations,
and database URLs that must never show their password."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bulkdedupe.config import (
    ConnectConfig,
    Name,
    OrderItem,
    RunConfig,
    parse_column,
    parse_duration,
    parse_keep,
    parse_table,
    redact_dsn,
    validate_template,
)
from bulkdedupe.errors import UnsafeIdentifierError, UsageError
from bulkdedupe.sql import qualify, quote_ident

# --- identifiers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("payments", Name(None, "payments")),
        ("Payments", Name(None, "payments")),  # unquoted names fold to lower case
        ("  payments  ", Name(None, "payments")),
        ("billing.payments", Name("billing", "payments")),
        ("BILLING.Payments", Name("billing", "payments")),
        ('"Billing"."Payments"', Name("Billing", "Payments")),
        ('billing."Payments"', Name("billing", "Payments")),
        ('"my schema"."pay.ments"', Name("my schema", "pay.ments")),  # a dot inside quotes
        ('"say ""hi"""', Name(None, 'say "hi"')),  # doubled quotes
        ('"payments; DROP TABLE x; --"', Name(None, "payments; DROP TABLE x; --")),
        ("_t$1", Name(None, "_t$1")),
        ("a" * 63, Name(None, "a" * 63)),
    ],
)
def test_parse_table(text: str, expected: Name) -> None:
    assert parse_table(text) == expected


INJECTIONS = [
    "payments; DROP TABLE x; --",
    "payments;DROP TABLE x",
    "payments --",
    "payments/*x*/",
    "payments WHERE 1=1",
    "payments)",
    "pay'ments",
    'pay"ments',
    '"payments',  # unterminated quote
    '"payments"; DROP TABLE x',
    '"a"."b"."c"',  # three parts
    "a.b.c",
    "",
    " ",
    ".payments",
    "payments.",
    "a..b",
    '""',  # empty quoted identifier
    "1payments",
    "pay ments",
    "pay\x00ments",
    '"pay\x00ments"',
    "a" * 64,  # longer than NAMEDATALEN - 1
    '"' + "é" * 32 + '"',  # 64 bytes in UTF-8
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_parse_table_rejects_non_identifiers(text: str) -> None:
    with pytest.raises(UnsafeIdentifierError):
        parse_table(text)


@pytest.mark.parametrize("text", [*INJECTIONS, "billing.payments", '"a"."b"'])
def test_parse_column_rejects_non_identifiers_and_qualified_names(text: str) -> None:
    with pytest.raises(UnsafeIdentifierError):
        parse_column(text, "--key")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("transaction_id", "transaction_id"),
        ("Transaction_ID", "transaction_id"),
        ('"TransactionId"', "TransactionId"),
        ('"select"', "select"),
    ],
)
def test_parse_column(text: str, expected: str) -> None:
    assert parse_column(text, "--key") == expected


def test_unsafe_identifier_is_a_usage_error() -> None:
    # exit code 2, as for every other bad option value
    with pytest.raises(UsageError) as info:
        parse_table("payments; DROP TABLE x; --")
    assert info.value.exit_code == 2


@given(parts=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=2))
def test_quoted_identifiers_round_trip(parts: list[str]) -> None:
    # Whatever a quoted identifier contains, parsing what quote_ident produces gives it back,
    # so nothing in a name can ever escape its quotes.
    ok = all("\x00" not in p and len(p.encode()) <= 63 for p in parts)
    text = ".".join(quote_ident(p) for p in parts)
    if not ok:
        with pytest.raises(UnsafeIdentifierError):
            parse_table(text)
        return
    name = parse_table(text)
    assert [name.schema, name.name] == ([None, *parts] if len(parts) == 1 else parts)
    if name.schema is not None:
        assert qualify(name.schema, name.name) == text


# --- --keep ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("created_at", (OrderItem("created_at", False),)),
        ("created_at desc", (OrderItem("created_at", True),)),
        ("created_at DESC", (OrderItem("created_at", True),)),
        ("created_at asc", (OrderItem("created_at", False),)),
        ("created_at, id", (OrderItem("created_at", False), OrderItem("id", False))),
        (
            " created_at  desc ,id desc",
            (OrderItem("created_at", True), OrderItem("id", True)),
        ),
        ('"CreatedAt" desc, Id', (OrderItem("CreatedAt", True), OrderItem("id", False))),
        # NULLs go last unless told otherwise, whatever the direction (PostgreSQL's default for
        # DESC is NULLS FIRST, which would let a row without a created_at survive)
        ("created_at desc nulls first", (OrderItem("created_at", True, nulls_first=True),)),
        ("created_at DESC NULLS LAST", (OrderItem("created_at", True, nulls_first=False),)),
        ("created_at nulls first", (OrderItem("created_at", False, nulls_first=True),)),
        ("created_at asc  nulls\tlast", (OrderItem("created_at", False, nulls_first=False),)),
        (
            "created_at desc nulls first, id",
            (OrderItem("created_at", True, nulls_first=True), OrderItem("id", False)),
        ),
        # words that are columns when they stand alone or are quoted
        ("nulls", (OrderItem("nulls", False),)),
        ("nulls desc nulls first", (OrderItem("nulls", True, nulls_first=True),)),
        ('"desc nulls first"', (OrderItem("desc nulls first", False),)),
    ],
)
def test_parse_keep(text: str, expected: tuple[OrderItem, ...]) -> None:
    assert parse_keep(text) == expected


def test_order_item_defaults_to_nulls_last() -> None:
    assert OrderItem("created_at", descending=True).nulls_first is False


@pytest.mark.parametrize(
    "text",
    [
        "created_at nulls",
        "created_at nulls middle",
        "created_at nulls first desc",  # the direction comes first, as in SQL
        "created_at desc nulls first nulls last",
        "created_at desc desc",
        "created_at first",
    ],
)
def test_parse_keep_rejects_bad_nulls_order_in_one_line(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_keep(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--keep {text!r}")
    assert "COLUMN [asc|desc] [nulls first|last]" in message


@pytest.mark.parametrize(
    "text",
    [
        "created_at; DROP TABLE x; --",
        "created_at descending",
        "lower(created_at)",
        "created_at + 1",
        "1",
        "created_at,",
        ",created_at",
        "created_at,,id",
        "",
    ],
)
def test_parse_keep_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_keep(text)


# --- --template -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["{value}-{pk}", "{pk}", "{pk}:{value}", "dup-{value}-{value}-{pk}", "{{{pk}}}"]
)
def test_validate_template_accepts(template: str) -> None:
    assert validate_template(template) == template
    assert RunConfig(template=template).template == template


@pytest.mark.parametrize(
    "template",
    [
        "{value}",  # no {pk}: rows of one group would collide
        "{value}-{id}",  # unknown field
        "{value}-{pk}-{now}",
        "{}-{pk}",  # positional field
        "{0}-{pk}",
        "{value.__class__}-{pk}",  # attribute access must not reach str.format
        "{value[0]}-{pk}",
        "{pk",  # unbalanced
        "{value}-{pk}}",
        "",
        "constant",
    ],
)
def test_validate_template_rejects(template: str) -> None:
    with pytest.raises(UsageError):
        validate_template(template)
    with pytest.raises(UsageError):
        RunConfig(template=template)


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("2", 2.0),
        ("1.5", 1.5),
        ("1.5s", 1.5),
        ("30sec", 30.0),
        ("1min", 60.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 2 s ", 2.0),
        ("2S", 2.0),
        ("250MS", 0.25),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, "--lock-timeout") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "0ms", "-1s", "abc", "2d", "", "1e3", "s", "2 s s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--lock-timeout"):
        parse_duration(text, "--lock-timeout")


# --- option ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": -5},
        {"concurrency": 0},
        {"concurrency": 65},
        {"max_retries": -1},
        {"lock_timeout": 0},
        {"statement_timeout": -1.0},
        {"run_id": "x; DROP TABLE x"},
        {"run_id": ""},
        {"run_id": "a" * 65},
    ],
)
def test_run_config_rejects_out_of_range(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RunConfig(**kwargs)  # type: ignore[arg-type]


def test_run_config_defaults_are_a_dry_run() -> None:
    cfg = RunConfig()
    assert cfg.apply is False
    assert cfg.batch_size >= 1
    assert cfg.concurrency >= 1


# --- database URLs --------------------------------------------------------------------------------

# Passwords as an operator might have them: anything printable, percent-encoded in the URL.
passwords = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=4, max_size=30
).filter(lambda p: p.strip() == p and "***" not in p)
hosts = st.sampled_from(
    [
        "db.example.com",
        "db.example.com:5433",
        "127.0.0.1:5432",
        "[::1]:5432",
        "",  # unix socket given as ?host=
        "h1:5432,h2:5433",  # multi-host (libpq and asyncpg accept it)
        "h1,h2",
    ]
)
queries = st.sampled_from(["", "?sslmode=require", "?host=/run/postgresql", "?connect_timeout=5"])


@given(password=passwords, host=hosts, query=queries, user=st.sampled_from(["app", "u-1"]))
def test_redact_dsn_never_leaks_the_password(
    password: str, host: str, query: str, user: str
) -> None:
    encoded = quote(password, safe="")
    # A password that is a substring of what may be shown anyway ("data" in "database_url",
    # "db" in the host) proves nothing either way.
    shown = repr(ConnectConfig(database_url=f"postgresql://{user}:@{host}/payments_db{query}"))
    assume(password not in shown and encoded not in shown)
    dsn = f"postgresql://{user}:{encoded}@{host}/payments_db{query}"
    out = redact_dsn(dsn)
    assert encoded not in out
    assert password not in out
    # still useful to the operator: who and where
    assert user in out
    assert "payments_db" in out
    cfg = ConnectConfig(database_url=dsn)
    assert encoded not in repr(cfg)
    assert password not in repr(cfg)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:s3cr3t-pw@db.example.com:5432/prod",
        "postgres://app:s3cr3t-pw@/prod?host=/var/run/postgresql",
        "postgresql://app@db.example.com/prod?password=s3cr3t-pw",  # libpq allows it here too
        "postgresql://app@db.example.com/prod?sslmode=require&password=s3cr3t-pw",
        "postgresql:///prod?host=/run/pg&password=s3cr3t-pw",
        "postgresql://app@db.example.com/prod?sslpassword=s3cr3t-pw",
        "postgresql://app:s3cr3t-pw@h1:5432,h2:5433/prod",
        "postgresql://app:s3cr3t-pw@db:notaport/prod",  # malformed, still not printed
        "postgresql://app:s3cr3t-pw@[::1/prod",  # malformed
    ],
)
def test_redact_dsn_examples(dsn: str) -> None:
    assert "s3cr3t-pw" not in redact_dsn(dsn)


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://app@db.example.com:5432/prod", "postgresql:///prod?host=/tmp&port=5432"],
)
def test_redact_dsn_leaves_urls_without_password_alone(dsn: str) -> None:
    assert redact_dsn(dsn) == dsn
