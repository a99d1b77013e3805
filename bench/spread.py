"""Several full ``txr bench`` runs read together: min / median / max of each figure on its own.

Timings on a shared two-core machine move twofold between runs, so one run is one sample: the
README's method is three runs one after another and the spread of every figure. ``txr bench
--runs N`` writes each run's report under ``<out>/run-<i>/`` and this module's ``spread.json``
beside them; ``figures`` names what is compared (the issue goals' figures first), each read
from one report by a path into its JSON. A figure a report lacks (an older report, a part that
did not run) is left out of that run's column rather than read as zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

Report = Mapping[str, Any]


def _at(*path: str | int) -> Callable[[Report], float | None]:
    def read(rep: Report) -> float | None:
        cur: Any = rep
        for key in path:
            try:
                cur = cur[key]
            except (KeyError, IndexError, TypeError):
                return None
        return float(cur) if isinstance(cur, int | float) and not isinstance(cur, bool) else None

    return read


_SAT: Final = ("router", "saturation", "best")
_BATCH: Final = ("router", "batch")
_OVER: Final = ("router", "overload", "runs")

# (label, unit, reader). The unit is part of the label a reader sees in the table.
FIGURES: Final[tuple[tuple[str, str, Callable[[Report], float | None]], ...]] = (
    ("router CPU per transfer at saturation", "us", _at(*_SAT, "cpu_us_per_transfer", "router")),
    ("change feed CPU per transfer", "us", _at(*_SAT, "cpu_us_per_transfer", "change_feed")),
    ("primary CPU per transfer", "us", _at(*_SAT, "cpu_us_per_transfer", "primary")),
    ("whole cluster CPU per transfer", "us", _at(*_SAT, "cpu_us_per_transfer", "total")),
    ("batch: router CPU per transfer", "us", _at(*_BATCH, "cpu_us_per_transfer", "router")),
    ("batch: whole cluster CPU per transfer", "us", _at(*_BATCH, "cpu_us_per_transfer", "total")),
    ("idle cluster", "cores", _at("idle", "cores_total")),
    ("pgbench ceiling", "transfers/s", _at("ceiling", "tps")),
    ("router saturation", "transfers/s", _at(*_SAT, "rate")),
    ("saturation connections", "", _at(*_SAT, "connections")),
    ("ratio router / pgbench", "", _at("router", "ratio_to_ceiling")),
    ("batch endpoint", "transfers/s", _at(*_BATCH, "rate")),
    ("batch connections", "", _at(*_BATCH, "connections")),
    ("ratio batch / pgbench", "", _at(*_BATCH, "ratio_to_ceiling")),
    ("mean transfers per store call", "", _at("router", "mean_batch_size")),
    ("open loop 50 %: p50", "ms", _at("router", "open_loop", "50%", "latency_ms", "p50")),
    ("open loop 50 %: p99", "ms", _at("router", "open_loop", "50%", "latency_ms", "p99")),
    ("open loop 80 %: p50", "ms", _at("router", "open_loop", "80%", "latency_ms", "p50")),
    ("open loop 80 %: p99", "ms", _at("router", "open_loop", "80%", "latency_ms", "p99")),
    ("150 %: goodput / saturation", "", _at(*_OVER, "150%", "goodput_fraction")),
    ("150 %: admitted p99 / p99 at 50 %", "", _at(*_OVER, "150%", "p99_ratio")),
    ("150 %: shed", "requests", _at(*_OVER, "150%", "shed")),
    ("200 %: goodput / saturation", "", _at(*_OVER, "200%", "goodput_fraction")),
    ("200 %: admitted p99 / p99 at 50 %", "", _at(*_OVER, "200%", "p99_ratio")),
    ("200 %: shed", "requests", _at(*_OVER, "200%", "shed")),
    ("cached reads", "reads/s", _at("reads", "cached", "rate")),
    ("strong reads", "reads/s", _at("reads", "strong", "rate")),
    ("skewed mix", "transfers/s", _at("skewed", "rate")),
    ("load average before (1 min)", "", _at("load_average", "before", 0)),
    ("load average after (1 min)", "", _at("load_average", "after", 0)),
)


def spread(reports: Sequence[Report]) -> dict[str, Any]:
    """Per figure: its unit, each run's value (None where a run lacks it), min/median/max."""
    out: dict[str, Any] = {"runs": len(reports), "figures": {}}
    for label, unit, read in FIGURES:
        values = [read(r) for r in reports]
        got = [v for v in values if v is not None]
        entry: dict[str, Any] = {"unit": unit, "values": values}
        if got:
            entry |= {"min": min(got), "median": statistics.median(got), "max": max(got)}
        out["figures"][label] = entry
    return out


def _num(v: float) -> str:
    if abs(v) >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def table(sp: Mapping[str, Any]) -> str:
    """The spread as a Markdown table (what the README's Performance section shows)."""
    lines = [
        f"min / median / max of {sp['runs']} runs, each figure on its own",
        "",
        "| figure | min | median | max |",
        "|---|---|---|---|",
    ]
    for label, e in sp["figures"].items():
        name = f"{label}, {e['unit']}" if e["unit"] else label
        if "min" not in e:
            lines.append(f"| {name} | - | - | - |")
            continue
        lines.append(f"| {name} | {_num(e['min'])} | {_num(e['median'])} | {_num(e['max'])} |")
    return "\n".join(lines)
