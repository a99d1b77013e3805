"""infra.local.state: cluster.json read through its typed accessors and written through its
typed records (the launcher's entries, restarts' pids, failovers' roles); the file keeps its
keys, so older clusters stay readable and older checkouts read new ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.local.ports import plan_ports
from infra.local.state import (
    STATE_FILE,
    ClusterError,
    PgNode,
    Proc,
    ShardRecord,
    State,
    load_state,
)


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


def test_a_new_state_has_the_keys_older_readers_expect(tmp_path: Path) -> None:
    plan = plan_ports(20000, ["a", "b"])
    st = State.create(
        tmp_path, plan=plan, regions=["a", "b"], wan="none",
        wan_latency_ms={("a", "b"): 0.0}, pg_root=tmp_path / "pg",
    )  # fmt: skip
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["status"] == "starting"
    assert (doc["base_port"], doc["regions"], doc["wan"]) == (20000, ["a", "b"], "none")
    assert doc["wan_latency_ms"] == {"a/b": 0.0}
    assert (doc["procs"], doc["pg"], doc["shards"]) == ([], [], {})
    assert doc["ports"]["regions"]["b"]["router"] == plan.region["b"].router
    assert st.base_port == 20000
    assert st.region_ports("a")["etcd_client"] == plan.region["a"].etcd_client
    assert st.wan_port("a", "b", "etcd") == plan.wan[("a", "b", "etcd")]
    assert st.wan_control_or_none is None
    st.set_wan_control("http://127.0.0.1:9")
    st.mark_up(start_seconds=7.944, routers_started=True)
    again = load_state(tmp_path)
    assert (again.status, again.start_seconds, again.routers_started) == ("up", 7.94, True)
    assert again.wan_control == "http://127.0.0.1:9"
    again.mark_stopped(failed=True)
    assert load_state(tmp_path).status == "stop-failed"
    assert "stopped_at" in load_state(tmp_path).data


def test_recorded_entries_keep_the_file_format(tmp_path: Path) -> None:
    """Typed records are written with the keys of the document (the one ``_doc`` holds, as
    older checkouts wrote it), and read back equal."""
    old = _doc(tmp_path)
    st = State(tmp_path / STATE_FILE, {"regions": ["a", "b"]})
    for p in old["procs"][:1]:
        st.add_proc(Proc.from_json(p))
    for e in old["pg"]:
        st.add_pg(PgNode.from_json(e))
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["procs"] == old["procs"][:1]
    assert doc["pg"] == old["pg"]
    st.set_pg_started("b-1@a", 55, "primary")
    node = load_state(tmp_path).pg_node("b-1@a")
    assert node is not None
    assert (node.pid, node.role) == (55, "primary")
    with pytest.raises(ClusterError, match="no node c-1@a"):
        st.set_pg_pid("c-1@a", 1)


def test_role_changes_detach_the_old_primary_and_keep_the_home_region(tmp_path: Path) -> None:
    st = _state(tmp_path)
    st.record_shard("a-1", ShardRecord("a", "a", "b", 1))
    st.add_pg(PgNode("a-1@b", "a-1", "b", "standby", 201, Path("/pg/x"), Path("x.log"), 31))
    st.record_roles(
        "a-1", primary="a-1@b", standbys=set(), primary_region="b", standby_region=None, epoch=2
    )
    again = load_state(tmp_path)
    roles = {e.node: e.role for e in again.pg_nodes if e.shard == "a-1"}
    assert roles == {"a-1@a": "detached", "a-1@b": "primary"}
    # The other shard's nodes are untouched.
    standby = again.pg_node("b-1@a")
    assert standby is not None
    assert standby.role == "standby"
    assert again.shard_records == {"a-1": ShardRecord("a", "b", None, 2)}
    assert again.data["shards"]["a-1"] == {
        "home_region": "a", "primary_region": "b", "standby_region": None, "epoch": 2,
    }  # fmt: skip
