"""Every bound of the client, named and explained (the server's are in router/limits.py).

The client never imports the server, so the values it mirrors from the contract (API.md) are
written out here; a test compares the token bounds with the server's own constants.
"""

from __future__ import annotations

from typing import Final

# A call's whole deadline (every attempt, backoff and region change) unless the caller gives
# one: longer than the router's own write deadline (5 s), so one slow write is answered by the
# router's 504 and retried once, rather than abandoned by the client.
CALL_TIMEOUT_S_DEFAULT: Final = 10.0
# A deadline shorter than this cannot carry one round trip plus the router's work.
CALL_TIMEOUT_S_MIN: Final = 0.001
# Attempts per call, whatever the deadline: a bound on the loop even with a huge timeout.
ATTEMPTS_MAX: Final = 16

# An attempt's connect phase is bounded on its own: a region that does not take a connection
# within this (several of the largest inter-region RTTs) is skipped for the next best one.
CONNECT_TIMEOUT_S_MAX: Final = 1.0

# Full-jitter exponential backoff (AWS Architecture Blog, "Exponential Backoff And Jitter"):
# the n-th retry sleeps uniform(0, min(cap, base * 2**n)). 50 ms is about one cross-region
# round trip; 2 s caps a sleep well inside the default deadline.
BACKOFF_BASE_S: Final = 0.05
BACKOFF_CAP_S: Final = 2.0
# A Retry-After longer than this is honoured only up to it (a router's hint is whole seconds;
# the deadline bounds the wait anyway).
RETRY_AFTER_S_MAX: Final = 30.0

# Retry budget: a token bucket per client, as gRPC's retry throttling and the AWS SDK's retry
# quota do. Each retry takes one token; tokens come back with time and with successes, so a
# healthy client always has retries while a client facing a sick cluster sends at most
# ``RETRY_BUDGET_TOKENS_MAX`` retries in a burst and then ``RETRY_BUDGET_REFILL_PER_S`` per
# second plus a fifth of its successful calls (Finagle's 20% retry budget) -- never a storm.
RETRY_BUDGET_TOKENS_MAX: Final = 20.0
RETRY_BUDGET_REFILL_PER_S: Final = 2.0
RETRY_BUDGET_SUCCESS_CREDIT: Final = 0.2

# Region choice. The probe is ``GET /healthz`` (no auth, no store access): cheap for the router.
# Every interval is long enough that a thousand idle clients cost a router well under 1% CPU.
PROBE_INTERVAL_S: Final = 2.0
PROBE_TIMEOUT_S: Final = 1.0
# EWMA weight of a new RTT sample: about the last five samples dominate (10 s at the interval),
# quick enough to follow a WAN change, slow enough that one slow probe does not move a client.
RTT_EWMA_ALPHA: Final = 0.3
# A region that refused a connection or answered 503 region_unavailable is skipped this long;
# then it is tried again (the background probe keeps it marked while it still fails), which is
# how a client drifts back to its best region after it recovers.
REGION_DOWN_S: Final = 3.0

# Hedged cached reads: the second region is asked once the first has not answered within the
# observed p95 of this client's cached reads (the last ``HEDGE_SAMPLES_MAX``), never sooner than
# ``HEDGE_DELAY_S_MIN`` (a hedge inside the noise floor doubles load for nothing). Before
# ``HEDGE_SAMPLES_MIN`` samples the p95 is unknown and ``HEDGE_DELAY_S_DEFAULT`` is used.
HEDGE_SAMPLES_MAX: Final = 256
HEDGE_SAMPLES_MIN: Final = 20
HEDGE_DELAY_S_MIN: Final = 0.005
HEDGE_DELAY_S_DEFAULT: Final = 0.1
# The sync client runs hedged reads on a pool of this many threads (a hedge waits its turn
# when they are all busy: a bound on threads, not on correctness).
HEDGE_THREADS_MAX: Final = 8

# Entries are read in pages of this many by default (the server allows 1-500).
ENTRIES_PAGE_DEFAULT: Final = 100
ENTRIES_PAGE_MAX: Final = 500
# GET /v1/events pages (API.md: limit 1-500).
EVENTS_PAGE_DEFAULT: Final = 100
EVENTS_PAGE_MAX: Final = 500
# An iterator stops after this many pages: a bound on a loop driven by the server's cursors.
ENTRIES_PAGES_MAX: Final = 1_000_000

# Mirrors of the server's contract (API.md; router and consistency limits).
TOKEN_ACCOUNTS_MAX: Final = 32
TOKEN_LEN_MAX: Final = 2048
# A longer list given to transfer_batch is sent as several requests of at most this many.
BATCH_ITEMS_MAX: Final = 1000
# Idempotency keys are 1-255 printable characters (API.md).
IDEMPOTENCY_KEY_LEN_MAX: Final = 255

# Connections kept per client (httpx's pool): enough for a busy async client, bounded.
POOL_CONNECTIONS_MAX: Final = 100
POOL_KEEPALIVE_MAX: Final = 20
