"""``txr``: the operator's command line (API.md, "CLI").

Exit codes: 0 success, 1 the operation ran and failed (reason on stderr), 2 usage error
(argparse's own code). Subcommands register themselves in ``build_parser``; each handler takes
the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import psycopg

from consistency import failover_plan, reconcile, slot_moves, tenant_limits
from consistency.errors import ConsistencyError
from consistency.etcd import EtcdClient
from infra import controller, failover
from infra.keys import KeyRingError
from infra.local import cluster, postgres, procs
from infra.local.ports import plan_ports
from regionstore import admin, saga_keys
from router.auth import ADMIN_TOKEN_TTL_S_MAX, SCOPES, TENANT_RE, TOKEN_TTL_S_MAX

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
DEFAULT_TOKEN_TTL_S: Final = 3600

Handler = Callable[[argparse.Namespace], int]


class _Stop(Exception):
    """SIGTERM or SIGINT reached the foreground launcher."""


def _err(msg: str) -> None:
    print(f"txr: {msg}", file=sys.stderr)


def _progress(msg: str) -> None:
    print(f"[txr local] {msg}", file=sys.stderr, flush=True)


def _regions(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError("at least one region")
    return names


def _scopes(text: str) -> list[str]:
    scopes = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(scopes) - SCOPES
    if unknown or not scopes:
        raise argparse.ArgumentTypeError(f"scopes are a comma list of: {', '.join(sorted(SCOPES))}")
    return scopes


# -- txr local ----------------------------------------------------------------------------


def _print_endpoints(state: dict[str, Any], cluster_dir: Path) -> None:
    desc = cluster.status(cluster_dir)
    print(
        f"txr local cluster up in {state.get('start_seconds')} s "
        f"(started {state.get('started_at')}, WAN {state.get('wan')})"
    )
    for region, r in desc["regions"].items():
        print(f"  {region:10s} router {r['router']}  redis {r['redis']}  etcd {r['etcd']}")
    print(f"  WAN control {desc['wan']['control']}")
    print(f"  logs        {cluster_dir.resolve() / 'logs'}")
    if state.get("routers_started"):
        tok = cluster.dev_token(cluster_dir)
        first = next(iter(desc["regions"].values()))["router"]
        print(f"\ndev token (tenant dev, every tenant scope, no admin, 24 h):\n{tok}\n")
        print(f"an operator (admin) token: .venv/bin/txr token --admin --dir {cluster_dir}")
        print("try:")
        print(
            f"  curl -s -X POST {first}/v1/accounts -H 'Authorization: Bearer {tok}' "
            "-H 'Content-Type: application/json' -d '{\"currency\": \"EUR\"}'"
        )


def _cmd_local_up(args: argparse.Namespace) -> int:
    opts = cluster.UpOptions(
        dir=args.dir,
        base_port=args.base_port,
        regions=args.regions,
        wan=args.wan,
        workers=args.workers,
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise _Stop(signal.Signals(signum).name)

    # SIGTERM during start-up behaves like Ctrl-C: stop what was started, then exit.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = cluster.up(opts, progress=_progress)
    except cluster.ClusterError as exc:
        _err(f"local up failed: {exc}")
        return EXIT_FAILED
    except _Stop as exc:
        _err(f"interrupted by {exc} during start-up; stopped what was started")
        return EXIT_FAILED
    _print_endpoints(state, args.dir)
    if args.detach:
        return EXIT_OK
    print("running in the foreground; Ctrl-C stops the cluster", flush=True)
    reported: set[int] = set()
    try:
        while True:
            time.sleep(cluster.MONITOR_INTERVAL_S)
            for name, pid in _dead_children(args.dir):
                if pid not in reported:
                    reported.add(pid)
                    _err(f"{name} (pid {pid}) exited; see {args.dir.resolve() / 'logs'}")
    except _Stop as exc:
        _progress(f"{exc}: stopping the cluster")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        cluster.down(args.dir, progress=_progress)
    except cluster.ClusterError as exc:
        _err(f"local down failed: {exc}")
        return EXIT_FAILED
    return EXIT_OK


def _dead_children(cluster_dir: Path) -> list[tuple[str, int]]:
    state = cluster.load_state(cluster_dir)
    dead = [(p.name, p.pid) for p in state.procs if not procs.is_alive(p.pid, p.marker)]
    dead += [
        (f"postgres {e.node}", e.pid)
        for e in state.pg_nodes
        if e.pid is not None and not procs.is_alive(e.pid, str(e.datadir))
    ]
    return dead


def _cmd_local_status(args: argparse.Namespace) -> int:
    try:
        desc = cluster.status(args.dir)
    except cluster.ClusterError as exc:
        _err(str(exc))
        return EXIT_FAILED
    if args.json:
        print(json.dumps(desc, indent=2))
        return EXIT_OK
    print(
        f"cluster {desc['dir']}: {desc['status']} (started {desc['started_at']}, "
        f"WAN {desc['wan']['profile']}, topology from {desc['topology_source']})"
    )
    for region, r in desc["regions"].items():
        print(f"\n{region}")
        print(f"  router {r['router']:28s} pid {r['router_pid']}")
        print(f"  relays {'':28s} pid {r.get('relays_pid')}")
        print(f"  failover controller {'':15s} pid {r.get('controller_pid')}")
        print(f"  redis  {r['redis']:28s} pid {r['redis_pid']}")
        print(f"  etcd   {r['etcd']:28s} pid {r['etcd_pid']}")
        for n in r["nodes"]:
            print(f"  pg     {n['shard']:12s} {n['role']:8s} {n['dsn']}  pid {n['pid']}")
    print("\nshard        home       primary    epoch")
    for name, s in desc["shards"].items():
        print(f"{name:12s} {s['home_region']:10s} {s['primary_region']:10s} {s['epoch']}")
    return EXIT_OK


def _cmd_local_down(args: argparse.Namespace) -> int:
    try:
        found = cluster.down(args.dir, progress=_progress)
    except cluster.ClusterError as exc:
        _err(f"local down failed: {exc}")
        return EXIT_FAILED
    if not found:
        _progress(f"no cluster state in {args.dir.resolve()}; nothing to stop")
    return EXIT_OK


def _ttl(text: str) -> int:
    try:
        ttl = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("seconds, an integer") from None
    if not 0 < ttl <= TOKEN_TTL_S_MAX:
        # Routers refuse longer tokens (router.auth); refusing here says so at once.
        raise argparse.ArgumentTypeError(f"within 1..{TOKEN_TTL_S_MAX} seconds")
    return ttl


def _cmd_token(args: argparse.Namespace) -> int:
    try:
        if args.admin:
            if args.ttl > ADMIN_TOKEN_TTL_S_MAX:
                _err(f"an admin token lives at most {ADMIN_TOKEN_TTL_S_MAX} s")
                return EXIT_USAGE
            print(cluster.admin_token(args.dir, args.tenant or "operator", args.ttl))
            return EXIT_OK
        if not args.tenant or not args.scopes:
            _err("--tenant and --scopes are required (or --admin for an operator token)")
            return EXIT_USAGE
        if "admin" in args.scopes:
            _err("scope admin is an operator token of its own audience: use --admin")
            return EXIT_USAGE
        print(cluster.token(args.dir, args.tenant, args.scopes, args.ttl))
    except (cluster.ClusterError, ValueError) as exc:
        _err(str(exc))
        return EXIT_FAILED
    return EXIT_OK


# -- txr keys -----------------------------------------------------------------------------


def _cmd_saga_keys(args: argparse.Namespace) -> int:
    """The saga HMAC keys on every shard's primary (regionstore.saga_keys)."""
    dsns = cluster.primary_admin_dsns(args.dir)
    try:
        if args.keys_command == "rotate-saga":
            done = saga_keys.rotate(dsns)
            _step(
                f"saga key {done['key_id']} signs on every shard; kept {done['kept']}, "
                f"retired {done['retired'] or 'none'}"
            )
        elif args.keys_command == "retire-saga":
            _step(f"retired: {saga_keys.retire(dsns) or 'none'}")
        keys = {shard: saga_keys.list_keys(dsn) for shard, dsn in sorted(dsns.items())}
    except (saga_keys.RotationError, psycopg.Error) as exc:
        _err(str(exc))
        return EXIT_FAILED
    if args.json:
        print(json.dumps({s: [dataclasses.asdict(k) for k in ks] for s, ks in keys.items()}))
        return EXIT_OK
    for shard, ks in keys.items():
        for k in ks:
            state = "signing" if k.signing else "verify only"
            print(f"{shard}  key {k.key_id}  {state}  pending messages {k.pending}")
    return EXIT_OK


