"""The cache-coherence protocol against a real Redis (tests/fixtures/redis.py).

The property under test (G6): once an invalidation (or fill) of version n has returned, no
read of the key ever sees a version below n, whatever fills of older reads race with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from consistency import coherence, ids
from router.cache import CacheEntry, RegionCache
from router.metrics import Metrics
from router.redisconn import CacheUnavailable
from tests.fixtures.redis import RedisServer

pytestmark = pytest.mark.integration

EPOCH: Final = 7
SLOT: Final = 123
RACE_ACCOUNTS: Final = 16
RACE_VERSIONS: Final = 150
RACE_FILLERS_PER_ACCOUNT: Final = 2
MODEL_SEEDS: Final = 10
MODEL_OPS: Final = 150


def account(i: int, slot: int = SLOT) -> int:
    return ids.slot_id_range(slot)[0] | (i + 1)


def row(acc: int, version: int, tenant: str = "t1") -> dict[str, Any]:
    return coherence.account_payload(
        id=acc,
        tenant=tenant,
        currency="EUR",
        balance=version * 10,
        overdraft_limit=0,
        version=version,
        metadata={},
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


@pytest_asyncio.fixture
async def metrics() -> Metrics:
    return Metrics("test")


@pytest_asyncio.fixture
async def cache(redis_server: RedisServer, metrics: Metrics) -> AsyncIterator[RegionCache]:
    c = RegionCache(redis_server.url, metrics)
    try:
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        yield r
    finally:
        await r.aclose()


async def test_fill_invalidate_rules(cache: RegionCache) -> None:
    acc = account(0)
    assert await cache.get(EPOCH, acc) is None
    assert await cache.fill(EPOCH, acc, 3, row(acc, 3))
    assert await cache.get(EPOCH, acc) == CacheEntry(3, row(acc, 3))
    assert not await cache.fill(EPOCH, acc, 3, row(acc, 3)), "same version twice"
    assert not await cache.fill(EPOCH, acc, 2, row(acc, 2)), "older version"
    await cache.invalidate(EPOCH, acc, 3)
    assert await cache.get(EPOCH, acc) == CacheEntry(3, row(acc, 3)), "value at n survives inval n"
    await cache.invalidate(EPOCH, acc, 5)
    assert await cache.get(EPOCH, acc) is None, "tombstone reads as a miss"
    assert not await cache.fill(EPOCH, acc, 4, row(acc, 4)), "tombstone blocks older fills"
    assert await cache.fill(EPOCH, acc, 5, row(acc, 5)), "the tombstone's own version may fill"
    assert await cache.get(EPOCH, acc) == CacheEntry(5, row(acc, 5))
    with pytest.raises(ValueError, match="whole account row"):
        await cache.fill(EPOCH, acc, 6, {"balance": 1})


async def test_ttls_are_bounded(cache: RegionCache, raw: aioredis.Redis) -> None:
    a, b = account(0), account(1)
    await cache.fill(EPOCH, a, 1, row(a, 1))
    await cache.invalidate(EPOCH, b, 2)
    ttl_a = await raw.ttl(coherence.entry_key(EPOCH, a))
    ttl_b = await raw.ttl(coherence.entry_key(EPOCH, b))
    assert 0 < ttl_a <= coherence.ENTRY_TTL_S
    assert 0 < ttl_b <= coherence.TOMBSTONE_TTL_S
    assert coherence.TOMBSTONE_TTL_S > coherence.FILL_AGE_MAX_S


async def test_put_committed_partial_is_a_tombstone(cache: RegionCache) -> None:
    a, b = account(0), account(1)
    await cache.put_committed(EPOCH, {a: (4, {"balance": 40}), b: (2, row(b, 2))})
    assert await cache.get(EPOCH, a) is None
    assert await cache.get(EPOCH, b) == CacheEntry(2, row(b, 2))
    assert not await cache.fill(EPOCH, a, 3, row(a, 3))
    assert await cache.fill(EPOCH, a, 4, row(a, 4))


async def test_put_committed_keeps_payloads_byte_exact_and_versions_per_key(
    cache: RegionCache,
) -> None:
    """The batch write sends its entries as one JSON argument: every row comes back exactly,
    whatever its metadata holds (quotes, backslashes, non-ASCII, an emoji, control characters
    escaped, a 64-bit integer), each key gets its own version, and the forward-only rule still
    refuses an older version within the same call's keys."""
    tricky = {"q": 'say "hi"\\', "u": "Zoë ₹ 😀", "ctl": "a\tb\nc", "big": 2**63 - 1, "n": None}
    accs = [account(i, slot=SLOT + 2) for i in range(5)]
    rows = {acc: dict(row(acc, 3 + i), metadata=tricky) for i, acc in enumerate(accs)}
    await cache.put_committed(EPOCH, {acc: (3 + i, rows[acc]) for i, acc in enumerate(accs)})
    for i, acc in enumerate(accs):
        assert await cache.get(EPOCH, acc) == CacheEntry(3 + i, rows[acc])
    # An older version of one key and a newer of another in one call: only the newer lands.
    older = dict(row(accs[0], 1), metadata={})
    newer = dict(row(accs[1], 9), metadata={})
    await cache.put_committed(EPOCH, {accs[0]: (1, older), accs[1]: (9, newer)})
    assert await cache.get(EPOCH, accs[0]) == CacheEntry(3, rows[accs[0]])
    assert await cache.get(EPOCH, accs[1]) == CacheEntry(9, newer)


