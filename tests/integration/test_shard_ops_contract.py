"""The real implementations keep the contracts their fakes keep too, on a real cluster:
``infra.failover.LocalShardOps`` the ShardOps one (tests/contracts/shard_ops.py: etcd's
compare-and-swap, PostgreSQL's recovery state, a node that does not answer), and
``router.resolver.Resolver`` the relays' ShardResolver one (tests/contracts/shard_resolver.py)."""

from __future__ import annotations

from typing import Final

import pytest

from consistency import ids
from consistency.etcd import EtcdClient
from consistency.topology import Node, TopologyWatcher
from infra.failover import LocalShardOps
from infra.local import cluster as lc
from router.config import RouterConfig
from router.limits import TOPOLOGY_INITIAL_TIMEOUT_S
from router.metrics import Metrics
from router.resolver import Resolver, StoreRegistry
from tests.contracts.shard_ops import check_shard_ops
from tests.contracts.shard_resolver import check_shard_resolver
from tests.fixtures import PORT_OFFSET
from tests.fixtures.api import Api, new_tenant
from tests.fixtures.cluster import LocalCluster

pytestmark = pytest.mark.integration


# A port of the suite's band that nothing listens on: a connection is refused at once.
NOBODY_PORT: Final = 7595 + PORT_OFFSET


async def test_resolver_keeps_the_shard_resolver_contract(
    local_cluster: LocalCluster, api: Api
) -> None:
    tenant = new_tenant()
    homes: dict[int, str] = {}
    for region in local_cluster.regions:
        acc = await api.open_account(tenant, region)
        body = await api.account(tenant, region, acc)
        account_id = ids.parse_account_id(acc)
        assert account_id is not None
        homes[account_id] = body["shard"]
    region = local_cluster.regions[0]
    config = RouterConfig.load(local_cluster.dir / "run" / f"router-{region}.json")
    etcd = EtcdClient(config.etcd_endpoints)
    watcher = TopologyWatcher(etcd)
    await watcher.start(initial_timeout_s=TOPOLOGY_INITIAL_TIMEOUT_S)
    stores = StoreRegistry(config, config.db_password_file.read_text().strip())
    try:
        await check_shard_resolver(Resolver(watcher, stores, Metrics(region), region), homes)
    finally:
        await stores.close()
        await watcher.stop()
        await etcd.close()


def test_local_shard_ops_keep_the_contract(local_cluster: LocalCluster) -> None:
    ops = LocalShardOps(local_cluster.dir)
    for shard in sorted(local_cluster.primary_admin_dsn):
        record, _ = ops.load(shard)
        ghost = Node(f"{shard}@nowhere", record.shard.primary.region, lc.HOST, NOBODY_PORT)
        check_shard_ops(ops, shard, ghost)
