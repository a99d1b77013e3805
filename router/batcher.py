"""Per-shard write batching: concurrent transfers for one shard share one call and one commit.

One call of ``txr.post_transfers`` costs one round trip and one synchronous-replication wait
whatever its size, so coalescing is the throughput lever (DESIGN.md section 4). The batcher is
adaptive: when no batch of the shard is in flight a transfer is sent at once (no linger while
idle); while batches are in flight, newcomers queue and leave together, up to a size bound, as
soon as an in-flight slot frees or the linger bound passes. Results come back per item; an
operational failure of the call reaches every item of that batch as the same exception.
A batch that the database aborts as a whole (an invariant violation, which no business outcome
causes) is retried item by item, so one bad item never fails its neighbours.

``after_commit`` runs once per committed batch before any of its items is answered: the
router writes the batch's new versions into the region cache there, in one round trip
(DESIGN.md section 4.3: the cache write precedes the answer).

Deadlines cost one timer per batcher, not one per item: waiting items sit in a heap ordered by
deadline and a single ``call_at`` handle fires at the earliest one, failing every expired item
with ``StoreOutcomeUnknown`` (issue 11: ``wait_for(shield())`` and a timer per item were ~30 us
of every transfer). The store call is timed once per batch (``observe_call``).

Overload and fairness (issue 16). An item whose deadline passes while it is still queued is
dropped, never sent, and fails with ``DeadlinePassedUnsent``: it surely did not happen, so it
is never an unknown outcome (only an item already handed to the store call is). The store call
of a batch runs within the latest deadline of its items (its timeout cancels the statement on
the server, regionstore.store ``_call``), so the database stops working on a batch as soon as
no caller waits for it. The queue is per tenant: one tenant holds at most ``tenant_queue_max``
of it (past that ``TenantQueueFull``, the router's 429), and batches are formed round-robin
over the tenants with items queued. Past the high-water mark (``queue_max`` items) or while
the oldest queued item has waited longer than the queue-delay target (``queue_delay_target_s``:
``queue_delay_rounds`` times the moving average of this shard's batch call time, within
``[queue_delay_min_s, queue_delay_max_s]``), new items are refused at once (``BatcherFull``,
the router's 503) so that the latency of admitted items stays bounded (router.limits says why
the target counts batch rounds). The target applies to a tenant that already has items queued;
one with none is shed only past ``queue_delay_max_s``, because round-robin puts its item into
the next batch whatever the others' backlog (a burst of one tenant must not shed another's
write, tests/integration/test_api_overload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from regionstore.errors import StoreInvariantViolation, StoreOutcomeUnknown
from regionstore.store import ShardStore, TransferItem, TransferResult
from router.limits import (
    BATCH_CALL_EWMA_WEIGHT,
    BATCH_INFLIGHT_MAX,
    BATCH_LINGER_US,
    BATCH_QUEUE_DELAY_MAX_S,
    BATCH_QUEUE_DELAY_MIN_S,
    BATCH_QUEUE_DELAY_ROUNDS,
    BATCH_QUEUE_ITEMS_MAX,
    BATCH_QUEUE_TENANT_SHARE,
    BATCH_SIZE_MAX,
)

log = logging.getLogger(__name__)


class BatcherFull(Exception):
    """The shard is past saturation (queue at its high-water mark, or its oldest item waited
    too long): the caller sheds the write (503 with Retry-After) instead of queueing it."""


class TenantQueueFull(Exception):
    """This tenant already holds its share of the shard's queue (429 for it; others get in)."""


class DeadlinePassedUnsent(Exception):
    """The item's deadline passed while it was still queued: it was never sent."""


AfterCommit = Callable[[Sequence[TransferItem], Sequence[TransferResult]], Awaitable[None]]


