"""The outbox relay: delivers a source shard's cross-shard transfers (DESIGN.md section 6).

For each pending outbox message: leg 2 on the destination shard's current primary
(``apply_inbound``: exactly once by the inbox row), then the source's mark (``settle_outbound``:
settled, or the reversal with the refusal code, exactly once by the outbox row lock). Both are
idempotent, so delivery is at least once and a relay may die at any point: a message claimed and
dropped is due again when its lease ends, a leg 2 applied but not marked is re-delivered, gets
the recorded answer, and is marked then.

Several relays may serve one source shard (every region runs one, and the router delivers inline
right after leg 1): ``claim_outbox`` uses FOR UPDATE SKIP LOCKED and a lease, so they share the
work instead of repeating it; when they do overlap, idempotency makes it harmless.

Wake-ups: leg 1 NOTIFYs on commit; ``run`` waits on it, until the next pending message is due
(the inline delivery's grace, a backoff), or at most ``POLL_INTERVAL_S`` (a long safety net):
no query runs on a timer while nothing is pending. A LISTEN connection that was reopened makes
the relay look at once (notifications sent while it was down are lost).
Failures never drop a message (money is in flight): they are retried with exponential backoff
and full jitter, forever, with a warning once a message has failed many times.

Authentication: leg 2 applies only a message leg 1 signed, and the settle only leg 2's signed
receipt (regionstore/sql/functions/saga.sql); the relay passes both through and never holds the
key. A message refused as ``unauthenticated`` or ``expired`` is kept pending and logged at error.

Retention: the same loop prunes the source shard's expired idempotency keys and final saga rows
every ``RETENTION_INTERVAL_S`` (consistency.limits), in bounded batches.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

from consistency.limits import RETENTION_BATCH_MAX, RETENTION_INTERVAL_S
from regionstore.errors import StoreError, StoreInvariantViolation
from regionstore.store import (
    INBOUND_REFUSALS,
    InboundCode,
    OutboxMessage,
    SettleCode,
    ShardStore,
)
from router.metrics import Metrics

log = logging.getLogger(__name__)

# Backoff between attempts of one message: exponential from BASE, capped at CAP, full jitter
# (AWS architecture blog, "Exponential Backoff And Jitter"): a destination that comes back
# after a failover is not hit by every relay's retries at the same instant, and the cap bounds
# how long a message waits after the destination is healthy again.
BACKOFF_BASE_S: Final = 0.1
BACKOFF_CAP_S: Final = 10.0
# Past this many attempts a message is logged at warning on every failure: at the cap that is
# minutes of a stuck transfer, worth a human look (the outbox age gauge pages before).
ATTEMPTS_WARN_AFTER: Final = 20
# Messages claimed per round: bounds the rows one claim locks and the work one lease covers.
CLAIM_BATCH_MAX: Final = 64
# Deliveries in flight at once per relay: bounds connections taken from each destination's pool
# (the router's pools hold 10) while a batch drains.
DELIVERY_CONCURRENCY: Final = 8
# Per-call deadlines. A leg 2 or settle is one short transaction plus the synchronous standby's
# commit wait across regions; beyond this the primary is as good as down and we retry later.
APPLY_TIMEOUT_S: Final = 5.0
SETTLE_TIMEOUT_S: Final = 5.0
CLAIM_TIMEOUT_S: Final = 5.0
DEFER_TIMEOUT_S: Final = 5.0
STATS_TIMEOUT_S: Final = 5.0
# How long a claimed message stays invisible to other relays. It must outlast a whole batch at
# the worst: ceil(CLAIM_BATCH_MAX / DELIVERY_CONCURRENCY) waves of (apply + settle) timeouts =
# 8 * 10 s; a relay that dies mid-delivery delays its messages by at most this.
LEASE_S: Final = 90.0
# When nothing is pending: wait this long for a NOTIFY (leg 1's commit) before looking again.
# Only a safety net: a notification cannot be lost without the LISTEN connection breaking, and a
# reopened connection makes the relay look at once (ShardStore.wait_for_outbox); pending
# messages that are not due yet (the inline delivery's grace, a backoff, a lease) wake the relay
# at their due time instead. So an idle relay costs one small query per this interval.
POLL_INTERVAL_S: Final = 30.0
# How long to wait at least before looking again for a message that is not due yet, so that a
# clock rounding never turns the wait into a busy loop.
DUE_WAIT_S_MIN: Final = 0.01
# The outbox depth/age gauges are refreshed this often (one small aggregate query).
STATS_INTERVAL_S: Final = 5.0
# After an unexpected error in a round (the source primary down): pause before the next one.
ROUND_ERROR_PAUSE_S: Final = 1.0
# One prune call (bounded deletes of RETENTION_BATCH_MAX rows per kind).
PRUNE_TIMEOUT_S: Final = 10.0
# Leg 2 answers that record nothing and will not change by retrying soon: a forged or altered
# message, or one signed with a key the destination lacks; a leg 1 older than the window.
_UNDELIVERABLE: Final = frozenset({InboundCode.UNAUTHENTICATED, InboundCode.EXPIRED})

DeliveryOutcome = Literal["settled", "reversed", "already", "retry"]


class ShardResolver(Protocol):
    """The relay's view of the topology (router.resolver.Resolver; a static map in tests)."""

    def route_account(self, account_id: int) -> tuple[str, int, int]:
        """(shard name, shard epoch, slot epoch) of the account's home, as currently known."""
        ...

    def shard_epoch(self, shard: str) -> int: ...

    async def store_for_shard(self, shard: str) -> ShardStore:
        """The shard's current primary."""
        ...

    async def refresh(self) -> None:
        """Reload the topology (after stale_epoch / wrong_shard)."""
        ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery achieved. ``code``: the refusal code for ``reversed``, the transfer's
    status for ``already``, the reason for ``retry`` (a store code or an error kind)."""

    outcome: DeliveryOutcome
    code: str | None


def backoff_s(attempts: int, rng: random.Random) -> float:
    """Full-jitter delay after ``attempts`` failed attempts: uniform in [0, min(cap, base*2^n)]."""
    exp = min(max(attempts - 1, 0), 32)  # 2^32 * base is far past the cap: no float overflow
    return rng.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2.0**exp)))


class OutboxRelay:
    """Delivers the outbox of one source shard."""

    def __init__(
        self,
        source_shard: str,
        resolver: ShardResolver,
        *,
        region: str,
        metrics: Metrics | None = None,
        lease_s: float = LEASE_S,
        poll_interval_s: float = POLL_INTERVAL_S,
        batch_max: int = CLAIM_BATCH_MAX,
        concurrency: int = DELIVERY_CONCURRENCY,
        rng: random.Random | None = None,
    ) -> None:
        if min(lease_s, poll_interval_s) <= 0 or min(batch_max, concurrency) < 1:
            raise ValueError("lease, poll interval, batch and concurrency must be positive")
        self.source_shard = source_shard
        self.resolver = resolver
        self.region = region
        self.metrics = metrics
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.batch_max = batch_max
        self._gate = asyncio.Semaphore(concurrency)
        self._rng = rng or random.Random()
        # Messages the last round claimed: a full batch means more is probably due.
        self._claimed = 0

    # -- one message -----------------------------------------------------------------------

    async def deliver(self, msg: OutboxMessage) -> Delivery:
        """Leg 2 on the destination, then the source's mark. Idempotent; never raises for an
        operational failure (it answers ``retry``: the message stays pending)."""
        try:
            delivery = await self._deliver(msg)
        except StoreInvariantViolation:
            # A bug (bad arguments, a broken ledger assertion): nothing was committed. Keep the
            # message (money is in flight) and shout; retrying may succeed after a fix.
            log.exception(
                "outbox %s: transfer %s refused as invalid", self.source_shard, msg.transfer_id
            )
            delivery = Delivery("retry", "invariant_violation")
        except StoreError as exc:
            # Unavailable / outcome unknown: both calls are idempotent, so just try again.
            delivery = Delivery("retry", type(exc).__name__)
        except (KeyError, LookupError) as exc:
            # The topology does not know a shard (mid-change): refresh and try again later.
            log.warning(
                "outbox %s: cannot resolve for %s: %r", self.source_shard, msg.transfer_id, exc
            )
            await self._refresh()
            delivery = Delivery("retry", "unresolved")
        self._observe(msg, delivery)
        return delivery

    async def _deliver(self, msg: OutboxMessage) -> Delivery:
        key_id, mac = msg.key_id, msg.mac
        if mac is None:
            # Not claimed from the outbox (the router's inline delivery right after leg 1):
            # leg 1's signature is in the row.
            source = await self.resolver.store_for_shard(self.source_shard)
            key_id, mac = await source.outbox_signature(msg.transfer_id, timeout_s=CLAIM_TIMEOUT_S)
            if mac is None:
                return Delivery("retry", "unsigned")
        dest_shard, dest_epoch, slot_epoch = self.resolver.route_account(msg.destination)
        dest = await self.resolver.store_for_shard(dest_shard)
        started = time.perf_counter()
        inbound = await dest.apply_inbound(
            dest_epoch,
            transfer_id=msg.transfer_id,
            source_shard=self.source_shard,
            tenant=msg.tenant,
            source=msg.source,
            destination=msg.destination,
            amount=msg.amount,
            currency=msg.currency,
            destination_slot_epoch=slot_epoch,
            created_at=msg.created_at,
            key_id=key_id,
            mac=mac,
            timeout_s=APPLY_TIMEOUT_S,
        )
        self._observe_call(dest_shard, "apply_inbound", started)
        if inbound.code in (InboundCode.STALE_EPOCH, InboundCode.WRONG_SHARD):
            # Our map is behind (failover or a slot move): nothing was recorded there.
            await self._refresh()
            return Delivery("retry", inbound.code.value)
        if inbound.code in _UNDELIVERABLE:
            log.error(
                "outbox %s: %s refused transfer %s as %s; it stays pending",
                self.source_shard,
                dest_shard,
                msg.transfer_id,
                inbound.code.value,
            )
            return Delivery("retry", inbound.code.value)
        refusal = inbound.code.value if inbound.code in INBOUND_REFUSALS else None
        # Where leg 2's transit debit happened: the shard that answered, unless it replayed an
        # inbox row that arrived with a slot move. When the destination's slot moved after leg 1
        # this is not the shard leg 1 named, and the settle moves leg 1's transit credit to match.
        leg2_shard = inbound.debit_shard or dest_shard

        source = await self.resolver.store_for_shard(self.source_shard)
        started = time.perf_counter()
        settle = await source.settle_outbound(
            self.resolver.shard_epoch(self.source_shard),
            msg.transfer_id,
            refusal_code=refusal,
            timeout_s=SETTLE_TIMEOUT_S,
            leg2_shard=leg2_shard,
            receipt=inbound.receipt,
        )
        self._observe_call(self.source_shard, "settle_outbound", started)
        if settle.code is SettleCode.STALE_EPOCH:
            await self._refresh()
            return Delivery("retry", settle.code.value)
        if settle.code is SettleCode.UNAUTHENTICATED:
            log.error(
                "outbox %s: settle of %s refused %s's receipt",
                self.source_shard,
                msg.transfer_id,
                dest_shard,
            )
            return Delivery("retry", settle.code.value)
        if settle.code is SettleCode.ALREADY:
            return Delivery("already", settle.status)
        if settle.code is SettleCode.REVERSED:
            return Delivery("reversed", refusal)
        return Delivery("settled", None)

    async def _refresh(self) -> None:
        try:
            await self.resolver.refresh()
        except Exception as exc:  # noqa: BLE001 - etcd down: keep the last map, retry later
            log.warning("outbox %s: topology refresh failed: %r", self.source_shard, exc)

    def _observe_call(self, shard: str, op: str, started: float) -> None:
        """Leg 2 and the settle mark, as store calls (one WAN round trip and one commit each)."""
        if self.metrics is not None:
            self.metrics.store_latency.labels(self.region, shard, op).observe(
                time.perf_counter() - started
            )

    def _observe(self, msg: OutboxMessage, delivery: Delivery) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.delivery_attempts.labels(self.region, self.source_shard, delivery.outcome).inc()
        if delivery.outcome in ("settled", "reversed"):
            age = (datetime.now(UTC) - msg.created_at).total_seconds()
            m.settle_latency.labels(self.region, self.source_shard, delivery.outcome).observe(
                max(age, 0.0)
            )

    # -- the loop --------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Claim a bounded batch of due messages and deliver them; failures are deferred with
        backoff. Returns how many finished (settled, reversed, or found already done)."""
        source = await self.resolver.store_for_shard(self.source_shard)
        batch = await source.claim_outbox(
            limit=self.batch_max, lease_s=self.lease_s, timeout_s=CLAIM_TIMEOUT_S
        )
        self._claimed = len(batch)
        if not batch:
            return 0
        results = await asyncio.gather(*(self._deliver_gated(source, m) for m in batch))
        return sum(results)

    async def _deliver_gated(self, source: ShardStore, msg: OutboxMessage) -> int:
        async with self._gate:
            delivery = await self.deliver(msg)
            if delivery.outcome != "retry":
                return 1
            delay = backoff_s(msg.attempts, self._rng)
            level = logging.WARNING if msg.attempts > ATTEMPTS_WARN_AFTER else logging.DEBUG
            log.log(
                level,
                "outbox %s: transfer %s attempt %d failed (%s); retry in %.2fs",
                self.source_shard,
                msg.transfer_id,
                msg.attempts,
                delivery.code,
                delay,
            )
            try:
                await source.defer_outbox(msg.transfer_id, delay_s=delay, timeout_s=DEFER_TIMEOUT_S)
            except StoreError as exc:
                # The lease still holds it back; it is retried when the lease ends.
                log.warning(
                    "outbox %s: defer of %s failed: %s", self.source_shard, msg.transfer_id, exc
                )
            return 0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set: rounds back to back while work is due, else wait for a
        NOTIFY (at most the poll interval)."""
        next_stats = 0.0
        next_prune = 0.0
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._claimed = 0
                try:
                    if time.monotonic() >= next_stats:
                        next_stats = time.monotonic() + STATS_INTERVAL_S
                        await self._update_gauges()
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + RETENTION_INTERVAL_S
                        await self.prune()
                    await self.run_once()
                except StoreError as exc:
                    log.warning("outbox %s: round failed: %s", self.source_shard, exc)
                    await _wait_either(stop_wait, asyncio.sleep(ROUND_ERROR_PAUSE_S))
                    continue
                except (KeyError, LookupError) as exc:
                    log.warning("outbox %s: source unresolved: %r", self.source_shard, exc)
                    await self._refresh()
                    await _wait_either(stop_wait, asyncio.sleep(ROUND_ERROR_PAUSE_S))
                    continue
                if self._claimed >= self.batch_max:
                    continue  # a full batch: more is probably due
                try:
                    source = await self.resolver.store_for_shard(self.source_shard)
                    due_s = await source.outbox_next_due_s(timeout_s=STATS_TIMEOUT_S)
                except (KeyError, LookupError):
                    continue
                except StoreError as exc:
                    log.warning("outbox %s: next due unknown: %s", self.source_shard, exc)
                    due_s = ROUND_ERROR_PAUSE_S
                wait_s = self.poll_interval_s
                if due_s is not None:
                    wait_s = min(wait_s, max(due_s, DUE_WAIT_S_MIN))
                await _wait_either(stop_wait, source.wait_for_outbox(wait_s))
        finally:
            stop_wait.cancel()

    async def prune(self) -> dict[str, int]:
        """One bounded retention pass on the source shard (sql/functions/retention.sql)."""
        source = await self.resolver.store_for_shard(self.source_shard)
        pruned = await source.prune_retained(batch=RETENTION_BATCH_MAX, timeout_s=PRUNE_TIMEOUT_S)
        if any(pruned.values()):
            log.info("outbox %s: retention pruned %s", self.source_shard, pruned)
        return pruned

    async def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        source = await self.resolver.store_for_shard(self.source_shard)
        depth, oldest = await source.outbox_stats(timeout_s=STATS_TIMEOUT_S)
        self.metrics.outbox_depth.labels(self.region, self.source_shard).set(depth)
        self.metrics.outbox_oldest_age.labels(self.region, self.source_shard).set(oldest)


async def _wait_either(stop_wait: asyncio.Future[Any], work: Coroutine[Any, Any, Any]) -> None:
    """Run ``work`` until it ends or ``stop_wait`` does; cancel it in the latter case."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    elif not task.cancelled():
        task.result()
