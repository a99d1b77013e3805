"""kill -9 of a shard's primary -> first acknowledged write on that shard, no operator.

Against a running local cluster (its failover controllers on): for each shard in turn, open a
funding and a customer account homed there, kill -9 the primary's whole server, send one
transfer on that shard through every region's router in turn (same idempotency key) until one
is acknowledged, and time it from the kill; then rejoin the old primary (`txr rejoin`) so the
next round finds a synchronous standby again. Rounds wait out the anti-flap window per shard.

    .venv/bin/python scripts/autofailover_figures.py --dir .txr/local --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
import uuid
from pathlib import Path

import aiohttp

from consistency.limits import FAILOVER_ANTI_FLAP_S
from infra import cli
from infra import failover as real_ops
from infra.local import cluster as lc
from infra.local import control
from router.auth import TENANT_SCOPES
from router.client import Client

WRITE_WAIT_S = 60.0
POLL_S = 0.02


async def one(d: Path, shard: str, home: str) -> float:
    routers = {r: v["router"] for r, v in lc.status(d)["regions"].items()}
    tok = lc.token(d, "figures", sorted(TENANT_SCOPES), 3600)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
        cs = [Client(s, u, tok) for u in routers.values()]
        f = await cs[0].create_account("EUR", home, 10**12)
        a = await cs[0].create_account("EUR", home)
        assert f.status == a.status == 201, (f.body, a.body)
        node = real_ops.LocalShardOps(d).load(shard)[0].shard.primary.name
        control.pg_signal(d, node, signal.SIGKILL)
        t0 = time.monotonic()
        key, n = uuid.uuid4().hex, 0
        while time.monotonic() - t0 < WRITE_WAIT_S:
            r = await cs[n % len(cs)].transfer(key, f.body["id"], a.body["id"], 1, "EUR")
            n += 1
            if r.status == 201:
                return time.monotonic() - t0
            await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{shard}: no write within {WRITE_WAIT_S:g}s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", type=Path, default=lc.DEFAULT_DIR)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    d: Path = args.dir
    shards = sorted(lc.status(d)["shards"])
    samples: list[dict[str, object]] = []
    last: dict[str, float] = {}
    for rnd in range(args.rounds):
        for shard in shards:
            wait = last.get(shard, 0.0) + FAILOVER_ANTI_FLAP_S + 1 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            rec = real_ops.LocalShardOps(d).load(shard)[0]
            old = rec.shard.primary.region
            took = asyncio.run(one(d, shard, rec.shard.home_region))
            last[shard] = time.monotonic()
            new = real_ops.LocalShardOps(d).load(shard)[0].shard.primary.region
            samples.append({"round": rnd, "shard": shard, "from": old, "to": new, "s": took})
            print(f"{shard}: {old} -> {new}: kill -9 -> first ack {took:.3f}s", flush=True)
            assert cli.main(["rejoin", shard, "--node", old, "--dir", str(d)]) == 0
    xs = [float(str(s["s"])) for s in samples]
    load = os.getloadavg()
    print(
        json.dumps(
            {
                "samples": samples,
                "min_s": round(min(xs), 3),
                "median_s": round(statistics.median(xs), 3),
                "max_s": round(max(xs), 3),
                "loadavg": [round(x, 1) for x in load],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
