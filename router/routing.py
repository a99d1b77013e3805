"""Routing: account -> slot -> shard -> primary and fencing tokens, with one stale retry.

The router's topology may be stale; the stores are the authority (G5). When a store answers
``stale_epoch`` or ``wrong_shard`` the router reloads the topology from etcd and tries once
more, within the request's deadline. It never guesses an outcome: a write whose answer is lost
is reported as unknown (G7).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from consistency import ids
from consistency.errors import EtcdError, TopologyError
from consistency.idempotency import transfer_fingerprint
from consistency.saga import FINAL_STATUSES, STATUS_OF, TransferStatus
from consistency.topology import Node, Shard, Topology, TopologyWatcher
from regionstore.errors import StoreInvariantViolation, StoreOutcomeUnknown, StoreUnavailable
from regionstore.store import (
    AccountRow,
    CreateAccountCode,
    OutboxMessage,
    ShardStore,
    TransferCode,
    TransferItem,
    TransferResult,
)
from router.batcher import BatcherFull, DeadlinePassedUnsent, ShardBatcher, TenantQueueFull
from router.breaker import CircuitBreaker
from router.cache import RegionCache
from router.config import RouterConfig
from router.errors import (
    ApiError,
    BusinessRefusal,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    RegionUnavailable,
    Unprocessable,
)
from router.limits import (
    ACCOUNT_ID_RETRIES_MAX,
    FAILOVER_BUFFER_S,
    FAILOVER_BUFFERED_MAX,
    FAILOVER_WAITS_MAX,
    INLINE_DELIVERIES_MAX,
    INLINE_SETTLE_WAIT_S,
    OVERLOAD_RETRY_AFTER_S,
    POOL_MAX,
    POOL_MIN,
    POOL_OPEN_TIMEOUT_S,
    RELAY_GRACE_S,
    RETRY_AFTER_S,
    STALE_RETRIES_MAX,
)
from router.metrics import Metrics
from router.model import PostedTransfer, TransferRequest
from router.relays.outbox import Delivery, OutboxRelay
from router.tracing import child_span

log = logging.getLogger(__name__)

_FENCE_CODES = frozenset({TransferCode.STALE_EPOCH, TransferCode.WRONG_SHARD})


class _PrimaryUnreachable(Exception):
    """The home primary could not be reached; the write was certainly not sent."""


class Deadline:
    """A point in monotonic time that every step of one request shares."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0


class StoreRegistry:
    """One connection pool per PostgreSQL node this router has routed to, opened lazily."""

    def __init__(self, config: RouterConfig, password: str) -> None:
        self._config = config
        self._password = password
        self._stores: dict[str, ShardStore] = {}
        self._lock = asyncio.Lock()

    def _conninfo(self, node: Node) -> str:
        host, port = self._config.dial_address(node.host, node.port)
        # Key/value conninfo keeps the password out of any URL that a library might log.
        return (
            f"host={host} port={port} dbname={self._config.db_name} user={self._config.db_user} "
            f"password={self._password} application_name=txr-router-{self._config.region} "
            "connect_timeout=5"
        )

    async def for_node(self, node: Node) -> ShardStore:
        store = self._stores.get(node.name)
        if store is not None:
            return store
        async with self._lock:
            store = self._stores.get(node.name)
            if store is None:
                store = ShardStore(
                    self._conninfo(node), name=node.name, pool_min=POOL_MIN, pool_max=POOL_MAX
                )
                await store.open(timeout_s=POOL_OPEN_TIMEOUT_S)
                self._stores[node.name] = store
        return store

    async def warm(self, topology: Topology) -> None:
        """Open pools to every primary now, so the first request does not pay the handshakes."""
        for shard in topology.shards.values():
            try:
                await self.for_node(shard.primary)
            except StoreUnavailable as exc:
                log.warning("primary %s not reachable yet: %s", shard.primary.name, exc)

    async def close(self) -> None:
        for store in self._stores.values():
            await store.close()
        self._stores.clear()


