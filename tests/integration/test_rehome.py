"""`txr rehome` against a real cluster of its own (ports 7100-7199 + TXR_TEST_PORT_OFFSET).

What must hold across a slot move: no write lands in a shard that does not own the slot (G5),
cross-shard transfers in flight when the slot moves settle exactly once on the right shards
(G2), every ledger and transit pair still balances exactly (G4, `txr reconcile` exits 0), and a
move stopped part way is finished by running the same command again, without duplicating rows
or money. Measured figures are logged at INFO::

    .venv/bin/pytest tests/integration/test_rehome.py -o log_cli=true --log-cli-level=INFO
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from consistency import ids
from consistency.slot_moves import RehomeOps
from infra import failover
from infra.local import cluster as lc
from regionstore import admin
from regionstore.store import InboundCode, ShardStore, TransferCode, TransferItem
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S
from tests.fixtures.cluster import private_cluster
from tests.integration.test_failover import (
    RECONCILE_TRIES,
    Ack,
    Client,
    _cli,
    _client,
    _pairs,
    _reconcile_clean,
    _run_load,
    _stale_router,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)]
log = logging.getLogger(__name__)

BASE_PORT: Final = 7100 + PORT_OFFSET
# Relays leave a leg 1 posted with this grace alone: the test decides when it is delivered.
HOLD_S: Final = 3600.0
STORE_TIMEOUT_S: Final = 10.0
# A nudged message settles within a relay round on loopback; generous for a shared machine.
SETTLE_WAIT_S: Final = 30.0
POLL_S: Final = 0.1
# Short enough to keep the test quick, long enough for relays that could deliver to do so.
SHORT_DRAIN_S: Final = 3.0


@pytest.fixture(scope="module")
def cluster_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with private_cluster(tmp_path_factory, "txr-rehome", BASE_PORT) as d:
        yield d


@pytest_asyncio.fixture
async def client(cluster_dir: Path) -> AsyncIterator[Client]:
    """One tenant's txclient per entry region (test_failover's Client)."""
    async with _client(cluster_dir) as c:
        yield c


def _dsn(d: Path, shard: str) -> str:
    return lc.primary_admin_dsns(d)[shard]


def _slot(public_id: str) -> int:
    parsed = ids.parse_account_id(public_id)
    assert parsed is not None
    return ids.account_slot(parsed)


def _q(d: Path, shard: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(_dsn(d, shard)) as conn:
        return conn.execute(query, params).fetchall()


def _owner(d: Path, slot: int) -> tuple[str, int]:
    shard, epoch, _rev = failover.LocalRehomeOps(d).slot_owner(slot)
    return shard, epoch


async def _leg1_held(
    d: Path, c: Client, src: str, dst: int, amount: int, dst_shard: str
) -> uuid.UUID:
    """Leg 1 of src -> dst posted on src's shard with a delivery grace the relays respect: the
    transfer stays pending until the test nudges it (or a rehome does)."""
    src_id = ids.parse_account_id(src)
    assert src_id is not None
    src_shard, src_epoch = _owner(d, ids.account_slot(src_id))
    _dst_shard, dst_epoch = _owner(d, ids.account_slot(dst))
    fence = admin.fence_state(_dsn(d, src_shard))
    key = uuid.uuid4().hex
    it = TransferItem(
        transfer_id=ids.new_transfer_id(),
        tenant=c.tenant,
        source=src_id,
        destination=dst,
        amount=amount,
        currency="EUR",
        reference=None,
        idempotency_key=key,
        fingerprint=hashlib.sha256(key.encode()).digest(),
        source_slot_epoch=src_epoch,
        destination_slot_epoch=dst_epoch,
        destination_shard=dst_shard,
    )
    store = ShardStore(_dsn(d, src_shard), name=src_shard, pool_min=1, pool_max=2)
    await store.open(timeout_s=STORE_TIMEOUT_S)
    try:
        (res,) = await store.post_transfers(
            fence["epoch"], [it], timeout_s=STORE_TIMEOUT_S, relay_grace_s=HOLD_S
        )
    finally:
        await store.close()
    assert res.code is TransferCode.OK, res
    return it.transfer_id


def _nudge(d: Path, shard: str) -> None:
    """Hand every held message on ``shard`` to its relays now."""
    with psycopg.connect(_dsn(d, shard)) as conn:
        conn.execute(
            "UPDATE txr.outbox SET next_attempt_at = now() WHERE state = 'pending'"
            " AND next_attempt_at > now()"
        )
        conn.execute("SELECT pg_notify('txr_outbox', '')")


def _state(d: Path, tid: uuid.UUID) -> list[tuple[str, str, str]]:
    """(holding shard, state, destination_shard) of the transfer's outbox rows, all shards."""
    out = []
    for shard in lc.primary_admin_dsns(d):
        for state, dest in _q(
            d,
            shard,
            "SELECT state, destination_shard FROM txr.outbox WHERE transfer_id = %s",
            (tid,),
        ):
            out.append((shard, state, dest))
    return out


