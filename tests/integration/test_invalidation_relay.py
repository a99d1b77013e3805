"""The invalidation relay against a real shard (pg_shard: primary + synchronous standby) and a
Redis of our own (redis_server). Accounts and transfers go through ShardStore, as in the store
tests; the relay runs as a role with only REPLICATION and pg_read_all_stats, like txr_repl.

Each test uses its own region name, so its slots (txr_inval_<region>_...) are its own; they are
dropped at the end so that no slot keeps pinning WAL for the rest of the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import make_conninfo

from consistency import coherence
from consistency.ids import new_account_id, new_transfer_id
from consistency.topology import Node, Region, Shard, SlotMap, SlotRange, Topology
from regionstore.store import CreateAccountCode, ShardStore, TransferCode, TransferItem
from router.cache import RegionCache
from router.freshness import RelayLag
from router.metrics import Metrics
from router.relays.invalidation import InvalidationRelay, slot_prefix
from tests.fixtures.pg import (
    DB_A,
    DB_B,
    HOST,
    PRIMARY_PORT,
    SHARD_A,
    SHARD_B,
    SHARD_B_SLOT_MIN,
    SHARD_EPOCH,
    SLOT_EPOCH,
    PgShard,
)
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

TIMEOUT_S: Final = 10.0
# The relay's own catch-up after a restart, a reset or a resume, with a loaded machine's margin.
CATCH_UP_S: Final = 15.0
RELAY_ROLE: Final = "txr_inval_test"
FUNDING_OVERDRAFT: Final = 10**15
ACCOUNTS: Final = 8
LATENCY_COMMITS: Final = 300
# Slots below this are the store tests' random picks; ours stay clear of theirs and of 4000+.
OWN_SLOT: Final = 3999


class StaticTopology:
    def __init__(self, topology: Topology) -> None:
        self.current = topology


def static_topology() -> Topology:
    def node(name: str) -> Node:
        return Node(name, "r1", HOST, PRIMARY_PORT)

    shards = {
        SHARD_A: Shard(SHARD_A, "r1", node("a@r1"), (), SHARD_EPOCH),
        SHARD_B: Shard(SHARD_B, "r1", node("b@r1"), (), SHARD_EPOCH),
    }
    slots = SlotMap(
        (
            SlotRange(0, SHARD_B_SLOT_MIN - 1, SHARD_A, SLOT_EPOCH),
            SlotRange(SHARD_B_SLOT_MIN, 4095, SHARD_B, SLOT_EPOCH),
        )
    )
    return Topology(1, {"r1": Region("r1", "http://unused")}, shards, slots)


@dataclass
class Env:
    pg: PgShard
    cache: RegionCache
    store: ShardStore
    redis: RedisServer
    region: str
    metrics: Metrics
    conninfo: Callable[[Shard], str]
    topology: StaticTopology
    tenant: str

    def relay(self, poll_interval_s: float = 0.02) -> InvalidationRelay:
        return InvalidationRelay(
            self.region,
            self.topology,
            self.cache,
            self.conninfo,
            metrics=self.metrics,
            poll_interval_s=poll_interval_s,
        )

    async def account(self, overdraft: int = 0) -> int:
        for _ in range(3):
            acc = new_account_id(OWN_SLOT)
            code, _ = await self.store.create_account(
                shard_epoch=SHARD_EPOCH,
                slot_epoch=SLOT_EPOCH,
                account_id=acc,
                tenant=self.tenant,
                currency="EUR",
                overdraft_limit=overdraft,
                metadata={"test": "it's"},
                timeout_s=TIMEOUT_S,
            )
            if code is CreateAccountCode.OK:
                return acc
        raise AssertionError("three id clashes in a row")

    async def transfer(self, source: int, destination: int, amount: int = 1) -> tuple[int, int]:
        """Post one transfer; (source version, destination version) after it."""
        item = TransferItem(
            transfer_id=new_transfer_id(),
            tenant=self.tenant,
            source=source,
            destination=destination,
            amount=amount,
            currency="EUR",
            reference=None,
            idempotency_key=uuid.uuid4().hex,
            fingerprint=secrets.token_bytes(32),
            source_slot_epoch=SLOT_EPOCH,
            destination_slot_epoch=SLOT_EPOCH,
        )
        (res,) = await self.store.post_transfers(SHARD_EPOCH, [item], timeout_s=TIMEOUT_S)
        assert res.code is TransferCode.OK, res.code
        assert res.source_version is not None
        assert res.destination_version is not None
        return res.source_version, res.destination_version

    async def db_versions(self, accounts: list[int]) -> dict[int, int]:
        out = {}
        for acc in accounts:
            row = await self.store.get_account(acc, self.tenant, timeout_s=TIMEOUT_S)
            assert row is not None
            out[acc] = row.version
        return out

    async def assert_never_stale(self, accounts: list[int]) -> dict[int, int | None]:
        """Every cached account equals the database (call when no commit is in flight)."""
        cached: dict[int, int | None] = {}
        for acc in accounts:
            row = await self.store.get_account(acc, self.tenant, timeout_s=TIMEOUT_S)
            assert row is not None
            entry = await self.cache.get(SHARD_EPOCH, acc)
            cached[acc] = entry.version if entry is not None else None
            if entry is not None:
                assert entry.version == row.version, (acc, entry.version, row.version)
                assert entry.payload["balance"] == row.balance
                assert entry.payload["tenant"] == row.tenant
        return cached

    async def wait_cached(self, versions: dict[int, int], timeout_s: float = CATCH_UP_S) -> None:
        """Until every account is cached at (at least) the given version."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = []
            for acc, v in versions.items():
                e = await self.cache.get(SHARD_EPOCH, acc)
                if e is None or e.version < v:
                    missing.append((acc, None if e is None else e.version, v))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not cached in {timeout_s}s: {missing[:3]}")
            await asyncio.sleep(0.01)


