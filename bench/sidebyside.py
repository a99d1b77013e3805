"""CPU per acknowledged transfer of two running local clusters, side by side.

``python -m bench.sidebyside --pairs 7 --seconds 12 DIR_A DIR_B``: creates and funds accounts
in each cluster's first region (as ``txr bench`` does), then alternates wrk runs between the two
(A, B, A, B, ...), each with the components of ``bench.cpu`` read from /proc around it, and the
change feed also split into its relay processes and the primary's logical walsender. Prints
each run, then min / median / max per component and cluster. This is how the README's
side-by-side figures of two trees are taken: on a shared host only runs taken in the same
minutes compare (throughput moves 2x between runs, CPU per transfer far less).

Start the clusters from the two trees first (``txr local up --dir D --base-port P --wan none
--detach`` in each tree), far enough apart in ports.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from bench import cpu, suite, wrk
from infra.local import cluster

ACCOUNTS: Final = 500
CONNECTIONS: Final = 128
SHOWN: Final = ("change_feed", "relays", "walsender", "router", "primary", "total")


def _measure(
    cluster_dir: Path, accounts: Path, tok: str, *, seconds: float
) -> tuple[float, dict[str, float]]:
    desc = cluster.status(cluster_dir)
    region = next(iter(desc["regions"]))
    groups = cpu.groups(desc, region, cluster.shard_name(region))
    relays = [int(s["relays_pid"]) for s in desc["regions"].values() if s.get("relays_pid")]
    before = cpu.snapshot(groups)
    res = wrk.run(
        desc["regions"][region]["router"],
        accounts,
        tok,
        connections=CONNECTIONS,
        duration_s=seconds,
    )
    after = cpu.snapshot(groups)
    out = cpu.per_transfer_us(before, after, res.acked)
    relay_pids = set(cpu.tree(relays, cpu.children()))
    feed_before, feed_after = before["change_feed"], after["change_feed"]
    spent = {p: t - feed_before.get(p, 0.0) for p, t in feed_after.items()}
    per = 1e6 / res.acked if res.acked else 0.0
    out["relays"] = sum(v for p, v in spent.items() if p in relay_pids) * per
    out["walsender"] = sum(v for p, v in spent.items() if p not in relay_pids) * per
    return res.rate, out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sidebyside", description=__doc__)
    p.add_argument("dirs", type=Path, nargs=2, metavar="DIR")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=12.0)
    args = p.parse_args(argv)
    prepared: list[tuple[Path, Path, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="txr-sidebyside-"))
    for i, d in enumerate(args.dirs):
        desc = cluster.status(d)
        region = next(iter(desc["regions"]))
        url = desc["regions"][region]["router"]
        tok = cluster.token(d, suite.TENANT, suite.SCOPES, suite.TOKEN_TTL_S)
        _mint, ids = asyncio.run(suite.setup_accounts(url, tok, region, ACCOUNTS))
        prepared.append((d, wrk.write_accounts(tmp / f"accounts-{i}", ids), tok))
    figures: list[list[dict[str, float]]] = [[], []]
    for n in range(args.pairs):
        for i, (d, accounts_file, tok) in enumerate(prepared):
            rate, got = _measure(d, accounts_file, tok, seconds=args.seconds)
            figures[i].append(got)
            shown = " ".join(f"{k}={got[k]:.0f}" for k in SHOWN)
            print(f"pair {n + 1} {'AB'[i]} {rate:6.0f}/s {shown}")  # noqa: T201
    for k in SHOWN:
        cells = []
        for i in range(2):
            vals = [f[k] for f in figures[i]]
            cells.append(f"{min(vals):.0f} / {statistics.median(vals):.0f} / {max(vals):.0f}")
        print(f"{k:12s} A {cells[0]:18s} B {cells[1]}")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