async def _wait_final(d: Path, tid: uuid.UUID) -> tuple[str, str, str]:
    deadline = time.monotonic() + SETTLE_WAIT_S
    while True:
        rows = _state(d, tid)
        assert len(rows) == 1, rows
        if rows[0][1] != "pending":
            return rows[0]
        assert time.monotonic() < deadline, f"transfer {tid} still pending: {rows}"
        await asyncio.sleep(POLL_S)


def _inbox_and_credits(d: Path, tid: uuid.UUID) -> tuple[list[str], list[tuple[str, int]]]:
    """Shards holding an inbox row for the transfer, and every customer credit it posted."""
    inbox, credits = [], []
    for shard in lc.primary_admin_dsns(d):
        if _q(d, shard, "SELECT 1 FROM txr.inbox WHERE transfer_id = %s", (tid,)):
            inbox.append(shard)
        credits += [
            (shard, int(a))
            for (a,) in _q(
                d,
                shard,
                "SELECT e.amount FROM txr.ledger_entries e JOIN txr.accounts a"
                " ON a.id = e.account_id WHERE e.transfer_id = %s AND a.kind = 'customer'"
                " AND e.amount > 0",
                (tid,),
            )
        ]
    return inbox, credits


async def _balance(c: Client, acc: str) -> int:
    return (await c.clients["us-east"].get_account(acc, consistency="strong")).balance


async def _funded(c: Client, region: str, amount: int) -> str:
    funding = await c.open(region, overdraft=10**15)
    acc = await c.open(region)
    assert await c.acked(region, funding, acc, amount)
    return acc


async def test_rehome_under_load_with_stale_router(cluster_dir: Path) -> None:
    """A router that missed the watch keeps the old map: the stores refuse it (the source no
    longer owns the slot, the target owns it under another epoch) and it refreshes; no write
    lands in the wrong shard, every acked write is there once. Measures the move's window."""
    d = cluster_dir
    async with _client(d) as c, _stale_router(d, "us-east") as stale:
        pairs = await _pairs(c, "ap-south")
        moving = pairs[0][1]
        slot = _slot(moving)
        stop = asyncio.Event()
        task = asyncio.create_task(_run_load(c, pairs, ["eu-west", "ap-south"], stop))
        await asyncio.sleep(1.0)
        steps: dict[str, float] = {}

        def progress(msg: str) -> None:
            for word in ("no longer owns", "etcd:"):
                if word in msg:
                    steps[word] = time.monotonic()

        t0 = time.monotonic()
        await asyncio.to_thread(failover.rehome, d, slot, "eu-west-1", progress=progress)
        t1 = time.monotonic()
        # The stale router still maps the slot to ap-south-1: refused there, it refreshes.
        key = uuid.uuid4().hex
        body = {"source": pairs[0][0], "destination": moving, "amount": 1, "currency": "EUR"}
        r = await stale.post("/v1/transfers", json=body, headers=c.h(key))
        assert r.status in (201, 503), await r.text()
        extra = None
        if r.status == 201:
            extra = Ack((await r.json())["id"], pairs[0][0], moving, time.monotonic())
        await asyncio.sleep(1.0)
        stop.set()
        load = await task
        if extra is not None:
            load.acks.append(extra)
        assert load.unknown == 0
        # The slot's accounts live only on the target now.
        q = "SELECT count(*) FROM txr.accounts WHERE kind = 'customer' AND id >= %s AND id < %s"
        assert _q(d, "ap-south-1", q, ids.slot_id_range(slot)) == [(0,)]
        assert _q(d, "eu-west-1", q, ids.slot_id_range(slot))[0][0] >= 1
        # Acked transfers into the moved account each credited it once.
        want = sum(1 for a in load.acks if a.destination == moving)
        for _ in range(RECONCILE_TRIES):
            got = await _balance(c, moving)
            if got == want:
                break
            await asyncio.sleep(0.25)
        assert got == want
        unowned = steps["no longer owns"]
        first = min(
            (a.at for a in load.acks if a.destination == moving and a.at > unowned), default=None
        )
        assert first is not None
        log.info(
            f"\nREHOME under light load: command {t1 - t0:.3f}s, slot refused (unown -> etcd "
            f"flip) {steps['etcd:'] - unowned:.3f}s, command start -> first acked write to the "
            f"slot {first - t0:.3f}s; {len(load.acks)} acked, moved account balance {want}"
        )
        await _reconcile_clean(d)


