"""``python -m router.relays --config FILE``: run one region's relays (uvloop, JSON logs).

Takes the same ``RouterConfig`` file as the router of the region. SIGTERM or SIGINT stops it
cleanly; a SIGKILL is harmless too (every relay re-delivers from durable state on restart).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

import uvloop

from router.config import RouterConfig
from router.logs import setup_logging
from router.relays.service import RelayService


async def _serve(config: RouterConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with RelayService(config):
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m router.relays", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="router config JSON file")
    args = parser.parse_args()
    config = RouterConfig.load(args.config)
    setup_logging(config.region, config.log_level)
    uvloop.run(_serve(config))


if __name__ == "__main__":
    main()
