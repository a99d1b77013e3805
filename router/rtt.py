"""Round-trip times from this router to every store node and every peer router.

Each target keeps an EWMA (the typical cost) and a tail estimate (a high quantile over a
bounded window) because a source that is usually fast but sometimes slow is a poor choice for a
read with a deadline. The read path picks the cheapest source that satisfies the requested
consistency level by these numbers; ``/metrics`` and ``txr status`` show them.
"""

from __future__ import annotations

import asyncio
import contextlib
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

# One probe round per target every second: RTTs across regions change slowly, and a second is
# short next to the lag bound reads are judged against.
PROBE_INTERVAL_S: Final = 1.0
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
    table: RttTable, targets: Callable[[], dict[str, Probe]], stop: asyncio.Event
) -> None:
    """Probe every target once per interval until ``stop``; a failure records the timeout."""
    while not stop.is_set():
        probes = targets()

        async def one(name: str, probe: Probe) -> None:
            try:
                seconds = await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
            except (TimeoutError, StoreError, aiohttp.ClientError, OSError):
                seconds = PROBE_TIMEOUT_S
            table.observe(name, seconds)

        await asyncio.gather(*(one(n, p) for n, p in probes.items()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PROBE_INTERVAL_S)
