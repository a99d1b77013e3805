"""Per-tenant rate limits and account caps on the write routes (API.md "Deadlines, limits").

What it does, in the order a request meets it (``ratelimit_middleware``, inside the edge
middleware so its refusals are rendered as problem+json like every other error):

1. Only ``POST /v1/transfers`` and ``POST /v1/accounts`` are limited by the middleware, and
   only for a request whose token verifies (an unauthenticated request goes on to its
   handler's 401/403; the verifier caches tokens, so checking twice costs a dictionary lookup).
   ``POST /v1/transfers/batch`` is charged by its handler (``charge``) once the envelope is
   decoded: the middleware cannot know the item count without parsing the body twice.
2. A tenant with a rate in etcd (``txr limits set``) is admitted by GCRA (the generic cell rate
   algorithm, a token bucket kept as one timestamp) in the region's Redis, one Lua call per
   request. Past its limit: 429 ``rate_limited`` with ``Retry-After`` and ``RateLimit-Limit``
   (the burst), ``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds until the burst is whole
   again; on a refusal, until the request would be admitted). Admitted requests carry the same
   three headers. A tenant with no rate set costs no Redis call at all.
   A batch of n items costs n units in one call, all or nothing: when n units are not there
   the whole batch is 429 (nothing applied) and ``RateLimit-Remaining`` says how many are.
   Admitting a prefix of the items instead would make an item's answer depend on where in the
   batch it sits and on what arrived before it. A batch larger than the burst can never be
   admitted; its 429 says so (split it).
3. An account open takes one unit of the tenant's account count in this process's own view
   (``AccountCounts``): the total last read from etcd plus this process's opens not yet
   flushed. At the cap: 403 ``account_limit_reached``. A refused open (4xx) and a replayed
   keyed open (``Idempotent-Replayed``) give their unit back; an open whose outcome is unknown
   keeps it (it may exist). No etcd call on the request path: the poll loop adds each tenant's
   delta to its counter in etcd (one compare-and-swap per tenant with opens per interval) and
   takes every total from a watch of the counters' prefix.

   Overshoot bound (``ACCOUNT_CAP_OVERSHOOT_POLL_INTERVALS``, a deliberate trade: the cap
   bounds resources, not money): each router process decides against a total at most about
   one poll interval old, so the tenant may pass its cap by at most about one poll interval of
   opens per router process (what the others admitted since their last flush), never more than
   (cap - last total read) per process; a process killed without its final flush leaves that
   many opens uncounted. Within one process the cap is exact.

Limits reach every router by a watch of their etcd prefix (``consistency.etcd.PrefixMirror``),
read by the poll loop every ``LIMITS_POLL_INTERVAL_S``: a change is applied within two seconds.
A watch, not a range read per poll: two range reads a second per router process were a third
of an idle cluster's etcd CPU (each through the JSON gateway, the counts' one linearizable).
When etcd is unreachable (the watch broke and its reload fails) the last limits read stay in
force.

Redis down (a deliberate choice, fail open to a local bucket): the router admits by an
in-process GCRA with the tenant's rate divided by the region's worker count (the kernel spreads
connections evenly over SO_REUSEPORT workers), re-trying Redis after ``REDIS_RETRY_S``. A tenant
keeps roughly its limit through a Redis outage, the write path keeps working (the ledger is in
PostgreSQL, not Redis), and a restarted, empty Redis just starts the buckets full. With etcd
away each process keeps refusing at the cap from its own view (the last total read plus its own
opens) and keeps its deltas to flush later; other processes' opens are then unseen.

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
from consistency.etcd import EtcdClient, PrefixMirror
from consistency.tenant_limits import (
    ACCOUNT_COUNT_PREFIX,
    DEFAULT_LIMITS,
    LIMITS_PREFIX,
    TenantLimits,
    add_account_count,
    parse_account_counts,
    parse_limits,
)
from router.auth import AuthError
from router.errors import ApiError, Forbidden, RateLimited
from router.redisconn import REDIS_ERRORS, pooled_client
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
# One tenant's flush of its account delta to etcd (a read and a txn per compare-and-swap
# round), in the poll loop, never on the request path.
ACCOUNT_COUNT_TIMEOUT_S: Final = 1.0
# Stopping a router waits this long for the poll's last round and its final flush (one limits
# read, two flushes and one totals read at their own bounds).
LIMITS_STOP_TIMEOUT_S: Final = 2 * LIMITS_ETCD_TIMEOUT_S + 2 * ACCOUNT_COUNT_TIMEOUT_S
# Tenants flushed at once by one poll (each is its own key: no conflicts among them).
ACCOUNT_FLUSH_CONCURRENCY_MAX: Final = 16
# The account cap's overshoot bound, named for the docs and the tests: a tenant may pass its cap
# by about this many poll intervals of opens per router process (see the module docstring).
ACCOUNT_CAP_OVERSHOOT_POLL_INTERVALS: Final = 1
# Bucket keys expire this long after the bucket is whole again (nothing left to remember).
BUCKET_KEY_PREFIX: Final = "txr:rl:"

_US_PER_S: Final = 1_000_000

# GCRA: the bucket is one "theoretical arrival time" (tat, microseconds). A request of cost n
# (n units: 1, or a batch's items) is admitted when tat - now <= tolerance - (n - 1) * interval
# (tolerance = interval * (burst - 1)); then tat moves n intervals on. A refusal changes nothing.
# ARGV: interval_us, tolerance_us, now_us ("" = Redis's own clock, shared by every router of
# the region; tests pass a fixed clock), cost. Integers are written with %d: Lua's default
# number format would turn a microsecond timestamp into "1.7e+15" and lose it.
# Answer: {allowed, remaining, retry_after_us, reset_us}; on a refusal remaining is what a
# smaller request could still take, and retry_after_us is when n units are there.
GCRA_SCRIPT: Final = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[4])
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allowed_ahead = tolerance - (cost - 1) * interval
if tat - now > allowed_ahead then
  local left = 0
  if tat - now <= tolerance then left = math.floor((tolerance - (tat - now)) / interval) + 1 end
  local wait = tat - now - allowed_ahead
  return {0, left, wait, wait}
end
local new_tat = tat + cost * interval
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
    tat_us: int | None, now_us: int, interval_us: int, tolerance_us: int, cost: int = 1
) -> tuple[int | None, tuple[int, int, int, int]]:
    """The GCRA step of ``GCRA_SCRIPT`` in Python: ``(new tat or None, (allowed, remaining,
    retry_after_us, reset_us))``. The local buckets use it; the contract tests run both."""
    tat = max(tat_us if tat_us is not None else now_us, now_us)
    allowed_ahead = tolerance_us - (cost - 1) * interval_us
    if tat - now_us > allowed_ahead:
        left = 0
        if tat - now_us <= tolerance_us:
            left = (tolerance_us - (tat - now_us)) // interval_us + 1
        wait = tat - now_us - allowed_ahead
        return None, (0, left, wait, wait)
    new_tat = tat + cost * interval_us
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
        self,
        tenant: str,
        interval_us: int,
        tolerance_us: int,
        burst: int,
        cost: int = 1,
        *,
        limit: int = 0,
    ) -> Decision:
        """``limit``: what RateLimit-Limit reports (the tenant's burst; default ``burst``)."""
        now = int(self._clock() * _US_PER_S)
        new_tat, (ok, remaining, retry, reset) = gcra(
            self._tat.get(tenant), now, interval_us, tolerance_us, cost
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
        cost: int = 1,
        *,
        now_us: int | None = None,
    ) -> Decision:
        reply: Any = await self._script(
            keys=[BUCKET_KEY_PREFIX + tenant],
            args=[interval_us, tolerance_us, "" if now_us is None else now_us, cost],
        )
        ok, remaining, retry, reset = (int(x) for x in reply)
        return Decision(bool(ok), burst, remaining, retry, reset)


class TenantRateLimited(RateLimited):
    """429 rate_limited with the RateLimit-* headers of the decision."""

    def __init__(self, decision: Decision, cost: int = 1) -> None:
        if cost > decision.limit:
            detail = (
                f"a batch of {cost} items costs more than this tenant's burst of "
                f"{decision.limit} requests: split it"
            )
        elif cost > 1:
            detail = (
                f"this tenant's request rate leaves fewer than the {cost} units this batch "
                "costs (RateLimit-Remaining); nothing was applied"
            )
        else:
            detail = "this tenant's request rate is past its limit; retry after Retry-After seconds"
        super().__init__(detail, retry_after_s=max(1, _ceil_s(decision.retry_after_us)))
        self.decision = decision

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.decision.headers()}


