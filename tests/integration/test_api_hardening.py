"""Hostile and clumsy clients (issue 16, the request path): each case failed before its fix."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from router.limits import BODY_RECEIVE_TIMEOUT_S
from tests.fixtures.api import Api, Reply, new_tenant

pytestmark = pytest.mark.integration


async def _raw(url: str, parts: list[bytes], *, pause_s: float = 0.2) -> tuple[int, bytes]:
    """Send ``parts`` as separate TCP writes with a pause between; the status and raw answer."""
    u = urlsplit(url)
    assert u.hostname is not None
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause_s)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BODY_RECEIVE_TIMEOUT_S + 10)
        status = int(head.split(b" ", 2)[1])
        return status, head
    finally:
        writer.close()


def _post(
    path: str, token: str, body: bytes, *, extra: str = "", length: int | None = None
) -> bytes:
    n = len(body) if length is None else length
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {n}\r\n{extra}\r\n"
    ).encode()


async def test_a_body_in_several_segments_is_one_body(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 100)
    dst = await api.open_account(tenant, "us-east")
    body = orjson.dumps({"source": src, "destination": dst, "amount": 7, "currency": "EUR"})
    head = _post(
        "/v1/transfers", api.token(tenant), body, extra=f"Idempotency-Key: {uuid.uuid4().hex}\r\n"
    )
    status, _ = await _raw(api.routers["us-east"], [head, body[:10], body[10:40], body[40:]])
    assert status == 201
    assert (await api.account(tenant, "us-east", dst))["balance"] == 7


async def test_headers_without_a_body_get_408_in_bounded_time(api: Api) -> None:
    tenant = new_tenant()
    head = _post("/v1/accounts", api.token(tenant), b"", length=50)
    started = time.monotonic()
    status, raw = await _raw(api.routers["eu-west"], [head])
    assert status == 408, raw
    assert time.monotonic() - started < BODY_RECEIVE_TIMEOUT_S + 5
    assert b"application/problem+json" in raw


def _assert_refused(r: Reply, status: int = 422) -> None:
    assert r.status == status, (r.status, r.body)
    assert r.body["code"] == "invalid_request", r.body


async def test_input_the_store_would_refuse_is_422_and_nothing_is_written(api: Api) -> None:
    tenant = new_tenant()
    bad_metadata: list[bytes] = [
        b'{"currency": "EUR", "metadata": {"a": "x\\u0000y"}}',  # PostgreSQL refuses U+0000
        b'{"currency": "EUR", "metadata": {"a\\u0000": 1}}',
        b'{"currency": "EUR", "metadata": {"a": "\\ud800"}}',  # a lone surrogate
        b'{"currency": "EUR", "metadata": {"n": 18446744073709551616}}',  # past 64 bits
        b'{"currency": "EUR", "metadata": {"n": -9223372036854775809}}',
        b'{"currency": "EUR", "metadata": {"n": 1e400}}',  # not a double
        b'{"currency": "EUR", "metadata": {"n": 1e300}}',  # jsonb gives back 301 digits
        b'{"currency": "EUR", "currency": "USD"}',  # duplicate key
        b'{"currency": "EUR", "metadata": {"a": 1, "a": 2}}',
    ]
    for body in bad_metadata:
        r = await api.call(
            "POST",
            "us-east",
            "/v1/accounts",
            tenant=tenant,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            _assert_refused(r)
        except AssertionError as exc:
            raise AssertionError(f"{body!r}: {exc}") from exc
    src = await api.funded(tenant, "us-east", 100)
    dst = await api.open_account(tenant, "us-east")
    bad_transfers: list[bytes] = [
        b'{"source": "%s", "destination": "%s", "amount": 1, "currency": "EUR",'
        b' "reference": "a\\u0000b"}',
        b'{"source": "%s", "destination": "%s", "amount": 1, "amount": 2, "currency": "EUR"}',
        b'{"source": "%s", "destination": "%s", "\\u0061mount": 1, "amount": 2, "currency": "EUR"}',
    ]
    for template in bad_transfers:
        body = template % (src.encode(), dst.encode())
        r = await api.call(
            "POST",
            "us-east",
            "/v1/transfers",
            tenant=tenant,
            data=body,
            key=uuid.uuid4().hex,
            headers={"Content-Type": "application/json"},
        )
        try:
            _assert_refused(r)
        except AssertionError as exc:
            raise AssertionError(f"{body!r}: {exc}") from exc
    assert (await api.account(tenant, "us-east", dst))["balance"] == 0


async def test_json_only_strict_utf8(api: Api) -> None:
    tenant = new_tenant()
    body = {"currency": "EUR"}
    r = await api.call(
        "POST",
        "ap-south",
        "/v1/accounts",
        tenant=tenant,
        data=orjson.dumps(body),
        headers={"Content-Type": "text/plain"},
    )
    _assert_refused(r, 415)
    for raw in ('{"currency": "EUR"}'.encode("utf-16"), b'\xef\xbb\xbf{"currency": "EUR"}'):
        r = await api.call(
            "POST",
            "ap-south",
            "/v1/accounts",
            tenant=tenant,
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        _assert_refused(r, 400)


async def test_stored_values_never_make_a_later_read_fail(api: Api) -> None:
    tenant = new_tenant()
    metadata: dict[str, Any] = {
        "big": 2**63 - 1,
        "small": -(2**63),
        "float": 9.2e18,
        "tiny": 1.5e-300,
        "text": "\u00e9\u4e2d\U0001f600",
        "nested": {"a": [1, {"b": None}]},
    }
    r = await api.call(
        "POST",
        "eu-west",
        "/v1/accounts",
        tenant=tenant,
        json={"currency": "EUR", "metadata": metadata},
    )
    assert r.status == 201, r.body
    acc = r.body["id"]
    for level in ("cached", "cached", "strong", "session"):
        got = await api.call(
            "GET", "us-east", f"/v1/accounts/{acc}?consistency={level}", tenant=tenant
        )
        assert got.status == 200, (level, got.body)
        assert got.body["metadata"] == metadata


async def test_query_parameters_ascii_and_in_range(api: Api) -> None:
    tenant = new_tenant()
    acc = await api.open_account(tenant, "us-east")
    huge = base64.urlsafe_b64encode(b"s" + str(2**64).encode()).rstrip(b"=").decode()
    for q in ("limit=%D9%A1%D9%A2", "limit=%C2%B2", f"cursor={huge}", "cursor=" + "A" * 40):
        r = await api.call("GET", "us-east", f"/v1/accounts/{acc}/entries?{q}", tenant=tenant)
        try:
            _assert_refused(r)
        except AssertionError as exc:
            raise AssertionError(f"{q}: {exc}") from exc


async def test_single_flight_is_tenant_neutral(api: Api) -> None:
    """The owner's read never gets another tenant's 404 from a shared cache-miss load."""
    owner = new_tenant()
    stranger = new_tenant()
    for _ in range(20):
        acc = await api.open_account(owner, "eu-west")  # not in the cache yet: a miss
        path = f"/v1/accounts/{acc}?consistency=cached"
        theirs, mine = await asyncio.gather(
            api.call("GET", "us-east", path, tenant=stranger),
            api.call("GET", "us-east", path, tenant=owner),
        )
        assert theirs.status == 404, theirs.body
        assert mine.status == 200, mine.body
