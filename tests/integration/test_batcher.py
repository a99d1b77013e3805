"""The per-shard batcher against a real primary with a synchronous standby."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import msgspec
import pytest

from regionstore.errors import StoreOutcomeUnknown
from regionstore.store import ShardStore, TransferCode, TransferItem, TransferResult
from router.batcher import BatcherFull, ShardBatcher
from tests.fixtures.pg import SHARD_EPOCH
from tests.integration.test_store_ledger import FUNDING_OVERDRAFT, item, new_account, new_tenant

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


async def test_concurrent_transfers_share_batches_and_each_gets_its_own_result(
    store: ShardStore,
) -> None:
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    accounts = [await new_account(store, tenant) for _ in range(8)]
    sizes: list[int] = []

    async def get_store() -> ShardStore:
        return store

    batcher = ShardBatcher(get_store, SHARD_EPOCH, observe_batch=sizes.append)
    rng = random.Random(3)
    items = [item(tenant, funding, rng.choice(accounts), rng.randint(1, 9)) for _ in range(300)]
    # A refused item (insufficient funds) and a foreign one ride in the same batches.
    items.append(item(tenant, accounts[0], accounts[1], 10**12))
    items.append(item(new_tenant(), funding, accounts[2], 5))
    results = await asyncio.gather(*(batcher.submit(it, timeout_s=TIMEOUT_S) for it in items))
    assert [r.code for r in results[:300]] == [TransferCode.OK] * 300
    assert results[300].code is TransferCode.INSUFFICIENT_FUNDS
    assert results[301].code is TransferCode.NOT_FOUND
    assert sum(sizes) == len(items)
    assert max(sizes) > 1, f"concurrent transfers were coalesced: {sizes}"
    assert len(sizes) < len(items) / 4
    for it, res in zip(items[:300], results[:300], strict=True):
        assert res.transfer_id == it.transfer_id
    expected = dict.fromkeys(accounts, 0)
    for it in items[:300]:
        expected[it.destination] += it.amount
    for acc, amount in expected.items():
        row = await store.get_account(acc, tenant, timeout_s=TIMEOUT_S)
        assert row is not None
        assert row.balance == amount


async def test_an_item_that_aborts_its_batch_does_not_fail_its_neighbours(
    store: ShardStore,
) -> None:
    """An amount of zero makes the procedure raise (a router bug, never a business outcome):
    the batch is retried item by item and only the bad item fails."""
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)

    async def get_store() -> ShardStore:
        return store

    batcher = ShardBatcher(get_store, SHARD_EPOCH, inflight_max=1)
    good = [item(tenant, funding, dst, 3) for _ in range(20)]
    bad = msgspec.structs.replace(item(tenant, funding, dst, 1), amount=0)
    outcomes = await asyncio.gather(
        *(batcher.submit(it, timeout_s=TIMEOUT_S) for it in [*good[:10], bad, *good[10:]]),
        return_exceptions=True,
    )
    assert isinstance(outcomes[10], Exception)
    ok = [o for i, o in enumerate(outcomes) if i != 10]
    assert all(not isinstance(o, BaseException) and o.code is TransferCode.OK for o in ok)
    row = await store.get_account(dst, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 60


async def test_bounded_queue_and_deadline(store: ShardStore) -> None:
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)
    gate = asyncio.Event()

    async def slow_store() -> ShardStore:
        await gate.wait()
        return store

    batcher = ShardBatcher(slow_store, SHARD_EPOCH, inflight_max=1, queue_max=3)
    first = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=0.2))
    await asyncio.sleep(0)
    queued = [
        asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S))
        for _ in range(3)
    ]
    await asyncio.sleep(0)
    with pytest.raises(BatcherFull):
        await batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S)
    # The first caller's deadline passes while its batch waits: its outcome is unknown (the
    # batch may still commit it), never "failed".
    with pytest.raises(StoreOutcomeUnknown):
        await first
    gate.set()
    assert all(r.code is TransferCode.OK for r in await asyncio.gather(*queued))
    await batcher.close()
    row = await store.get_account(dst, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 4, "the timed-out transfer was still applied, once"


async def test_after_commit_runs_once_per_batch_before_its_answers(store: ShardStore) -> None:
    """The router's cache write: one call per committed batch, before any item is answered;
    a failing hook never withholds the answers of a committed batch."""
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    accounts = [await new_account(store, tenant) for _ in range(4)]
    sizes: list[int] = []
    hooked: list[int] = []
    answered: set[object] = set()

    async def get_store() -> ShardStore:
        return store

    early: list[object] = []

    async def after_commit(
        items: Sequence[TransferItem], results: Sequence[TransferResult]
    ) -> None:
        # Recorded, not asserted: the batcher logs and swallows what a hook raises.
        early.extend(answered & {it.transfer_id for it in items})
        hooked.append(len(results))
        if len(hooked) == 1:
            raise RuntimeError("a broken hook")

    batcher = ShardBatcher(
        get_store, SHARD_EPOCH, observe_batch=sizes.append, after_commit=after_commit
    )

    async def submit(it: TransferItem) -> TransferResult:
        res = await batcher.submit(it, timeout_s=TIMEOUT_S)
        answered.add(it.transfer_id)
        return res

    items = [item(tenant, funding, accounts[i % 4], 1) for i in range(100)]
    results = await asyncio.gather(*(submit(it) for it in items))
    assert all(r.code is TransferCode.OK for r in results)
    # Two batches may be in flight at once and finish in either order: compare as multisets.
    assert sorted(hooked) == sorted(sizes), "one hook call per batch, with all of its items"
    assert early == [], "items answered before their batch's hook ran"
