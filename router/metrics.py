"""Prometheus metrics of one router process (its own registry, so tests can build many apps)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets span an in-region commit (~1 ms) to a cross-region write under --wan realistic with a
# retry (~1 s) and the write deadline.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)


# Distinct (route, method, status) request label sets kept resolved. Routes are the app's
# canonical ones; a client inventing methods cannot grow the table past this.
REQUEST_CHILDREN_MAX: Final = 512


class Metrics:
    def __init__(self, region: str) -> None:
        self.region = region
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._outcome_children: dict[str, Counter] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.worker_info = Gauge(
            "txr_router_worker_info",
            "Always 1: which worker process of the region served this scrape.",
            ["region", "worker", "pid"],
            registry=self.registry,
        )
        self.requests = Counter(
            "txr_http_requests_total",
            "HTTP requests by route, method and status.",
            ["region", "route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "txr_http_request_duration_seconds",
            "HTTP request latency by route, method and status.",
            ["region", "route", "method", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.store_latency = Histogram(
            "txr_store_call_duration_seconds",
            "Store call latency by shard and operation (includes the WAN hop).",
            ["region", "shard", "op"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "txr_store_errors_total",
            "Store calls that failed operationally, by kind (unavailable, outcome_unknown).",
            ["region", "shard", "kind"],
            registry=self.registry,
        )
        self.fence_rejections = Counter(
            "txr_fence_rejections_total",
            "Writes the store refused for a stale shard epoch or a slot it does not own.",
            ["region", "shard", "code"],
            registry=self.registry,
        )
        self.transfer_outcomes = Counter(
            "txr_transfer_outcomes_total",
            "Transfer results by code.",
            ["region", "code"],
            registry=self.registry,
        )
        self.cache_ops = Counter(
            "txr_cache_operations_total",
            "Cache operations by kind and result.",
            ["region", "op", "result"],
            registry=self.registry,
        )
        self.topology_revision = Gauge(
            "txr_topology_revision",
            "etcd revision of the topology this router routes on.",
            ["region"],
            registry=self.registry,
        )
        self.etcd_reachable = Gauge(
            "txr_etcd_reachable",
            "1 when the last topology read or watch reached etcd.",
            ["region"],
            registry=self.registry,
        )

        self.outbox_depth = Gauge(
            "txr_outbox_depth",
            "Cross-shard transfers whose leg 1 committed and that are not settled or reversed.",
            ["region", "shard"],
            registry=self.registry,
        )
        self.outbox_oldest_age = Gauge(
            "txr_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox message of a source shard.",
            ["region", "shard"],
            registry=self.registry,
        )
        self.delivery_attempts = Counter(
            "txr_outbox_delivery_attempts_total",
            "Leg-2 deliveries tried by this region's relay or router, by result.",
            ["region", "source_shard", "result"],
            registry=self.registry,
        )
        self.settle_latency = Histogram(
            "txr_transfer_settle_duration_seconds",
            "From leg 1's commit to the source's settled (or reversed) mark.",
            ["region", "source_shard", "outcome"],
            buckets=(*LATENCY_BUCKETS_S, 10.0, 30.0, 60.0),
            registry=self.registry,
        )

        # -- the read path's view of the change feed (router.freshness) ------------------------
        self.invalidation_lag_seconds = Gauge(
            "txr_invalidation_lag_seconds",
            "How far this region's cache may be behind a shard's commits: now minus the newest "
            "instant before which every acknowledged change is applied (NaN: unknown).",
            ["region", "shard"],
            registry=self.registry,
        )

        # -- the change feed (router/relays/feed.py), in the relay process -------------------
        # ``region``: the relay's region (where the decoder runs); ``target``: the region whose
        # Redis the figure is about.
        self.feed_lag_seconds = Gauge(
            "txr_feed_lag_seconds",
            "Per target region: now minus the instant up to which every acknowledged commit of "
            "the shard is applied there (NaN: unknown, e.g. the region is unreachable).",
            ["region", "shard", "target"],
            registry=self.registry,
        )
        self.feed_lag_bytes = Gauge(
            "txr_feed_lag_bytes",
            "Per target region: the primary's WAL flush position minus the position applied "
            "there (WAL of every table counts: a backlog indicator).",
            ["region", "shard", "target"],
            registry=self.registry,
        )
        self.feed_batch_txns = Histogram(
            "txr_feed_batch_transactions",
            "Committed transactions per batch applied to every region's Redis.",
            ["region", "shard"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.feed_applied = Counter(
            "txr_feed_applied_total",
            "Account changes applied per target region (fills and tombstones).",
            ["region", "shard", "target"],
            registry=self.registry,
        )
        self.feed_coalesced = Counter(
            "txr_feed_coalesced_batches_total",
            "Feed batches a target region got merged into the call of an earlier one (it was "
            "behind by more than one batch: a far region, a slow Redis).",
            ["region", "shard", "target"],
            registry=self.registry,
        )
        # Ledger events (router.events): the publisher in the shard's decoder, the webhooks'
        # delivery worker in every relay process.
        self.events_published = Counter(
            "txr_events_published_total",
            "Events the publisher had acknowledged by the stream (duplicates included).",
            ["region", "shard"],
            registry=self.registry,
        )
        self.events_duplicates = Counter(
            "txr_events_duplicates_total",
            "Publishes the stream dropped as duplicates of a stored event id.",
            ["region", "shard"],
            registry=self.registry,
        )
        self.events_publish_failures = Counter(
            "txr_events_publish_failures_total",
            "Publisher failures (the decoder then resumes from the slot's position).",
            ["region", "shard"],
            registry=self.registry,
        )
        self.events_commit_to_ack = Histogram(
            "txr_events_commit_to_ack_seconds",
            "From a transaction's commit time to the stream's acknowledgement of its events.",
            ["region", "shard"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.events_queue_batches = Gauge(
            "txr_events_queue_batches",
            "Feed batches waiting for the publisher.",
            ["region", "shard"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "txr_webhook_deliveries_total",
            "Webhook delivery attempts by outcome (ok, failed, failing_marked).",
            ["region", "outcome"],
            registry=self.registry,
        )
        self.webhook_lag = Histogram(
            "txr_webhook_delivery_lag_seconds",
            "From an event's commit time to its successful delivery.",
            ["region"],
            buckets=(*LATENCY_BUCKETS_S, 10.0, 60.0, 600.0, 3600.0),
            registry=self.registry,
        )
        self.webhook_pending = Gauge(
            "txr_webhook_queue_depth",
            "Events not yet delivered (pending plus in flight) per endpoint.",
            ["region", "endpoint"],
            registry=self.registry,
        )
        self.feed_restarts = Counter(
            "txr_feed_restarts_total",
            "Times a shard's decoder (re)opened its stream, by reason.",
            ["region", "shard", "reason"],
            registry=self.registry,
        )
        self.feed_region_resets = Counter(
            "txr_feed_region_resets_total",
            "Times a target region's entries of a shard were invalidated because the feed could "
            "not prove it holds every change: kind partial (only accounts written after the "
            "region's last confirmed commit) or full (every entry of the shard, new generation).",
            ["region", "shard", "target", "kind", "reason"],
            registry=self.registry,
        )
        self.feed_region_excluded = Gauge(
            "txr_feed_region_excluded",
            "1 while a target region has been unreachable longer than the bound and no longer "
            "holds the replication slot back.",
            ["region", "shard", "target"],
            registry=self.registry,
        )

        self.batch_size = Histogram(
            "txr_batch_items",
            "Transfers per call of the batch procedure, by shard.",
            ["region", "shard"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.failover_buffered = Gauge(
            "txr_failover_buffered_writes",
            "Writes held while their shard's primary is unreachable, waiting for a new one.",
            ["region"],
            registry=self.registry,
        )
        self.rtt = Gauge(
            "txr_rtt_seconds",
            "Round-trip time from this router to a store node or peer router (ewma and tail).",
            ["region", "target", "stat"],
            registry=self.registry,
        )

    def request_children(self, route: str, method: str, status: int) -> tuple[Counter, Histogram]:
        """The request counter and latency children of one (route, method, status).

        ``labels()`` builds and looks up its key under a lock on every call; the middleware
        calls this on every request, so the pair is kept per key (bounded: past the bound,
        looked up each time as before).
        """
        key = (route, method, status)
        pair = self._request_children.get(key)
        if pair is None:
            labels = (self.region, route, method, str(status))
            pair = (self.requests.labels(*labels), self.request_latency.labels(*labels))
            if len(self._request_children) < REQUEST_CHILDREN_MAX:
                self._request_children[key] = pair
        return pair

    def transfer_outcome(self, code: str) -> Counter:
        """The outcome counter's child for ``code``, resolved once per code (a bounded enum)."""
        child = self._outcome_children.get(code)
        if child is None:
            child = self.transfer_outcomes.labels(self.region, code)
            self._outcome_children[code] = child
        return child

    def exposition(self) -> bytes:
        self.topology_revision.labels(self.region)
        return generate_latest(self.registry)
