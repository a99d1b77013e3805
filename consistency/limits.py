"""Bounds shared by every package, each with the reason for its value.

Names carry their unit last (TigerBeetle style). Router-only bounds live in ``router.limits``.
"""

from __future__ import annotations

from typing import Final

# 4096 slots: enough to spread accounts evenly over dozens of shards and to move load in small
# steps, yet small enough that the whole slot map fits in one etcd value (about 60 KiB at worst).
SLOT_COUNT: Final = 4096

# Per-transfer amount bounds (API.md). 10^15 minor units is 10 trillion in a 2-decimal currency:
# larger than any single payment, small enough that thousands of them cannot overflow a bigint.
AMOUNT_MIN: Final = 1
AMOUNT_MAX: Final = 10**15

# An overdraft limit is bounded like an amount so a floor can never overflow a bigint.
OVERDRAFT_LIMIT_MAX: Final = 10**15

# A balance above this is refused as ``balance_limit`` instead of overflowing bigint (2^63 - 1);
# the gap leaves room for one more maximal transfer to be checked without overflow.
BALANCE_ABS_MAX: Final = 2**62

# Idempotency keys: 1-255 printable ASCII characters (API.md).
IDEMPOTENCY_KEY_LEN_MAX: Final = 255

# Free-text reference on a transfer; bounded so a row stays small.
REFERENCE_LEN_MAX: Final = 140

# Account metadata: a small JSON object, bounded in keys and encoded size.
METADATA_KEYS_MAX: Final = 32
METADATA_BYTES_MAX: Final = 4096

# Tenant ids come from the JWT ``sub``; bounded and restricted so they are safe in logs and keys.
TENANT_LEN_MAX: Final = 64

# A consistency token remembers at most this many accounts; older ones drop off first.
TOKEN_ACCOUNTS_MAX: Final = 32

# Entries listing page size (API.md: 1-500).
ENTRIES_PAGE_MIN: Final = 1
ENTRIES_PAGE_MAX: Final = 500
ENTRIES_PAGE_DEFAULT: Final = 50

# Transfers in one call of the batch procedure. The procedure locks every account of the batch
# up front, so a batch bounds how many row locks one transaction holds.
BATCH_ITEMS_MAX: Final = 256

