"""Measure single-transfer latency through every router to every home region.

Usage: .venv/bin/python scripts/transfer_latency.py [--dir .txr/local] [--n 40]
Runs against a running local cluster (``txr local up``) through ``txclient``, one client pinned
to each entry region; sequential requests, one at a time, so each figure is the latency of one
transfer call (a retry, if any, is inside it and counted) with nothing else in flight.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from infra.local import cluster as lc
from txclient import Client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(".txr/local"))
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    status = lc.status(args.dir)
    routers = {r: v["router"] for r, v in status["regions"].items()}
    token = lc.token(
        args.dir, "latency-probe", ["accounts:write", "accounts:overdraft", "transfers:write"], 3600
    )
    clients = {r: Client(routers, token, prefer=r) for r in routers}
    try:
        accounts = {}
        for home in routers:
            c = clients[home]
            fund = c.create_account("EUR", home_region=home, overdraft_limit=10**12)
            accounts[home] = (fund.id, c.create_account("EUR", home_region=home).id)
        print(f"{'entry':10} {'home':10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'retries':>7}")
        for entry, c in clients.items():
            for home, (src, dst) in accounts.items():
                samples = []
                retries = 0
                for _ in range(args.n):
                    t0 = time.perf_counter()
                    t = c.transfer(source=src, destination=dst, amount=1, currency="EUR")
                    samples.append((time.perf_counter() - t0) * 1000)
                    retries += t.meta.attempts - 1
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(
                    f"{entry:10} {home:10} {statistics.median(samples):8.1f} {p99:8.1f} "
                    f"{samples[-1]:8.1f} {retries:7d}"
                )
    finally:
        for c in clients.values():
            c.close()


if __name__ == "__main__":
    main()
