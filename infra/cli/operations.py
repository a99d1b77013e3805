"""``txr status``, ``reconcile``, ``failover``, ``switchover``, ``rejoin``, ``autofailover``,
``region evacuate|fail`` and ``rehome``: the operator's commands on a running cluster's shards
(the procedures are ``consistency.failover_plan`` and ``infra.failover``; each one that moves a
primary runs under the shard's lock, ``infra.controller.shard_lock``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, Final

import psycopg

from consistency import failover_plan, reconcile, slot_moves
from consistency.errors import ConsistencyError
from infra import controller, failover
from infra.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Subparsers, add_dir, err, step
from infra.local import cluster, postgres
from regionstore import admin


def _cmd_reconcile(args: argparse.Namespace) -> int:
    """G4 across every shard: ledgers balance, transit accounts net to the money in flight."""
    try:
        dsns = cluster.primary_admin_dsns(args.dir)
        snapshots = {shard: admin.reconcile_snapshot(dsn) for shard, dsn in sorted(dsns.items())}
    except (cluster.ClusterError, OSError, psycopg.Error) as exc:
        err(f"reconcile could not read every shard: {type(exc).__name__}: {exc}")
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


# What an operator command may run into besides a refusal: the cluster state, etcd, PostgreSQL.
_OP_ERRORS: Final = (
    ConsistencyError,
    cluster.ClusterError,
    postgres.PostgresError,
    psycopg.Error,
    OSError,
)


def _run_procedure(
    args: argparse.Namespace, name: str, fn: Callable[[], failover_plan.FailoverResult]
) -> int:
    """``txr failover|switchover|rejoin``: ``fn`` under the shard's lock, its outcome printed."""
    try:
        outcome = _locked(args, name, fn)()
    except failover_plan.FailoverRefused as exc:
        err(f"{name} refused: {exc}")
        return EXIT_FAILED
    except (*_OP_ERRORS, TimeoutError) as exc:
        err(f"{name} failed: {type(exc).__name__}: {exc}")
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
        lambda: failover_plan.failover(
            failover.LocalShardOps(args.dir),
            args.shard,
            args.to,
            accept_data_loss=args.accept_data_loss,
            progress=step,
        ),
    )


def _cmd_switchover(args: argparse.Namespace) -> int:
    return _run_procedure(
        args,
        "switchover",
        lambda: failover_plan.switchover(
            failover.LocalShardOps(args.dir), args.shard, args.to, progress=step
        ),
    )


def _cmd_rejoin(args: argparse.Namespace) -> int:
    return _run_procedure(
        args,
        "rejoin",
        lambda: failover_plan.rejoin(
            failover.LocalShardOps(args.dir), args.shard, args.node, progress=step
        ),
    )


def _cmd_autofailover(args: argparse.Namespace) -> int:
    try:
        mode = failover.set_autofailover(args.dir, args.state == "on", args.shard)
    except _OP_ERRORS as exc:
        err(f"autofailover failed: {type(exc).__name__}: {exc}")
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
        err(f"region {args.region_command} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    if args.region not in ops.regions:
        err(f"no region {args.region} (regions: {', '.join(ops.regions)})")
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
            err(f"{sh}: {row['error']}")
            continue
        row["to_region"] = targets[0]
        step(f"{sh}: {name} {rec.shard.primary.name} -> {targets[0]}")
        ns = argparse.Namespace(dir=args.dir, shard=sh, to=targets[0])

        def fn(sh: str = sh, to: str = targets[0]) -> failover_plan.FailoverResult:
            o = failover.LocalShardOps(args.dir)
            if name == "switchover":
                return failover_plan.switchover(o, sh, to, progress=step)
            return failover_plan.failover(o, sh, to, progress=step)

        try:
            out = _locked(ns, name, fn)()
        except failover_plan.FailoverRefused as exc:
            row["error"] = f"refused: {exc}"
        except _OP_ERRORS as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            row.update(out.to_json())
            row["ok"] = True
        step(f"{sh}: {'done' if row['ok'] else 'FAILED: ' + str(row.get('error'))}")
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
            args.dir, args.slot, args.to, progress=step, drain_timeout_s=args.drain_timeout
        )
    except slot_moves.RehomeRefused as exc:
        err(f"rehome refused: {exc}")
        return EXIT_FAILED
    except (*_OP_ERRORS, admin.SlotMoveError) as exc:
        err(f"rehome failed: {type(exc).__name__}: {exc}")
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
        err(f"status failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    st["events"] = events.events_status(args.dir)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print("\n".join([failover.format_status(st), *events.format_events(st["events"])]))
    return EXIT_OK


def register(sub: Subparsers) -> None:
    """``txr reconcile``, ``status``, ``failover``, ``switchover``, ``rejoin``, ``autofailover``,
    ``region``, ``rehome``."""
    p = sub.add_parser("reconcile", help="check G4 across every shard; exit 1 on a discrepancy")
    add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_reconcile)

    p = sub.add_parser("status", help="shards, primaries, epochs, replication, etcd health")
    add_dir(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_status)

    for name, handler, what in (
        ("failover", _cmd_failover, "promote a shard's standby after its primary was lost"),
        ("switchover", _cmd_switchover, "planned move of a shard's primary, zero writes lost"),
    ):
        p = sub.add_parser(name, help=what)
        add_dir(p)
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
    add_dir(p)
    p.add_argument("shard")
    p.add_argument("--node", required=True, metavar="REGION", help="the former primary's region")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_rejoin)

    p = sub.add_parser("autofailover", help="switch the failover controllers on or off")
    add_dir(p)
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
        add_dir(p)
        p.add_argument("region", metavar="REGION")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=_cmd_region)

    p = sub.add_parser("rehome", help="move a slot to another shard")
    add_dir(p)
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