async def test_in_flight_into_the_moved_slot_lands_on_the_new_owner(
    cluster_dir: Path, client: Client
) -> None:
    """Transfers into an account of a slot moving ap-south-1 -> eu-west-1, in flight across the
    move. From us-east-1: one not yet delivered (leg 2 must land on eu-west-1, and us-east-1
    moves its transit credit from ap-south-1 to eu-west-1), one applied by ap-south-1 before
    the move but not yet marked (its inbox row moves with the slot; the settle must leave the
    credit where it is). From eu-west-1 itself: leg 2 lands on the sender's own shard."""
    d = cluster_dir
    c = client
    src = await _funded(c, "us-east", 1_000)
    dst = await c.open("ap-south")
    dst_id = ids.parse_account_id(dst)
    assert dst_id is not None
    late = await _leg1_held(d, c, src, dst_id, 30, "ap-south-1")
    early = await _leg1_held(d, c, src, dst_id, 7, "ap-south-1")
    # From the target itself: after the move its leg 2 lands on its own shard.
    near_src = await _funded(c, "eu-west", 100)
    near = await _leg1_held(d, c, near_src, dst_id, 11, "ap-south-1")
    # Leg 2 of `early` on ap-south-1, as a relay that dies before the settle would leave it.
    ((key_id, mac, leg1_at),) = _q(
        d,
        "us-east-1",
        "SELECT key_id, mac, created_at FROM txr.outbox WHERE transfer_id = %s",
        (early,),
    )
    ap = ShardStore(_dsn(d, "ap-south-1"), name="ap-south-1", pool_min=1, pool_max=2)
    await ap.open(timeout_s=STORE_TIMEOUT_S)
    try:
        _shard, slot_epoch = _owner(d, _slot(dst))
        got = await ap.apply_inbound(
            admin.fence_state(_dsn(d, "ap-south-1"))["epoch"],
            transfer_id=early,
            source_shard="us-east-1",
            tenant=c.tenant,
            source=ids.parse_account_id(src) or 0,
            destination=dst_id,
            amount=7,
            currency="EUR",
            destination_slot_epoch=slot_epoch,
            created_at=leg1_at,
            key_id=key_id,
            mac=bytes(mac),
            timeout_s=STORE_TIMEOUT_S,
        )
    finally:
        await ap.close()
    assert got.code is InboundCode.APPLIED

    assert (
        await _cli("rehome", "--slot", str(_slot(dst)), "--to", "eu-west-1", "--dir", str(d)) == 0
    )
    _nudge(d, "us-east-1")
    _nudge(d, "eu-west-1")
    assert await _wait_final(d, late) == ("us-east-1", "settled", "eu-west-1")
    assert await _wait_final(d, early) == ("us-east-1", "settled", "ap-south-1")
    assert await _wait_final(d, near) == ("eu-west-1", "settled", "eu-west-1")
    for tid, amount in ((late, 30), (early, 7), (near, 11)):
        inbox, credits = _inbox_and_credits(d, tid)
        assert inbox == ["eu-west-1"]
        assert credits == [("eu-west-1", amount)]
    assert _q(
        d, "us-east-1", "SELECT rerouted_from FROM txr.outbox WHERE transfer_id = %s", (late,)
    ) == [("ap-south-1",)]
    assert await _balance(c, dst) == 48
    assert await _balance(c, src) == 1_000 - 37
    assert await _balance(c, near_src) == 100 - 11
    await _reconcile_clean(d)


