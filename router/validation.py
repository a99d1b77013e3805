"""Strict request validation: every field typed, bounded and named; unknown fields refused.

Malformed syntax is 400 ``invalid_request``; well-formed but invalid content is 422
``invalid_request``. Nothing is coerced: ``"10"``, ``10.0`` and ``true`` are not amounts.

Bodies are read whole with aiohttp's own reader and its size limit (a body that arrives in
several TCP segments is one body), only as ``application/json`` (415 otherwise), strictly as
UTF-8 JSON (no BOM, no UTF-16, no NaN). A key that appears twice in one object is refused (422):
two parsers of the same body must never disagree about what it says. Every value must be one
that every layer can carry and give back: integers within 64 bits, finite numbers, text without
U+0000 or lone surrogates (PostgreSQL refuses those, and the cache's encoder refuses the others).

The single-transfer body, the hot path, is decoded and type-checked in one pass by msgspec into
a Struct; the rarer bodies go through the standard parser with a duplicate-key hook.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
from collections.abc import Collection
from typing import Any, Final

import msgspec
from aiohttp import web

from consistency import ids
from consistency.idempotency import is_valid_key
from consistency.limits import (
    AMOUNT_MAX,
    AMOUNT_MIN,
    ENTRIES_PAGE_DEFAULT,
    ENTRIES_PAGE_MAX,
    ENTRIES_PAGE_MIN,
    METADATA_BYTES_MAX,
    METADATA_KEYS_MAX,
    OVERDRAFT_LIMIT_MAX,
    REFERENCE_LEN_MAX,
)
from consistency.money import is_amount, is_currency
from router.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    Unprocessable,
    UnsupportedMediaType,
)
from router.limits import BODY_BYTES_MAX, BODY_RECEIVE_TIMEOUT_S
from router.model import TransferRequest

CONSISTENCY_LEVELS = ("strong", "session", "cached")
# Every integer a stored document may hold: PostgreSQL's bigint, the cache's orjson and every
# client that parses JSON numbers as 64-bit integers carry this range and no more.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
# Every float a stored document may hold is smaller than this in magnitude (see check_storable).
FLOAT_ABS_BOUND: Final = float(2**63)
# Cursor sequence numbers are ledger seqs (bigint): a larger one can only be forged.
CURSOR_LEN_MAX: Final = 32
# Nesting of stored JSON (metadata): deep enough for any real document, shallow enough that no
# recursive walk over it (ours, orjson's, PostgreSQL's) comes near a recursion limit.
JSON_DEPTH_MAX: Final = 16
_JSON_TYPE: Final = "application/json"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class DuplicateKey(ValueError):
    """A JSON object names one key twice."""


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise DuplicateKey("a JSON object names the same key twice")
    return doc


def _check_content_type(request: web.Request) -> None:
    # Only JSON, and only UTF-8 JSON (RFC 8259): a charset parameter other than utf-8 is refused.
    if request.content_type != _JSON_TYPE or (request.charset or "utf-8").lower() != "utf-8":
        raise UnsupportedMediaType("the body must be sent as Content-Type: application/json")


async def read_body(request: web.Request, *, limit: int = BODY_BYTES_MAX) -> bytes:
    """The whole body (aiohttp's reader, bounded by ``limit``), as application/json."""
    _check_content_type(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    try:
        # read() waits for the whole body (any number of segments) and enforces the app's
        # client_max_size; the explicit check covers a route with a smaller bound.
        async with asyncio.timeout(BODY_RECEIVE_TIMEOUT_S):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {BODY_RECEIVE_TIMEOUT_S} s"
        ) from None
    if len(raw) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    if not raw.strip():
        raise BadRequest("request body is empty; a JSON object is expected")
    return raw


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object, strictly: UTF-8 only, no duplicate keys, no NaN/Infinity."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8 JSON") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_pairs_hook)
    except DuplicateKey as exc:
        raise Unprocessable(str(exc)) from None
    except (ValueError, RecursionError):
        # json.JSONDecodeError is a ValueError; a BOM is refused here too.
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


