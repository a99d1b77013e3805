"""The change feed's side of a region's Redis: batches, positions, heartbeats, resets.

Beside the request path's client (``router.cache``) and using the same protocol
(``consistency.coherence``): every entry write goes through the forward-only rule. One
``RegionSink`` per target region, in the relay process that runs a shard's decoder
(``router.relays.feed``); a remote region's Redis is reached through the WAN like all
cross-region traffic (the dial mapping of the relay's config).

Each call is one round trip: a batch is one script call (``FEED_APPLY_SCRIPT``: continuity
check, entries, position marker, heartbeat, atomically); a reset is a generation change plus a
sweep; carrying entries to a new shard epoch is a scan plus one script per page.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

from consistency import coherence, ids
from regionstore.changefeed import AccountChange
from router.cache import GENERATION_BYTES, drop_entries
from router.redisconn import CacheUnavailable, pooled_client, redis_unavailable

# One call of the feed (a batch of up to changefeed.BATCH_TXNS_MAX transactions, a page of a
# sweep) must answer within this, or the region counts as unreachable for this batch. Above a
# WAN round trip to the farthest region (~300 ms under --wan realistic) with room for a slow
# Redis; small enough that a partitioned region is noticed in seconds, not minutes.
FEED_REDIS_TIMEOUT_S: Final = 3.0
# Connections per region per relay process: the decoders of the shards whose primary is in this
# region (one call in flight each) plus a sweep.
FEED_REDIS_CONNECTIONS_MAX: Final = 8
# Keys per SCAN step and per delete/copy call when sweeping a shard's entries: large enough to
# sweep a million keys in seconds, small enough that one step never blocks Redis noticeably.
SWEEP_PAGE_KEYS: Final = 1000


_REFUSALS: Final = {-1: "marker_missing", -2: "repl_slot_changed", -3: "marker_behind"}


@dataclass(frozen=True, slots=True)
class FeedEntries:
    """A batch's cache entries, encoded once for every region (``FEED_APPLY_SCRIPT``'s keys
    from the third on and its ARGV[12]): a batch goes to three regions, and building and
    packing its keys and payloads was a fifth of the relay's CPU when done per region."""

    keys: tuple[str, ...]
    items: bytes

    @classmethod
    def of(cls, epoch: int, changes: Iterable[AccountChange]) -> FeedEntries:
        # A deleted row left the shard (a slot move): its new home's feed fills it, and a key
        # shared with that home (same epoch number) must not lose its entry.
        keys, items = coherence.entries_arg(
            epoch, ((c.account_id, c.version, c.row) for c in changes if not c.deleted)
        )
        return cls(tuple(keys), items)


@dataclass(frozen=True, slots=True)
class Marker:
    """A region's position for a shard (coherence: ``txr:feed:{shard}``)."""

    repl_slot: str
    lsn: int
    # Commit time (epoch µs, the primary's clock) of the last transaction applied; None when
    # none was applied since the marker was set.
    commit_ts_us: int | None
    epoch: int | None


