"""The read lease on the real cluster: a router cut off from etcd's majority stops serving
strong reads from its shard's primary within ``TOPOLOGY_CONFIRM_S`` (503, never a possibly
deposed primary's answer) and serves again once the cut heals.

Every WAN link of ap-south is cut through the emulator's control API (the chaos ``partition``
scenario's fault). Automatic failover is switched off meanwhile, so the shard does not actually
move: the point is that the router cannot know that it did not.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import pytest

from consistency import topology
from consistency.etcd import EtcdClient
from consistency.limits import TOPOLOGY_CONFIRM_S
from infra import failover
from infra.wan import WanControl
from router.config import RouterConfig
from tests.fixtures.api import Api, new_tenant
from tests.fixtures.cluster import LocalCluster

pytestmark = pytest.mark.integration

CUT: Final = "ap-south"
OTHERS: Final = ("us-east", "eu-west")
# A read that checked its lease just before it lapsed still travels to the store and back, on
# a loaded two-core machine; past this every read is a 503.
SCHEDULING_SLACK_S: Final = 0.5
# How long the cut lasts after the lease must have lapsed (every read in it must be a 503).
HELD_S: Final = 2.0
# Bounded wait for the region to serve again after the heal (etcd reconnects, a new round).
HEAL_WAIT_S: Final = 20.0

# The idle bound, shortened so that the test sees the loop go idle and the lease lapse.
IDLE_S: Final = 0.5
SLOW_ROUND_S: Final = 0.8 * TOPOLOGY_CONFIRM_S


async def _strong(
    api: Api, tenant: str, region: str, acc: str
) -> tuple[int, dict[str, str], object]:
    r = await api.call("GET", region, f"/v1/accounts/{acc}?consistency=strong", tenant=tenant)
    return r.status, dict(r.headers), r.body


async def _cut(local_cluster: LocalCluster, on: bool) -> None:
    async with WanControl(local_cluster.wan_control) as wan:
        for other in OTHERS:
            await (wan.cut if on else wan.heal)(CUT, other)


async def test_a_router_cut_off_from_etcd_stops_reading_its_primary(
    api: Api, local_cluster: LocalCluster
) -> None:
    tenant = new_tenant()
    acc = await api.funded(tenant, CUT, 500)
    peer = await api.funded(tenant, "eu-west", 700)
    status, headers, body = await _strong(api, tenant, CUT, acc)
    assert status == 200, body
    assert headers["X-Served-By"] == f"{CUT}/primary"

    await asyncio.to_thread(failover.set_autofailover, local_cluster.dir, False, None)
    try:
        t_cut = time.monotonic()
        await _cut(local_cluster, True)
        try:
            first_503: float | None = None
            served_after_bound: list[tuple[float, int]] = []
            while (
                now := time.monotonic()
            ) < t_cut + TOPOLOGY_CONFIRM_S + SCHEDULING_SLACK_S + HELD_S:
                status, headers, body = await _strong(api, tenant, CUT, acc)
                if status == 503:
                    assert isinstance(body, dict), body
                    assert body["code"] == "region_unavailable", body
                    assert int(headers["Retry-After"]) >= 1
                    if first_503 is None:
                        first_503 = now - t_cut
                else:
                    assert status == 200, body
                    if now > t_cut + TOPOLOGY_CONFIRM_S + SCHEDULING_SLACK_S:
                        served_after_bound.append((now - t_cut, status))
                await asyncio.sleep(0.05)
            assert first_503 is not None, "the cut-off router kept serving strong reads"
            assert first_503 <= TOPOLOGY_CONFIRM_S + SCHEDULING_SLACK_S
            assert served_after_bound == [], served_after_bound
            # The majority side is untouched: its routers confirm through the other members.
            status, _, body = await _strong(api, tenant, "eu-west", peer)
            assert status == 200, body
        finally:
            await _cut(local_cluster, False)
        t_heal = time.monotonic()
        while True:
            status, headers, body = await _strong(api, tenant, CUT, acc)
            if status == 200:
                assert isinstance(body, dict)
                assert body["balance"] == 500
                break
            assert status == 503, body
            assert time.monotonic() - t_heal < HEAL_WAIT_S, "never served again after the heal"
            await asyncio.sleep(0.1)
        await _wait_registry_back(api, tenant, t_heal)
    finally:
        await asyncio.to_thread(failover.set_autofailover, local_cluster.dir, True, None)


async def _wait_registry_back(api: Api, tenant: str, t_heal: float) -> None:
    """Until every region's webhook registry (NATS JetStream, clustered across the regions)
    answers again: the cut also split NATS, and the tests after this one (the session's
    cluster is shared) found it still re-forming, 503 "registry not reachable"."""
    for region in (CUT, *OTHERS):
        while (await api.call("GET", region, "/v1/webhooks", tenant=tenant)).status != 200:
            assert time.monotonic() - t_heal < HEAL_WAIT_S * 3, f"{region}: NATS never back"
            await asyncio.sleep(0.2)


async def test_reads_after_an_idle_spell_all_wait_for_the_round_one_of_them_started(
    local_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle router sends no confirmation rounds; the first read wakes the loop and waits
    for its round. Reads that come while that round runs (a batch request's items, checked at
    once) must wait for it too, not answer 503 because the lease is lapsed."""
    monkeypatch.setattr(topology, "TOPOLOGY_CONFIRM_IDLE_S", IDLE_S)
    # What is tested is who waits for which round, not how fast etcd answers: on a loaded
    # machine a quorum read took about the round's bound (0.5 s), so give it most of the lease.
    monkeypatch.setattr(topology, "TOPOLOGY_CONFIRM_TIMEOUT_S", SLOW_ROUND_S)
    monkeypatch.setattr(topology, "TOPOLOGY_WAKE_WAIT_S", SLOW_ROUND_S + TOPOLOGY_CONFIRM_S / 4)
    config = RouterConfig.load(
        local_cluster.dir / "run" / f"router-{local_cluster.regions[0]}.json"
    )
    etcd = EtcdClient(config.etcd_endpoints)
    watcher = topology.TopologyWatcher(etcd)
    await watcher.start(initial_timeout_s=10.0, confirm=True)
    try:
        shard = next(iter(watcher.current.shards.values()))
        # Idle past the lease: the loop stopped confirming and the lease lapsed.
        await asyncio.sleep(IDLE_S + TOPOLOGY_CONFIRM_S + 0.5)
        assert not watcher.confirmations.confirmed(shard.name, shard.epoch)
        got = await asyncio.gather(*(watcher.ensure_confirmed(shard) for _ in range(5)))
        assert got == [True] * 5
    finally:
        await watcher.stop()
        await etcd.close()
