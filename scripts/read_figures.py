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
from pathlib import Path

from infra.local import cluster as lc
from txclient import AsyncClient, Consistency

CONCURRENCY = 32
POLL_S = 0.005
VISIBLE_WAIT_S = 10.0
LEVELS: tuple[Consistency, ...] = ("cached", "strong")


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
    # One txclient per region, pinned to it. Throughput is read through it too, so the
    # figures include the client's own cost (httpx), as an application's would.
    clients = {r: AsyncClient(routers, token, prefer=r) for r in routers}
    try:
        home = args.region
        c = clients[home]
        accounts = [(await c.create_account("EUR", home_region=home)).id for _ in range(50)]

        async def run(level: Consistency) -> float:
            done = 0
            end = time.monotonic() + args.seconds

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    await c.get_account(random.choice(accounts), consistency=level)
                    done += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return float(done / args.seconds)

        await run("cached")  # warm the cache and the pools
        rates: dict[str, list[float]] = {"cached": [], "strong": []}
        for _ in range(3):
            for level in LEVELS:
                rates[level].append(await run(level))
        ca, st = statistics.median(rates["cached"]), statistics.median(rates["strong"])
        print(f"read throughput via {home} ({CONCURRENCY} clients, {args.seconds:.0f} s x3 each):")
        print(f"  cached {ca:8.0f}/s  runs {[round(x) for x in rates['cached']]}")
        print(f"  strong {st:8.0f}/s  runs {[round(x) for x in rates['strong']]}")
        print(f"  ratio cached/strong {ca / st:.2f}")

        print("\nvisibility after commit (ack in source region -> served from remote cache):")
        print(f"{'writer':10} {'reader':10} {'p50 ms':>8} {'p99 ms':>8}")
        for writer, wc in clients.items():
            src = (await wc.create_account("EUR", home_region=writer, overdraft_limit=10**12)).id
            dst = (await wc.create_account("EUR", home_region=writer)).id
            for reader, rc in clients.items():
                if reader == writer:
                    continue
                samples = []
                for _ in range(args.n):
                    await wc.transfer(source=src, destination=dst, amount=1, currency="EUR")
                    t0 = time.perf_counter()
                    want = (await wc.get_account(dst, consistency="strong")).version
                    while time.perf_counter() - t0 < VISIBLE_WAIT_S:
                        got = await rc.get_account(dst, consistency="cached")
                        by = got.meta.served_by or ""
                        if by.endswith("/cache") and got.version >= want:
                            break
                        await asyncio.sleep(POLL_S)
                    samples.append((time.perf_counter() - t0) * 1000)
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(f"{writer:10} {reader:10} {statistics.median(samples):8.1f} {p99:8.1f}")
    finally:
        for client in clients.values():
            await client.aclose()


if __name__ == "__main__":
    asyncio.run(main())
