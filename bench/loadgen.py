"""Load generators against a router: closed loop (saturation) and open loop (latency at a rate).

Closed loop: ``concurrency`` workers each send the next request as soon as the previous one
answers; the completion rate at enough concurrency is the saturation throughput.
Open loop: requests are *scheduled* at a fixed rate and each one's latency is measured from its
intended send time, not from when it actually left; a stalled server therefore shows up as
latency on every request it delayed (no coordinated omission, Gil Tene's correction).
Both are bounded in request count and in time, stop by themselves, and only talk to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

# Histogram range in microseconds: 1 us to 60 s, three significant digits (0.1% error).
HIST_LOWEST_US: Final = 1
HIST_HIGHEST_US: Final = 60_000_000
HIST_DIGITS: Final = 3
# Percentiles reported everywhere, and the ones drawn as a percentile curve.
REPORT_PERCENTILES: Final = (50.0, 90.0, 99.0, 99.9)
CURVE_PERCENTILES: Final = (0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0)
# Per-request client timeout: above the router's 5 s write deadline so that its own 504
# reaches us instead of a client-side cut.
REQUEST_TIMEOUT_S: Final = 10.0
# A run stops at its duration, and waits at most this long afterwards for requests in flight.
DRAIN_TIMEOUT_S: Final = 15.0
# Open loop: requests in flight at once. Past this a scheduled request waits for a slot, and that
# wait counts in its latency (it is measured from the intended time), so the bound caps memory
# and sockets without hiding a stall.
OPEN_LOOP_INFLIGHT_MAX: Final = 2048
# Connections of one client session: enough for the largest closed-loop concurrency.
CONNECTIONS_MAX: Final = 512
LOOPBACK: Final = "127.0.0.1"

# A request: given the session and a sequence number, send one request and return its HTTP
# status (the caller decides which statuses count as success).
Request = Callable[[aiohttp.ClientSession, int], Awaitable[int]]


def new_histogram() -> Any:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def percentiles_ms(hist: Any, pcts: tuple[float, ...] = REPORT_PERCENTILES) -> dict[str, float]:
    return {f"p{p:g}": hist.get_value_at_percentile(p) / 1000.0 for p in pcts}


def check_loopback(url: str) -> None:
    """Refuse to send load anywhere but this machine."""
    host = urlsplit(url).hostname
    if host != LOOPBACK:
        raise ValueError(f"benchmark traffic goes to {LOOPBACK} only, not {host!r}")


def session(headers: dict[str, str]) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=CONNECTIONS_MAX),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


@dataclass(slots=True)
class RunResult:
    mode: str
    duration_s: float
    ok: int = 0
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    hist: Any = field(default_factory=new_histogram)
    target_rate: float | None = None
    concurrency: int | None = None

    @property
    def rate(self) -> float:
        """Successful requests per second of wall time."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    def record(self, status: int | str, latency_s: float, ok: bool) -> None:
        self.statuses[str(status)] += 1
        if ok:
            self.ok += 1
            self.hist.record_value(max(HIST_LOWEST_US, min(HIST_HIGHEST_US, latency_s * 1e6)))
        else:
            self.errors += 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "rate": round(self.rate, 1),
            "latency_ms": {
                **percentiles_ms(self.hist),
                "mean": self.hist.get_mean_value() / 1000.0,
                "max": self.hist.get_max_value() / 1000.0,
            },
            "percentile_curve_ms": {
                f"{p:g}": self.hist.get_value_at_percentile(p) / 1000.0 for p in CURVE_PERCENTILES
            },
        }
        if self.target_rate is not None:
            out["target_rate"] = round(self.target_rate, 1)
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency
        return out


async def _one(
    s: aiohttp.ClientSession,
    request: Request,
    seq: int,
    ok_statuses: frozenset[int],
    start: float,
    res: RunResult,
) -> None:
    try:
        status: int | str = await request(s, seq)
    except (aiohttp.ClientError, TimeoutError) as exc:
        status = type(exc).__name__
    res.record(status, time.perf_counter() - start, status in ok_statuses)


async def closed_loop(
    s: aiohttp.ClientSession,
    request: Request,
    *,
    concurrency: int,
    duration_s: float,
    max_requests: int,
    ok_statuses: frozenset[int],
) -> RunResult:
    """``concurrency`` workers back to back until ``duration_s`` or ``max_requests``."""
    res = RunResult(mode="closed", duration_s=duration_s, concurrency=concurrency)
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    counter = iter(range(max_requests))

    async def worker() -> None:
        for seq in counter:  # shared iterator: the count bound holds across workers
            if time.perf_counter() >= deadline:
                return
            await _one(s, request, seq, ok_statuses, time.perf_counter(), res)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=duration_s + DRAIN_TIMEOUT_S)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    res.duration_s = time.perf_counter() - t0
    return res


async def open_loop(
    s: aiohttp.ClientSession,
    request: Request,
    *,
    rate: float,
    duration_s: float,
    ok_statuses: frozenset[int],
    inflight_max: int = OPEN_LOOP_INFLIGHT_MAX,
) -> RunResult:
    """Send at ``rate`` per second for ``duration_s``; latency counts from the intended time."""
    res = RunResult(mode="open", duration_s=duration_s, target_rate=rate)
    slots = asyncio.Semaphore(inflight_max)

    async def fire(seq: int, intended: float) -> None:
        async with slots:
            await _one(s, request, seq, ok_statuses, intended, res)

    res.duration_s = await paced(rate, duration_s, fire)
    return res


async def paced(
    rate: float, duration_s: float, fire: Callable[[int, float], Coroutine[Any, Any, None]]
) -> float:
    """Start ``fire(seq, intended_perf_counter_time)`` at ``rate`` per second for
    ``duration_s``, then wait (at most DRAIN_TIMEOUT_S) for them; returns the elapsed time."""
    assert rate > 0
    total = max(1, int(rate * duration_s))
    interval = 1.0 / rate
    t0 = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    for seq in range(total):
        intended = t0 + seq * interval
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Behind schedule, the loop sends at once; the lateness is part of the latency.
        task = asyncio.create_task(fire(seq, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=DRAIN_TIMEOUT_S)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return time.perf_counter() - t0
