"""GCRA buckets: the in-process fallback and the Redis script pass the same contract on a fake
clock (requests of cost 1 and batches of cost n); the limiter falls back to local buckets
(still limiting) when Redis does not answer; the account cap is decided from the process's own
view without etcd, and its flushes err towards over-counting."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from consistency.etcd import EtcdClient
from consistency.tenant_limits import LimitsError, TenantLimits
from router.ratelimit import (
    REDIS_RETRY_S,
    Decision,
    Limiter,
    LocalBuckets,
    RedisBuckets,
    TenantRateLimited,
    bucket_params,
)
from tests.fixtures.redis import RedisServer

S = 1_000_000  # microseconds
Admit = Callable[[str, int, int, int, int, int], Awaitable[Decision]]


async def _contract(admit: Admit) -> None:
    """rate 2/s, burst 3, from an idle bucket at t = 1000 s."""
    limits = TenantLimits(rate_per_s=2, burst=3)
    interval, tolerance, burst = bucket_params(limits)
    assert (interval, tolerance, burst) == (S // 2, S, 3)
    t0 = 1000 * S

    async def at(t: int, tenant: str = "a", cost: int = 1) -> Decision:
        return await admit(tenant, interval, tolerance, burst, t, cost)

    got = [await at(t0) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.remaining for d in got] == [2, 1, 0, 0]
    assert all(d.limit == 3 for d in got)
    # Whole again 1.5 s after the third admission; the refusal waits one interval.
    assert got[2].reset_us == 3 * interval
    assert got[3].retry_after_us == interval
    assert got[3].headers() == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "1",
    }
    # A refusal costs nothing: just before the interval still refused, at it admitted.
    assert not (await at(t0 + interval - 1)).allowed
    assert (await at(t0 + interval)).allowed
    assert not (await at(t0 + interval)).allowed
    # Another tenant has its own bucket.
    assert (await at(t0, tenant="b")).remaining == 2
    # Idle long enough, the bucket is whole again (never more than the burst).
    later = [await at(t0 + 60 * S) for _ in range(4)]
    assert [d.allowed for d in later] == [True, True, True, False]

    # A batch costs its item count, all or nothing (tenant "c", idle, burst 3).
    d = await at(t0, "c", cost=2)
    assert (d.allowed, d.remaining, d.reset_us) == (True, 1, 2 * interval)
    # Two more are not there: refused whole, nothing taken; Remaining says what is left, and
    # Retry-After is when two would be.
    d = await at(t0, "c", cost=2)
    assert (d.allowed, d.remaining, d.retry_after_us) == (False, 1, interval)
    d = await at(t0 + interval, "c", cost=2)
    assert (d.allowed, d.remaining) == (True, 0)
    assert not (await at(t0 + interval, "c")).allowed
    # More than the burst is never admitted, not even from a whole bucket (tenant "d").
    d = await at(t0, "d", cost=4)
    assert (d.allowed, d.remaining) == (False, 3)
    assert d.retry_after_us > 0
    d = await at(t0, "d", cost=3)
    assert (d.allowed, d.remaining) == (True, 0)


async def test_local_buckets_pass_the_contract() -> None:
    now = [0.0]
    local = LocalBuckets(clock=lambda: now[0])

    async def admit(
        tenant: str, interval: int, tolerance: int, burst: int, t: int, cost: int
    ) -> Decision:
        now[0] = t / S
        return local.admit(tenant, interval, tolerance, burst, cost)

    await _contract(admit)


@pytest.mark.integration
async def test_redis_script_passes_the_same_contract(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        buckets = RedisBuckets(client)

        async def admit(
            tenant: str, interval: int, tolerance: int, burst: int, t: int, cost: int
        ) -> Decision:
            return await buckets.admit(tenant, interval, tolerance, burst, cost, now_us=t)

        await _contract(admit)
        # Redis's own clock (what the routers use) admits a fresh tenant at once.
        d = await buckets.admit("fresh", *bucket_params(TenantLimits(rate_per_s=5)))
        assert d.allowed
        assert d.remaining == 4
        # The bucket key expires once it would be whole again.
        ttl_ms = await client.pttl("txr:rl:fresh")
        assert 0 < ttl_ms <= 201
    finally:
        await client.aclose()


async def test_redis_down_falls_back_to_a_local_bucket_that_still_limits() -> None:
    # Nothing listens on port 1: every Redis call fails at once.
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    mono = [0.0]
    etcd = EtcdClient(["http://127.0.0.1:1"])  # never called: no account opens here
    limiter = Limiter(client, etcd, workers=2, clock=lambda: mono[0])
    try:
        assert await limiter.admit("t") is None  # no limit set: no bucket at all
        limiter.replace_limits({"t": TenantLimits(rate_per_s=10, burst=4)})
        got = [await limiter.admit("t") for _ in range(4)]
        # Two workers share the region's limit while Redis is away: burst 4 -> 2 per worker.
        assert [d.allowed for d in got if d is not None] == [True, True, False, False]
        assert got[0] is not None
        # The headers state the tenant's policy, not the worker's share.
        assert got[0].limit == 4
        # Redis is tried again only after REDIS_RETRY_S, not on every request.
        mono[0] += REDIS_RETRY_S
        assert (await limiter.admit("t")) is not None
        # A batch through the local bucket costs its items too (a fresh tenant: burst 2 each).
        limiter.replace_limits({"u": TenantLimits(rate_per_s=10, burst=4)})
        refused = await limiter.admit("u", 3)
        assert refused is not None
        assert (refused.allowed, refused.remaining) == (False, 2)
        ok = await limiter.admit("u", 2)
        assert ok is not None
        assert ok.allowed
    finally:
        await client.aclose()
        await etcd.close()


def test_a_refused_batch_says_why() -> None:
    short = TenantRateLimited(Decision(False, 5, 2, 1_500_000, 1_500_000), cost=4)
    assert short.status == 429
    assert "RateLimit-Remaining" in short.headers()
    assert short.headers()["Retry-After"] == "2"
    assert "nothing was applied" in short.detail
    assert "split it" in TenantRateLimited(Decision(False, 5, 5, 1, 1), cost=6).detail


async def test_the_account_cap_is_decided_without_etcd_and_flushes_over_count() -> None:
    # etcd unreachable (nothing on port 1): the request path must not need it at all.
    client = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05)
    etcd = EtcdClient(["http://127.0.0.1:1"], timeout_s=0.05)
    limiter = Limiter(client, etcd)
    try:
        limiter.replace_limits({"t": TenantLimits(accounts_max=3)})
        # Not a coroutine: deciding is a lookup in this process's view, no etcd round trip.
        got = [limiter.reserve_account("t") for _ in range(4)]
        assert got == [True, True, True, False]
        # A refused open gives its unit back: one more fits, then the cap holds again.
        limiter.release_account("t")
        assert limiter.reserve_account("t")
        assert not limiter.reserve_account("t")
        # Another tenant has its own count (and the default cap).
        assert limiter.reserve_account("other")
        # etcd away: a flush fails, the opens stay counted here and are sent again later.
        await limiter.accounts.flush()
        assert limiter.accounts.unflushed("t") == 3
        assert limiter.accounts.view("t") == 3
        assert not limiter.reserve_account("t")
        # A give-back whose flush fails (outcome unknown) is dropped, never sent twice: the
        # count may over-state, never under-state. Opens stay.
        limiter.release_account("t")
        limiter.release_account("t")
        limiter.release_account("t")
        limiter.release_account("t")
        await limiter.accounts.flush()
        assert limiter.accounts.unflushed("t") == 0
        assert limiter.accounts.view("t") == 0
    finally:
        await client.aclose()
        await etcd.close()


def test_limits_are_bounded() -> None:
    assert TenantLimits().rate_per_s is None
    assert TenantLimits(rate_per_s=7).effective_burst == 7
    for bad in (
        {"rate_per_s": 0},
        {"rate_per_s": 10**9},
        {"burst": 3},
        {"rate_per_s": 1, "burst": 0},
        {"accounts_max": 0},
    ):
        with pytest.raises(LimitsError):
            TenantLimits(**bad)  # type: ignore[arg-type]
    assert TenantLimits.from_json({"rate": 3, "burst": None, "accounts_max": None}).accounts_max
    with pytest.raises(LimitsError):
        TenantLimits.from_json({"rate": "3"})
