"""The cache-coherence protocol of the region caches (DESIGN.md section 5, guarantee G6).

Pure rules and the Redis server-side scripts; the request path's Redis client lives in
``router.cache``, the change feed's fan-out (positions, heartbeats) in ``router.feedsink``.

Entries
    One Redis hash per account under ``txr:acct:{shard epoch}:{account id}``:
    ``{v: version, d: payload}`` (a value) or ``{v: version, t: 1}`` (a tombstone). Keying by
    shard epoch means a failover (new epoch) starts from an empty cache.

The version rule (one script, ``APPLY_SCRIPT``, for fills and invalidations)
    * a fill of version ``n`` writes unless the key holds a value at ``>= n`` or a tombstone at
      ``> n``. A tombstone at exactly ``n`` says "version n committed, value not here"; a fill
      of ``n`` carries exactly that value (every change of an account row bumps its version:
      regionstore migrations), so it may replace it. This is what lets the relay (or a read)
      supply the row after the request path could only record the version.
    * an invalidation at ``n`` writes a tombstone at ``n`` unless the key holds ``>= n``.
    So the version under a key never goes down while the key exists, and a slow fill of an
    older read can never overwrite a newer tombstone or value.

Bounded lifetimes (safety nets, not the correctness mechanism)
    Values live ``ENTRY_TTL_S``. Tombstones live ``TOMBSTONE_TTL_S``: a tombstone only has to
    outlive the fills that started before it, and readers refuse to fill with a read older than
    ``FILL_AGE_MAX_S``, so a tombstone expiring can never let an old read in. Redis must not
    evict keys by memory pressure (``maxmemory-policy noeviction``): an evicted tombstone would
    break that argument.

The generation fence (state loss)
    ``GENERATION_KEY`` holds a random token. It changes whenever this region's cache may have
    lost invalidations: Redis restarted (the key is gone with everything else) or the relay
    dropped a shard's entries because it could not prove it saw every change (slot lost or
    recreated, failover, position marker gone). A read-through fill carries the token it saw
    *before* it read the database and is refused if the token changed: an invalidation lost in
    between can then never be "undone" by a fill of a read taken before the loss.

Feed positions (one per shard in every region's Redis)
    ``txr:feed:{shard}`` = ``{slot: <repl_slot name>, lsn: <16 hex digits>, ts: <commit time,
    epoch µs, of the last transaction applied>, epoch: <shard epoch of the entries>}``: the
    shard's replication slot this region's cache follows and the position up to which every
    change was applied. ``FEED_APPLY_SCRIPT`` applies a batch only while that marker names the
    expected repl_slot at or beyond the batch's start, atomically with moving it forward and
    with the shard's heartbeat ``txr:relay:{shard}`` (router.freshness reads it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final, Literal

import orjson

# Values: a safety net against a missed invalidation (a bug), not the coherence mechanism.
# Five minutes keeps hot accounts cached across bursts without holding cold ones for long.
ENTRY_TTL_S: Final = 300
# A read older than this (from loader start to the fill being sent) is not written to the cache.
# Reads are bounded by the router's read deadline (3 s); the margin covers a slow event loop.
FILL_AGE_MAX_S: Final = 10.0
# Tombstones must outlive every fill that may still be in flight: FILL_AGE_MAX_S plus the Redis
# write timeout, with a wide margin. They are small, so a minute costs nothing.
TOMBSTONE_TTL_S: Final = 60
assert TOMBSTONE_TTL_S > 2 * FILL_AGE_MAX_S

# Versions are compared as Lua numbers (doubles): exact below 2^53, which at one posting per
# microsecond per account is 285 years away.
VERSION_MAX: Final = 2**53 - 1

ENTRY_PREFIX: Final = "txr:acct:"
ENTRY_SCAN_PATTERN: Final = ENTRY_PREFIX + "*"
GENERATION_KEY: Final = "txr:cache:gen"
# The change feed's position per shard in each region's Redis, and the shard's heartbeat there
# (router.freshness reads it).
POSITION_PREFIX: Final = "txr:feed:"
HEARTBEAT_PREFIX: Final = "txr:relay:"
HEARTBEAT_FIELDS: Final = ("through", "epoch", "primary", "lag_bytes")
# A heartbeat no feed refreshed for this long disappears (a shard that left the topology).
# Freshness never depends on it: an old heartbeat already reads as a large lag.
HEARTBEAT_TTL_S: Final = 600
# No generation key at all (a fresh or restarted Redis) is represented by the empty string.
GENERATION_ABSENT: Final = ""

# The payload of a value: the full account row, so that a cached read can check the tenant and
# render the account without touching the database. ``created_at`` is ISO 8601 with offset.
ACCOUNT_FIELDS: Final = (
    "id",
    "tenant",
    "currency",
    "balance",
    "overdraft_limit",
    "version",
    "metadata",
    "created_at",
)

Mode = Literal["fill", "inval"]


def entry_key(shard_epoch: int, account_id: int) -> str:
    return f"{ENTRY_PREFIX}{shard_epoch}:{account_id}"


def parse_entry_key(key: str) -> tuple[int, int] | None:
    """(shard epoch, account id) of an entry key; None for anything else."""
    if not key.startswith(ENTRY_PREFIX):
        return None
    epoch, _, account = key[len(ENTRY_PREFIX) :].partition(":")
    if not (epoch.isdigit() and account.isdigit()):
        return None
    return int(epoch), int(account)


def position_key(shard: str) -> str:
    return POSITION_PREFIX + shard


def heartbeat_key(shard: str) -> str:
    return HEARTBEAT_PREFIX + shard


def account_payload(
    *,
    id: int,
    tenant: str,
    currency: str,
    balance: int,
    overdraft_limit: int,
    version: int,
    metadata: Mapping[str, Any],
    created_at: datetime | str,
) -> dict[str, Any]:
    """The cached payload of an account row. ``created_at``: its timestamp, or that timestamp's
    ``isoformat()`` text already rendered (the change feed renders each distinct one once)."""
    return {
        "id": id,
        "tenant": tenant,
        "currency": currency,
        "balance": balance,
        "overdraft_limit": overdraft_limit,
        "version": version,
        "metadata": dict(metadata),
        "created_at": created_at if isinstance(created_at, str) else created_at.isoformat(),
    }


def check_version(version: int) -> None:
    """Refuse (ValueError) a version the scripts could not compare exactly (``VERSION_MAX``)."""
    if not 1 <= version <= VERSION_MAX:
        raise ValueError(f"version {version} outside 1..{VERSION_MAX}")


def entries_arg(
    shard_epoch: int, entries: Iterable[tuple[int, int, Mapping[str, Any] | None]]
) -> tuple[list[str], bytes]:
    """The entry keys and the one JSON argument of ``APPLY_MANY_SCRIPT`` and
    ``FEED_APPLY_SCRIPT`` for ``(account, version, row)`` triples: a row is filled as its JSON
    text, None is a tombstone at that version. One argument, not three per key: the client
    packs each argument on its own (the scripts' comments say what it cost)."""
    keys: list[str] = []
    items: list[tuple[str, str, str]] = []
    for account, version, row in entries:
        check_version(version)
        keys.append(entry_key(shard_epoch, account))
        if row is None:
            items.append(("inval", str(version), ""))
        else:
            text = orjson.dumps(row if isinstance(row, dict) else dict(row)).decode()
            items.append(("fill", str(version), text))
    return keys, orjson.dumps(items)


def is_full_payload(payload: Mapping[str, Any]) -> bool:
    """True when ``payload`` is a whole account row (only those may be cached as values)."""
    return all(f in payload for f in ACCOUNT_FIELDS)


def fill_wins(current_version: int | None, current_is_tombstone: bool, version: int) -> bool:
    """The fill rule of APPLY_SCRIPT, in Python (documentation and property tests)."""
    if current_version is None:
        return True
    if current_is_tombstone:
        return version >= current_version
    return version > current_version


def invalidation_wins(current_version: int | None, version: int) -> bool:
    """The invalidation rule of APPLY_SCRIPT, in Python."""
    return current_version is None or version > current_version


# -- LSNs ------------------------------------------------------------------------------------

_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_lsn(text: str) -> int:
    m = _LSN_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_sortable(lsn: int) -> str:
    """Fixed-width hex: compares as a string in Lua exactly as the integer does (no doubles)."""
    return f"{lsn:016X}"


# -- the scripts -----------------------------------------------------------------------------

# The one forward-only rule, shared by both scripts. Returns 1 when it wrote, 0 when refused.
# A write leaves exactly {v, d} or {v, t}: it drops only the field the other kind had (the key
# is not deleted and rewritten), so the common case (a newer value over a value, every change
# feed entry of a busy account) costs three calls instead of four, in every region.
_APPLY_FN: Final = """
local function apply(key, mode, ver, payload, ttl, tomb_ttl)
  local cur = redis.call('HMGET', key, 'v', 't')
  local cv = tonumber(cur[1])
  if mode == 'fill' then
    if cv and (cv > ver or (cv == ver and cur[2] ~= '1')) then
      return 0
    end
    if cur[2] then
      redis.call('HDEL', key, 't')
    end
    redis.call('HSET', key, 'v', ver, 'd', payload)
    redis.call('EXPIRE', key, ttl)
    return 1
  end
  if cv and cv >= ver then
    return 0
  end
  if cv and not cur[2] then
    redis.call('HDEL', key, 'd')
  end
  redis.call('HSET', key, 'v', ver, 't', '1')
  redis.call('EXPIRE', key, tomb_ttl)
  return 1
end
"""

# KEYS[1] entry, KEYS[2] generation key.
# ARGV[1] mode ('fill' | 'inval'), ARGV[2] version, ARGV[3] payload ('' for 'inval'),
# ARGV[4] value ttl s, ARGV[5] tombstone ttl s, ARGV[6] '1' to check the generation fence,
# ARGV[7] the generation the writer saw before it read ('' = none existed).
# Returns 1 written, 0 refused by the version rule, -1 refused by the generation fence.
APPLY_SCRIPT: Final = (
    _APPLY_FN
    + """
if ARGV[6] == '1' then
  local gen = redis.call('GET', KEYS[2]) or ''
  if gen ~= ARGV[7] then
    return -1
  end
end
return apply(KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]))
"""
)

# The change feed's batch for one region (router.relays.feed), atomically: the continuity check,
# the entries, the region's position marker and the shard's heartbeat.
# KEYS[1] the shard's position marker (``position_key``), KEYS[2] its heartbeat
# (``heartbeat_key``), KEYS[3..n] entries.
# ARGV[1] repl_slot name, ARGV[2] the stream position this batch starts at (lsn_sortable),
# ARGV[3] the position it brings the region to, ARGV[4] commit time (epoch µs) of its last
# transaction ('' = none in this batch), ARGV[5] shard epoch the entries are keyed by,
# ARGV[6] value ttl, ARGV[7] tombstone ttl, ARGV[8] heartbeat age s ('' = no claim),
# ARGV[9] primary node, ARGV[10] lag bytes ('' = unknown), ARGV[11] heartbeat ttl s, ARGV[12]
# one JSON array with, per entry key i (from 3), [mode, version (decimal string), payload]: the
# same one-argument form as ``APPLY_MANY_SCRIPT`` (and built once per batch for every region).
# Returns the number of entries written, or (nothing written) when the marker does not prove
# that this Redis holds every change up to where the batch starts: -1 missing (Redis lost its
# data), -2 naming another repl_slot (recreated: failover), -3 behind (a batch never arrived).
#
# The heartbeat is stamped with Redis's own clock: ``through`` = Redis time - the age the feed
# reports, so no two hosts compare clocks. Forward-only while the (epoch, primary) it follows is
# the same, so an older decoder overlapping a newer one (a restart) cannot make a fresher claim
# look older; '' as age moves nothing.
FEED_APPLY_SCRIPT: Final = (
    _APPLY_FN
    + """
local m = redis.call('HMGET', KEYS[1], 'slot', 'lsn')
if not m[2] then
  return -1
end
if m[1] ~= ARGV[1] then
  return -2
end
if m[2] < ARGV[2] then
  return -3
end
local items = cjson.decode(ARGV[12])
if #items ~= #KEYS - 2 then
  return redis.error_reply('feed apply: ' .. #items .. ' entries for ' .. (#KEYS - 2) .. ' keys')
end
local ttl, tomb_ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local written = 0
for i, item in ipairs(items) do
  written = written + apply(KEYS[i + 2], item[1], tonumber(item[2]), item[3], ttl, tomb_ttl)
end
if ARGV[3] > m[2] then
  redis.call('HSET', KEYS[1], 'lsn', ARGV[3])
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'ts', ARGV[4])
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cur = redis.call('HMGET', KEYS[2], 'through', 'epoch', 'primary')
local through = ''
if cur[2] == ARGV[5] and cur[3] == ARGV[9] and cur[1] then through = cur[1] end
if ARGV[8] ~= '' then
  local mine = now - tonumber(ARGV[8])
  if through == '' or mine > tonumber(through) then
    through = string.format('%.6f', mine)
  end
end
redis.call('HSET', KEYS[2], 'through', through, 'epoch', ARGV[5], 'primary', ARGV[9],
           'lag_bytes', ARGV[10])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[11]))
return written
"""
)

# Carry entries from one shard epoch's keys to the next (a failover or switchover, whose new
# epoch starts with empty keys) for the accounts the feed proved unchanged since.
# KEYS[1..2n] pairs (old key, new key); ARGV[1] value ttl, ARGV[2] tombstone ttl.
# A value moves through the forward-only rule (a newer write under the new key wins); a
# tombstone is not carried (it only said "not here"). Returns the number of values written.
COPY_ENTRIES_SCRIPT: Final = (
    _APPLY_FN
    + """
local written = 0
for i = 1, #KEYS, 2 do
  local cur = redis.call('HMGET', KEYS[i], 'v', 't', 'd')
  if cur[1] and cur[2] ~= '1' and cur[3] then
    written = written + apply(KEYS[i + 1], 'fill', tonumber(cur[1]), cur[3],
                              tonumber(ARGV[1]), tonumber(ARGV[2]))
  end
end
return written
"""
)

# Many entries at once, no fence (rows straight from a commit): the router's cache write after
# a committed batch, one round trip per batch instead of one per account.
# KEYS[1..n] entries; ARGV[1] value ttl, ARGV[2] tombstone ttl, ARGV[3] one JSON array with,
# per key i, [mode, version (decimal string), payload ('' for 'inval')]. One argument, not three
# per key: the client packs each argument on its own, which cost the router more per committed
# batch than the rest of the write (a 30-account batch: ~150 us packed per argument, ~50 us as
# one). The version stays a string, read by tonumber as the single-entry script reads it.
# Returns the number of keys written.
APPLY_MANY_SCRIPT: Final = (
    _APPLY_FN
    + """
local items = cjson.decode(ARGV[3])
if #items ~= #KEYS then
  return redis.error_reply('apply_many: ' .. #items .. ' entries for ' .. #KEYS .. ' keys')
end
local ttl, tomb_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local written = 0
for i, item in ipairs(items) do
  written = written + apply(KEYS[i], item[1], tonumber(item[2]), item[3], ttl, tomb_ttl)
end
return written
"""
)
