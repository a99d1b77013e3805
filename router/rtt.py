"""Round-trip times from this router to every store node and every peer router.

Each target keeps an EWMA (the typical cost) and a tail estimate (a high quantile over a
bounded window) because a source that is usually fast but sometimes slow is a poor choice for a
read with a deadline. The read path picks the cheapest source that satisfies the requested
consistency level by these numbers; ``/metrics`` and ``txr status`` show them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp

from regionstore.errors import StoreError
from router.metrics import Metrics

log = logging.getLogger(__name__)

# One probe round per target every second while reads consult the table: RTTs across regions
# change slowly, and a second is short next to the lag bound reads are judged against.
PROBE_INTERVAL_S: Final = 1.0
# The read path consulted the table within this long: probe at PROBE_INTERVAL_S.
PROBE_BUSY_WINDOW_S: Final = 30.0
# Otherwise (an idle router) a round this often keeps /metrics and `txr status` figures at most
# this old; the first read after the pause wakes the prober at once, and until its round is
# back it is judged on estimates of the last idle round (which is what a read would have got
# anyway: RTTs move slowly). Eight targets per router every second were a tenth of an idle
# cluster's CPU (the probes, the servers answering them, the WAN emulator carrying them).
PROBE_IDLE_INTERVAL_S: Final = 10.0
# A probe slower than this counts as this long (a partitioned target must look expensive, not
# unknown, so reads move away from it).
PROBE_TIMEOUT_S: Final = 2.0
# EWMA weight of a new sample: about the last ten probes matter.
EWMA_ALPHA: Final = 0.2
# Samples kept per target for the tail estimate, and the quantile reported as the tail.
TAIL_WINDOW_SAMPLES: Final = 60
TAIL_QUANTILE: Final = 0.95


@dataclass
class RttEstimate:
    ewma_s: float | None = None
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=TAIL_WINDOW_SAMPLES))

    def observe(self, seconds: float) -> None:
        self.samples.append(seconds)
        if self.ewma_s is None:
            self.ewma_s = seconds
        else:
            self.ewma_s += EWMA_ALPHA * (seconds - self.ewma_s)

    @property
    def tail_s(self) -> float | None:
        if not self.samples:
            return None
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * TAIL_QUANTILE))]


Probe = Callable[[], Awaitable[float]]


class RttTable:
    """Targets are named ``node:<name>`` (a PostgreSQL server) or ``router:<region>``."""

    def __init__(self, region: str, metrics: Metrics | None = None) -> None:
        self._region = region
        self._metrics = metrics
        self._estimates: dict[str, RttEstimate] = {}
        # When the read path last asked (monotonic), and an event for an idle prober to wake.
        self.used_at = -float("inf")
        self.used = asyncio.Event()

    def observe(self, target: str, seconds: float) -> None:
        est = self._estimates.setdefault(target, RttEstimate())
        est.observe(seconds)
        if self._metrics is not None:
            self._metrics.rtt.labels(self._region, target, "ewma").set(est.ewma_s or 0.0)
            self._metrics.rtt.labels(self._region, target, "tail").set(est.tail_s or 0.0)

    def get(self, target: str) -> RttEstimate | None:
        return self._estimates.get(target)

    def cost(self, target: str) -> float:
        """What a read from ``target`` is expected to cost; unknown targets cost the timeout."""
        self.used_at = time.monotonic()
        if not self.used.is_set():
            self.used.set()
        est = self._estimates.get(target)
        if est is None or est.ewma_s is None:
            return PROBE_TIMEOUT_S
        return est.ewma_s

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        return {
            t: {"ewma_ms": _ms(e.ewma_s), "tail_ms": _ms(e.tail_s)}
            for t, e in sorted(self._estimates.items())
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def probe_router(session: aiohttp.ClientSession, url: str) -> float:
    start = time.perf_counter()
    async with session.get(url + "/healthz") as resp:
        await resp.read()
    return time.perf_counter() - start


async def run_prober(
    table: RttTable,
    targets: Callable[[], dict[str, Probe]],
    stop: asyncio.Event,
    *,
    interval_s: float = PROBE_INTERVAL_S,
    idle_interval_s: float = PROBE_IDLE_INTERVAL_S,
    busy_window_s: float = PROBE_BUSY_WINDOW_S,
) -> None:
    """Probe every target once per interval until ``stop``; a failure records the timeout.
    The interval is ``interval_s`` while reads used the table within ``busy_window_s``, else
    ``idle_interval_s``, cut short by the next read."""
    stopped = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            await _round(table, targets)
            if time.monotonic() - table.used_at <= busy_window_s:
                await asyncio.wait({stopped}, timeout=interval_s)
                continue
            table.used.clear()
            used = asyncio.create_task(table.used.wait())
            try:
                await asyncio.wait(
                    {stopped, used}, timeout=idle_interval_s, return_when="FIRST_COMPLETED"
                )
            finally:
                used.cancel()
    finally:
        stopped.cancel()


async def _round(table: RttTable, targets: Callable[[], dict[str, Probe]]) -> None:
    async def one(name: str, probe: Probe) -> None:
        try:
            seconds = await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
        except (TimeoutError, StoreError, aiohttp.ClientError, OSError):
            seconds = PROBE_TIMEOUT_S
        table.observe(name, seconds)

    await asyncio.gather(*(one(n, p) for n, p in targets().items()))
