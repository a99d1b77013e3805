"""Strict request validation: every field typed, bounded and named; unknown fields refused.

Malformed syntax is 400 ``invalid_request``; well-formed but invalid content is 422
``invalid_request``. Nothing is coerced: ``"10"``, ``10.0`` and ``true`` are not amounts.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
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
from router.errors import BadRequest, PayloadTooLarge, Unprocessable
from router.limits import BODY_BYTES_MAX
from router.routing import TransferRequest

CONSISTENCY_LEVELS = ("strong", "session", "cached")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > BODY_BYTES_MAX:
        raise PayloadTooLarge(f"request body exceeds {BODY_BYTES_MAX} bytes")
    raw = await request.content.read(BODY_BYTES_MAX + 1)
    if len(raw) > BODY_BYTES_MAX:
        raise PayloadTooLarge(f"request body exceeds {BODY_BYTES_MAX} bytes")
    if not raw.strip():
        raise BadRequest("request body is empty; a JSON object is expected")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses integers beyond 64 bits; the standard parser accepts them, so an
        # oversized amount gets a precise 422 below instead of a vague parse error.
        try:
            doc = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def _check_fields(
    doc: dict[str, Any], required: Collection[str], optional: Collection[str]
) -> None:
    unknown = sorted(set(doc) - set(required) - set(optional))
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)[:200]}")
    missing = [f for f in required if f not in doc]
    if missing:
        raise Unprocessable(f"missing field(s): {', '.join(missing)}")


def _account_field(doc: dict[str, Any], name: str) -> int:
    value = ids.parse_account_id(doc[name])
    if value is None:
        raise Unprocessable(f"{name} must be an account id such as 'acc_0a1b2c3d4e5f678'")
    return value


def _currency(value: object) -> str:
    if not is_currency(value):
        raise Unprocessable("currency must be an ISO 4217 code such as 'EUR'")
    assert isinstance(value, str)
    return value


def validate_transfer(doc: dict[str, Any]) -> TransferRequest:
    _check_fields(doc, ("source", "destination", "amount", "currency"), ("reference",))
    source = _account_field(doc, "source")
    destination = _account_field(doc, "destination")
    if source == destination:
        raise Unprocessable("source and destination must differ")
    amount = doc["amount"]
    if not is_amount(amount, AMOUNT_MIN, AMOUNT_MAX):
        raise Unprocessable(
            f"amount must be an integer number of minor units from {AMOUNT_MIN} to {AMOUNT_MAX}"
        )
    currency = _currency(doc["currency"])
    reference = doc.get("reference")
    if reference is not None and (
        not isinstance(reference, str)
        or len(reference) > REFERENCE_LEN_MAX
        or not reference.isprintable()
    ):
        raise Unprocessable(f"reference must be printable text of at most {REFERENCE_LEN_MAX}")
    return TransferRequest(source, destination, amount, currency, reference)


@dataclass(frozen=True, slots=True)
class AccountCreate:
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
    try:
        encoded = orjson.dumps(metadata)
    except TypeError:
        # Integers beyond 64 bits parse with the fallback parser but cannot be stored.
        raise Unprocessable("metadata holds a value that cannot be stored") from None
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
    if not raw.isdigit() or len(raw) > 4 or not ENTRIES_PAGE_MIN <= int(raw) <= ENTRIES_PAGE_MAX:
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
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Unprocessable("cursor is not one this API issued") from None
    if len(raw) > 32 or not text.startswith("s") or not text[1:].isdigit():
        raise Unprocessable("cursor is not one this API issued")
    return int(text[1:])