async def test_in_flight_out_of_the_slot_settles_or_reverses_before_it_moves(
    cluster_dir: Path, client: Client
) -> None:
    """Transfers from an account of the moving slot, still pending: while their destination
    refuses every write the move cannot drain them and rolls back (the slot stays writable
    where it was); once it answers, the rerun drains them (one settles, one is reversed) and
    moves the slot. Each is applied or reversed exactly once."""
    d = cluster_dir
    c = client
    src = await _funded(c, "ap-south", 1_000)
    dst = await c.open("us-east")
    dst_id = ids.parse_account_id(dst)
    assert dst_id is not None
    # An id in a us-east-1 slot that no account has: leg 2 is refused, leg 1 reversed.
    ghost = ids.new_account_id(ids.account_slot(dst_id))
    slot = _slot(src)
    ok_tid = await _leg1_held(d, c, src, dst_id, 40, "us-east-1")
    bad_tid = await _leg1_held(d, c, src, ghost, 9, "us-east-1")
    us = _dsn(d, "us-east-1")
    epoch = admin.fence_state(us)["epoch"]
    admin.fence_all(us)
    try:
        rc = await _cli(
            "rehome", "--slot", str(slot), "--to", "eu-west-1", "--dir", str(d),
            "--drain-timeout", str(SHORT_DRAIN_S),
        )  # fmt: skip
        assert rc == 1
        # Rolled back: ap-south-1 owns the slot again under the same epoch, etcd unchanged.
        shard, slot_epoch = _owner(d, slot)
        assert shard == "ap-south-1"
        assert admin.fence_state(_dsn(d, "ap-south-1"))["slots"][slot] == slot_epoch
        assert slot not in admin.fence_state(_dsn(d, "eu-west-1"))["slots"]
        assert [s for s, *_ in _state(d, ok_tid)] == ["ap-south-1"]
    finally:
        admin.set_fence(us, epoch=epoch)
    # The slot is writable again where it was.
    funding = await c.open("ap-south", overdraft=10**15)
    assert await c.acked("ap-south", funding, src, 5)

    assert await _cli("rehome", "--slot", str(slot), "--to", "eu-west-1", "--dir", str(d)) == 0
    assert await _wait_final(d, ok_tid) == ("eu-west-1", "settled", "us-east-1")
    assert (await _wait_final(d, bad_tid))[:2] == ("eu-west-1", "reversed")
    inbox, credits = _inbox_and_credits(d, ok_tid)
    assert (inbox, credits) == (["us-east-1"], [("us-east-1", 40)])
    inbox, credits = _inbox_and_credits(d, bad_tid)
    assert (inbox, credits) == (["us-east-1"], [("eu-west-1", 9)])  # the reversal's credit
    assert await _balance(c, src) == 1_000 + 5 - 40
    assert await _balance(c, dst) == 40
    await _reconcile_clean(d)


