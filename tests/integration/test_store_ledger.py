"""The shard store against a real primary with a synchronous standby (tests/fixtures/pg.py).

Each test makes its own tenant and accounts, so tests are independent of each other and of
order. Tests that change the fence or slot rows restore them before they end, and use slots
>= OWN_SLOT_MIN that the account helper never picks.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import uuid
from typing import Any, Final

import psycopg
import pytest

from consistency.ids import account_slot, new_account_id, new_transfer_id
from infra.local import postgres as pg
from regionstore import admin, replication
from regionstore.errors import StoreOutcomeUnknown
from regionstore.store import (
    CreateAccountCode,
    ShardStore,
    TransferCode,
    TransferItem,
    TransferResult,
)
from tests.fixtures.pg import SHARD_EPOCH, SLOT_EPOCH, STANDBY_APP_NAME, PgShard

pytestmark = pytest.mark.integration

TIMEOUT_S: Final = 10.0
# Slots 4000.. are reserved for tests that change slot rows; the helper never uses them.
OWN_SLOT_MIN: Final = 4000
FUNDING_OVERDRAFT: Final = 10**15
# The standby flushes before the primary acks (synchronous_commit=on) but replays a moment
# later; poll at most this long.
STANDBY_REPLAY_WAIT_S: Final = 5.0


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


async def new_account(
    store: ShardStore,
    tenant: str,
    *,
    currency: str = "EUR",
    overdraft_limit: int = 0,
    slot: int | None = None,
    slot_epoch: int = SLOT_EPOCH,
) -> int:
    for _ in range(3):
        account_id = new_account_id(slot if slot is not None else random.randrange(OWN_SLOT_MIN))
        code, row = await store.create_account(
            shard_epoch=SHARD_EPOCH,
            slot_epoch=slot_epoch,
            account_id=account_id,
            tenant=tenant,
            currency=currency,
            overdraft_limit=overdraft_limit,
            metadata={"test": True},
            timeout_s=TIMEOUT_S,
        )
        if code is CreateAccountCode.OK:
            assert row is not None
            assert row.balance == 0
            assert row.version == 1
            return account_id
        assert code is CreateAccountCode.ID_TAKEN
    raise AssertionError("three id clashes in a row")


def fingerprint(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def item(
    tenant: str,
    source: int,
    destination: int,
    amount: int,
    *,
    key: str | None = None,
    currency: str = "EUR",
    source_slot_epoch: int = SLOT_EPOCH,
    destination_slot_epoch: int = SLOT_EPOCH,
) -> TransferItem:
    return TransferItem(
        transfer_id=new_transfer_id(),
        tenant=tenant,
        source=source,
        destination=destination,
        amount=amount,
        currency=currency,
        reference=None,
        idempotency_key=key or uuid.uuid4().hex,
        fingerprint=fingerprint(source, destination, amount, currency),
        source_slot_epoch=source_slot_epoch,
        destination_slot_epoch=destination_slot_epoch,
    )


async def post1(store: ShardStore, it: TransferItem, epoch: int = SHARD_EPOCH) -> TransferResult:
    (res,) = await store.post_transfers(epoch, [it], timeout_s=TIMEOUT_S)
    return res


async def funded(store: ShardStore, tenant: str, amount: int, **kw: Any) -> int:
    """A new account holding ``amount``, paid from a per-call funding account."""
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    account = await new_account(store, tenant, **kw)
    res = await post1(store, item(tenant, funding, account, amount))
    assert res.code is TransferCode.OK
    return account


async def balance(store: ShardStore, account_id: int, tenant: str) -> int:
    row = await store.get_account(account_id, tenant, timeout_s=TIMEOUT_S)
    assert row is not None
    return row.balance


def counts(admin_dsn: str) -> tuple[int, ...]:
    with psycopg.connect(admin_dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM txr.transfers), (SELECT count(*) FROM"
            " txr.ledger_entries), (SELECT count(*) FROM txr.idempotency_keys),"
            " (SELECT count(*) FROM txr.accounts), (SELECT sum(version) FROM txr.accounts)"
        ).fetchone()
    assert row is not None
    return tuple(row)


# -- basics -------------------------------------------------------------------------------------


async def test_transfer_reads_and_entries(store: ShardStore) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 1000)
    b = await new_account(store, tenant)
    it = item(tenant, a, b, 300)
    res = await post1(store, it)
    assert res.code is TransferCode.OK
    assert res.transfer_id == it.transfer_id
    assert res.status == "settled"
    assert res.created_at is not None
    assert (res.source_balance, res.source_version) == (700, 3)
    assert (res.destination_balance, res.destination_version) == (300, 2)

    tr = await store.get_transfer(it.transfer_id, tenant, timeout_s=TIMEOUT_S)
    assert tr is not None
    assert (tr.source, tr.destination, tr.amount) == (a, b, 300)
    assert tr.currency == "EUR"
    assert tr.status == "settled"
    assert await store.get_transfer(it.transfer_id, new_tenant(), timeout_s=TIMEOUT_S) is None

    entries = await store.list_entries(a, tenant, before_seq=None, limit=10, timeout_s=TIMEOUT_S)
    assert entries is not None
    got = [(e.seq, e.amount, e.balance_after) for e in entries]
    assert got == [(3, -300, 700), (2, 1000, 1000)]
    page = await store.list_entries(a, tenant, before_seq=3, limit=10, timeout_s=TIMEOUT_S)
    assert page is not None
    assert [e.seq for e in page] == [2]
    fresh = await new_account(store, tenant)
    empty = await store.list_entries(fresh, tenant, before_seq=None, limit=5, timeout_s=TIMEOUT_S)
    assert empty == []
    assert (
        await store.list_entries(a, new_tenant(), before_seq=None, limit=5, timeout_s=TIMEOUT_S)
        is None
    )
    assert await store.get_account(a, new_tenant(), timeout_s=TIMEOUT_S) is None
    acc = await store.get_account(a, tenant, timeout_s=TIMEOUT_S)
    assert acc is not None
    assert acc.metadata == {"test": True}
    assert acc.currency == "EUR"
    assert await store.ping(timeout_s=TIMEOUT_S) > 0


async def test_create_account_id_taken(store: ShardStore) -> None:
    tenant = new_tenant()
    a = await new_account(store, tenant)
    code, row = await store.create_account(
        shard_epoch=SHARD_EPOCH,
        slot_epoch=SLOT_EPOCH,
        account_id=a,
        tenant=tenant,
        currency="EUR",
        overdraft_limit=0,
        metadata={},
        timeout_s=TIMEOUT_S,
    )
    assert (code, row) == (CreateAccountCode.ID_TAKEN, None)


# -- idempotency (G2) ---------------------------------------------------------------------------


async def test_replay_and_key_reuse(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 500)
    b = await new_account(store, tenant)
    first = item(tenant, a, b, 100, key="k1")
    ok = await post1(store, first)
    assert ok.code is TransferCode.OK

    # A retry carries a new transfer id (the router makes one per attempt) and the same body.
    retry = item(tenant, a, b, 100, key="k1")
    replay = await post1(store, retry)
    assert replay.code is TransferCode.REPLAYED
    assert replay.transfer_id == first.transfer_id
    assert replay.created_at == ok.created_at
    assert replay.status == "settled"
    assert (replay.source_balance, replay.source_version) == (400, 3)
    assert await store.get_transfer(retry.transfer_id, tenant, timeout_s=TIMEOUT_S) is None

    before = counts(pg_shard.admin_dsn)
    reused = await post1(store, item(tenant, a, b, 101, key="k1"))
    assert reused.code is TransferCode.IDEMPOTENCY_KEY_REUSED
    assert reused.transfer_id is None
    assert counts(pg_shard.admin_dsn) == before
    assert await balance(store, a, tenant) == 400

    # The key's scope is (tenant, source): the same key from another source is a new transfer.
    other = await funded(store, tenant, 500)
    assert (await post1(store, item(tenant, other, b, 100, key="k1"))).code is TransferCode.OK

    # Same key twice in one batch: the second sees the first.
    x, y = item(tenant, a, b, 5, key="k2"), item(tenant, a, b, 5, key="k2")
    r1, r2 = await store.post_transfers(SHARD_EPOCH, [x, y], timeout_s=TIMEOUT_S)
    assert r1.code is TransferCode.OK
    assert r2.code is TransferCode.REPLAYED
    assert r2.transfer_id == x.transfer_id
    assert await balance(store, a, tenant) == 395


async def test_refused_transfer_stores_no_key(store: ShardStore) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 10)
    b = await new_account(store, tenant)
    assert (await post1(store, item(tenant, a, b, 50, key="k"))).code is (
        TransferCode.INSUFFICIENT_FUNDS
    )
    funding = await new_account(store, tenant, overdraft_limit=FUNDING_OVERDRAFT)
    assert (await post1(store, item(tenant, funding, a, 40))).code is TransferCode.OK
    assert (await post1(store, item(tenant, a, b, 50, key="k"))).code is TransferCode.OK
    assert await balance(store, a, tenant) == 0


async def test_concurrent_retries_apply_once(pg_shard: PgShard) -> None:
    rounds, racers = 25, 4
    stores = [
        ShardStore(pg_shard.app_dsn, name=f"racer{i}", pool_min=1, pool_max=2)
        for i in range(racers)
    ]
    for s in stores:
        await s.open(timeout_s=TIMEOUT_S)
    try:
        tenant = new_tenant()
        a = await funded(stores[0], tenant, 10_000)
        b = await new_account(stores[0], tenant)
        for rnd in range(rounds):
            key = f"race-{rnd}"
            calls = [post1(s, item(tenant, a, b, 7, key=key)) for s in stores]
            results = await asyncio.gather(*calls)
            codes = sorted(r.code for r in results)
            assert codes == [TransferCode.OK] + [TransferCode.REPLAYED] * (racers - 1), codes
            ids = {r.transfer_id for r in results}
            assert len(ids) == 1, "every replay names the one applied transfer"
        assert await balance(stores[0], a, tenant) == 10_000 - 7 * rounds
        assert await balance(stores[0], b, tenant) == 7 * rounds
    finally:
        for s in stores:
            await s.close()


# -- fencing (G5) -------------------------------------------------------------------------------


async def test_stale_shard_epoch_writes_nothing(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    before = counts(pg_shard.admin_dsn)
    for epoch in (SHARD_EPOCH - 1, SHARD_EPOCH + 1):
        batch = [item(tenant, a, b, 10), item(tenant, b, a, 1), item(tenant, a, a + 1, 1)]
        results = await store.post_transfers(epoch, batch, timeout_s=TIMEOUT_S)
        assert [r.code for r in results] == [TransferCode.STALE_EPOCH] * 3
        assert all(r.transfer_id is None and r.source_balance is None for r in results)
        code, row = await store.create_account(
            shard_epoch=epoch,
            slot_epoch=SLOT_EPOCH,
            account_id=new_account_id(1),
            tenant=tenant,
            currency="EUR",
            overdraft_limit=0,
            metadata={},
            timeout_s=TIMEOUT_S,
        )
        assert (code, row) == (CreateAccountCode.STALE_EPOCH, None)
    assert counts(pg_shard.admin_dsn) == before
    assert await balance(store, a, tenant) == 100


async def test_fenced_primary_refuses_everything(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    await asyncio.to_thread(admin.fence_all, pg_shard.admin_dsn)
    try:
        before = counts(pg_shard.admin_dsn)
        res = await post1(store, item(tenant, a, b, 10))
        assert res.code is TransferCode.STALE_EPOCH
        code, _ = await store.create_account(
            shard_epoch=SHARD_EPOCH,
            slot_epoch=SLOT_EPOCH,
            account_id=new_account_id(2),
            tenant=tenant,
            currency="EUR",
            overdraft_limit=0,
            metadata={},
            timeout_s=TIMEOUT_S,
        )
        assert code is CreateAccountCode.STALE_EPOCH
        assert counts(pg_shard.admin_dsn) == before
    finally:
        await asyncio.to_thread(admin.set_fence, pg_shard.admin_dsn, epoch=SHARD_EPOCH)
    assert (await post1(store, item(tenant, a, b, 10))).code is TransferCode.OK
    with pytest.raises(admin.EpochRegression):
        admin.set_fence(pg_shard.admin_dsn, epoch=SHARD_EPOCH - 1)


async def test_wrong_shard_slot_not_owned_or_stale(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    slot = OWN_SLOT_MIN + 1
    moved = await new_account(store, tenant, slot=slot)
    local = await funded(store, tenant, 100)
    assert account_slot(moved) == slot
    admin.set_slot(pg_shard.admin_dsn, slot, epoch=SLOT_EPOCH + 1, owned=True)
    before = counts(pg_shard.admin_dsn)
    # A router still on the old slot epoch, for either end of the transfer.
    stale_dst = item(tenant, local, moved, 10)
    stale_src = item(tenant, moved, local, 10, source_slot_epoch=SLOT_EPOCH)
    results = await store.post_transfers(SHARD_EPOCH, [stale_dst, stale_src], timeout_s=TIMEOUT_S)
    assert [r.code for r in results] == [TransferCode.WRONG_SHARD] * 2
    code, _ = await store.create_account(
        shard_epoch=SHARD_EPOCH,
        slot_epoch=SLOT_EPOCH,
        account_id=new_account_id(slot),
        tenant=tenant,
        currency="EUR",
        overdraft_limit=0,
        metadata={},
        timeout_s=TIMEOUT_S,
    )
    assert code is CreateAccountCode.WRONG_SHARD
    assert counts(pg_shard.admin_dsn) == before
    # The current epoch is accepted.
    fresh = item(tenant, local, moved, 10, destination_slot_epoch=SLOT_EPOCH + 1)
    assert (await post1(store, fresh)).code is TransferCode.OK
    # The slot moves away: refused whatever epoch the router names.
    admin.set_slot(pg_shard.admin_dsn, slot, epoch=SLOT_EPOCH + 1, owned=False)
    try:
        before = counts(pg_shard.admin_dsn)
        for ep in (SLOT_EPOCH, SLOT_EPOCH + 1):
            gone = item(tenant, local, moved, 10, destination_slot_epoch=ep)
            assert (await post1(store, gone)).code is TransferCode.WRONG_SHARD
        assert counts(pg_shard.admin_dsn) == before
        assert await balance(store, local, tenant) == 90
    finally:
        # The shard owns the slot again: its account there is not left on a shard that does
        # not own it, which every later reconcile of the shared database would report.
        admin.set_slot(pg_shard.admin_dsn, slot, epoch=SLOT_EPOCH + 1, owned=True)


async def test_fence_waits_for_in_flight_write(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    in_flight = item(tenant, a, b, 10)
    # An explicit transaction keeps the write (and its shared fence lock) in flight.
    conn = await psycopg.AsyncConnection.connect(pg_shard.admin_dsn)
    try:
        cur = await conn.execute(
            "SELECT code FROM txr.post_transfers("
            "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[])",
            (
                SHARD_EPOCH,
                [in_flight.transfer_id],
                [tenant],
                [a],
                [b],
                [10],
                ["EUR"],
                [None],
                [in_flight.idempotency_key],
                [in_flight.fingerprint],
                [SLOT_EPOCH],
                [SLOT_EPOCH],
                [None],
            ),
        )
        assert await cur.fetchall() == [("ok",)]
        fence = asyncio.ensure_future(asyncio.to_thread(admin.fence_all, pg_shard.admin_dsn))
        await asyncio.sleep(0.5)
        assert not fence.done(), "the fence must wait for the in-flight write"
        await conn.commit()
        await asyncio.wait_for(fence, TIMEOUT_S)
    finally:
        await conn.close()
    try:
        # The write that was in flight committed; every write after the fence is refused.
        assert await balance(store, b, tenant) == 10
        assert (await post1(store, item(tenant, a, b, 10))).code is TransferCode.STALE_EPOCH
        assert await balance(store, b, tenant) == 10
    finally:
        await asyncio.to_thread(admin.set_fence, pg_shard.admin_dsn, epoch=SHARD_EPOCH)


# -- floors and conservation (G3, G4) -----------------------------------------------------------


async def test_floors_hold_under_concurrency(pg_shard: PgShard) -> None:
    tasks_n, per_task = 20, 20
    rng = random.Random(20240601)
    s = ShardStore(pg_shard.app_dsn, name="floors", pool_min=4, pool_max=20)
    await s.open(timeout_s=TIMEOUT_S)
    try:
        tenant = new_tenant()
        limits = [0, 0, 0, 50]
        accounts = [await funded(s, tenant, 100, overdraft_limit=lim) for lim in limits]
        floor = {acc: -lim for acc, lim in zip(accounts, limits, strict=True)}
        initial = {acc: await balance(s, acc, tenant) for acc in accounts}
        plans = [
            [(*tuple(rng.sample(accounts, 2)), rng.randint(1, 80)) for _ in range(per_task)]
            for _ in range(tasks_n)
        ]

        async def worker(plan: list[tuple[int, ...]]) -> list[tuple[TransferItem, TransferResult]]:
            out = []
            for src, dst, amount in plan:
                it = item(tenant, src, dst, amount)
                out.append((it, await post1(s, it)))
            return out

        done = [
            pair for chunk in await asyncio.gather(*(worker(p) for p in plans)) for pair in chunk
        ]
        oks = [(it, r) for it, r in done if r.code is TransferCode.OK]
        assert {r.code for _, r in done} <= {TransferCode.OK, TransferCode.INSUFFICIENT_FUNDS}
        assert 0 < len(oks) < len(done), "the workload must hit the floors"

        expected = dict(initial)
        seen: dict[int, dict[int, int]] = {acc: {} for acc in accounts}
        for it, r in oks:
            assert r.source_balance is not None
            assert r.source_version is not None
            assert r.destination_balance is not None
            assert r.destination_version is not None
            assert r.source_balance >= floor[it.source]
            expected[it.source] -= it.amount
            expected[it.destination] += it.amount
            seen[it.source][r.source_version] = r.source_balance
            seen[it.destination][r.destination_version] = r.destination_balance
        final = {acc: await balance(s, acc, tenant) for acc in accounts}
        assert final == expected
        assert sum(final.values()) == sum(initial.values())
        for acc in accounts:
            assert final[acc] >= floor[acc]
            # Every reported (version, balance) is exactly the ledger entry at that seq.
            entries = await s.list_entries(
                acc, tenant, before_seq=None, limit=500, timeout_s=TIMEOUT_S
            )
            assert entries is not None
            ledger = {e.seq: e.balance_after for e in entries}
            assert all(ledger[v] == bal for v, bal in seen[acc].items())
            assert all(bal >= floor[acc] for bal in ledger.values())
        check = await asyncio.to_thread(admin.ledger_check, pg_shard.admin_dsn)
        assert check["ok"], check
    finally:
        await s.close()


# -- batch semantics ----------------------------------------------------------------------------


async def test_bad_items_do_not_fail_neighbours(store: ShardStore) -> None:
    tenant, stranger = new_tenant(), new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    usd = await new_account(store, tenant, currency="USD")
    theirs = await new_account(store, stranger)
    missing = new_account_id(7)
    batch = [
        item(tenant, a, b, 10),
        item(tenant, a, b, 1000),  # insufficient funds
        item(tenant, a, usd, 5),  # destination is USD
        item(tenant, a, b, 5, currency="USD"),  # neither is USD
        item(tenant, a, missing, 5),
        item(tenant, missing, b, 5),
        item(tenant, a, theirs, 5),  # another tenant's account is invisible
        item(tenant, a, b, 91),  # insufficient: item 0 left 90
        item(tenant, a, b, 20),
    ]
    results = await store.post_transfers(SHARD_EPOCH, batch, timeout_s=TIMEOUT_S)
    assert [r.code for r in results] == [
        TransferCode.OK,
        TransferCode.INSUFFICIENT_FUNDS,
        TransferCode.CURRENCY_MISMATCH,
        TransferCode.CURRENCY_MISMATCH,
        TransferCode.NOT_FOUND,
        TransferCode.NOT_FOUND,
        TransferCode.NOT_FOUND,
        TransferCode.INSUFFICIENT_FUNDS,
        TransferCode.OK,
    ]
    assert results[-1].source_balance == 70
    assert results[-1].source_version == 4
    assert await balance(store, a, tenant) == 70
    assert await balance(store, b, tenant) == 30
    assert await balance(store, theirs, stranger) == 0


async def test_balance_limit(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    near_max = 2**62 - 5
    # Reaching 2^62 honestly takes thousands of maximal transfers (overdrafts are bounded by
    # 10^15), so put b just under the ceiling for the duration of this test and put it back.
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute("UPDATE txr.accounts SET balance = %s WHERE id = %s", (near_max, b))
        try:
            before = counts(pg_shard.admin_dsn)
            res = await post1(store, item(tenant, a, b, 6))
            assert res.code is TransferCode.BALANCE_LIMIT
            assert counts(pg_shard.admin_dsn) == before
        finally:
            conn.execute("UPDATE txr.accounts SET balance = 0 WHERE id = %s", (b,))
    assert await balance(store, a, tenant) == 100


async def test_opposite_order_batches_never_deadlock(store: ShardStore) -> None:
    tenant = new_tenant()
    accs = [await funded(store, tenant, 10_000) for _ in range(4)]
    a, b, c, d = accs
    for _ in range(30):
        forward = [item(tenant, a, b, 1), item(tenant, c, d, 1), item(tenant, b, c, 1)]
        backward = [item(tenant, d, c, 1), item(tenant, c, b, 1), item(tenant, b, a, 1)]
        r1, r2 = await asyncio.gather(
            store.post_transfers(SHARD_EPOCH, forward, timeout_s=TIMEOUT_S),
            store.post_transfers(SHARD_EPOCH, backward, timeout_s=TIMEOUT_S),
        )
        assert all(r.code is TransferCode.OK for r in r1 + r2)
    assert [await balance(store, x, tenant) for x in accs] == [10_000] * 4


# -- durability, privileges, timeouts ------------------------------------------------------------


async def test_standby_has_acknowledged_transfer(store: ShardStore, pg_shard: PgShard) -> None:
    states = replication.standbys(pg_shard.admin_dsn)
    assert [(s.application_name, s.sync_state) for s in states] == [(STANDBY_APP_NAME, "sync")]
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    it = item(tenant, a, b, 42)
    assert (await post1(store, it)).code is TransferCode.OK
    deadline = time.monotonic() + STANDBY_REPLAY_WAIT_S
    with psycopg.connect(pg_shard.standby_admin_dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        while True:
            row = conn.execute(
                "SELECT t.amount, a.balance FROM txr.transfers t"
                " JOIN txr.accounts a ON a.id = t.destination WHERE t.id = %s",
                (it.transfer_id,),
            ).fetchone()
            if row is not None:
                break
            assert time.monotonic() < deadline, "standby never replayed an acked transfer"
            await asyncio.sleep(0.02)
    assert row == (42, 42)


async def test_app_role_cannot_write_tables(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await new_account(store, tenant)
    async with await psycopg.AsyncConnection.connect(pg_shard.app_dsn, autocommit=True) as conn:
        for stmt in (
            "UPDATE txr.accounts SET balance = 1000000 WHERE id = %s",
            "DELETE FROM txr.ledger_entries WHERE account_id = %s",
            "INSERT INTO txr.owned_slots (slot, epoch) VALUES (4095, %s)",
            "UPDATE txr.fence SET epoch = %s",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(stmt, (a,))
    assert await balance(store, a, tenant) == 0


async def test_timeout_once_sent_is_outcome_unknown(store: ShardStore, pg_shard: PgShard) -> None:
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    # Hold a's row lock so the write blocks inside the procedure past its deadline.
    async with await psycopg.AsyncConnection.connect(pg_shard.admin_dsn) as blocker:
        await blocker.execute("SELECT 1 FROM txr.accounts WHERE id = %s FOR UPDATE", (a,))
        started = time.monotonic()
        with pytest.raises(StoreOutcomeUnknown):
            await store.post_transfers(SHARD_EPOCH, [item(tenant, a, b, 1)], timeout_s=0.3)
        assert time.monotonic() - started < 1.0, "the deadline is strict"
        # The abandoned call is cancelled on the server in the background; wait for that before
        # releasing the lock (released earlier, the write could still commit, which is exactly
        # why the outcome is reported unknown).
        async with await psycopg.AsyncConnection.connect(
            pg_shard.admin_dsn, autocommit=True
        ) as watcher:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                cur = await watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'txr_app'"
                    " AND wait_event_type = 'Lock'"
                )
                if await cur.fetchone() == (0,):
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        await blocker.rollback()
    # The cancelled call was rolled back on the server and its connection is usable again.
    assert await balance(store, a, tenant) == 100
    assert (await post1(store, item(tenant, a, b, 1))).code is TransferCode.OK


async def test_no_ack_without_the_sync_standby(store: ShardStore, pg_shard: PgShard) -> None:
    """G1/G7: with the standby gone a commit is never acknowledged, only reported unknown."""
    tenant = new_tenant()
    a = await funded(store, tenant, 100)
    b = await new_account(store, tenant)
    timed_out, cancelled = item(tenant, a, b, 1, key="t"), item(tenant, a, b, 2, key="c")
    await asyncio.to_thread(pg.stop, pg_shard.standby_dir, "fast")
    try:
        # 1. The deadline passes while the commit waits for the standby.
        with pytest.raises(StoreOutcomeUnknown):
            await store.post_transfers(SHARD_EPOCH, [timed_out], timeout_s=0.5)
        # 2. The wait is cancelled on the server (statement_timeout, pg_cancel_backend): the
        # server commits locally, warns, and returns normal rows; the store must not ack them.
        call = asyncio.ensure_future(
            store.post_transfers(SHARD_EPOCH, [cancelled], timeout_s=TIMEOUT_S)
        )
        async with await psycopg.AsyncConnection.connect(
            pg_shard.admin_dsn, autocommit=True
        ) as conn:
            deadline = time.monotonic() + TIMEOUT_S
            while not call.done():
                cur = await conn.execute(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                    " WHERE wait_event = 'SyncRep' AND usename = 'txr_app'"
                    " AND query LIKE '%%post_transfers%%'"
                )
                if await cur.fetchall():
                    break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        with pytest.raises(StoreOutcomeUnknown, match="synchronous replication"):
            await call
        # 3. Both are committed locally and visible on the primary, but not replicated: a retry
        # with the same key must not acknowledge them now (a replay locks the source row, so
        # its commit waits for the standby too). Acking here would lose them with the region.
        for it in (timed_out, cancelled):
            with pytest.raises(StoreOutcomeUnknown):
                await store.post_transfers(
                    SHARD_EPOCH,
                    [item(tenant, a, b, it.amount, key=it.idempotency_key)],
                    timeout_s=0.5,
                )
    finally:
        await asyncio.to_thread(pg.start, pg_shard.standby_dir, pg_shard.standby_log)
        await asyncio.to_thread(replication.set_sync_standby, pg_shard.admin_dsn, STANDBY_APP_NAME)
    # Both committed locally; the client's retries with the same keys replay them.
    for it in (timed_out, cancelled):
        res = await post1(store, item(tenant, a, b, it.amount, key=it.idempotency_key))
        assert res.code is TransferCode.REPLAYED
        assert res.transfer_id == it.transfer_id
    assert await balance(store, a, tenant) == 97
