"""Reads through the routers: region caches kept coherent from the commit log (G6)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from consistency import ids, tokens
from router.limits import CACHED_LAG_BOUND_S, RELAY_LAG_REFRESH_S
from tests.fixtures.api import Api, new_tenant
from tests.fixtures.cluster import LocalCluster, kill_process, respawn

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


async def test_cached_reads_go_home_within_the_bound_when_the_relay_dies(
    api: Api, local_cluster: LocalCluster
) -> None:
    """G6 across processes: kill -9 a region's relay process and, once the lag bound has
    passed, that region serves every cached read from the home primary; restarted alone from
    its recorded command line, the relay brings the cache back."""
    tenant = new_tenant()
    acc = await api.funded(tenant, "eu-west", 100)

    async def served_by() -> str:
        r = await api.call("GET", "eu-west", f"/v1/accounts/{acc}", tenant=tenant)
        assert r.status == 200, r.body
        assert r.body["balance"] == 100
        return str(r.headers["X-Served-By"])

    await _wait_cached(api, tenant, "eu-west", acc, 100)
    kill_process(local_cluster.dir, "relays-eu-west")
    try:
        # The last heartbeat is at most as new as the kill, and the router's view of it only
        # over-states the lag: past the bound, no read may be served from the cache.
        await asyncio.sleep(CACHED_LAG_BOUND_S + RELAY_LAG_REFRESH_S)
        for _ in range(3):
            assert await served_by() == "eu-west/primary", "past the lag bound, reads go home"
        status = await api.call(
            "GET", "eu-west", "/v1/admin/status", token=local_cluster.admin_token()
        )
        assert status.status == 200, status.body
        # The relay process of eu-west decodes the shard whose primary is in eu-west (the change
        # feed of every other shard runs in its own primary's region and keeps going).
        lag = status.body["invalidation_lag"]["eu-west-1"]
        assert lag["seconds"] is None or lag["seconds"] > CACHED_LAG_BOUND_S, lag
    finally:
        respawn(local_cluster.dir, "relays-eu-west")
    await _wait_cached(api, tenant, "eu-west", acc, 100)
