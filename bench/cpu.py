"""CPU time per acknowledged transfer, by component, read from /proc around a load run.

Components of the measured region's shard (the others idle along and are summed as ``other``):
``router`` (its workers), ``change_feed`` (every region's relay process plus the primary's
walsender backends that stream logical changes to them), ``primary`` (the rest of the loaded
primary: backends running the batch call, WAL writer, checkpointer), ``standby`` (its
synchronous standby), ``redis``, ``etcd`` (all members), ``wan`` (the WAN emulator). A process's
CPU includes its children's (a PostgreSQL server is its postmaster plus backends); the load
generator (wrk) is not part of the cluster and is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

COMPONENTS: Final = (
    "router",
    "change_feed",
    "primary",
    "standby",
    "redis",
    "etcd",
    "wan",
    "other",
)
# The title PostgreSQL gives a walsender backend of the replication role: the relays' logical
# streams (the physical standby's walsender says "walsender", without the database).
_LOGICAL_WALSENDER: Final = "txr_repl txr"


@dataclass(frozen=True, slots=True)
class Groups:
    """Root pids per component (each counted with its whole process tree)."""

    roots: Mapping[str, tuple[int, ...]]
    primary_pid: int


def groups(status: Mapping[str, Any], region: str, shard: str) -> Groups:
    roots: dict[str, list[int]] = {c: [] for c in COMPONENTS}
    primary = 0
    for r, s in status["regions"].items():
        if r == region:
            roots["router"] += [int(p) for p in s.get("router_pids") or [] if p]
            if s.get("redis_pid"):
                roots["redis"].append(int(s["redis_pid"]))
        else:
            roots["other"] += [int(p) for p in s.get("router_pids") or [] if p]
            if s.get("redis_pid"):
                roots["other"].append(int(s["redis_pid"]))
        if s.get("relays_pid"):
            roots["change_feed"].append(int(s["relays_pid"]))
        if s.get("etcd_pid"):
            roots["etcd"].append(int(s["etcd_pid"]))
        for n in s.get("nodes", []):
            if not n.get("pid"):
                continue
            if n["shard"] == shard and n["role"] == "primary":
                primary = int(n["pid"])
            elif n["shard"] == shard:
                roots["standby"].append(int(n["pid"]))
            else:
                roots["other"].append(int(n["pid"]))
    wan = (status.get("wan") or {}).get("pid")
    if wan:
        roots["wan"].append(int(wan))
    return Groups({k: tuple(v) for k, v in roots.items()}, primary)


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            kids.setdefault(int(stat[1]), []).append(int(d))
    return kids


def cpu_s(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def tree(roots: Iterable[int], kids: Mapping[int, list[int]]) -> list[int]:
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(kids.get(p, []))
    return sorted(seen)


def _is_logical_walsender(pid: int) -> bool:
    try:
        return _LOGICAL_WALSENDER in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
            errors="replace"
        )
    except OSError:
        return False


def snapshot(g: Groups) -> dict[str, dict[int, float]]:
    """CPU seconds so far of every process, by component (pid -> seconds)."""
    kids = children()
    out: dict[str, dict[int, float]] = {}
    for comp, roots in g.roots.items():
        out[comp] = {p: cpu_s(p) for p in tree(roots, kids)}
    prim: dict[int, float] = {}
    for p in tree([g.primary_pid] if g.primary_pid else [], kids):
        if _is_logical_walsender(p):
            out["change_feed"][p] = cpu_s(p)
        else:
            prim[p] = cpu_s(p)
    out["primary"] = prim
    return out


def per_transfer_us(
    before: Mapping[str, Mapping[int, float]],
    after: Mapping[str, Mapping[int, float]],
    acked: int,
) -> dict[str, float]:
    """Microseconds of CPU per acknowledged transfer, by component (processes that appeared
    during the run count from zero), and their ``total``."""
    out: dict[str, float] = {}
    for comp in COMPONENTS:
        spent = sum(t - before.get(comp, {}).get(p, 0.0) for p, t in after.get(comp, {}).items())
        out[comp] = max(spent, 0.0) * 1e6 / acked if acked > 0 else 0.0
    out["total"] = sum(out[c] for c in COMPONENTS)
    return out