async def read_json_object(request: web.Request, *, limit: int = BODY_BYTES_MAX) -> dict[str, Any]:
    return parse_json_object(await read_body(request, limit=limit))


def check_storable(value: Any, name: str, depth: int = 0) -> None:
    """Refuse (422) a JSON value that some layer could not store or give back unchanged."""
    if depth > JSON_DEPTH_MAX:
        raise Unprocessable(f"{name} nests deeper than {JSON_DEPTH_MAX} levels")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise Unprocessable(f"{name} holds an integer outside the 64-bit range")
    elif isinstance(value, float):
        # PostgreSQL's jsonb gives numbers back in plain notation: 1e300 comes back as a
        # 301-digit integer, which no 64-bit reader (the cache's encoder first) can carry.
        if not math.isfinite(value) or abs(value) >= FLOAT_ABS_BOUND:
            raise Unprocessable(f"{name} holds a number of magnitude 2^63 or more")
    elif isinstance(value, str):
        check_text(value, name)
    elif isinstance(value, list):
        for v in value:
            check_storable(v, name, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, name)
            check_storable(v, name, depth + 1)


def check_text(value: str, name: str) -> None:
    """Text PostgreSQL stores: no U+0000 (refused by text and jsonb), no lone surrogates."""
    if "\x00" in value:
        raise Unprocessable(f"{name} must not contain U+0000")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Unprocessable(f"{name} must be valid Unicode (no lone surrogates)") from None


class _TransferBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body of POST /v1/transfers as msgspec decodes it (types only; bounds below)."""

    source: str
    destination: str
    amount: int
    currency: str
    reference: str | None = None


_TRANSFER_DECODER: Final = msgspec.json.Decoder(_TransferBody)
# Without a backslash no key can be spelled with escapes, so a key named twice appears twice
# literally in quotes: when none does, the body has no duplicate key (and msgspec, which keeps
# the last of two, needs no second look). Otherwise the strict parser decides.
_TRANSFER_KEYS: Final = tuple(f'"{f}"'.encode() for f in _TransferBody.__struct_fields__)


def decode_transfer(raw: bytes) -> TransferRequest:
    """POST /v1/transfers' body in one pass: decode, types, unknown fields; then bounds."""
    if raw.lstrip()[:1] != b"{":
        # Not an object at all (an array, a number, garbage): malformed for this API.
        parse_json_object(raw)
        raise BadRequest("request body must be a JSON object")
    if b"\\" in raw or any(raw.count(k) > 1 for k in _TRANSFER_KEYS):
        return validate_transfer(parse_json_object(raw))
    try:
        body = _TRANSFER_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"invalid transfer: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequest("request body is not valid JSON") from None
    return _transfer_fields(
        body.source, body.destination, body.amount, body.currency, body.reference
    )


def _check_fields(
    doc: dict[str, Any], required: Collection[str], optional: Collection[str]
) -> None:
    unknown = sorted(set(doc) - set(required) - set(optional))
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)[:200]}")
    missing = [f for f in required if f not in doc]
    if missing:
        raise Unprocessable(f"missing field(s): {', '.join(missing)}")


def _account_id(text: object, name: str) -> int:
    value = ids.parse_account_id(text)
    if value is None:
        raise Unprocessable(f"{name} must be an account id such as 'acc_0a1b2c3d4e5f678'")
    return value


def _currency(value: object) -> str:
    if not is_currency(value):
        raise Unprocessable("currency must be an ISO 4217 code such as 'EUR'")
    assert isinstance(value, str)
    return value


def validate_transfer(doc: dict[str, Any]) -> TransferRequest:
    """A transfer from a parsed object (the batch items and the slow path of decode_transfer)."""
    _check_fields(doc, ("source", "destination", "amount", "currency"), ("reference",))
    return _transfer_fields(
        doc["source"], doc["destination"], doc["amount"], doc["currency"], doc.get("reference")
    )


