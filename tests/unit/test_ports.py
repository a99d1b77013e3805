from __future__ import annotations

import pytest

from infra.local.ports import PORT_SPAN_MAX, plan_ports
from infra.wan import profile_latencies

REGIONS = ("us-east", "eu-west", "ap-south")


@pytest.mark.parametrize("base", [7400, 7500, 7600, 1024])
def test_three_regions_fit_without_collisions(base: int) -> None:
    plan = plan_ports(base, REGIONS)
    ports = plan.all_ports()
    assert len(ports) == len(set(ports)), "a port is used twice"
    assert min(ports) == base
    assert max(ports) - base < PORT_SPAN_MAX


def test_every_cross_region_service_has_a_listener() -> None:
    plan = plan_ports(7400, REGIONS)
    for src in REGIONS:
        for dst in REGIONS:
            for svc in ("pg-primary", "pg-standby", "etcd", "router"):
                assert ((src, dst, svc) in plan.wan) == (src != dst)
    assert set(plan.etcd_peer_front) == set(REGIONS)


def test_region_layout_matches_the_contract() -> None:
    plan = plan_ports(7400, REGIONS)
    ap = plan.region["ap-south"]
    assert (ap.router, ap.redis, ap.etcd_client, ap.etcd_peer, ap.pg_primary, ap.pg_standby) == (
        7440,
        7441,
        7442,
        7443,
        7444,
        7445,
    )
    assert plan.wan_control == 7460


@pytest.mark.parametrize("regions", [("a",), ("a", "b", "c", "d"), ("a", "a")])
def test_unsupported_region_sets_are_refused(regions: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="region"):
        plan_ports(7400, regions)


def test_base_port_range() -> None:
    with pytest.raises(ValueError, match="base port"):
        plan_ports(65500, REGIONS)


def test_realistic_profile() -> None:
    lat = profile_latencies("realistic", REGIONS)
    assert lat == {
        ("eu-west", "us-east"): 35.0,
        ("ap-south", "us-east"): 95.0,
        ("ap-south", "eu-west"): 60.0,
    }
    assert set(profile_latencies("none", REGIONS).values()) == {0.0}
    # Custom names take the same figures by position.
    assert profile_latencies("realistic", ("x", "y", "z"))[("x", "z")] == 95.0
