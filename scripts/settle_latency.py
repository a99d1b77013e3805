"""Measure cross-region settle latency: from sending a transfer to seeing it ``settled``.

Usage: .venv/bin/python scripts/settle_latency.py [--dir .txr/local] [--n 20]
For every ordered pair of regions (source home -> destination home), sends N sequential
transfers through the source region's router (``txclient`` pinned to it). The router delivers
leg 2 inline and answers ``settled`` when the settle mark lands within its bounded wait;
otherwise the script polls the transfer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from infra.local import cluster as lc
from txclient import Client

POLL_S = 0.05
# A transfer still pending after this is reported as a failure of the run, not waited on.
SETTLE_WAIT_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(".txr/local"))
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()
    status = lc.status(args.dir)
    routers = {r: v["router"] for r, v in status["regions"].items()}
    token = lc.token(
        args.dir,
        "settle-probe",
        ["accounts:read", "accounts:write", "accounts:overdraft", "transfers:write"],
        3600,
    )
    clients = {r: Client(routers, token, prefer=r) for r in routers}
    try:
        sources = {
            r: c.create_account("EUR", home_region=r, overdraft_limit=10**12).id
            for r, c in clients.items()
        }
        sinks = {r: c.create_account("EUR", home_region=r).id for r, c in clients.items()}
        print(f"{'source':10} {'dest':10} {'p50 ms':>8} {'p99 ms':>8} {'inline':>7}")
        for a, c in clients.items():
            for b in routers:
                if a == b:
                    continue
                samples = []
                inline = 0
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    t = c.transfer(
                        source=sources[a], destination=sinks[b], amount=1, currency="EUR"
                    )
                    inline += t.status == "settled"
                    while t.status == "pending" and time.perf_counter() - t0 < SETTLE_WAIT_S:
                        time.sleep(POLL_S)
                        t = c.get_transfer(t.id)
                    assert t.status == "settled", t
                    samples.append((time.perf_counter() - t0) * 1000)
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(
                    f"{a:10} {b:10} {statistics.median(samples):8.1f} {p99:8.1f} "
                    f"{inline:4d}/{args.n}"
                )
    finally:
        for c in clients.values():
            c.close()


if __name__ == "__main__":
    main()
