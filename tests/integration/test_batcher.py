"""The per-shard batcher against a real primary with a synchronous standby."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import msgspec
import pytest

from regionstore.errors import StoreOutcomeUnknown
from regionstore.store import ShardStore, TransferCode, TransferItem, TransferResult
from router.batcher import BatcherFull, DeadlinePassedUnsent, ShardBatcher, TenantQueueFull
from router.limits import (
    BATCH_CALL_EWMA_WEIGHT,
    BATCH_QUEUE_DELAY_MIN_S,
    BATCH_QUEUE_DELAY_ROUNDS,
)
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
    # The first caller's deadline passes once its batch left the queue: its outcome is unknown
    # to it, never "failed". The batch reaches the store only after that deadline, so the
    # item is left out of the call: nobody waits for it any more.
    with pytest.raises(StoreOutcomeUnknown):
        await first
    gate.set()
    assert all(r.code is TransferCode.OK for r in await asyncio.gather(*queued))
    await batcher.close()
    row = await store.get_account(dst, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 3, "the expired transfer was not sent"


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


class _Recording:
    """The real store, with each post_transfers call's items and timeout recorded."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.calls: list[tuple[list[TransferItem], float]] = []

    async def post_transfers(
        self, epoch: int, items: Sequence[TransferItem], *, timeout_s: float, relay_grace_s: float
    ) -> list[TransferResult]:
        self.calls.append((list(items), timeout_s))
        return await self.store.post_transfers(
            epoch, items, timeout_s=timeout_s, relay_grace_s=relay_grace_s
        )


def _gated(store: ShardStore, gate: asyncio.Event, rec: _Recording | None = None) -> object:
    async def get_store() -> object:
        await gate.wait()
        return rec if rec is not None else store

    return get_store


async def test_an_item_whose_deadline_passes_while_queued_is_never_sent(store: ShardStore) -> None:
    """Still queued at its deadline: dropped, never sent, and never outcome_unknown."""
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)
    gate = asyncio.Event()
    rec = _Recording(store)
    batcher = ShardBatcher(_gated(store, gate, rec), SHARD_EPOCH, inflight_max=1)  # type: ignore[arg-type]
    first = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S))
    await asyncio.sleep(0)
    late = item(tenant, funding, dst, 100)
    with pytest.raises(DeadlinePassedUnsent):
        await batcher.submit(late, timeout_s=0.1)
    assert batcher.queued == 0
    gate.set()
    assert (await first).code is TransferCode.OK
    await batcher.close()
    sent = [it.transfer_id for items, _ in rec.calls for it in items]
    assert late.transfer_id not in sent
    row = await store.get_account(dst, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 1, "the expired item was not applied"


async def test_the_batch_call_runs_within_the_latest_deadline_of_its_items(
    store: ShardStore,
) -> None:
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)
    gate = asyncio.Event()
    rec = _Recording(store)
    batcher = ShardBatcher(_gated(store, gate, rec), SHARD_EPOCH, inflight_max=1)  # type: ignore[arg-type]
    first = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S))
    await asyncio.sleep(0)
    a = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=2.0))
    b = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=4.0))
    await asyncio.sleep(0.5)
    gate.set()
    assert [r.code for r in await asyncio.gather(first, a, b)] == [TransferCode.OK] * 3
    await batcher.close()
    assert [len(items) for items, _ in rec.calls] == [1, 2]
    timeout_s = rec.calls[1][1]
    # b's remaining time when the batch left (4.0 - 0.5 s queued), not a's, nor b's full 4 s.
    assert 2.5 < timeout_s <= 3.5, timeout_s