async def test_model_random_sequences(cache: RegionCache) -> None:
    """Random operation sequences: Redis agrees with the pure rules in consistency.coherence."""
    for seed in range(MODEL_SEEDS):
        rng = random.Random(seed)
        acc = account(seed, slot=SLOT + 1)
        version: int | None = None
        tomb = False
        for _ in range(MODEL_OPS):
            v = rng.randint(1, 30)
            if rng.random() < 0.5:
                expect = coherence.fill_wins(version, tomb, v)
                assert await cache.fill(EPOCH, acc, v, row(acc, v)) == expect, (seed, v)
                if expect:
                    version, tomb = v, False
            else:
                if coherence.invalidation_wins(version, v):
                    version, tomb = v, True
                await cache.invalidate(EPOCH, acc, v)
            got = await cache.get(EPOCH, acc)
            assert got == (
                None if tomb or version is None else CacheEntry(version, row(acc, version))
            ), (
                seed,
                got,
                version,
                tomb,
            )


async def test_race_old_fills_never_win(cache: RegionCache) -> None:
    """Invalidations of ever newer versions race fills of random older ones, thousands of
    times; a reader checks that nothing ever reads below the last completed invalidation."""
    floor = dict.fromkeys(range(RACE_ACCOUNTS), 0)
    done = asyncio.Event()
    violations: list[str] = []
    rng = random.Random(42)
    fills = 0

    async def committer(i: int) -> None:
        acc = account(i)
        for v in range(1, RACE_VERSIONS + 1):
            # A timed-out call is indeterminate (the relay retries until it lands): retry, and
            # raise the floor only once the invalidation is known to be in.
            while True:
                try:
                    await cache.invalidate(EPOCH, acc, v)
                    break
                except CacheUnavailable:
                    await asyncio.sleep(0.01)
            floor[i] = v
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def filler(i: int, seed: int) -> None:
        acc = account(i)
        r = random.Random(seed)
        nonlocal fills
        while not done.is_set():
            fills += 1
            # A read taken at some earlier point: any version up to the newest committed.
            v = r.randint(1, max(1, min(floor[i] + 1, RACE_VERSIONS)))
            with contextlib.suppress(CacheUnavailable):  # a lost fill is only a later miss
                await cache.fill(EPOCH, acc, v, row(acc, v))
            if r.random() < 0.5:
                await asyncio.sleep(0)

    async def reader() -> None:
        r = random.Random(7)
        while not done.is_set():
            i = r.randrange(RACE_ACCOUNTS)
            before = floor[i]
            try:
                got = await cache.get(EPOCH, account(i))
            except CacheUnavailable:
                continue
            if got is not None and got.version < before:
                violations.append(f"account {i}: read v{got.version} after inval v{before}")

    fillers = [
        asyncio.create_task(filler(i, i * 100 + k))
        for i in range(RACE_ACCOUNTS)
        for k in range(RACE_FILLERS_PER_ACCOUNT)
    ]
    readers = [asyncio.create_task(reader()) for _ in range(2)]
    await asyncio.gather(*(committer(i) for i in range(RACE_ACCOUNTS)))
    done.set()
    await asyncio.gather(*fillers, *readers)
    assert not violations, violations[:5]
    assert fills >= RACE_ACCOUNTS * RACE_VERSIONS, "the fillers raced the invalidations"
    for i in range(RACE_ACCOUNTS):
        got = await cache.get(EPOCH, account(i))
        assert got is None or got.version == RACE_VERSIONS, (i, got)


