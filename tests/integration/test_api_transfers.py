"""Transfers through the routers of a real three-region cluster (PostgreSQL with synchronous
standbys, Redis, etcd): routing from any region, idempotency, floors and conservation."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from consistency import tokens
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

REGIONS = ("us-east", "eu-west", "ap-south")


@pytest.mark.parametrize("home", REGIONS)
async def test_a_transfer_enters_through_every_region(api: Api, home: str) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, home, 1_000)
    dst = await api.open_account(tenant, home)
    for n, region in enumerate(REGIONS, start=1):
        r = await api.transfer(tenant, region, src, dst, 10)
        assert r.status == 201, r.body
        assert r.body["status"] == "settled"
        assert r.headers["X-Served-By"] == f"{region}/primary"
        assert r.headers["X-Request-Id"]
        seen = tokens.decode(r.headers["X-Consistency-Token"])
        assert len(seen) == 2
        for reader in REGIONS:
            acc = await api.account(tenant, reader, dst)
            assert acc["balance"] == 10 * n
            assert acc["home_region"] == home
            assert acc["shard"] == f"{home}-1"
    src_acc = await api.account(tenant, home, src)
    assert src_acc["balance"] == 1_000 - 30


async def test_replay_returns_the_original_and_reuse_is_409(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 500)
    dst = await api.open_account(tenant, "eu-west")
    key = "order-" + uuid.uuid4().hex
    first = await api.transfer(tenant, "us-east", src, dst, 100, key=key)
    assert first.status == 201
    assert "Idempotent-Replayed" not in first.headers
    for region in REGIONS:
        again = await api.transfer(tenant, region, src, dst, 100, key=key)
        assert again.status == 201
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.body["id"] == first.body["id"]
    other = await api.transfer(tenant, "ap-south", src, dst, 101, key=key)
    assert other.status == 409
    assert other.body["code"] == "idempotency_key_reused"
    assert (await api.account(tenant, "eu-west", src))["balance"] == 400
    assert (await api.account(tenant, "eu-west", dst))["balance"] == 100
    # The same key from another source account is another key (scope: tenant, source).
    src2 = await api.funded(tenant, "eu-west", 500)
    fresh = await api.transfer(tenant, "eu-west", src2, dst, 100, key=key)
    assert fresh.status == 201
    assert "Idempotent-Replayed" not in fresh.headers


async def test_one_key_sent_at_once_to_every_region_applies_once(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "ap-south", 10_000)
    dst = await api.open_account(tenant, "ap-south")
    for round_ in range(5):
        key = f"dup-{round_}-{uuid.uuid4().hex}"
        replies = await asyncio.gather(
            *(api.transfer(tenant, region, src, dst, 7, key=key) for region in REGIONS * 3)
        )
        assert all(r.status == 201 for r in replies), [r.body for r in replies]
        assert len({r.body["id"] for r in replies}) == 1
        fresh = [r for r in replies if "Idempotent-Replayed" not in r.headers]
        assert len(fresh) == 1
    assert (await api.account(tenant, "ap-south", dst))["balance"] == 35
    assert (await api.account(tenant, "ap-south", src))["balance"] == 10_000 - 35


async def test_concurrent_overdrafts_never_pass_the_floor_and_money_is_conserved(
    api: Api,
) -> None:
    """Randomized (seeded) concurrent transfers among a few accounts, some with overdrafts.

    Checked against a model: every acknowledged transfer is applied exactly once, every
    refusal changes nothing, so final balances equal initial balances plus the acknowledged
    transfers, and no account is below its floor.
    """
    rng = random.Random(20261122)
    tenant = new_tenant()
    home = "us-east"
    floors = [0, 0, 50, 0, 200]
    accounts = []
    for floor in floors:
        acc = await api.open_account(tenant, home, overdraft=floor)
        accounts.append(acc)
    funding = await api.open_account(tenant, home, overdraft=10**12)
    initial = [100, 30, 0, 10, 0]
    for acc, amount in zip(accounts, initial, strict=True):
        if amount:
            assert (await api.transfer(tenant, home, funding, acc, amount)).status == 201

    plan = []
    for _ in range(120):
        i, j = rng.sample(range(len(accounts)), 2)
        plan.append((i, j, rng.randint(1, 80), rng.choice(REGIONS)))
    sem = asyncio.Semaphore(24)

    async def one(i: int, j: int, amount: int, region: str) -> tuple[int, int, int, int]:
        async with sem:
            r = await api.transfer(tenant, region, accounts[i], accounts[j], amount)
        assert r.status in (201, 422), r.body
        if r.status == 422:
            assert r.body["code"] == "insufficient_funds"
        return i, j, amount, r.status

    outcomes = await asyncio.gather(*(one(*p) for p in plan))
    expected = list(initial)
    for i, j, amount, status in outcomes:
        if status == 201:
            expected[i] -= amount
            expected[j] += amount
    assert any(s == 422 for *_, s in outcomes), "the plan must overdraw sometimes"
    assert any(s == 201 for *_, s in outcomes)
    final = [(await api.account(tenant, home, acc))["balance"] for acc in accounts]
    assert final == expected
    for balance, floor in zip(final, floors, strict=True):
        assert balance >= -floor
    assert sum(final) == sum(initial)


async def test_entries_page_through_the_history(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 1_000)
    dst = await api.open_account(tenant, "eu-west")
    for amount in range(1, 8):
        assert (await api.transfer(tenant, "eu-west", src, dst, amount)).status == 201
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        q = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        r = await api.call("GET", "us-east", f"/v1/accounts/{dst}/entries{q}", tenant=tenant)
        assert r.status == 200, r.body
        pages += 1
        seen.extend(e["amount"] for e in r.body["data"])
        for e in r.body["data"]:
            assert e["account"] == dst
        cursor = r.body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(7, 0, -1)), "newest first, each entry once"
    assert pages == 3
    r = await api.call("GET", "ap-south", f"/v1/accounts/{dst}/entries", tenant=tenant)
    assert r.body["data"][0]["balance_after"] == sum(range(1, 8))


async def test_get_transfer_from_any_region(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "ap-south", 100)
    dst = await api.open_account(tenant, "ap-south")
    posted = await api.transfer(tenant, "eu-west", src, dst, 42)
    for region in REGIONS:
        r = await api.call("GET", region, f"/v1/transfers/{posted.body['id']}", tenant=tenant)
        assert r.status == 200
        assert r.body == posted.body
    other = await api.call(
        "GET", "us-east", f"/v1/transfers/{posted.body['id']}", tenant=new_tenant()
    )
    assert other.status == 404
