"""``txr chaos run``: each scenario on a fresh local cluster, the bank workload under its faults,
then heal, settle, read everything back and check (chaos/checker.py).

One scenario, in order: start a cluster (``--wan none`` unless asked otherwise); open and fund
the accounts; run the workload for ``duration`` seconds while the nemesis follows its schedule;
heal whatever is still broken; wait until every router is ready and every cross-shard transfer
has settled; read every account strongly; read every stored transfer of the tenant from every
shard's primary, and reconcile; check; stop and purge the cluster (its logs are kept in the
report directory when the scenario fails).

A seed fixes the accounts' regions, the operation mix, each fault's target and the schedule; the
interleaving of concurrent requests is the machine's, so a rerun with the same seed repeats the
same experiment, not the same history.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import aiohttp

from chaos import events as chaos_events
from chaos import nemesis
from chaos.checker import FinalAccount, FinalState, check
from chaos.history import History
from chaos.workload import SETUP_RETRY_FOR_S, Bank, WorkloadConfig
from consistency import reconcile
from infra.local import cluster
from infra.local.ports import PORT_SPAN_MAX
from infra.wan import WanControl
from regionstore import admin, audit
from router.auth import TENANT_SCOPES
from router.limits import CACHED_LAG_BOUND_S
from txclient import AsyncClient, errors

DEFAULT_BASE_PORT: Final = 6800
DEFAULT_DURATION_S: Final = 60.0
DURATION_MIN_S: Final = 5.0
DURATION_MAX_S: Final = 3600.0
# After the last heal: every router ready again, and every cross-shard transfer settled.
READY_TIMEOUT_S: Final = 60.0
SETTLE_TIMEOUT_S: Final = 90.0
POLL_S: Final = 0.5
# One /readyz probe waits at most this long (a router answers it from memory and one Redis
# ping); a slower one is retried at the next poll.
READY_PROBE_TIMEOUT_S: Final = 8.0
# Scheduling noise on a loaded machine on top of the routers' cache lag bound: a cached read
# must reflect every write acknowledged longer than the bound plus this before it began.
CACHED_SLACK_S: Final = 0.5
TOKEN_TTL_S: Final = 6 * 3600
REPORT_FILE: Final = "chaos-report.json"


def _progress(msg: str) -> None:
    sys.stderr.write(f"[txr chaos] {msg}\n")
    sys.stderr.flush()


def run(
    scenarios: list[str],
    *,
    duration_s: float,
    seed: int,
    base_port: int = DEFAULT_BASE_PORT,
    wan: str = "none",
    out_dir: Path,
    progress: Callable[[str], None] = _progress,
) -> dict[str, Any]:
    """Run each scenario on its own cluster; write and return the report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    work = Path(tempfile.mkdtemp(prefix="txr-chaos-"))
    # PostgreSQL (as the postgres user when we are root) must be able to enter it.
    work.chmod(0o755)
    try:
        for name in scenarios:
            progress(f"scenario {name}: seed {seed}, {duration_s:g} s")
            try:
                res = asyncio.run(
                    _scenario(
                        name, duration_s, seed, base_port, wan, work / name, out_dir, progress
                    )
                )
            except KeyboardInterrupt:
                # Ctrl-C or SIGTERM (the CLI maps it): no scenario leaves a cluster behind.
                progress(f"scenario {name}: interrupted; stopping its cluster")
                with contextlib.suppress(Exception):
                    cluster.down(work / name, progress)
                raise
            results.append(res)
            progress(
                f"scenario {name}: {'ok' if res['ok'] else 'FAILED'} ({res['ops']} ops, "
                f"{res['acked']} acked, {res['unknown']} unknown)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "seed": seed,
        "duration_s": duration_s,
        "wan": wan,
        "ok": all(r["ok"] for r in results),
        "scenarios": results,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


async def _scenario(
    name: str,
    duration_s: float,
    seed: int,
    base_port: int,
    wan: str,
    cluster_dir: Path,
    out_dir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    rng = random.Random(f"{seed}/{name}")
    t_start = time.monotonic()
    res: dict[str, Any] = {"name": name, "seed": seed, "duration_s": duration_s, "ok": False}
    history = History()
    try:
        await asyncio.to_thread(
            cluster.up,
            cluster.UpOptions(dir=cluster_dir, base_port=base_port, wan=wan),
            progress,
        )
        res["cluster_up_s"] = round(time.monotonic() - t_start, 2)
        await _exercise(name, duration_s, seed, rng, cluster_dir, history, res, progress)
    except Exception as exc:  # noqa: BLE001 - the scenario failed; the report says how
        res["error"] = f"{type(exc).__name__}: {exc}"
        progress(f"scenario {name}: error: {res['error']}")
    finally:
        if history.transfers:
            history.save(out_dir / f"{name}-history.jsonl")
        if not res.get("ok") and (cluster_dir / "logs").is_dir():
            with contextlib.suppress(OSError):
                shutil.copytree(
                    cluster_dir / "logs",
                    out_dir / f"{name}-logs",
                    dirs_exist_ok=True,
                    symlinks=False,
                    ignore_dangling_symlinks=True,
                )
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.down, cluster_dir, progress)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cluster.purge, cluster_dir)
    res["total_s"] = round(time.monotonic() - t_start, 2)
    # A scenario cut short by an error still says what its clients saw.
    res.setdefault("ops", history.ops())
    res.setdefault("acked", sum(op.outcome == "ok" for op in history.transfers))
    res.setdefault("unknown", sum(op.outcome == "info" for op in history.transfers))
    for key in ("lost", "duplicated", "stale_reads"):
        res.setdefault(key, None)
    res.setdefault("conserved", None)
    return res


