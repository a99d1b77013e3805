"""``txr``: the operator's command line (API.md, "CLI").

Exit codes: 0 success, 1 the operation ran and failed (reason on stderr), 2 usage error
(argparse's own code). Each command group is a module that builds its own parsers
(``register``) and handlers; a handler takes the parsed arguments and returns an exit code:

- ``local``: ``txr local up|status|down``;
- ``access``: ``txr token``, ``keys``, ``limits``;
- ``events``: ``txr events tail``;
- ``operations``: ``txr reconcile``, ``status``, ``failover``, ``switchover``, ``rejoin``,
  ``autofailover``, ``region``, ``rehome``;
- ``runs``: ``txr chaos run``, ``bench``;
- ``common``: the exit codes and what the groups share.

At module level the command line never imports ``bench``, ``chaos`` or ``infra.events``: each is
imported inside the handler of its command, so ``txr`` starts without matplotlib, Locust or
the NATS client.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from infra.cli import access, events, local, operations, runs
from infra.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Handler
from infra.local.ports import plan_ports

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txr", description="txrouter operations")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In this order: it is the order `txr --help` lists the commands in.
    for group in (local, access, events, operations, runs):
        group.register(sub)
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
