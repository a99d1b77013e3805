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


def account_open_fingerprint(
    *, currency: str, home_region: str, overdraft_limit: int, metadata: object
) -> bytes:
    """An account open's fingerprint: every field of the body, with the region it opens in."""
    canonical = orjson.dumps(
        {
            "currency": currency,
            "home_region": home_region,
            "metadata": metadata,
            "overdraft_limit": overdraft_limit,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


def key_home(tenant: str, key: str, choices: int) -> int:
    """Which of ``choices`` (sorted) shards keeps an account-open key: the same for every
    router, so two opens with one key meet on one shard, whose key row arbitrates them."""
    if choices < 1:
        raise ValueError("no shard to choose from")
    digest = hashlib.sha256(orjson.dumps([tenant, key])).digest()
    return int.from_bytes(digest[:8], "big") % choices
