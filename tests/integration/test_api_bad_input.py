"""Bad input gets a clear 4xx problem+json with a stable code, and changes nothing."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fixtures.api import Api, Reply, new_tenant

pytestmark = pytest.mark.integration

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}


def assert_problem(r: Reply, status: int, code: str) -> None:
    assert r.status == status, (r.status, r.body)
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert set(r.body) >= PROBLEM_KEYS, r.body
    assert r.body["status"] == status
    assert r.body["code"] == code, r.body
    assert "Traceback" not in r.body["detail"]
    assert r.headers.get("X-Request-Id")


async def _snapshot(api: Api, tenant: str, accounts: list[str]) -> list[Any]:
    out = []
    for acc in accounts:
        a = await api.account(tenant, "eu-west", acc)
        e = await api.call("GET", "eu-west", f"/v1/accounts/{acc}/entries", tenant=tenant)
        out.append((a["balance"], a["version"], len(e.body["data"])))
    return out


async def test_bad_transfers_are_refused_and_change_nothing(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 100)
    dst = await api.open_account(tenant, "eu-west")
    usd = await api.open_account(tenant, "eu-west", currency="USD")
    stranger = new_tenant()
    theirs = await api.funded(stranger, "eu-west", 100)
    before = await _snapshot(api, tenant, [src, dst, usd])
    before_theirs = await api.account(stranger, "eu-west", theirs)

    good = {"source": src, "destination": dst, "amount": 10, "currency": "EUR"}
    nowhere = "acc_" + src[4:7] + "000000000001"
    cases: list[tuple[str, dict[str, Any] | bytes, dict[str, str] | None, int, str]] = [
        ("no key", good, {}, 400, "invalid_request"),
        ("empty key", good, {"Idempotency-Key": ""}, 400, "invalid_request"),
        ("long key", good, {"Idempotency-Key": "k" * 256}, 400, "invalid_request"),
        ("control char key", good, {"Idempotency-Key": "a\tb"}, 400, "invalid_request"),
        ("empty body", b"", None, 400, "invalid_request"),
        ("not json", b"{amount: 1", None, 400, "invalid_request"),
        ("json array", b"[1,2]", None, 400, "invalid_request"),
        ("NaN", b'{"amount": NaN}', None, 400, "invalid_request"),
        ("zero", {**good, "amount": 0}, None, 422, "invalid_request"),
        ("negative", {**good, "amount": -5}, None, 422, "invalid_request"),
        ("fractional", {**good, "amount": 1.5}, None, 422, "invalid_request"),
        ("float integral", {**good, "amount": 10.0}, None, 422, "invalid_request"),
        ("string amount", {**good, "amount": "10"}, None, 422, "invalid_request"),
        ("bool amount", {**good, "amount": True}, None, 422, "invalid_request"),
        ("null amount", {**good, "amount": None}, None, 422, "invalid_request"),
        ("above max", {**good, "amount": 10**15 + 1}, None, 422, "invalid_request"),
        (
            "huge",
            b'{"source":"%s","destination":"%s","amount":1%s,"currency":"EUR"}'
            % (src.encode(), dst.encode(), b"0" * 40),
            None,
            422,
            "invalid_request",
        ),
        (
            "missing amount",
            {k: v for k, v in good.items() if k != "amount"},
            None,
            422,
            "invalid_request",
        ),
        ("unknown field", {**good, "fee": 1}, None, 422, "invalid_request"),
        ("malformed source", {**good, "source": "acc_xyz"}, None, 422, "invalid_request"),
        ("numeric source", {**good, "source": 12345}, None, 422, "invalid_request"),
        ("same account", {**good, "destination": src}, None, 422, "invalid_request"),
        ("lowercase currency", {**good, "currency": "eur"}, None, 422, "invalid_request"),
        ("unknown currency", {**good, "currency": "EUD"}, None, 422, "invalid_request"),
        ("long reference", {**good, "reference": "r" * 141}, None, 422, "invalid_request"),
        ("unknown destination", {**good, "destination": nowhere}, None, 404, "not_found"),
        ("foreign destination", {**good, "destination": theirs}, None, 404, "not_found"),
        ("foreign source", {**good, "source": theirs}, None, 404, "not_found"),
        ("currency mismatch", {**good, "destination": usd}, None, 422, "currency_mismatch"),
        ("transfer currency", {**good, "currency": "USD"}, None, 422, "currency_mismatch"),
        ("insufficient", {**good, "amount": 101}, None, 422, "insufficient_funds"),
        ("too large body", b"{" + b" " * 20000 + b"}", None, 413, "invalid_request"),
    ]
    for name, body, headers, status, code in cases:
        hdrs = {"Idempotency-Key": f"bad-{uuid.uuid4().hex}"} if headers is None else headers
        if isinstance(body, dict):
            r = await api.call(
                "POST", "us-east", "/v1/transfers", tenant=tenant, json=body, headers=hdrs
            )
        else:
            r = await api.call(
                "POST",
                "us-east",
                "/v1/transfers",
                tenant=tenant,
                data=body,
                headers={**hdrs, "Content-Type": "application/json"},
            )
        try:
            assert_problem(r, status, code)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from exc
    assert await _snapshot(api, tenant, [src, dst, usd]) == before
    assert await api.account(stranger, "eu-west", theirs) == before_theirs


async def test_bad_account_requests(api: Api) -> None:
    tenant = new_tenant()
    acc = await api.open_account(tenant, "ap-south")
    for bad in ("acc_zzz", "123", "acc_" + "f" * 200, "%00", "acc_0123456789ABCDE"):
        r = await api.call("GET", "us-east", f"/v1/accounts/{bad}", tenant=tenant)
        assert_problem(r, 404, "not_found")
    r = await api.call("GET", "us-east", f"/v1/accounts/{acc}", tenant=new_tenant())
    assert_problem(r, 404, "not_found")
    r = await api.call("GET", "us-east", f"/v1/accounts/{acc}?consistency=eventual", tenant=tenant)
    assert_problem(r, 422, "invalid_request")
    for q in (
        "limit=0",
        "limit=501",
        "limit=abc",
        "limit=1.5",
        "limit=-1",
        "cursor=%%%",
        "cursor=czEyYQ",
    ):
        r = await api.call("GET", "eu-west", f"/v1/accounts/{acc}/entries?{q}", tenant=tenant)
        assert_problem(r, 422, "invalid_request")
    r = await api.call("GET", "eu-west", "/v1/transfers/tr_123", tenant=tenant)
    assert_problem(r, 404, "not_found")
    r = await api.call("GET", "eu-west", "/v1/transfers/tr_" + "0" * 35, tenant=tenant)
    assert_problem(r, 404, "not_found")
    r = await api.call(
        "GET",
        "eu-west",
        f"/v1/accounts/{acc}",
        tenant=tenant,
        headers={"X-Consistency-Token": "!!!"},
    )
    assert_problem(r, 422, "invalid_request")
    account_cases: list[dict[str, Any]] = [
        {},
        {"currency": "EURO"},
        {"currency": "EUR", "home_region": "mars"},
        {"currency": "EUR", "overdraft_limit": -1},
        {"currency": "EUR", "overdraft_limit": 1.5},
        {"currency": "EUR", "overdraft_limit": 10**16},
        {"currency": "EUR", "metadata": []},
        {"currency": "EUR", "metadata": {str(i): i for i in range(33)}},
        {"currency": "EUR", "metadata": {"a": "x" * 5000}},
        {"currency": "EUR", "x": 1},
    ]
    for body in account_cases:
        r = await api.call("POST", "ap-south", "/v1/accounts", tenant=tenant, json=body)
        assert_problem(r, 422, "invalid_request")
    r = await api.call("GET", "eu-west", "/v1/nothing-here", tenant=tenant)
    assert_problem(r, 404, "not_found")
    r = await api.call("DELETE", "eu-west", f"/v1/accounts/{acc}", tenant=tenant)
    assert_problem(r, 405, "method_not_allowed")


async def test_auth_failures(api: Api) -> None:
    tenant = new_tenant()
    acc = await api.open_account(tenant, "us-east")
    path = f"/v1/accounts/{acc}"
    r = await api.call("GET", "eu-west", path)
    assert_problem(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    kid, key = api.cluster.keys.signing_key()
    head = {"kid": kid}
    now = int(time.time())
    base = {
        "sub": tenant,
        "scope": "accounts:read",
        "iat": now,
        "exp": now + 60,
        "iss": "txr-local",
        "aud": "txrouter",
    }
    century = 100 * 365 * 86400
    bad_tokens = {
        "expired": jwt.encode(
            {**base, "iat": now - 7200, "exp": now - 3600}, key, "EdDSA", headers=head
        ),
        "wrong signature": jwt.encode(base, Ed25519PrivateKey.generate(), "EdDSA", headers=head),
        "unknown kid": jwt.encode(base, key, "EdDSA", headers={"kid": "not-a-key"}),
        "no kid": jwt.encode(base, key, "EdDSA"),
        "100 years": jwt.encode({**base, "exp": now + century}, key, "EdDSA", headers=head),
        "alg none": jwt.encode(base, None, algorithm="none", headers=head),
        "garbage": "abc.def.ghi",
    }
    for name, tok in bad_tokens.items():
        r = await api.call("GET", "eu-west", path, token=tok)
        try:
            assert_problem(r, 401, "unauthorized")
            # The detail names a category, never a library's exception class.
            assert "Error" not in r.body["detail"], r.body
        except AssertionError as exc:
            raise AssertionError(f"token {name!r}: {exc}") from exc
    read_only = api.token(tenant, ("accounts:read",))
    r = await api.call("GET", "eu-west", path, token=read_only)
    assert r.status == 200
    r = await api.call("POST", "eu-west", "/v1/accounts", token=read_only, json={"currency": "EUR"})
    assert_problem(r, 403, "forbidden")
    r = await api.call(
        "POST",
        "eu-west",
        "/v1/transfers",
        token=read_only,
        key="k1",
        json={"source": acc, "destination": acc, "amount": 1, "currency": "EUR"},
    )
    assert_problem(r, 403, "forbidden")
    write_only = api.token(tenant, ("transfers:write",))
    r = await api.call("GET", "eu-west", path, token=write_only)
    assert_problem(r, 403, "forbidden")