def _transfer_fields(
    source_id: object, destination_id: object, amount: object, currency: object, reference: object
) -> TransferRequest:
    source = _account_id(source_id, "source")
    destination = _account_id(destination_id, "destination")
    if source == destination:
        raise Unprocessable("source and destination must differ")
    if not is_amount(amount, AMOUNT_MIN, AMOUNT_MAX):
        raise Unprocessable(
            f"amount must be an integer number of minor units from {AMOUNT_MIN} to {AMOUNT_MAX}"
        )
    assert isinstance(amount, int)
    cur = _currency(currency)
    if reference is not None:
        if (
            not isinstance(reference, str)
            or len(reference) > REFERENCE_LEN_MAX
            or not reference.isprintable()
        ):
            raise Unprocessable(
                f"reference must be printable text of at most {REFERENCE_LEN_MAX} characters"
            )
        check_text(reference, "reference")
    return TransferRequest(
        source=source, destination=destination, amount=amount, currency=cur, reference=reference
    )


class AccountCreate(msgspec.Struct, frozen=True):
    currency: str
    home_region: str | None
    overdraft_limit: int
    metadata: dict[str, Any]


def validate_account_create(doc: dict[str, Any], regions: Collection[str]) -> AccountCreate:
    _check_fields(doc, ("currency",), ("home_region", "overdraft_limit", "metadata"))
    currency = _currency(doc["currency"])
    home_region = doc.get("home_region")
    if home_region is not None and (not isinstance(home_region, str) or home_region not in regions):
        raise Unprocessable(f"home_region must be one of: {', '.join(sorted(regions))}")
    overdraft = doc.get("overdraft_limit", 0)
    if not is_amount(overdraft, 0, OVERDRAFT_LIMIT_MAX):
        raise Unprocessable(f"overdraft_limit must be an integer from 0 to {OVERDRAFT_LIMIT_MAX}")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise Unprocessable("metadata must be a JSON object")
    if len(metadata) > METADATA_KEYS_MAX:
        raise Unprocessable(f"metadata may hold at most {METADATA_KEYS_MAX} keys")
    # Every value must come back out of PostgreSQL and the cache as it went in: an integer past
    # 64 bits stored once made every later read of the account fail (the cache's encoder).
    check_storable(metadata, "metadata")
    encoded = msgspec.json.encode(metadata)
    if len(encoded) > METADATA_BYTES_MAX:
        raise Unprocessable(f"metadata may be at most {METADATA_BYTES_MAX} bytes of JSON")
    return AccountCreate(currency, home_region, overdraft, metadata)


def validate_idempotency_key(value: str | None) -> str:
    if value is None:
        raise BadRequest("the Idempotency-Key header is required")
    if not is_valid_key(value):
        raise BadRequest("Idempotency-Key must be 1-255 printable ASCII characters")
    return value


def consistency_level(request: web.Request) -> str:
    level = request.query.get("consistency", "cached")
    if level not in CONSISTENCY_LEVELS:
        raise Unprocessable("consistency must be one of: strong, session, cached")
    return level


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return ENTRIES_PAGE_DEFAULT
    # ASCII digits only: str.isdigit() accepts other scripts' digits, and some crash int().
    if (
        not (raw.isascii() and raw.isdigit())
        or len(raw) > 4
        or not ENTRIES_PAGE_MIN <= int(raw) <= ENTRIES_PAGE_MAX
    ):
        raise Unprocessable(
            f"limit must be an integer from {ENTRIES_PAGE_MIN} to {ENTRIES_PAGE_MAX}"
        )
    return int(raw)


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).rstrip(b"=").decode()


def decode_cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if len(raw) > CURSOR_LEN_MAX or not raw.isascii():
        raise Unprocessable("cursor is not one this API issued")
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Unprocessable("cursor is not one this API issued") from None
    digits = text[1:]
    # The seq is a bigint: a larger number can only be forged, and the driver cannot send it.
    if (
        not text.startswith("s")
        or not (digits.isascii() and digits.isdigit())
        or not 1 <= int(digits) <= INT64_MAX
    ):
        raise Unprocessable("cursor is not one this API issued")
    return int(digits)
