"""The benchmark report: one JSON document, PNG plots beside it, and a readable summary."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine or a server

# The backend is chosen above, before pyplot loads.
import matplotlib.pyplot as plt

from bench import idle

REPORT_FILE: Final = "report.json"
PLOT_LATENCY_VS_RATE: Final = "latency_vs_throughput.png"
PLOT_PERCENTILES: Final = "latency_percentiles.png"
PLOT_CPU: Final = "cpu_per_transfer.png"
PLOT_DPI: Final = 110
_DB_FIGURES: Final = (
    ("statements", "statements_per_transfer"),
    ("WAL records", "wal_records_per_transfer"),
    ("WAL bytes", "wal_bytes_per_transfer"),
    ("WAL full-page images", "wal_fpi_per_transfer"),
    ("WAL syncs", "wal_syncs_per_transfer"),
)


def write(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the JSON report and the plots into ``out_dir``; return what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "latency_vs_throughput": _plot_latency_vs_rate(report, out_dir / PLOT_LATENCY_VS_RATE),
        "latency_percentiles": _plot_percentiles(report, out_dir / PLOT_PERCENTILES),
        "cpu_per_transfer": _plot_cpu(report, out_dir / PLOT_CPU),
    }
    if report["router"].get("flame_graph"):
        files["flame_graph"] = out_dir / report["router"]["flame_graph"]
    report["files"] = {k: str(v) for k, v in files.items()} | {"report": str(out_dir / REPORT_FILE)}
    path = out_dir / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    files["report"] = path
    return files


def _plot_cpu(report: dict[str, Any], path: Path) -> Path:
    """CPU per acknowledged transfer by component, stacked: single requests vs batches."""
    from bench.cpu import COMPONENTS

    bars = {
        "single (wrk, best)": report["router"]["saturation"]["best"]["cpu_us_per_transfer"],
        f"batch of {report['router']['batch']['batch_size']}": report["router"]["batch"][
            "cpu_us_per_transfer"
        ],
    }
    fig, ax = plt.subplots(figsize=(7, 5))
    bottoms = [0.0] * len(bars)
    for comp in COMPONENTS:
        heights = [b.get(comp, 0.0) for b in bars.values()]
        ax.bar(list(bars), heights, bottom=bottoms, label=comp)
        bottoms = [x + h for x, h in zip(bottoms, heights, strict=True)]
    for i, total in enumerate(bottoms):
        ax.annotate(
            f"{total:.0f} us",
            (i, total),
            ha="center",
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_ylabel("CPU us per acknowledged transfer")
    ax.set_title("where a transfer's CPU goes (from /proc)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _plot_latency_vs_rate(report: dict[str, Any], path: Path) -> Path:
    """Closed-loop runs as curves (one point per concurrency), open-loop runs as markers."""
    fig, ax = plt.subplots(figsize=(8, 5))
    closed = report["router"]["saturation"]["runs"]
    opened = report["router"]["open_loop"]
    for pct, colour in (("p50", "tab:blue"), ("p99", "tab:orange"), ("p99.9", "tab:green")):
        if pct != "p99.9":  # wrk's summary gives p50 and p99
            ax.plot(
                [r["rate"] for r in closed],
                [r[f"{pct}_ms"] for r in closed],
                marker="o",
                color=colour,
                label=f"wrk closed loop {pct}",
            )
        ax.scatter(
            [r["rate"] for r in opened.values()],
            [r["latency_ms"][pct] for r in opened.values()],
            marker="x",
            s=60,
            color=colour,
            label=f"open loop {pct}",
        )
    for r in closed:
        ax.annotate(
            f"c={r['connections']}",
            (r["rate"], r["p50_ms"]),
            fontsize=7,
            xytext=(3, -10),
            textcoords="offset points",
        )
    for name, r in opened.items():
        ax.annotate(
            f"open {name}",
            (r["rate"], r["latency_ms"]["p99"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ceiling = report["ceiling"]["tps"]
    ax.axvline(ceiling, color="grey", linestyle="--", label=f"pgbench ceiling {ceiling:.0f}/s")
    ax.set_xlabel("transfers/s (achieved)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("router: latency vs throughput (one shard, synchronous replication)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def _plot_percentiles(report: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    runs: dict[str, dict[str, Any]] = {
        f"open {k}": v for k, v in report["router"]["open_loop"].items()
    }
    # (wrk's saturation runs carry p50/p99 only: their curves are not HdrHistogram's.)
    runs["skewed (closed)"] = report["skewed"]
    for name, run in runs.items():
        curve = run["percentile_curve_ms"]
        # x as "nines": 1/(1-p) on a log axis spreads the tail like HdrHistogram's own plots.
        xs = [1.0 / (1.0 - float(p) / 100.0) for p in curve if float(p) < 100.0]
        ys = [v for p, v in curve.items() if float(p) < 100.0]
        ax.plot(xs, ys, marker=".", label=name)
    ticks = [1.0, 2.0, 10.0, 100.0, 1000.0, 10000.0]
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("transfer latency by percentile (open loop from intended send time)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def summary(report: dict[str, Any]) -> str:
    c = report["ceiling"]
    r = report["router"]
    sat = r["saturation"]["best"]
    lines = [
        f"txr bench ({'quick' if report['quick'] else 'full'}) on shard {report['shard']} "
        f"via router {report['region']}, WAN none, {report['elapsed_s']:.0f} s",
        "",
        f"pgbench ceiling       {c['tps']:10.1f} transfers/s  (best of clients "
        f"{[x['clients'] for x in c['runs']]}: c={c['best_clients']})",
        f"router saturation     {sat['rate']:10.1f} transfers/s  (wrk, "
        f"c={sat['connections']}, p50 {sat['p50_ms']:.1f} ms, p99 {sat['p99_ms']:.1f} ms)",
        f"ratio router/pgbench  {r['ratio_to_ceiling']:10.2f}",
        *([idle.summary_line(report["idle"])] if "idle" in report else []),
        f"mean batch size       {r.get('mean_batch_size', 0.0):10.1f}",
        f"batch endpoint        {r['batch']['rate']:10.1f} transfers/s  (wrk, "
        f"{r['batch']['batch_size']} per request, c={r['batch']['connections']}), ratio "
        f"{r['batch']['ratio_to_ceiling']:.2f}",
        "",
        "CPU us per acknowledged transfer (single / batch):",
        *(
            f"  {comp:12s} {sat['cpu_us_per_transfer'][comp]:8.0f} "
            f"{r['batch']['cpu_us_per_transfer'][comp]:8.0f}"
            for comp in sat["cpu_us_per_transfer"]
        ),
        "",
        "primary's work per acknowledged transfer (single / batch; pg_stat_statements, "
        "pg_stat_wal):",
        *(
            f"  {label:24s} {sat['db_per_transfer'][key]:10.2f} "
            f"{r['batch']['db_per_transfer'][key]:10.2f}"
            for label, key in _DB_FIGURES
        ),
        "  heaviest statements (single):",
        *(
            f"    {st['calls_per_transfer']:6.2f} calls {st['wal_bytes_per_transfer']:8.0f} B WAL "
            f"{st['exec_us_per_transfer']:7.0f} us  {st['query'][:70]}"
            for st in sat["db_per_transfer"]["top_statements"]
        ),
        f"load average before {report['load_average']['before']}, after "
        f"{report['load_average']['after']} ({report['cpus']} CPUs)",
        "",
        "open loop (latency from intended send time, ms):",
    ]
    for name, run in r["open_loop"].items():
        lat = run["latency_ms"]
        lines.append(
            f"  {name:4s} of saturation: target {run['target_rate']:8.1f}/s achieved "
            f"{run['rate']:8.1f}/s  p50 {lat['p50']:7.1f}  p90 {lat['p90']:7.1f}  "
            f"p99 {lat['p99']:7.1f}  p99.9 {lat['p99.9']:7.1f}  errors {run['errors']}"
        )
    over = r.get("overload")
    if over:
        lines += ["", *overload_lines(over)]
    reads = report["reads"]
    lines += [
        "",
        "reads (closed loop):",
        *(
            f"  {level:7s} {run['rate']:10.1f} reads/s  p50 {run['latency_ms']['p50']:.1f} ms  "
            f"p99 {run['latency_ms']['p99']:.1f} ms  served by {run.get('served_by', {})}"
            for level, run in reads.items()
        ),
        "",
        f"skewed ({report['skewed']['hot_share']:.0%} of transfers touch "
        f"{report['skewed']['hot_accounts']} hot accounts): {report['skewed']['rate']:.1f} "
        f"transfers/s, p99 {report['skewed']['latency_ms']['p99']:.1f} ms, "
        f"errors {report['skewed']['errors']}",
    ]
    if "files" in report:
        lines += ["", *(f"{k:22s}{v}" for k, v in report["files"].items())]
    return "\n".join(lines)


def overload_lines(over: Mapping[str, Any]) -> list[str]:
    """The overload runs against the goals (bench.suite ``overload_summary``)."""
    lines = [
        f"overload (goals: goodput >= {over['goodput_min']:.0%} of saturation "
        f"{over['saturation_rate']:.1f}/s, admitted p99 <= {over['p99_ratio_max']:g}x the "
        f"p99 at 50% = {over['p99_at_50pct_ms']:.1f} ms):",
    ]
    for name, o in over["runs"].items():
        lines.append(
            f"  {name:4s}: target {o['target_rate']:8.1f}/s goodput {o['goodput_rate']:8.1f}/s"
            f" ({o['goodput_fraction']:.0%} {'ok' if o['goodput_ok'] else 'MISSED'}), "
            f"admitted p99 {o['p99_admitted_ms']:7.1f} ms ({o['p99_ratio']:.1f}x "
            f"{'ok' if o['p99_ok'] else 'MISSED'}), shed {o['shed']}, failed {o['failed']}"
        )
    return lines


def overload_summary(rep: Mapping[str, Any]) -> str:
    """``txr bench --parts overload``: saturation, each open-loop run with what it cost per
    request (refused ones included), and the goals."""
    best = rep["saturation"]["best"]
    lines = [
        f"saturation (wrk, closed loop): {best['rate']:.1f} transfers/s at c={best['connections']}"
        f", router {best['cpu_us_per_transfer']['router']:.0f} us/transfer, cluster "
        f"{best['cpu_us_per_transfer']['total']:.0f} us/transfer",
        "open loop (latency from intended send time, ms; CPU us per request, refused included):",
    ]
    for name, run in rep["open_loop"].items():
        lat = run["latency_ms"]
        per_req = run["cpu_us_per_request"]
        lines.append(
            f"  {name:4s}: target {run['target_rate']:8.1f}/s achieved {run['rate']:8.1f}/s  "
            f"p50 {lat['p50']:7.1f}  p99 {lat['p99']:7.1f}  statuses {run['statuses']}  "
            f"batch {run['mean_batch_size']:.1f}  router {per_req['router']:.0f}  primary "
            f"{per_req['primary']:.0f}  cluster {per_req['total']:.0f}  generator "
            f"{run['generator_us_per_request']:.0f}"
        )
    lines += [
        *overload_lines(rep["overload"]),
        f"load average before {rep['load_average']['before']}, after "
        f"{rep['load_average']['after']} ({rep['cpus']} CPUs)",
    ]
    return "\n".join(lines)
