"""Account opens on a home shard's primary, idempotent with a key (issue 16). No HTTP here.

Without a key an open goes to a random shard homed in the region asked for (or the router's),
and a retry may open another account. With a key, one shard decides for every region: the
key's arbiter (``consistency.idempotency.open_shards``, a hash of (tenant, key) over the
shards), whose ``txr.account_open_keys`` primary key arbitrates concurrent and repeated opens
from any router. When the account belongs on that shard too (no ``home_region``, or the one the
arbiter is homed in) the key row and the account are one transaction. Otherwise the open is two
steps: claim the key and an account id on the arbiter (``txr.claim_account_key``), then open
that id on its own shard with the same key, whose row there makes the second step idempotent;
a retry that finds the claim repeats the second step with the claimed id, so whatever dies in
between, the next retry finishes the same account. A claimed id that turns out to be taken on
its shard (a clash of random bits) is released and the open starts again with a new one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from consistency import ids
from consistency.idempotency import account_open_fingerprint, open_shards
from consistency.topology import Shard, Topology
from regionstore.errors import StoreInvariantViolation, StoreOutcomeUnknown, StoreUnavailable
from regionstore.store import AccountRow, CreateAccountCode, ShardStore
from router.limits import ACCOUNT_ID_RETRIES_MAX, RETRY_AFTER_S, STALE_RETRIES_MAX
from router.metrics import Metrics
from router.outcomes import Invalid, KeyReused, NothingWritten, RouteOutcome, UnknownOutcome
from router.resolver import Deadline, Resolver

log = logging.getLogger(__name__)

_FENCED = frozenset({CreateAccountCode.STALE_EPOCH, CreateAccountCode.WRONG_SHARD})
_OPENED = frozenset({CreateAccountCode.OK, CreateAccountCode.REPLAYED})
_UNKNOWN_KEYED = (
    "the account may or may not have been created; retry with the same Idempotency-Key to "
    "learn which"
)
_RETRY_KEYED = "no account was opened; retry with the same Idempotency-Key"

T = TypeVar("T")


class _Fenced(Exception):
    """A store refused under its fence: reload the topology and try again (nothing written)."""


class AccountOpens:
    def __init__(self, resolver: Resolver, metrics: Metrics) -> None:
        self._resolver = resolver
        self._metrics = metrics
        self._region = resolver.region

    async def create_account(
        self,
        *,
        tenant: str,
        home_region: str | None,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
        idempotency_key: str | None = None,
    ) -> tuple[AccountRow, Shard, bool]:
        """Open an account: ``(row, shard, replayed)``. Without ``home_region`` a keyless open
        is homed in this router's region and a keyed one in its key's (the same from every
        router)."""
        for _attempt in range(STALE_RETRIES_MAX + 1):
            topo = self._resolver.topology
            try:
                if idempotency_key is None:
                    return await self._open_unkeyed(
                        topo,
                        tenant,
                        home_region or self._region,
                        currency,
                        overdraft_limit,
                        metadata,
                        deadline,
                    )
                return await self._open_keyed(
                    topo,
                    tenant,
                    home_region,
                    currency,
                    overdraft_limit,
                    metadata,
                    deadline,
                    idempotency_key,
                )
            except _Fenced:
                if not deadline.expired():
                    await self._resolver.refresh_after(topo.revision)
        raise NothingWritten("the region's shards are changing hands; retry shortly")

    async def _open_unkeyed(
        self,
        topo: Topology,
        tenant: str,
        region: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
    ) -> tuple[AccountRow, Shard, bool]:
        homed = topo.shards_homed_in(region)
        if not homed:
            raise Invalid(f"no shard is homed in region {region!r}")
        shard = random.choice(homed)
        for _clash in range(ACCOUNT_ID_RETRIES_MAX):
            account_id = ids.new_account_id(random.choice(_slots(topo, shard)))
            code, row = await self._create_one(
                topo, shard, account_id, tenant, currency, overdraft_limit, metadata, deadline
            )
            if code in _OPENED:
                assert row is not None
                return row, shard, False
        raise NothingWritten("could not allocate an account id", retry_after_s=1)

    async def _open_keyed(
        self,
        topo: Topology,
        tenant: str,
        home_region: str | None,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
        key: str,
    ) -> tuple[AccountRow, Shard, bool]:
        homes = {name: s.home_region for name, s in topo.shards.items()}
        plan = open_shards(tenant, key, homes, home_region)
        if plan is None:
            raise Invalid(f"no shard is homed in region {home_region!r}")
        fingerprint = account_open_fingerprint(
            currency=currency,
            home_region=home_region,
            overdraft_limit=overdraft_limit,
            metadata=metadata,
        )
        fields = (tenant, currency, overdraft_limit, metadata)
        arbiter = topo.shards[plan.arbiter]
        target = topo.shards[plan.target]
        for _clash in range(ACCOUNT_ID_RETRIES_MAX):
            account_id = ids.new_account_id(random.choice(_slots(topo, target)))
            if arbiter.name == target.name:
                code, row = await self._create_one(
                    topo, target, account_id, *fields, deadline, key, fingerprint
                )
                if code in _OPENED:
                    assert row is not None
                    return row, target, code is CreateAccountCode.REPLAYED
                continue  # id taken: the key row was taken back with it
            claim, claimed_id = await self._claim(
                arbiter, account_id, *fields, deadline, key, fingerprint
            )
            fresh = claim is CreateAccountCode.CLAIMED
            assert claimed_id is not None
            # The claimed id's slot decides where the account is now (it may have moved).
            owner, _ = topo.route(ids.account_slot(claimed_id))
            code, row = await self._create_one(
                topo, owner, claimed_id, *fields, deadline, key, fingerprint
            )
            if code in _OPENED:
                assert row is not None
                # The claim decides who was first: concurrent openers get one fresh answer.
                return row, owner, not fresh
            if not fresh:
                # Opened by an earlier attempt and moved with its slot since: the new shard
                # has the account but not the key row. Answer as the open did.
                moved = await self._opened_earlier(owner, claimed_id, tenant, deadline)
                if moved is not None:
                    return moved, owner, True
            await self._release(arbiter, tenant, key, claimed_id, deadline)
        raise NothingWritten("could not allocate an account id", retry_after_s=1)

    async def _run(
        self,
        shard: Shard,
        what: str,
        call: Callable[[ShardStore], Awaitable[T]],
        deadline: Deadline,
        unknown: RouteOutcome,
    ) -> T:
        """One store call on ``shard``'s primary within the deadline: unreachable is
        :class:`NothingWritten`, a sent call that did not answer is ``unknown``."""
        # Earlier steps were refused (id taken, fence) or wrote only a claim: no account.
        if deadline.expired():
            raise NothingWritten(
                "the request deadline passed before the account was created; no account was opened",
                retry_after_s=RETRY_AFTER_S,
            )
        try:
            store = await self._resolver.stores.for_node(shard.primary)
            return await self._resolver.timed(shard.name, what, call(store))
        except StoreUnavailable as exc:
            raise NothingWritten(
                f"shard {shard.name} is not reachable; no account was opened",
                retry_after_s=RETRY_AFTER_S,
            ) from exc
        except StoreOutcomeUnknown as exc:
            raise unknown from exc

    async def _claim(
        self,
        arbiter: Shard,
        account_id: int,
        tenant: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
        key: str,
        fingerprint: bytes,
    ) -> tuple[CreateAccountCode, int | None]:
        code, claimed = await self._run(
            arbiter,
            "claim_account_key",
            lambda store: store.claim_account_key(
                shard_epoch=arbiter.epoch,
                tenant=tenant,
                key=key,
                fingerprint=fingerprint,
                account_id=account_id,
                currency=currency,
                overdraft_limit=overdraft_limit,
                metadata=metadata,
                timeout_s=deadline.remaining(),
            ),
            deadline,
            UnknownOutcome(_UNKNOWN_KEYED),
        )
        self._refused(arbiter, code)
        return code, claimed

    async def _release(
        self, arbiter: Shard, tenant: str, key: str, account_id: int, deadline: Deadline
    ) -> None:
        # No account was opened either way; a claim left behind is released by a retry.
        await self._run(
            arbiter,
            "release_account_key",
            lambda store: store.release_account_key(
                shard_epoch=arbiter.epoch,
                tenant=tenant,
                key=key,
                account_id=account_id,
                timeout_s=deadline.remaining(),
            ),
            deadline,
            NothingWritten(_RETRY_KEYED, retry_after_s=RETRY_AFTER_S),
        )

    async def _opened_earlier(
        self, owner: Shard, account_id: int, tenant: str, deadline: Deadline
    ) -> AccountRow | None:
        row = await self._run(
            owner,
            "get_account",
            lambda store: store.get_account(account_id, tenant, timeout_s=deadline.remaining()),
            deadline,
            NothingWritten(_RETRY_KEYED, retry_after_s=RETRY_AFTER_S),
        )
        if row is None:
            return None
        # The answer of the open, as a replay from the key row gives it: balance 0, version 1.
        return AccountRow(
            id=row.id,
            tenant=row.tenant,
            currency=row.currency,
            balance=0,
            overdraft_limit=row.overdraft_limit,
            version=1,
            metadata=row.metadata,
            created_at=row.created_at,
        )

    def _refused(self, shard: Shard, code: CreateAccountCode) -> None:
        """Raise what a refusal means: a reused key is 409; a fence refusal reloads."""
        if code is CreateAccountCode.KEY_REUSED:
            raise KeyReused("this Idempotency-Key was used for a different request")
        if code in _FENCED:
            self._metrics.fence_rejections.labels(self._region, shard.name, code.value).inc()
            raise _Fenced

    async def _create_one(
        self,
        topo: Topology,
        shard: Shard,
        account_id: int,
        tenant: str,
        currency: str,
        overdraft_limit: int,
        metadata: Mapping[str, Any],
        deadline: Deadline,
        idempotency_key: str | None = None,
        fingerprint: bytes | None = None,
    ) -> tuple[CreateAccountCode, AccountRow | None]:
        """One ``txr.create_account`` call: ``ok``/``replayed`` with the row, or ``id_taken``;
        a fence refusal raises :class:`_Fenced`, a reused key :class:`KeyReused`."""
        _, slot_epoch = topo.slots.lookup(ids.account_slot(account_id))
        # Without a key a retry may leave a stray empty account, never a wrong balance.
        unknown = UnknownOutcome(
            _UNKNOWN_KEYED
            if idempotency_key is not None
            else "the account may or may not have been created"
        )
        try:
            code, row = await self._run(
                shard,
                "create_account",
                lambda store: store.create_account(
                    shard_epoch=shard.epoch,
                    slot_epoch=slot_epoch,
                    account_id=account_id,
                    tenant=tenant,
                    currency=currency,
                    overdraft_limit=overdraft_limit,
                    metadata=metadata,
                    timeout_s=deadline.remaining(),
                    idempotency_key=idempotency_key,
                    fingerprint=fingerprint,
                ),
                deadline,
                unknown,
            )
        except StoreInvariantViolation as exc:
            log.error("shard %s refused an account: %s", shard.name, exc)
            raise Invalid("the home shard refused this account; nothing was written") from exc
        self._refused(shard, code)
        return code, row


def _slots(topo: Topology, shard: Shard) -> tuple[int, ...]:
    slots = topo.slots.slots_of(shard.name)
    if not slots:
        raise NothingWritten(f"shard {shard.name} owns no slots", retry_after_s=RETRY_AFTER_S)
    return slots
