"""``python -m router --config FILE``: serve one region's router (uvloop, JSON logs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvloop
from aiohttp import web

from router.app import create_app
from router.config import RouterConfig
from router.logs import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="router config JSON file")
    args = parser.parse_args()
    config = RouterConfig.load(args.config)
    setup_logging(config.region, config.log_level)
    web.run_app(
        create_app(config),
        host=config.host,
        port=config.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        # Give in-flight writes time to get their commit acknowledgement before exit.
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
