"""Which region a client sends to: the pinned one, else the lowest measured RTT; never one that
just failed.

RTT is an EWMA of ``GET /healthz`` round trips (at start and in the background; a probe that
times out counts as a sample at the probe's bound). A region that refused a connection or
answered 503 is *down* for ``REGION_DOWN_S``; a refused probe keeps it down. Ranking: regions
that are up before those that are down; among the up ones the pinned region first, then by RTT
(unmeasured last, in the order the caller listed them); down ones by how soon they come back.
So a client moves to the next best region at the first failure and drifts back once its region
answers again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from txclient import limits
from txclient.retry import Clock


@dataclass(slots=True)
class _Region:
    name: str
    url: str
    order: int
    rtt_s: float | None = None
    down_until: float = 0.0


class RegionSelector:
    def __init__(
        self,
        endpoints: Mapping[str, str],
        prefer: str | None = None,
        *,
        clock: Clock = time.monotonic,
        alpha: float = limits.RTT_EWMA_ALPHA,
        down_s: float = limits.REGION_DOWN_S,
    ) -> None:
        if not endpoints:
            raise ValueError("endpoints: give at least one region -> URL")
        if prefer is not None and prefer not in endpoints:
            raise ValueError(f"prefer={prefer!r} is not one of the endpoints {sorted(endpoints)}")
        assert 0 < alpha <= 1
        self.prefer = prefer
        self._clock = clock
        self._alpha = alpha
        self._down_s = down_s
        self._lock = threading.Lock()
        self._regions = {
            name: _Region(name, url.rstrip("/"), i)
            for i, (name, url) in enumerate(endpoints.items())
        }

    @property
    def names(self) -> list[str]:
        return list(self._regions)

    def url(self, region: str) -> str:
        return self._regions[region].url

    def rtt_s(self, region: str) -> float | None:
        with self._lock:
            return self._regions[region].rtt_s

    def is_down(self, region: str) -> bool:
        with self._lock:
            return self._regions[region].down_until > self._clock()

    def ranked(self) -> list[str]:
        now = self._clock()
        with self._lock:

            def key(r: _Region) -> tuple[int, float, int, float, int]:
                down = r.down_until > now
                return (
                    1 if down else 0,
                    r.down_until if down else 0.0,
                    0 if r.name == self.prefer else 1,
                    r.rtt_s if r.rtt_s is not None else float("inf"),
                    r.order,
                )

            return [r.name for r in sorted(self._regions.values(), key=key)]

    def best(self) -> str:
        return self.ranked()[0]

    def observe_rtt(self, region: str, rtt_s: float) -> None:
        with self._lock:
            r = self._regions[region]
            r.rtt_s = rtt_s if r.rtt_s is None else r.rtt_s + self._alpha * (rtt_s - r.rtt_s)

    def mark_down(self, region: str) -> None:
        with self._lock:
            r = self._regions[region]
            r.down_until = max(r.down_until, self._clock() + self._down_s)

    def probe_failed(self, region: str) -> None:
        self.mark_down(region)
