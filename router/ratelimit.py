"""Per-tenant rate limits and account caps on the write routes (API.md "Deadlines, limits").

What it does, in the order a request meets it (``ratelimit_middleware``, inside the edge
middleware so its refusals are rendered as problem+json like every other error):

1. Only ``POST /v1/transfers`` and ``POST /v1/accounts`` are limited, and only for a request
   whose token verifies (an unauthenticated request goes on to its handler's 401/403; the
   verifier caches tokens, so checking twice costs a dictionary lookup).
2. A tenant with a rate in etcd (``txr limits set``) is admitted by GCRA (the generic cell rate
   algorithm, a token bucket kept as one timestamp) in the region's Redis, one Lua call per
   request. Past its limit: 429 ``rate_limited`` with ``Retry-After`` and ``RateLimit-Limit``
   (the burst), ``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds until the burst is whole
   again; on a refusal, until the next request is admitted). Admitted requests carry the same
   three headers. A tenant with no rate set costs no Redis call at all.
3. An account open reserves one unit of the tenant's account counter in etcd first
   (compare-and-swap, consistency.tenant_limits); at the cap: 403 ``account_limit_reached``.
   A refused open (4xx) gives its unit back; an open whose outcome is unknown keeps it (it
   may exist), so the count can only over-state, never let a tenant past its cap.

Limits reach every router by a bounded poll of etcd (``LIMITS_POLL_INTERVAL_S``): a change is
applied within two seconds. When etcd is unreachable the last limits read stay in force.

Redis down (a deliberate choice, fail open to a local bucket): the router admits by an
in-process GCRA with the tenant's rate divided by the region's worker count (the kernel spreads
connections evenly over SO_REUSEPORT workers), re-trying Redis after ``REDIS_RETRY_S``. A tenant
keeps roughly its limit through a Redis outage, the write path keeps working (the ledger is in
PostgreSQL, not Redis), and a restarted, empty Redis just starts the buckets full. The account
cap fails open the same way when etcd is away (logged): it bounds resource use, not money.

The limit is per region: each region's Redis keeps its own buckets, so a tenant spread over
every region may reach up to (regions x rate) in all. Sharing buckets across regions would put
a WAN round trip on every write.

Must never import ``infra``, ``bench`` or ``chaos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.typedefs import Handler

from consistency.errors import EtcdError
from consistency.etcd import EtcdClient
from consistency.tenant_limits import (
    DEFAULT_LIMITS,
    TenantLimits,
    adjust_account_count,
    load_limits,
)
from router.auth import AuthError
from router.errors import ApiError, Forbidden, RateLimited
from router.resources import CONFIG, VERIFIER

log = logging.getLogger("router.ratelimit")

# Routers re-read every tenant's limits this often: a `txr limits set` applies within this plus
# one etcd call (bounded by LIMITS_ETCD_TIMEOUT_S), under the two seconds API.md promises.
LIMITS_POLL_INTERVAL_S: Final = 1.0
LIMITS_ETCD_TIMEOUT_S: Final = 0.8
# One bucket call to the region's Redis (including waiting for a pooled connection). A healthy
# Redis answers in well under a millisecond, but on a loaded two-core machine the router's own
# event loop can take tens of ms to get to the reply; 50 ms sent bursts of requests to the
# local buckets (measured in tests/integration/test_hardening.py). The same bound as a cache
# write after commit (router.limits.CACHE_WRITE_TIMEOUT_S): slower than that, Redis is away.
REDIS_TIMEOUT_S: Final = 0.25
# After a Redis failure the router uses its local buckets this long before trying Redis again,
# so an outage costs one timeout per interval, not one per request.
REDIS_RETRY_S: Final = 1.0
# Connections to Redis for bucket calls per router process (a script call is sub-millisecond).
REDIS_CONNECTIONS_MAX: Final = 16
# Tenants with a local (fallback) bucket per router process; the least recently used is
# dropped first (a dropped bucket starts full again: at most one extra burst).
LOCAL_BUCKETS_MAX: Final = 10_000
# An account open's reservation on the tenant's counter in etcd (one read and one txn).
ACCOUNT_COUNT_TIMEOUT_S: Final = 1.0
# Bucket keys expire this long after the bucket is whole again (nothing left to remember).
BUCKET_KEY_PREFIX: Final = "txr:rl:"

_US_PER_S: Final = 1_000_000

# GCRA: the bucket is one "theoretical arrival time" (tat, microseconds). A request is admitted
# when tat - now <= tolerance (= interval * (burst - 1)); then tat moves one interval on.
# ARGV: interval_us, tolerance_us, now_us ("" = Redis's own clock, shared by every router of
# the region; tests pass a fixed clock). Integers are written with %d: Lua's default number
# format would turn a microsecond timestamp into "1.7e+15" and lose it.
GCRA_SCRIPT: Final = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, 0, tat - tolerance - now, tat - tolerance - now}
end
local new_tat = tat + interval
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', ttl_ms)
local remaining = math.floor((tolerance - (new_tat - now)) / interval) + 1
if new_tat - now > tolerance then remaining = 0 end
return {1, remaining, 0, new_tat - now}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    # Until the next request is admitted (refused) or 0 (admitted), microseconds.
    retry_after_us: int
    # Until the bucket is whole again (admitted) or until the next admission (refused).
    reset_us: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(_ceil_s(self.reset_us)),
        }


def _ceil_s(us: int) -> int:
    return max(0, math.ceil(us / _US_PER_S))


def gcra(
    tat_us: int | None, now_us: int, interval_us: int, tolerance_us: int
) -> tuple[int | None, tuple[int, int, int, int]]:
    """The GCRA step of ``GCRA_SCRIPT`` in Python: ``(new tat or None, (allowed, remaining,
    retry_after_us, reset_us))``. The local buckets use it; the contract tests run both."""
    tat = max(tat_us if tat_us is not None else now_us, now_us)
    if tat - now_us > tolerance_us:
        wait = tat - tolerance_us - now_us
        return None, (0, 0, wait, wait)
    new_tat = tat + interval_us
    ahead = new_tat - now_us
    remaining = 0 if ahead > tolerance_us else (tolerance_us - ahead) // interval_us + 1
    return new_tat, (1, remaining, 0, ahead)


def bucket_params(limits: TenantLimits, share: int = 1) -> tuple[int, int, int]:
    """``(interval_us, tolerance_us, burst)`` for ``limits``, for one of ``share`` buckets."""
    assert limits.rate_per_s is not None
    burst = max(1, limits.effective_burst // share)
    interval = max(1, (_US_PER_S * share) // limits.rate_per_s)
    return interval, interval * (burst - 1), burst


class LocalBuckets:
    """In-process GCRA buckets: the fallback while the region's Redis does not answer."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tat: OrderedDict[str, int] = OrderedDict()

    def admit(
        self, tenant: str, interval_us: int, tolerance_us: int, burst: int, *, limit: int = 0
    ) -> Decision:
        """``limit``: what RateLimit-Limit reports (the tenant's burst; default ``burst``)."""
        now = int(self._clock() * _US_PER_S)
        new_tat, (ok, remaining, retry, reset) = gcra(
            self._tat.get(tenant), now, interval_us, tolerance_us
        )
        if new_tat is not None:
            self._tat[tenant] = new_tat
            self._tat.move_to_end(tenant)
            if len(self._tat) > LOCAL_BUCKETS_MAX:
                self._tat.popitem(last=False)
        return Decision(bool(ok), limit or burst, int(remaining), int(retry), int(reset))