def _print_keys(args: argparse.Namespace) -> None:
    infos = cluster.key_ring(args.dir).list_keys()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "kid": k.kid,
                        "signing": k.signing,
                        "created_at": k.created_at,
                        "retire_after": k.retire_after,
                    }
                    for k in infos
                ],
                indent=2,
            )
        )
        return
    for k in infos:
        state = "signing" if k.signing else f"verify only, retire after {_when(k.retire_after)}"
        print(f"{k.kid}  created {_when(k.created_at)}  {state}")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _cmd_keys(args: argparse.Namespace) -> int:
    ring = cluster.key_ring(args.dir)
    try:
        if args.keys_command == "rotate":
            kid = ring.rotate()
            _step(f"new signing key {kid}; the previous key verifies until its retire time")
        elif args.keys_command == "retire":
            removed = ring.retire(args.kid)
            _step(f"retired: {', '.join(removed) if removed else 'none due'}")
        _print_keys(args)
    except KeyRingError as exc:
        _err(str(exc))
        return EXIT_FAILED
    return EXIT_OK


# -- txr limits ---------------------------------------------------------------------------


def _limits_etcd(args: argparse.Namespace) -> list[str]:
    if args.etcd:
        return [u.strip() for u in args.etcd.split(",") if u.strip()]
    return [r["etcd"] for r in cluster.status(args.dir)["regions"].values()]