# -- automatic failover (consistency/autofailover.py, infra/controller.py) ---------------------
# A primary (or a synchronous standby) is declared lost only after a majority of regions'
# controllers have each failed to query it for this long without a single success. It sets
# the floor of an automatic failover (goal: writes back within 5 s of a kill -9) and the
# longest pause that must never cause one (GC, SIGSTOP, a slow checkpoint): 2 s leaves about
# 3 s of the goal to the lock, the fence attempt, the promotion and the routers' watch.
FAILOVER_DETECTION_S: Final = 2.0
# At most one automatic failover per shard within this window (VTOrc blocks recoveries for
# 30 s; a minute is wide enough for an operator to look at a shard that failed twice).
FAILOVER_ANTI_FLAP_S: Final = 60.0
# While anything is suspected (a failed probe of its own, a "down" in any region's fresh
# verdict, a decision other than healthy, or a watched connection that just closed), each
# controller queries every primary and synchronous standby this often (on one kept connection
# each: a query, not a new backend per probe). Eight probes per detection time keep the
# measured "unreachable for" within an eighth of it.
PROBE_INTERVAL_S: Final = 0.25
# Idle (everything healthy), a controller does not poll at that rate: it holds a second
# connection to every server (the *sentinel*) that waits in the kernel for the server to speak,
# and a killed server (its backends exit with the postmaster), a crashed host or a cut link
# (the WAN emulator closes the link's connections) closes that socket at once, which wakes the
# round immediately, for every region's controller together. What a closing socket cannot show
# is a hung server (SIGSTOP, a stuck disk): the active probe stays as the backstop for that, at
# the verdict heartbeat, so that every idle round also republishes the verdict (readers need it
# moving within VERDICT_STALE_S). A hang is thereby noticed up to this much later than at the
# fast rate (its failover takes at most FAILOVER_DETECTION_S + this + a fast round); a kill or
# a cut is noticed sooner than before. 0.25 s polling cost a third of an idle cluster's CPU.
# (Defined from the heartbeat below.)
# A sentinel whose server is down (or refused it) dials again this often: its reconnection is
# not what detects anything (the fast probes run meanwhile), it only re-arms the watch.
SENTINEL_RECONNECT_S: Final = 1.0
# TCP keepalives on the controllers' connections (libpq keepalives_*): they cost no user CPU,
# and on a real network they close the socket of a peer host that vanished without a FIN or
# RST, waking the round as a kill does. Idle 2 s, then 1 s apart, 2 missed: about 4 s, a
# backstop behind the active probe (which times out after PROBE_TIMEOUT_S). On this machine
# every remote server is reached through the WAN emulator, whose own kernel answers them.
TCP_KEEPALIVE_IDLE_S: Final = 2
TCP_KEEPALIVE_INTERVAL_S: Final = 1
TCP_KEEPALIVE_COUNT: Final = 2
# One probe: connect plus one query. A SIGSTOPped server accepts the TCP connection and never
# answers, so only this bound turns it into a failed probe. Below the detection time so that a
# single hung probe cannot by itself span it.
PROBE_TIMEOUT_S: Final = 1.0
# Verdicts live under a lease of this TTL, renewed at a publication once a third of it passed:
# a dead controller's verdicts vanish within it. etcd raises a TTL below its minimum (about 1.5
# election timeouts: 3 s) itself. 4 s: a renewal rides on every idle heartbeat (1.5 s apart)
# with a whole slow round of margin before the lease lapses.
VERDICT_LEASE_TTL_S: Final = 4
# A verdict counts only while its publication counter keeps moving: one that has not changed
# for this long (a controller stuck, or cut off from etcd with its lease not yet expired) is
# stale and ignored. A round on a loaded machine (a hung probe's timeout, a few etcd calls,
# the CPU shared with everything else) takes a second or more, and a bound tighter than that
# makes every other region's verdict stale, so no majority ever forms. 3 s (it was 2 s): below
# the lease TTL, so the counter still retires a stuck controller's vote before etcd does; a
# suspicion is republished every round, so failover time does not depend on it. The only
# cost: a controller that stopped keeps its last vote up to a second longer, and that vote was
# its own genuine observation; a majority still needs two regions' observations.
VERDICT_STALE_S: Final = 3.0
# An unchanged verdict is republished this often (a changed one at once): half the staleness
# bound, so a reader sees its counter move at least once per bound even when its own rounds
# and the publisher's are out of step. Each is a raft commit with an fsync on every member.
VERDICT_HEARTBEAT_S: Final = VERDICT_STALE_S / 2
# The idle round both probes and heartbeats (see above), so every idle round republishes.
PROBE_IDLE_INTERVAL_S: Final = VERDICT_HEARTBEAT_S
# The per-shard lock's lease: a controller (or operator command) that dies holding it frees
# it within this TTL; the holder renews it every third of it while it works.
SHARD_LOCK_TTL_S: Final = 6
# How long `txr failover`/`switchover` wait for the shard lock a controller holds.
SHARD_LOCK_WAIT_S: Final = 30.0
# Each etcd call of a controller: short, so that a controller in a minority (its calls time
# out) still probes on time and its verdicts expire rather than lag.
CONTROLLER_ETCD_TIMEOUT_S: Final = 1.0

