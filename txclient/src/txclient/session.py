"""A client's session: the newest ``X-Consistency-Token``, merged across every region.

The token is the server's (base64url JSON ``{"a": [[account, version], ...]}``, newest first,
at most ``TOKEN_ACCOUNTS_MAX`` accounts; API.md and consistency/tokens.py). The router merges
the token a request carries into the one it answers with, so one region's answer already holds
what that call sent; but calls run concurrently and land in different regions, so the client
merges every answer's token into its own the way the server reads one: per account the highest
version, the accounts of the newest answer first, the oldest dropped past the bound. A token
this client cannot decode (a server newer than it) is kept as it is and sent back unchanged:
the newest answer's token is always a safe one to send.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Iterable

from txclient.limits import TOKEN_ACCOUNTS_MAX, TOKEN_LEN_MAX


def decode(text: str | None) -> dict[int, int] | None:
    """Account -> version, ``{}`` for no token, ``None`` for one this client cannot read."""
    if not text:
        return {}
    if len(text) > TOKEN_LEN_MAX:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        out: dict[int, int] = {}
        for acc, ver in doc["a"]:
            if type(acc) is not int or type(ver) is not int or acc < 0 or ver < 0:
                return None
            out[acc] = max(ver, out.get(acc, 0))
    except (binascii.Error, ValueError, TypeError, KeyError):
        return None
    return out


def encode(pairs: Iterable[tuple[int, int]]) -> str:
    raw = json.dumps({"a": [[a, v] for a, v in pairs]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def merge(held: dict[int, int], newest: dict[int, int]) -> dict[int, int]:
    """``newest``'s accounts first, then the held ones; the highest version of each; bounded."""
    out: dict[int, int] = {}
    for acc, ver in newest.items():
        out[acc] = max(ver, held.get(acc, 0))
    for acc, ver in held.items():
        if acc not in out:
            out[acc] = ver
    return dict(list(out.items())[:TOKEN_ACCOUNTS_MAX])


class Session:
    """The token one client sends on every call. Thread-safe (a sync client may be shared)."""

    def __init__(self, token: str | None = None) -> None:
        self._lock = threading.Lock()
        self._versions: dict[int, int] = {}
        self._token: str | None = None
        self.observe(token)

    @property
    def token(self) -> str | None:
        with self._lock:
            return self._token

    def versions(self) -> dict[int, int]:
        """Account (numeric id, as in the token) -> the newest version this session saw."""
        with self._lock:
            return dict(self._versions)

    def observe(self, token: str | None) -> None:
        """Merge the token of one answer."""
        if not token:
            return
        seen = decode(token)
        with self._lock:
            if seen is None:
                # Unreadable: trust the server's newest answer, which includes what we sent.
                self._versions, self._token = {}, token
                return
            self._versions = merge(self._versions, seen)
            self._token = encode(self._versions.items()) if self._versions else None
