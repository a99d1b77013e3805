"""The local cluster's layout: its shards and nodes, and the topology it bootstraps into etcd.

What this module owns: the names (shard ``{region}-1``, node ``{shard}@{region}``), where each
shard's servers run (shard i's primary in region i, its standby in region i-1, so region i
hosts the standby of shard i+1), the initial topology written to etcd, reading the live one
back (bounded, for ``status``), and the bridge that runs an etcd coroutine from synchronous
code (``run_async``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final, TypeVar

from consistency.etcd import EtcdClient
from consistency.topology import (
    Node,
    Region,
    Shard,
    SlotMap,
    Topology,
    bootstrap_topology,
    load_topology,
)
from infra.local.ports import PortPlan
from infra.local.state import HOST, STATE_FILE, ClusterError

log = logging.getLogger("txr.local")

# `status` reads the live epochs from etcd, but must answer quickly when etcd is down.
STATUS_ETCD_TIMEOUT_S: Final = 2.0

T = TypeVar("T")


def shard_name(region: str) -> str:
    return f"{region}-1"


def node_name(shard: str, region: str) -> str:
    return f"{shard}@{region}"


def standby_region(regions: Sequence[str], shard_region: str) -> str:
    """The region of the standby of the shard whose home is ``shard_region``."""
    i = regions.index(shard_region)
    return regions[(i - 1) % len(regions)]


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private loop in a worker thread.

    The launcher is synchronous and may be called from inside a running event loop (the pytest
    fixture); a thread keeps its loop entirely separate from the caller's.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised
            error.append(exc)

    th = threading.Thread(target=target, name="txr-local-async")
    th.start()
    th.join()
    if error:
        raise error[0]
    return result[0]


def topology(plan: PortPlan, regions: Sequence[str]) -> Topology:
    """The cluster's topology as it starts (epoch 1 everywhere, slots spread evenly)."""
    shards: dict[str, Shard] = {}
    for r in regions:
        shard = shard_name(r)
        sr = standby_region(regions, r)
        shards[shard] = Shard(
            name=shard,
            home_region=r,
            primary=Node(node_name(shard, r), r, HOST, plan.region[r].pg_primary),
            standbys=(Node(node_name(shard, sr), sr, HOST, plan.region[sr].pg_standby),),
            epoch=1,
        )
    by_region = {r: Region(r, f"http://{HOST}:{plan.region[r].router}") for r in regions}
    return Topology(0, by_region, shards, SlotMap.even(list(shards)))


def bootstrap(plan: PortPlan, regions: Sequence[str]) -> None:
    """Write the initial topology into a new cluster's etcd."""
    endpoints = [f"http://{HOST}:{plan.region[r].etcd_client}" for r in regions]
    topo = topology(plan, regions)

    async def run() -> bool:
        async with EtcdClient(endpoints) as client:
            return await bootstrap_topology(client, topo)

    if not run_async(run):
        raise ClusterError("etcd already holds a topology; the cluster directory is stale")


def live_topology(endpoints: Sequence[str]) -> Topology | None:
    """The topology etcd holds now; None when etcd does not answer within its bound."""

    async def run() -> Topology:
        async with EtcdClient(endpoints, timeout_s=STATUS_ETCD_TIMEOUT_S) as client:
            return await load_topology(client)

    try:
        return run_async(run)
    except Exception as exc:  # noqa: BLE001 - any failure means "fall back to the state file"
        log.info("etcd not readable for status (%s); using %s", exc, STATE_FILE)
        return None
