"""bench.idle's bookkeeping: which process counts as which component, and the spread."""

from __future__ import annotations

import os
import time
from typing import Any

from bench import idle


def _status() -> dict[str, Any]:
    region = {
        "router_pids": [11, 12],
        "relays_pid": 13,
        "controller_pid": 14,
        "redis_pid": 15,
        "etcd_pid": 16,
        "nats_pid": 17,
        "nodes": [
            {"shard": "a-1", "role": "primary", "pid": 18},
            {"shard": "b-1", "role": "standby", "pid": 19},
            {"shard": "c-1", "role": "standby", "pid": None},
        ],
    }
    return {"regions": {"a": region}, "wan": {"pid": 20}}


def test_every_cluster_process_is_one_components_root() -> None:
    g = idle.groups(_status())
    assert set(g) == set(idle.COMPONENTS)
    assert g["routers"] == (11, 12)
    assert g["pg_primaries"] == (18,)
    assert g["pg_standbys"] == (19,)
    assert g["wan"] == (20,)
    roots = [p for pids in g.values() for p in pids]
    assert sorted(roots) == list(range(11, 21))


def test_a_window_counts_this_process_tree_and_nothing_it_did_not_spend() -> None:
    status = {"regions": {"a": {"router_pids": [os.getpid()], "nodes": []}}}

    def busy(seconds: float) -> None:
        # Spin for the window instead of sleeping: the "router" spends up to a core (less on a
        # shared machine; clock ticks are 10 ms, so a tenth of a core is surely seen).
        end = time.monotonic() + seconds
        spins = 0
        while time.monotonic() < end:
            spins += 1
        assert spins > 0

    got = idle.measure(status, 0.5, sleep=busy)
    assert got["cores"]["routers"] > 0.1
    assert got["cores"]["etcd"] == 0
    assert abs(got["cores_total"] - sum(got["cores"].values())) < 1e-3
    assert got["ok"] is (got["cores_total"] <= idle.IDLE_CORES_GOAL)


def test_spread_is_min_median_max_per_component_and_total() -> None:
    def window(total: float) -> dict[str, Any]:
        cores = dict.fromkeys(idle.COMPONENTS, 0.0) | {"etcd": total}
        return {"cores": cores, "cores_total": total}

    sp = idle.spread([window(0.3), window(0.1), window(0.2)])
    assert sp["total"] == {"min": 0.1, "median": 0.2, "max": 0.3}
    assert sp["etcd"] == sp["total"]
    assert sp["nats"] == {"min": 0.0, "median": 0.0, "max": 0.0}