class _StopAfter:
    """The real rehome operations, stopping dead (an exception, like a killed process) right
    after the step named ``after`` or before the step named ``before``."""

    def __init__(self, real: RehomeOps, *, after: str = "", before: str = "") -> None:
        self.real = real
        self.after = after
        self.before = before

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn: Callable[..., Any] = getattr(self.real, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == self.before:
                raise RuntimeError(f"killed before {name}")
            out = fn(*args, **kwargs)
            if name == self.after:
                raise RuntimeError(f"killed after {name}")
            return out

        return call


def _rows_of_slot(d: Path, slot: int) -> dict[str, tuple[int, int, int]]:
    """Per shard: (accounts, ledger entries, transfers) of the slot's customer rows."""
    out = {}
    for shard in lc.primary_admin_dsns(d):
        ((a, e, t),) = _q(
            d,
            shard,
            "SELECT (SELECT count(*) FROM txr.accounts WHERE kind = 'customer'"
            "         AND id >= %(lo)s AND id < %(hi)s),"
            " (SELECT count(*) FROM txr.ledger_entries"
            "   WHERE account_id >= %(lo)s AND account_id < %(hi)s),"
            " (SELECT count(*) FROM txr.transfers WHERE source >= %(lo)s AND source < %(hi)s)",
            dict(zip(("lo", "hi"), ids.slot_id_range(slot), strict=True)),
        )
        out[shard] = (int(a), int(e), int(t))
    return out


@pytest.mark.parametrize(("after", "before"), [("copy_in", ""), ("", "finish_out")])
async def test_interrupted_rehome_is_finished_by_a_rerun(
    cluster_dir: Path, client: Client, after: str, before: str
) -> None:
    """Stopped after the copy (etcd not flipped) or after the flip (the source still holds
    its rows): the slot is refused everywhere meanwhile, and `txr rehome` again finishes the
    move with every row and every unit of money exactly once."""
    d = cluster_dir
    c = client
    acc = await _funded(c, "ap-south", 500)
    peer = await c.open("ap-south")
    slot = _slot(acc)
    assert await c.acked("ap-south", acc, peer, 20)
    before_rows = _rows_of_slot(d, slot)["ap-south-1"]
    shard, epoch = _owner(d, slot)
    assert shard == "ap-south-1"

    ops = _StopAfter(failover.LocalRehomeOps(d), after=after, before=before)
    with pytest.raises(RuntimeError, match="killed"):
        await asyncio.to_thread(
            failover.rehome, d, slot, "eu-west-1", progress=lambda _m: None, ops=ops
        )
    # Refused everywhere: the source no longer owns it, the target only under the new epoch.
    assert slot not in admin.fence_state(_dsn(d, "ap-south-1"))["slots"]
    assert admin.fence_state(_dsn(d, "eu-west-1"))["slots"][slot] == epoch + 1
    assert _rows_of_slot(d, slot)["eu-west-1"] == before_rows
    assert _owner(d, slot) == (("ap-south-1", epoch) if after else ("eu-west-1", epoch + 1))
    if after:
        # Stopped before the flip: only the same move can finish it; another target is
        # refused before anything changes.
        rc = await _cli("rehome", "--slot", str(slot), "--to", "us-east-1", "--dir", str(d))
        assert rc == 1
        assert _rows_of_slot(d, slot)["us-east-1"] == (0, 0, 0)

    if after:
        assert await _cli("rehome", "--slot", str(slot), "--to", "eu-west-1", "--dir", str(d)) == 0
        target, new_epoch = "eu-west-1", epoch + 1
    else:
        # Flipped already: moving it on (here: to us-east-1) first finishes the earlier move.
        assert await _cli("rehome", "--slot", str(slot), "--to", "us-east-1", "--dir", str(d)) == 0
        target, new_epoch = "us-east-1", epoch + 2
    rows = _rows_of_slot(d, slot)
    assert rows[target] == before_rows
    assert all(n == (0, 0, 0) for shard, n in rows.items() if shard != target), rows
    assert _owner(d, slot) == (target, new_epoch)
    # Idempotent: another run changes nothing.
    assert await _cli("rehome", "--slot", str(slot), "--to", target, "--dir", str(d)) == 0
    assert _rows_of_slot(d, slot) == rows
    # Writes to the slot resume on the new owner, and the money is all there once.
    assert await c.acked("eu-west", peer, acc, 3)
    assert await _balance(c, acc) == 500 - 20 + 3
    await _reconcile_clean(d)


def _relay_sum(d: Path, region: str, metric: str, shard: str) -> float:
    url = lc.status(d)["regions"][region]["relays_metrics"]
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == metric and s.labels.get("shard") == shard
    )


async def test_a_moved_slot_publishes_no_event_again(cluster_dir: Path, client: Client) -> None:
    """A slot move copies accounts and transfers into the target in one transaction with its
    slot_moves row: the target's decoder derives no event from it (the events came from the
    source when they were committed), so its publisher sends nothing, not even duplicates."""
    d, c = cluster_dir, client
    src = await _funded(c, "us-east", 500)
    dst = await c.open("us-east")
    tid = await c.acked("us-east", src, dst, 5)
    assert tid is not None
    events = c.clients["us-east"]
    deadline = time.monotonic() + 60
    want = {("account.created", src), ("account.created", dst), ("transfer.settled", tid)}
    while True:
        before = [e async for e in events.events()]
        if want <= {(e.type, e.data["id"]) for e in before}:
            break
        assert time.monotonic() < deadline, "events not published"
        await asyncio.sleep(0.3)
    target_region = lc.status(d)["shards"]["eu-west-1"]["primary_region"]
    published = _relay_sum(d, target_region, "txr_events_published_total", "eu-west-1")
    applied = _relay_sum(d, target_region, "txr_feed_applied_total", "eu-west-1")
    assert (
        await _cli("rehome", "--slot", str(_slot(src)), "--to", "eu-west-1", "--dir", str(d)) == 0
    )
    # The target's decoder has handed the copy out once its regions applied the moved rows.
    while _relay_sum(d, target_region, "txr_feed_applied_total", "eu-west-1") <= applied:
        assert time.monotonic() < deadline + 60, "the copy never reached the target's feed"
        await asyncio.sleep(0.3)
    await asyncio.sleep(SHORT_DRAIN_S)
    assert _relay_sum(d, target_region, "txr_events_published_total", "eu-west-1") == published
    after = [e async for e in events.events()]
    assert [e.id for e in after] == [e.id for e in before]