class _Pending:
    __slots__ = ("deadline", "enqueued_at", "future", "item", "queued")

    def __init__(
        self,
        item: TransferItem,
        future: asyncio.Future[TransferResult],
        enqueued_at: float,
        deadline: float,
    ) -> None:
        self.item = item
        self.future = future
        self.enqueued_at = enqueued_at
        self.deadline = deadline  # loop.time() by which the caller needs its answer
        # True while the item waits in the queue (not yet handed to a store call).
        self.queued = True


class ShardBatcher:
    """Batches for one (primary node, shard epoch): a batch carries exactly one epoch."""

    def __init__(
        self,
        store: Callable[[], Awaitable[ShardStore]],
        shard_epoch: int,
        *,
        size_max: int = BATCH_SIZE_MAX,
        inflight_max: int = BATCH_INFLIGHT_MAX,
        linger_us: int = BATCH_LINGER_US,
        queue_max: int = BATCH_QUEUE_ITEMS_MAX,
        tenant_queue_max: int = int(BATCH_QUEUE_ITEMS_MAX * BATCH_QUEUE_TENANT_SHARE),
        queue_delay_max_s: float = BATCH_QUEUE_DELAY_MAX_S,
        queue_delay_min_s: float = BATCH_QUEUE_DELAY_MIN_S,
        queue_delay_rounds: int = BATCH_QUEUE_DELAY_ROUNDS,
        observe_batch: Callable[[int], None] | None = None,
        relay_grace_s: float = 0.0,
        after_commit: AfterCommit | None = None,
        observe_call: Callable[[float], None] | None = None,
    ) -> None:
        self._store = store
        self._epoch = shard_epoch
        self._size_max = size_max
        self._inflight_max = inflight_max
        self._linger_s = linger_us / 1_000_000
        self._queue_max = queue_max
        self._tenant_queue_max = tenant_queue_max
        self._queue_delay_max_s = queue_delay_max_s
        self._queue_delay_min_s = min(queue_delay_min_s, queue_delay_max_s)
        self._queue_delay_rounds = queue_delay_rounds
        # Moving average of this shard's batch call time (0 until the first call returns).
        self._call_s = 0.0
        self._observe_batch = observe_batch
        self._relay_grace_s = relay_grace_s
        self._after_commit = after_commit
        self._observe_call = observe_call
        # Queued items per tenant (dict order is the round-robin order), the same items in
        # arrival order (for the age of the oldest), and the counts of those still queued.
        # Items that left the queue by their deadline are skipped lazily in both deques.
        self._by_tenant: dict[str, deque[_Pending]] = {}
        self._arrivals: deque[_Pending] = deque()
        self._queued = 0
        self._tenant_queued: dict[str, int] = {}
        # Waiting items by deadline (answered ones are dropped lazily), and the one timer.
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._linger_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        return self._queued

    def tenant_queued(self, tenant: str) -> int:
        return self._tenant_queued.get(tenant, 0)

    def oldest_wait_s(self) -> float:
        """How long the oldest item still queued has waited (0 when none is)."""
        arrivals = self._arrivals
        while arrivals and not arrivals[0].queued:
            arrivals.popleft()
        if not arrivals:
            return 0.0
        return asyncio.get_running_loop().time() - arrivals[0].enqueued_at

    def queue_delay_target_s(self) -> float:
        """How long the oldest queued item may wait before new items are shed."""
        target = self._queue_delay_rounds * self._call_s
        return min(self._queue_delay_max_s, max(self._queue_delay_min_s, target))

    async def submit(self, item: TransferItem, *, timeout_s: float) -> TransferResult:
        """The item's result. Raises the store's exception if its batch failed,
        ``StoreOutcomeUnknown`` if ``timeout_s`` passes once it was sent (the batch may still
        commit), and ``DeadlinePassedUnsent`` if it passes while the item is still queued."""
        # The future is failed by _expire when the deadline passes first; a caller that is
        # cancelled cancels only its own future (an item not yet sent is then dropped).
        return await self.enqueue(item, timeout_s=timeout_s)

    def admit(self, tenant: str, n: int = 1) -> None:
        """Raise ``TenantQueueFull`` or ``BatcherFull`` unless ``n`` more items of ``tenant``
        may be queued now. A batch request asks once for all its items on this shard, so that
        they are queued or shed together: shedding some of them would make an item's answer
        depend on where in the request it sits (the rate limiter's rule too)."""
        queued = self._tenant_queued.get(tenant, 0)
        if queued + n > self._tenant_queue_max:
            raise TenantQueueFull(
                f"tenant already has {queued} of at most {self._tenant_queue_max} transfers "
                "queued for this shard"
            )
        if self._queued + n > self._queue_max:
            raise BatcherFull(f"{self._queued} transfers already queued for this shard")
        waited = self.oldest_wait_s()
        # A tenant with nothing queued goes into the next batch (round-robin over tenants), so
        # the standing queue of others does not delay it: only the ceiling, a shard that has
        # stopped making progress, sheds it. Others' backlog sheds their own new items.
        limit = self.queue_delay_target_s() if queued else self._queue_delay_max_s
        if waited > limit:
            raise BatcherFull(f"the oldest queued transfer of this shard waited {waited:.3f}s")

    def enqueue(
        self, item: TransferItem, *, timeout_s: float, admitted: bool = False
    ) -> asyncio.Future[TransferResult]:
        """Queue ``item`` and return the future of its result (``submit`` without the await:
        a batch request queues all its items before it waits for any). Raises
        ``TenantQueueFull`` or ``BatcherFull`` at once, with nothing queued, unless the caller
        has just ``admit``ted it (``admitted``: no await in between, so the queue is as
        admitted)."""
        tenant = item.tenant
        if not admitted:
            self.admit(tenant)
        loop = asyncio.get_running_loop()
        now = loop.time()
        fut: asyncio.Future[TransferResult] = loop.create_future()
        p = _Pending(item, fut, now, now + timeout_s)
        queue = self._by_tenant.get(tenant)
        if queue is None:
            queue = self._by_tenant[tenant] = deque()
        queue.append(p)
        self._arrivals.append(p)
        self._queued += 1
        self._tenant_queued[tenant] = self._tenant_queued.get(tenant, 0) + 1
        self._watch(p, loop)
        self._schedule()
        return fut

    def _unqueue(self, p: _Pending) -> None:
        """Count ``p`` out of the queue (once); the deques drop it lazily."""
        if not p.queued:
            return
        p.queued = False
        self._queued -= 1
        tenant = p.item.tenant
        left = self._tenant_queued[tenant] - 1
        if left:
            self._tenant_queued[tenant] = left
        else:
            del self._tenant_queued[tenant]

    def _watch(self, p: _Pending, loop: asyncio.AbstractEventLoop) -> None:
        heap = self._deadlines
        # Answers come back roughly in deadline order: dropping answered items from the top
        # here keeps the heap near the number of items actually waiting.
        while heap and heap[0][2].future.done():
            heapq.heappop(heap)
        heapq.heappush(heap, (p.deadline, next(self._seq), p))
        if self._timer is None or p.deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(p.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._deadlines
        while heap and (heap[0][0] <= now or heap[0][2].future.done()):
            _, _, p = heapq.heappop(heap)
            if p.queued:
                # Never sent, and now it never will be: surely not applied.
                self._unqueue(p)
                _fail([p], DeadlinePassedUnsent("the deadline passed while the transfer queued"))
            elif not p.future.done():
                p.future.set_exception(
                    StoreOutcomeUnknown("the transfer's deadline passed while in a batch")
                )
        if heap:
            self._timer = loop.call_at(heap[0][0], self._expire)

    def _schedule(self) -> None:
        while self._queued and self._inflight < self._inflight_max:
            if self._inflight > 0 and self._queued < self._size_max and self._linger_s > 0:
                # Busy: give followers a moment to join this batch, bounded by the linger.
                if self._linger_task is None:
                    self._linger_task = asyncio.create_task(self._linger())
                return
            self._launch()

    async def _linger(self) -> None:
        try:
            await asyncio.sleep(self._linger_s)
        finally:
            self._linger_task = None
        while self._queued and self._inflight < self._inflight_max:
            self._launch()

    def _launch(self) -> None:
        batch = self._take(self._size_max)
        if not batch:
            return
        self._inflight += 1
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, n: int) -> list[_Pending]:
        """Up to ``n`` queued items, one per tenant in turn (round-robin), each counted out of
        the queue. An item whose deadline has passed (its timer not run yet) or whose caller
        was cancelled is dropped here instead: it was never sent."""
        now = asyncio.get_running_loop().time()
        by_tenant = self._by_tenant
        batch: list[_Pending] = []
        while by_tenant and len(batch) < n:
            tenant = next(iter(by_tenant))
            queue = by_tenant.pop(tenant)
            while queue:
                p = queue.popleft()
                if not p.queued:
                    continue  # already failed by its deadline
                self._unqueue(p)
                if p.future.done():
                    continue  # the caller was cancelled: nobody waits for an answer
                if p.deadline <= now:
                    _fail([p], DeadlinePassedUnsent("the deadline passed before it was sent"))
                    continue
                batch.append(p)
                break
            if queue:
                by_tenant[tenant] = queue  # to the back of the round
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            await self._send(batch)
        finally:
            self._inflight -= 1
            self._schedule()

    async def _send(self, batch: list[_Pending]) -> None:
        if self._observe_batch is not None:
            self._observe_batch(len(batch))
        # The batch runs as long as its most patient caller waits, no longer: the call's
        # timeout cancels the statement on the server (regionstore.store ``_call``).
        # (An item-by-item retry after an aborted batch may start past it: a token timeout.)
        timeout_s = max(max(p.deadline for p in batch) - asyncio.get_running_loop().time(), 1e-3)
        started = time.perf_counter()
        try:
            store = await self._store()
            # Reaching the store may have taken a while (a pool to open): items whose deadline
            # passed meanwhile are left out of the call. Their callers were (or are now) told
            # so; not sending what nobody waits for is within either answer.
            now = asyncio.get_running_loop().time()
            if any(p.deadline <= now for p in batch):
                _fail(
                    [p for p in batch if p.deadline <= now],
                    DeadlinePassedUnsent("the deadline passed before the batch was sent"),
                )
                batch = [p for p in batch if p.deadline > now]
                if not batch:
                    return
            results = await store.post_transfers(
                self._epoch,
                [p.item for p in batch],
                timeout_s=timeout_s,
                relay_grace_s=self._relay_grace_s,
            )
        except StoreInvariantViolation as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            # The transaction rolled back whole; find the culprit by sending items alone.
            log.warning("batch of %d aborted (%s); retrying item by item", len(batch), exc)
            for p in batch:
                await self._send([p])
            return
        except Exception as exc:  # noqa: BLE001 - every waiter must get the batch's failure
            _fail(batch, exc)
            return
        finally:
            took = time.perf_counter() - started
            self._call_s += BATCH_CALL_EWMA_WEIGHT * (took - self._call_s)
            if self._observe_call is not None:
                self._observe_call(took)
        assert len(results) == len(batch), "one result per item"
        if self._after_commit is not None:
            try:
                await self._after_commit([p.item for p in batch], results)
            except Exception:
                # The batch is committed: its answers must go out whatever the hook did.
                log.exception("after-commit hook failed for a batch of %d", len(batch))
        for p, res in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(res)

    async def close(self) -> None:
        if self._linger_task is not None:
            self._linger_task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)
            # Mark retrieved: a caller that timed out no longer awaits this future.
            p.future.exception()
