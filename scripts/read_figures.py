"""Read-path figures against a running local cluster (``txr local up``).

Usage: .venv/bin/python scripts/read_figures.py [--dir .txr/local] [--seconds 5] [--n 20]

1. cached vs strong read throughput through one region's router, side by side (closed loop,
   bounded concurrency and duration), alternating the two levels to share the machine's noise;
2. remote-region visibility latency: from a transfer's acknowledgement in one region until
   another region's router serves the new version from its cache.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from pathlib import Path

import aiohttp

from infra.local import cluster as lc

CONCURRENCY = 32
POLL_S = 0.005
VISIBLE_WAIT_S = 10.0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path(".txr/local"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--region", default="eu-west")
    args = parser.parse_args()
    status = lc.status(args.dir)
    routers = {r: v["router"] for r, v in status["regions"].items()}
    token = lc.token(
        args.dir,
        "read-probe",
        ["accounts:read", "accounts:write", "accounts:overdraft", "transfers:write"],
        3600,
    )
    conn = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {token}"}, connector=conn
    ) as s:

        async def open_account(region: str, overdraft: int = 0) -> str:
            body = {"currency": "EUR", "home_region": region, "overdraft_limit": overdraft}
            async with s.post(routers[region] + "/v1/accounts", json=body) as r:
                assert r.status == 201, await r.text()
                acc: str = (await r.json())["id"]
                return acc

        home = args.region
        accounts = [await open_account(home) for _ in range(50)]
        url = routers[home]

        async def run(level: str) -> float:
            done = 0
            end = time.monotonic() + args.seconds

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    acc = random.choice(accounts)
                    async with s.get(f"{url}/v1/accounts/{acc}?consistency={level}") as r:
                        assert r.status == 200
                        await r.read()
                    done += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return done / args.seconds

        await run("cached")  # warm the cache and the pools
        rates: dict[str, list[float]] = {"cached": [], "strong": []}
        for _ in range(3):
            for level in ("cached", "strong"):
                rates[level].append(await run(level))
        c, st = statistics.median(rates["cached"]), statistics.median(rates["strong"])
        print(f"read throughput via {home} ({CONCURRENCY} clients, {args.seconds:.0f} s x3 each):")
        print(f"  cached {c:8.0f}/s  runs {[round(x) for x in rates['cached']]}")
        print(f"  strong {st:8.0f}/s  runs {[round(x) for x in rates['strong']]}")
        print(f"  ratio cached/strong {c / st:.2f}")

        print("\nvisibility after commit (ack in source region -> served from remote cache):")
        print(f"{'writer':10} {'reader':10} {'p50 ms':>8} {'p99 ms':>8}")
        for writer in routers:
            src = await open_account(writer, 10**12)
            dst = await open_account(writer)
            for reader in routers:
                if reader == writer:
                    continue
                samples = []
                for _ in range(args.n):
                    body = {"source": src, "destination": dst, "amount": 1, "currency": "EUR"}
                    async with s.post(
                        routers[writer] + "/v1/transfers",
                        json=body,
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    ) as r:
                        assert r.status == 201
                    t0 = time.perf_counter()
                    async with s.get(
                        routers[writer] + f"/v1/accounts/{dst}?consistency=strong"
                    ) as r:
                        want = (await r.json())["version"]
                    while time.perf_counter() - t0 < VISIBLE_WAIT_S:
                        async with s.get(routers[reader] + f"/v1/accounts/{dst}") as r:
                            doc = await r.json()
                            by = r.headers["X-Served-By"]
                        if by.endswith("/cache") and doc["version"] >= want:
                            break
                        await asyncio.sleep(POLL_S)
                    samples.append((time.perf_counter() - t0) * 1000)
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(f"{writer:10} {reader:10} {statistics.median(samples):8.1f} {p99:8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