class AccountLimitReached(Forbidden):
    default_code = "account_limit_reached"


class AccountCounts:
    """One router process's view of every tenant's account count: the totals last read from
    etcd plus this process's own opens not yet flushed. Deciding is a dictionary lookup; only
    ``flush`` and ``read`` (the poll loop) talk to etcd."""

    def __init__(self, etcd: EtcdClient) -> None:
        self._etcd = etcd
        self._mirror = PrefixMirror(etcd, ACCOUNT_COUNT_PREFIX)
        self._total: dict[str, int] = {}
        # Signed: opens admitted here minus refused opens given back, not yet in etcd.
        self._unflushed: dict[str, int] = {}
        # Counts this process wrote since the last read: the watch brings a write back a few
        # milliseconds after it, so a read right after a flush could otherwise lose it.
        self._written: dict[str, int] = {}

    def view(self, tenant: str) -> int:
        return self._total.get(tenant, 0) + self._unflushed.get(tenant, 0)

    def unflushed(self, tenant: str) -> int:
        return self._unflushed.get(tenant, 0)

    def reserve(self, tenant: str, cap: int) -> bool:
        if self.view(tenant) >= cap:
            return False
        self._unflushed[tenant] = self._unflushed.get(tenant, 0) + 1
        return True

    def release(self, tenant: str) -> None:
        self._unflushed[tenant] = self._unflushed.get(tenant, 0) - 1

    def _settle(self, tenant: str, flushed: int) -> None:
        left = self._unflushed.get(tenant, 0) - flushed
        if left:
            self._unflushed[tenant] = left
        else:
            self._unflushed.pop(tenant, None)

    async def _flush_one(self, tenant: str, delta: int, sem: asyncio.Semaphore) -> None:
        # Opens admitted while this flush is away add to the delta; only `delta` is settled.
        async with sem:
            try:
                async with asyncio.timeout(ACCOUNT_COUNT_TIMEOUT_S):
                    new = await add_account_count(self._etcd, tenant, delta)
            except (EtcdError, TimeoutError, OSError) as exc:
                # The outcome is unknown. Err towards over-counting, never under: an increase
                # is kept and sent again (counted twice at worst), a decrease is dropped.
                if delta < 0:
                    self._settle(tenant, delta)
                log.warning("account count of a tenant not flushed (etcd: %s)", type(exc).__name__)
                return
        if new is None:
            log.warning("account count of a tenant not flushed (conflicts), retried next poll")
            return
        self._settle(tenant, delta)
        self._total[tenant] = new
        self._written[tenant] = new

    async def flush(self) -> None:
        """Add every tenant's unflushed delta to its counter in etcd (one CAS per tenant)."""
        sem = asyncio.Semaphore(ACCOUNT_FLUSH_CONCURRENCY_MAX)
        # The deltas as of this call; what is admitted meanwhile goes with the next flush.
        pending = [(t, d) for t, d in self._unflushed.items() if d]
        await asyncio.gather(*(self._flush_one(t, d, sem) for t, d in pending))

    async def read(self) -> None:
        """Every tenant's total as the watch of the counters shows it (one range read when the
        mirror is not synced; EtcdError when etcd does not answer it). A count this process
        wrote since the last read and the watch has not brought back yet counts at the larger
        of the two: the error is always towards over-counting."""
        totals = parse_account_counts(await self._mirror.snapshot())
        for tenant, new in self._written.items():
            totals[tenant] = max(totals.get(tenant, 0), new)
        self._written.clear()
        self._total = totals

    async def close(self) -> None:
        await self._mirror.close()