async def test_one_tenant_cannot_fill_the_queue_and_batches_take_tenants_in_turn(
    store: ShardStore,
) -> None:
    noisy, quiet = new_tenant(), new_tenant()
    n_funding = await new_account(store, noisy, overdraft_limit=FUNDING_OVERDRAFT)
    n_dst = await new_account(store, noisy)
    q_funding = await new_account(store, quiet, overdraft_limit=FUNDING_OVERDRAFT)
    q_dst = await new_account(store, quiet)
    gate = asyncio.Event()
    rec = _Recording(store)
    batcher = ShardBatcher(
        _gated(store, gate, rec),  # type: ignore[arg-type]
        SHARD_EPOCH,
        inflight_max=1,
        size_max=2,
        queue_max=10,
        tenant_queue_max=3,
    )
    first = asyncio.create_task(
        batcher.submit(item(noisy, n_funding, n_dst, 1), timeout_s=TIMEOUT_S)
    )
    await asyncio.sleep(0)
    noisy_items = [item(noisy, n_funding, n_dst, 1) for _ in range(3)]
    queued = [batcher.enqueue(it, timeout_s=TIMEOUT_S) for it in noisy_items]
    with pytest.raises(TenantQueueFull):
        batcher.enqueue(item(noisy, n_funding, n_dst, 1), timeout_s=TIMEOUT_S)
    assert batcher.tenant_queued(noisy) == 3
    # The other tenant still gets in, and into the very next batch.
    quiet_item = item(quiet, q_funding, q_dst, 7)
    queued.append(batcher.enqueue(quiet_item, timeout_s=TIMEOUT_S))
    gate.set()
    results = await asyncio.gather(first, *queued)
    assert all(r.code is TransferCode.OK for r in results)
    await batcher.close()
    second_batch = {it.tenant for it in rec.calls[1][0]}
    assert second_batch == {noisy, quiet}, "round-robin: one item of each tenant"
    row = await store.get_account(q_dst, quiet, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 7


async def test_a_standing_queue_sheds_new_items_until_it_drains(store: ShardStore) -> None:
    tenant, other = new_tenant(), new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)
    gate = asyncio.Event()
    batcher = ShardBatcher(
        _gated(store, gate),  # type: ignore[arg-type]
        SHARD_EPOCH,
        inflight_max=1,
        queue_delay_max_s=0.2,
    )
    first = asyncio.create_task(batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S))
    await asyncio.sleep(0)
    waiting = batcher.enqueue(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S)
    # A burst that is younger than the bound is admitted.
    also = batcher.enqueue(item(other, funding, dst, 1), timeout_s=TIMEOUT_S)
    await asyncio.sleep(0.3)
    assert batcher.oldest_wait_s() > 0.2
    for t in (tenant, other):
        with pytest.raises(BatcherFull):
            batcher.enqueue(item(t, funding, dst, 1), timeout_s=TIMEOUT_S)
    gate.set()
    assert (await first).code is TransferCode.OK
    assert (await waiting).code is TransferCode.OK
    # `other` has no account here: its item is answered (not_found), not lost.
    assert (await also).code is TransferCode.NOT_FOUND
    assert batcher.queued == 0
    assert (await batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S)).code is (
        TransferCode.OK
    )
    await batcher.close()
    row = await store.get_account(dst, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    assert row.balance == 3


async def test_the_shedding_target_follows_the_batch_call_time(store: ShardStore) -> None:
    """The queue-delay target is BATCH_QUEUE_DELAY_ROUNDS batch calls of this shard (moving
    average), within its floor and ceiling: nothing measured, the floor; a shard whose calls
    take 100 ms queues about four of them before it sheds; never past the ceiling."""
    call_s, calls = 0.1, 10
    tenant = new_tenant()
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, tenant)

    async def slow_store() -> ShardStore:
        await asyncio.sleep(call_s)  # inside the timed call: a slow shard
        return store

    for ceiling in (2.0, 0.2):
        batcher = ShardBatcher(
            slow_store,
            SHARD_EPOCH,
            inflight_max=1,
            queue_delay_min_s=0.05,
            queue_delay_max_s=ceiling,
        )
        assert batcher.queue_delay_target_s() == 0.05
        for _ in range(calls):
            res = await batcher.submit(item(tenant, funding, dst, 1), timeout_s=TIMEOUT_S)
            assert res.code is TransferCode.OK
        average_min = call_s * (1 - (1 - BATCH_CALL_EWMA_WEIGHT) ** calls)
        target = batcher.queue_delay_target_s()
        assert min(ceiling, BATCH_QUEUE_DELAY_ROUNDS * average_min) <= target <= ceiling
        await batcher.close()
    # The floor holds however fast the calls are.
    assert ShardBatcher(slow_store, SHARD_EPOCH).queue_delay_target_s() == BATCH_QUEUE_DELAY_MIN_S


async def test_the_target_sheds_the_backlogged_tenant_and_the_ceiling_everyone(
    store: ShardStore,
) -> None:
    """Past the target, a tenant with items queued is shed and one with none still gets in (its
    item joins the next batch, round-robin); past the ceiling the shard sheds everyone."""
    noisy, quiet, late = new_tenant(), new_tenant(), new_tenant()
    funding = await new_account(store, noisy, overdraft_limit=FUNDING_OVERDRAFT)
    dst = await new_account(store, noisy)
    gate = asyncio.Event()
    batcher = ShardBatcher(
        _gated(store, gate),  # type: ignore[arg-type]
        SHARD_EPOCH,
        inflight_max=1,
        queue_delay_min_s=0.1,
        queue_delay_max_s=0.6,
    )
    first = asyncio.create_task(batcher.submit(item(noisy, funding, dst, 1), timeout_s=TIMEOUT_S))
    await asyncio.sleep(0)
    queued = [batcher.enqueue(item(noisy, funding, dst, 1), timeout_s=TIMEOUT_S)]
    await asyncio.sleep(0.2)
    with pytest.raises(BatcherFull):
        batcher.enqueue(item(noisy, funding, dst, 1), timeout_s=TIMEOUT_S)
    queued.append(batcher.enqueue(item(quiet, funding, dst, 1), timeout_s=TIMEOUT_S))
    await asyncio.sleep(0.5)
    with pytest.raises(BatcherFull):
        batcher.enqueue(item(late, funding, dst, 1), timeout_s=TIMEOUT_S)
    gate.set()
    assert (await first).code is TransferCode.OK
    # `quiet` has no account here: its item is answered (not_found), not lost.
    assert [(await f).code for f in queued] == [TransferCode.OK, TransferCode.NOT_FOUND]
    await batcher.close()