class ShardRouter:
    def __init__(
        self,
        watcher: TopologyWatcher,
        stores: StoreRegistry,
        metrics: Metrics,
        region: str,
        *,
        cache: RegionCache | None = None,
    ) -> None:
        self.watcher = watcher
        # The region cache that committed batches are written into before their answers
        # (None in the relay process, which posts no transfers).
        self.cache = cache
        self.stores = stores
        self.metrics = metrics
        self.region = region
        self._relays: dict[str, OutboxRelay] = {}
        self._buffered = 0
        self._batchers: dict[tuple[str, int], ShardBatcher] = {}
        self._inline: set[asyncio.Task[Delivery]] = set()
        # One per remote primary node (router.breaker); local nodes have none.
        self._breakers: dict[str, CircuitBreaker] = {}

    # -- ShardResolver, for the outbox relays (router.relays.outbox) --------------------------

    def route_account(self, account_id: int) -> tuple[str, int, int]:
        shard, slot_epoch = self.topology.route(ids.account_slot(account_id))
        return shard.name, shard.epoch, slot_epoch

    def shard_epoch(self, shard: str) -> int:
        return self.topology.shards[shard].epoch

    async def store_for_shard(self, shard: str) -> ShardStore:
        return await self.stores.for_node(self.topology.shards[shard].primary)

    async def refresh(self) -> None:
        await self.watcher.refresh(newer_than=self.topology.revision)

    def relay_for(self, source_shard: str) -> OutboxRelay:
        relay = self._relays.get(source_shard)
        if relay is None:
            relay = OutboxRelay(source_shard, self, region=self.region, metrics=self.metrics)
            self._relays[source_shard] = relay
        return relay

    async def close(self) -> None:
        """Drain batches, then stop inline deliveries (idempotent: the relays finish them)."""
        for batcher in list(self._batchers.values()):
            await batcher.close()
        for task in list(self._inline):
            task.cancel()
        await asyncio.gather(*self._inline, return_exceptions=True)

    @property
    def topology(self) -> Topology:
        return self.watcher.current

    async def _refresh(self, seen_revision: int) -> None:
        try:
            await self.watcher.refresh(newer_than=seen_revision)
        except (EtcdError, TopologyError) as exc:
            # Without etcd we cannot learn the new map; the client retries shortly.
            raise RegionUnavailable(
                "the shard is changing hands and the topology cannot be refreshed",
                retry_after_s=RETRY_AFTER_S,
            ) from exc

    async def _timed(self, shard: str, op: str, coro: Any) -> Any:
        start = time.perf_counter()
        with child_span(f"store.{op}", {"txr.shard": shard}):
            try:
                return await coro
            except StoreUnavailable:
                self.metrics.store_errors.labels(self.region, shard, "unavailable").inc()
                raise
            except StoreOutcomeUnknown:
                self.metrics.store_errors.labels(self.region, shard, "outcome_unknown").inc()
                raise
            finally:
                self.metrics.store_latency.labels(self.region, shard, op).observe(
                    time.perf_counter() - start
                )

    # -- circuit breakers (router.breaker) --------------------------------------------------

    def _breaker(self, node: Node) -> CircuitBreaker | None:
        if node.region == self.region:
            return None  # the local failure modes have their own handling (failover buffer)
        breaker = self._breakers.get(node.name)
        if breaker is None:
            breaker = self._breakers[node.name] = CircuitBreaker()
        return breaker

    def _circuit_open(self, shard: Shard, breaker: CircuitBreaker | None) -> ApiError | None:
        """The 503 to answer at once when ``shard``'s remote primary is behind an open breaker
        (nothing was sent), else None (and, half-open, this call is the probe)."""
        if breaker is None or breaker.allow():
            return None
        self._store_error(shard.name, "circuit_open")
        return RegionUnavailable(
            f"shard {shard.name}'s primary in {shard.primary.region} is not reachable from "
            f"{self.region}; nothing was sent",
            retry_after_s=breaker.retry_after_s(),
        )

    @staticmethod
    def _record(
        breaker: CircuitBreaker | None, exc: BaseException | None, deadline: Deadline
    ) -> None:
        """An answer closes the breaker; failing to reach the node counts against it, unless
        the caller's own deadline ran out (a short Request-Timeout says nothing of the node)."""
        if breaker is None:
            return
        if exc is None:
            breaker.success()
        elif isinstance(exc, StoreUnavailable) and not deadline.expired():
            breaker.failure()

    async def post_many(
        self,
        tenant: str,
        reqs: Sequence[tuple[TransferRequest, str]],
        deadline: Deadline,
    ) -> list[PostedTransfer | ApiError]:
        """Post independent transfers (a batch request): one outcome per item, in order.

        Same-shard items are queued into their shard's batcher all at once and awaited
        together (no task per item); an item that meets a fence refusal, an unreachable
        primary, or lives across shards takes ``post_transfer``'s full path, exactly as a
        single request would. Each item's errors are its own (an ApiError in its place).
        """
        out: list[PostedTransfer | ApiError | None] = [None] * len(reqs)
        topo = self.topology
        queued: list[tuple[int, asyncio.Future[TransferResult], Shard, int, TransferItem]] = []
        slow: list[int] = []
        for i, (req, key) in enumerate(reqs):
            source_slot = ids.account_slot(req.source)
            shard, source_epoch = topo.route(source_slot)
            dest_shard, dest_epoch = topo.route(ids.account_slot(req.destination))
            if dest_shard.name != shard.name:
                slow.append(i)
                continue
            item = _item(tenant, req, key, ids.new_transfer_id(), source_epoch, dest_epoch, None)
            refusal = self._circuit_open(shard, self._breaker(shard.primary))
            if refusal is not None:
                out[i] = refusal
                continue
            try:
                fut = self._batcher(shard).enqueue(item, timeout_s=deadline.remaining())
            except (BatcherFull, TenantQueueFull) as exc:
                out[i] = self._shed(shard.name, exc)
                continue
            queued.append((i, fut, shard, source_slot, item))
        results = await asyncio.gather(*(q[1] for q in queued), return_exceptions=True)
        retry_ids: dict[int, uuid.UUID] = {}
        for (i, _fut, shard, source_slot, item), res in zip(queued, results, strict=True):
            self._record(
                self._breaker(shard.primary),
                None if isinstance(res, TransferResult) else res,
                deadline,
            )
            if isinstance(res, TransferResult):
                if res.code in _FENCE_CODES:
                    self.metrics.fence_rejections.labels(
                        self.region, shard.name, res.code.value
                    ).inc()
                    retry_ids[i] = item.transfer_id
                    slow.append(i)
                else:
                    out[i] = PostedTransfer(res, shard, source_slot, None)
            elif isinstance(res, StoreUnavailable):
                # Nothing was sent: the full path waits for a failover, as a single request.
                retry_ids[i] = item.transfer_id
                slow.append(i)
            else:
                out[i] = self._map_store_error(shard.name, res)

        async def full(i: int) -> None:
            req, key = reqs[i]
            try:
                out[i] = await self.post_transfer(
                    tenant, req, key, deadline, transfer_id=retry_ids.get(i)
                )
            except ApiError as err:
                out[i] = err

        if slow:
            if any(i in retry_ids for i in slow):
                # The shard answered stale_epoch / wrong_shard: learn the new map once.
                with contextlib.suppress(RegionUnavailable):
                    await self._refresh(topo.revision)
            await asyncio.gather(*(full(i) for i in sorted(slow)))
        assert all(o is not None for o in out)
        return [o for o in out if o is not None]

    def _shed(self, shard: str, exc: BatcherFull | TenantQueueFull) -> ApiError:
        """A write refused at the shard's queue, before anything was sent."""
        if isinstance(exc, TenantQueueFull):
            self._store_error(shard, "tenant_queue_full")
            return RateLimited(
                f"this tenant has too many transfers queued for shard {shard}; retry shortly",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        self._store_error(shard, "shed")
        return RegionUnavailable(
            f"shard {shard} is overloaded; nothing was written, retry shortly",
            retry_after_s=OVERLOAD_RETRY_AFTER_S,
        )

    def _map_store_error(self, shard: str, exc: BaseException) -> ApiError:
        if isinstance(exc, DeadlinePassedUnsent):
            # Still queued when its deadline passed, so never sent: surely not applied, which
            # is 503 with Retry-After, never outcome_unknown (G7).
            self._store_error(shard, "deadline_unsent")
            return RegionUnavailable(
                "the request deadline passed before the transfer reached its shard; "
                "nothing was written",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        if isinstance(exc, StoreOutcomeUnknown):
            self._store_error(shard, "outcome_unknown")
            return OutcomeUnknown(
                "the transfer may or may not have been applied; retry with the same "
                "Idempotency-Key to learn its outcome"
            )
        if isinstance(exc, StoreInvariantViolation):
            self._store_error(shard, "invariant")
            log.error("shard %s refused a transfer: %s", shard, exc)
            return Unprocessable("the home shard refused this transfer; nothing was written")
        # Anything else reached the batch after it was sent: its outcome is unknown.
        log.error("batch call failed on shard %s: %r", shard, exc)
        return OutcomeUnknown("the transfer may or may not have been applied; retry")

    async def post_transfer(
        self,
        tenant: str,
        req: TransferRequest,
        key: str,
        deadline: Deadline,
        *,
        transfer_id: uuid.UUID | None = None,
    ) -> PostedTransfer:
        source_slot = ids.account_slot(req.source)
        dest_slot = ids.account_slot(req.destination)
        # One id for every attempt: a retry after a refusal re-sends the same transfer.
        if transfer_id is None:
            transfer_id = ids.new_transfer_id()
        checked_destination = False
        stale_retries = 0
        failover_waits = 0
        while True:
            topo = self.topology
            shard, source_epoch = topo.route(source_slot)
            dest_shard, dest_epoch = topo.route(dest_slot)
            cross = dest_shard.name != shard.name
            if cross and not checked_destination:
                # Most refusals happen here, before any money moves; leg 2 checks again, and
                # a destination that changes in between is reversed by the saga.
                await self._check_remote_destination(tenant, req, deadline)
                checked_destination = True
            item = _item(
                tenant,
                req,
                key,
                transfer_id,
                source_epoch,
                dest_epoch,
                dest_shard.name if cross else None,
            )
            try:
                result = await self._post_one(shard, item, deadline)
            except _PrimaryUnreachable as exc:
                # Nothing was sent. If an operator is failing the shard over, hold the write
                # (bounded) until the new primary is published, then send it there.
                if failover_waits < FAILOVER_WAITS_MAX and await self._await_new_primary(
                    topo, shard.name, deadline
                ):
                    failover_waits += 1
                    continue
                raise RegionUnavailable(
                    "the account's home shard is not reachable; nothing was written",
                    retry_after_s=RETRY_AFTER_S,
                ) from exc
            if result.code not in _FENCE_CODES:
                return PostedTransfer(
                    result, shard, source_slot, dest_shard.name if cross else None
                )
            self.metrics.fence_rejections.labels(self.region, shard.name, result.code.value).inc()
            if stale_retries >= STALE_RETRIES_MAX or deadline.expired():
                raise RegionUnavailable(
                    "the account's shard is moving; retry with the same Idempotency-Key",
                    retry_after_s=RETRY_AFTER_S,
                )
            stale_retries += 1
            await self._refresh(topo.revision)

    async def _await_new_primary(self, seen: Topology, shard: str, deadline: Deadline) -> bool:
        """Wait (bounded in time and in waiters) for ``shard``'s primary or epoch to change."""
        if self._buffered >= FAILOVER_BUFFERED_MAX:
            return False
        before = seen.shards[shard]
        self._buffered += 1
        self.metrics.failover_buffered.labels(self.region).set(self._buffered)
        try:
            end = time.monotonic() + min(deadline.remaining(), FAILOVER_BUFFER_S)
            while (left := end - time.monotonic()) > 0:
                now = self.topology.shards.get(shard)
                if now is not None and (now.epoch, now.primary) != (before.epoch, before.primary):
                    return True
                await self.watcher.wait_changed(left)
            return False
        finally:
            self._buffered -= 1
            self.metrics.failover_buffered.labels(self.region).set(self._buffered)

    async def _check_remote_destination(
        self, tenant: str, req: TransferRequest, deadline: Deadline
    ) -> None:
        async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
            return await store.get_account(req.destination, tenant, timeout_s=timeout_s)

        row, _ = await self.read(ids.account_slot(req.destination), "get_account", fetch, deadline)
        if row is None:
            raise NotFound("source or destination account not found")
        if row.currency != req.currency:
            raise BusinessRefusal(
                "source, destination and transfer currencies must match", code="currency_mismatch"
            )

    async def settle_inline(
        self, tenant: str, posted: PostedTransfer, req: TransferRequest
    ) -> TransferStatus:
        """Deliver leg 2 and mark the source right away, waiting at most a short bound.

        Returns the status to answer with. Past the bound the delivery goes on in the
        background (and the relay would finish it anyway); the client gets ``pending``.
        """
        res = posted.result
        assert res.transfer_id is not None
        assert res.created_at is not None
        assert posted.destination_shard is not None
        if len(self._inline) >= INLINE_DELIVERIES_MAX:
            return TransferStatus.PENDING
        msg = OutboxMessage(
            transfer_id=res.transfer_id,
            tenant=tenant,
            source=req.source,
            destination=req.destination,
            amount=req.amount,
            currency=req.currency,
            destination_shard=posted.destination_shard,
            attempts=0,
            created_at=res.created_at,
        )
        return await self._deliver_bounded(posted.shard.name, msg)

    async def _deliver_bounded(self, source_shard: str, msg: OutboxMessage) -> TransferStatus:
        task = asyncio.create_task(self.relay_for(source_shard).deliver(msg))
        self._inline.add(task)
        task.add_done_callback(self._inline.discard)
        try:
            delivery = await asyncio.wait_for(asyncio.shield(task), INLINE_SETTLE_WAIT_S)
        except TimeoutError:
            return TransferStatus.PENDING
        except Exception as exc:  # noqa: BLE001 - the relay retries; the client sees pending
            log.warning("inline delivery failed, the relay will retry: %s", type(exc).__name__)
            return TransferStatus.PENDING
        if delivery.outcome in FINAL_STATUSES:
            return STATUS_OF[delivery.outcome]
        if delivery.outcome == "already" and delivery.code in FINAL_STATUSES:
            # A relay got there first; its mark is the answer.
            return STATUS_OF[delivery.code]
        return TransferStatus.PENDING

    async def _post_one(
        self, shard: Shard, item: TransferItem, deadline: Deadline
    ) -> TransferResult:
        if deadline.expired():
            # Every earlier attempt was refused or never sent: nothing was written.
            raise RegionUnavailable(
                "the request deadline passed before the transfer was sent; nothing was written",
                retry_after_s=RETRY_AFTER_S,
            )
        breaker = self._breaker(shard.primary)
        refusal = self._circuit_open(shard, breaker)
        if refusal is not None:
            raise refusal
        batcher = self._batcher(shard)
        try:
            # Timed once per batch by the batcher (observe_call), not here per item.
            result = await batcher.submit(item, timeout_s=deadline.remaining())
        except (BatcherFull, TenantQueueFull) as exc:
            raise self._shed(shard.name, exc) from exc
        except DeadlinePassedUnsent as exc:
            raise self._map_store_error(shard.name, exc) from exc
        except StoreUnavailable as exc:
            self._record(breaker, exc, deadline)
            self._store_error(shard.name, "unavailable")
            raise _PrimaryUnreachable(shard.name) from exc
        except StoreOutcomeUnknown as exc:
            self._store_error(shard.name, "outcome_unknown")
            raise OutcomeUnknown(
                "the transfer may or may not have been applied; retry with the same "
                "Idempotency-Key to learn its outcome"
            ) from exc
        except StoreInvariantViolation as exc:
            # Rolled back: certainly not applied, so never an unknown outcome (G7).
            raise self._map_store_error(shard.name, exc) from exc
        self._record(breaker, None, deadline)
        return result

    def _store_error(self, shard: str, kind: str) -> None:
        self.metrics.store_errors.labels(self.region, shard, kind).inc()

    def _batcher(self, shard: Shard) -> ShardBatcher:
        key = (shard.primary.name, shard.epoch)
        batcher = self._batchers.get(key)
        if batcher is None:
            # Batchers of an older epoch or primary of this shard are idle from now on (a batch
            # carries one epoch); forget those that have drained.
            for old_key, old in list(self._batchers.items()):
                if old_key[0] == shard.primary.name and old.queued == 0:
                    del self._batchers[old_key]
            node = shard.primary
            batcher = ShardBatcher(
                lambda: self.stores.for_node(node),
                shard.epoch,
                observe_batch=self.metrics.batch_size.labels(self.region, shard.name).observe,
                observe_call=self.metrics.store_latency.labels(
                    self.region, shard.name, "post_transfers"
                ).observe,
                relay_grace_s=RELAY_GRACE_S,
                after_commit=(
                    functools.partial(self._cache_committed, shard.epoch)
                    if self.cache is not None
                    else None
                ),
            )
            self._batchers[key] = batcher
        return batcher

    async def _cache_committed(
        self, shard_epoch: int, items: Sequence[TransferItem], results: Sequence[TransferResult]
    ) -> None:
        """A committed batch's new versions into the region cache, one round trip (a tombstone
        per account at its new version: the transfer path knows only the balance)."""
        assert self.cache is not None
        committed: dict[int, tuple[int, Mapping[str, Any]]] = {}

        def put(account: int, version: int | None, balance: int | None) -> None:
            if version is None or balance is None:
                return  # a cross-shard leg 1 reports only the source; leg 2 is elsewhere
            seen = committed.get(account)
            if seen is None or version > seen[0]:
                committed[account] = (version, {"balance": balance})

        for item, res in zip(items, results, strict=True):
            if res.code is TransferCode.OK:
                put(item.source, res.source_version, res.source_balance)
                put(item.destination, res.destination_version, res.destination_balance)
        await self.cache.put_committed(shard_epoch, committed)

    async def create_account(
        self,
        *,
        tenant: str,
        region: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
    ) -> tuple[AccountRow, Shard]:
        for _attempt in range(STALE_RETRIES_MAX + 1):
            topo = self.topology
            homed = topo.shards_homed_in(region)
            if not homed:
                raise Unprocessable(f"no shard is homed in region {region!r}")
            shard = random.choice(homed)
            slots = topo.slots.slots_of(shard.name)
            if not slots:
                raise RegionUnavailable(
                    f"shard {shard.name} owns no slots", retry_after_s=RETRY_AFTER_S
                )
            refused = False
            for _clash in range(ACCOUNT_ID_RETRIES_MAX):
                slot = random.choice(slots)
                _, slot_epoch = topo.slots.lookup(slot)
                account_id = ids.new_account_id(slot)
                code, row = await self._create_one(
                    shard,
                    slot_epoch,
                    account_id,
                    tenant,
                    currency,
                    overdraft_limit,
                    metadata,
                    deadline,
                )
                if code is CreateAccountCode.OK:
                    assert row is not None
                    return row, shard
                if code is not CreateAccountCode.ID_TAKEN:
                    self.metrics.fence_rejections.labels(self.region, shard.name, code.value).inc()
                    refused = True
                    break
            if not refused:
                raise RegionUnavailable("could not allocate an account id", retry_after_s=1)
            if not deadline.expired():
                await self._refresh(topo.revision)
        raise RegionUnavailable("the region's shards are changing hands; retry shortly")

    async def _create_one(
        self,
        shard: Shard,
        slot_epoch: int,
        account_id: int,
        tenant: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
    ) -> tuple[CreateAccountCode, AccountRow | None]:
        if deadline.expired():
            # Earlier attempts were refused (id taken, fence): nothing was created.
            raise RegionUnavailable(
                "the request deadline passed before the account was created; nothing was written",
                retry_after_s=RETRY_AFTER_S,
            )
        try:
            store = await self.stores.for_node(shard.primary)
            res: tuple[CreateAccountCode, AccountRow | None] = await self._timed(
                shard.name,
                "create_account",
                store.create_account(
                    shard_epoch=shard.epoch,
                    slot_epoch=slot_epoch,
                    account_id=account_id,
                    tenant=tenant,
                    currency=currency,
                    overdraft_limit=overdraft_limit,
                    metadata=metadata,
                    timeout_s=deadline.remaining(),
                ),
            )
        except StoreUnavailable as exc:
            raise RegionUnavailable(
                "the home shard is not reachable; nothing was written",
                retry_after_s=RETRY_AFTER_S,
            ) from exc
        except StoreOutcomeUnknown as exc:
            # Account creation carries no idempotency key: the client may find a stray empty
            # account if it retries, never a wrong balance.
            raise OutcomeUnknown("the account may or may not have been created") from exc
        except StoreInvariantViolation as exc:
            log.error("shard %s refused an account: %s", shard.name, exc)
            raise Unprocessable("the home shard refused this account; nothing was written") from exc
        return res

    async def require_confirmed(self, shard: Shard) -> None:
        """Refuse a read of ``shard``'s primary or standbys once this router's view of its epoch
        is past its lease (``TopologyWatcher.confirmed``): cut off from etcd's majority, the
        router cannot know whether the shard failed over, and the node it would read may be a
        deposed primary that still answers reads with what it had. A 503 is the honest answer.

        Writes need no such check: a deposed primary cannot commit without its synchronous
        standby (the node promoted in its place), and the stores refuse stale epochs (G5).
        """
        if not await self.watcher.ensure_confirmed(shard):
            raise RegionUnavailable(
                "this region cannot confirm who holds the account's shard (etcd majority "
                "unreachable); nothing stale is served",
                retry_after_s=RETRY_AFTER_S,
            )

    async def read(self, slot: int, op: str, fn: Any, deadline: Deadline) -> tuple[Any, Shard]:
        """Run a read on the home primary of ``slot``: ``fn(store, timeout_s)``, only while the
        shard's epoch is confirmed (:meth:`require_confirmed`)."""
        shard, _ = self.topology.route(slot)
        await self.require_confirmed(shard)
        breaker = self._breaker(shard.primary)
        refusal = self._circuit_open(shard, breaker)
        if refusal is not None:
            raise refusal
        try:
            store = await self.stores.for_node(shard.primary)
            value = await self._timed(shard.name, op, fn(store, max(deadline.remaining(), 0.01)))
        except (StoreUnavailable, StoreOutcomeUnknown) as exc:
            self._record(breaker, exc, deadline)
            raise RegionUnavailable(
                "the account's home shard is not reachable", retry_after_s=RETRY_AFTER_S
            ) from exc
        self._record(breaker, None, deadline)
        return value, shard


def _item(
    tenant: str,
    req: TransferRequest,
    key: str,
    transfer_id: uuid.UUID,
    source_epoch: int,
    dest_epoch: int,
    dest_shard: str | None,
) -> TransferItem:
    return TransferItem(
        transfer_id=transfer_id,
        tenant=tenant,
        source=req.source,
        destination=req.destination,
        amount=req.amount,
        currency=req.currency,
        reference=req.reference,
        idempotency_key=key,
        fingerprint=transfer_fingerprint(
            source=req.source,
            destination=req.destination,
            amount=req.amount,
            currency=req.currency,
            reference=req.reference,
        ),
        source_slot_epoch=source_epoch,
        destination_slot_epoch=dest_epoch,
        destination_shard=dest_shard,
    )


# Request ids: a random per-process prefix and a counter (0.5 us; uuid4 was 4-6 us per request).
# Unique across workers and restarts by the prefix, never reused within a process.
_RID_PREFIX = uuid.uuid4().hex[:12]
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_RID_PREFIX}-{next(_rid_counter):x}"
