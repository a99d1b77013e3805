"""Reads through the routers: region caches kept coherent from the commit log (G6)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from consistency import ids, tokens
from router.app import create_app
from router.config import RouterConfig
from router.limits import CACHED_LAG_BOUND_S
from router.resources import INVALIDATION
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

REGIONS = ("us-east", "eu-west", "ap-south")
# Bounded waits for the relays on a loaded two-core machine.
VISIBLE_WAIT_S = 15.0


async def _wait_cached(api: Api, tenant: str, region: str, acc: str, balance: int) -> float:
    """Seconds until ``region`` serves ``balance`` for ``acc`` from its cache."""
    start = time.monotonic()
    while time.monotonic() - start < VISIBLE_WAIT_S:
        r = await api.call("GET", region, f"/v1/accounts/{acc}", tenant=tenant)
        assert r.status == 200, r.body
        if r.headers["X-Served-By"] == f"{region}/cache" and r.body["balance"] == balance:
            return time.monotonic() - start
        # A cached answer is never older than the relay's bound: here, never older than the
        # balance before the last transfer.
        await asyncio.sleep(0.02)
    raise AssertionError(f"{region} never served balance {balance} of {acc} from its cache")


async def test_cached_reads_are_served_by_every_region_after_commit(api: Api) -> None:
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 1_000)
    dst = await api.open_account(tenant, "us-east")
    for _ in range(3):
        r = await api.transfer(tenant, random.choice(REGIONS), src, dst, 10)
        assert r.status == 201
    # Cross-region transfers settle in the background; wait for the destination's last credit.
    for region in REGIONS:
        await _wait_cached(api, tenant, region, dst, 30)
        await _wait_cached(api, tenant, region, src, 970)
    other = await api.call("GET", "ap-south", f"/v1/accounts/{dst}", tenant=new_tenant())
    assert other.status == 404, "a cached row of another tenant is still a 404"


async def test_session_reads_never_go_backwards(api: Api) -> None:
    """One client session writes through random regions while it reads through every region,
    always sending back the newest token it holds: no read is older than a version the session
    has seen (its own writes included), and versions never decrease."""
    tenant = new_tenant()
    src = await api.funded(tenant, "ap-south", 10_000)
    dst = await api.open_account(tenant, "ap-south")
    dst_id = tokens_id(dst)
    seen: dict[int, int] = {}
    stop = asyncio.Event()

    def remember(header: str) -> None:
        # Writes and reads answer concurrently: keep the newest version of each account.
        for acc, version in tokens.decode(header).items():
            seen[acc] = max(version, seen.get(acc, 0))

    def header() -> dict[str, str]:
        return {"X-Consistency-Token": tokens.encode(seen, [])} if seen else {}

    async def writer() -> None:
        for _ in range(25):
            r = await api.call(
                "POST",
                random.choice(REGIONS),
                "/v1/transfers",
                tenant=tenant,
                key=uuid.uuid4().hex,
                headers=header(),
                json={"source": src, "destination": dst, "amount": 1, "currency": "EUR"},
            )
            assert r.status == 201
            remember(r.headers["X-Consistency-Token"])
        stop.set()

    versions: list[int] = []
    served: set[str] = set()

    async def read(region: str) -> None:
        floor = seen.get(dst_id, 0)
        r = await api.call(
            "GET",
            region,
            f"/v1/accounts/{dst}?consistency=session",
            tenant=tenant,
            headers=header(),
        )
        assert r.status == 200, r.body
        assert r.body["version"] >= floor, "a session read went backwards"
        versions.append(r.body["version"])
        served.add(r.headers["X-Served-By"].split("/")[1])
        remember(r.headers["X-Consistency-Token"])

    async def reader() -> None:
        i = 0
        while not stop.is_set():
            await read(REGIONS[i % 3])
            i += 1

    await asyncio.gather(writer(), reader())
    for region in REGIONS:
        await read(region)
    assert versions[-3:] == [26, 26, 26], "after its last write the session reads it everywhere"
    assert served <= {"cache", "standby", "primary"}


def tokens_id(acc: str) -> int:
    parsed = ids.parse_account_id(acc)
    assert parsed is not None
    return parsed


@pytest.fixture
async def frozen_router(local_cluster: Any) -> AsyncIterator[TestClient[Any, Any]]:
    config = RouterConfig.load(local_cluster.dir / "run" / "router-eu-west.json")
    app = create_app(dataclasses.replace(config, port=0))
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_cached_reads_fall_back_to_home_when_the_relay_lags(
    api: Api, frozen_router: TestClient[Any, Any]
) -> None:
    tenant = new_tenant()
    acc = await api.funded(tenant, "eu-west", 100)
    headers = {"Authorization": f"Bearer {api.token(tenant)}"}
    relay = frozen_router.server.app[INVALIDATION]
    assert relay is not None

    async def served_by() -> str:
        resp = await frozen_router.get(f"/v1/accounts/{acc}", headers=headers)
        assert resp.status == 200
        assert (await resp.json())["balance"] == 100
        return resp.headers["X-Served-By"]

    deadline = time.monotonic() + VISIBLE_WAIT_S
    while await served_by() != "eu-west/cache":
        assert time.monotonic() < deadline, "the in-process router never served from cache"
        await asyncio.sleep(0.05)
    relay.pause()
    await asyncio.sleep(CACHED_LAG_BOUND_S + 0.5)
    assert (relay.lag("eu-west-1") or 0) > CACHED_LAG_BOUND_S
    assert await served_by() == "eu-west/primary", "past the lag bound, reads go home"
    relay.resume()
    deadline = time.monotonic() + VISIBLE_WAIT_S
    while await served_by() != "eu-west/cache":
        assert time.monotonic() < deadline, "the cache never came back after the relay resumed"
        await asyncio.sleep(0.05)
