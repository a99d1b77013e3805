"""JWT verification refuses every token it should, with PyJWT doing the cryptography."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from infra.keys import KeyRing
from router.auth import (
    ADMIN_TOKEN_TTL_S_MAX,
    TOKEN_TTL_S_MAX,
    AuthError,
    KeySetError,
    KeySetFile,
    Verifier,
    WrongAudience,
    mint_token,
)

ISS, AUD, ADMIN_AUD = "txr-local", "txrouter", "txrouter-admin"


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    r = KeyRing(tmp_path / "jwt", sleep=lambda _s: None)
    r.create()
    return r


def _verifier(ring: KeyRing) -> Verifier:
    return Verifier(KeySetFile(ring.jwks_path), issuer=ISS, audience=AUD, admin_audience=ADMIN_AUD)


def _mint(ring: KeyRing, key: Ed25519PrivateKey | None = None, **over: object) -> str:
    kid, signing = ring.signing_key()
    now = int(time.time())
    claims = {
        "sub": "t1",
        "scope": "accounts:read",
        "iat": now,
        "exp": now + 60,
        "iss": ISS,
        "aud": AUD,
    }
    claims.update(over)
    return jwt.encode(claims, key or signing, algorithm="EdDSA", headers={"kid": kid})


def test_valid_token_gives_tenant_and_scopes(ring: KeyRing) -> None:
    tok = ring.mint("t1", ["accounts:read", "accounts:overdraft"], 60, issuer=ISS, audience=AUD)
    p = _verifier(ring).verify_header(f"Bearer {tok}")
    assert p.tenant == "t1"
    assert p.scopes == {"accounts:read", "accounts:overdraft"}
    assert jwt.get_unverified_header(tok)["kid"] == ring.signing_key()[0]


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic abc", "Bearer not.a.jwt", "Bearer " + "a" * 5000],
)
def test_missing_or_malformed_header(ring: KeyRing, header: str | None) -> None:
    with pytest.raises(AuthError):
        _verifier(ring).verify_header(header)


def test_expired_token(ring: KeyRing) -> None:
    now = int(time.time())
    with pytest.raises(AuthError, match="expired"):
        _verifier(ring).verify(_mint(ring, exp=now - 3600, iat=now - 7200))


def test_wrong_signature_and_unknown_kid(ring: KeyRing) -> None:
    with pytest.raises(AuthError, match="signature"):
        _verifier(ring).verify(_mint(ring, key=Ed25519PrivateKey.generate()))
    other = jwt.encode(
        {"sub": "t1", "iat": int(time.time()), "exp": int(time.time()) + 60},
        Ed25519PrivateKey.generate(),
        algorithm="EdDSA",
        headers={"kid": "nope"},
    )
    with pytest.raises(AuthError, match="unknown key"):
        _verifier(ring).verify(other)


def test_hs256_with_the_public_key_as_secret_is_refused(ring: KeyRing) -> None:
    # Algorithm confusion: an attacker signs HS256 with the (public) key bytes.
    # PyJWT refuses to sign that, so the token is built by hand.
    kid, _ = ring.signing_key()
    public = ring.jwks_path.read_bytes()
    now = int(time.time())

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
    body = b64(
        orjson.dumps(
            {"sub": "t1", "scope": "accounts:read", "iat": now, "exp": now + 60, "iss": ISS}
            | {"aud": AUD}
        )
    )
    mac = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{b64(mac)}"
    with pytest.raises(AuthError):
        _verifier(ring).verify(forged)


def test_alg_none_is_refused(ring: KeyRing) -> None:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()

    now = int(time.time())
    kid, _ = ring.signing_key()
    unsigned = (
        b64({"alg": "none", "typ": "JWT", "kid": kid})
        + "."
        + b64({"sub": "t1", "scope": "admin", "iat": now, "exp": now + 60, "iss": ISS, "aud": AUD})
        + "."
    )
    with pytest.raises(AuthError):
        _verifier(ring).verify(unsigned)


@pytest.mark.parametrize(
    "over", [{"aud": "other"}, {"iss": "other"}, {"sub": ""}, {"sub": "a b"}, {"scope": 5}]
)
def test_wrong_claims(ring: KeyRing, over: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        _verifier(ring).verify(_mint(ring, **over))


def test_missing_exp_is_refused(ring: KeyRing) -> None:
    kid, key = ring.signing_key()
    tok = jwt.encode(
        {"sub": "t1", "iat": int(time.time()), "iss": ISS, "aud": AUD},
        key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    with pytest.raises(AuthError, match="required claim"):
        _verifier(ring).verify(tok)


def test_unknown_scopes_are_dropped_not_granted(ring: KeyRing) -> None:
    p = _verifier(ring).verify(_mint(ring, scope="accounts:read superuser admin"))
    # admin in a tenant token grants nothing: only the admin audience carries it.
    assert p.scopes == {"accounts:read"}


def test_a_hundred_year_token_is_refused_by_mint_and_by_verify(ring: KeyRing) -> None:
    century = 100 * 365 * 86400
    with pytest.raises(ValueError, match="ttl"):
        ring.mint("t1", ["accounts:read"], century, issuer=ISS, audience=AUD)
    now = int(time.time())
    with pytest.raises(AuthError, match="lifetime"):
        _verifier(ring).verify(_mint(ring, exp=now + century))
    # The bound itself is accepted.
    _verifier(ring).verify(_mint(ring, exp=now + TOKEN_TTL_S_MAX))
    with pytest.raises(AuthError, match="lifetime"):
        _verifier(ring).verify(
            _mint(ring, aud=ADMIN_AUD, scope="admin", exp=now + ADMIN_TOKEN_TTL_S_MAX + 1),
            admin=True,
        )


def test_admin_tokens_live_in_their_own_audience(ring: KeyRing) -> None:
    v = _verifier(ring)
    admin = ring.mint("ops", [], 60, issuer=ISS, audience=ADMIN_AUD, admin=True)
    assert v.verify(admin, admin=True).scopes == {"admin"}
    with pytest.raises(WrongAudience):
        v.verify(admin)  # an operator token cannot act for a tenant
    tenant = ring.mint("t1", ["accounts:read"], 60, issuer=ISS, audience=AUD)
    with pytest.raises(WrongAudience):
        v.verify(tenant, admin=True)
    with pytest.raises(ValueError, match="admin"):
        ring.mint("t1", ["admin"], 60, issuer=ISS, audience=AUD)
    with pytest.raises(ValueError, match="ttl"):
        ring.mint("ops", [], ADMIN_TOKEN_TTL_S_MAX + 1, issuer=ISS, audience=ADMIN_AUD, admin=True)


def test_reasons_never_name_library_classes(ring: KeyRing) -> None:
    now = int(time.time())
    cases = [
        _mint(ring, exp=now - 3600, iat=now - 7200),
        _mint(ring, aud="x"),
        _mint(ring, iss="x"),
        _mint(ring, key=Ed25519PrivateKey.generate()),
        _mint(ring, iat=now + 3600, exp=now + 3660),
        "abc.def.ghi",
    ]
    for tok in cases:
        with pytest.raises(AuthError) as info:
            _verifier(ring).verify(tok)
        assert "Error" not in str(info.value)
        assert "jwt" not in str(info.value).lower()


def test_key_set_refuses_private_keys_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    private = {"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA", "kid": "k"}
    path.write_bytes(orjson.dumps({"keys": [private]}))
    with pytest.raises(KeySetError):
        KeySetFile(path)
    path.write_text("not json")
    with pytest.raises(KeySetError):
        KeySetFile(path)


def test_mint_token_checks_its_inputs() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(ValueError, match="tenant"):
        mint_token(key, "k", subject="a b", scopes=[], ttl_s=60, issuer=ISS, audience=AUD)
    with pytest.raises(ValueError, match="ttl"):
        mint_token(key, "k", subject="t1", scopes=[], ttl_s=0, issuer=ISS, audience=AUD)
