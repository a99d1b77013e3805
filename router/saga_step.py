"""The saga's inline step: the router delivers a cross-shard transfer's leg 2 itself.

After leg 1 commits on the source shard (debit, transit credit, outbox message), the router
delivers leg 2 to the destination's shard and marks the source, waiting at most
``INLINE_SETTLE_WAIT_S``, so most cross-shard transfers answer ``settled`` (DESIGN.md sections
6 and 10). Past the bound the delivery goes on in the background and the answer is ``pending``;
the outbox relays take over only after ``RELAY_GRACE_S`` (never in parallel), and a second
delivery is harmless (inbox dedupe). The deliveries themselves are ``router.relays.outbox``'s.
"""

from __future__ import annotations

import asyncio
import logging

from consistency.saga import FINAL_STATUSES, STATUS_OF, TransferStatus
from regionstore.store import OutboxMessage
from router.limits import INLINE_DELIVERIES_MAX, INLINE_SETTLE_WAIT_S
from router.metrics import Metrics
from router.model import PostedTransfer, TransferRequest
from router.relays.outbox import Delivery, OutboxRelay
from router.resolver import Resolver

log = logging.getLogger(__name__)


class InlineSettler:
    def __init__(self, resolver: Resolver | None, metrics: Metrics, region: str) -> None:
        # A resolver over the relays' DB role, the only one that may run leg 2 and the settle.
        # None (no relay credentials): nothing is delivered inline, and every cross-shard
        # transfer answers pending for the relays to finish.
        self._resolver = resolver
        self._metrics = metrics
        self._region = region
        self._relays: dict[str, OutboxRelay] = {}
        self._inline: set[asyncio.Task[Delivery]] = set()

    def relay_for(self, source_shard: str) -> OutboxRelay:
        relay = self._relays.get(source_shard)
        if relay is None:
            assert self._resolver is not None
            relay = OutboxRelay(
                source_shard, self._resolver, region=self._region, metrics=self._metrics
            )
            self._relays[source_shard] = relay
        return relay

    async def close(self) -> None:
        """Stop inline deliveries (idempotent: the relays finish them)."""
        for task in list(self._inline):
            task.cancel()
        await asyncio.gather(*self._inline, return_exceptions=True)

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
        if len(self._inline) >= INLINE_DELIVERIES_MAX or self._resolver is None:
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
