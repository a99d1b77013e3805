"""The read path's freshness guard: how far this region's cache may be behind each shard (G6).

The change feed runs in the relay processes (``python -m router.relays``: the decoder of each
shard next to its primary, ``router.relays.feed``). With every batch it writes, in each region's
Redis, the shard's heartbeat stamped with Redis's clock: the instant up to which every
acknowledged commit of the shard is in that cache, and the (epoch, primary) it follows
(``coherence.FEED_APPLY_SCRIPT``). A router reads every shard's heartbeat and
Redis's clock in one round trip, at most once per ``RELAY_LAG_REFRESH_S``, and between reads
advances that clock with its own monotonic clock. The view is conservative by construction:

* the heartbeat it holds can only be older than the newest one, and elapsed time is added to
  its age, so a cached view over-states the lag, never under-states it;
* the clock reading is taken as of the moment the round trip *started* (earliest possible);
* missing, unknown, or following another epoch or primary than this router's topology: None.

So a dead, paused or partitioned relay makes ``lag`` grow past any bound, and cached reads of
its shards go to the primary once it exceeds ``CACHED_LAG_BOUND_S``. A router that cannot read
Redis keeps its last view, which ages the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consistency.topology import Shard
from router.cache import RegionCache, RelayState
from router.limits import RELAY_LAG_REFRESH_S
from router.redisconn import CacheUnavailable


@dataclass(frozen=True, slots=True)
class _View:
    redis_now: float
    mono: float  # this process's monotonic clock when the round trip that read it started
    states: dict[str, RelayState]


class RelayLag:
    """This region's relay lag per shard, as the read path and ``/v1/admin/status`` see it."""

    def __init__(
        self,
        cache: RegionCache,
        shards: Callable[[], Sequence[str]],
        *,
        refresh_s: float = RELAY_LAG_REFRESH_S,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh interval must be positive")
        self._cache = cache
        self._shards = shards
        self._refresh_s = refresh_s
        self._view: _View | None = None
        # When the last read was attempted (success or not): a Redis outage costs one attempt
        # per interval, not one per request.
        self._attempted = -float("inf")
        self._flight: asyncio.Task[None] | None = None

    async def lag(self, shard: Shard) -> float | None:
        """Seconds the cache may be behind ``shard``; None = unknown (treat as too far)."""
        if time.monotonic() - self._attempted >= self._refresh_s:
            await self._refresh()
        return self.lag_now(shard)

    def lag_now(self, shard: Shard) -> float | None:
        """``lag`` from the view in hand, without refreshing it (metrics, status)."""
        view = self._view
        if view is None:
            return None
        state = view.states.get(shard.name)
        if (
            state is None
            or state.through is None
            or state.epoch != shard.epoch
            or state.primary != shard.primary.name
        ):
            return None
        now = view.redis_now + (time.monotonic() - view.mono)
        return max(0.0, now - state.through)

    def lag_bytes(self, shard: str) -> int | None:
        view = self._view
        state = view.states.get(shard) if view is not None else None
        return state.lag_bytes if state is not None else None

    async def _refresh(self) -> None:
        # Concurrent requests share one round trip; a cancelled request must not cancel it.
        if self._flight is None or self._flight.done():
            self._flight = asyncio.ensure_future(self._read())
        await asyncio.shield(self._flight)

    async def _read(self) -> None:
        started = time.monotonic()
        self._attempted = started
        try:
            redis_now, states = await self._cache.relay_states(self._shards())
        except CacheUnavailable:
            return  # keep the last view: it only grows older
        self._view = _View(redis_now, started, states)
