"""JWT bearer authentication (PyJWT, EdDSA over Ed25519 keys named by ``kid``) and scopes.

Tokens carry ``sub`` (the tenant, or the operator for an admin token), ``scope`` (space
separated), ``iat``, ``exp``, ``iss`` and ``aud``, and name their signing key in the header's
``kid``. Routers hold only public keys: a key set file (JWKS, RFC 7517) that they re-read when it
changes, checked at most every ``JWKS_CHECK_INTERVAL_S``. Private keys live with the operator's
tooling (``infra.keys``), so a router that is broken into cannot mint tokens.

Two audiences: tenant tokens (``aud`` = the tenant audience, tenant scopes only) and operator
tokens (``aud`` = the admin audience, scope ``admin`` only). A token is verified against exactly
one of them, so an operator token cannot move money and a tenant token can never reach an admin
route, whatever scopes either claims.

Verification pins the algorithm list (``alg: none`` and algorithm confusion fail), requires every
claim, and refuses a token whose lifetime (``exp - iat``) exceeds the bound of its audience. A
verified token is cached by its exact text until shortly before it expires (verifying the same
token again would only burn CPU on the hot path); the cache is emptied whenever the key set
changes, so a retired key stops verifying at the next check.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt
import orjson

from consistency.limits import TENANT_LEN_MAX

log = logging.getLogger("router.auth")

ALGORITHM: Final = "EdDSA"
# What a tenant token may carry. ``accounts:overdraft`` is needed to open an account whose
# overdraft_limit is above 0 (credit is a privilege, not a default of ``accounts:write``).
TENANT_SCOPES: Final = frozenset(
    {
        "accounts:read",
        "accounts:write",
        "accounts:overdraft",
        "transfers:write",
        "events:read",
        "webhooks:write",
    }
)
# What an operator token carries (and nothing else).
ADMIN_SCOPES: Final = frozenset({"admin"})
SCOPES: Final = TENANT_SCOPES | ADMIN_SCOPES
TENANT_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0," + str(TENANT_LEN_MAX - 1) + "}")
# Clock skew tolerated between the minting host and the router.
LEEWAY_S: Final = 5
# The longest lifetime (exp - iat) of a tenant token. A stolen token is useful for at most this
# long; a day covers a working session and the dev token `make run` prints. A rotated-out key
# must keep verifying this long (infra.keys), so this also bounds the rotation overlap.
TOKEN_TTL_S_MAX: Final = 24 * 3600
# The longest lifetime of an operator (admin) token: operators mint one per task.
ADMIN_TOKEN_TTL_S_MAX: Final = 3600
# Routers look at the key set file's identity (inode, size, mtime) at most this often and re-read
# it when it changed: a published key is usable, and a retired key refused, within this bound.
JWKS_CHECK_INTERVAL_S: Final = 1.0
# A key set file larger than this is refused (a JWKS holds a handful of 100-byte keys).
JWKS_BYTES_MAX: Final = 64 * 1024
# Verified tokens remembered per router process and audience; the oldest is dropped first.
TOKEN_CACHE_ENTRIES_MAX: Final = 4096
# A token longer than this is refused before any parsing.
TOKEN_LEN_MAX: Final = 4096


class AuthError(Exception):
    """The request is not authenticated (401). The message is safe to show to the client."""


class WrongAudience(AuthError):
    """A valid token of the other audience: a tenant token on an admin route, or the reverse.

    Authenticated but not allowed (403), as API.md has it for a token without the scope.
    """


class KeySetError(Exception):
    """The key set file cannot be read or parsed."""


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    scopes: frozenset[str]
    expires_at: float


# PyJWT's exceptions, mapped to what a client may be told. The class names stay internal.
_REASONS: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token not valid for this audience"),
    (jwt.InvalidIssuerError, "token from an unknown issuer"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidIssuedAtError, "token has a malformed issue time"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.DecodeError, "token is malformed"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    for cls, text in _REASONS:
        if isinstance(exc, cls):
            return text
    return "token is invalid"


def parse_jwks(raw: bytes) -> dict[str, jwt.PyJWK]:
    """``kid -> key`` of an Ed25519 JWKS document; every key must have a ``kid``."""
    if len(raw) > JWKS_BYTES_MAX:
        raise KeySetError(f"key set larger than {JWKS_BYTES_MAX} bytes")
    try:
        doc = orjson.loads(raw)
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise KeySetError("'keys' is not a list")
        out: dict[str, jwt.PyJWK] = {}
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                raise KeySetError("every key needs a string 'kid'")
            if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519" or "d" in entry:
                # Only public Ed25519 keys belong here; a private part would be a leak.
                raise KeySetError(f"key {entry['kid']!r} is not a public Ed25519 key")
            out[entry["kid"]] = jwt.PyJWK.from_dict(entry, algorithm=ALGORITHM)
    except (ValueError, KeyError, TypeError, jwt.PyJWKError) as exc:
        raise KeySetError(f"unreadable key set ({type(exc).__name__})") from None
    return out


class KeySetFile:
    """The public keys of a JWKS file, re-read when the file changes (checked at a bound)."""

    def __init__(
        self,
        path: Path,
        *,
        check_interval_s: float = JWKS_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._interval = check_interval_s
        self._clock = clock
        self._identity: tuple[int, int, int] | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._checked_at = -float("inf")
        # Bumped on every successful reload, so callers can drop what the old set verified.
        self.generation = 0
        self._reload(force=True)

    def _reload(self, *, force: bool = False) -> None:
        try:
            st = os.stat(self._path)
            identity = (st.st_ino, st.st_size, st.st_mtime_ns)
            if not force and identity == self._identity:
                return
            keys = parse_jwks(self._path.read_bytes())
        except (OSError, KeySetError) as exc:
            if force:
                raise KeySetError(f"cannot load the key set {self._path}: {exc}") from None
            # Keep verifying with the last good set: a half-written or missing file must not
            # lock every client out. The operator sees this line.
            log.warning("key set %s not reloaded: %s", self._path, exc)
            return
        self._identity = identity
        self._keys = keys
        self.generation += 1
        if not force:
            log.info("key set reloaded", extra={"fields": {"kids": sorted(keys)}})

    def get(self, kid: str) -> jwt.PyJWK | None:
        now = self._clock()
        if now - self._checked_at >= self._interval:
            self._checked_at = now
            self._reload()
        return self._keys.get(kid)

    def kids(self) -> list[str]:
        return sorted(self._keys)


def mint_token(
    private_key: Any,
    kid: str,
    *,
    subject: str,
    scopes: Sequence[str],
    ttl_s: int,
    issuer: str,
    audience: str,
    admin: bool = False,
) -> str:
    """A signed token; ``admin`` selects the operator kind (scope ``admin`` only, shorter TTL).

    ``private_key`` is an Ed25519 private key (``cryptography``). Raises ValueError for a tenant
    name, scope set or lifetime the routers would refuse.
    """
    if not TENANT_RE.fullmatch(subject):
        raise ValueError("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
    allowed = ADMIN_SCOPES if admin else TENANT_SCOPES
    unknown = set(scopes) - allowed
    if unknown:
        hint = "" if admin or unknown - ADMIN_SCOPES else " (admin is an operator token: --admin)"
        raise ValueError(f"scopes not allowed here: {', '.join(sorted(unknown))}{hint}")
    ttl_max = ADMIN_TOKEN_TTL_S_MAX if admin else TOKEN_TTL_S_MAX
    if not 0 < ttl_s <= ttl_max:
        raise ValueError(f"ttl must be within 1..{ttl_max} s")
    now = int(time.time())
    claims = {
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl_s,
        "iss": issuer,
        "aud": audience,
    }
    return jwt.encode(claims, private_key, algorithm=ALGORITHM, headers={"kid": kid})


class Verifier:
    """Verifies tenant tokens (``verify``) and operator tokens (``verify(..., admin=True)``)."""

    def __init__(
        self, keys: KeySetFile, *, issuer: str, audience: str, admin_audience: str
    ) -> None:
        if audience == admin_audience:
            raise ValueError("the tenant and admin audiences must differ")
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._admin_audience = admin_audience
        self._generation = keys.generation
        # token -> (principal, kid), per audience (False: tenant, True: admin).
        self._cache: dict[bool, OrderedDict[str, tuple[Principal, str]]] = {
            False: OrderedDict(),
            True: OrderedDict(),
        }

    def verify_header(self, header: str | None, *, admin: bool = False) -> Principal:
        if not header:
            raise AuthError("missing bearer token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > TOKEN_LEN_MAX:
            raise AuthError("expected 'Authorization: Bearer <token>'")
        return self.verify(token.strip(), admin=admin)

    def _fresh_keys(self, kid: str) -> jwt.PyJWK | None:
        """The key ``kid`` (re-checking the file at its bound); a changed set empties the cache:
        what an old key verified may no longer hold."""
        key = self._keys.get(kid)
        if self._keys.generation != self._generation:
            self._generation = self._keys.generation
            for cache in self._cache.values():
                cache.clear()
        return key

    def verify(self, token: str, *, admin: bool = False) -> Principal:
        now = time.time()
        cache = self._cache[admin]
        hit = cache.get(token)
        if hit is not None:
            principal, kid = hit
            # The key lookup also notices a reload, which empties the cache (then re-verify).
            if self._fresh_keys(kid) is not None and token in cache:
                if principal.expires_at > now:
                    cache.move_to_end(token)
                    return principal
                del cache[token]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        named = header.get("kid")
        key = self._fresh_keys(named) if isinstance(named, str) else None
        if key is None or not isinstance(named, str):
            raise AuthError("token signed by an unknown key")
        kid = named
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._admin_audience if admin else self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.InvalidAudienceError:
            self._other_audience(token, key, admin)
            raise AuthError(_reason(jwt.InvalidAudienceError())) from None
        except jwt.PyJWTError as exc:
            # The client gets a category only: never the token, never a library class name.
            raise AuthError(_reason(exc)) from None
        tenant = claims.get("sub")
        scope = claims.get("scope", "")
        if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
            raise AuthError("token has a malformed subject")
        if not isinstance(scope, str):
            raise AuthError("token has a malformed scope")
        ttl_max = ADMIN_TOKEN_TTL_S_MAX if admin else TOKEN_TTL_S_MAX
        # exp and iat are integers here (PyJWT checked both).
        if int(claims["exp"]) - int(claims["iat"]) > ttl_max:
            raise AuthError(f"token lifetime exceeds {ttl_max} s")
        principal = Principal(
            tenant=tenant,
            scopes=frozenset(scope.split()) & (ADMIN_SCOPES if admin else TENANT_SCOPES),
            expires_at=float(claims["exp"]) + LEEWAY_S,
        )
        cache[token] = (principal, kid)
        if len(cache) > TOKEN_CACHE_ENTRIES_MAX:
            cache.popitem(last=False)
        return principal

    def _other_audience(self, token: str, key: jwt.PyJWK, admin: bool) -> None:
        """Raise WrongAudience when ``token`` is valid for the audience not asked for."""
        try:
            jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience if admin else self._admin_audience,
                issuer=self._issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return
        if admin:
            raise WrongAudience("a tenant token cannot use an admin route")
        raise WrongAudience("an operator token cannot act for a tenant")