class Limiter:
    """The limits in force (mirrored from etcd), the buckets, and the account counts."""

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
        self._limits_mirror = PrefixMirror(etcd, LIMITS_PREFIX)
        self._redis_down_until = -math.inf
        self.accounts = AccountCounts(etcd)

    def limits_of(self, tenant: str) -> TenantLimits:
        return self._limits.get(tenant, DEFAULT_LIMITS)

    def replace_limits(self, limits: dict[str, TenantLimits]) -> None:
        self._limits = limits

    async def admit(self, tenant: str, cost: int = 1) -> Decision | None:
        """None when the tenant has no rate limit. ``cost``: units taken, all or none."""
        limits = self.limits_of(tenant)
        if limits.rate_per_s is None:
            return None
        now = self._clock()
        if now >= self._redis_down_until:
            try:
                async with asyncio.timeout(REDIS_TIMEOUT_S):
                    return await self._redis.admit(tenant, *bucket_params(limits), cost)
            except REDIS_ERRORS as exc:
                self._redis_down_until = now + REDIS_RETRY_S
                log.warning(
                    "rate limit buckets fall back to this process (Redis: %s)",
                    type(exc).__name__,
                )
        # The headers still state the tenant's policy (its burst), not this worker's share.
        return self._local.admit(
            tenant, *bucket_params(limits, self._workers), cost, limit=limits.effective_burst
        )

    def reserve_account(self, tenant: str) -> bool:
        """True: one unit taken from this process's view. False: at the cap. No etcd call."""
        return self.accounts.reserve(tenant, self.limits_of(tenant).accounts_max)

    def release_account(self, tenant: str) -> None:
        self.accounts.release(tenant)

    async def refresh(self) -> None:
        """One poll: the limits, then this process's account deltas out, then every total in.
        Raises EtcdError/TimeoutError/OSError when the limits or the totals were not read."""
        async with asyncio.timeout(LIMITS_ETCD_TIMEOUT_S):
            self.replace_limits(parse_limits(await self._limits_mirror.snapshot()))
        await self.accounts.flush()
        async with asyncio.timeout(LIMITS_ETCD_TIMEOUT_S):
            await self.accounts.read()

    async def poll(self, stop: asyncio.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                await self.refresh()
                if failing:
                    log.info("tenant limits readable again")
                failing = False
            except (EtcdError, TimeoutError, OSError) as exc:
                if not failing:
                    log.warning("tenant limits not refreshed, last ones stay (%s)", exc)
                failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LIMITS_POLL_INTERVAL_S)
        # Stopping: what this process admitted since the last poll goes out too (bounded).
        await self.accounts.flush()

    async def close(self) -> None:
        await self._limits_mirror.close()
        await self.accounts.close()


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
    reserved = False
    if request.path == "/v1/accounts" and "accounts:write" in principal.scopes:
        reserved = limiter.reserve_account(principal.tenant)
        if not reserved:
            cap = limiter.limits_of(principal.tenant).accounts_max
            raise AccountLimitReached(f"this tenant has reached its cap of {cap} accounts")
    try:
        resp = await handler(request)
    except BaseException as exc:
        # Refused for sure (4xx): nothing was created. Anything else may have created it.
        if reserved and 400 <= _status_of(exc) < 500:
            limiter.release_account(principal.tenant)
        raise
    # A refusal created nothing; a replay of a keyed open returned an account already counted.
    if reserved and (400 <= resp.status < 500 or "Idempotent-Replayed" in resp.headers):
        limiter.release_account(principal.tenant)
    if decision is not None:
        resp.headers.update(decision.headers())
    return resp


