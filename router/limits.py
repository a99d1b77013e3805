"""Bounds of the router, each with the reason for its value (TigerBeetle style)."""

from __future__ import annotations

from typing import Final

# Request bodies are small JSON documents; anything larger is refused before parsing.
BODY_BYTES_MAX: Final = 16 * 1024
# A successful request is logged (INFO) only when it took at least this long; refused and
# failed ones always are. An in-region write takes a few ms, so this catches queueing, a slow
# commit or a failover wait, not the normal case (which /metrics counts and times).
ACCESS_LOG_SLOW_MS: Final = 250.0
# At most this many access lines per second per worker; the rest are counted and the next line
# says how many were left out. Past saturation every request is slow, and a line for each was
# 10 % of the router's CPU exactly when it had none to spare (py-spy, issue 11).
ACCESS_LOG_LINES_PER_S_MAX: Final = 50

# Router worker processes per region, sharing the port through SO_REUSEPORT (the kernel spreads
# connections). One Python process is bound by one core, but on the two-core reference machine
# the primary, its standby, Redis, the relays and the load generator share those cores: a
# second worker measured no faster (interleaved runs, README Performance), and each worker
# batches alone (smaller batches), so one is the default. More pay on more cores. The bound
# keeps a typo from starting hundreds of processes, each with its own database pools.
ROUTER_WORKERS: Final = 1
ROUTER_WORKERS_MAX: Final = 16

# A write must finish (commit acknowledged by the synchronous standby) within this deadline or
# the client gets 504 outcome_unknown. With --wan realistic a commit waits up to one 190 ms RTT
# plus a cross-region hop; five seconds leaves room for a retry after a topology refresh.
WRITE_DEADLINE_S: Final = 5.0
# Reads give up sooner: a read can always be retried without ambiguity.
READ_DEADLINE_S: Final = 3.0
# On stale_epoch / wrong_shard the router refreshes the topology and retries once; a second
# refusal means the control plane is mid-change and the client should come back shortly.
STALE_RETRIES_MAX: Final = 1
# A new account id clashing with an existing one (48 random bits per slot) is retried this many
# times before giving up; two clashes in a row would point to a broken random source.
ACCOUNT_ID_RETRIES_MAX: Final = 3
# Retry-After (seconds) on 503 region_unavailable.
RETRY_AFTER_S: Final = 1

# Connection pools per shard primary. Two cores serve three regions locally, so pools are small;
# each connection to a remote primary costs a handshake across the WAN, so keep a warm minimum.
POOL_MIN: Final = 2
POOL_MAX: Final = 16
# Opening a pool to a primary never blocks startup longer than this; the pool keeps trying.
POOL_OPEN_TIMEOUT_S: Final = 5.0
# Loading the topology at startup: a router with no topology cannot route, so it waits for etcd
# this long before exiting with an error.
TOPOLOGY_INITIAL_TIMEOUT_S: Final = 30.0

# A cache write after commit is best effort: the commit is already durable, so a slow Redis must
# not delay the answer by more than this.
CACHE_WRITE_TIMEOUT_S: Final = 0.25

# After leg 1 of a cross-shard transfer the router delivers leg 2 itself and waits this long
# for the settle mark before answering ``pending``. Under --wan realistic leg 2 plus the settle
# mark cost two cross-region round trips and two synchronous commits (up to about 0.8 s).
INLINE_SETTLE_WAIT_S: Final = 1.0
# The relays leave a cross-shard transfer to the router that posted it for this long (it
# delivers leg 2 inline); past it they take over, e.g. when that router died after leg 1.
RELAY_GRACE_S: Final = INLINE_SETTLE_WAIT_S + 1.0
# Inline deliveries still running in the background per router; past this, new cross-shard
# transfers answer ``pending`` at once and leave delivery to the relays.
INLINE_DELIVERIES_MAX: Final = 256

# A write whose home primary is unreachable waits this long (within its deadline) for an
# operator's failover to publish a new primary, then goes there; otherwise 503. An operator
# failover takes seconds, so most writes caught in one see a retry, not an error.
FAILOVER_BUFFER_S: Final = 3.0
# Writes held at once per router while waiting for a new primary; past this, 503 at once so a
# dead shard cannot pile up every connection of the router.
FAILOVER_BUFFERED_MAX: Final = 512
# A write follows at most this many primary changes before giving up.
FAILOVER_WAITS_MAX: Final = 1

