"""Measure cross-region settle latency: from sending a transfer to seeing it ``settled``.

Usage: .venv/bin/python scripts/settle_latency.py [--dir .txr/local] [--n 20]
For every ordered pair of regions (source home -> destination home), sends N sequential
transfers through the source region's router. The router delivers leg 2 inline and answers
``settled`` when the settle mark lands within its bounded wait; otherwise the script polls.
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

POLL_S = 0.05


async def main() -> None:
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
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as s:

        async def open_account(region: str, overdraft: int) -> str:
            body = {"currency": "EUR", "home_region": region, "overdraft_limit": overdraft}
            async with s.post(routers[region] + "/v1/accounts", json=body) as r:
                assert r.status == 201, await r.text()
                acc: str = (await r.json())["id"]
                return acc

        sources = {r: await open_account(r, 10**12) for r in routers}
        sinks = {r: await open_account(r, 0) for r in routers}
        print(f"{'source':10} {'dest':10} {'p50 ms':>8} {'p99 ms':>8} {'inline':>7}")
        for a in routers:
            for b in routers:
                if a == b:
                    continue
                samples = []
                inline = 0
                for _ in range(args.n):
                    body = {
                        "source": sources[a],
                        "destination": sinks[b],
                        "amount": 1,
                        "currency": "EUR",
                    }
                    t0 = time.perf_counter()
                    async with s.post(
                        routers[a] + "/v1/transfers",
                        json=body,
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    ) as r:
                        assert r.status == 201, await r.text()
                        doc = await r.json()
                    inline += doc["status"] == "settled"
                    while doc["status"] == "pending":
                        await asyncio.sleep(POLL_S)
                        async with s.get(routers[a] + f"/v1/transfers/{doc['id']}") as r:
                            doc = await r.json()
                    assert doc["status"] == "settled", doc
                    samples.append((time.perf_counter() - t0) * 1000)
                samples.sort()
                p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
                print(
                    f"{a:10} {b:10} {statistics.median(samples):8.1f} {p99:8.1f} "
                    f"{inline:4d}/{args.n}"
                )


if __name__ == "__main__":
    asyncio.run(main())
