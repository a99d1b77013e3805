"""Ledger-event figures on a running local cluster: commit-to-webhook latency, relay CPU per
event, and the publish rate seen on the relays' /metrics.

``python -m bench.events latency --dir D [--transfers N]``: a signed-webhook receiver on
loopback (just past the cluster's ports), N same-shard transfers through txclient at a bounded
concurrency, and for every delivered ``transfer.settled`` the time from the event's
``created_at`` (the commit time, PostgreSQL's clock: the same host) to its arrival. Also the CPU
the relay processes (decoder fan-out, publisher, webhook worker) spent per published event.

``python -m bench.events publisher --dir D [--events N] [--accounts A] [--per-txn K]``: the
publisher's own CPU per event, apart from the rest of the relay process (the decoder's fan-out
to the regions' caches, the outbox, webhook delivery share its event loop, so the relay's CPU
cannot be split by thread): this process runs the relay's ``EventSink`` alone against the
cluster's NATS (us-east's server: the stream's real three-replica quorum) and feeds it N
synthetic committed same-shard transfers between A accounts of a throwaway tenant, in feed
batches of ``PUBLISHER_TXNS_PER_BATCH`` transactions; the batches are built before the clock
starts, so the figure is derivation, waves, JSON, the NATS client and the acknowledgements, per
event: what the sink costs inside a relay. ``--accounts 1`` is the hot-account case (one wave
per transaction); ``--per-txn K`` commits K transfers a transaction, as the router's batcher
does under load.

``python -m bench.events rate --base-port P --seconds S``: scrape every region's relay metrics
of the cluster at P once a second for S seconds (say, while ``txr bench --quick`` runs there)
and report the highest and mean rate of published events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import statistics
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families

from chaos.events import Receiver
from consistency.saga import TransferStatus
from infra.local import cluster
from infra.local.ports import PORT_SPAN_MAX, REGION_STRIDE
from regionstore.changefeed import FeedBatch
from regionstore.changes import CommittedTxn, TransferChange
from router.auth import TENANT_SCOPES
from router.events.jetstream import JetStreamPublisher
from router.events.publisher import (
    EVENT_QUEUE_BATCHES_MAX,
    EventSink,
    Position,
)
from txclient import AsyncClient

CONCURRENCY: Final = 4
# The publisher figure's feed batches: one durable round of commits each, as the decoder hands
# them out under load (router.relays.feed).
PUBLISHER_TXNS_PER_BATCH: Final = 20
PUBLISHER_WAIT_S: Final = 300.0
DELIVERY_WAIT_S: Final = 120.0
SCRAPE_TIMEOUT_S: Final = 2.0
TOKEN_TTL_S: Final = 3600


def _published(url: str) -> float:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "txr_events_published_total"
    )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(d: Path, transfers: int) -> dict[str, Any]:
    desc = cluster.status(d)
    routers = {r: v["router"] for r, v in desc["regions"].items()}
    relays = {r: (v["relays_pid"], v["relays_metrics"]) for r, v in desc["regions"].items()}
    tenant = "bench-events-" + os.urandom(4).hex()
    token = cluster.token(d, tenant, sorted(TENANT_SCOPES), TOKEN_TTL_S)
    base = cluster.load_state(d).base_port
    receiver = Receiver(base + PORT_SPAN_MAX)
    arrivals = receiver.first_seen
    await receiver.start()
    try:
        async with AsyncClient(routers, token, prefer="us-east", probe=False) as c:
            await receiver.register(c)
            funding = await c.create_account("EUR", home_region="us-east", overdraft_limit=10**12)
            dst = await c.create_account("EUR", home_region="us-east")
            cpu0 = {r: _cpu_s(pid) for r, (pid, _) in relays.items()}
            pub0 = sum(_published(url) for _, url in relays.values())
            t0 = time.monotonic()
            sem = asyncio.Semaphore(CONCURRENCY)

            async def one() -> None:
                async with sem:
                    await c.transfer(
                        source=funding.id, destination=dst.id, amount=1, currency="EUR"
                    )

            await asyncio.gather(*(one() for _ in range(transfers)))
            load_s = time.monotonic() - t0
            deadline = time.monotonic() + DELIVERY_WAIT_S
            settled: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                evs = [e.raw async for e in c.events(page_size=500)]
                settled = [e for e in evs if e["type"] == "transfer.settled"]
                if len(settled) >= transfers and all(e["id"] in arrivals for e in settled):
                    break
                await asyncio.sleep(0.5)
            cpu1 = {r: _cpu_s(pid) for r, (pid, _) in relays.items()}
            pub1 = sum(_published(url) for _, url in relays.values())
    finally:
        await receiver.stop()
    lat = sorted(
        arrivals[e["id"]]
        - dt.datetime.fromisoformat(e["created_at"].replace("Z", "+00:00")).timestamp()
        for e in settled
        if e["id"] in arrivals
    )
    published = pub1 - pub0
    cpu = sum(cpu1.values()) - sum(cpu0.values())

    def pct(p: float) -> float | None:
        return None if not lat else lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {
        "transfers": transfers,
        "delivered": len(lat),
        "load_s": round(load_s, 2),
        "commit_to_webhook_ms": {
            "p50": pct(0.5),
            "p99": pct(0.99),
            "mean": statistics.fmean(lat) * 1000 if lat else None,
        },
        "events_published": published,
        "relay_cpu_ms_per_event": cpu * 1000 / published if published else None,
        "wan": cluster.load_state(d).wan_profile,
        "loadavg": os.getloadavg(),
    }


def _synthetic_batches(tenant: str, n: int, accounts: int, per_txn: int) -> list[FeedBatch]:
    rng = random.Random(n * 31 + accounts)
    # Account ids (slot 1): one more than asked, so the hot case has a counterpart.
    pool = [(i << 12) | 1 for i in range(1, accounts + 2)]
    now = dt.datetime.now(dt.UTC)
    created = now.isoformat(sep=" ")
    txns = []
    changes: list[TransferChange] = []
    for i in range(n):
        src, dst = rng.sample(pool, 2) if accounts > 1 else (pool[0], pool[1])
        row: dict[str, str | None] = {
            "id": str(uuid.uuid4()),
            "tenant": tenant,
            "source": str(src),
            "destination": str(dst),
            "amount": "1",
            "currency": "EUR",
            "reference": None,
            "status": TransferStatus.SETTLED.value,
            "created_at": created,
            "refusal_code": None,
        }
        changes.append(TransferChange(row, True))
        if len(changes) == per_txn or i == n - 1:
            lsn = 1_000 + 100 * i
            txns.append(CommittedTxn(lsn, lsn + 50, now, (), tuple(changes)))
            changes = []
    return [
        FeedBatch(b[0].commit_lsn - 1, b[-1].end_lsn, tuple(b), (), None)
        for b in (
            txns[k : k + PUBLISHER_TXNS_PER_BATCH]
            for k in range(0, len(txns), PUBLISHER_TXNS_PER_BATCH)
        )
    ]


async def publisher_cpu(d: Path, events: int, accounts: int, per_txn: int) -> dict[str, Any]:
    url = cluster.status(d)["regions"]["us-east"]["nats"]
    tenant = "bench-pub-" + os.urandom(4).hex()
    shard = tenant  # the position key: the cluster's decoders keep theirs
    batches = _synthetic_batches(tenant, events, accounts, per_txn)
    pub = JetStreamPublisher([url], name="bench-events-publisher")
    sink = EventSink(pub, shard=shard, region="us-east", home_region="us-east")
    try:
        # A position on this session's slot: no recovery scan (there is no shard behind it).
        await pub.save_position(shard, Position("bench", 1, None))
        sink.begin(0, "bench", 1)
        await pub.healthy()  # connected before the clock starts
        cpu0, t0 = time.process_time(), time.monotonic()
        fed = 0
        deadline = t0 + PUBLISHER_WAIT_S
        while sink.published < events and time.monotonic() < deadline:
            while fed < len(batches) and sink.queue.qsize() < EVENT_QUEUE_BATCHES_MAX:
                sink.offer(batches[fed])
                fed += 1
            if not await sink.run_once():
                raise RuntimeError("the publisher failed: see its log")
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        await pub.close()
    return {
        "events": sink.published,
        "accounts": accounts,
        "per_txn": per_txn,
        "publisher_cpu_us_per_event": round(cpu * 1e6 / max(1, sink.published), 1),
        "events_per_s": round(sink.published / wall, 1),
        "wall_s": round(wall, 2),
        "wan": cluster.load_state(d).wan_profile,
        "loadavg": os.getloadavg(),
    }


def rate(base_port: int, seconds: float, regions: int = 3) -> dict[str, Any]:
    urls = [f"http://127.0.0.1:{base_port + REGION_STRIDE * i + 7}/metrics" for i in range(regions)]
    samples: list[tuple[float, float]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        # A relay restarting answers nothing for a moment: that second has no sample, and
        # the rate is taken over the samples there are.
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            total = sum(_published(u) for u in urls)
            samples.append((time.monotonic(), total))
        time.sleep(1.0)
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples)]
    busy = [r for r in rates if r > 0]
    return {
        "samples": len(samples),
        "events_total": samples[-1][1] - samples[0][1] if len(samples) > 1 else 0,
        "max_events_per_s": max(rates, default=0.0),
        "mean_busy_events_per_s": statistics.fmean(busy) if busy else 0.0,
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.events")
    sub = p.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--dir", type=Path, required=True)
    lat.add_argument("--transfers", type=int, default=300)
    pc = sub.add_parser("publisher")
    pc.add_argument("--dir", type=Path, required=True)
    pc.add_argument("--events", type=int, default=20_000)
    pc.add_argument("--accounts", type=int, default=1_000)
    pc.add_argument("--per-txn", type=int, default=1)
    r = sub.add_parser("rate")
    r.add_argument("--base-port", type=int, required=True)
    r.add_argument("--seconds", type=float, default=300.0)
    args = p.parse_args()
    if args.cmd == "latency":
        out = asyncio.run(latency(args.dir, args.transfers))
    elif args.cmd == "publisher":
        out = asyncio.run(publisher_cpu(args.dir, args.events, args.accounts, args.per_txn))
    else:
        out = rate(args.base_port, args.seconds)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