class RegionSink:
    def __init__(self, region: str, url: str) -> None:
        self.region = region
        self._redis = pooled_client(
            url, connections=FEED_REDIS_CONNECTIONS_MAX, timeout_s=FEED_REDIS_TIMEOUT_S
        )
        self._apply = self._redis.register_script(coherence.FEED_APPLY_SCRIPT)
        self._copy = self._redis.register_script(coherence.COPY_ENTRIES_SCRIPT)

    async def close(self) -> None:
        await self._redis.aclose()

    async def marker(self, shard: str) -> Marker | None:
        with redis_unavailable(f"redis {self.region}"):
            raw = await self._redis.hmget(
                coherence.position_key(shard), ["slot", "lsn", "ts", "epoch"]
            )
        if raw[0] is None or raw[1] is None:
            return None
        return Marker(
            _text(raw[0]),
            int(_text(raw[1]), 16),
            int(_text(raw[2])) if raw[2] else None,
            int(_text(raw[3])) if raw[3] else None,
        )

    async def set_marker(self, shard: str, marker: Marker) -> None:
        fields: list[str | int] = [
            "slot",
            marker.repl_slot,
            "lsn",
            coherence.lsn_sortable(marker.lsn),
        ]
        if marker.commit_ts_us is not None:
            fields += ["ts", marker.commit_ts_us]
        if marker.epoch is not None:
            fields += ["epoch", marker.epoch]
        key = coherence.position_key(shard)
        with redis_unavailable(f"redis {self.region}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.hset(key, items=list(fields))
                await pipe.execute()

    async def apply(
        self,
        shard: str,
        *,
        repl_slot: str,
        from_lsn: int,
        to_lsn: int,
        commit_ts_us: int | None,
        epoch: int,
        entries: FeedEntries,
        heartbeat_age_s: float | None,
        primary: str,
        lag_bytes: int | None,
    ) -> int | str:
        """One batch (``FEED_APPLY_SCRIPT``) with its ``entries`` (keyed by ``epoch``'s keys).
        Returns the entries written, or why the marker does not prove continuity (nothing
        written: the region must be reset or catch up): ``marker_missing``,
        ``repl_slot_changed`` or ``marker_behind``."""
        keys = [coherence.position_key(shard), coherence.heartbeat_key(shard), *entries.keys]
        args: list[str | int | bytes] = [
            repl_slot,
            coherence.lsn_sortable(from_lsn),
            coherence.lsn_sortable(to_lsn),
            "" if commit_ts_us is None else commit_ts_us,
            epoch,
            coherence.ENTRY_TTL_S,
            coherence.TOMBSTONE_TTL_S,
            "" if heartbeat_age_s is None else f"{max(heartbeat_age_s, 0.0):.6f}",
            primary,
            "" if lag_bytes is None else lag_bytes,
            coherence.HEARTBEAT_TTL_S,
            entries.items,
        ]
        with redis_unavailable(f"redis {self.region}"):
            res = int(await self._apply(keys=keys, args=args))
        return _REFUSALS.get(res, "marker_refused") if res < 0 else res

    async def new_generation(self) -> None:
        """Fence every read-through fill in flight in this region (coherence docstring)."""
        with redis_unavailable(f"redis {self.region}"):
            await self._redis.set(coherence.GENERATION_KEY, secrets.token_hex(GENERATION_BYTES))

    async def drop_shard(self, slots: Collection[int]) -> int:
        """New generation, then delete every entry (any epoch) of ``slots``."""
        await self.new_generation()
        return await drop_entries(self._redis, slots, f"redis {self.region}")

    async def drop_accounts(self, accounts: Collection[int], epochs: Collection[int]) -> int:
        """New generation, then delete these accounts' entries under each of ``epochs``."""
        await self.new_generation()
        keys = [coherence.entry_key(e, a) for a in accounts for e in epochs]
        dropped = 0
        with redis_unavailable(f"redis {self.region}"):
            for i in range(0, len(keys), SWEEP_PAGE_KEYS):
                dropped += int(await self._redis.unlink(*keys[i : i + SWEEP_PAGE_KEYS]))
        return dropped

    async def copy_epoch(
        self, slots: Collection[int], old_epoch: int, new_epoch: int, skip: Collection[int]
    ) -> int:
        """Carry the values of ``slots``' accounts from ``old_epoch``'s keys to ``new_epoch``'s,
        except ``skip`` (accounts the feed cannot prove unchanged). Returns values written."""
        wanted = frozenset(slots)
        skipped = frozenset(skip)
        written = 0
        page: list[str] = []
        pattern = f"{coherence.ENTRY_PREFIX}{old_epoch}:*"
        with redis_unavailable(f"redis {self.region}"):
            async for raw in self._redis.scan_iter(match=pattern, count=SWEEP_PAGE_KEYS):
                parsed = coherence.parse_entry_key(_text(raw))
                if parsed is None or parsed[0] != old_epoch:
                    continue
                account = parsed[1]
                if ids.account_slot(account) not in wanted or account in skipped:
                    continue
                page += [_text(raw), coherence.entry_key(new_epoch, account)]
                if len(page) >= 2 * SWEEP_PAGE_KEYS:
                    written += int(await self._copy(keys=page, args=_ttls()))
                    page = []
            if page:
                written += int(await self._copy(keys=page, args=_ttls()))
        return written


def _ttls() -> list[str | int | bytes]:
    return [coherence.ENTRY_TTL_S, coherence.TOMBSTONE_TTL_S]


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


__all__ = ["CacheUnavailable", "FeedEntries", "Marker", "RegionSink"]
