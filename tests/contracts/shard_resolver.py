"""The contract of ``router.relays.outbox.ShardResolver``, the relays' view of the topology:
an account's home and fencing tokens, the store of a shard's current primary (which holds the
account), a refresh that changes nothing on a quiet topology, and an unknown shard as a
LookupError (the relay's "retry later").

Run against ``tests.fixtures.pg.StaticResolver`` (the fake of the saga store tests,
tests/integration/test_saga_store.py) and against ``router.resolver.Resolver`` on a real
cluster (tests/integration/test_shard_ops_contract.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import pytest

from router.relays.outbox import ShardResolver

READ_TIMEOUT_S: Final = 10.0


async def check_shard_resolver(resolver: ShardResolver, homes: Mapping[int, str]) -> None:
    """``homes``: existing accounts and the shard each lives on."""
    assert homes
    for account_id, shard in homes.items():
        name, shard_epoch, slot_epoch = resolver.route_account(account_id)
        assert name == shard
        assert shard_epoch == resolver.shard_epoch(shard)
        assert shard_epoch >= 1
        assert slot_epoch >= 1
        store = await resolver.store_for_shard(shard)
        row = await store.get_customer_account(account_id, timeout_s=READ_TIMEOUT_S)
        assert row is not None
        assert row.id == account_id

    before = {a: resolver.route_account(a) for a in homes}
    await resolver.refresh()
    assert {a: resolver.route_account(a) for a in homes} == before

    with pytest.raises(LookupError):
        resolver.shard_epoch("no-such-shard")
    with pytest.raises(LookupError):
        await resolver.store_for_shard("no-such-shard")
