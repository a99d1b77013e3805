"""Where a keyed account open goes (consistency.idempotency.open_shards): one arbiter per
(tenant, key) whatever region is named, so every router's opens meet on one key row."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consistency.idempotency import OpenShards, open_shards

REGIONS = ("us-east", "eu-west", "ap-south")
# Two shards homed in eu-west: a region's choice among its own shards is the key's too.
HOMES = {
    "us-east-1": "us-east",
    "eu-west-1": "eu-west",
    "eu-west-2": "eu-west",
    "ap-south-1": "ap-south",
}

keys = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)


@given(tenant=keys, key=keys)
def test_the_arbiter_depends_on_tenant_and_key_only(tenant: str, key: str) -> None:
    plans = [open_shards(tenant, key, HOMES, r) for r in (None, *REGIONS)]
    assert all(p is not None for p in plans)
    assert len({p.arbiter for p in plans if p is not None}) == 1
    # The order shards are listed in changes nothing (every router sorts).
    reordered = dict(reversed(list(HOMES.items())))
    assert open_shards(tenant, key, reordered, None) == plans[0]


@given(tenant=keys, key=keys, region=st.sampled_from(REGIONS))
def test_the_target_is_in_the_region_named(tenant: str, key: str, region: str) -> None:
    plan = open_shards(tenant, key, HOMES, region)
    assert plan is not None
    assert HOMES[plan.target] == region
    # The arbiter itself when it is homed there: one transaction, no claim.
    if HOMES[plan.arbiter] == region:
        assert plan.target == plan.arbiter
    # Without a region the account opens on the arbiter.
    assert open_shards(tenant, key, HOMES, None) == OpenShards(plan.arbiter, plan.arbiter)


def test_keys_spread_over_every_shard_and_an_unknown_region_is_none() -> None:
    arbiters = {open_shards("t", f"k{i}", HOMES, None) for i in range(200)}
    assert {p.arbiter for p in arbiters if p is not None} == set(HOMES)
    assert open_shards("t", "k", HOMES, "mars") is None
