"""Cross-region transfers through the routers: a saga over a transactional outbox (G2, G4)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from typing import Any

import psycopg
import pytest

from consistency import ids
from infra import cli
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

REGIONS = ("us-east", "eu-west", "ap-south")
# Bounded wait for the relays to drain a workload on a two-core machine.
SETTLE_WAIT_S = 30.0


def reconcile(local_cluster: Any, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = cli.main(["reconcile", "--dir", str(local_cluster.dir), "--json"])
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (code == 0) == report["ok"]
    return report


async def wait_settled(api: Api, tenant: str, transfer_ids: list[str]) -> dict[str, str]:
    deadline = time.monotonic() + SETTLE_WAIT_S
    status: dict[str, str] = {}
    pending = list(transfer_ids)
    while pending and time.monotonic() < deadline:
        for tid in list(pending):
            r = await api.call("GET", random.choice(REGIONS), f"/v1/transfers/{tid}", tenant=tenant)
            assert r.status == 200, r.body
            status[tid] = r.body["status"]
            if status[tid] != "pending":
                pending.remove(tid)
        if pending:
            await asyncio.sleep(0.2)
    assert not pending, f"{len(pending)} transfers still pending after {SETTLE_WAIT_S}s"
    return status


async def test_cross_region_transfer_settles_exactly_once(
    api: Api, local_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    dst = await api.open_account(tenant, "ap-south")
    r = await api.transfer(tenant, "eu-west", src, dst, 250, key="x-1")
    assert r.status == 201, r.body
    assert r.body["status"] in ("settled", "pending")
    await wait_settled(api, tenant, [r.body["id"]])
    assert (await api.account(tenant, "eu-west", src))["balance"] == 750
    assert (await api.account(tenant, "us-east", dst))["balance"] == 250
    again = await api.transfer(tenant, "ap-south", src, dst, 250, key="x-1")
    assert again.status == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.body["id"] == r.body["id"]
    assert again.body["status"] == "settled"
    entries = await api.call("GET", "ap-south", f"/v1/accounts/{dst}/entries", tenant=tenant)
    assert [e["amount"] for e in entries.body["data"]] == [250]
    assert entries.body["data"][0]["transfer_id"] == r.body["id"]
    assert entries.body["data"][0]["counterparty"] == src
    report = reconcile(local_cluster, capsys)
    assert report["ok"], report["discrepancies"]


async def test_cross_region_refusals_happen_before_money_moves(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 100)
    usd = await api.open_account(tenant, "us-east", currency="USD")
    theirs = await api.open_account(new_tenant(), "ap-south")
    r = await api.transfer(tenant, "eu-west", src, usd, 10)
    assert r.status == 422
    assert r.body["code"] == "currency_mismatch"
    r = await api.transfer(tenant, "us-east", src, theirs, 10)
    assert r.status == 404
    assert r.body["code"] == "not_found"
    nowhere = "acc_" + theirs[4:7] + "00000000abcd"
    r = await api.transfer(tenant, "ap-south", src, nowhere, 10)
    assert r.status == 404
    r = await api.transfer(
        tenant, "ap-south", src, (await api.open_account(tenant, "us-east")), 101
    )
    assert r.status == 422
    assert r.body["code"] == "insufficient_funds"
    acc = await api.account(tenant, "eu-west", src)
    assert acc["balance"] == 100
    assert acc["version"] == 2


async def test_one_key_at_once_through_every_region_is_one_cross_region_transfer(
    api: Api,
) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 1_000)
    dst = await api.open_account(tenant, "us-east")
    ids = set()
    for round_ in range(3):
        key = f"dup-{round_}-{uuid.uuid4().hex}"
        replies = await asyncio.gather(
            *(api.transfer(tenant, region, src, dst, 10, key=key) for region in REGIONS * 2)
        )
        assert all(r.status == 201 for r in replies), [r.body for r in replies]
        assert len({r.body["id"] for r in replies}) == 1
        ids.add(replies[0].body["id"])
    await wait_settled(api, tenant, sorted(ids))
    assert (await api.account(tenant, "us-east", dst))["balance"] == 30
    assert (await api.account(tenant, "us-east", src))["balance"] == 970


async def test_randomized_workload_across_every_region_pair_reconciles(
    api: Api, local_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seeded concurrent same-shard and cross-region transfers; then every one settles, the
    books reconcile, totals are conserved and acknowledged transfers match the balances."""
    rng = random.Random(7)
    tenant = new_tenant()
    funding = {r: await api.open_account(tenant, r, overdraft=10**12) for r in REGIONS}
    accounts: list[tuple[str, str]] = []
    for region in REGIONS:
        for _ in range(3):
            acc = await api.open_account(tenant, region)
            accounts.append((region, acc))
            assert (await api.transfer(tenant, region, funding[region], acc, 500)).status == 201
    balances = {acc: 500 for _, acc in accounts}
    plan = []
    for _ in range(90):
        (_, a), (_, b) = rng.sample(accounts, 2)
        plan.append((a, b, rng.randint(1, 300), rng.choice(REGIONS)))
    sem = asyncio.Semaphore(16)

    async def one(a: str, b: str, amount: int, via: str) -> tuple[str, str, int, Any]:
        async with sem:
            r = await api.transfer(tenant, via, a, b, amount)
        assert r.status in (201, 422), r.body
        return a, b, amount, r

    results = await asyncio.gather(*(one(*p) for p in plan))
    acked = [(a, b, amount, r.body["id"]) for a, b, amount, r in results if r.status == 201]
    refused = [r for *_, r in results if r.status == 422]
    assert acked
    assert all(r.body["code"] == "insufficient_funds" for r in refused)
    statuses = await wait_settled(api, tenant, [t for *_, t in acked])
    assert set(statuses.values()) == {"settled"}
    for a, b, amount, _ in acked:
        balances[a] -= amount
        balances[b] += amount
    for _region, acc in accounts:
        got = await api.account(tenant, rng.choice(REGIONS), acc)
        assert got["balance"] == balances[acc], acc
        assert got["balance"] >= 0
    total = sum(balances.values())
    for r in REGIONS:
        total += (await api.account(tenant, r, funding[r]))["balance"]
    assert total == 0, "money is conserved: funding debits equal customer credits"
    report = reconcile(local_cluster, capsys)
    assert report["ok"], report["discrepancies"]


