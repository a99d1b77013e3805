"""The contract of ``consistency.autofailover.ControllerIO`` that ``Controller.round`` relies on,
checked without changing who is primary: every shard's record as a view, probes that report
what a server *is* (a primary answers out of recovery even when a standby was wanted), a
verdict seen by its own region at once and by another region within a bound, the mode and the
anti-flap record read from the snapshot ``verdicts`` took, and an action whose decision is
stale (another primary or epoch) that does nothing and says ``changed``.

Run against ``tests.fixtures.fakes.FakeControllerIO`` (the I/O of tests/unit/test_autofailover.py)
and against ``infra.controller.LocalControllerIO`` on the test cluster (its own controllers keep
running: what this publishes is the truth, a healthy verdict, and its lease goes with it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Final

import pytest

from consistency import autofailover as af
from infra.controller import LocalControllerIO
from tests.fixtures.cluster import LocalCluster
from tests.fixtures.fakes import ControllerWorld, FakeControllerIO

# Another region's verdict reaches this one's (a watch on the real cluster) within this.
VERDICT_SEEN_WAIT_S: Final = 10.0
POLL_S: Final = 0.05


@dataclasses.dataclass
class Pair:
    """Two regions' I/O over one world (one cluster)."""

    io: af.ControllerIO
    other: af.ControllerIO


@pytest.fixture
async def pair(contract_cluster: LocalCluster | None) -> AsyncIterator[Pair]:
    cluster = contract_cluster
    if cluster is None:
        world = ControllerWorld()
        yield Pair(FakeControllerIO(world, "a"), FakeControllerIO(world, "b"))
        return
    regions = cluster.regions
    ios = [LocalControllerIO(cluster.dir, regions[0]), LocalControllerIO(cluster.dir, regions[1])]
    try:
        yield Pair(ios[0], ios[1])
    finally:
        for io in ios:
            await io.close()


def _healthy(view: af.ShardView) -> af.ShardVerdict:
    return af.ShardVerdict(view.primary, view.epoch, None, False, view.standby, None)


async def _seen(io: af.ControllerIO, region: str, seq: int) -> bool:
    deadline = time.monotonic() + VERDICT_SEEN_WAIT_S
    while time.monotonic() < deadline:
        if any(v.region == region and v.seq == seq for v in await io.verdicts()):
            return True
        await asyncio.sleep(POLL_S)
    return False


async def test_controller_io_keeps_the_contract(pair: Pair) -> None:
    io, other = pair.io, pair.other
    assert io.region != other.region
    shards = await io.shards()
    assert shards
    assert await other.shards() == shards
    for name, view in shards.items():
        assert view.name == name
        assert view.epoch >= 1
        assert view.primary_region in view.primary
        if view.standby is not None:
            assert view.standby_region is not None
            assert view.standby_region != view.primary_region

        # A probe says what the server is, not what the caller wanted it to be.
        for want_primary in (True, False):
            p = await io.probe(view.primary, want_primary=want_primary)
            assert p.ok, p
            assert not p.in_recovery, p
            if view.standby is not None:
                s = await io.probe(view.standby, want_primary=want_primary)
                assert s.ok, s
                assert s.in_recovery, s

    # A region sees its own verdict at once, another region within a bound, and one verdict
    # per region. (A seq far above any live controller's, so it is ours that is seen.)
    mine = af.Verdict(io.region, 1 << 40, {n: _healthy(v) for n, v in shards.items()})
    await io.publish(mine)
    seen = await io.verdicts()
    assert mine in seen
    regions = [v.region for v in seen]
    assert len(regions) == len(set(regions))
    theirs = dataclasses.replace(mine, region=other.region, seq=(1 << 40) + 1)
    await other.publish(theirs)
    assert await _seen(io, other.region, theirs.seq)
    assert mine in await io.verdicts()

    # Read from the snapshot verdicts() took: nobody switched the controllers off, and a shard
    # nobody knows never failed over.
    mode = await io.mode()
    assert all(mode.on(n) for n in shards)
    assert await io.last_failover_at("no-such-shard") is None
    for name, view in shards.items():
        last = await io.last_failover_at(name)
        assert last is None or last > 0

        await io.record_decision(
            af.Decision(
                name,
                af.Action.NONE,
                af.Reason.HEALTHY,
                f"{view.primary} serves (epoch {view.epoch})",
                view.epoch,
            )
        )

        # A decision about a shard that has changed since (another epoch, another primary)
        # does nothing: it says so, and the shard is what it was.
        failover = af.Decision(
            name,
            af.Action.FAILOVER,
            af.Reason.PRIMARY_LOST,
            "contract",
            view.epoch - 1,
            view.standby_region,
        )
        for stale in (
            dataclasses.replace(view, epoch=view.epoch - 1),
            dataclasses.replace(view, primary=f"{name}@nowhere"),
        ):
            acted = await io.act(failover, stale)
            assert acted.reason is af.Reason.CHANGED, acted
            assert not acted.failed_over
    assert await io.shards() == shards
    assert await other.shards() == shards