async def charge(request: web.Request, tenant: str, cost: int) -> dict[str, str]:
    """Take ``cost`` units of ``tenant``'s rate for a request the middleware does not see
    (a batch, charged by its item count once decoded): the RateLimit-* headers for the answer,
    or TenantRateLimited (429, nothing taken) when ``cost`` units are not there."""
    decision = await request.app[LIMITER].admit(tenant, cost)
    if decision is None:
        return {}
    if not decision.allowed:
        raise TenantRateLimited(decision, cost)
    return decision.headers()


async def _limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    # No reconnect retry: a GCRA call is not idempotent, so a repeat after a lost answer
    # could charge the tenant twice; one failed call is a fail-open decision instead.
    client = pooled_client(
        config.redis_url,
        connections=REDIS_CONNECTIONS_MAX,
        timeout_s=REDIS_TIMEOUT_S,
        reconnect=False,
    )
    etcd = EtcdClient(config.etcd_endpoints, timeout_s=LIMITS_ETCD_TIMEOUT_S)
    limiter = Limiter(client, etcd, workers=config.workers)
    app[LIMITER] = limiter
    # Best effort: load the script and open a connection now, so the first limited request
    # does not pay a connect and a NOSCRIPT round trip inside its bound; and read the limits
    # and the account totals once, so the first requests are not decided on empty ones.
    with contextlib.suppress(*REDIS_ERRORS):
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await client.script_load(GCRA_SCRIPT)
    with contextlib.suppress(EtcdError, OSError, TimeoutError):
        await limiter.refresh()
    stop = asyncio.Event()
    task = asyncio.create_task(limiter.poll(stop), name="tenant-limits-poll")
    yield
    stop.set()
    # Let the poll end with its final flush; past the bound it is cancelled (those opens are
    # then uncounted: the overshoot the module docstring names for a process that dies).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), LIMITS_STOP_TIMEOUT_S)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await limiter.close()
    await client.aclose()
    await etcd.close()


def install(app: web.Application) -> None:
    """The one hook ``create_app`` calls: the middleware (inside the edge middleware, so its
    refusals become problem+json) and the limiter's start-up and clean-up."""
    app.middlewares.append(ratelimit_middleware)
    app.cleanup_ctx.append(_limiter_ctx)
