"""Cross-shard transfers (saga over a transactional outbox) against real PostgreSQL.

Shard A is database ``txr``, shard B database ``txr_b`` on the same primary/standby pair
(tests/fixtures/pg.py). Leg 1 goes through ``post_transfers`` on the source shard, the relay
(router.relays.outbox) delivers leg 2 and the settle mark, and ``consistency.reconcile`` checks
G4 across both shards at every quiescent step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

import psycopg
import pytest
import pytest_asyncio

from consistency import ids
from consistency.ids import new_account_id, new_transfer_id
from consistency.reconcile import reconcile
from regionstore import admin
from regionstore.store import (
    CreateAccountCode,
    InboundCode,
    InboundResult,
    OutboxMessage,
    SettleCode,
    ShardStore,
    TransferCode,
    TransferItem,
    TransferResult,
)
from router.relays.outbox import OutboxRelay
from tests.contracts.shard_resolver import check_shard_resolver
from tests.fixtures.pg import (
    SHARD_A,
    SHARD_B,
    SHARD_B_SLOT_MIN,
    SHARD_EPOCH,
    SLOT_EPOCH,
    STORE_OPEN_TIMEOUT_S,
    PgShard,
    StaticResolver,
    shard_of_slot,
)

pytestmark = pytest.mark.integration

TIMEOUT_S: Final = 10.0
FUNDING_OVERDRAFT: Final = 10**15
# Short enough that "a relay died holding the lease" tests wait little.
TEST_LEASE_S: Final = 0.5
# Long enough that a settle well below it can only have come from a NOTIFY.
LONG_POLL_S: Final = 5.0
SHORT_POLL_S: Final = 0.3
# Upper bound for a relay to drain the outbox in these tests (loopback; normally < 1 s).
DRAIN_TIMEOUT_S: Final = 20.0
# store.py names the LISTEN session after the store; we kill it by that name.
LISTEN_APP_NAME_A: Final = f"txr-listen-{SHARD_A}"


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


def slot_on(shard: str, rng: random.Random | None = None) -> int:
    r = rng or random
    return r.randrange(SHARD_B_SLOT_MIN, 4096) if shard == SHARD_B else r.randrange(4000)


@pytest_asyncio.fixture
async def stores(pg_shard: PgShard) -> AsyncIterator[dict[str, ShardStore]]:
    opened = await open_stores(pg_shard)
    try:
        yield opened
    finally:
        for s in opened.values():
            await s.close()


async def open_stores(pg_shard: PgShard) -> dict[str, ShardStore]:
    """Both shards as the relays' role: it runs the saga steps, and (a member of the
    application role) leg 1 and the reads too."""
    out: dict[str, ShardStore] = {}
    for name, relay_dsn in pg_shard.shard_relay_dsns().items():
        s = ShardStore(relay_dsn, name=name, pool_min=1, pool_max=10)
        await s.open(timeout_s=STORE_OPEN_TIMEOUT_S)
        out[name] = s
    return out


async def new_account(
    store: ShardStore,
    tenant: str,
    *,
    currency: str = "EUR",
    overdraft_limit: int = 0,
    rng: random.Random | None = None,
) -> int:
    for _ in range(3):
        account_id = new_account_id(slot_on(store.name, rng))
        code, _row = await store.create_account(
            shard_epoch=SHARD_EPOCH,
            slot_epoch=SLOT_EPOCH,
            account_id=account_id,
            tenant=tenant,
            currency=currency,
            overdraft_limit=overdraft_limit,
            metadata={},
            timeout_s=TIMEOUT_S,
        )
        if code is CreateAccountCode.OK:
            return account_id
    raise AssertionError("three id clashes in a row")


def item(
    tenant: str, src: int, dst: int, amount: int, *, currency: str = "EUR", key: str | None = None
) -> TransferItem:
    dst_shard = shard_of_slot(ids.account_slot(dst))
    cross = dst_shard != shard_of_slot(ids.account_slot(src))
    key = key or uuid.uuid4().hex
    return TransferItem(
        transfer_id=new_transfer_id(),
        tenant=tenant,
        source=src,
        destination=dst,
        amount=amount,
        currency=currency,
        reference=None,
        idempotency_key=key,
        fingerprint=hashlib.sha256(repr((src, dst, amount, currency, key)).encode()).digest(),
        source_slot_epoch=SLOT_EPOCH,
        destination_slot_epoch=SLOT_EPOCH,
        destination_shard=dst_shard if cross else None,
    )


async def post1(store: ShardStore, it: TransferItem) -> TransferResult:
    (res,) = await store.post_transfers(SHARD_EPOCH, [it], timeout_s=TIMEOUT_S)
    return res


async def funded(store: ShardStore, tenant: str, amount: int, **kw: object) -> int:
    """An account on ``store``'s shard holding ``amount`` (from a same-shard funding account)."""
    currency = str(kw.get("currency", "EUR"))
    bank = await new_account(store, tenant, currency=currency, overdraft_limit=FUNDING_OVERDRAFT)
    acc = await new_account(store, tenant, currency=currency)
    res = await post1(store, item(tenant, bank, acc, amount, currency=currency))
    assert res.code is TransferCode.OK
    return acc