async def _exercise(
    name: str,
    duration_s: float,
    seed: int,
    rng: random.Random,
    d: Path,
    history: History,
    res: dict[str, Any],
    progress: Callable[[str], None],
) -> None:
    desc = cluster.status(d)
    routers = {r: v["router"] for r, v in desc["regions"].items()}
    tenant = f"chaos-{seed}-{name}"
    bearer = cluster.token(d, tenant, sorted(TENANT_SCOPES), TOKEN_TTL_S)
    t_run0 = time.monotonic()

    def clock() -> float:
        return time.monotonic() - t_run0

    # Only for /readyz (operational, not the API: the API goes through txclient).
    timeout = aiohttp.ClientTimeout(total=READY_PROBE_TIMEOUT_S)
    wan_url = cluster.load_state(d).wan_control
    # The webhook receiver listens just past the cluster's ports (API.md: at most 100).
    receiver = chaos_events.Receiver(cluster.load_state(d).base_port + PORT_SPAN_MAX)
    await receiver.start()
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            WanControl(wan_url) as wan,
            AsyncClient(routers, bearer, timeout=SETUP_RETRY_FOR_S) as api,
        ):
            await receiver.register(api)
            bank = Bank(routers, bearer, tenant, WorkloadConfig(), rng, clock, history)
            await bank.setup()
            ctx = nemesis.Ctx(d, sorted(routers), sorted(desc["shards"]), wan, progress)
            steps = nemesis.schedule(name, duration_s, ctx, rng)
            epochs0 = await asyncio.to_thread(_epochs, d)
            stop = asyncio.Event()
            t0 = time.monotonic()
            load = asyncio.create_task(bank.run(duration_s, stop))
            try:
                res["faults"] = await nemesis.run_schedule(steps, ctx, t0, stop)
            finally:
                # A fault whose inject or heal raised is healed again (heal is idempotent), and the
                # workload always finishes within its own bound.
                for step in steps:
                    with contextlib.suppress(Exception):
                        await step.fault.heal(ctx)
                await load
            _recovery(steps, bank.history, t_run0, t0, res)
            progress(f"scenario {name}: healed; settling and reading back")
            await _wait_ready(session, routers)
            final = await _final_state(d, bank.history, routers, bearer, tenant)
            progress(f"scenario {name}: reading the event stream and the webhook's deliveries")
            final.events, final.delivered = await chaos_events.collect(
                api, receiver, [(t.id, t.status) for t in final.transfers]
            )
            res["webhook_deliveries"] = receiver.deliveries
            res["webhook_bad_signatures"] = receiver.bad_signatures
            epochs1 = await asyncio.to_thread(_epochs, d)
    finally:
        await receiver.stop()
    result = check(bank.history, final, cached_bound_s=CACHED_LAG_BOUND_S + CACHED_SLACK_S)
    # Nothing in a chaos run but the failover controllers bumps a shard epoch (the nemeses
    # only rejoin, which keeps it), so the bumps are the automatic failovers.
    res["automatic_failovers"] = sum(epochs1.get(s, e) - e for s, e in epochs0.items())
    res["epochs"] = epochs1
    anomalies = list(result.anomalies)
    lo, hi = _failovers_expected(steps)
    n = res["automatic_failovers"]
    if n < lo or (hi is not None and n > hi):
        anomalies.append(f"{n} automatic failovers, expected {lo}{'+' if hi is None else f'-{hi}'}")
    res.update(
        {
            "ok": result.ok and len(anomalies) == len(result.anomalies),
            **{k: v for k, v in asdict(result).items() if k != "anomalies"},
            "anomalies": anomalies,
        }
    )


