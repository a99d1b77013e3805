"""POST /v1/transfers/batch (API.md "Batches of transfers") through a real cluster: every item
behaves exactly as one POST /v1/transfers with its key, results come back in request order, and
a bad envelope applies nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from typing import Any, Final

import orjson
import pytest

from consistency import tokens
from tests.fixtures.api import Api, Reply, new_tenant

pytestmark = pytest.mark.integration

# How long the batch's sagas (delivered inline or by the relays) and the cache may take to show
# their credits: bounded, but with room for a loaded machine.
SAGA_SETTLE_WAIT_S: Final = 30.0


def item(src: str, dst: str, amount: int, key: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key or uuid.uuid4().hex,
        "source": src,
        "destination": dst,
        "amount": amount,
        "currency": "EUR",
        **extra,
    }


async def batch(api: Api, tenant: str, region: str, items: list[Any], **kw: Any) -> Reply:
    return await api.call(
        "POST", region, "/v1/transfers/batch", tenant=tenant, json={"transfers": items}, **kw
    )


async def balances(api: Api, tenant: str, accounts: list[str]) -> list[tuple[int, int]]:
    out = []
    for acc in accounts:
        a = await api.account(tenant, "us-east", acc)
        out.append((a["balance"], a["version"]))
    return out


async def test_items_are_applied_in_order_with_single_request_semantics(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 100)
    dst = await api.open_account(tenant, "eu-west")
    usd = await api.open_account(tenant, "eu-west", currency="USD")
    reused = uuid.uuid4().hex
    # A key first used by a single request: the batch replays it, or refuses another body.
    first = await api.transfer(tenant, "eu-west", src, dst, 5, key=reused)
    assert first.status == 201, first.body
    items = [
        item(src, dst, 10),
        item(src, dst, 5, key=reused),  # same body: replay
        item(src, dst, 6, key=reused),  # other body: 409
        item(src, usd, 1),  # currency mismatch
        item(src, dst, 1_000),  # insufficient funds
        item(src, "acc_" + src[4:7] + "000000000001", 1),  # no such account
        item(src, dst, 0),  # invalid item: 422, its neighbours go on
        {"source": src},  # no key
        item(src, dst, 20, reference="order 7"),
    ]
    r = await batch(api, tenant, "us-east", items)
    assert r.status == 200, r.body
    res = r.body["results"]
    assert [x["status"] for x in res] == [201, 201, 409, 422, 422, 404, 422, 422, 201]
    assert res[0]["replayed"] is False
    assert res[0]["transfer"]["amount"] == 10
    assert res[1]["replayed"] is True
    assert res[1]["transfer"]["id"] == first.body["id"]
    assert res[2]["error"]["code"] == "idempotency_key_reused"
    assert res[3]["error"]["code"] == "currency_mismatch"
    assert res[4]["error"]["code"] == "insufficient_funds"
    assert res[5]["error"]["code"] == "not_found"
    assert res[6]["error"]["code"] == "invalid_request"
    assert res[7]["error"]["code"] == "invalid_request"
    assert res[8]["transfer"]["reference"] == "order 7"
    assert r.headers["X-Served-By"] == "us-east/primary"
    assert (await api.account(tenant, "eu-west", src))["balance"] == 100 - 5 - 10 - 20
    assert (await api.account(tenant, "eu-west", dst))["balance"] == 35
    # The token covers every applied item: reading with it is never older than the batch.
    seen = tokens.decode(r.headers["X-Consistency-Token"])
    assert seen[int(src[4:], 16)] == (await api.account(tenant, "eu-west", src))["version"]
    assert seen[int(dst[4:], 16)] == (await api.account(tenant, "eu-west", dst))["version"]

    # The whole batch again: every applied item replays, nothing moves twice.
    before = await balances(api, tenant, [src, dst])
    again = await batch(api, tenant, "ap-south", items)
    assert [x["status"] for x in again.body["results"]] == [
        201, 201, 409, 422, 422, 404, 422, 422, 201,
    ]  # fmt: skip
    assert again.body["results"][0]["replayed"] is True
    assert again.body["results"][0]["transfer"]["id"] == res[0]["transfer"]["id"]
    assert await balances(api, tenant, [src, dst]) == before
    # And a single request with a batch item's key replays the batch's transfer.
    single = await api.transfer(tenant, "eu-west", src, dst, 10, key=items[0]["idempotency_key"])
    assert single.status == 201
    assert single.headers["Idempotent-Replayed"] == "true"
    assert single.body["id"] == res[0]["transfer"]["id"]


async def test_mixed_shards_and_cross_region_items(api: Api) -> None:
    tenant = new_tenant()
    us = await api.funded(tenant, "us-east", 1_000)
    us2 = await api.open_account(tenant, "us-east")
    eu = await api.funded(tenant, "eu-west", 1_000)
    eu2 = await api.open_account(tenant, "eu-west")
    ap = await api.open_account(tenant, "ap-south")
    items = [
        item(us, us2, 1),  # us-east-1
        item(eu, eu2, 2),  # eu-west-1
        item(us, ap, 3),  # saga us-east-1 -> ap-south-1
        item(eu, us2, 4),  # saga eu-west-1 -> us-east-1
        item(us, us2, 5),
    ]
    r = await batch(api, tenant, "eu-west", items)
    assert r.status == 200, r.body
    res = r.body["results"]
    assert [x["status"] for x in res] == [201] * 5, [x for x in res if x["status"] != 201]
    assert [x["transfer"]["amount"] for x in res] == [1, 2, 3, 4, 5]
    assert res[0]["transfer"]["status"] == "settled"
    assert res[2]["transfer"]["status"] in ("settled", "pending")
    # Sagas finish (inline or by the relays): balances converge to what the items imply.
    deadline = time.monotonic() + SAGA_SETTLE_WAIT_S
    while True:
        got = [(await api.account(tenant, "us-east", a))["balance"] for a in (us, us2, eu, ap)]
        if got == [1_000 - 9, 1 + 5 + 4, 1_000 - 6, 3] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert got == [1_000 - 9, 10, 994, 3]
    assert (await api.account(tenant, "eu-west", eu2))["balance"] == 2


async def test_bad_envelopes_apply_nothing(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "us-east", 1_000)
    dst = await api.open_account(tenant, "us-east")
    good = item(src, dst, 1)
    before = await balances(api, tenant, [src, dst])
    cases: list[tuple[str, bytes, int]] = [
        ("not json", b'{"transfers": [', 400),
        ("array body", orjson.dumps([good]), 400),
        ("empty list", orjson.dumps({"transfers": []}), 422),
        ("not a list", orjson.dumps({"transfers": good}), 422),
        ("extra field", orjson.dumps({"transfers": [good], "atomic": True}), 422),
        ("no transfers", orjson.dumps({}), 422),
        ("too many", orjson.dumps({"transfers": [item(src, dst, 1) for _ in range(1001)]}), 422),
        (
            "duplicate key",
            b'{"transfers": [%s], "transfers": []}' % orjson.dumps(good),
            422,
        ),
        ("too large", b'{"transfers": [' + b" " * (3 * 1024 * 1024) + b"]}", 413),
    ]
    for name, body, status in cases:
        with warnings.catch_warnings():
            # aiohttp warns about sending a body above 1 MiB from bytes; that is the point here.
            warnings.simplefilter("ignore", ResourceWarning)
            r = await api.call(
                "POST",
                "us-east",
                "/v1/transfers/batch",
                tenant=tenant,
                data=body,
                headers={"Content-Type": "application/json"},
            )
        assert r.status == status, (name, r.status, r.body)
        assert r.body["code"] == "invalid_request", (name, r.body)
    r = await api.call(
        "POST",
        "us-east",
        "/v1/transfers/batch",
        tenant=tenant,
        data=orjson.dumps({"transfers": [good]}),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status == 415, r.body
    read_only = api.token(tenant, ("accounts:read",))
    r = await batch(api, tenant, "us-east", [good], token=read_only)
    assert r.status == 403, r.body
    assert await balances(api, tenant, [src, dst]) == before


async def test_a_thousand_items_in_one_request(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "ap-south", 10_000)
    dst = await api.open_account(tenant, "ap-south")
    items = [item(src, dst, 1) for _ in range(1000)]
    r = await batch(api, tenant, "ap-south", items)
    assert r.status == 200, r.body
    results = r.body["results"]
    assert len(results) == 1000
    # On a loaded machine some items may run out of deadline (504 outcome_unknown once sent,
    # 503 region_unavailable while still queued or shed): a careful client sends exactly those
    # again with the same keys, and learns their outcome.
    for _ in range(5):
        unknown = [i for i, x in enumerate(results) if x["status"] != 201]
        retryable = {"outcome_unknown", "region_unavailable"}
        assert all(results[i]["error"]["code"] in retryable for i in unknown)
        if not unknown:
            break
        again = await batch(api, tenant, "ap-south", [items[i] for i in unknown])
        for i, x in zip(unknown, again.body["results"], strict=True):
            results[i] = x
    assert [x["status"] for x in results] == [201] * 1000
    ids = [x["transfer"]["id"] for x in results]
    assert len(set(ids)) == 1000
    assert (await api.account(tenant, "ap-south", dst))["balance"] == 1000
    assert (await api.account(tenant, "ap-south", src))["balance"] == 9000
