"""Consistency tokens: the account versions a client has seen.

A token is base64url(JSON ``{"a": [[account_id, version], ...]}``), newest first. Every response
that writes or returns an account merges what it returned into the token the client sent, so a
client that always sends back the newest token carries every version it saw (up to
``TOKEN_ACCOUNTS_MAX`` accounts; an account that dropped off is read from its home primary).
Tokens are not secret and not signed: forging one can only make its holder's own reads slower.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Final

import orjson

from consistency.limits import TOKEN_ACCOUNTS_MAX

# A header longer than this cannot be a token we issued.
TOKEN_LEN_MAX: Final = 2048


class TokenError(ValueError):
    """The header is not a token we could have issued."""


def decode(text: str | None) -> dict[int, int]:
    """Account id -> version; empty for a missing header."""
    if not text:
        return {}
    if len(text) > TOKEN_LEN_MAX:
        raise TokenError("token too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        doc = orjson.loads(raw)
        pairs = doc["a"]
        out: dict[int, int] = {}
        for acc, ver in pairs:
            if type(acc) is not int or type(ver) is not int or acc < 0 or ver < 0:
                raise TokenError("bad entry")
            out[acc] = max(ver, out.get(acc, 0))
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise TokenError("malformed consistency token") from exc
    if len(out) > TOKEN_ACCOUNTS_MAX:
        raise TokenError("token covers too many accounts")
    return out


def encode(seen: dict[int, int], newest: Iterable[tuple[int, int]]) -> str:
    """Merge ``newest`` (account, version) into ``seen`` and encode, newest accounts first."""
    merged: dict[int, int] = {}
    for acc, ver in newest:
        merged[acc] = max(ver, merged.get(acc, 0), seen.get(acc, 0))
    for acc, ver in seen.items():
        if acc not in merged:
            merged[acc] = ver
    pairs = list(merged.items())[:TOKEN_ACCOUNTS_MAX]
    raw = orjson.dumps({"a": pairs})
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