def _epochs(d: Path) -> dict[str, int]:
    return {name: int(s["epoch"]) for name, s in cluster.status(d)["shards"].items()}


def _failovers_expected(steps: list[nemesis.Step]) -> tuple[int, int | None]:
    """The automatic failovers a schedule must cause: a single fault says (min, max); a mixed
    schedule (faults may meet the anti-flap window or a shard without standby) is not held
    to a number."""
    if len(steps) != 1:
        return 0, None
    got: tuple[int, int | None] = getattr(steps[0].fault, "failovers_expected", (0, None))
    return got


def _recovery(
    steps: list[nemesis.Step], history: History, t_run0: float, t0: float, res: dict[str, Any]
) -> None:
    """Per fault: seconds from its repair to the first acknowledged transfer that needed it,
    and the longest gap between such acknowledgements from the injection on. The history's
    clock starts at ``t_run0``, the schedule's at ``t0`` (both monotonic)."""
    for step, event in zip(steps, res.get("faults", []), strict=False):
        f = step.fault
        affected = sorted(
            op.complete_t
            for op in history.transfers
            if op.outcome == "ok" and op.process >= 0 and f.affects(op, history)
        )
        repaired = f.repaired_at()
        if repaired is not None:
            rel = repaired - t_run0
            after = [t for t in affected if t >= rel]
            event["recovery_s"] = round(after[0] - rel, 3) if after else None
        injected = float(event["injected_s"]) + (t0 - t_run0)
        struck = getattr(f, "fault_at", None)
        struck_rel = injected if struck is None else struck - t_run0
        # Per shard the fault hit: fault -> the first acknowledged write on that shard (a
        # transfer whose source account lives there: its leg 1 commits there) that was sent
        # after the fault (one in flight at the fault could be acked from before it).
        first: dict[str, float | None] = {}
        for shard in getattr(f, "shards_hit", []):
            after = [
                op.complete_t
                for op in history.transfers
                if op.outcome == "ok"
                and op.process >= 0
                and op.invoke_t >= struck_rel
                and _shard(history, op.source) == shard
            ]
            first[shard] = round(min(after) - struck_rel, 3) if after else None
        if first:
            event["first_ack_after_fault_s"] = first
        pauses = getattr(f, "pauses_s", None)
        if pauses:
            event["pauses"] = len(pauses)
            event["pause_max_s"] = max(pauses)
        window = [t for t in affected if t >= injected]
        gaps = [b - a for a, b in zip([injected, *window], window, strict=False)]
        event["longest_gap_s"] = round(max(gaps), 3) if gaps else None
        event["acked_affected"] = len(window)


def _shard(history: History, account: str) -> str | None:
    acc = history.accounts.get(account)
    return acc.shard if acc else None


async def _wait_ready(session: aiohttp.ClientSession, routers: dict[str, str]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    pending = dict(routers)
    while pending:
        for region, url in list(pending.items()):
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        del pending[region]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"routers not ready {READY_TIMEOUT_S:g} s after heal: {pending}")
        if pending:
            await asyncio.sleep(POLL_S)


