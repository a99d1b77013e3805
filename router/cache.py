"""The region cache path: versioned account entries in this region's Redis.

Entries are hashes ``{v: version, d: payload}`` under ``txr:acct:{shard epoch}:{account id}``.
Every write goes through one server-side script that only moves the version forward, so a slow
writer holding an older version can never overwrite a newer one. Keying by shard epoch means a
failover (new epoch) starts from an empty cache instead of trusting entries from the old
primary's history.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.limits import CACHE_TTL_S, CACHE_WRITE_TIMEOUT_S
from router.metrics import Metrics
from router.tracing import tracer

log = logging.getLogger(__name__)

# KEYS[1] entry key; ARGV[1] version, ARGV[2] payload, ARGV[3] ttl seconds.
# Returns 1 when it wrote, 0 when the cache already held this version or a newer one.
_FILL_FORWARD: Final = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


def entry_key(shard_epoch: int, account_id: int) -> str:
    return f"txr:acct:{shard_epoch}:{account_id}"


class RegionCache:
    def __init__(self, url: str, metrics: Metrics) -> None:
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=CACHE_WRITE_TIMEOUT_S,
            socket_connect_timeout=CACHE_WRITE_TIMEOUT_S,
        )
        self._fill = self._redis.register_script(_FILL_FORWARD)
        self._metrics = metrics

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def put_committed(
        self, shard_epoch: int, versions: Mapping[int, tuple[int, Mapping[str, Any]]]
    ) -> None:
        """Record committed ``{account: (version, payload)}``; best effort, never raises.

        The commit is already durable when this runs, so a Redis failure only costs a later
        cache miss; it must not turn a committed transfer into an error.
        """
        with tracer().start_as_current_span("cache.put_committed"):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for acc, (version, payload) in versions.items():
                        await self._fill(
                            keys=[entry_key(shard_epoch, acc)],
                            args=[version, orjson.dumps(payload), CACHE_TTL_S],
                            client=pipe,
                        )
                    await pipe.execute()
                self._metrics.cache_ops.labels(self._metrics.region, "put", "ok").inc()
            except (RedisError, OSError) as exc:
                self._metrics.cache_ops.labels(self._metrics.region, "put", "error").inc()
                log.warning("cache write after commit failed: %s", type(exc).__name__)

    async def get(self, shard_epoch: int, account_id: int) -> tuple[int, dict[str, Any]] | None:
        raw = await self._redis.hmget(entry_key(shard_epoch, account_id), ["v", "d"])
        if raw[0] is None or raw[1] is None:
            return None
        return int(raw[0]), orjson.loads(raw[1])
