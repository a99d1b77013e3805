"""Per-tenant limits as kept in etcd: a request rate with its burst, and a cap on accounts.

``txr limits set`` writes one key per tenant under ``LIMITS_PREFIX``; every router mirrors the
prefix by a watch (router.ratelimit) and applies a change within two seconds. The account count
of each tenant is a counter under ``ACCOUNT_COUNT_PREFIX``: every router process adds the opens
it admitted once per poll interval (compare-and-swap, so concurrent flushes never lose a count)
and sees every tenant's total through a watch of that prefix; the request path never calls etcd
(the bound this puts on the cap is in router.ratelimit).

Both prefixes sit outside the topology's ``/txr/`` so that neither a limit change nor an account
open wakes the topology watchers of every router.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from consistency.errors import CasConflict
from consistency.etcd import EtcdClient

LIMITS_PREFIX: Final = "/txr-limits/"
ACCOUNT_COUNT_PREFIX: Final = "/txr-usage/accounts/"
# A tenant's rate, requests (transfers and account opens) per second. The ceiling is far above
# what one region serves (about 1,000 transfers/s on the reference machine, README), so it
# only catches typos.
RATE_PER_S_MAX: Final = 1_000_000
# Requests a tenant may send at once after being idle; by default one second's worth.
BURST_MAX: Final = 1_000_000
# Accounts one tenant may open, unless its limits say otherwise. Each account is a row on its
# home shard and in every region's cache; a million accounts of one tenant is a deliberate
# decision for an operator to make, not something a script in a loop gets by default.
TENANT_ACCOUNTS_MAX_DEFAULT: Final = 1_000_000
TENANT_ACCOUNTS_MAX_MAX: Final = 100_000_000
# Compare-and-swap rounds on a tenant's account counter in one flush before giving up until the
# next poll (the count is kept and retried): each lost round means another router process
# flushed the same tenant's count in between.
ACCOUNT_COUNT_CAS_ROUNDS_MAX: Final = 16


class LimitsError(ValueError):
    """A limit outside its bounds, or a stored value that does not parse."""


@dataclass(frozen=True, slots=True)
class TenantLimits:
    # None: no rate limit (the tenant is held back only by overload protection).
    rate_per_s: int | None = None
    burst: int | None = None
    accounts_max: int = TENANT_ACCOUNTS_MAX_DEFAULT

    def __post_init__(self) -> None:
        if self.rate_per_s is not None and not 1 <= self.rate_per_s <= RATE_PER_S_MAX:
            raise LimitsError(f"rate must be within 1..{RATE_PER_S_MAX} per second")
        if self.burst is not None:
            if self.rate_per_s is None:
                raise LimitsError("a burst needs a rate")
            if not 1 <= self.burst <= BURST_MAX:
                raise LimitsError(f"burst must be within 1..{BURST_MAX}")
        if not 1 <= self.accounts_max <= TENANT_ACCOUNTS_MAX_MAX:
            raise LimitsError(f"accounts max must be within 1..{TENANT_ACCOUNTS_MAX_MAX}")

    @property
    def effective_burst(self) -> int:
        """The burst in force: as set, else one second's worth of the rate."""
        if self.burst is not None:
            return self.burst
        return self.rate_per_s or 0

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate_per_s, "burst": self.burst, "accounts_max": self.accounts_max}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TenantLimits:
        def opt_int(name: str) -> int | None:
            v = d.get(name)
            if v is None:
                return None
            if not isinstance(v, int) or isinstance(v, bool):
                raise LimitsError(f"{name} is not an integer")
            return v

        accounts = opt_int("accounts_max")
        return cls(
            rate_per_s=opt_int("rate"),
            burst=opt_int("burst"),
            accounts_max=TENANT_ACCOUNTS_MAX_DEFAULT if accounts is None else accounts,
        )


DEFAULT_LIMITS: Final = TenantLimits()


async def set_limits(client: EtcdClient, tenant: str, limits: TenantLimits) -> None:
    await client.put(LIMITS_PREFIX + tenant, orjson.dumps(limits.to_json()))


async def clear_limits(client: EtcdClient, tenant: str) -> None:
    await client.delete(LIMITS_PREFIX + tenant)


def parse_limits(kv: Mapping[str, bytes]) -> dict[str, TenantLimits]:
    """Every tenant's limits from the keys under ``LIMITS_PREFIX``; an entry that does not
    parse is skipped, so one bad key cannot lift every other tenant's limit."""
    out: dict[str, TenantLimits] = {}
    for key, raw in kv.items():
        tenant = key.removeprefix(LIMITS_PREFIX)
        try:
            out[tenant] = TenantLimits.from_json(orjson.loads(raw))
        except (LimitsError, ValueError, TypeError, AttributeError):
            continue
    return out


async def load_limits(client: EtcdClient) -> dict[str, TenantLimits]:
    """Every tenant's limits (``txr limits show``), a serializable read: the routers do not
    call it, they keep the prefix mirrored by one watch (router.ratelimit)."""
    _, kv = await client.get_prefix(LIMITS_PREFIX, serializable=True)
    return parse_limits(kv)


async def account_count(client: EtcdClient, tenant: str) -> int:
    got = await client.get(ACCOUNT_COUNT_PREFIX + tenant)
    return 0 if got is None else int(got[0])


def parse_account_counts(kv: Mapping[str, bytes]) -> dict[str, int]:
    """Every tenant's account count from the keys under ``ACCOUNT_COUNT_PREFIX``. A value that
    does not parse is skipped: that tenant counts from zero until its next flush rewrites it."""
    out: dict[str, int] = {}
    for key, raw in kv.items():
        try:
            out[key.removeprefix(ACCOUNT_COUNT_PREFIX)] = int(raw)
        except ValueError:
            continue
    return out


async def add_account_count(client: EtcdClient, tenant: str, delta: int) -> int | None:
    """Add ``delta`` (either sign; the count never goes below 0) to the tenant's account
    counter: the new count, or None after ACCOUNT_COUNT_CAS_ROUNDS_MAX lost rounds (nothing
    changed). Raises EtcdError when etcd is away (the outcome is then unknown).

    No cap here: the counter records the opens routers admitted, and a router refuses at the
    cap from its own view before an open (router.ratelimit).
    """
    key = ACCOUNT_COUNT_PREFIX + tenant
    for _ in range(ACCOUNT_COUNT_CAS_ROUNDS_MAX):
        got = await client.get(key)
        try:
            current = 0 if got is None else int(got[0])
        except ValueError:
            current = 0  # an unreadable value is overwritten, never a reason to stop counting
        revision = 0 if got is None else got[1]
        new = max(current + delta, 0)
        try:
            await client.cas(key, revision, {key: str(new).encode()})
        except CasConflict:
            continue
        return new
    return None