# Batching (router.batcher). A batch's size is bounded by the procedure's own bound
# (consistency.limits.BATCH_ITEMS_MAX); 64 keeps one batch's row locks and its commit short.
BATCH_SIZE_MAX: Final = 64
# Batches of one shard in flight at once. Two overlap one batch's commit wait with the next
# batch's work; more only adds lock waits on hot accounts (they lock in the same order, so
# they queue but never deadlock).
BATCH_INFLIGHT_MAX: Final = 2
# While a shard is busy, a new batch waits at most this long for followers. Idle shards never
# linger: the first transfer leaves at once.
BATCH_LINGER_US: Final = 200
# Transfers queued per shard beyond those in flight: the high-water mark. Past it the router
# sheds new writes at once (503 region_unavailable, Retry-After) instead of queueing them: 64
# batches of backlog is already seconds of work for one shard, and a longer queue would only
# make every admitted write slower (issue 16, "Overload").
BATCH_QUEUE_ITEMS_MAX: Final = 4096
# The second shedding signal, by time rather than count (CoDel's: a standing queue, not a
# burst): while the oldest transfer still queued for a shard has waited longer than the
# shard's queue-delay target, new writes for that shard are shed the same way. The target is
# BATCH_QUEUE_DELAY_ROUNDS batch calls of that shard (the moving average of its measured call
# time, router.batcher), clamped to [BATCH_QUEUE_DELAY_MIN_S, BATCH_QUEUE_DELAY_MAX_S]. Rounds,
# not seconds, because a queue drains in batch rounds: with BATCH_INFLIGHT_MAX batches in
# flight an item that waited four calls has seen the shard behind its arrivals for about
# eight batches, whatever the machine's speed (a quiet machine's local batch takes a few ms,
# a loaded one's 30-200 ms, one to a remote primary under --wan realistic one 190 ms RTT).
# Measured (README "Overload"): with the former fixed 2 s bound the Python open-loop
# generator's 512 connections filled before the queue's oldest item reached 2 s, so nothing
# was shed, the generator's own pool became the queue (p50 4.2 s at 150 %, p99 5.5 s), and
# goodput fell to 53 % of saturation.
BATCH_QUEUE_DELAY_ROUNDS: Final = 4
# The floor: a tenant's bursts shorter than this are queued, never shed (a 1,000-item batch
# request takes several rounds to drain); about the p99 at 50 % load on a quiet machine (open
# loop, 139-175 ms in the first round's runs), so admitted writes stay within 3x of it (issue
# 16's goal). The target sheds only tenants with items queued (router.batcher): another
# tenant's write joins the next batch, round-robin, and is shed only past the ceiling.
BATCH_QUEUE_DELAY_MIN_S: Final = 0.25
# The ceiling, whatever the calls take: under half of WRITE_DEADLINE_S, so a write that was
# admitted still has time to commit.
BATCH_QUEUE_DELAY_MAX_S: Final = 2.0
# Weight of the newest call in the moving average of a shard's batch call time: about the last
# ten batches, so one slow commit moves the target little and a slower shard within a second.
BATCH_CALL_EWMA_WEIGHT: Final = 0.1
# Fair queuing: one tenant may hold at most this fraction of a shard's queue (past it, 429
# rate_limited with Retry-After for that tenant while others still get in). A quarter keeps
# room for at least three more tenants at full share, and still fits one whole batch request
# (TRANSFER_BATCH_ITEMS_MAX items) of a single tenant. Batches are formed round-robin over
# the tenants that have items queued, so a tenant's backlog never delays another's next batch.
BATCH_QUEUE_TENANT_SHARE: Final = 0.25
# Retry-After (seconds) when a write is shed for overload or for its tenant's queue share: one
# second is several batch rounds, long enough for the queue to drain, short for a client.
OVERLOAD_RETRY_AFTER_S: Final = 1