async def test_slow_read_through_loses_to_tombstone(cache: RegionCache) -> None:
    acc = account(0)
    await cache.drop_shard([])  # a generation exists, as once the relay has run
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow_loader() -> CacheEntry | None:
        started.set()
        await release.wait()
        return CacheEntry(1, row(acc, 1))  # read before version 2 committed

    task = asyncio.create_task(cache.read_through(EPOCH, acc, slow_loader))
    await started.wait()
    await cache.invalidate(EPOCH, acc, 2)
    release.set()
    entry, hit = await task
    assert entry is not None
    assert (entry.version, hit) == (1, False)
    assert await cache.get(EPOCH, acc) is None, "the old read did not overwrite the tombstone"


def misses(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "txr_cache_operations_total", {"region": "test", "op": "get", "result": "miss"}
    )
    return value or 0.0


async def test_read_through_single_flight(cache: RegionCache, metrics: Metrics) -> None:
    acc = account(0)
    await cache.drop_shard([])
    calls = 0
    release = asyncio.Event()

    async def loader() -> CacheEntry | None:
        nonlocal calls
        calls += 1
        await release.wait()
        return CacheEntry(3, row(acc, 3))

    tasks = [asyncio.create_task(cache.read_through(EPOCH, acc, loader)) for _ in range(50)]
    # Release the one load only once every caller has missed (and so joined the flight).
    async with asyncio.timeout(5):
        while misses(metrics) < len(tasks):  # noqa: ASYNC110 - a counter, not an event
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.01)
    release.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    assert all(r == (CacheEntry(3, row(acc, 3)), False) for r in results)
    assert await cache.read_through(EPOCH, acc, loader) == (CacheEntry(3, row(acc, 3)), True)
    assert calls == 1


async def test_fill_fenced_by_drop_and_by_restart(
    cache: RegionCache, redis_server: RedisServer
) -> None:
    a, b = account(0), account(1)
    await cache.drop_shard([])
    for reset in ("drop", "restart"):
        release = asyncio.Event()
        started = asyncio.Event()
        acc = a if reset == "drop" else b

        async def loader(
            acc: int = acc, started: asyncio.Event = started, release: asyncio.Event = release
        ) -> CacheEntry | None:
            started.set()
            await release.wait()
            return CacheEntry(1, row(acc, 1))

        task = asyncio.create_task(cache.read_through(EPOCH, acc, loader))
        await started.wait()
        if reset == "drop":
            await cache.drop_shard([SLOT])
        else:
            redis_server.restart()
        release.set()
        await task
        assert await cache.get(EPOCH, acc) is None, f"fill survived a {reset}"


async def test_drop_shard_drops_only_its_slots(cache: RegionCache) -> None:
    mine = [account(i, slot=10) for i in range(30)]
    other = [account(i, slot=11) for i in range(30)]
    for acc in mine + other:
        await cache.fill(EPOCH, acc, 1, row(acc, 1))
    before = await cache.generation()
    assert await cache.drop_shard([10]) == len(mine)
    assert await cache.generation() != before
    assert all([await cache.get(EPOCH, a) is None for a in mine])
    assert all([await cache.get(EPOCH, a) is not None for a in other])
