"""``txr status``'s table (infra.failover.format_status) on hand-made status documents."""

from __future__ import annotations

from typing import Any

from infra.failover import format_status


def _shard(name: str, *, survival: bool, detached: list[str]) -> dict[str, Any]:
    return {
        "home_region": name.removesuffix("-1"),
        "primary": f"{name}@x",
        "primary_region": "x",
        "epoch": 2,
        "region_survival": survival,
        "region_survival_now": survival,
        "primary_reachable": True,
        "standbys": [],
        "detached": detached,
        "autofailover": {
            "on": name != "c-1",
            "decision": {
                "by": "b",
                "age_s": 1.5,
                "action": "none",
                "reason": "healthy",
                "detail": "serves",
            },
        },
    }


def _lines_of(text: str, shard: str) -> list[str]:
    """The shard's row and the indented lines under it."""
    out: list[str] = []
    for line in text.splitlines():
        if out and not line.startswith(" "):
            break
        if line.startswith(shard + " ") or out:
            out.append(line)
    return out


def test_detached_and_survival_lines_belong_to_their_own_shard() -> None:
    st = {
        "etcd": [{"endpoint": "http://e", "healthy": True}],
        "autofailover": {"mode": {"enabled": True, "shards": {"c-1": False}}},
        "shards": {
            "a-1": _shard("a-1", survival=False, detached=["a-1@y"]),
            "b-1": {"error": "etcd: EtcdUnavailable: down"},
            "c-1": _shard("c-1", survival=True, detached=[]),
        },
        "routers": {},
    }
    text = format_status(st)
    a = "\n".join(_lines_of(text, "a-1"))
    c = "\n".join(_lines_of(text, "c-1"))
    assert "detached: a-1@y" in a
    assert "WARNING: no synchronous standby" in a
    assert "detached" not in c
    assert "WARNING" not in c
    assert "autofailover OFF" in c
    assert "autofailover on" in a
    assert "automatic failover: on (off for c-1)" in text
    assert "b-1          etcd: EtcdUnavailable: down" in text


def test_no_key_error_on_partial_documents() -> None:
    st: dict[str, Any] = {
        "etcd": [{"endpoint": "http://e", "healthy": False}],
        "shards": {"a-1": {"primary": "a-1@x", "epoch": 1, "standbys": []}},
        "routers": {"r": {"rtt": {}}, "s": {"error": "OSError"}},
    }
    text = format_status(st)
    assert "UNHEALTHY" in text
    assert "a-1@x (DOWN)" in text
    assert "s          unreachable (OSError)" in text
    # A standby or etcd member missing its keys prints what is there.
    partial = format_status(
        {
            "etcd": [{"healthy": True}],
            "shards": {
                "a-1": {
                    "primary": "a-1@x",
                    "primary_reachable": True,
                    "standbys": [{"node": "a-1@y"}, {"node": "a-1@z", "replay_lag_s": 0.5}],
                }
            },
        }
    )
    assert "a-1@y (unknown, -)" in partial
    assert "a-1@z (unknown, - 0.500s)" in partial
    assert "  ?" in partial
    # No shards at all (the loop variable of the old code was unbound here).
    assert "shard" in format_status({"etcd": [], "shards": {}, "routers": {"r": {}}})