# -- topology leases (consistency/topology.py EpochConfirmations, consistency/failover_plan.py) --
# A router serves a read from a shard's primary or standby only within this long of the *send*
# time of a linearizable etcd read that showed the shard's epoch it holds. A router cut off from
# etcd's majority therefore stops reading from a deposed primary within it. 1 s: well above a
# quorum read across the WAN (about 2 x 80 ms under --wan realistic), so a lost confirmation or
# two costs nothing, and small against the 5 s failover goal, which pays it once (below).
TOPOLOGY_CONFIRM_S: Final = 1.0
# Each router process confirms every this often: four chances per bound, so one slow or lost
# round never lapses the lease on a healthy cluster.
TOPOLOGY_CONFIRM_INTERVAL_S: Final = TOPOLOGY_CONFIRM_S / 4
# A router confirms only while reads ask for it: after this long without one it stops (an idle
# three-region cluster has 0.10 cores in all; four rounds a second per router cost about 0.05),
# and the next read waits for one round (a quorum read: milliseconds locally, one WAN round
# trip to etcd's leader under --wan realistic).
TOPOLOGY_CONFIRM_IDLE_S: Final = 10.0
# One confirmation round (every etcd endpoint it tries). Past half the bound an answer would be
# nearly worthless (its validity counts from the send), and a shorter bound keeps the rounds
# going on time when the local member hangs in a minority.
TOPOLOGY_CONFIRM_TIMEOUT_S: Final = TOPOLOGY_CONFIRM_S / 2
# A read that woke an idle confirmation loop waits for the round it started: that round's own
# bound, which counts from when the loop gets to run it, plus the wait for the loop (a loaded
# router's event loop: a quarter of the lease). A read that gave up at the round's bound, on a
# timer started before the round's, answered 503 while the round it waited for succeeded.
TOPOLOGY_WAKE_WAIT_S: Final = TOPOLOGY_CONFIRM_TIMEOUT_S + TOPOLOGY_CONFIRM_S / 4
# Clock rate drift between a router's host and the failover actor's host: both measure the bound
# on their own monotonic clocks. Quartz drifts about 1e-4; 10 % also covers the scheduling delay
# of an overloaded router between its lease check and its query to the store.
TOPOLOGY_CONFIRM_DRIFT_S: Final = 0.1 * TOPOLOGY_CONFIRM_S
# What a failover or switchover waits between its epoch CAS and the new primary's first accepted
# write: every router that still believes the old epoch has stopped reading the old primary.
FAILOVER_LEASE_WAIT_S: Final = TOPOLOGY_CONFIRM_S + TOPOLOGY_CONFIRM_DRIFT_S

# -- retention (regionstore/sql/functions/retention.sql, saga.sql) -----------------------------
# An idempotency key (transfers and account opens) is kept as long as a retry with it can
# arrive. txclient retries within one call's deadline (10 s by default), but an
# ``outcome_unknown`` tells the application to retry later with the same key: after its own
# outage, a deploy, or the next run of a daily reconciliation job. A week covers a job that
# missed a weekend; Stripe keeps keys 24 h. A retry after this creates a new transfer.
IDEMPOTENCY_KEY_RETENTION_S: Final = 7 * 86_400
# A settled or reversed outbox row is never delivered again; it is kept as long as the keys, so
# an operator tracing a recent transfer finds its saga history.
OUTBOX_RETENTION_S: Final = 7 * 86_400
# Leg 2 accepts a message only within this long after leg 1 (the MAC covers leg 1's time). A
# message pending that long has paged an operator many times over (the outbox age gauge); it
# stays pending (money in flight, visible to `txr reconcile`) for a human to resolve.
SAGA_DELIVERY_WINDOW_S: Final = 7 * 86_400
# How far two shards' clocks may disagree (NTP keeps them within milliseconds; a day is the
# margin for a badly broken clock, which other alarms catch first).
CLOCK_SKEW_MARGIN_S: Final = 86_400
# An inbox row is kept past the last moment its message can still be delivered: a row pruned
# earlier would let a late re-delivery apply leg 2 twice.
INBOX_RETENTION_S: Final = 10 * 86_400
# Rows of each kind one prune deletes (one short transaction; a full batch runs again on the
# next round), and how often a relay runs one on its outbox loop.
RETENTION_BATCH_MAX: Final = 10_000
RETENTION_INTERVAL_S: Final = 60.0

assert INBOX_RETENTION_S > SAGA_DELIVERY_WINDOW_S + CLOCK_SKEW_MARGIN_S
