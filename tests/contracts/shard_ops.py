"""The contract of ``consistency.failover_plan.ShardOps`` that the failover procedures rely on,
checked without changing who is primary: the record and its revision, compare-and-swap on the
revision, nodes by region, and unreachable or non-standby nodes reported as values (None).

Run against the recording fake of tests/unit/test_failover_plan.py and against
``infra.failover.LocalShardOps`` on a real cluster (tests/integration/test_shard_ops_contract.py).
"""

from __future__ import annotations

import pytest

from consistency.errors import CasConflict
from consistency.failover_plan import ShardOps
from consistency.topology import Node


def check_shard_ops(ops: ShardOps, shard: str, unreachable: Node) -> None:
    """``unreachable``: a node of ``shard``'s deployment shape that nothing answers for."""
    record, revision = ops.load(shard)
    assert record.shard.name == shard
    assert revision > 0

    # A stale revision is refused and writes nothing.
    with pytest.raises(CasConflict):
        ops.cas(shard, revision - 1, record)
    assert ops.load(shard) == (record, revision)

    # The current revision writes, and the answer is the key's new revision.
    new_revision = ops.cas(shard, revision, record)
    assert new_revision > revision
    assert ops.load(shard) == (record, new_revision)
    # The revision the write was based on is stale now.
    with pytest.raises(CasConflict):
        ops.cas(shard, revision, record)

    primary = record.shard.primary
    assert ops.node_in(shard, primary.region) == primary
    # A primary is not a standby; a standby answers with its positions.
    assert ops.standby_lsn(primary) is None
    for standby in record.shard.standbys:
        assert ops.node_in(shard, standby.region) == standby
        lsn = ops.standby_lsn(standby)
        assert lsn is not None
        assert lsn.receive > 0
        assert lsn.replay > 0

    # What does not answer is a value, never an exception, and fencing it changes nothing.
    assert ops.standby_lsn(unreachable) is None
    assert ops.fence_old(unreachable) is None
    assert ops.load(shard) == (record, new_revision)
