"""``txr token``, ``txr keys`` and ``txr limits``: who may call a cluster, with which keys, and how
much (tokens and signing keys of ``infra.keys``, saga keys of ``regionstore.saga_keys``, tenant
limits of ``consistency.tenant_limits``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from typing import Final

import psycopg

from consistency import tenant_limits
from consistency.errors import ConsistencyError
from consistency.etcd import EtcdClient
from infra.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_dir,
    err,
    positive,
    step,
)
from infra.keys import KeyRingError
from infra.local import cluster
from regionstore import saga_keys
from router.auth import ADMIN_TOKEN_TTL_S_MAX, SCOPES, TENANT_RE, TOKEN_TTL_S_MAX

DEFAULT_TOKEN_TTL_S: Final = 3600


def _scopes(text: str) -> list[str]:
    scopes = [x.strip() for x in text.split(",") if x.strip()]
    unknown = set(scopes) - SCOPES
    if unknown or not scopes:
        raise argparse.ArgumentTypeError(f"scopes are a comma list of: {', '.join(sorted(SCOPES))}")
    return scopes


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
                err(f"an admin token lives at most {ADMIN_TOKEN_TTL_S_MAX} s")
                return EXIT_USAGE
            print(cluster.admin_token(args.dir, args.tenant or "operator", args.ttl))
            return EXIT_OK
        if not args.tenant or not args.scopes:
            err("--tenant and --scopes are required (or --admin for an operator token)")
            return EXIT_USAGE
        if "admin" in args.scopes:
            err("scope admin is an operator token of its own audience: use --admin")
            return EXIT_USAGE
        print(cluster.token(args.dir, args.tenant, args.scopes, args.ttl))
    except (cluster.ClusterError, ValueError) as exc:
        err(str(exc))
        return EXIT_FAILED
    return EXIT_OK


def _cmd_saga_keys(args: argparse.Namespace) -> int:
    """The saga HMAC keys on every shard's primary (regionstore.saga_keys)."""
    try:
        dsns = cluster.primary_admin_dsns(args.dir)
        if args.keys_command == "rotate-saga":
            done = saga_keys.rotate(dsns)
            step(
                f"saga key {done['key_id']} signs on every shard; kept {done['kept']}, "
                f"retired {done['retired'] or 'none'}"
            )
        elif args.keys_command == "retire-saga":
            step(f"retired: {saga_keys.retire(dsns) or 'none'}")
        keys = {shard: saga_keys.list_keys(dsn) for shard, dsn in sorted(dsns.items())}
    except (cluster.ClusterError, saga_keys.RotationError, psycopg.Error) as exc:
        err(str(exc))
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
            step(f"new signing key {kid}; the previous key verifies until its retire time")
        elif args.keys_command == "retire":
            removed = ring.retire(args.kid)
            step(f"retired: {', '.join(removed) if removed else 'none due'}")
        _print_keys(args)
    except KeyRingError as exc:
        err(str(exc))
        return EXIT_FAILED
    return EXIT_OK


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
        err("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
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
        err(str(exc))
        return EXIT_USAGE
    except (ConsistencyError, cluster.ClusterError, OSError) as exc:
        err(f"limits: {exc}")
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


def register(sub: Subparsers) -> None:
    """``txr token``, ``txr keys``, ``txr limits``."""
    p = sub.add_parser("token", help="print a JWT for a local cluster")
    add_dir(p)
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
    for name, what, handler in (
        ("list", "the keys, which one signs, when the others retire", _cmd_keys),
        (
            "rotate",
            "publish a new key, then sign with it; the old one verifies until retired",
            _cmd_keys,
        ),
        ("retire", "remove keys past their retire time (or --kid K now)", _cmd_keys),
        (
            "list-saga",
            "the saga (leg 2) HMAC keys of every shard and the messages naming them",
            _cmd_saga_keys,
        ),
        (
            "rotate-saga",
            "stage a new saga key everywhere, then sign with it; one old key stays",
            _cmd_saga_keys,
        ),
        (
            "retire-saga",
            "remove saga keys that nothing signs with and no pending message names",
            _cmd_saga_keys,
        ),
    ):
        p = keys_sub.add_parser(name, help=what)
        add_dir(p)
        p.add_argument("--json", action="store_true")
        if name == "retire":
            p.add_argument("--kid", default=None, help="retire this key now (a leaked key)")
        elif handler is _cmd_keys:
            p.set_defaults(kid=None)
        p.set_defaults(handler=handler)

    limits = sub.add_parser("limits", help="per-tenant rate limits and account caps (etcd)")
    limits_sub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    for name, what in (
        ("set", "set a tenant's rate (transfers and account opens per second), burst, cap"),
        ("show", "every tenant's limits"),
        ("clear", "remove a tenant's limits (back to no rate limit and the default cap)"),
    ):
        p = limits_sub.add_parser(name, help=what)
        add_dir(p)
        p.add_argument("--etcd", default=None, metavar="URL[,URL...]", help="etcd endpoints")
        p.add_argument("--json", action="store_true")
        if name in ("set", "clear"):
            p.add_argument("--tenant", required=True)
        if name == "set":
            p.add_argument("--rate", type=positive, required=True, help="per second")
            p.add_argument("--burst", type=positive, default=None, help="default: the rate")
            p.add_argument(
                "--accounts-max",
                type=positive,
                default=None,
                help=f"default {tenant_limits.TENANT_ACCOUNTS_MAX_DEFAULT}",
            )
        p.set_defaults(handler=_cmd_limits)
