"""``infra.failover.LocalShardOps`` keeps the ShardOps contract (tests/contracts/shard_ops.py)
that the failover procedures' fake keeps too, on a real cluster: etcd's compare-and-swap,
PostgreSQL's recovery state, and a node that does not answer."""

from __future__ import annotations

from typing import Final

import pytest

from consistency.topology import Node
from infra.failover import LocalShardOps
from infra.local import cluster as lc
from tests.contracts.shard_ops import check_shard_ops
from tests.fixtures import PORT_OFFSET
from tests.fixtures.cluster import LocalCluster

pytestmark = pytest.mark.integration


# A port of the suite's band that nothing listens on: a connection is refused at once.
NOBODY_PORT: Final = 7595 + PORT_OFFSET


def test_local_shard_ops_keep_the_contract(local_cluster: LocalCluster) -> None:
    ops = LocalShardOps(local_cluster.dir)
    for shard in sorted(local_cluster.primary_admin_dsn):
        record, _ = ops.load(shard)
        ghost = Node(f"{shard}@nowhere", record.shard.primary.region, lc.HOST, NOBODY_PORT)
        check_shard_ops(ops, shard, ghost)