def _cmd_limits(args: argparse.Namespace) -> int:
    async def run() -> dict[str, tenant_limits.TenantLimits]:
        async with EtcdClient(_limits_etcd(args)) as client:
            if args.limits_command == "set":
                await tenant_limits.set_limits(client, args.tenant, args.limits)
            elif args.limits_command == "clear":
                await tenant_limits.clear_limits(client, args.tenant)
            return await tenant_limits.load_limits(client)

    if args.limits_command in ("set", "clear") and not TENANT_RE.fullmatch(args.tenant):
        _err("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
        return EXIT_USAGE
    try:
        if args.limits_command == "set":
            args.limits = tenant_limits.TenantLimits(
                rate_per_s=args.rate,
                burst=args.burst,
                accounts_max=(
                    args.accounts_max
                    if args.accounts_max is not None
                    else tenant_limits.TENANT_ACCOUNTS_MAX_DEFAULT
                ),
            )
        every = asyncio.run(run())
    except tenant_limits.LimitsError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (ConsistencyError, cluster.ClusterError, OSError) as exc:
        _err(f"limits: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps({t: lim.to_json() for t, lim in sorted(every.items())}, indent=2))
        return EXIT_OK
    default = tenant_limits.TENANT_ACCOUNTS_MAX_DEFAULT
    print(f"{'tenant':24} {'rate/s':>8} {'burst':>8} {'accounts max':>13}")
    for tenant, lim in sorted(every.items()):
        rate = "-" if lim.rate_per_s is None else str(lim.rate_per_s)
        print(f"{tenant:24} {rate:>8} {lim.effective_burst or '-':>8} {lim.accounts_max:>13}")
    print(f"(tenants not listed: no rate limit, at most {default} accounts)")
    return EXIT_OK


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a positive integer")
    return value


# -- txr reconcile ------------------------------------------------------------------------


def _cmd_reconcile(args: argparse.Namespace) -> int:
    """G4 across every shard: ledgers balance, transit accounts net to the money in flight."""
    try:
        dsns = cluster.primary_admin_dsns(args.dir)
        snapshots = {shard: admin.reconcile_snapshot(dsn) for shard, dsn in sorted(dsns.items())}
    except (cluster.ClusterError, OSError, psycopg.Error) as exc:
        _err(f"reconcile could not read every shard: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    problems = reconcile.reconcile(snapshots)
    summary = reconcile.summarize(snapshots)
    if args.json:
        print(
            json.dumps(
                {"ok": not problems, "discrepancies": problems, "shards": summary},
                indent=2,
                default=str,
            )
        )
    else:
        print(f"{'shard':12} {'accounts':>8} {'pending':>8} {'in flight':>14} {'inbox':>6}  sums")
        for shard, s in summary.items():
            sums = ", ".join(f"{cur} {total}" for cur, total in sorted(s["sums"].items())) or "-"
            print(
                f"{shard:12} {s['accounts']:8d} {s['pending']:8d} {s['in_flight']:14d} "
                f"{s['inbox']:6d}  {sums}"
            )
        if problems:
            print(f"\n{len(problems)} discrepancies:")
            for p in problems:
                print(f"  - {p}")
        else:
            print("\nclean: every ledger balances and transit accounts net to the money in flight")
    return EXIT_FAILED if problems else EXIT_OK


# -- txr failover / switchover / rejoin / status ----------------------------------------------

# What an operator command may run into besides a refusal: the cluster state, etcd, PostgreSQL.
_OP_ERRORS: Final = (
    ConsistencyError,
    cluster.ClusterError,
    postgres.PostgresError,
    psycopg.Error,
    OSError,
)


def _step(msg: str) -> None:
    print(f"[txr] {msg}", file=sys.stderr, flush=True)


def _run_procedure(args: argparse.Namespace, name: str, fn: Callable[[], Any]) -> int:
    try:
        outcome = fn()
    except failover_plan.FailoverRefused as exc:
        _err(f"{name} refused: {exc}")
        return EXIT_FAILED
    except (*_OP_ERRORS, TimeoutError) as exc:
        _err(f"{name} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if isinstance(outcome, _Already):
        print(json.dumps(outcome.to_json(), indent=2) if args.json else outcome.message())
        return EXIT_OK
    if args.json:
        print(json.dumps(outcome.to_json(), indent=2))
    else:
        print(
            f"{name} of {outcome.shard} done in {outcome.steps[-1][1]:.2f} s: primary "
            f"{outcome.new_primary}, epoch {outcome.epoch}, region survival "
            f"{'yes' if outcome.region_survival else 'NO'}"
        )
        for note in outcome.notes:
            print(f"  note: {note}")
    return EXIT_OK


def _locked(
    args: argparse.Namespace, name: str, fn: Callable[[], failover_plan.FailoverResult]
) -> Callable[[], failover_plan.FailoverResult | _Already]:
    """``fn`` under the shard's lock (the one the failover controllers take), after checking
    whether there is anything left to do once the lock is held."""

    def run() -> failover_plan.FailoverResult | _Already:
        with controller.shard_lock(args.dir, args.shard, f"txr {name}"):
            if name in ("failover", "switchover"):
                rec, _rev = failover.LocalShardOps(args.dir).load(args.shard)
                if rec.shard.primary.region == args.to:
                    return _Already(args.shard, rec.shard.primary.name, rec.shard.epoch, args.to)
            return fn()

    return run


class _Already:
    """The shard's primary already is where the command would put it (say, a controller
    failed it over there first): nothing to do, and that is a success."""

    def __init__(self, shard: str, primary: str, epoch: int, region: str) -> None:
        self.shard, self.primary, self.epoch, self.region = shard, primary, epoch, region

    def message(self) -> str:
        return (
            f"{self.shard}: primary {self.primary} is already in {self.region} (epoch "
            f"{self.epoch}); nothing to do"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "already": True,
            "new_primary": self.primary,
            "epoch": self.epoch,
            "message": self.message(),
        }


def _cmd_failover(args: argparse.Namespace) -> int:
    return _run_procedure(
        args,
        "failover",
        _locked(
            args,
            "failover",
            lambda: failover_plan.failover(
                failover.LocalShardOps(args.dir),
                args.shard,
                args.to,
                accept_data_loss=args.accept_data_loss,
                progress=_step,
            ),
        ),
    )


def _cmd_switchover(args: argparse.Namespace) -> int:
    return _run_procedure(
        args,
        "switchover",
        _locked(
            args,
            "switchover",
            lambda: failover_plan.switchover(
                failover.LocalShardOps(args.dir), args.shard, args.to, progress=_step
            ),
        ),
    )


def _cmd_rejoin(args: argparse.Namespace) -> int:
    return _run_procedure(
        args,
        "rejoin",
        _locked(
            args,
            "rejoin",
            lambda: failover_plan.rejoin(
                failover.LocalShardOps(args.dir), args.shard, args.node, progress=_step
            ),
        ),
    )


def _cmd_autofailover(args: argparse.Namespace) -> int:
    try:
        mode = failover.set_autofailover(args.dir, args.state == "on", args.shard)
    except _OP_ERRORS as exc:
        _err(f"autofailover failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(mode.to_json(), indent=2))
    else:
        what = f"shard {args.shard}" if args.shard else "every shard"
        print(f"automatic failover {args.state} for {what}")
    return EXIT_OK


def _cmd_region(args: argparse.Namespace) -> int:
    """``txr region evacuate|fail R``: switch over (or fail over) every shard whose primary
    is in R to its first standby outside R, one shard at a time, each under its lock."""
    name = "switchover" if args.region_command == "evacuate" else "failover"
    try:
        ops = failover.LocalShardOps(args.dir)
        shards = ops.state.shards
        records = {sh: ops.load(sh)[0] for sh in shards}
    except _OP_ERRORS as exc:
        _err(f"region {args.region_command} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if args.region not in ops.regions:
        _err(f"no region {args.region} (regions: {', '.join(ops.regions)})")
        return EXIT_USAGE
    results: list[dict[str, Any]] = []
    for sh, rec in records.items():
        if rec.shard.primary.region != args.region:
            continue
        targets = [n.region for n in rec.shard.standbys if n.region != args.region]
        row: dict[str, Any] = {"shard": sh, "from": rec.shard.primary.name, "ok": False}
        results.append(row)
        if not targets:
            row["error"] = f"no standby outside {args.region}"
            _err(f"{sh}: {row['error']}")
            continue
        row["to_region"] = targets[0]
        _step(f"{sh}: {name} {rec.shard.primary.name} -> {targets[0]}")
        ns = argparse.Namespace(dir=args.dir, shard=sh, to=targets[0])

        def fn(sh: str = sh, to: str = targets[0]) -> failover_plan.FailoverResult:
            o = failover.LocalShardOps(args.dir)
            if name == "switchover":
                return failover_plan.switchover(o, sh, to, progress=_step)
            return failover_plan.failover(o, sh, to, progress=_step)

        try:
            out = _locked(ns, name, fn)()
        except failover_plan.FailoverRefused as exc:
            row["error"] = f"refused: {exc}"
        except _OP_ERRORS as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update(out.to_json())
            row["ok"] = True
        _step(f"{sh}: {'done' if row['ok'] else 'FAILED: ' + str(row.get('error'))}")
    ok = all(r["ok"] for r in results)
    if args.json:
        print(
            json.dumps(
                {"region": args.region, "action": name, "ok": ok, "shards": results}, indent=2
            )
        )
    else:
        if not results:
            print(f"no shard has its primary in {args.region}: nothing to do")
        for r in results:
            state = (
                f"primary {r.get('new_primary')} epoch {r.get('epoch')}" if r["ok"] else r["error"]
            )
            print(f"{r['shard']:12s} {name:10s} {'ok' if r['ok'] else 'FAILED'}  {state}")
    return EXIT_OK if ok else EXIT_FAILED


# The slot is refused while a rehome waits: an operator may shorten the wait, not make it
# unbounded.
REHOME_DRAIN_TIMEOUT_S_MAX: Final = 600.0


def _drain_timeout(text: str) -> float:
    value = float(text)
    if not 0 < value <= REHOME_DRAIN_TIMEOUT_S_MAX:
        raise argparse.ArgumentTypeError(f"between 0 and {REHOME_DRAIN_TIMEOUT_S_MAX:.0f}")
    return value


def _cmd_rehome(args: argparse.Namespace) -> int:
    try:
        result = failover.rehome(
            args.dir, args.slot, args.to, progress=_step, drain_timeout_s=args.drain_timeout
        )
    except slot_moves.RehomeRefused as exc:
        _err(f"rehome refused: {exc}")
        return EXIT_FAILED
    except (*_OP_ERRORS, admin.SlotMoveError) as exc:
        _err(f"rehome failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(
            f"slot {result['slot']} {'move finished' if result['resumed'] else 'moved'} "
            f"{result['from']} -> {result['to']} (slot epoch {result['epoch']}, move "
            f"{result['move_id']}): copied {result['copied']}, deleted {result['deleted']}"
        )
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from infra import events

    try:
        st = failover.cluster_status(args.dir)
    except _OP_ERRORS as exc:
        _err(f"status failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    st["events"] = events.events_status(args.dir)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print("\n".join([failover.format_status(st), *events.format_events(st["events"])]))
    return EXIT_OK


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from infra import events

    if args.tenant is not None and not TENANT_RE.fullmatch(args.tenant):
        _err("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
        return EXIT_USAGE
    try:
        desc = cluster.status(args.dir)
        url = next(
            (r["nats"] for r in desc["regions"].values() if r.get("nats") and r.get("nats_pid")),
            None,
        )
        if url is None:
            _err(f"no NATS server of the cluster in {args.dir} is running")
            return EXIT_FAILED

        def emit(line: str) -> None:
            print(line, flush=True)

        asyncio.run(
            events.tail(
                url, tenant=args.tenant, from_start=args.from_start, count=args.count, emit=emit
            )
        )
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - any failure is exit 1 with its reason
        _err(f"events tail: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    return EXIT_OK


# -- txr bench ----------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark suite (bench.suite) on a private cluster it starts and purges itself."""
    # Imported here: the suite pulls in matplotlib and HdrHistogram, which no other command needs.
    from bench import idle, report, suite

    base_port = suite.BASE_PORT if args.base_port is None else args.base_port
    if args.idle:
        try:
            got = idle.run(base_port=base_port, windows=args.windows, progress=_progress)
        except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
            _err(f"bench failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        print(json.dumps(got, indent=2) if args.json else idle.summary(got))
        return EXIT_OK
    try:
        rep = suite.run(args.out, quick=args.quick, base_port=base_port, workers=args.workers)
    except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
        _err(f"bench failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    print(json.dumps(rep, indent=2) if args.json else report.summary(rep))
    return EXIT_OK


# -- txr chaos ----------------------------------------------------------------------------


def _scenario_list(text: str) -> list[str]:
    from chaos.nemesis import SCENARIOS

    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"scenarios are 'all' or a comma list of: {', '.join(SCENARIOS)}"
        )
    return names


def _duration(text: str) -> float:
    from chaos.runner import DURATION_MAX_S, DURATION_MIN_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not DURATION_MIN_S <= value <= DURATION_MAX_S:
        raise argparse.ArgumentTypeError(
            f"duration must be {DURATION_MIN_S:g} to {DURATION_MAX_S:g} seconds"
        )
    return value


def _cmd_chaos_run(args: argparse.Namespace) -> int:
    """Every scenario on its own fresh cluster (chaos.runner); exit 1 if any fails."""
    from chaos import runner

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM like Ctrl-C: the runner stops the scenario's cluster before exiting.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rep = runner.run(
            args.scenario,
            duration_s=args.duration,
            seed=seed,
            base_port=args.base_port,
            wan=args.wan,
            out_dir=args.out,
        )
    except KeyboardInterrupt:
        _err("chaos run interrupted")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a crashed run is exit 1 with its reason
        _err(f"chaos run failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(rep, indent=2) if args.json else runner.summary(rep))
    if not rep["ok"]:
        _err(f"chaos run failed (seed {seed}); report and histories in {args.out}")
    return EXIT_OK if rep["ok"] else EXIT_FAILED


# -- parser -------------------------------------------------------------------------------


def _add_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir",
        type=Path,
        default=cluster.DEFAULT_DIR,
        help="cluster directory (default: .txr/local)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txr", description="txrouter operations")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    local = sub.add_parser("local", help="a cluster on this machine")
    local_sub = local.add_subparsers(dest="local_command", required=True, metavar="ACTION")

    p = local_sub.add_parser("up", help="start a local cluster")
    _add_dir(p)
    p.add_argument("--base-port", type=int, default=cluster.DEFAULT_BASE_PORT)
    p.add_argument("--regions", type=_regions, default=cluster.DEFAULT_REGIONS)
    p.add_argument("--wan", choices=("none", "realistic"), default="none")
    p.add_argument("--detach", action="store_true", help="return once every router is ready")
    p.add_argument(
        "--workers", type=int, default=None, help="router processes per region (SO_REUSEPORT)"
    )
    p.set_defaults(handler=_cmd_local_up)

    p = local_sub.add_parser("status", help="describe a local cluster")
    _add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_local_status)

    p = local_sub.add_parser("down", help="stop every process of a local cluster")
    _add_dir(p)
    p.set_defaults(handler=_cmd_local_down)

    p = sub.add_parser("token", help="print a JWT for a local cluster")
    _add_dir(p)
    p.add_argument("--tenant", help="the tenant (with --admin: the operator's name)")
    p.add_argument("--scopes", type=_scopes)
    p.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TOKEN_TTL_S,
        help=f"seconds (at most {TOKEN_TTL_S_MAX}; {ADMIN_TOKEN_TTL_S_MAX} with --admin)",
    )
    p.add_argument(
        "--admin", action="store_true", help="an operator token (scope admin, admin audience)"
    )
    p.set_defaults(handler=_cmd_token)

    keys = sub.add_parser("keys", help="the JWT signing keys and saga keys of a local cluster")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for name, what in (
        ("list", "the keys, which one signs, when the others retire"),
        ("rotate", "publish a new key, then sign with it; the old one verifies until retired"),
        ("retire", "remove keys past their retire time (or --kid K now)"),
    ):
        p = keys_sub.add_parser(name, help=what)
        _add_dir(p)
        p.add_argument("--json", action="store_true")
        if name == "retire":
            p.add_argument("--kid", default=None, help="retire this key now (a leaked key)")
        else:
            p.set_defaults(kid=None)
        p.set_defaults(handler=_cmd_keys)

    for name, what in (
        ("list-saga", "the saga (leg 2) HMAC keys of every shard and the messages naming them"),
        ("rotate-saga", "stage a new saga key everywhere, then sign with it; one old key stays"),
        ("retire-saga", "remove saga keys that nothing signs with and no pending message names"),
    ):
        p = keys_sub.add_parser(name, help=what)
        _add_dir(p)
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_cmd_saga_keys)

    limits = sub.add_parser("limits", help="per-tenant rate limits and account caps (etcd)")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    for name, what in (
        ("set", "set a tenant's rate (transfers and account opens per second), burst, cap"),
        ("show", "every tenant's limits"),
        ("clear", "remove a tenant's limits (back to no rate limit and the default cap)"),
    ):
        p = limits_sub.add_parser(name, help=what)
        _add_dir(p)
        p.add_argument("--etcd", default=None, metavar="URL[,URL...]", help="etcd endpoints")
        p.add_argument("--json", action="store_true")
        if name in ("set", "clear"):
            p.add_argument("--tenant", required=True)
        if name == "set":
            p.add_argument("--rate", type=_positive, required=True, help="per second")
            p.add_argument("--burst", type=_positive, default=None, help="default: the rate")
            p.add_argument(
                "--accounts-max",
                type=_positive,
                default=None,
                help=f"default {tenant_limits.TENANT_ACCOUNTS_MAX_DEFAULT}",
            )
        p.set_defaults(handler=_cmd_limits)

    ev = sub.add_parser("events", help="the ledger event stream (NATS JetStream)")
    ev_sub = ev.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    p = ev_sub.add_parser("tail", help="print events as they are published (JSON lines)")
    _add_dir(p)
    p.add_argument("--tenant", default=None, help="only this tenant's events")
    p.add_argument("--from-start", action="store_true", help="from the oldest stored event")
    p.add_argument("--count", type=_positive, default=None, help="exit after N events")
    p.set_defaults(handler=_cmd_events_tail)

    p = sub.add_parser("reconcile", help="check G4 across every shard; exit 1 on a discrepancy")
    _add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_reconcile)

    p = sub.add_parser("status", help="shards, primaries, epochs, replication, etcd health")
    _add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_status)

    for name, handler, what in (
        ("failover", _cmd_failover, "promote a shard's standby after its primary was lost"),
        ("switchover", _cmd_switchover, "planned move of a shard's primary, zero writes lost"),
    ):
        p = sub.add_parser(name, help=what)
        _add_dir(p)
        p.add_argument("shard")
        p.add_argument("--to", required=True, metavar="REGION", help="the standby's region")
        p.add_argument("--json", action="store_true")
        if name == "failover":
            p.add_argument(
                "--accept-data-loss",
                action="store_true",
                help="promote even when the target cannot be shown to hold every acked commit",
            )
        p.set_defaults(handler=handler)

    p = sub.add_parser("rejoin", help="rewind a former primary into a standby of the new one")
    _add_dir(p)
    p.add_argument("shard")
    p.add_argument("--node", required=True, metavar="REGION", help="the former primary's region")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_rejoin)

    p = sub.add_parser("autofailover", help="switch the failover controllers on or off")
    _add_dir(p)
    p.add_argument("state", choices=("on", "off"))
    p.add_argument("--shard", default=None, help="only this shard (default: every shard)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_autofailover)

    region = sub.add_parser("region", help="act on every shard whose primary is in a region")
    region_sub = region.add_subparsers(dest="region_command", required=True, metavar="ACTION")
    for action, what in (
        ("evacuate", "switch over every primary of REGION (planned, zero loss)"),
        ("fail", "fail over every primary of REGION (REGION is lost)"),
    ):
        p = region_sub.add_parser(action, help=what)
        _add_dir(p)
        p.add_argument("region", metavar="REGION")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_cmd_region)

    p = sub.add_parser("rehome", help="move a slot to another shard")
    _add_dir(p)
    p.add_argument("--slot", type=int, required=True)
    p.add_argument("--to", required=True, metavar="SHARD")
    p.add_argument(
        "--drain-timeout",
        type=_drain_timeout,
        default=slot_moves.REHOME_DRAIN_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the slot's outbound transfers in flight before rolling back",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_rehome)

    chaos = sub.add_parser("chaos", help="fault-injection scenarios with a history checker")
    chaos_sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")
    p = chaos_sub.add_parser("run", help="run scenarios, each on a fresh local cluster")
    p.add_argument(
        "--scenario",
        type=_scenario_list,
        default="all",
        help="'all' or a comma list of scenario names",
    )
    p.add_argument("--duration", type=_duration, default=60.0, help="seconds per scenario")
    p.add_argument("--seed", type=int, default=None, help="reproduces a run (default: random)")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--base-port", type=int, default=6800, help="first of each cluster's ports")
    p.add_argument("--wan", choices=("none", "realistic"), default="none")
    p.add_argument(
        "--out", type=Path, default=Path("chaos-out"), help="report and histories directory"
    )
    p.set_defaults(handler=_cmd_chaos_run, regions=cluster.DEFAULT_REGIONS)

    p = sub.add_parser("bench", help="benchmark one region's router against the pgbench ceiling")
    p.add_argument("--quick", action="store_true", help="every part very briefly (CI)")
    p.add_argument(
        "--idle",
        action="store_true",
        help="only the idle figure: cores of an idle cluster, per component (issue 12)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=3,
        help="with --idle: one-minute windows to measure (min/median/max)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    p.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="first of the cluster's 100 ports (default 7000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="router processes per region",
    )
    p.set_defaults(handler=_cmd_bench, regions=cluster.DEFAULT_REGIONS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if getattr(args, "base_port", None) is not None:
        try:
            plan_ports(args.base_port, args.regions)
        except ValueError as exc:
            parser.error(str(exc))
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
