"""Idempotency rules: which keys are valid and what makes two requests "the same".

A key's scope is (tenant, source account) (API.md). Two requests are the same when their
fingerprints match: a SHA-256 over the canonical form of every field that changes the effect.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Final, NamedTuple

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
    *, currency: str, home_region: str | None, overdraft_limit: int, metadata: object
) -> bytes:
    """An account open's fingerprint: every field of the body as sent (``home_region`` None
    when the body names none: the key then chooses the region, and naming one is another
    request, 409 on the same key)."""
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


class OpenShards(NamedTuple):
    """Where a keyed account open goes: ``arbiter`` holds the key's row (one shard for every
    region), ``target`` gets the account. Equal in the common case: one transaction."""

    arbiter: str
    target: str


def open_shards(
    tenant: str, key: str, homes: Mapping[str, str], home_region: str | None
) -> OpenShards | None:
    """The shards of a keyed open, given every shard's home region (``homes``: shard name ->
    region). The arbiter depends on (tenant, key) and the set of shards only, never on the
    region named or the router asked, so every open with one key meets on one primary key
    (G2 for account opens). Without ``home_region`` the account opens on the arbiter (its
    region is the key's choice); with one, on the arbiter when it is homed there, else on the
    key's shard among that region's. None: no shard is homed in ``home_region``."""
    names = sorted(homes)
    arbiter = names[key_home(tenant, key, len(names))]
    if home_region is None or homes[arbiter] == home_region:
        return OpenShards(arbiter, arbiter)
    homed = [n for n in names if homes[n] == home_region]
    if not homed:
        return None
    return OpenShards(arbiter, homed[key_home(tenant, key, len(homed))])


def key_home(tenant: str, key: str, choices: int) -> int:
    """Which of ``choices`` (sorted) shards keeps an account-open key: the same for every
    router, so two opens with one key meet on one shard, whose key row arbitrates them."""
    if choices < 1:
        raise ValueError("no shard to choose from")
    digest = hashlib.sha256(orjson.dumps([tenant, key])).digest()
    return int.from_bytes(digest[:8], "big") % choices
