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

from consistency.limits import FAILOVER_ANTI_FLAP_S
from infra import cli, failover
from infra.local import cluster as lc
from infra.local import control
from router.auth import TENANT_SCOPES
from txclient import AsyncClient, errors

WRITE_WAIT_S = 60.0
POLL_S = 0.02
ATTEMPT_TIMEOUT_S = 1.0


async def one(d: Path, shard: str, home: str) -> float:
    routers = {r: v["router"] for r, v in lc.status(d)["regions"].items()}
    tok = lc.token(d, "figures", sorted(TENANT_SCOPES), 3600)
    # One client pinned to each region; every attempt is short (the client retries inside it
    # with the same key), so the first acknowledgement is seen within about POLL_S.
    cs = [
        AsyncClient(routers, tok, prefer=r, timeout=ATTEMPT_TIMEOUT_S, probe=False) for r in routers
    ]
    try:
        f = await cs[0].create_account("EUR", home_region=home, overdraft_limit=10**12, timeout=10)
        a = await cs[0].create_account("EUR", home_region=home, timeout=10)
        node = failover.LocalShardOps(d).load(shard)[0].shard.primary.name
        control.pg_signal(d, node, signal.SIGKILL)
        t0 = time.monotonic()
        key, n = uuid.uuid4().hex, 0
        while time.monotonic() - t0 < WRITE_WAIT_S:
            try:
                await cs[n % len(cs)].transfer(
                    source=f.id, destination=a.id, amount=1, currency="EUR", idempotency_key=key
                )
                return time.monotonic() - t0
            except (errors.OutcomeUnknown, errors.RegionUnavailable, errors.DeadlineExceeded):
                n += 1
                await asyncio.sleep(POLL_S)
    finally:
        for c in cs:
            await c.aclose()
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
            rec = failover.LocalShardOps(d).load(shard)[0]
            old = rec.shard.primary.region
            took = asyncio.run(one(d, shard, rec.shard.home_region))
            last[shard] = time.monotonic()
            new = failover.LocalShardOps(d).load(shard)[0].shard.primary.region
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
