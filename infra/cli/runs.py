"""``txr chaos run`` and ``txr bench``: runs on private clusters they start and purge themselves
(``chaos.runner``, ``bench.suite``; both imported when the command runs, for they pull in what
no other command needs)."""

from __future__ import annotations

import argparse
import json
import secrets
import signal
from pathlib import Path
from types import FrameType

from infra.cli.common import EXIT_FAILED, EXIT_OK, Subparsers, err, positive, progress
from infra.local import cluster


def _cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark suite (bench.suite) on a private cluster it starts and purges itself."""
    # Imported here: the suite pulls in matplotlib and HdrHistogram, which no other command needs.
    from bench import idle, report, suite

    base_port = suite.BASE_PORT if args.base_port is None else args.base_port
    if args.idle:
        try:
            got = idle.run(base_port=base_port, windows=args.windows, progress=progress)
        except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
            err(f"bench failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        print(json.dumps(got, indent=2) if args.json else idle.summary(got))
        return EXIT_OK
    if args.parts == "overload":
        if args.runs > 1:
            err("--parts overload runs once (--runs is for the whole suite)")
            return EXIT_FAILED
        try:
            got = suite.run_overload(
                args.out, quick=args.quick, base_port=base_port, workers=args.workers
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
            err(f"bench failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        print(json.dumps(got, indent=2) if args.json else report.overload_summary(got))
        return EXIT_OK
    if args.runs > 1:
        return _bench_runs(args, base_port)
    try:
        rep = suite.run(args.out, quick=args.quick, base_port=base_port, workers=args.workers)
    except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
        err(f"bench failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    print(json.dumps(rep, indent=2) if args.json else report.summary(rep))
    return EXIT_OK


def _bench_runs(args: argparse.Namespace, base_port: int) -> int:
    """``--runs N``: N whole runs one after another, each in ``<out>/run-<i>``, and the spread
    of every figure (bench.spread) in ``<out>/spread.json``."""
    from bench import report, spread, suite

    reports = []
    for i in range(1, args.runs + 1):
        progress(f"run {i} of {args.runs}")
        try:
            rep = suite.run(
                args.out / f"run-{i}", quick=args.quick, base_port=base_port, workers=args.workers
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the run is exit 1 with its reason
            err(f"bench run {i} failed: {type(exc).__name__}: {exc}")
            return EXIT_FAILED
        progress(report.summary(rep))
        reports.append(rep)
    sp = spread.spread(reports)
    (args.out / "spread.json").write_text(json.dumps(sp, indent=2) + "\n")
    print(json.dumps(sp, indent=2) if args.json else spread.table(sp))
    return EXIT_OK


def _scenario_list(text: str) -> list[str]:
    from chaos.nemesis import SCENARIOS

    names = [x.strip() for x in text.split(",") if x.strip()]
    if names == ["all"]:
        return list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"scenarios are 'all' or a comma list of: {', '.join(SCENARIOS)}"
        )
    return names


def _duration(text: str) -> float:
    from chaos.runner import DURATION_MAX_S, DURATION_MIN_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not DURATION_MIN_S <= value <= DURATION_MAX_S:
        raise argparse.ArgumentTypeError(
            f"duration must be {DURATION_MIN_S:g} to {DURATION_MAX_S:g} seconds"
        )
    return value


def _cmd_chaos_run(args: argparse.Namespace) -> int:
    """Every scenario on its own fresh cluster (chaos.runner); exit 1 if any fails."""
    from chaos import runner

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    def on_sigterm(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGTERM like Ctrl-C: the runner stops the scenario's cluster before exiting.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rep = runner.run(
            args.scenario,
            duration_s=args.duration,
            seed=seed,
            base_port=args.base_port,
            wan=args.wan,
            out_dir=args.out,
        )
    except KeyboardInterrupt:
        err("chaos run interrupted")
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - a crashed run is exit 1 with its reason
        err(f"chaos run failed: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(json.dumps(rep, indent=2) if args.json else runner.summary(rep))
    if not rep["ok"]:
        err(f"chaos run failed (seed {seed}); report and histories in {args.out}")
    return EXIT_OK if rep["ok"] else EXIT_FAILED


def register(sub: Subparsers) -> None:
    """``txr chaos``, ``txr bench``."""
    chaos = sub.add_parser("chaos", help="fault-injection scenarios with a history checker")
    chaos_sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="ACTION")
    p = chaos_sub.add_parser("run", help="run scenarios, each on a fresh local cluster")
    p.add_argument(
        "--scenario",
        type=_scenario_list,
        default="all",
        help="'all' or a comma list of scenario names",
    )
    p.add_argument("--duration", type=_duration, default=60.0, help="seconds per scenario")
    p.add_argument("--seed", type=int, default=None, help="reproduces a run (default: random)")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--base-port", type=int, default=6800, help="first of each cluster's ports")
    p.add_argument("--wan", choices=("none", "realistic"), default="none")
    p.add_argument(
        "--out", type=Path, default=Path("chaos-out"), help="report and histories directory"
    )
    p.set_defaults(handler=_cmd_chaos_run, regions=cluster.DEFAULT_REGIONS)

    p = sub.add_parser("bench", help="benchmark one region's router against the pgbench ceiling")
    p.add_argument("--quick", action="store_true", help="every part very briefly (CI)")
    p.add_argument(
        "--idle",
        action="store_true",
        help="only the idle figure: cores of an idle cluster, per component (issue 12)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=3,
        help="with --idle: one-minute windows to measure (min/median/max)",
    )
    p.add_argument(
        "--parts",
        choices=("all", "overload"),
        default="all",
        help="overload: only the saturation sweep and the open loop at 50, 150 and 200 %% of it "
        "(issue 16's goals, CPU per request of every component), a few minutes; report in "
        "OUT/overload.json",
    )
    p.add_argument(
        "--runs",
        type=positive,
        default=1,
        help="whole runs one after another, each in OUT/run-N, and min/median/max of each "
        "figure in OUT/spread.json",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory")
    p.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="first of the cluster's 100 ports (default 7000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="router processes per region",
    )
    p.set_defaults(handler=_cmd_bench, regions=cluster.DEFAULT_REGIONS)
