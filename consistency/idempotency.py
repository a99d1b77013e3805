"""Idempotency rules: which keys are valid and what makes two requests "the same".

A key's scope is (tenant, source account) (API.md). Two requests are the same when their
fingerprints match: a SHA-256 over the canonical form of every field that changes the effect.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

import orjson

from consistency.limits import IDEMPOTENCY_KEY_LEN_MAX

_KEY_RE: Final = re.compile(r"[\x20-\x7e]{1," + str(IDEMPOTENCY_KEY_LEN_MAX) + "}")


def is_valid_key(key: str | None) -> bool:
    """1-255 printable ASCII characters; leading/trailing spaces are refused as ambiguous."""
    return key is not None and bool(_KEY_RE.fullmatch(key)) and key == key.strip()


def transfer_fingerprint(
    *, source: int, destination: int, amount: int, currency: str, reference: str | None
) -> bytes:
    canonical = orjson.dumps(
        {
            "amount": amount,
            "currency": currency,
            "destination": destination,
            "reference": reference,
            "source": source,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()
