"""The write path: transfers and account creation on the home shard's primary (DESIGN.md 4).

A transfer is resolved to its shard (``router.resolver``), joins the shard's batcher (one
stored-procedure call, one commit for many transfers), and its committed versions go into the
region cache before it answers. Fence refusals (``stale_epoch`` / ``wrong_shard``) reload the
topology and retry once with the same transfer id; an unreachable primary holds the write
(bounded) while a failover publishes the new one. It never guesses an outcome: what it
returns is the store's result, and what it cannot do is a ``router.outcomes`` value that says
whether anything may have been written (G7). No HTTP here.

A cross-shard transfer's leg 1 is posted here; its inline leg 2 is ``router.saga_step``; account
opens are ``router.opens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from consistency import ids
from consistency.idempotency import transfer_fingerprint
from consistency.topology import Shard, Topology
from regionstore.errors import StoreInvariantViolation, StoreOutcomeUnknown, StoreUnavailable
from regionstore.store import (
    AccountRow,
    ShardStore,
    TransferCode,
    TransferItem,
    TransferResult,
)
from router.batcher import BatcherFull, DeadlinePassedUnsent, ShardBatcher, TenantQueueFull
from router.cache import RegionCache
from router.limits import (
    FAILOVER_BUFFER_S,
    FAILOVER_BUFFERED_MAX,
    FAILOVER_WAITS_MAX,
    OVERLOAD_RETRY_AFTER_S,
    RELAY_GRACE_S,
    RETRY_AFTER_S,
    STALE_RETRIES_MAX,
)
from router.metrics import Metrics
from router.model import PostedTransfer, TransferRequest
from router.opens import AccountOpens
from router.outcomes import (
    Invalid,
    Missing,
    NothingWritten,
    Refused,
    RouteOutcome,
    TenantOverloaded,
    UnknownOutcome,
)
from router.reads import ReadPolicy
from router.resolver import Deadline, Resolver

log = logging.getLogger(__name__)

_FENCE_CODES = frozenset({TransferCode.STALE_EPOCH, TransferCode.WRONG_SHARD})


class _PrimaryUnreachable(Exception):
    """The home primary could not be reached; the write was certainly not sent."""


class WritePath:
    def __init__(
        self, resolver: Resolver, reads: ReadPolicy, cache: RegionCache, metrics: Metrics
    ) -> None:
        self._resolver = resolver
        # The destination check of a cross-shard transfer is a read of its home primary.
        self._reads = reads
        # Committed batches are written into the region cache before their answers.
        self._cache = cache
        self._metrics = metrics
        self._region = resolver.region
        self._buffered = 0
        self._batchers: dict[tuple[str, int], ShardBatcher] = {}
        # Account opens (router.opens) share the resolver, not the batchers.
        self.opens = AccountOpens(resolver, metrics)

    async def close(self) -> None:
        """Drain the batches."""
        for batcher in list(self._batchers.values()):
            await batcher.close()

    async def post_many(
        self,
        tenant: str,
        reqs: Sequence[tuple[TransferRequest, str]],
        deadline: Deadline,
    ) -> list[PostedTransfer | RouteOutcome]:
        """Post independent transfers (a batch request): one outcome per item, in order.

        Same-shard items are queued into their shard's batcher all at once, admitted or shed
        together (``ShardBatcher.admit``), and awaited together (no task per item); an item
        that meets a fence refusal, an unreachable primary, or lives across shards takes
        ``post_transfer``'s full path, exactly as a single request would. Each item's errors
        are its own (a RouteOutcome in its place).
        """
        out: list[PostedTransfer | RouteOutcome | None] = [None] * len(reqs)
        topo = self._resolver.topology
        queued: list[tuple[int, asyncio.Future[TransferResult], Shard, int, TransferItem]] = []
        slow: list[int] = []
        by_shard: dict[str, list[tuple[int, Shard, int, TransferItem]]] = {}
        for i, (req, key) in enumerate(reqs):
            source_slot = ids.account_slot(req.source)
            shard, source_epoch = topo.route(source_slot)
            dest_shard, dest_epoch = topo.route(ids.account_slot(req.destination))
            if dest_shard.name != shard.name:
                slow.append(i)
                continue
            item = _item(tenant, req, key, ids.new_transfer_id(), source_epoch, dest_epoch, None)
            by_shard.setdefault(shard.name, []).append((i, shard, source_slot, item))
        for group in by_shard.values():
            shard = group[0][1]
            refusal: RouteOutcome | None = self._resolver.circuit_open(
                shard, self._resolver.breaker(shard.primary)
            )
            if refusal is None:
                batcher = self._batcher(shard)
                try:
                    # Queued or shed together (ShardBatcher.admit says why).
                    batcher.admit(tenant, len(group))
                except (BatcherFull, TenantQueueFull) as exc:
                    refusal = self._shed(shard.name, exc)
            if refusal is not None:
                for i, *_ in group:
                    out[i] = refusal
                continue
            for i, _shard, source_slot, item in group:
                fut = batcher.enqueue(item, timeout_s=deadline.remaining(), admitted=True)
                queued.append((i, fut, shard, source_slot, item))
        results = await asyncio.gather(*(q[1] for q in queued), return_exceptions=True)
        retry_ids: dict[int, uuid.UUID] = {}
        for (i, _fut, shard, source_slot, item), res in zip(queued, results, strict=True):
            self._resolver.record(
                self._resolver.breaker(shard.primary),
                None if isinstance(res, TransferResult) else res,
                deadline,
            )
            if isinstance(res, TransferResult):
                if res.code in _FENCE_CODES:
                    self._metrics.fence_rejections.labels(
                        self._region, shard.name, res.code.value
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
            except RouteOutcome as err:
                out[i] = err

        if slow:
            if any(i in retry_ids for i in slow):
                # The shard answered stale_epoch / wrong_shard: learn the new map once.
                with contextlib.suppress(NothingWritten):
                    await self._resolver.refresh_after(topo.revision)
            await asyncio.gather(*(full(i) for i in sorted(slow)))
        assert all(o is not None for o in out)
        return [o for o in out if o is not None]

    def _shed(self, shard: str, exc: BatcherFull | TenantQueueFull) -> RouteOutcome:
        """A write refused at the shard's queue, before anything was sent."""
        if isinstance(exc, TenantQueueFull):
            self._resolver.store_error(shard, "tenant_queue_full")
            return TenantOverloaded(
                f"this tenant has too many transfers queued for shard {shard}; retry shortly",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        self._resolver.store_error(shard, "shed")
        return NothingWritten(
            f"shard {shard} is overloaded; nothing was written, retry shortly",
            retry_after_s=OVERLOAD_RETRY_AFTER_S,
        )

    def _map_store_error(self, shard: str, exc: BaseException) -> RouteOutcome:
        if isinstance(exc, DeadlinePassedUnsent):
            # Still queued when its deadline passed, so never sent: surely not applied, which
            # is 503 with Retry-After, never outcome_unknown (G7).
            self._resolver.store_error(shard, "deadline_unsent")
            return NothingWritten(
                "the request deadline passed before the transfer reached its shard; "
                "nothing was written",
                retry_after_s=OVERLOAD_RETRY_AFTER_S,
            )
        if isinstance(exc, StoreOutcomeUnknown):
            self._resolver.store_error(shard, "outcome_unknown")
            return UnknownOutcome(
                "the transfer may or may not have been applied; retry with the same "
                "Idempotency-Key to learn its outcome"
            )
        if isinstance(exc, StoreInvariantViolation):
            self._resolver.store_error(shard, "invariant")
            log.error("shard %s refused a transfer: %s", shard, exc)
            return Invalid("the home shard refused this transfer; nothing was written")
        # Anything else reached the batch after it was sent: its outcome is unknown.
        log.error("batch call failed on shard %s: %r", shard, exc)
        return UnknownOutcome("the transfer may or may not have been applied; retry")

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
            topo = self._resolver.topology
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
                raise NothingWritten(
                    "the account's home shard is not reachable; nothing was written",
                    retry_after_s=RETRY_AFTER_S,
                ) from exc
            if result.code not in _FENCE_CODES:
                return PostedTransfer(
                    result, shard, source_slot, dest_shard.name if cross else None
                )
            self._metrics.fence_rejections.labels(self._region, shard.name, result.code.value).inc()
            if stale_retries >= STALE_RETRIES_MAX or deadline.expired():
                raise NothingWritten(
                    "the account's shard is moving; retry with the same Idempotency-Key",
                    retry_after_s=RETRY_AFTER_S,
                )
            stale_retries += 1
            await self._resolver.refresh_after(topo.revision)

    async def _await_new_primary(self, seen: Topology, shard: str, deadline: Deadline) -> bool:
        """Wait (bounded in time and in waiters) for ``shard``'s primary or epoch to change."""
        if self._buffered >= FAILOVER_BUFFERED_MAX:
            return False
        before = seen.shards[shard]
        self._buffered += 1
        self._metrics.failover_buffered.labels(self._region).set(self._buffered)
        try:
            end = time.monotonic() + min(deadline.remaining(), FAILOVER_BUFFER_S)
            while (left := end - time.monotonic()) > 0:
                now = self._resolver.topology.shards.get(shard)
                if now is not None and (now.epoch, now.primary) != (before.epoch, before.primary):
                    return True
                await self._resolver.watcher.wait_changed(left)
            return False
        finally:
            self._buffered -= 1
            self._metrics.failover_buffered.labels(self._region).set(self._buffered)

    async def _check_remote_destination(
        self, tenant: str, req: TransferRequest, deadline: Deadline
    ) -> None:
        async def fetch(store: ShardStore, timeout_s: float) -> AccountRow | None:
            return await store.get_account(req.destination, tenant, timeout_s=timeout_s)

        row, _ = await self._reads.primary(
            ids.account_slot(req.destination), "get_account", fetch, deadline
        )
        if row is None:
            raise Missing("source or destination account not found")
        if row.currency != req.currency:
            raise Refused(
                "source, destination and transfer currencies must match", code="currency_mismatch"
            )

    async def _post_one(
        self, shard: Shard, item: TransferItem, deadline: Deadline
    ) -> TransferResult:
        if deadline.expired():
            # Every earlier attempt was refused or never sent: nothing was written.
            raise NothingWritten(
                "the request deadline passed before the transfer was sent; nothing was written",
                retry_after_s=RETRY_AFTER_S,
            )
        breaker = self._resolver.breaker(shard.primary)
        refusal = self._resolver.circuit_open(shard, breaker)
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
            self._resolver.record(breaker, exc, deadline)
            self._resolver.store_error(shard.name, "unavailable")
            raise _PrimaryUnreachable(shard.name) from exc
        except StoreOutcomeUnknown as exc:
            self._resolver.store_error(shard.name, "outcome_unknown")
            raise UnknownOutcome(
                "the transfer may or may not have been applied; retry with the same "
                "Idempotency-Key to learn its outcome"
            ) from exc
        except StoreInvariantViolation as exc:
            # Rolled back: certainly not applied, so never an unknown outcome (G7).
            raise self._map_store_error(shard.name, exc) from exc
        self._resolver.record(breaker, None, deadline)
        return result

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
                lambda: self._resolver.stores.for_node(node),
                shard.epoch,
                observe_batch=self._metrics.batch_size.labels(self._region, shard.name).observe,
                observe_call=self._metrics.store_latency.labels(
                    self._region, shard.name, "post_transfers"
                ).observe,
                relay_grace_s=RELAY_GRACE_S,
                after_commit=functools.partial(self._cache_committed, shard.epoch),
            )
            self._batchers[key] = batcher
        return batcher

    async def _cache_committed(
        self, shard_epoch: int, items: Sequence[TransferItem], results: Sequence[TransferResult]
    ) -> None:
        """A committed batch's new versions into the region cache, one round trip (a tombstone
        per account at its new version: the transfer path knows only the balance)."""
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
        await self._cache.put_committed(shard_epoch, committed)


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
