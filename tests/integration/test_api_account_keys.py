"""Idempotent account opens and the saga's roles, on the real cluster (issue 16)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Final

import psycopg
import pytest
from psycopg import errors as pg_errors

from consistency import ids
from infra.local import cluster as lc
from infra.local import postgres
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

# Concurrent opens with one key, sent to every worker of two regions at once.
CONCURRENT_OPENS: Final = 12


async def _open(api: Api, tenant: str, via: str, key: str, body: dict[str, Any]) -> Any:
    return await api.call("POST", via, "/v1/accounts", tenant=tenant, json=body, key=key)


async def test_same_key_same_body_is_the_same_account(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "eu-west", "metadata": {"ref": "a-1"}}
    first = await _open(api, tenant, "eu-west", key, body)
    assert first.status == 201, first.body
    assert "Idempotent-Replayed" not in first.headers
    # Again, from another region's router: the same answer, marked as a replay.
    for via in ("eu-west", "us-east"):
        again = await _open(api, tenant, via, key, body)
        assert again.status == 201, again.body
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.body == first.body
    # Another tenant's identical key is its own (the key's scope is the tenant).
    other = await _open(api, new_tenant(), "eu-west", key, body)
    assert other.status == 201
    assert other.body["id"] != first.body["id"]
    # Money moves into the account once, whatever the replays: it is one account.
    acc = await api.account(tenant, "eu-west", first.body["id"])
    assert acc["balance"] == 0


async def test_same_key_another_body_is_409_and_opens_nothing(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "us-east"}
    first = await _open(api, tenant, "us-east", key, body)
    assert first.status == 201
    for changed in (
        {"currency": "USD", "home_region": "us-east"},
        {"currency": "EUR", "home_region": "us-east", "metadata": {"x": 1}},
    ):
        r = await _open(api, tenant, "us-east", key, changed)
        assert r.status == 409, r.body
        assert r.body["code"] == "idempotency_key_reused"
        assert r.headers["Content-Type"].startswith("application/problem+json")
    assert _accounts_of(api, tenant) == 1


async def test_concurrent_opens_with_one_key_open_one_account(api: Api) -> None:
    tenant = new_tenant()
    key = uuid.uuid4().hex
    body = {"currency": "EUR", "home_region": "ap-south"}
    vias = ["ap-south", "us-east"] * (CONCURRENT_OPENS // 2)
    replies = await asyncio.gather(*(_open(api, tenant, v, key, body) for v in vias))
    assert all(r.status == 201 for r in replies), [(r.status, r.body) for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert sum("Idempotent-Replayed" not in r.headers for r in replies) == 1
    assert _accounts_of(api, tenant) == 1


async def test_a_bad_key_is_400(api: Api) -> None:
    tenant = new_tenant()
    r = await _open(api, tenant, "us-east", "k" * 256, {"currency": "EUR"})
    assert r.status == 400
    assert r.body["code"] == "invalid_request"
    assert _accounts_of(api, tenant) == 0


def _accounts_of(api: Api, tenant: str) -> int:
    total = 0
    for dsn in lc.primary_admin_dsns(api.cluster.dir).values():
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM txr.accounts WHERE tenant = %s", (tenant,)
            ).fetchone()
        assert row is not None
        total += int(row[0])
    return total


async def test_the_app_role_cannot_credit_without_leg1(api: Api) -> None:
    """With the routers' DB password, leg 2 (a credit from a transit account) is refused; the
    relays' role can call it but a message it made up is refused as unauthenticated."""
    tenant = new_tenant()
    dst = await api.open_account(tenant, "eu-west")
    dst_id = ids.parse_account_id(dst)
    assert dst_id is not None
    pw = lc.pg_passwords(api.cluster.dir)
    admin_dsn = lc.primary_admin_dsns(api.cluster.dir)
    shard = next(s for s in admin_dsn if s.startswith("eu-west"))
    base = admin_dsn[shard]
    host_port = base.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    # A credit of 1000 from us-east-1's transit account, with no leg 1 behind it.
    call = (
        "SELECT code FROM txr.apply_inbound(%s, %s, 'us-east-1', %s, 1, %s, 1000, 'EUR', %s,"
        " now(), 1, %s)"
    )
    with psycopg.connect(base) as conn:
        fence = conn.execute("SELECT epoch FROM txr.fence").fetchone()
        slot = conn.execute(
            "SELECT epoch FROM txr.owned_slots WHERE slot = %s", (ids.account_slot(dst_id),)
        ).fetchone()
    assert fence is not None
    assert slot is not None
    params = (fence[0], uuid.uuid4(), tenant, dst_id, slot[0], b"\x00" * 32)
    app = postgres.dsn(host, int(port), postgres.APP_ROLE, pw["app_password"], "txr")
    with psycopg.connect(app) as conn, pytest.raises(pg_errors.InsufficientPrivilege):
        conn.execute(call, params)
    relay = postgres.dsn(host, int(port), postgres.RELAY_ROLE, pw["relay_password"], "txr")
    with psycopg.connect(relay) as conn:
        got = conn.execute(call, params).fetchone()
    assert got == ("unauthenticated",)
    assert (await api.account(tenant, "eu-west", dst))["balance"] == 0
