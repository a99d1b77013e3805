"""JWT verification refuses every token it should, with PyJWT doing the cryptography."""

from __future__ import annotations

import base64
import time

import jwt
import orjson
import pytest

from router.auth import AuthError, Verifier, mint_token

SECRET = bytes(range(32))
ISS, AUD = "txr-local", "txrouter"


def _verifier() -> Verifier:
    return Verifier(SECRET, issuer=ISS, audience=AUD)


def _mint(**over: object) -> str:
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
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_valid_token_gives_tenant_and_scopes() -> None:
    tok = mint_token(
        SECRET, tenant="t1", scopes=["accounts:read", "admin"], ttl_s=60, issuer=ISS, audience=AUD
    )
    p = _verifier().verify_header(f"Bearer {tok}")
    assert p.tenant == "t1"
    assert p.scopes == {"accounts:read", "admin"}


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Basic abc", "Bearer not.a.jwt", "Bearer " + "a" * 5000],
)
def test_missing_or_malformed_header(header: str | None) -> None:
    with pytest.raises(AuthError):
        _verifier().verify_header(header)


def test_expired_token() -> None:
    with pytest.raises(AuthError):
        _verifier().verify(_mint(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200))


def test_wrong_signature() -> None:
    forged = jwt.encode({"sub": "t1", "exp": int(time.time()) + 60}, b"x" * 32, algorithm="HS256")
    with pytest.raises(AuthError):
        _verifier().verify(forged)


def test_alg_none_is_refused() -> None:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(d)).rstrip(b"=").decode()

    now = int(time.time())
    unsigned = (
        b64({"alg": "none", "typ": "JWT"})
        + "."
        + b64({"sub": "t1", "scope": "admin", "iat": now, "exp": now + 60, "iss": ISS, "aud": AUD})
        + "."
    )
    with pytest.raises(AuthError):
        _verifier().verify(unsigned)


@pytest.mark.parametrize(
    "over", [{"aud": "other"}, {"iss": "other"}, {"sub": ""}, {"sub": "a b"}, {"scope": 5}]
)
def test_wrong_claims(over: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        _verifier().verify(_mint(**over))


def test_missing_exp_is_refused() -> None:
    tok = jwt.encode(
        {"sub": "t1", "iat": int(time.time()), "iss": ISS, "aud": AUD}, SECRET, algorithm="HS256"
    )
    with pytest.raises(AuthError):
        _verifier().verify(tok)


def test_unknown_scopes_are_dropped_not_granted() -> None:
    p = _verifier().verify(_mint(scope="accounts:read superuser"))
    assert p.scopes == {"accounts:read"}