async def balance(store: ShardStore, acc: int, tenant: str) -> int:
    row = await store.get_account(acc, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    return row.balance


async def status(store: ShardStore, tid: uuid.UUID, tenant: str) -> tuple[str, str | None]:
    row = await store.get_transfer(tid, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    return row.status, row.refusal_code


async def snapshots(pg_shard: PgShard) -> dict[str, dict[str, object]]:
    return {
        name: await asyncio.to_thread(admin.reconcile_snapshot, admin_dsn)
        for name, (admin_dsn, _app) in pg_shard.shard_dsns().items()
    }


async def assert_clean(pg_shard: PgShard) -> dict[str, dict[str, object]]:
    snaps = await snapshots(pg_shard)
    problems = reconcile(snaps)
    assert problems == [], problems
    return snaps


def message(it: TransferItem, res: TransferResult) -> OutboxMessage:
    """What the router builds right after leg 1 for an inline delivery."""
    assert res.transfer_id is not None
    assert res.created_at is not None
    assert it.destination_shard is not None
    return OutboxMessage(
        transfer_id=res.transfer_id,
        tenant=it.tenant,
        source=it.source,
        destination=it.destination,
        amount=it.amount,
        currency=it.currency,
        destination_shard=it.destination_shard,
        attempts=0,
        created_at=res.created_at,
    )


async def deliver_leg2(
    store: ShardStore, msg: OutboxMessage, *, source_shard: str = SHARD_A, **change: Any
) -> InboundResult:
    """Leg 2 of ``msg`` (with the fields ``change`` names altered) on ``store``, as a relay
    sends it: every field of the message, and its signature."""
    m = dataclasses.replace(msg, **change)
    return await store.apply_inbound(
        SHARD_EPOCH,
        transfer_id=m.transfer_id,
        source_shard=source_shard,
        tenant=m.tenant,
        source=m.source,
        destination=m.destination,
        amount=m.amount,
        currency=m.currency,
        destination_slot_epoch=SLOT_EPOCH,
        created_at=m.created_at,
        key_id=m.key_id,
        mac=m.mac,
        timeout_s=TIMEOUT_S,
    )


def relay(
    stores: dict[str, ShardStore], source: str = SHARD_A, *, poll_interval_s: float = 1.0
) -> OutboxRelay:
    return OutboxRelay(
        source,
        StaticResolver(stores),
        region="test",
        lease_s=TEST_LEASE_S,
        poll_interval_s=poll_interval_s,
    )


async def drain(stores: dict[str, ShardStore]) -> None:
    """Run relays of both shards until neither outbox has pending messages."""
    relays = {name: relay(stores, name) for name in stores}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        for r in relays.values():
            await r.run_once()
        depths = [(await s.outbox_stats(timeout_s=TIMEOUT_S))[0] for s in stores.values()]
        if not any(depths):
            return
        assert time.monotonic() < deadline, f"outboxes not drained: {depths}"
        await asyncio.sleep(0.05)


# -- happy path -----------------------------------------------------------------------------


async def test_static_resolver_keeps_the_resolver_contract(
    stores: dict[str, ShardStore],
) -> None:
    tenant = new_tenant()
    homes = {await new_account(stores[name], tenant): name for name in (SHARD_A, SHARD_B)}
    await check_shard_resolver(StaticResolver(stores), homes)


async def test_leg1_then_relay_settles_once(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant = new_tenant()
    src = await funded(a, tenant, 1000)
    dst = await new_account(b, tenant)
    await drain(stores)  # earlier tests' leftovers must not blur the in-flight numbers
    before = await assert_clean(pg_shard)
    it = item(tenant, src, dst, 250)

    res = await post1(a, it)
    assert res.code is TransferCode.OK
    assert res.status == "pending"
    assert (res.source_balance, res.source_version) == (750, 3)
    assert res.destination_balance is None
    assert res.destination_version is None
    assert await status(a, it.transfer_id, tenant) == ("pending", None)
    # In flight: A's transit toward B went up by exactly the amount; reconcile counts it.
    mid = await assert_clean(pg_shard)
    t_before = before[SHARD_A]["transit"].get(SHARD_B, {}).get("EUR", 0)  # type: ignore[attr-defined]
    assert mid[SHARD_A]["transit"][SHARD_B]["EUR"] == t_before + 250  # type: ignore[index]
    assert await balance(b, dst, tenant) == 0

    r = relay(stores)
    assert await r.run_once() == 1
    assert await status(a, it.transfer_id, tenant) == ("settled", None)
    assert await balance(a, src, tenant) == 750
    assert await balance(b, dst, tenant) == 250
    await assert_clean(pg_shard)
    assert await r.run_once() == 0  # nothing left

    # Re-delivery and a leg-1 retry with the same key change nothing.
    again = await r.deliver(message(it, res))
    assert (again.outcome, again.code) == ("already", "settled")
    replay = await post1(a, it)
    assert replay.code is TransferCode.REPLAYED
    assert replay.status == "settled"
    assert await balance(b, dst, tenant) == 250
    entries = await b.list_entries(dst, tenant, before_seq=None, limit=10, timeout_s=TIMEOUT_S)
    assert entries is not None
    assert [(e.amount, e.counterparty, e.transfer_id) for e in entries] == [
        (250, src, it.transfer_id)
    ]
    await assert_clean(pg_shard)


# -- at least once, applied exactly once -----------------------------------------------------


async def test_duplicate_and_concurrent_delivery_credit_once(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 1000)
    dst = await new_account(stores[SHARD_B], tenant)
    it = item(tenant, src, dst, 100)
    res = await post1(stores[SHARD_A], it)
    msg = message(it, res)
    # Two relays with their own connection pools, delivering the same message at once, twice.
    other = await open_stores(pg_shard)
    try:
        r1, r2 = relay(stores), relay(other)
        got = await asyncio.gather(r1.deliver(msg), r2.deliver(msg), r1.deliver(msg))
        outcomes = sorted(d.outcome for d in got)
        assert outcomes == ["already", "already", "settled"], got
        # And two relays claiming concurrently: SKIP LOCKED gives each message to one.
        its = [item(tenant, src, dst, 10) for _ in range(5)]
        for x in its:
            assert (await post1(stores[SHARD_A], x)).code is TransferCode.OK
        done = await asyncio.gather(r1.run_once(), r2.run_once())
        assert sum(done) == 5
    finally:
        for s in other.values():
            await s.close()
    assert await balance(stores[SHARD_B], dst, tenant) == 150
    entries = await stores[SHARD_B].list_entries(
        dst, tenant, before_seq=None, limit=50, timeout_s=TIMEOUT_S
    )
    assert entries is not None
    assert len(entries) == 6
    await assert_clean(pg_shard)


async def test_relay_killed_after_claim(stores: dict[str, ShardStore], pg_shard: PgShard) -> None:
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 1000)
    dst = await new_account(stores[SHARD_B], tenant)
    await drain(stores)
    it = item(tenant, src, dst, 70)
    await post1(stores[SHARD_A], it)
    # A relay claims the message and dies before leg 2.
    claimed = await stores[SHARD_A].claim_outbox(
        limit=10, lease_s=TEST_LEASE_S, timeout_s=TIMEOUT_S
    )
    assert [m.transfer_id for m in claimed] == [it.transfer_id]
    assert claimed[0].attempts == 1
    await assert_clean(pg_shard)
    fresh = relay(stores)
    assert await fresh.run_once() == 0  # still leased to the dead relay
    await asyncio.sleep(TEST_LEASE_S + 0.1)
    assert await fresh.run_once() == 1
    assert await status(stores[SHARD_A], it.transfer_id, tenant) == ("settled", None)
    assert await balance(stores[SHARD_B], dst, tenant) == 70
    await assert_clean(pg_shard)


async def test_relay_killed_between_leg2_and_settle(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 1000)
    dst = await new_account(stores[SHARD_B], tenant)
    await drain(stores)
    it = item(tenant, src, dst, 90)
    await post1(stores[SHARD_A], it)
    (msg,) = await stores[SHARD_A].claim_outbox(limit=10, lease_s=TEST_LEASE_S, timeout_s=TIMEOUT_S)
    inbound = await deliver_leg2(stores[SHARD_B], msg)
    assert (inbound.code, inbound.replayed, inbound.destination_balance) == (
        InboundCode.APPLIED,
        False,
        90,
    )
    # ... and dies. Leg 2 is applied, the source still says pending: not in flight any more.
    assert await status(stores[SHARD_A], it.transfer_id, tenant) == ("pending", None)
    await assert_clean(pg_shard)
    await asyncio.sleep(TEST_LEASE_S + 0.1)
    fresh = relay(stores)
    assert await fresh.run_once() == 1
    assert await status(stores[SHARD_A], it.transfer_id, tenant) == ("settled", None)
    assert await balance(stores[SHARD_B], dst, tenant) == 90  # credited once
    await assert_clean(pg_shard)


# -- refusals: reversed exactly once ----------------------------------------------------------


@pytest.mark.parametrize("why", ["other_tenant", "currency", "missing"])
async def test_destination_refuses_reversal_once(
    stores: dict[str, ShardStore], pg_shard: PgShard, why: str
) -> None:
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant = new_tenant()
    src = await funded(a, tenant, 500)
    if why == "other_tenant":
        dst, expected = await new_account(b, new_tenant()), "not_found"
    elif why == "currency":
        dst, expected = await new_account(b, tenant, currency="USD"), "currency_mismatch"
    else:
        dst, expected = new_account_id(slot_on(SHARD_B)), "not_found"
    it = item(tenant, src, dst, 120)
    res = await post1(a, it)
    assert res.code is TransferCode.OK
    assert await balance(a, src, tenant) == 380
    await assert_clean(pg_shard)

    r = relay(stores)
    first = await r.deliver(message(it, res))
    assert (first.outcome, first.code) == ("reversed", expected)
    assert await status(a, it.transfer_id, tenant) == ("reversed", expected)
    assert await balance(a, src, tenant) == 500
    # Every later delivery and settle is a no-op; the reversal was posted once.
    again = await asyncio.gather(r.deliver(message(it, res)), r.deliver(message(it, res)))
    assert [d.outcome for d in again] == ["already", "already"]
    # A settle without leg 2's receipt (here: one claiming the transfer was applied after all)
    # is refused and changes nothing.
    settle = await a.settle_outbound(
        SHARD_EPOCH, it.transfer_id, refusal_code=None, timeout_s=TIMEOUT_S
    )
    assert (settle.code, settle.status) == (SettleCode.UNAUTHENTICATED, None)
    assert await balance(a, src, tenant) == 500
    entries = await a.list_entries(src, tenant, before_seq=None, limit=10, timeout_s=TIMEOUT_S)
    assert entries is not None
    assert [e.amount for e in entries] == [120, -120, 500]
    if why == "currency":
        assert await balance(b, dst, tenant) == 0
    replay = await post1(a, it)
    assert (replay.code, replay.status) == (TransferCode.REPLAYED, "reversed")
    await assert_clean(pg_shard)


async def test_wrong_shard_destination_refreshes_and_retries(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    """A relay on a stale map (destination slot epoch behind) records nothing and retries."""
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 100)
    dst = await new_account(stores[SHARD_B], tenant)
    it = item(tenant, src, dst, 5)
    res = await post1(stores[SHARD_A], it)
    resolver = StaticResolver(stores)
    resolver.slot_epoch = SLOT_EPOCH + 1  # a belief the destination does not share
    r = OutboxRelay(SHARD_A, resolver, region="test")
    d = await r.deliver(message(it, res))
    assert (d.outcome, d.code, resolver.refreshes) == ("retry", "wrong_shard", 1)
    resolver.slot_epoch = SLOT_EPOCH
    assert (await r.deliver(message(it, res))).outcome == "settled"
    assert await balance(stores[SHARD_B], dst, tenant) == 5
    await assert_clean(pg_shard)


# -- wake-ups ---------------------------------------------------------------------------------


async def wait_status(store: ShardStore, tid: uuid.UUID, tenant: str, want: str) -> float:
    start = time.monotonic()
    while (await status(store, tid, tenant))[0] != want:
        assert time.monotonic() - start < DRAIN_TIMEOUT_S
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def listen_backends(pg_shard: PgShard) -> int:
    async with await psycopg.AsyncConnection.connect(pg_shard.admin_dsn, autocommit=True) as c:
        cur = await c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (LISTEN_APP_NAME_A,),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_notify_wakes_relay_and_polling_covers_lost_notifications(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 1000)
    dst = await new_account(stores[SHARD_B], tenant)
    await drain(stores)

    # 1. With a long poll interval, only the NOTIFY can make it fast.
    stop = asyncio.Event()
    r = relay(stores, poll_interval_s=LONG_POLL_S)
    task = asyncio.create_task(r.run(stop))
    try:
        await asyncio.sleep(0.3)  # the relay did its first round and is waiting on LISTEN
        assert await listen_backends(pg_shard) == 1
        it = item(tenant, src, dst, 1)
        await post1(stores[SHARD_A], it)
        took = await wait_status(stores[SHARD_A], it.transfer_id, tenant, "settled")
        assert took < LONG_POLL_S / 5, f"settled after {took:.3f}s: NOTIFY did not wake the relay"
    finally:
        stop.set()
        await task

    # 2. Kill the LISTEN session: notifications sent while it is down are lost; polling still
    # delivers within about one poll interval, and the session comes back.
    stop = asyncio.Event()
    r = relay(stores, poll_interval_s=SHORT_POLL_S)
    task = asyncio.create_task(r.run(stop))
    try:
        await asyncio.sleep(0.2)
        async with await psycopg.AsyncConnection.connect(pg_shard.admin_dsn, autocommit=True) as c:
            cur = await c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (LISTEN_APP_NAME_A,),
            )
            assert await cur.fetchall() == [(True,)]
        await asyncio.sleep(0.1)
        assert await listen_backends(pg_shard) == 0
        it = item(tenant, src, dst, 2)
        await post1(stores[SHARD_A], it)  # its NOTIFY reaches nobody
        took = await wait_status(stores[SHARD_A], it.transfer_id, tenant, "settled")
        assert took < SHORT_POLL_S * 4
        deadline = time.monotonic() + 5.0
        while await listen_backends(pg_shard) != 1:
            assert time.monotonic() < deadline, "LISTEN connection never reopened"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    assert await balance(stores[SHARD_B], dst, tenant) == 3
    await assert_clean(pg_shard)


# -- a randomized concurrent workload ---------------------------------------------------------


async def test_random_workload_conserves_money(
    stores: dict[str, ShardStore], pg_shard: PgShard
) -> None:
    rng = random.Random(20240611)
    tenant = new_tenant()
    per_shard, start_balance = 6, 1000
    accounts = {
        name: [await funded(s, tenant, start_balance) for _ in range(per_shard)]
        for name, s in stores.items()
    }
    everyone = [(name, acc) for name, accs in accounts.items() for acc in accs]
    missing = new_account_id(slot_on(SHARD_B, rng))  # a destination that never exists
    await drain(stores)

    posted: list[tuple[TransferItem, TransferResult]] = []

    async def worker(seed: int) -> None:
        wr = random.Random(seed)
        for _ in range(25):
            shard = wr.choice(list(stores))
            batch = []
            for _ in range(wr.randint(1, 4)):
                src = wr.choice(accounts[shard])
                dst = missing if wr.random() < 0.05 else wr.choice(everyone)[1]
                batch.append(item(tenant, src, dst, wr.randint(1, 400)))
            results = await stores[shard].post_transfers(SHARD_EPOCH, batch, timeout_s=TIMEOUT_S)
            posted.extend(zip(batch, results, strict=True))

    stop = asyncio.Event()
    # Two relays per source shard, racing each other and the workload.
    relays = [relay(stores, name, poll_interval_s=SHORT_POLL_S) for name in stores for _ in "xy"]
    running = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        await asyncio.gather(*(worker(rng.randrange(2**32)) for _ in range(4)))
        await drain(stores)
    finally:
        stop.set()
        await asyncio.gather(*running)

    for it, res in posted:
        if res.code is TransferCode.NOT_FOUND:
            # Only a same-shard item sees the missing destination at once; a cross-shard one
            # is accepted and reversed by leg 2.
            assert (it.destination, it.destination_shard) == (missing, None)
        else:
            assert res.code in (TransferCode.OK, TransferCode.INSUFFICIENT_FUNDS), res
    ok = [(it, res) for it, res in posted if res.code is TransferCode.OK]
    cross = [it for it, _ in ok if it.destination_shard is not None]
    assert len(cross) > 20
    assert any(it.destination == missing for it in cross)
    for it in cross:
        want = "reversed" if it.destination == missing else "settled"
        assert await status(
            stores[shard_of_slot(ids.account_slot(it.source))], it.transfer_id, tenant
        ) == (
            want,
            "not_found" if want == "reversed" else None,
        )
    # Conservation: what left each account arrived somewhere (or came back).
    expected = {acc: start_balance for _, acc in everyone}
    for it, _ in ok:
        if it.destination != missing:
            expected[it.source] -= it.amount
            expected[it.destination] += it.amount
    for name, acc in everyone:
        assert await balance(stores[name], acc, tenant) == expected[acc]
    assert sum(expected.values()) == start_balance * len(everyone)
    await assert_clean(pg_shard)


# -- timings (reported, loosely bounded) -------------------------------------------------------


async def test_timings(stores: dict[str, ShardStore]) -> None:
    tenant = new_tenant()
    src = await funded(stores[SHARD_A], tenant, 10_000)
    dst = await new_account(stores[SHARD_B], tenant)
    r = relay(stores)
    applies, delivers = [], []
    for _ in range(20):
        it = item(tenant, src, dst, 1)
        res1 = await post1(stores[SHARD_A], it)
        key_id, mac = await stores[SHARD_A].outbox_signature(it.transfer_id, timeout_s=TIMEOUT_S)
        assert res1.created_at is not None
        t0 = time.perf_counter()
        await stores[SHARD_B].apply_inbound(
            SHARD_EPOCH,
            transfer_id=it.transfer_id,
            source_shard=SHARD_A,
            tenant=tenant,
            source=src,
            destination=dst,
            amount=1,
            currency="EUR",
            destination_slot_epoch=SLOT_EPOCH,
            created_at=res1.created_at,
            key_id=key_id,
            mac=mac,
            timeout_s=TIMEOUT_S,
        )
        applies.append(time.perf_counter() - t0)
        it2 = item(tenant, src, dst, 1)
        res = await post1(stores[SHARD_A], it2)
        t0 = time.perf_counter()
        assert (await r.deliver(message(it2, res))).outcome == "settled"
        delivers.append(time.perf_counter() - t0)
        # The first one's leg 2 is applied: delivering it replays leg 2 and settles.
        assert (await r.deliver(message(it, res1))).outcome == "settled"
    logging.getLogger(__name__).warning(
        f"apply_inbound median {statistics.median(applies) * 1e3:.2f} ms,"
        f" deliver median {statistics.median(delivers) * 1e3:.2f} ms"
    )
    assert statistics.median(delivers) < 1.0


async def test_relays_leave_a_transfer_to_its_router_for_the_grace(
    stores: dict[str, ShardStore],
) -> None:
    """A router that delivers leg 2 itself posts leg 1 with a grace: no relay claims the message
    meanwhile (no parallel double delivery); after the grace the relays own it."""
    a, b = stores[SHARD_A], stores[SHARD_B]
    tenant = new_tenant()
    src = await funded(a, tenant, 100)
    dst = await new_account(b, tenant)
    await drain(stores)
    it = item(tenant, src, dst, 10)
    (res,) = await a.post_transfers(SHARD_EPOCH, [it], timeout_s=TIMEOUT_S, relay_grace_s=1.0)
    assert res.code is TransferCode.OK
    claimed = await a.claim_outbox(limit=10, lease_s=30, timeout_s=TIMEOUT_S)
    assert it.transfer_id not in {m.transfer_id for m in claimed}
    await asyncio.sleep(1.2)
    claimed = await a.claim_outbox(limit=10, lease_s=0.1, timeout_s=TIMEOUT_S)
    assert it.transfer_id in {m.transfer_id for m in claimed}
    await asyncio.sleep(0.2)
    await drain(stores)
    assert await status(a, it.transfer_id, tenant) == ("settled", None)
