"""Measure single-transfer latency through every router to every home region.

Usage: .venv/bin/python scripts/transfer_latency.py [--dir .txr/local] [--n 40]
Runs against a running local cluster (``txr local up``); sequential requests, one at a time,
so each figure is the latency of one transfer with nothing else in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from pathlib import Path

import aiohttp

from infra.local import cluster as lc


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(".txr/local"))
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    status = lc.status(args.dir)
    routers = {r: v["router"] for r, v in status["regions"].items()}
    token = lc.token(
        args.dir, "latency-probe", ["accounts:write", "accounts:overdraft", "transfers:write"], 3600
    )
    hdrs = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=hdrs) as s:
        accounts = {}
        for home, url in routers.items():
            pair = []
            for overdraft in (10**12, 0):
                body = {"currency": "EUR", "home_region": home, "overdraft_limit": overdraft}
                async with s.post(url + "/v1/accounts", json=body) as r:
                    assert r.status == 201, await r.text()
                    pair.append((await r.json())["id"])
            accounts[home] = pair
        print(f"{'entry':10} {'home':10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for entry, url in routers.items():
            for home, (src, dst) in accounts.items():
                samples = []
                for _ in range(args.n):
                    body = {"source": src, "destination": dst, "amount": 1, "currency": "EUR"}
                    t0 = time.perf_counter()
                    async with s.post(
                        url + "/v1/transfers",
                        json=body,
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    ) as r:
                        assert r.status == 201, await r.text()
                        await r.read()
                    samples.append((time.perf_counter() - t0) * 1000)
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(
                    f"{entry:10} {home:10} {statistics.median(samples):8.1f} {p99:8.1f} "
                    f"{samples[-1]:8.1f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