async def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def relay_role(pg_shard: PgShard) -> Iterator[str]:
    """A role like txr_repl: REPLICATION and pg_read_all_stats, no table privileges."""
    password = secrets.token_hex(16)
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {RELAY_ROLE}".encode())
        conn.execute(f"CREATE ROLE {RELAY_ROLE} LOGIN REPLICATION PASSWORD '{password}'".encode())
        conn.execute(f"GRANT pg_read_all_stats TO {RELAY_ROLE}".encode())
    yield password
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {RELAY_ROLE}".encode())


def drop_slots(pg: PgShard, region: str) -> None:
    for dsn in (pg.admin_dsn, pg.b_admin_dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            for shard in (SHARD_A, SHARD_B):
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE starts_with(slot_name, %s) AND NOT active",
                    (slot_prefix(region, shard),),
                )


def drop_slot_now(pg: PgShard, region: str, shard: str) -> None:
    """Drop the (region, shard) slot, waiting out the moments the relay holds it."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
            try:
                rows = conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE starts_with(slot_name, %s)",
                    (slot_prefix(region, shard),),
                ).fetchall()
                assert rows, "no slot to drop"
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


@pytest_asyncio.fixture
async def env(
    pg_shard: PgShard,
    relay_role: str,
    redis_server: RedisServer,
    store: ShardStore,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Env]:
    metrics = Metrics("test")
    cache = RegionCache(redis_server.url, metrics)
    region = f"t{uuid.uuid4().hex[:8]}"

    def conninfo(shard: Shard) -> str:
        return make_conninfo(
            host=shard.primary.host,
            port=shard.primary.port,
            dbname=DB_A if shard.name == SHARD_A else DB_B,
            user=RELAY_ROLE,
            password=relay_role,
            connect_timeout=5,
        )

    e = Env(
        pg_shard,
        cache,
        store,
        redis_server,
        region,
        metrics,
        conninfo,
        StaticTopology(static_topology()),
        f"t-{uuid.uuid4().hex[:16]}",
    )
    try:
        yield e
    finally:
        await cache.close()
        drop_slots(pg_shard, region)


async def started(relay: InvalidationRelay) -> InvalidationRelay:
    relay.start()
    await wait_until(lambda: relay.lag(SHARD_A) is not None, CATCH_UP_S, "relay attached")
    return relay


async def test_commits_reach_redis_with_the_full_row(env: Env) -> None:
    relay = await started(env.relay())
    try:
        funding = await env.account(FUNDING_OVERDRAFT)
        accounts = [await env.account() for _ in range(ACCOUNTS)]
        await env.wait_cached(dict.fromkeys(accounts, 1))
        for i, acc in enumerate(accounts):
            await env.transfer(funding, acc, 100 + i)
        versions = await env.db_versions([funding, *accounts])
        await env.wait_cached(versions)
        for acc in accounts:
            row = await env.store.get_account(acc, env.tenant, timeout_s=TIMEOUT_S)
            entry = await env.cache.get(SHARD_EPOCH, acc)
            assert row is not None
            assert entry is not None
            p = entry.payload
            assert set(p) == set(coherence.ACCOUNT_FIELDS)
            assert (p["id"], p["tenant"], p["currency"]) == (acc, env.tenant, "EUR")
            assert (p["balance"], p["version"], p["overdraft_limit"]) == (
                row.balance,
                row.version,
                row.overdraft_limit,
            )
            assert p["metadata"] == {"test": "it's"}
            assert datetime.fromisoformat(p["created_at"]) == row.created_at
        lag = relay.lag(SHARD_A)
        assert lag is not None
        assert lag < 1.0
        assert relay.lag(SHARD_B) is not None, "every shard of the topology has a worker"
        assert relay.lag("no-such-shard") is None
        text = env.metrics.exposition().decode()
        assert f'txr_invalidation_lag_seconds{{region="{env.region}",shard="{SHARD_A}"}}' in text
        assert f'txr_invalidation_lag_bytes{{region="{env.region}",shard="{SHARD_A}"}}' in text
        assert relay.resets(SHARD_A) == 1, "only the first attach (new slot) reset"
    finally:
        await relay.stop()


async def _committer(env: Env, funding: int, accounts: list[int], stop: asyncio.Event) -> int:
    n = 0
    rng = random.Random(1)
    while not stop.is_set():
        await env.transfer(funding, rng.choice(accounts))
        n += 1
    return n


async def test_relay_crash_and_restart_skips_nothing(env: Env) -> None:
    funding = await env.account(FUNDING_OVERDRAFT)
    accounts = [await env.account() for _ in range(ACCOUNTS)]
    relay = await started(env.relay())
    stop = asyncio.Event()
    committer = asyncio.create_task(_committer(env, funding, accounts, stop))
    rng = random.Random(2)
    try:
        for _ in range(15):
            # Cancel the relay at a random point of its rounds (mid-decode, mid-apply, between
            # the Redis apply and the slot advance), then start a fresh one.
            await asyncio.sleep(rng.uniform(0.0, 0.15))
            await relay.stop()
            relay = env.relay()
            relay.start()
    finally:
        stop.set()
        commits = await committer
    try:
        assert commits > 20
        versions = await env.db_versions([funding, *accounts])
        await env.wait_cached(versions)
        cached = await env.assert_never_stale([funding, *accounts])
        assert all(v is not None for v in cached.values())
        assert relay.resets(SHARD_A) == 0, "a restart is continuous: no reset"
    finally:
        await relay.stop()


async def test_redis_restart_drops_or_rebuilds_never_stale(env: Env) -> None:
    funding = await env.account(FUNDING_OVERDRAFT)
    accounts = [await env.account() for _ in range(ACCOUNTS)]
    relay = await started(env.relay())
    try:
        for acc in accounts:
            await env.transfer(funding, acc)
        await env.wait_cached(await env.db_versions(accounts))
        stop = asyncio.Event()
        committer = asyncio.create_task(_committer(env, funding, accounts, stop))
        await asyncio.sleep(0.2)
        env.redis.restart()
        await asyncio.sleep(0.3)
        stop.set()
        await committer
        # A fill of the current row goes through once the relay has re-established the
        # generation; the relay refills everything it delivers after its reset.
        for acc in accounts:
            await env.transfer(funding, acc)
        versions = await env.db_versions([funding, *accounts])
        await env.wait_cached(versions)
        await env.assert_never_stale([funding, *accounts])
        assert relay.resets(SHARD_A) >= 1
    finally:
        await relay.stop()


async def test_slot_dropped_drops_the_shards_entries(env: Env) -> None:
    funding = await env.account(FUNDING_OVERDRAFT)
    accounts = [await env.account() for _ in range(ACCOUNTS)]
    other = (SHARD_B_SLOT_MIN << 48) | 1  # an entry of shard B: must survive
    relay = await started(env.relay())
    try:
        for acc in accounts:
            await env.transfer(funding, acc)
        await env.wait_cached(await env.db_versions(accounts))
        now = datetime.fromisoformat("2024-01-01T00:00:00+00:00")
        payload = coherence.account_payload(
            id=other,
            tenant="x",
            currency="EUR",
            balance=0,
            overdraft_limit=0,
            version=1,
            metadata={},
            created_at=now,
        )
        assert await env.cache.fill(SHARD_EPOCH, other, 1, payload)
        relay.pause(SHARD_A)
        await asyncio.sleep(0.1)
        drop_slot_now(env.pg, env.region, SHARD_A)
        # These commits happen while no slot exists: no relay will ever see them.
        for acc in accounts:
            await env.transfer(funding, acc)
        relay.resume(SHARD_A)
        await wait_until(lambda: relay.resets(SHARD_A) >= 2, CATCH_UP_S, "a reset")
        await wait_until(lambda: relay.lag(SHARD_A) is not None, CATCH_UP_S, "caught up")
        cached = await env.assert_never_stale(accounts)
        assert all(v is None for v in cached.values()), "the shard's entries were dropped"
        assert await env.cache.get(SHARD_EPOCH, other) is not None, "other shard untouched"
    finally:
        await relay.stop()


async def _guard_lag(guard: RelayLag, shard: Shard) -> float:
    lag = await guard.lag(shard)
    return 9.0 if lag is None else lag


async def test_lag_reported_and_grows_when_paused(env: Env) -> None:
    funding = await env.account(FUNDING_OVERDRAFT)
    acc = await env.account()
    # What a router of this region reads: the relay's heartbeats in Redis (router.freshness).
    guard = RelayLag(env.cache, lambda: [SHARD_A])
    shard = env.topology.current.shards[SHARD_A]
    relay = await started(env.relay())
    try:
        await wait_until(lambda: (relay.lag(SHARD_A) or 9.0) < 0.5, CATCH_UP_S, "low lag")
        deadline = time.monotonic() + CATCH_UP_S
        while await _guard_lag(guard, shard) >= 0.5:
            assert time.monotonic() < deadline, "the heartbeat never showed a low lag"
            await asyncio.sleep(0.05)
        other_epoch = dataclasses.replace(shard, epoch=shard.epoch + 1)
        assert guard.lag_now(other_epoch) is None, "a heartbeat of another epoch is no claim"
        relay.pause()
        await asyncio.sleep(0.6)
        paused_lag = relay.lag(SHARD_A)
        assert paused_lag is not None
        assert paused_lag >= 0.5
        # A paused relay publishes nothing: its last heartbeat ages like the relay's own view.
        assert await _guard_lag(guard, shard) >= 0.5
        _, v = await env.transfer(funding, acc)
        await asyncio.sleep(0.2)
        entry = await env.cache.get(SHARD_EPOCH, acc)
        assert entry is None or entry.version < v, "a paused relay applies nothing"
        lag_after = relay.lag(SHARD_A)
        assert lag_after is not None
        assert lag_after > paused_lag
        relay.resume()
        await env.wait_cached({acc: v})
        await wait_until(lambda: (relay.lag(SHARD_A) or 9.0) < 0.5, CATCH_UP_S, "recovered")
        lag_bytes = relay.lag_bytes(SHARD_A)
        assert lag_bytes is not None
        assert lag_bytes >= 0
    finally:
        await relay.stop()


async def test_commit_to_cache_latency(env: Env, record_property: Callable[..., None]) -> None:
    """The measured figure: acknowledged commit -> the new version readable in Redis."""
    funding = await env.account(FUNDING_OVERDRAFT)
    accounts = [await env.account() for _ in range(ACCOUNTS)]
    relay = await started(
        env.relay(poll_interval_s=float(os.environ.get("TXR_TEST_POLL_S", "0.05")))
    )
    samples: list[float] = []
    try:
        for i in range(LATENCY_COMMITS):
            acc = accounts[i % len(accounts)]
            _, v = await env.transfer(funding, acc)
            t0 = time.perf_counter()
            while True:
                e = await env.cache.get(SHARD_EPOCH, acc)
                if e is not None and e.version >= v:
                    break
                await asyncio.sleep(0.0005)
            samples.append(time.perf_counter() - t0)
    finally:
        await relay.stop()
    q = statistics.quantiles(samples, n=100)
    p50, p99 = q[49] * 1000, q[98] * 1000
    record_property("commit_to_cache_p50_ms", round(p50, 2))
    record_property("commit_to_cache_p99_ms", round(p99, 2))
    log.warning("commit -> Redis over %d commits: p50 %.1f ms, p99 %.1f ms", len(samples), p50, p99)
    assert p99 < 1000
