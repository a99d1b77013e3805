"""The operator's JWT signing keys: a key ring directory, rotation with overlap, retirement.

Layout of a key ring directory (the local cluster's is ``<cluster dir>/secrets/jwt``, mode 0700):

    jwks.json      the public keys (RFC 7517), what every router verifies with (router.auth)
    keyring.json   which key signs, and when each rotated-out key may be retired (0600)
    <kid>.pem      one Ed25519 private key per kid (PKCS#8, 0600); never logged, never sent

Rotation (``txr keys rotate``), in this order, so that no valid token is refused at any time:
1. a new key pair is written and its public key added to ``jwks.json`` (atomic rename), while
   the old key still signs;
2. wait ``PUBLISH_WAIT_S`` (twice the routers' check interval): every router now knows the key;
3. the new key becomes the signing key; the old one stays in ``jwks.json`` (it still verifies the
   tokens it signed) with ``retire_after`` = now + the longest token lifetime;
4. keys whose ``retire_after`` has passed are removed (``rotate`` and ``retire`` both do this):
   every token they signed has expired by then.
``txr keys retire --kid K`` removes a key before its time (a leaked key): its tokens stop
verifying within the routers' check interval. The signing key is never retired; rotate first.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from router.auth import ADMIN_SCOPES, JWKS_CHECK_INTERVAL_S, TOKEN_TTL_S_MAX, mint_token

JWKS_FILE: Final = "jwks.json"
RING_FILE: Final = "keyring.json"
LOCK_FILE: Final = ".lock"
# Between publishing a key and signing with it: every router re-checks the key set within one
# interval; two leave room for a router busy at the moment of the first check.
PUBLISH_WAIT_S: Final = 2 * JWKS_CHECK_INTERVAL_S
# A rotated-out key keeps verifying this long: the longest a token it signed can live.
RETIRE_AFTER_S: Final = TOKEN_TTL_S_MAX


class KeyRingError(Exception):
    """The key ring is missing, unreadable, or the request would break it (message says why)."""


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    created_at: float
    retire_after: float | None
    signing: bool


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    # RFC 7638 thumbprint: the kid names the key itself, so two rings never clash on a kid.
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return {**jwk, "kid": _b64url(hashlib.sha256(canonical).digest())[:22], "alg": "EdDSA"}


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    # Replaced by rename, never rewritten in place: a router never reads half a key set.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, path)


class KeyRing:
    def __init__(
        self,
        directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.dir = directory
        self._clock = clock
        self._sleep = sleep

    @property
    def jwks_path(self) -> Path:
        return self.dir / JWKS_FILE

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two rotations at once would each publish a key and leave one unsigned-for.
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            raise KeyRingError(f"no key ring in {self.dir}: start the cluster first") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _ring(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.dir / RING_FILE).read_text())
        except FileNotFoundError:
            raise KeyRingError(f"no key ring in {self.dir}: start the cluster first") from None
        except ValueError as exc:
            raise KeyRingError(f"unreadable {RING_FILE} in {self.dir}: {exc}") from None
        return data

    def _save(self, ring: dict[str, Any]) -> None:
        _write_private(self.dir / RING_FILE, json.dumps(ring, indent=2).encode())
        jwks = {"keys": [ring["keys"][kid]["jwk"] for kid in sorted(ring["keys"])]}
        _write_public(self.jwks_path, json.dumps(jwks, indent=2).encode())

    def _new_key(self, ring: dict[str, Any]) -> str:
        key = Ed25519PrivateKey.generate()
        jwk = _public_jwk(key)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(self.dir / f"{jwk['kid']}.pem", pem)
        ring["keys"][jwk["kid"]] = {
            "jwk": jwk,
            "created_at": self._clock(),
            "retire_after": None,
        }
        return jwk["kid"]

    def create(self) -> str:
        """A fresh ring with one signing key; refuses to overwrite an existing ring."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        with self._locked():
            if (self.dir / RING_FILE).exists():
                raise KeyRingError(f"a key ring already exists in {self.dir}")
            ring: dict[str, Any] = {"signing": None, "keys": {}}
            kid = self._new_key(ring)
            ring["signing"] = kid
            self._save(ring)
        return kid

    def rotate(self) -> str:
        """Publish a new key, wait for the routers, sign with it; returns its kid."""
        with self._locked():
            ring = self._ring()
            kid = self._new_key(ring)
            self._save(ring)  # step 1: published, not yet signing
            self._sleep(PUBLISH_WAIT_S)  # step 2
            now = self._clock()
            old = ring["signing"]
            ring["signing"] = kid
            if old in ring["keys"]:
                ring["keys"][old]["retire_after"] = now + RETIRE_AFTER_S  # step 3
            self._drop_due(ring, now)  # step 4
            self._save(ring)
        return kid

    def retire(self, kid: str | None = None) -> list[str]:
        """Remove keys past their retire time, and ``kid`` now if given; returns removed kids."""
        with self._locked():
            ring = self._ring()
            if kid is not None:
                if kid not in ring["keys"]:
                    raise KeyRingError(f"no key {kid!r} in the ring")
                if kid == ring["signing"]:
                    raise KeyRingError(f"{kid} is the signing key: rotate before retiring it")
            removed = self._drop_due(ring, self._clock(), also=kid)
            self._save(ring)
        return removed

    def _drop_due(self, ring: dict[str, Any], now: float, also: str | None = None) -> list[str]:
        removed = []
        for kid, info in sorted(ring["keys"].items()):
            due = info["retire_after"] is not None and info["retire_after"] <= now
            if kid != ring["signing"] and (due or kid == also):
                removed.append(kid)
        for kid in removed:
            del ring["keys"][kid]
            (self.dir / f"{kid}.pem").unlink(missing_ok=True)
        return removed

    def list_keys(self) -> list[KeyInfo]:
        ring = self._ring()
        return [
            KeyInfo(kid, info["created_at"], info["retire_after"], kid == ring["signing"])
            for kid, info in sorted(ring["keys"].items(), key=lambda kv: kv[1]["created_at"])
        ]

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        kid = str(self._ring()["signing"])
        try:
            key = serialization.load_pem_private_key(
                (self.dir / f"{kid}.pem").read_bytes(), password=None
            )
        except (OSError, ValueError):
            raise KeyRingError(f"the signing key {kid} is unreadable in {self.dir}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyRingError(f"the signing key {kid} is not an Ed25519 key")
        return kid, key

    def mint(
        self,
        subject: str,
        scopes: Sequence[str],
        ttl_s: int,
        *,
        issuer: str,
        audience: str,
        admin: bool = False,
    ) -> str:
        kid, key = self.signing_key()
        return mint_token(
            key,
            kid,
            subject=subject,
            scopes=list(ADMIN_SCOPES) if admin else scopes,
            ttl_s=ttl_s,
            issuer=issuer,
            audience=audience,
            admin=admin,
        )