def _snapshots(d: Path) -> dict[str, dict[str, Any]]:
    return {s: admin.reconcile_snapshot(dsn) for s, dsn in cluster.primary_admin_dsns(d).items()}


async def _settled_snapshots(d: Path) -> dict[str, dict[str, Any]]:
    """Reconcile snapshots once nothing is pending, or the last ones at the bound."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        snaps = await asyncio.to_thread(_snapshots, d)
        pending = sum(s["pending"] for s in reconcile.summarize(snaps).values())
        if pending == 0:
            # Shards are read one after another: a transfer can settle between two reads (its
            # destination read before leg 2, its source after the settle). Nothing is pending
            # now and the workload has stopped, so a second pass reads every shard after every
            # settle: one consistent cut.
            return await asyncio.to_thread(_snapshots, d)
        if time.monotonic() > deadline:
            return snaps
        await asyncio.sleep(POLL_S)


async def _final_state(
    d: Path, history: History, routers: dict[str, str], bearer: str, tenant: str
) -> FinalState:
    snaps = await _settled_snapshots(d)
    summary = reconcile.summarize(snaps)
    problems = reconcile.reconcile(snaps)
    transfers: list[audit.StoredTransfer] = []
    foreign = 0
    for shard, dsn in cluster.primary_admin_dsns(d).items():
        a = await asyncio.to_thread(audit.tenant_audit, dsn, shard, tenant)
        transfers.extend(a.transfers)
        foreign += a.foreign_slot_transfers
    accounts: dict[str, FinalAccount] = {}
    # The client retries each read within its deadline; an account it cannot read is missing
    # from the final state, and the checker says so.
    async with AsyncClient(routers, bearer, timeout=SETUP_RETRY_FOR_S) as client:
        for acc in history.accounts.values():
            try:
                got = await client.get_account(acc.id, consistency="strong")
            except errors.TxError:
                continue
            accounts[acc.id] = FinalAccount(got.balance, got.version)
    return FinalState(
        accounts=accounts,
        transfers=list(transfers),
        in_flight=sum(int(s["in_flight"]) for s in summary.values()),
        reconcile_problems=[str(p) for p in problems],
        foreign_slot_transfers=foreign,
    )


def summary(report: dict[str, Any]) -> str:
    """A readable table of the report."""
    lines = [
        f"chaos run: seed {report['seed']}, {report['duration_s']:g} s per scenario, "
        f"WAN {report['wan']}",
        f"{'scenario':14} {'ops':>6} {'acked':>6} {'unknown':>7} {'lost':>4} {'dup':>4} "
        f"{'stale':>5} {'conserved':>9} {'recovery_s':>10} {'auto_fo':>7}  result",
    ]
    for r in report["scenarios"]:
        rec = [f.get("recovery_s") for f in r.get("faults", [])]
        rec_s = ",".join("-" if x is None else f"{x:.2f}" for x in rec) or "-"
        cells = [r[k] for k in ("ops", "acked", "unknown", "lost", "duplicated", "stale_reads")]
        ops, acked, unknown, lost, dup, stale = ("-" if c is None else str(c) for c in cells)
        lines.append(
            f"{r['name']:14} {ops:>6} {acked:>6} {unknown:>7} {lost:>4} {dup:>4} {stale:>5} "
            f"{r['conserved']!s:>9} {rec_s:>10} {r.get('automatic_failovers', '-')!s:>7}  "
            f"{'ok' if r['ok'] else 'FAILED'}"
        )
        for f in r.get("faults", []):
            if f.get("first_ack_after_fault_s"):
                per = ", ".join(
                    f"{sh} {'-' if v is None else f'{v:.2f}s'}"
                    for sh, v in f["first_ack_after_fault_s"].items()
                )
                lines.append(f"    {f['fault']} {f['target']}: fault -> first ack: {per}")
        if r.get("error"):
            lines.append(f"    error: {r['error']}")
        for a in r.get("anomalies", [])[:5]:
            lines.append(f"    - {a}")
    lines.append("PASS" if report["ok"] else "FAIL")
    return "\n".join(lines)
