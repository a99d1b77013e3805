"""infra.local.state: cluster.json read through its typed accessors, and the pid updates that
restarts write back (the file keeps its keys, so older clusters stay readable)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.local.state import STATE_FILE, ClusterError, PgNode, Proc, State, load_state


def _doc(tmp: Path) -> dict[str, Any]:
    return {
        "regions": ["a", "b"],
        "ports": {
            "regions": {
                "a": {"etcd_client": 100, "pg_primary": 101, "router": 102},
                "b": {"etcd_client": 200, "pg_primary": 201, "router": 202},
            },
            "wan": [
                {"src": "a", "dst": "b", "service": "etcd", "port": 300},
                {"src": "b", "dst": "a", "service": "etcd", "port": 301},
                {"src": "a", "dst": "b", "service": "pg-primary", "port": 302},
            ],
        },
        "procs": [
            {
                "name": "router-a",
                "kind": "router",
                "region": "a",
                "pid": 11,
                "marker": "router",
                "log": str(tmp / "router-a.log"),
                "argv": ["python", "-m", "router"],
                "python_env": True,
            },
            # Recorded before argv existed: still read.
            {"name": "wan", "kind": "wan", "region": None, "pid": 12, "log": "wan.log"},
        ],
        "pg": [
            {
                "node": "b-1@a",
                "shard": "b-1",
                "region": "a",
                "role": "standby",
                "port": 101,
                "datadir": "/pg/b-1@a",
                "log": "pg.log",
                "pid": None,
            },
            {
                "node": "a-1@a",
                "shard": "a-1",
                "region": "a",
                "role": "primary",
                "port": 102,
                "datadir": "/pg/a-1@a",
                "log": "pg.log",
                "pid": 21,
            },
        ],
        "pg_root": "/pg",
        "wan_control": "http://127.0.0.1:9",
        "some_future_key": {"kept": True},
    }


def _state(tmp_path: Path) -> State:
    (tmp_path / STATE_FILE).write_text(json.dumps(_doc(tmp_path)))
    return load_state(tmp_path)


def test_typed_reading(tmp_path: Path) -> None:
    st = _state(tmp_path)
    assert st.regions == ["a", "b"]
    assert st.proc("router-a") == Proc(
        "router-a", "router", "a", 11, "router", tmp_path / "router-a.log",
        ("python", "-m", "router"), True,
    )  # fmt: skip
    wan = st.proc("wan")
    assert wan is not None
    assert (wan.marker, wan.argv, wan.python_env) == (None, (), False)
    assert st.proc("nope") is None
    assert st.pg_node("b-1@a") == PgNode(
        "b-1@a", "b-1", "a", "standby", 101, Path("/pg/b-1@a"), Path("pg.log"), None
    )
    assert st.shards == ["a-1", "b-1"]
    assert st.pg_root == Path("/pg")
    assert st.wan_control == "http://127.0.0.1:9"
    assert st.routers_started is False


def test_etcd_endpoints_direct_and_through_the_wan(tmp_path: Path) -> None:
    st = _state(tmp_path)
    assert st.etcd_endpoints() == ["http://127.0.0.1:100", "http://127.0.0.1:200"]
    # A region's controller: its own member first, the others through its WAN listeners.
    assert st.etcd_endpoints("a") == ["http://127.0.0.1:100", "http://127.0.0.1:300"]
    assert st.etcd_endpoints("b") == ["http://127.0.0.1:200", "http://127.0.0.1:301"]
    assert st.wan_port("a", "b", "pg-primary") == 302
    assert st.wan_port("b", "a", "pg-primary") is None


def test_pid_updates_are_saved_and_keep_every_key(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.set_proc_pid("router-a", 99)
    st.set_pg_pid("b-1@a", 98)
    again = load_state(tmp_path)
    router = again.proc("router-a")
    standby = again.pg_node("b-1@a")
    assert router is not None
    assert standby is not None
    assert (router.pid, standby.pid) == (99, 98)
    assert again.data["some_future_key"] == {"kept": True}


def test_missing_and_broken_state(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="no local cluster"):
        load_state(tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ClusterError, match="not valid JSON"):
        load_state(tmp_path)
