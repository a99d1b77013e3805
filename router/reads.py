"""The read policy: which source may answer a read at the level the client asked for (G6).

``strong``: the home primary. ``session``: the region cache if its version is at least the one
in the client's token, else this region's synchronous standby when it is closer than the
primary and new enough, else the primary. ``cached``: the region cache while the region's
change feed is within its lag bound for the shard, else the primary. The cache serves either
level only within that bound. The primary and the standby serve only while this router's view
of the shard's epoch is confirmed (:meth:`ReadPolicy.require_confirmed`): past it the read is
refused (``NothingWritten``, a 503), never answered by a primary that may have been deposed.

No HTTP here: handlers parse the request and render what this returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal, TypeVar

from consistency import coherence, ids
from consistency.topology import Node, Shard
from regionstore.errors import StoreError, StoreOutcomeUnknown, StoreUnavailable
from regionstore.store import AccountRow, ShardStore
from router.cache import CacheEntry, RegionCache
from router.freshness import RelayLag
from router.limits import CACHED_LAG_BOUND_S, RETRY_AFTER_S
from router.outcomes import NothingWritten
from router.redisconn import CacheUnavailable
from router.resolver import Deadline, Resolver
from router.rtt import RttTable

T = TypeVar("T")
# A read on one store: ``fn(store, timeout_s)``.
StoreRead = Callable[[ShardStore, float], Awaitable[T]]
Source = Literal["cache", "standby", "primary"]
# A store call gets at least this long even when the deadline is (nearly) spent: the answer
# may still arrive, and the caller's deadline bounds the request anyway.
READ_TIMEOUT_MIN_S = 0.01


class ReadPolicy:
    def __init__(
        self,
        resolver: Resolver,
        cache: RegionCache,
        relay_lag: RelayLag,
        rtt: RttTable,
        region: str,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._relay_lag = relay_lag
        self._rtt = rtt
        self._region = region

    async def require_confirmed(self, shard: Shard) -> None:
        """Refuse a read of ``shard``'s primary or standbys once this router's view of its epoch
        is past its lease (``TopologyWatcher.confirmed``): cut off from etcd's majority, the
        router cannot know whether the shard failed over, and the node it would read may be a
        deposed primary that still answers reads with what it had. A 503 is the honest answer.

        Writes need no such check: a deposed primary cannot commit without its synchronous
        standby (the node promoted in its place), and the stores refuse stale epochs (G5).
        """
        if not await self._resolver.watcher.ensure_confirmed(shard):
            raise NothingWritten(
                "this region cannot confirm who holds the account's shard (etcd majority "
                "unreachable); nothing stale is served",
                retry_after_s=RETRY_AFTER_S,
            )

    async def primary(
        self, slot: int, op: str, fn: StoreRead[T], deadline: Deadline
    ) -> tuple[T, Shard]:
        """Run a read on the home primary of ``slot``, only while the shard's epoch is
        confirmed (:meth:`require_confirmed`)."""
        resolver = self._resolver
        shard, _ = resolver.topology.route(slot)
        await self.require_confirmed(shard)
        breaker = resolver.breaker(shard.primary)
        refusal = resolver.circuit_open(shard, breaker)
        if refusal is not None:
            raise refusal
        try:
            store = await resolver.stores.for_node(shard.primary)
            value = await resolver.timed(
                shard.name, op, fn(store, max(deadline.remaining(), READ_TIMEOUT_MIN_S))
            )
        except (StoreUnavailable, StoreOutcomeUnknown) as exc:
            resolver.record(breaker, exc, deadline)
            raise NothingWritten(
                "the account's home shard is not reachable", retry_after_s=RETRY_AFTER_S
            ) from exc
        resolver.record(breaker, None, deadline)
        return value, shard

    async def account(
        self, account_id: int, tenant: str, level: str, seen: dict[int, int], deadline: Deadline
    ) -> tuple[AccountRow | None, Shard, Source]:
        """``(row, shard, source)``; ``row`` is None when the tenant has no such account."""
        slot = ids.account_slot(account_id)
        shard, _ = self._resolver.topology.route(slot)

        async def from_primary() -> tuple[AccountRow | None, Shard, Source]:
            async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
                return await store.get_account(account_id, tenant, timeout_s=timeout_s)

            row, home = await self.primary(slot, "get_account", fetch, deadline)
            return row, home, "primary"

        if level == "strong":
            return await from_primary()

        if level == "session":
            needed = seen.get(account_id, 0)
            entry = None
            # A session read from the cache is still a cached read: it must not be older than
            # the lag bound either (G6), or a client that saw only old versions would be served
            # from a cache whose relay died long ago (the chaos kill-relays scenario found it).
            lag = await self._relay_lag.lag(shard)
            if lag is not None and lag <= CACHED_LAG_BOUND_S:
                try:
                    entry = await self._cache.get(shard.epoch, account_id)
                except CacheUnavailable:
                    entry = None  # a Redis outage costs latency, never correctness
            if entry is not None and entry.version >= needed:
                return _visible(entry.payload, tenant), shard, "cache"
            standby = self._closer_local_standby(shard)
            if standby is not None:
                # A standby of a deposed primary is as stale as the primary: same lease rule.
                await self.require_confirmed(shard)
                row = await self._read_standby(standby, account_id, tenant, deadline)
                if row is not None and row.version >= needed:
                    return row, shard, "standby"
            return await from_primary()

        lag = await self._relay_lag.lag(shard)
        if lag is None or lag > CACHED_LAG_BOUND_S:
            return await from_primary()

        async def loader() -> CacheEntry | None:
            # Shared by every caller that misses this key at once (single flight), whoever they
            # are: so it loads the row for no tenant in particular, and each caller's own tenant
            # check happens below (_visible). Loading as the first caller's tenant gave the
            # owner a 404 whenever another tenant asked first (issue 16).
            async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
                return await store.get_customer_account(account_id, timeout_s=timeout_s)

            row, _ = await self.primary(slot, "get_account", fetch, deadline)
            if row is None:
                return None
            return CacheEntry(row.version, _payload(row))

        entry, hit = await self._cache.read_through(shard.epoch, account_id, loader)
        if entry is None:
            return None, shard, "primary"
        return _visible(entry.payload, tenant), shard, "cache" if hit else "primary"

    def _closer_local_standby(self, shard: Shard) -> Node | None:
        table = self._rtt
        for node in shard.standbys:
            if node.region == self._region and table.cost(f"node:{node.name}") < table.cost(
                f"node:{shard.primary.name}"
            ):
                return node
        return None

    async def _read_standby(
        self, node: Node, account_id: int, tenant: str, deadline: Deadline
    ) -> AccountRow | None:
        try:
            store = await self._resolver.stores.for_node(node)
            return await store.get_account(
                account_id, tenant, timeout_s=max(deadline.remaining(), READ_TIMEOUT_MIN_S)
            )
        except StoreError:
            # The standby is only a shortcut; the primary still answers.
            return None


def _payload(row: AccountRow) -> dict[str, Any]:
    return coherence.account_payload(
        id=row.id,
        tenant=row.tenant,
        currency=row.currency,
        balance=row.balance,
        overdraft_limit=row.overdraft_limit,
        version=row.version,
        metadata=row.metadata,
        created_at=row.created_at,
    )


def _visible(payload: dict[str, Any], tenant: str) -> AccountRow | None:
    """The cached row as the caller may see it: another tenant's (or a transit) row is absent."""
    if payload.get("tenant") != tenant:
        return None
    return AccountRow(
        id=int(payload["id"]),
        tenant=str(payload["tenant"]),
        currency=str(payload["currency"]),
        balance=int(payload["balance"]),
        overdraft_limit=int(payload["overdraft_limit"]),
        version=int(payload["version"]),
        metadata=dict(payload["metadata"]),
        created_at=datetime.fromisoformat(str(payload["created_at"])),
    )
