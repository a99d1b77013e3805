"""``txr events tail``: the ledger event stream of a local cluster (``infra.events``, imported
when the command runs: it pulls in the NATS client)."""

from __future__ import annotations

import argparse
import asyncio

from infra.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    Subparsers,
    add_dir,
    err,
    positive,
)
from infra.local import cluster
from router.auth import TENANT_RE


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from infra import events

    if args.tenant is not None and not TENANT_RE.fullmatch(args.tenant):
        err("tenant must be 1-64 of A-Z a-z 0-9 _ . - and start alphanumeric")
        return EXIT_USAGE
    try:
        desc = cluster.status(args.dir)
        url = next(
            (r["nats"] for r in desc["regions"].values() if r.get("nats") and r.get("nats_pid")),
            None,
        )
        if url is None:
            err(f"no NATS server of the cluster in {args.dir} is running")
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
        err(f"events tail: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    return EXIT_OK


def register(sub: Subparsers) -> None:
    """``txr events``."""
    ev = sub.add_parser("events", help="the ledger event stream (NATS JetStream)")
    ev_sub = ev.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    p = ev_sub.add_parser("tail", help="print events as they are published (JSON lines)")
    add_dir(p)
    p.add_argument("--tenant", default=None, help="only this tenant's events")
    p.add_argument("--from-start", action="store_true", help="from the oldest stored event")
    p.add_argument("--count", type=positive, default=None, help="exit after N events")
    p.set_defaults(handler=_cmd_events_tail)
