"""router.validation's public functions, directly: what each accepts, what each refuses and
with which status (400 malformed, 422 invalid content), and that nothing is coerced.

The HTTP tests (tests/integration/test_api_bad_input.py) send such bodies through a running
router; these pin each rule at its function, so a change in one shows which rule moved.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from consistency import ids
from consistency.limits import (
    AMOUNT_MAX,
    ENTRIES_PAGE_DEFAULT,
    ENTRIES_PAGE_MAX,
    METADATA_BYTES_MAX,
    METADATA_KEYS_MAX,
    OVERDRAFT_LIMIT_MAX,
    REFERENCE_LEN_MAX,
)
from router import validation as v
from router.errors import ApiError, BadRequest, Unprocessable
from router.model import TransferRequest

SRC = ids.new_account_id(7)
DST = ids.new_account_id(4000)
REGIONS = ("us-east", "eu-west")


def body(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "source": ids.format_account_id(SRC),
        "destination": ids.format_account_id(DST),
        "amount": 2500,
        "currency": "EUR",
    }
    doc.update(fields)
    return {k: val for k, val in doc.items() if val is not ...}


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def refused(exc: type[ApiError], f: Any, *args: Any) -> ApiError:
    with pytest.raises(exc) as info:
        f(*args)
    assert type(info.value) is exc  # not a subclass by accident: the status is the contract
    assert info.value.code == "invalid_request"
    return info.value


# parse_json_object


def test_parse_json_object_accepts_an_object() -> None:
    assert v.parse_json_object(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


@pytest.mark.parametrize(
    "text",
    [
        b"not json",
        b"\xef\xbb\xbf{}",  # a BOM
        '{"a": 1}'.encode("utf-16"),
        b"\xff\xfe",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b"[1, 2]",
        b'"text"',
        b"[" * 100_000,  # nesting deeper than the parser's recursion: refused, not a crash
    ],
)
def test_parse_json_object_refuses_what_is_not_a_utf8_json_object(text: bytes) -> None:
    refused(BadRequest, v.parse_json_object, text)


def test_a_key_named_twice_is_invalid_content() -> None:
    refused(Unprocessable, v.parse_json_object, b'{"a": 1, "a": 2}')
    refused(Unprocessable, v.parse_json_object, b'{"x": {"a": 1, "\\u0061": 2}}')


# decode_transfer and validate_transfer: the same rules by either route


def test_decode_transfer_gives_the_typed_request() -> None:
    got = v.decode_transfer(raw(body(reference="order-1")))
    assert got == TransferRequest(
        source=SRC, destination=DST, amount=2500, currency="EUR", reference="order-1"
    )
    assert v.validate_transfer(body(reference="order-1")) == got
    assert v.decode_transfer(raw(body())).reference is None


def test_decode_transfer_takes_the_strict_path_for_escapes_and_repeated_keys() -> None:
    # An escaped key is the same key: the strict parser sees it, msgspec's fast path does not.
    escaped = raw(body()).replace(b'"amount"', b'"\\u0061mount"')
    assert v.decode_transfer(escaped).amount == 2500
    twice = raw(body())[:-1] + b', "amount": 1}'
    refused(Unprocessable, v.decode_transfer, twice)


@pytest.mark.parametrize("text", [b"[]", b"7", b"", b"{", b'{"source": '])
def test_decode_transfer_refuses_malformed_bodies(text: bytes) -> None:
    refused(BadRequest, v.decode_transfer, text)


BAD_TRANSFERS: list[tuple[str, dict[str, Any]]] = [
    ("string amount", body(amount="10")),
    ("float amount", body(amount=10.0)),
    ("bool amount", body(amount=True)),
    ("zero amount", body(amount=0)),
    ("negative amount", body(amount=-1)),
    ("amount over the max", body(amount=AMOUNT_MAX + 1)),
    ("same account", body(destination=ids.format_account_id(SRC))),
    ("malformed source", body(source="acc_xyz")),
    ("numeric source", body(source=SRC)),
    ("lower-case currency", body(currency="eur")),
    ("long currency", body(currency="EURO")),
    ("unknown field", body(memo="x")),
    ("missing currency", body(currency=...)),
    ("long reference", body(reference="r" * (REFERENCE_LEN_MAX + 1))),
    ("unprintable reference", body(reference="a\nb")),
    ("NUL in reference", body(reference="a\x00b")),
    ("lone surrogate in reference", body(reference="a\ud800b")),
    ("non-text reference", body(reference=5)),
]


@pytest.mark.parametrize(("why", "doc"), BAD_TRANSFERS, ids=[w for w, _ in BAD_TRANSFERS])
def test_invalid_transfers_are_422_by_both_routes(why: str, doc: dict[str, Any]) -> None:
    refused(Unprocessable, v.validate_transfer, doc)
    # json.dumps writes a lone surrogate as an escape: the strict path decides, the same way.
    refused(Unprocessable, v.decode_transfer, raw(doc))


def test_the_largest_amount_and_reference_pass() -> None:
    got = v.validate_transfer(body(amount=AMOUNT_MAX, reference="r" * REFERENCE_LEN_MAX))
    assert got.amount == AMOUNT_MAX


# validate_account_create and check_storable


def test_account_create_defaults() -> None:
    got = v.validate_account_create({"currency": "USD"}, REGIONS)
    assert got == v.AccountCreate("USD", None, 0, {})
    full = {"currency": "EUR", "home_region": "eu-west", "overdraft_limit": 5, "metadata": {"k": 1}}
    assert v.validate_account_create(full, REGIONS) == v.AccountCreate(
        "EUR", "eu-west", 5, {"k": 1}
    )


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"currency": "EUR", "colour": "red"},
        {"currency": "EUR", "home_region": "mars"},
        {"currency": "EUR", "home_region": 1},
        {"currency": "EUR", "overdraft_limit": -1},
        {"currency": "EUR", "overdraft_limit": OVERDRAFT_LIMIT_MAX + 1},
        {"currency": "EUR", "overdraft_limit": "5"},
        {"currency": "EUR", "metadata": []},
        {"currency": "EUR", "metadata": {str(i): i for i in range(METADATA_KEYS_MAX + 1)}},
        {"currency": "EUR", "metadata": {"k": "x" * METADATA_BYTES_MAX}},
        {"currency": "EUR", "metadata": {"k": 2**63}},
        {"currency": "EUR", "metadata": {"k\x00": 1}},
    ],
)
def test_invalid_account_creates_are_422(doc: dict[str, Any]) -> None:
    refused(Unprocessable, v.validate_account_create, doc, REGIONS)


@pytest.mark.parametrize(
    "value",
    [
        2**63,
        -(2**63) - 1,
        float("inf"),
        float("nan"),
        1e300,
        "a\x00",
        "\udc00",
        [[1, 2**64]],
        {"\udc00": 1},
    ],
)
def test_check_storable_refuses_what_a_layer_could_not_give_back(value: Any) -> None:
    refused(Unprocessable, v.check_storable, value, "metadata")


def test_check_storable_accepts_the_edges_and_bounds_nesting() -> None:
    v.check_storable({"a": [v.INT64_MIN, v.INT64_MAX, 1.5, True, None, "é"]}, "metadata")
    nested: Any = 1
    for _ in range(v.JSON_DEPTH_MAX):
        nested = [nested]
    v.check_storable(nested, "metadata")
    refused(Unprocessable, v.check_storable, [nested], "metadata")


def test_check_text() -> None:
    v.check_text("plain ✓", "name")
    refused(Unprocessable, v.check_text, "a\x00", "name")
    refused(Unprocessable, v.check_text, "\ud800", "name")


# headers and query parameters


def test_idempotency_key() -> None:
    assert v.validate_idempotency_key("order-1001") == "order-1001"
    for bad in (None, "", "k" * 256, "naïve", "a\tb"):
        refused(BadRequest, v.validate_idempotency_key, bad)


def query(qs: str) -> Any:
    return make_mocked_request("GET", "/v1/accounts/x" + qs)


def test_consistency_level() -> None:
    assert v.consistency_level(query("")) == "cached"
    for level in v.CONSISTENCY_LEVELS:
        assert v.consistency_level(query(f"?consistency={level}")) == level
    refused(Unprocessable, v.consistency_level, query("?consistency=STRONG"))


def test_page_limit() -> None:
    assert v.page_limit(query("")) == ENTRIES_PAGE_DEFAULT
    assert v.page_limit(query(f"?limit={ENTRIES_PAGE_MAX}")) == ENTRIES_PAGE_MAX
    assert v.page_limit(query("?limit=1")) == 1
    for bad in ("0", str(ENTRIES_PAGE_MAX + 1), "-1", "1.0", "%D9%A3", "00001", "x", ""):
        refused(Unprocessable, v.page_limit, query(f"?limit={bad}"))


def test_cursor_round_trip_and_forgeries() -> None:
    for seq in (1, 42, v.INT64_MAX):
        cursor = v.encode_cursor(seq)
        assert v.decode_cursor(query(f"?cursor={cursor}")) == seq
    assert v.decode_cursor(query("")) is None
    forged = [
        v.encode_cursor(0),
        v.encode_cursor(v.INT64_MAX + 1),
        "x" * (v.CURSOR_LEN_MAX + 1),
        "!!!",
        "dDEyMw",  # "t123": not our prefix
        "cy0x",  # "s-1"
    ]
    for bad in forged:
        refused(Unprocessable, v.decode_cursor, query(f"?cursor={bad}"))