async def test_destination_refusal_at_leg_2_reverses_with_its_code(
    api: Api, local_cluster: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The up-front checks pass, but leg 2 refuses (the destination would exceed the balance
    ceiling): the source is credited back exactly once and the transfer shows the reason."""
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 100)
    dst = await api.open_account(tenant, "eu-west")
    dst_id = ids.parse_account_id(dst)
    dsn = local_cluster.primary_admin_dsn["eu-west-1"]
    # As admin, park the destination just under the 2^62 ceiling (no entries: restored below).
    near_ceiling = 2**62 - 5
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE txr.accounts SET balance = %s WHERE id = %s", (near_ceiling, dst_id))
    try:
        r = await api.transfer(tenant, "ap-south", src, dst, 10, key="refused-1")
        assert r.status == 201, r.body
        statuses = await wait_settled(api, tenant, [r.body["id"]])
        assert statuses[r.body["id"]] == "reversed"
        got = await api.call("GET", "eu-west", f"/v1/transfers/{r.body['id']}", tenant=tenant)
        assert got.body["status"] == "reversed"
        assert got.body["refusal_code"] == "balance_limit"
        again = await api.transfer(tenant, "us-east", src, dst, 10, key="refused-1")
        assert again.body["status"] == "reversed"
        assert again.body["refusal_code"] == "balance_limit"
        assert (await api.account(tenant, "us-east", src))["balance"] == 100
        entries = await api.call("GET", "us-east", f"/v1/accounts/{src}/entries", tenant=tenant)
        assert [e["amount"] for e in entries.body["data"]][:2] == [10, -10], "one reversal"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE txr.accounts SET balance = 0 WHERE id = %s", (dst_id,))
    report = reconcile(local_cluster, capsys)
    assert report["ok"], report["discrepancies"]