class RedisBuckets:
    """GCRA buckets in the region's Redis, one script call (EVALSHA) per decision."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._script = client.register_script(GCRA_SCRIPT)

    async def admit(
        self,
        tenant: str,
        interval_us: int,
        tolerance_us: int,
        burst: int,
        *,
        now_us: int | None = None,
    ) -> Decision:
        reply: Any = await self._script(
            keys=[BUCKET_KEY_PREFIX + tenant],
            args=[interval_us, tolerance_us, "" if now_us is None else now_us],
        )
        ok, remaining, retry, reset = (int(x) for x in reply)
        return Decision(bool(ok), burst, remaining, retry, reset)


class TenantRateLimited(RateLimited):
    """429 rate_limited with the RateLimit-* headers of the decision."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(
            "this tenant's request rate is past its limit; retry after Retry-After seconds",
            retry_after_s=max(1, _ceil_s(decision.retry_after_us)),
        )
        self.decision = decision

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.decision.headers()}


class AccountLimitReached(Forbidden):
    default_code = "account_limit_reached"


class Limiter:
    """The limits in force (polled from etcd), the buckets, and the account counter."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        etcd: EtcdClient,
        *,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = RedisBuckets(redis_client)
        self._local = LocalBuckets()
        self._etcd = etcd
        self._workers = workers
        self._clock = clock
        self._limits: dict[str, TenantLimits] = {}
        self._redis_down_until = -math.inf

    def limits_of(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, DEFAULT_LIMITS)

    def replace_limits(self, limits: dict[str, TenantLimits]) -> None:
        self._limits = limits

    async def admit(self, tenant: str) -> Decision | None:
        """None when the tenant has no rate limit."""
        limits = self.limits_of(tenant)
        if limits.rate_per_s is None:
            return None
        now = self._clock()
        if now >= self._redis_down_until:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    return await self._redis.admit(tenant, *bucket_params(limits))
            except (aioredis.RedisError, OSError, TimeoutError) as exc:
                self._redis_down_until = now + REDIS_RETRY_S
                log.warning(
                    "rate limit buckets fall back to this process (Redis: %s)",
                    type(exc).__name__,
                )
        # The headers still state the tenant's policy (its burst), not this worker's share.
        return self._local.admit(
            tenant, *bucket_params(limits, self._workers), limit=limits.effective_burst
        )

    async def reserve_account(self, tenant: str) -> bool | None:
        """True: reserved. False: at the cap. None: not counted (etcd away; fail open)."""
        try:
            async with asyncio.timeout(ACCOUNT_COUNT_TIMEOUT_S):
                ok = await adjust_account_count(
                    self._etcd, tenant, 1, cap=self.limits_of(tenant).accounts_max
                )
        except (EtcdError, TimeoutError, OSError) as exc:
            log.warning("account cap not checked (etcd: %s)", type(exc).__name__)
            return None
        if ok is None:
            log.warning("account cap not checked (too many concurrent opens)")
        return ok

    async def release_account(self, tenant: str) -> None:
        try:
            async with asyncio.timeout(ACCOUNT_COUNT_TIMEOUT_S):
                await adjust_account_count(self._etcd, tenant, -1, cap=None)
        except (EtcdError, TimeoutError, OSError) as exc:
            # The count now over-states by one: never lets a tenant past its cap.
            log.warning("account count not released (etcd: %s)", type(exc).__name__)

    async def poll(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                async with asyncio.timeout(LIMITS_ETCD_TIMEOUT_S):
                    self.replace_limits(await load_limits(self._etcd))
                if failing:
                    log.info("tenant limits readable again")
                failing = False
            except (EtcdError, TimeoutError, OSError) as exc:
                if not failing:
                    log.warning("tenant limits not refreshed, last ones stay (%s)", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LIMITS_POLL_INTERVAL_S)


LIMITER = web.AppKey("limiter", Limiter)
_LIMITED_PATHS: Final = frozenset({"/v1/transfers", "/v1/accounts"})


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, web.HTTPException):
        return exc.status
    return 500


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != "POST" or request.path not in _LIMITED_PATHS:
        return await handler(request)
    try:
        principal = request.app[VERIFIER].verify_header(request.headers.get("Authorization"))
    except AuthError:
        return await handler(request)  # the handler answers 401/403
    limiter = request.app[LIMITER]
    decision = await limiter.admit(principal.tenant)
    if decision is not None and not decision.allowed:
        raise TenantRateLimited(decision)
    reserved: bool | None = None
    if request.path == "/v1/accounts" and "accounts:write" in principal.scopes:
        reserved = await limiter.reserve_account(principal.tenant)
        if reserved is False:
            cap = limiter.limits_of(principal.tenant).accounts_max
            raise AccountLimitReached(f"this tenant has reached its cap of {cap} accounts")
    try:
        resp = await handler(request)
    except BaseException as exc:
        # Refused for sure (4xx): nothing was created. Anything else may have created it.
        if reserved and 400 <= _status_of(exc) < 500:
            await limiter.release_account(principal.tenant)
        raise
    if reserved and 400 <= resp.status < 500:
        await limiter.release_account(principal.tenant)
    if decision is not None:
        resp.headers.update(decision.headers())
    return resp


async def _limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    client = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=REDIS_CONNECTIONS_MAX,
            timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
    )
    etcd = EtcdClient(config.etcd_endpoints, timeout_s=LIMITS_ETCD_TIMEOUT_S)
    limiter = Limiter(client, etcd, workers=config.workers)
    app[LIMITER] = limiter
    # Best effort: load the script and open a connection now, so the first limited request
    # does not pay a connect and a NOSCRIPT round trip inside its bound.
    with contextlib.suppress(aioredis.RedisError, OSError, TimeoutError):
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await client.script_load(GCRA_SCRIPT)
    stop = asyncio.Event()
    task = asyncio.create_task(limiter.poll(stop), name="tenant-limits-poll")
    yield
    stop.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.aclose()
    await etcd.close()


def install(app: web.Application) -> None:
    """The one hook ``create_app`` calls: the middleware (inside the edge middleware, so its
    refusals become problem+json) and the limiter's start-up and clean-up."""
    app.middlewares.append(ratelimit_middleware)
    app.cleanup_ctx.append(_limiter_ctx)