# -- Request-Timeout (API.md "Deadlines, limits and overload") --------------------------------
# The header is a positive integer of milliseconds; the router works within min(it, its own
# bound: WRITE_DEADLINE_S / READ_DEADLINE_S). More digits than this is no meaningful budget
# (over 11 days), and refusing them keeps int() of a megabyte of digits off the request path.
REQUEST_TIMEOUT_DIGITS_MAX: Final = 9

# A ``cached`` read is served from the region cache only while the region's invalidation relay
# is at most this far behind the shard (G6); otherwise it goes to the home primary. The relay
# polls every 50 ms and, for a remote shard under --wan realistic, pays one RTT per round.
CACHED_LAG_BOUND_S: Final = 1.0
# The router re-reads the relay heartbeats (router.freshness) at most this often. Its view only
# over-states the lag (elapsed time is added), so this costs at most this much of the bound on
# a healthy relay, and a dead relay is still noticed exactly at the bound. One Redis round trip
# per interval, whatever the read rate.
RELAY_LAG_REFRESH_S: Final = 0.1

# -- Slow clients (issue 16) -----------------------------------------------------------------
# A request's body must arrive within this time once its handler starts reading it (else 408):
# a client that sends headers and no body no longer holds a handler forever.
BODY_RECEIVE_TIMEOUT_S: Final = 5.0
# aiohttp's keep-alive timer: a connection is closed when no complete request arrived for this
# long since it opened or since its last answer, which also bounds the time to send headers.
HEADER_RECEIVE_TIMEOUT_S: Final = 10.0
# Connections one router process holds at once (router.serve); past it a new one gets 503 and
# is closed. A connection costs a socket, a parser and buffers (tens of KiB): 2,048 is a few
# tens of MiB per process, well under the file limit, and far above what the load generators
# and the client pools open (hundreds); slow clients are bounded by the two timeouts above,
# so at the cap they free a slot within HEADER_RECEIVE_TIMEOUT_S.
CONNECTIONS_MAX: Final = 2048
# Connections the kernel queues for one router process before accept (listen backlog; aiohttp's
# default is 128). A burst of new connections past the backlog has its SYNs dropped, and each
# such client waits for its retransmit (1 s, then 3 s, 7 s): measured in txr bench's 200 %
# open-loop run, where the generator opened hundreds of connections at once as latency grew,
# as client timeouts and a p99 of 8.9 s while no write may take the router more than 5 s.
# Half the connection cap: a burst that size waits microseconds in the kernel, not seconds
# (the kernel clamps it to net.core.somaxconn, 4096 on the development machine).
LISTEN_BACKLOG: Final = CONNECTIONS_MAX // 2

# -- POST /v1/transfers/batch (API.md "Batches of transfers") ----------------------------------
# Items per batch request, the contract's bound.
TRANSFER_BATCH_ITEMS_MAX: Final = 1000
# Its body: 1,000 items of the largest legal size (255-character key, 140-character reference
# escaped as \uXXXX, ids) fit in about 1.3 MB; the single-transfer routes keep BODY_BYTES_MAX.
TRANSFER_BATCH_BODY_BYTES_MAX: Final = 2 * 1024 * 1024

# -- Garbage collection (router start-up) -----------------------------------------------------
# Objects allocated at start-up (modules, OpenAPI document, pools) are frozen out of the
# collector, and generation 0 runs every this many net allocations instead of 700: in-flight
# futures and coroutines pushed it past 700 every ~35 requests, and GC was 8-9 % of the
# router's CPU (issue 11). The older generations keep their default ratios.
GC_GEN0_THRESHOLD: Final = 50_000

# -- Circuit breakers (router.breaker), one per remote primary node ---------------------------
# This many calls in a row that could not reach a remote primary (StoreUnavailable before the
# caller's own deadline) open its breaker: calls then fail at once with 503 and Retry-After
# instead of each waiting up to a pool acquire (1 s) for a peer that is cut off. Five is a few
# requests' worth, so one dropped connection never opens it.
BREAKER_FAILURES_MAX: Final = 5
# An open breaker lets one probe call through after this long (half-open); its success closes
# the breaker, its failure keeps it open for another period. Two seconds is below the
# failover detection time (3 s), so a healed link is used again before a failover would act.
BREAKER_OPEN_S: Final = 2.0
