"""JWT bearer authentication (PyJWT, HS256) and scope checks.

Tokens carry ``sub`` (the tenant), ``scope`` (space separated), ``iat``, ``exp``, ``iss`` and
``aud``. Verification pins the algorithm list, so ``alg: none`` and algorithm confusion fail.
A verified token is cached by its exact text until shortly before it expires: verifying the
same token again would only burn CPU on the hot path.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import jwt

from consistency.limits import TENANT_LEN_MAX

ALGORITHM: Final = "HS256"
SCOPES: Final = frozenset({"accounts:read", "accounts:write", "transfers:write", "admin"})
TENANT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0," + str(TENANT_LEN_MAX - 1) + "}")
# Clock skew tolerated between the minting host and the router.
LEEWAY_S: Final = 5
# Verified tokens remembered per router process; the oldest is dropped first.
TOKEN_CACHE_ENTRIES_MAX: Final = 4096
# A token longer than this is refused before any parsing.
TOKEN_LEN_MAX: Final = 4096


class AuthError(Exception):
    """The request is not authenticated (401)."""


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    expires_at: float


def mint_token(
    secret: bytes,
    *,
    tenant: str,
    scopes: Sequence[str],
    ttl_s: int,
    issuer: str,
    audience: str,
) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    now = int(time.time())
    claims = {
        "sub": tenant,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl_s,
        "iss": issuer,
        "aud": audience,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class Verifier:
    def __init__(self, secret: bytes, *, issuer: str, audience: str) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    def verify_header(self, header: str | None) -> Principal:
        if not header:
            raise AuthError("missing bearer token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > TOKEN_LEN_MAX:
            raise AuthError("expected 'Authorization: Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > now:
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            # The reason goes to the client as a category only; never echo the token.
            raise AuthError(f"invalid token ({type(exc).__name__})") from None
        tenant = claims.get("sub")
        scope = claims.get("scope", "")
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise AuthError("invalid token (bad subject)")
        if not isinstance(scope, str):
            raise AuthError("invalid token (bad scope)")
        principal = Principal(
            tenant=tenant,
            scopes=frozenset(scope.split()) & SCOPES,
            expires_at=float(claims["exp"]) + LEEWAY_S,
        )
        self._cache[token] = principal
        if len(self._cache) > TOKEN_CACHE_ENTRIES_MAX:
            self._cache.popitem(last=False)
        return principal
