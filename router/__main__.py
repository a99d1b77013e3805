"""``python -m router --config FILE [--worker I]``: serve one region's router (uvloop, JSON logs).

Every worker of a region binds the same port with SO_REUSEPORT; the launcher starts each one as
its own process (no forking supervisor), so any one can be killed and restarted alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvloop

from router import serve
from router.app import create_app
from router.config import RouterConfig
from router.limits import HEADER_RECEIVE_TIMEOUT_S
from router.logs import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="router config JSON file")
    parser.add_argument(
        "--worker", type=int, default=0, help="this worker's index (0 .. workers-1)"
    )
    args = parser.parse_args()
    config = RouterConfig.load(args.config)
    setup_logging(config.region, config.log_level)
    # router.serve is web.run_app with malformed HTTP answered as problem+json.
    serve.run(
        create_app(config, worker=args.worker),
        host=config.host,
        port=config.port,
        loop=uvloop.new_event_loop(),
        # Give in-flight writes time to get their commit acknowledgement before exit.
        shutdown_timeout_s=5.0,
        # Bounds the time to send a request's headers too (router.limits says how).
        keepalive_timeout_s=HEADER_RECEIVE_TIMEOUT_S,
    )


if __name__ == "__main__":
    main()
