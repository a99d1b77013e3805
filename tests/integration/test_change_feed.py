"""The change feed against a real shard (pg_shard: primary + synchronous standby) and three
Redis servers of our own, one per region (redis_servers). Accounts and transfers go through
ShardStore, as in the store tests; the feed runs as a role with only REPLICATION and
pg_read_all_stats, like txr_repl.

Each test uses its own shard name, so its replication slot (txr_feed_<shard>_...) is its own
(the topology maps that name to database txr); slots are dropped at the end so that none keeps
pinning WAL for the rest of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import orjson
import psycopg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from consistency import coherence
from consistency.ids import new_account_id, new_transfer_id
from consistency.topology import Node, Region, Shard, SlotMap, SlotRange, Topology
from infra.local import postgres as pg
from infra.wan import ListenerSpec, Wan, WanConfig
from regionstore import replication
from regionstore.changefeed import repl_slot_prefix
from regionstore.changes import AccountChange
from regionstore.store import CreateAccountCode, ShardStore, TransferCode, TransferItem
from router.cache import RegionCache
from router.feedsink import FEED_REDIS_TIMEOUT_S, FeedEntries, Marker, RegionSink
from router.freshness import RelayLag
from router.metrics import Metrics
from router.redisconn import CacheUnavailable
from router.relays.feed import ShardFeed
from tests.fixtures import PORT_OFFSET
from tests.fixtures.pg import (
    DB_A,
    HOST,
    PRIMARY_PORT,
    SHARD_EPOCH,
    SLOT_EPOCH,
    STANDBY_APP_NAME,
    PgShard,
)
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

TIMEOUT_S: Final = 10.0
# The feed's own catch-up after a restart, a reset or a heal, with a loaded machine's margin.
CATCH_UP_S: Final = 20.0
FEED_ROLE: Final = "txr_feed_test"
FUNDING_OVERDRAFT: Final = 10**15
ACCOUNTS: Final = 8
LATENCY_COMMITS: Final = 200
# Slots below this are the store tests' random picks; ours stay clear of theirs and of 4000+.
OWN_SLOT: Final = 3999
REGIONS: Final = ("r1", "r2", "r3")
# Bound past which an unreachable region stops holding the slot (the tests' short version).
TEST_HOLD_S: Final = 2.0
# A far region behind the WAN emulator (ap-south is 95 ms from us-east under --wan realistic).
FAR_ONE_WAY_MS: Final = 150.0
FAR_COMMITS: Final = 30
FAR_REDIS_PORT: Final = 7596 + PORT_OFFSET
FAR_CONTROL_PORT: Final = 7597 + PORT_OFFSET


class StaticTopology:
    def __init__(self, topology: Topology) -> None:
        self.current = topology


def topology_for(shard: str, epoch: int = SHARD_EPOCH) -> Topology:
    node = Node(f"{shard}@r1", "r1", HOST, PRIMARY_PORT)
    shards = {shard: Shard(shard, "r1", node, (), epoch)}
    slots = SlotMap((SlotRange(0, 4095, shard, SLOT_EPOCH),))
    regions = {r: Region(r, "http://unused") for r in REGIONS}
    return Topology(1, regions, shards, slots)


@dataclass
class Env:
    pg: PgShard
    store: ShardStore
    redis: dict[str, RedisServer]
    caches: dict[str, RegionCache]
    shard: str
    metrics: Metrics
    conninfo: Callable[[Shard], str]
    topology: StaticTopology
    tenant: str
    sinks: list[RegionSink]

    @property
    def epoch(self) -> int:
        return self.topology.current.shards[self.shard].epoch

    def feed(self, *, hold_s: float = 60.0, urls: Mapping[str, str] | None = None) -> ShardFeed:
        """A feed into every region's Redis, directly or through ``urls`` (a WAN link)."""
        dial = {r: self.redis[r].url for r in REGIONS} | dict(urls or {})
        sinks = {r: RegionSink(r, dial[r]) for r in REGIONS}
        self.sinks += sinks.values()

        async def store_for(_: str) -> ShardStore:
            return self.store

        return ShardFeed(
            self.shard,
            region="r1",
            topology=self.topology,
            sinks=sinks,
            conninfo=self.conninfo,
            store_for=store_for,
            metrics=self.metrics,
            hold_s=hold_s,
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

    def item(self, source: int, destination: int, amount: int = 1) -> TransferItem:
        return TransferItem(
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

    async def transfer(self, source: int, destination: int, amount: int = 1) -> tuple[int, int]:
        """Post one transfer; (source version, destination version) after it."""
        (res,) = await self.store.post_transfers(
            SHARD_EPOCH, [self.item(source, destination, amount)], timeout_s=TIMEOUT_S
        )
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

    async def cached(self, region: str, acc: int) -> int | None:
        try:
            e = await self.caches[region].get(self.epoch, acc)
        except CacheUnavailable:
            return None  # a paused server, just resumed: as good as not there yet
        return None if e is None else e.version

    async def assert_never_stale(self, region: str, accounts: list[int]) -> dict[int, int | None]:
        """Every cached account equals the database (call when no commit is in flight)."""
        cached: dict[int, int | None] = {}
        for acc in accounts:
            row = await self.store.get_account(acc, self.tenant, timeout_s=TIMEOUT_S)
            assert row is not None
            entry = await self.caches[region].get(self.epoch, acc)
            cached[acc] = entry.version if entry is not None else None
            if entry is not None:
                assert entry.version == row.version, (region, acc, entry.version, row.version)
                assert entry.payload["balance"] == row.balance
                assert entry.payload["tenant"] == row.tenant
        return cached

    async def wait_cached(
        self,
        versions: dict[int, int],
        regions: tuple[str, ...] = REGIONS,
        timeout_s: float = CATCH_UP_S,
    ) -> None:
        """Until every account is cached at (at least) the given version in every region."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = []
            for r in regions:
                for acc, v in versions.items():
                    got = await self.cached(r, acc)
                    if got is None or got < v:
                        missing.append((r, acc, got, v))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not cached in {timeout_s}s: {missing[:3]}")
            await asyncio.sleep(0.01)

    def slot_confirmed(self) -> int | None:
        with psycopg.connect(self.pg.admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots"
                " WHERE starts_with(slot_name, %s)",
                (repl_slot_prefix(self.shard),),
            ).fetchone()
        return None if row is None or row[0] is None else coherence.parse_lsn(str(row[0]))


async def stop_feed(task: asyncio.Task[None]) -> None:
    """Cancel a feed's task and wait (bounded) until it has stopped."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=TIMEOUT_S)
    if not done:
        for t in asyncio.all_tasks():
            t.print_stack(limit=8)
        raise AssertionError("the feed did not stop when cancelled")


async def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def feed_role(pg_shard: PgShard) -> Iterator[str]:
    """A role like txr_repl: REPLICATION and pg_read_all_stats, no table privileges."""
    password = secrets.token_hex(16)
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {FEED_ROLE}".encode())
        conn.execute(f"CREATE ROLE {FEED_ROLE} LOGIN REPLICATION PASSWORD '{password}'".encode())
        conn.execute(f"GRANT pg_read_all_stats TO {FEED_ROLE}".encode())
    yield password
    with psycopg.connect(pg_shard.admin_dsn, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {FEED_ROLE}".encode())


def drop_repl_slots(pg_: PgShard, shard: str) -> int:
    """Drop the shard's slots, waiting out the moments a stream still holds one."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        with psycopg.connect(pg_.admin_dsn, autocommit=True) as conn:
            try:
                return len(
                    conn.execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                        " WHERE starts_with(slot_name, %s)",
                        (repl_slot_prefix(shard),),
                    ).fetchall()
                )
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


@pytest_asyncio.fixture
async def env(
    pg_shard: PgShard,
    feed_role: str,
    redis_servers: list[RedisServer],
    store: ShardStore,
) -> AsyncIterator[Env]:
    metrics = Metrics("r1")
    shard = f"t{uuid.uuid4().hex[:8]}"
    redis = dict(zip(REGIONS, redis_servers, strict=True))
    caches = {r: RegionCache(redis[r].url, Metrics(r)) for r in REGIONS}

    def conninfo(_: Shard) -> str:
        return make_conninfo(
            host=HOST,
            port=PRIMARY_PORT,
            dbname=DB_A,
            user=FEED_ROLE,
            password=feed_role,
            connect_timeout=5,
        )

    e = Env(
        pg_shard,
        store,
        redis,
        caches,
        shard,
        metrics,
        conninfo,
        StaticTopology(topology_for(shard)),
        f"t-{uuid.uuid4().hex[:16]}",
        [],
    )
    try:
        yield e
    finally:
        for c in caches.values():
            await c.close()
        for s in e.sinks:
            await s.close()
        drop_repl_slots(pg_shard, shard)


@contextlib.asynccontextmanager
async def running(feed: ShardFeed) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(feed.run())
    try:
        await wait_until(
            lambda: all(feed.lag(r) is not None for r in REGIONS), CATCH_UP_S, "feed attached"
        )
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_commits_reach_every_region_with_the_full_row(env: Env) -> None:
    feed = env.feed()
    async with running(feed):
        funding = await env.account(FUNDING_OVERDRAFT)
        accounts = [await env.account() for _ in range(ACCOUNTS)]
        await env.wait_cached(dict.fromkeys(accounts, 1))
        for i, acc in enumerate(accounts):
            await env.transfer(funding, acc, 100 + i)
        versions = await env.db_versions([funding, *accounts])
        await env.wait_cached(versions)
        for r in REGIONS:
            for acc in accounts:
                row = await env.store.get_account(acc, env.tenant, timeout_s=TIMEOUT_S)
                entry = await env.caches[r].get(SHARD_EPOCH, acc)
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
            lag = feed.lag(r)
            assert lag is not None
            assert lag < 1.0
            # What a router of that region reads: the heartbeat in its own Redis.
            guard = RelayLag(env.caches[r], lambda: [env.shard])
            glag = await guard.lag(env.topology.current.shards[env.shard])
            assert glag is not None
            assert glag < 1.0
        text = env.metrics.exposition().decode()
        assert f'txr_feed_lag_seconds{{region="r1",shard="{env.shard}",target="r3"}}' in text
        assert "txr_feed_batch_transactions_count" in text
        assert all(feed.resets[r] == ["full"] for r in REGIONS), "only the first attach reset"


async def test_nothing_applied_past_the_standby_flush(env: Env, pg_shard: PgShard) -> None:
    """G1 before G6: a commit the synchronous standby has not flushed reaches no cache, and the
    heartbeat stops claiming freshness meanwhile."""
    feed = env.feed()
    async with running(feed):
        funding = await env.account(FUNDING_OVERDRAFT)
        acc = await env.account()
        await env.wait_cached({acc: 1})
        await asyncio.to_thread(pg.stop, pg_shard.standby_dir, "fast")
        try:
            # The commit is flushed on the primary and decoded, but waits for the standby.
            call = asyncio.ensure_future(
                env.store.post_transfers(
                    SHARD_EPOCH, [env.item(funding, acc)], timeout_s=CATCH_UP_S
                )
            )
            await asyncio.sleep(2.0)
            assert not call.done()
            for r in REGIONS:
                assert await env.cached(r, acc) == 1, f"{r} applied a commit not yet durable"
                lag = feed.lag(r)
                assert lag is not None
                assert lag > 1.0, "freshness must not advance past the pending commit"
        finally:
            await asyncio.to_thread(pg.start, pg_shard.standby_dir, pg_shard.standby_log)
            await asyncio.to_thread(
                replication.set_sync_standby, pg_shard.admin_dsn, STANDBY_APP_NAME
            )
        (res,) = await call
        assert res.code is TransferCode.OK
        assert res.destination_version is not None
        await env.wait_cached({acc: res.destination_version})
        await wait_until(lambda: (feed.lag("r2") or 9.0) < 1.0, CATCH_UP_S, "fresh again")


async def _committer(env: Env, funding: int, accounts: list[int], stop: asyncio.Event) -> int:
    n = 0
    rng = random.Random(1)
    while not stop.is_set():
        await env.transfer(funding, rng.choice(accounts))
        n += 1
    return n


async def test_decoder_killed_mid_batch_redelivers_and_skips_nothing(env: Env) -> None:
    feed = env.feed()
    task = asyncio.create_task(feed.run())
    await wait_until(lambda: all(feed.lag(r) is not None for r in REGIONS), CATCH_UP_S, "up")
    funding = await env.account(FUNDING_OVERDRAFT)
    accounts = [await env.account() for _ in range(ACCOUNTS)]
    stop = asyncio.Event()
    committer = asyncio.create_task(_committer(env, funding, accounts, stop))
    rng = random.Random(2)
    try:
        for _ in range(12):
            # Cancel the decoder at a random point (mid-stream, between the Redis writes of
            # one batch's regions, before the slot's confirmation), then start a fresh one.
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            await stop_feed(task)
            feed = env.feed()
            task = asyncio.create_task(feed.run())
    finally:
        stop.set()
        commits = await committer
    try:
        assert commits > 20
        versions = await env.db_versions([funding, *accounts])
        await env.wait_cached(versions)
        for r in REGIONS:
            cached = await env.assert_never_stale(r, [funding, *accounts])
            assert all(v is not None for v in cached.values())
            assert feed.resets[r] == [], "a restart is continuous: no reset"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unreachable_region_catches_up_without_holding_others(env: Env) -> None:
    feed = env.feed()
    async with running(feed):
        funding = await env.account(FUNDING_OVERDRAFT)
        accounts = [await env.account() for _ in range(ACCOUNTS)]
        await env.wait_cached(dict.fromkeys(accounts, 1))
        env.redis["r3"].pause()
        try:
            await env.transfer(funding, accounts[0])
            await env.wait_cached(await env.db_versions(accounts[:1]), regions=("r1", "r2"))
            await wait_until(lambda: feed.state("r3") == "behind", CATCH_UP_S, "r3 behind")
            assert feed.lag("r3") is None
            # Held back by r3, every batch would wait for r3's call to time out (the sink's
            # timeout): commits one after the other would take at least that each.
            t0 = time.monotonic()
            for acc in accounts:
                await env.transfer(funding, acc)
                await env.wait_cached(await env.db_versions([acc]), regions=("r1", "r2"))
            assert time.monotonic() - t0 < len(accounts) * FEED_REDIS_TIMEOUT_S / 2
            assert feed.state("r3") == "behind"
        finally:
            env.redis["r3"].resume()
        await env.wait_cached(await env.db_versions([funding, *accounts]))
        await env.assert_never_stale("r3", accounts)
        assert feed.resets["r3"] == ["full"], "caught up from its position, no reset"


async def test_region_past_the_bound_stops_holding_the_slot_and_is_reset(env: Env) -> None:
    feed = env.feed(hold_s=TEST_HOLD_S)
    async with running(feed):
        funding = await env.account(FUNDING_OVERDRAFT)
        accounts = [await env.account() for _ in range(ACCOUNTS)]
        old = await env.account()  # written long before the outage: survives a partial reset
        await env.wait_cached(dict.fromkeys([*accounts, old], 1))
        # The region's last applied commit comes well after ``old`` (past the margin).
        await asyncio.sleep(1.5)
        await env.transfer(funding, accounts[0])
        await env.wait_cached(await env.db_versions([funding, accounts[0]]))
        env.redis["r3"].pause()
        try:
            await wait_until(lambda: feed.state("r3") == "behind", CATCH_UP_S, "r3 behind")
            held = feed.applied("r3")
            assert held is not None
            await asyncio.sleep(TEST_HOLD_S + 0.5)
            for acc in accounts:
                await env.transfer(funding, acc)
            await env.wait_cached(await env.db_versions(accounts), regions=("r1", "r2"))
            await wait_until(
                lambda: (env.slot_confirmed() or 0) > held, CATCH_UP_S, "slot moved on"
            )
        finally:
            env.redis["r3"].resume()
        await wait_until(lambda: len(feed.resets["r3"]) == 2, CATCH_UP_S, "r3 reset")
        assert feed.resets["r3"][1] == "partial"
        cached = await env.assert_never_stale("r3", [funding, old, *accounts])
        assert cached[old] == 1, "an account not written since the region's last commit stays"
        assert all(cached[a] is None for a in accounts), "recently written ones were dropped"
        text = env.metrics.exposition().decode()
        assert 'kind="partial",reason="marker_behind"' in text
        for acc in accounts:
            await env.transfer(funding, acc)
        await env.wait_cached(await env.db_versions(accounts))


async def test_new_repl_slot_and_epoch_keep_other_accounts(env: Env) -> None:
    """What a failover does to the feed (the new primary has no slot, the epoch moves on): only
    the accounts committed after the last confirmed commit lose their entries, in every region;
    every other entry is carried to the new epoch's keys."""
    feed = env.feed()
    task = asyncio.create_task(feed.run())
    try:
        await wait_until(lambda: all(feed.lag(r) is not None for r in REGIONS), CATCH_UP_S, "up")
        funding = await env.account(FUNDING_OVERDRAFT)
        quiet = [await env.account() for _ in range(ACCOUNTS)]
        busy = [await env.account() for _ in range(ACCOUNTS)]
        await env.wait_cached(dict.fromkeys([*quiet, *busy], 1))
        await asyncio.sleep(1.5)  # past the commit-time margin for the quiet accounts
        for acc in busy:
            await env.transfer(funding, acc)
        await env.wait_cached(await env.db_versions(busy))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Written while no decoder runs, then the slot is lost and the epoch bumped.
        for acc in busy:
            await env.transfer(funding, acc)
        assert drop_repl_slots(env.pg, env.shard) == 1
        shard = env.topology.current.shards[env.shard]
        env.topology.current = dataclasses.replace(
            env.topology.current,
            shards={env.shard: dataclasses.replace(shard, epoch=shard.epoch + 1)},
        )
        feed = env.feed()
        task = asyncio.create_task(feed.run())
        await wait_until(
            lambda: all(len(feed.resets[r]) == 1 for r in REGIONS), CATCH_UP_S, "recovered"
        )
        for r in REGIONS:
            assert feed.resets[r] == ["partial"]
            for acc in quiet:
                assert await env.cached(r, acc) == 1, f"{r}: quiet account lost its entry"
            for acc in busy:
                assert await env.cached(r, acc) is None, f"{r}: busy account kept an entry"
        for acc in busy:
            await env.transfer(funding, acc)
        await env.wait_cached(await env.db_versions(busy))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_remote_visibility_latency(env: Env, record_property: Callable[..., None]) -> None:
    """The measured figure: acknowledged commit -> the new version readable in a remote
    region's Redis (no WAN delay here: the decoder's own latency)."""
    feed = env.feed()
    samples: list[float] = []
    async with running(feed):
        funding = await env.account(FUNDING_OVERDRAFT)
        accounts = [await env.account() for _ in range(ACCOUNTS)]
        for i in range(LATENCY_COMMITS):
            acc = accounts[i % len(accounts)]
            _, v = await env.transfer(funding, acc)
            t0 = time.perf_counter()
            while True:
                got = await env.cached("r3", acc)
                if got is not None and got >= v:
                    break
                await asyncio.sleep(0.0005)
            samples.append(time.perf_counter() - t0)
    q = statistics.quantiles(samples, n=100)
    p50, p99 = q[49] * 1000, q[98] * 1000
    record_property("commit_to_remote_cache_p50_ms", round(p50, 2))
    record_property("commit_to_remote_cache_p99_ms", round(p99, 2))
    log.warning(
        "commit -> remote Redis over %d commits: p50 %.1f ms, p99 %.1f ms", len(samples), p50, p99
    )
    assert p99 < 1000


async def test_a_far_region_gets_each_commit_one_way_trip_after_it(env: Env) -> None:
    """Batch calls are pipelined (router.feedsink.OrderedScript): r3's Redis is FAR_ONE_WAY_MS
    away, and a commit reaches it about one one-way trip after its acknowledgement. One call at
    a time made it wait for the answer of the call before it (a commit or a heartbeat) first:
    up to a whole round trip more."""
    wan = Wan(
        WanConfig(
            host=HOST,
            control_port=FAR_CONTROL_PORT,
            latency_ms={("r1", "r3"): FAR_ONE_WAY_MS},
            listeners=(
                ListenerSpec(FAR_REDIS_PORT, "r3", HOST, env.redis["r3"].port, "r1", "redis"),
            ),
            peer_urls={},
        )
    )
    await wan.start()
    samples: list[float] = []
    rng = random.Random(3)
    try:
        feed = env.feed(urls={"r3": f"redis://{HOST}:{FAR_REDIS_PORT}/0"})
        async with running(feed):
            funding = await env.account(FUNDING_OVERDRAFT)
            accounts = [await env.account() for _ in range(ACCOUNTS)]
            await env.wait_cached(dict.fromkeys(accounts, 1))
            for i in range(FAR_COMMITS):
                acc = accounts[i % len(accounts)]
                _, v = await env.transfer(funding, acc)
                t0 = time.perf_counter()
                await env.wait_cached({acc: v}, regions=("r3",), timeout_s=TIMEOUT_S)
                samples.append(time.perf_counter() - t0)
                # The next commit lands while the call that carried this one still waits for
                # its answer (it comes back one more one-way trip later).
                await asyncio.sleep(rng.uniform(0.0, FAR_ONE_WAY_MS / 3000))
    finally:
        await wan.stop()
    p50_ms = statistics.median(samples) * 1000
    log.warning("commit -> Redis %.0f ms away: p50 %.1f ms", FAR_ONE_WAY_MS, p50_ms)
    assert p50_ms < FAR_ONE_WAY_MS + 60, f"p50 {p50_ms:.0f} ms"


async def test_a_batch_is_applied_byte_exact_with_the_version_rule_per_key(env: Env) -> None:
    """FEED_APPLY_SCRIPT takes a batch's entries as one JSON argument (FeedEntries): what a
    region stores is exactly the row's JSON, whatever it holds, and every key keeps its own
    forward-only rule within one call."""
    sink = RegionSink("r2", env.redis["r2"].url)
    env.sinks.append(sink)
    shard, epoch, repl_slot = f"bytes-{uuid.uuid4().hex[:8]}", 7, "txr_feed_bytes"
    await sink.set_marker(shard, Marker(repl_slot, 100, None, epoch))
    accs = [new_account_id(OWN_SLOT) for _ in range(4)]
    odd = {"q": 'say "hi"', "b": "back\\slash", "u": "zł €", "e": "🦀", "n": 2**63 - 1, "c": "\x01"}
    rows = {acc: {"id": acc, "version": 3, "metadata": odd, "i": i} for i, acc in enumerate(accs)}

    async def apply(changes: list[AccountChange], from_lsn: int, to_lsn: int) -> int | str:
        answer = await sink.send_apply(
            shard,
            repl_slot=repl_slot,
            from_lsn=from_lsn,
            to_lsn=to_lsn,
            commit_ts_us=None,
            epoch=epoch,
            entries=FeedEntries.of(epoch, changes),
            heartbeat_age_s=None,
            primary="n1",
            lag_bytes=None,
        )
        return await answer

    written = await apply([AccountChange(a, 3, rows[a]) for a in accs], 100, 200)
    assert written == len(accs)
    client = aioredis.Redis.from_url(env.redis["r2"].url)
    try:
        for acc in accs:
            stored = await client.hget(coherence.entry_key(epoch, acc), "d")
            assert stored == orjson.dumps(rows[acc])
        # One call: an older fill is refused, a newer tombstone wins, a deleted row is skipped.
        newer = {**rows[accs[0]], "version": 9}
        written = await apply(
            [
                AccountChange(accs[0], 9, newer),
                AccountChange(accs[1], 2, {**rows[accs[1]], "version": 2}),
                AccountChange(accs[2], 5, None),
                AccountChange(accs[3], 8, None, deleted=True),
            ],
            200,
            300,
        )
        assert written == 2
        assert await client.hget(coherence.entry_key(epoch, accs[0]), "d") == orjson.dumps(newer)
        assert await client.hget(coherence.entry_key(epoch, accs[1]), "v") == b"3"
        assert await client.hget(coherence.entry_key(epoch, accs[2]), "t") == b"1"
        assert await client.hget(coherence.entry_key(epoch, accs[3]), "v") == b"3"
        # The continuity rule still comes first: a batch from past the marker writes nothing.
        assert await apply([AccountChange(accs[0], 10, newer)], 400, 500) == "marker_behind"
    finally:
        await client.aclose()
