"""``txr bench``: start a private cluster, measure every part side by side, report, tear down.

Parts (issues 7 and 11): (a) the pgbench ceiling on one shard primary; (b) router transfers/s
at saturation with ``wrk`` (C, Lua, a fresh Idempotency-Key per transfer; bench.wrk) and the
ratio to (a); (c) ``POST /v1/transfers/batch`` with batches of BATCH_SIZE, its transfers/s and
ratio to (a); for (b) and (c) the CPU time per acknowledged transfer of every component read
from /proc (bench.cpu); (d) latency at 50% and 80% of (b)'s rate (open loop from the intended
send time, HdrHistogram, the Python generator, whose own CPU is reported); (e) cached vs strong
reads; (f) a skewed mix where most transfers touch a few hot accounts. A py-spy flame graph of
the router at saturation is written beside the report, and the load average before and after
says how busy the machine was. First of all, before any load, the idle figure (bench.idle): the
cores the whole cluster spends while nobody sends anything (issue 12's goal: 0.10). The
cluster lives in a temp directory on ports 7000-7099 (``--base-port`` moves them) with ``--wan
none`` and is stopped and purged even on failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final

import aiohttp
import uvloop

from bench import ceiling, cpu, dbwork, idle, loadgen, rawload, report, wrk
from infra.local import cluster
from txclient import AsyncClient, RetryBudget

BASE_PORT: Final = 7000
TENANT: Final = "bench"
TOKEN_TTL_S: Final = 3600
# accounts:overdraft: the funding account they open may go below zero (API.md).
SCOPES: Final = ("accounts:read", "accounts:write", "accounts:overdraft", "transfers:write")
CURRENCY: Final = "EUR"
# The mint account funds every bench account; its overdraft is the API's own maximum.
MINT_OVERDRAFT: Final = 10**15
# Each bench account starts with this much; transfers move 1, so no run can exhaust it.
FUNDING_AMOUNT: Final = 10**9
TRANSFER_AMOUNT: Final = 1
# Requests in flight while creating and funding accounts (set-up, not measured).
SETUP_CONCURRENCY: Final = 16
# A set-up call (txclient) may take this long with its retries; its retry budget is generous
# (shed answers on a loaded machine are expected during set-up, and nothing else shares it).
SETUP_CALL_S: Final = 30.0
SETUP_RETRY_TOKENS: Final = 1000.0
# Skewed mix: this share of transfers has one side among HOT_ACCOUNTS accounts.
HOT_SHARE: Final = 0.8
HOT_ACCOUNTS: Final = 5
# Open-loop rates as fractions of the measured saturation rate.
OPEN_LOOP_FRACTIONS: Final = (("50%", 0.5), ("80%", 0.8))
# Overload (issue 16): open loop past saturation. The router must shed (429/503 with
# Retry-After) rather than queue: goodput (201s per second) stays at least
# OVERLOAD_GOODPUT_MIN of the saturation rate, and the p99 of the admitted requests within
# OVERLOAD_P99_RATIO_MAX of the p99 at 50 %.
OVERLOAD_FRACTIONS: Final = (("150%", 1.5), ("200%", 2.0))
# ``--parts overload`` runs only the open loop that the p99 goal is measured against.
OVERLOAD_BASELINE_FRACTIONS: Final = (("50%", 0.5),)
OVERLOAD_REPORT_FILE: Final = "overload.json"
OVERLOAD_GOODPUT_MIN: Final = 0.8
OVERLOAD_P99_RATIO_MAX: Final = 3.0
# The answers that count as shed (refused at once, nothing written) rather than failed.
SHED_STATUSES: Final = frozenset({"429", "503"})
OK_WRITE: Final = frozenset({201})
OK_READ: Final = frozenset({200})
# The saturation sweep stops at the knee: once a run errs or falls below this share of the best
# rate so far, more concurrency only queues (and overload leaves work behind for the next part).
SATURATION_KNEE_FRACTION: Final = 0.9
# Pause between parts so that requests a part gave up on finish in the router before the next.
SETTLE_S: Final = 2.0
# Every closed-loop run also stops after this many requests, whatever its duration.
REQUESTS_MAX_PER_RUN: Final = 2_000_000

# POST /v1/transfers/batch: items per request. The wrk connections sending them are swept
# (Profile.batch_concurrency) like the single requests, up to the knee: a few connections
# already keep a shard's two batches in flight full (100 items each, 64 per store call), and
# past that the extra requests only stand in the shard's queue, whose delay target then sheds
# whole requests (router.batcher ShardBatcher.admit).
BATCH_SIZE: Final = 100
# The flame graph: py-spy samples the router at this rate during the profiled saturation run.
PYSPY_RATE_HZ: Final = 200
FLAME_GRAPH_FILE: Final = "router-flame.svg"
# Grace for py-spy to write its SVG after its duration.
PYSPY_GRACE_S: Final = 30.0

_WORKER_PID_RE: Final = r'^txr_router_worker_info\{.*pid="(\d+)".*\} '
# Scrapes of /metrics to hear from every router worker (the kernel picks one per connection):
# with two workers the chance of missing one in 32 tries is 2^-31.
METRICS_SCRAPES_MAX: Final = 32
_BATCH_SUM_RE: Final = r'^txr_batch_items_sum\{{region="{r}",shard="{s}"\}} ([0-9.e+]+)$'
_BATCH_COUNT_RE: Final = r'^txr_batch_items_count\{{region="{r}",shard="{s}"\}} ([0-9.e+]+)$'


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    """Sizes and durations of one run; ``QUICK`` keeps the whole command well under 2 minutes."""

    pgbench_clients: tuple[int, ...]
    pgbench_s: float
    accounts: int
    warmup_s: float
    saturation_concurrency: tuple[int, ...]
    saturation_s: float
    profile_concurrency: int
    batch_concurrency: tuple[int, ...]
    batch_s: float
    open_loop_s: float
    read_concurrency: int
    read_s: float
    skew_concurrency: int
    skew_s: float
    # The idle figure (bench.idle): a settle after `up`, then one window before any load.
    idle_settle_s: float
    idle_s: float


FULL: Final = Profile(
    pgbench_clients=ceiling.PGBENCH_CLIENTS_FULL,
    pgbench_s=10.0,
    accounts=2000,
    warmup_s=3.0,
    saturation_concurrency=(16, 64, 128, 256),
    saturation_s=15.0,
    profile_concurrency=64,
    batch_concurrency=(2, 4, 8),
    batch_s=15.0,
    open_loop_s=20.0,
    read_concurrency=64,
    read_s=8.0,
    skew_concurrency=128,
    skew_s=10.0,
    idle_settle_s=idle.SETTLE_S,
    idle_s=idle.WINDOW_S,
)
QUICK: Final = Profile(
    pgbench_clients=ceiling.PGBENCH_CLIENTS_QUICK,
    pgbench_s=3.0,
    accounts=200,
    warmup_s=1.0,
    saturation_concurrency=(64,),
    saturation_s=3.0,
    profile_concurrency=64,
    batch_concurrency=(4,),
    batch_s=3.0,
    open_loop_s=3.0,
    read_concurrency=32,
    read_s=2.0,
    skew_concurrency=64,
    skew_s=2.0,
    idle_settle_s=2.0,
    idle_s=5.0,
)


def progress_stderr(msg: str) -> None:
    sys.stderr.write(f"[txr bench] {msg}\n")
    sys.stderr.flush()


def run(
    out_dir: Path,
    *,
    quick: bool,
    base_port: int = BASE_PORT,
    workers: int | None = None,
    progress: Callable[[str], None] = progress_stderr,
) -> dict[str, Any]:
    """Run the whole suite and write the report into ``out_dir``; returns the report."""
    prof = QUICK if quick else FULL
    t0 = time.monotonic()
    load_before = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="txr-bench-"))
    # The postgres user reads the pgbench script from here.
    tmp.chmod(0o755)
    cluster_dir = tmp / "cluster"
    try:
        progress(f"starting a local cluster in {cluster_dir} (base port {base_port}, WAN none)")
        cluster.up(
            cluster.UpOptions(dir=cluster_dir, base_port=base_port, wan="none", workers=workers),
            progress=progress,
        )
        t = _target(cluster_dir, tmp, out_dir)
        desc, region, shard, router_workers = t.desc, t.region, t.shard, t.router_workers
        progress(f"idle cluster: settle {prof.idle_settle_s:g} s, measure {prof.idle_s:g} s")
        time.sleep(prof.idle_settle_s)
        idle_part = idle.measure(desc, prof.idle_s)
        progress(f"idle cluster {idle_part['cores_total']:.3f} cores")
        dbwork.enable(t.ctx.db_dsn)
        progress(f"pgbench ceiling on {shard}: clients {prof.pgbench_clients}, {prof.pgbench_s} s")
        ceil = ceiling.measure(
            t.ctx.db_dsn, tmp, clients=prof.pgbench_clients, duration_s=prof.pgbench_s
        )
        progress(f"pgbench ceiling {ceil['tps']:.1f} transfers/s")
        parts = uvloop.run(
            _router_parts(
                t.url, t.metrics_url, t.tok, region, shard, router_workers, prof, progress, t.ctx
            )
        )
    finally:
        idle.stop_and_purge(cluster_dir, tmp, progress)
    sat_rate = parts["router"]["saturation"]["best"]["rate"]
    parts["router"]["ratio_to_ceiling"] = sat_rate / ceil["tps"] if ceil["tps"] > 0 else 0.0
    batch_rate = parts["router"]["batch"]["rate"]
    parts["router"]["batch"]["ratio_to_ceiling"] = (
        batch_rate / ceil["tps"] if ceil["tps"] > 0 else 0.0
    )
    rep: dict[str, Any] = {
        "quick": quick,
        "region": region,
        "shard": shard,
        "wan": "none",
        "router_workers": router_workers,
        "profile": dataclasses.asdict(prof),
        "ceiling": ceil,
        "idle": idle_part,
        **parts,
        "elapsed_s": time.monotonic() - t0,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpus": os.cpu_count(),
    }
    report.write(rep, out_dir)
    return rep


async def transfer(s: aiohttp.ClientSession, url: str, src: str, dst: str, amount: int) -> int:
    """One measured transfer of the open-loop generator: a bare request on its shared session
    (the generator's own cost must stay small; set-up goes through txclient instead)."""
    body = {"source": src, "destination": dst, "amount": amount, "currency": CURRENCY}
    async with s.post(
        url + "/v1/transfers", json=body, headers={"Idempotency-Key": uuid.uuid4().hex}
    ) as r:
        await r.read()
        return r.status


def overload_summary(saturation_rate: float, open_runs: dict[str, Any]) -> dict[str, Any]:
    """Goodput and admitted p99 of each overload run against the goals (OVERLOAD_*)."""
    base = open_runs.get("50%")
    base_p99 = base["latency_ms"]["p99"] if base else 0.0
    out: dict[str, Any] = {
        "saturation_rate": saturation_rate,
        "p99_at_50pct_ms": base_p99,
        "goodput_min": OVERLOAD_GOODPUT_MIN,
        "p99_ratio_max": OVERLOAD_P99_RATIO_MAX,
        "runs": {},
    }
    for name, _frac in OVERLOAD_FRACTIONS:
        run = open_runs.get(name)
        if run is None:
            continue
        goodput = run["rate"] / saturation_rate if saturation_rate > 0 else 0.0
        p99 = run["latency_ms"]["p99"]
        ratio = p99 / base_p99 if base_p99 > 0 else float("inf")
        statuses = run["statuses"]
        out["runs"][name] = {
            "target_rate": run["target_rate"],
            "goodput_rate": run["rate"],
            "goodput_fraction": round(goodput, 3),
            "p99_admitted_ms": p99,
            "p99_ratio": round(ratio, 2),
            "shed": sum(n for s, n in statuses.items() if s in SHED_STATUSES),
            "failed": sum(n for s, n in statuses.items() if s not in SHED_STATUSES and s != "201"),
            "goodput_ok": goodput >= OVERLOAD_GOODPUT_MIN,
            "p99_ok": ratio <= OVERLOAD_P99_RATIO_MAX,
        }
    return out


async def setup_accounts(url: str, token: str, region: str, n: int) -> tuple[str, list[str]]:
    """The mint and ``n`` funded accounts homed in ``region`` (set-up, not measured).

    Through txclient, which retries shed and unknown answers with the same idempotency key
    within its deadline, so a loaded machine does not fail the run and no funding applies twice.
    """
    budget = RetryBudget(tokens_max=SETUP_RETRY_TOKENS, refill_per_s=SETUP_RETRY_TOKENS)
    async with AsyncClient(
        {region: url}, token, prefer=region, probe=False, timeout=SETUP_CALL_S, budget=budget
    ) as c:
        mint = await c.create_account(CURRENCY, home_region=region, overdraft_limit=MINT_OVERDRAFT)

        async def open_one(_i: int) -> str:
            return (await c.create_account(CURRENCY, home_region=region)).id

        accounts: list[str] = await bounded(n, open_one)

        async def fund(i: int) -> None:
            await c.transfer(
                source=mint.id, destination=accounts[i], amount=FUNDING_AMOUNT, currency=CURRENCY
            )

        await bounded(n, fund)
    return mint.id, accounts


async def bounded(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """``fn(0..n-1)`` with at most SETUP_CONCURRENCY in flight."""
    sem = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _batch_totals(url: str, region: str, shard: str, workers: int) -> list[float]:
    """(sum, count) of the batch-size histogram for the shard, summed over the router workers.

    Each worker answers /metrics for itself and the kernel picks the worker per connection, so
    scrape over fresh connections until every worker (by pid) has answered, within a bound.
    """
    seen: dict[str, list[float]] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(METRICS_SCRAPES_MAX):
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            pid = re.search(_WORKER_PID_RE, text, re.M)
            key = pid.group(1) if pid else "?"
            out = []
            for pattern in (_BATCH_SUM_RE, _BATCH_COUNT_RE):
                m = re.search(pattern.format(r=re.escape(region), s=re.escape(shard)), text, re.M)
                out.append(float(m.group(1)) if m else 0.0)
            seen[key] = out
            if len(seen) >= workers:
                break
    return [sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())]


@dataclasses.dataclass(frozen=True, slots=True)
class _Context:
    cluster_dir: Path
    tmp: Path
    out_dir: Path
    groups: cpu.Groups
    router_pids: tuple[int, ...]
    # Superuser DSN (database txr) of the loaded shard's primary: its work per transfer.
    db_dsn: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    """What a benchmark loads: the first region's router (its one shard) of a running cluster."""

    desc: dict[str, Any]
    region: str
    shard: str
    router_workers: int
    url: str
    # /metrics is served on the router's admin listener, not its public port.
    metrics_url: str
    tok: str
    ctx: _Context


def _target(cluster_dir: Path, tmp: Path, out_dir: Path) -> _Target:
    desc = cluster.status(cluster_dir)
    region = next(iter(desc["regions"]))
    shard = cluster.shard_name(region)
    r = desc["regions"][region]
    loadgen.check_loopback(r["router"])
    ctx = _Context(
        cluster_dir=cluster_dir,
        tmp=tmp,
        out_dir=out_dir,
        groups=cpu.groups(desc, region, shard),
        router_pids=tuple(int(p) for p in r["router_pids"]),
        db_dsn=cluster.primary_admin_dsns(cluster_dir)[shard],
    )
    tok = cluster.token(cluster_dir, TENANT, SCOPES, TOKEN_TTL_S)
    return _Target(
        desc, region, shard, len(r["router_pids"]), r["router"], r["router_admin"], tok, ctx
    )


async def _wrk_measured(
    url: str,
    accounts_file: Path,
    tok: str,
    ctx: _Context,
    *,
    connections: int,
    duration_s: float,
    batch: int = 0,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """One wrk run with the cluster's CPU per acknowledged transfer (and, if asked, a py-spy
    flame graph of the router recorded over the same run)."""
    spy: asyncio.subprocess.Process | None = None
    if profile_to is not None:
        spy = await _start_pyspy(ctx.router_pids[0], duration_s, profile_to)
    db_before = await asyncio.to_thread(dbwork.snapshot, ctx.db_dsn)
    before = cpu.snapshot(ctx.groups)
    res = await asyncio.to_thread(
        wrk.run,
        url,
        accounts_file,
        tok,
        connections=connections,
        duration_s=duration_s,
        batch=batch,
    )
    after = cpu.snapshot(ctx.groups)
    db_after = await asyncio.to_thread(dbwork.snapshot, ctx.db_dsn)
    out = res.to_json() | {
        "cpu_us_per_transfer": cpu.per_transfer_us(before, after, res.acked),
        "db_per_transfer": dbwork.per_transfer(db_before, db_after, res.acked),
    }
    if spy is not None:
        try:
            await asyncio.wait_for(spy.wait(), PYSPY_GRACE_S)
        except TimeoutError:
            spy.kill()
            await spy.wait()
    return out


async def _sweep(
    concurrency: Sequence[int],
    run: Callable[[int], Awaitable[dict[str, Any]]],
    label: str,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """wrk runs at rising connection counts up to the knee: the sweep stops after the first
    run that errs (sheds) or falls below SATURATION_KNEE_FRACTION of the best rate so far; more
    concurrency would only queue, and leave work behind for the next part."""
    runs: list[dict[str, Any]] = []
    for c in concurrency:
        res = await run(c)
        progress(
            f"{label} c={c}: {res['rate']:.1f} transfers/s, failed {res['failed']}, router "
            f"{res['cpu_us_per_transfer']['router']:.0f} us/transfer"
        )
        runs.append(res)
        if res["failed"] or res["rate"] < SATURATION_KNEE_FRACTION * max(r["rate"] for r in runs):
            break
    return runs


def _pyspy() -> str | None:
    """py-spy from PATH or beside this interpreter (the venv's, from the profile extra)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


async def _start_pyspy(
    pid: int, duration_s: float, path: Path
) -> asyncio.subprocess.Process | None:
    exe = _pyspy()
    if exe is None:
        return None
    return await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(duration_s))),
        "--rate",
        str(PYSPY_RATE_HZ),
        "--nonblocking",
        "--format",
        "flamegraph",
        "--output",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def _open_loop_runs(
    url: str,
    metrics_url: str,
    tok: str,
    pick_pair: Callable[[], tuple[str, str]],
    saturation_rate: float,
    fractions: Sequence[tuple[str, float]],
    duration_s: float,
    ctx: _Context,
    where: tuple[str, str, int],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Open-loop runs at these fractions of the saturation rate, each with what it cost: CPU
    per acknowledged transfer and per request (refused ones too) of every component and of
    the generator, and the mean batch size (issue 16: where the goodput goes past saturation).
    """
    region, shard, workers = where
    open_runs: dict[str, Any] = {}
    for name, frac in fractions:
        await asyncio.sleep(SETTLE_S)
        rate = max(1.0, saturation_rate * frac)
        # The lean generator (bench.rawload): the aiohttp one's own CPU per request was
        # most of a core at the overload rates, taken from what it measures.
        build = rawload.transfer_request(
            url, tok, pick_pair, TRANSFER_AMOUNT, f"open-{name[:-1]}-{uuid.uuid4().hex[:12]}"
        )
        batches_before = await _batch_totals(metrics_url, region, shard, workers)
        before = cpu.snapshot(ctx.groups)
        gen_cpu = time.process_time()
        res = await rawload.open_loop(
            url, build, rate=rate, duration_s=duration_s, ok_statuses=OK_WRITE
        )
        gen_cpu_s = time.process_time() - gen_cpu
        after = cpu.snapshot(ctx.groups)
        batches_after = await _batch_totals(metrics_url, region, shard, workers)
        requests = sum(res.statuses.values())
        batches = batches_after[1] - batches_before[1]
        # The Python generator shares the cores with the cluster: its own CPU, reported.
        open_runs[name] = res.to_json() | {
            "generator_cpu_s": gen_cpu_s,
            "generator_us_per_request": gen_cpu_s * 1e6 / requests if requests else 0.0,
            "cpu_us_per_transfer": cpu.per_transfer_us(before, after, res.ok),
            "cpu_us_per_request": cpu.per_transfer_us(before, after, requests),
            "mean_batch_size": (
                (batches_after[0] - batches_before[0]) / batches if batches > 0 else 0.0
            ),
        }
        lat = open_runs[name]["latency_ms"]
        progress(
            f"open loop {name} ({rate:.0f}/s): {res.rate:.0f} transfers/s, p50 "
            f"{lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, statuses {dict(res.statuses)}"
        )
    return open_runs


def run_overload(
    out_dir: Path,
    *,
    quick: bool,
    base_port: int = BASE_PORT,
    workers: int | None = None,
    progress: Callable[[str], None] = progress_stderr,
) -> dict[str, Any]:
    """Only the overload part (``txr bench --parts overload``): a private cluster, the funded
    accounts and the warm-up, the wrk saturation sweep (its best rate is the 100 %), then the
    open loop at 50 % (the p99 baseline) and at OVERLOAD_FRACTIONS, against the goals; written
    to ``out_dir/overload.json``. A few minutes instead of the whole suite's twenty."""
    prof = QUICK if quick else FULL
    t0 = time.monotonic()
    load_before = os.getloadavg()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="txr-bench-"))
    cluster_dir = tmp / "cluster"
    try:
        progress(f"starting a local cluster in {cluster_dir} (base port {base_port}, WAN none)")
        cluster.up(
            cluster.UpOptions(dir=cluster_dir, base_port=base_port, wan="none", workers=workers),
            progress=progress,
        )
        t = _target(cluster_dir, tmp, out_dir)
        region, shard, router_workers = t.region, t.shard, t.router_workers
        dbwork.enable(t.ctx.db_dsn)
        part = uvloop.run(
            _overload_part(
                t.url, t.metrics_url, t.tok, region, shard, router_workers, prof, progress, t.ctx
            )
        )
    finally:
        idle.stop_and_purge(cluster_dir, tmp, progress)
    rep = {
        "quick": quick,
        "region": region,
        "shard": shard,
        "router_workers": router_workers,
        **part,
        "elapsed_s": time.monotonic() - t0,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpus": os.cpu_count(),
    }
    (out_dir / OVERLOAD_REPORT_FILE).write_text(json.dumps(rep, indent=2) + "\n")
    return rep


async def _accounts_and_warmup(
    s: aiohttp.ClientSession,
    url: str,
    tok: str,
    region: str,
    prof: Profile,
    rng: random.Random,
    progress: Callable[[str], None],
) -> tuple[list[str], Callable[[], tuple[str, str]]]:
    """Open and fund the run's accounts, warm the router up; the accounts and the pair picker
    (``rng``'s choice, so every part of a run loads the same pairs)."""
    progress(f"creating and funding {prof.accounts} accounts homed in {region}")
    _mint, accounts = await setup_accounts(url, tok, region, prof.accounts)

    def pick_pair() -> tuple[str, str]:
        src, dst = rng.sample(accounts, 2)
        return src, dst

    async def uniform(sess: aiohttp.ClientSession, _seq: int) -> int:
        src, dst = pick_pair()
        return await transfer(sess, url, src, dst, TRANSFER_AMOUNT)

    progress(f"warm-up {prof.warmup_s} s")
    await loadgen.closed_loop(
        s,
        uniform,
        concurrency=prof.saturation_concurrency[0],
        duration_s=prof.warmup_s,
        max_requests=REQUESTS_MAX_PER_RUN,
        ok_statuses=OK_WRITE,
    )
    return accounts, pick_pair


async def _overload_part(
    url: str,
    metrics_url: str,
    tok: str,
    region: str,
    shard: str,
    workers: int,
    prof: Profile,
    progress: Callable[[str], None],
    ctx: _Context,
) -> dict[str, Any]:
    rng = random.Random(0x7E5)  # the same accounts as the whole suite's runs
    async with loadgen.session({"Authorization": f"Bearer {tok}"}) as s:
        accounts, pick_pair = await _accounts_and_warmup(s, url, tok, region, prof, rng, progress)
    accounts_file = wrk.write_accounts(ctx.tmp / "accounts.txt", accounts)

    async def single(c: int) -> dict[str, Any]:
        return await _wrk_measured(
            url, accounts_file, tok, ctx, connections=c, duration_s=prof.saturation_s
        )

    sat_runs = await _sweep(prof.saturation_concurrency, single, "wrk", progress)
    best = max(sat_runs, key=lambda r: r["rate"])
    open_runs = await _open_loop_runs(
        url,
        metrics_url,
        tok,
        pick_pair,
        best["rate"],
        OVERLOAD_BASELINE_FRACTIONS + OVERLOAD_FRACTIONS,
        prof.open_loop_s,
        ctx,
        (region, shard, workers),
        progress,
    )
    return {
        "saturation": {"runs": sat_runs, "best": best, "generator": "wrk"},
        "open_loop": open_runs,
        "overload": overload_summary(best["rate"], open_runs),
    }


async def _router_parts(
    url: str,
    metrics_url: str,
    tok: str,
    region: str,
    shard: str,
    workers: int,
    prof: Profile,
    progress: Callable[[str], None],
    ctx: _Context,
) -> dict[str, Any]:
    rng = random.Random(0x7E5)  # reproducible choice of accounts; the timing is not
    async with loadgen.session({"Authorization": f"Bearer {tok}"}) as s:
        accounts, pick_pair = await _accounts_and_warmup(s, url, tok, region, prof, rng, progress)
        accounts_file = wrk.write_accounts(ctx.tmp / "accounts.txt", accounts)
        before = await _batch_totals(metrics_url, region, shard, workers)
        flame = ctx.out_dir / FLAME_GRAPH_FILE
        flame.unlink(missing_ok=True)

        async def single(c: int) -> dict[str, Any]:
            return await _wrk_measured(
                url,
                accounts_file,
                tok,
                ctx,
                connections=c,
                duration_s=prof.saturation_s,
                profile_to=flame if c == prof.profile_concurrency else None,
            )

        async def batched(c: int) -> dict[str, Any]:
            await asyncio.sleep(SETTLE_S)
            return await _wrk_measured(
                url,
                accounts_file,
                tok,
                ctx,
                connections=c,
                duration_s=prof.batch_s,
                batch=BATCH_SIZE,
            )

        sat_runs = await _sweep(prof.saturation_concurrency, single, "wrk", progress)
        after = await _batch_totals(metrics_url, region, shard, workers)
        batches = after[1] - before[1]
        mean_batch = (after[0] - before[0]) / batches if batches > 0 else 0.0
        best = max(sat_runs, key=lambda r: r["rate"])
        batch_runs = await _sweep(
            prof.batch_concurrency, batched, f"wrk batch of {BATCH_SIZE}", progress
        )
        batch_run = max(batch_runs, key=lambda r: r["rate"])

        open_runs = await _open_loop_runs(
            url,
            metrics_url,
            tok,
            pick_pair,
            best["rate"],
            OPEN_LOOP_FRACTIONS + OVERLOAD_FRACTIONS,
            prof.open_loop_s,
            ctx,
            (region, shard, workers),
            progress,
        )

        reads = {}
        for level in ("cached", "strong"):
            await asyncio.sleep(SETTLE_S)
            served: Counter[str] = Counter()

            async def read(
                sess: aiohttp.ClientSession,
                _seq: int,
                level: str = level,
                served: Counter[str] = served,
            ) -> int:
                acct = rng.choice(accounts)
                async with sess.get(
                    f"{url}/v1/accounts/{acct}", params={"consistency": level}
                ) as r:
                    await r.read()
                    served[r.headers.get("X-Served-By", "?")] += 1
                    return r.status

            res = await loadgen.closed_loop(
                s,
                read,
                concurrency=prof.read_concurrency,
                duration_s=prof.read_s,
                max_requests=REQUESTS_MAX_PER_RUN,
                ok_statuses=OK_READ,
            )
            progress(f"{level} reads: {res.rate:.1f}/s")
            reads[level] = res.to_json() | {"served_by": dict(served)}

        hot = accounts[:HOT_ACCOUNTS]
        cold = accounts[HOT_ACCOUNTS:]

        async def skewed(sess: aiohttp.ClientSession, _seq: int) -> int:
            if rng.random() < HOT_SHARE:
                pair = [rng.choice(hot), rng.choice(cold)]
                rng.shuffle(pair)
                src, dst = pair
            else:
                src, dst = rng.sample(cold, 2)
            return await transfer(sess, url, src, dst, TRANSFER_AMOUNT)

        await asyncio.sleep(SETTLE_S)
        res = await loadgen.closed_loop(
            s,
            skewed,
            concurrency=prof.skew_concurrency,
            duration_s=prof.skew_s,
            max_requests=REQUESTS_MAX_PER_RUN,
            ok_statuses=OK_WRITE,
        )
        progress(f"skewed: {res.rate:.1f} transfers/s, errors {res.errors}")
        skew = res.to_json() | {"hot_share": HOT_SHARE, "hot_accounts": HOT_ACCOUNTS}

    return {
        "router": {
            "url": url,
            "accounts": len(accounts),
            "saturation": {"runs": sat_runs, "best": best, "generator": "wrk"},
            "mean_batch_size": mean_batch,
            "batch": batch_run | {"batch_size": BATCH_SIZE},
            "batch_runs": batch_runs,
            "flame_graph": FLAME_GRAPH_FILE if flame.exists() else None,
            "open_loop": open_runs,
            "overload": overload_summary(best["rate"], open_runs),
        },
        "reads": reads,
        "skewed": skew,
    }
