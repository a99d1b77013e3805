"""The contract of ``router.events.publisher.Publisher`` that ``EventSink`` relies on: a call
stores its events and counts a republished id as a duplicate; an event the log refuses (over
the stream's message bound) raises ``PublishError`` whose ``stored`` is the stored prefix, the
events of its wave that it does not precede are stored, and no later event of its accounts was
sent; positions are saved and read back per shard (None before the first save); the publisher
answers again after ``close``.

What was stored is read through the contract itself: a republish of a stored event is counted
as a duplicate, of one never stored not.

Run against ``tests.fixtures.fakes.MemoryPublisher`` and against
``router.events.jetstream.JetStreamPublisher`` on the test cluster's NATS JetStream (a tenant
and position keys of the test's own).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from router.events import stream
from router.events.jetstream import JetStreamPublisher
from router.events.publisher import (
    Position,
    Published,
    Publisher,
    PublishError,
)
from tests.fixtures.api import new_tenant
from tests.fixtures.cluster import LocalCluster
from tests.fixtures.events import account, account_created, transfer_settled
from tests.fixtures.fakes import MemoryPublisher


@pytest.fixture
async def pub(contract_cluster: LocalCluster | None) -> AsyncIterator[Publisher]:
    cluster = contract_cluster
    if cluster is None:
        yield MemoryPublisher()
        return
    url = cluster.refresh_status()["regions"][cluster.regions[0]]["nats"]
    real = JetStreamPublisher([url], name="test-publisher-contract")
    try:
        yield real
    finally:
        await real.close()


async def test_publisher_keeps_the_contract(pub: Publisher) -> None:
    tenant = new_tenant()
    a, b, c, d = (account(n) for n in (21, 22, 23, 24))
    assert await pub.healthy()
    assert await pub.publish([]) == Published(0, 0)

    fresh = [
        account_created(tenant, a, 1),
        account_created(tenant, b, 1),
        transfer_settled(tenant, a, b, 2),
    ]
    assert await pub.publish(fresh) == Published(3, 0)
    assert await pub.publish(fresh) == Published(3, 3)

    # Commit order; the transfer c -> d is over the stream's bound. Its wave is the second
    # (c and d were opened in the first, in one transaction with a -> b), with a -> b's second
    # transfer, which does not follow it; d -> c follows it on its accounts, so it is never sent.
    big = stream.STREAM_MAX_MSG_BYTES + 1
    events = [
        account_created(tenant, c, 3),
        account_created(tenant, d, 3),
        transfer_settled(tenant, a, b, 3),
        transfer_settled(tenant, c, d, 4, reference="x" * big),
        transfer_settled(tenant, a, b, 5),
        transfer_settled(tenant, d, c, 6),
    ]
    with pytest.raises(PublishError) as failed:
        await pub.publish(events)
    assert failed.value.stored == 3
    assert await pub.publish(events[:3]) == Published(3, 3)
    assert await pub.publish(events[4:5]) == Published(1, 1)
    assert await pub.publish(events[5:]) == Published(1, 0)

    # Positions, per shard; a shard name of the test's own (the cluster's decoders keep theirs).
    shard = "contract-" + uuid.uuid4().hex[:8]
    assert await pub.load_position(shard) is None
    first = Position("slot-1", 1, None)
    await pub.save_position(shard, first)
    assert await pub.load_position(shard) == first
    second = Position("slot-2", 2, 1_700_000_000_000_000)
    await pub.save_position(shard, second)
    assert await pub.load_position(shard) == second
    assert await pub.load_position(shard + "-other") is None

    # Usable again after close (the decoder closes a failed publisher and resumes it).
    await pub.close()
    assert await pub.healthy()
    assert await pub.publish(fresh[:1]) == Published(1, 1)
    assert await pub.load_position(shard) == second
