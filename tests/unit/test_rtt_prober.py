"""router.rtt's prober: every second while the read path uses the table, rarely when idle, and
woken at once by the first read after an idle pause (real event loop, short intervals)."""

from __future__ import annotations

import asyncio
from typing import Final

from router import rtt

INTERVAL_S: Final = 0.05
IDLE_INTERVAL_S: Final = 2.0
BUSY_WINDOW_S: Final = 0.3


async def test_idle_probes_rarely_busy_probes_often_and_a_read_wakes_it() -> None:
    table = rtt.RttTable("r")
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    probed = asyncio.Event()

    async def probe() -> float:
        calls.append(loop.time())
        probed.set()
        return 0.001

    stop = asyncio.Event()
    task = asyncio.create_task(
        rtt.run_prober(
            table,
            lambda: {"node:x": probe},
            stop,
            interval_s=INTERVAL_S,
            idle_interval_s=IDLE_INTERVAL_S,
            busy_window_s=BUSY_WINDOW_S,
        )
    )
    try:
        # Nobody reads: one round at start, then nothing within the idle interval.
        await asyncio.sleep(IDLE_INTERVAL_S / 2)
        assert len(calls) == 1
        # A read consults the table: the prober runs at once, then at the fast interval.
        probed.clear()
        woke_at = loop.time()
        assert table.cost("node:x") == 0.001
        # Well before the idle interval would have elapsed (a loaded machine may be slow).
        await asyncio.wait_for(probed.wait(), IDLE_INTERVAL_S / 4)
        assert len(calls) == 2
        assert calls[1] - woke_at < IDLE_INTERVAL_S / 4
        await asyncio.sleep(BUSY_WINDOW_S)
        # Six rounds at the fast interval, nominally; half of them on a busy machine.
        assert len(calls) >= 2 + BUSY_WINDOW_S / INTERVAL_S / 2
        # Reads stopped: back to the idle interval once the window passed.
        await asyncio.sleep(BUSY_WINDOW_S)
        settled = len(calls)
        await asyncio.sleep(IDLE_INTERVAL_S / 2)
        assert len(calls) <= settled + 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 1.0)
