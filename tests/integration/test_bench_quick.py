"""``txr bench --quick`` end to end: the report has every part, and every figure is positive.

No thresholds: timings on a shared two-core machine are noise; the full run is for numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import pytest

from bench import idle, report
from infra import cli
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S

# bench.suite's default base port, moved with the rest of the suite's ports.
BASE_PORT: Final = 7000 + PORT_OFFSET

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(SLOW_TEST_TIMEOUT_S)]

LATENCY_KEYS: Final = ("p50", "p90", "p99", "p99.9", "mean", "max")


def _check_run(run: dict[str, Any]) -> None:
    assert run["ok"] > 0
    assert run["rate"] > 0
    assert run["duration_s"] > 0
    for key in LATENCY_KEYS:
        assert run["latency_ms"][key] > 0, key
    curve = list(run["percentile_curve_ms"].values())
    assert curve == sorted(curve), "a percentile curve never goes down"


def _check_wrk(run: dict[str, Any]) -> None:
    assert run["acked"] > 0
    assert run["rate"] > 0
    assert run["p99_ms"] >= run["p50_ms"] > 0
    cpu = run["cpu_us_per_transfer"]
    # The transfers went through the router and the primary: both spent CPU on them.
    assert cpu["router"] > 0
    assert cpu["primary"] > 0
    assert cpu["total"] >= cpu["router"] + cpu["primary"]
    db = run["db_per_transfer"]
    # Every transfer ran statements and wrote WAL on the primary; the batch procedure's own
    # statements are counted (nested tracking), so there is more than one per request.
    assert db["statements_per_transfer"] > 0
    assert db["wal_bytes_per_transfer"] > 0
    assert db["top_statements"]
    assert all(s["calls_per_transfer"] > 0 for s in db["top_statements"])


def test_quick_bench_writes_a_complete_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench-out"
    # Through the command line, exactly as API.md has it.
    assert (
        cli.main(["bench", "--quick", "--json", "--out", str(out), "--base-port", str(BASE_PORT)])
        == 0
    )
    rep: dict[str, Any] = json.loads(capsys.readouterr().out)

    on_disk = json.loads((out / report.REPORT_FILE).read_text())
    assert on_disk["quick"] is True
    for name in (report.PLOT_LATENCY_VS_RATE, report.PLOT_PERCENTILES, report.PLOT_CPU):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG"), name

    # The idle figure (issue 12), before any load: every component measured, none spent nothing
    # it could not (no threshold here: the full run and `txr bench --idle` are for numbers).
    idle_part = on_disk["idle"]
    assert set(idle_part["cores"]) == set(idle.COMPONENTS)
    assert idle_part["cores_total"] > 0
    assert idle_part["goal_cores"] == idle.IDLE_CORES_GOAL

    ceiling = on_disk["ceiling"]
    assert ceiling["tps"] > 0
    assert ceiling["history_rows"] > 0
    assert all(r["tps"] > 0 and r["transactions"] > 0 for r in ceiling["runs"])
    # The ceiling pays the same durability as the router: a synchronous standby on every commit.
    assert ceiling["replication"]["synchronous_commit"] == "on"
    assert "sync" in ceiling["replication"]["standbys"].values()

    router = on_disk["router"]
    assert router["ratio_to_ceiling"] > 0
    assert router["mean_batch_size"] >= 1
    for run in [*router["saturation"]["runs"], router["batch"]]:
        _check_wrk(run)
    assert router["batch"]["batch_size"] == 100
    assert router["batch"]["ratio_to_ceiling"] > 0
    if router["flame_graph"] is not None:
        assert (out / router["flame_graph"]).read_bytes().lstrip().startswith(b"<?xml")
    assert len(on_disk["load_average"]["before"]) == 3
    assert set(router["open_loop"]) == {"50%", "80%", "150%", "200%"}
    over = router["overload"]
    assert set(over["runs"]) == {"150%", "200%"}
    assert over["saturation_rate"] == router["saturation"]["best"]["rate"]
    for name, o in over["runs"].items():
        run = router["open_loop"][name]
        assert o["goodput_rate"] == run["rate"]
        # Every request is accounted for: admitted, shed, or failed.
        assert run["ok"] + o["shed"] + o["failed"] == sum(run["statuses"].values())
        assert o["goodput_ok"] == (o["goodput_fraction"] >= over["goodput_min"])
    for run in router["open_loop"].values():
        _check_run(run)
        assert run["target_rate"] > 0
        assert run["generator_cpu_s"] > 0

    assert set(on_disk["reads"]) == {"cached", "strong"}
    for run in on_disk["reads"].values():
        _check_run(run)
    assert any(k.endswith("/primary") for k in on_disk["reads"]["strong"]["served_by"])
    _check_run(on_disk["skewed"])

    text = report.summary(rep)
    assert "ratio router/pgbench" in text
    assert "idle cluster" in text
    assert "overload (goals:" in text


def test_the_overload_part_runs_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --parts overload is one run of its own (its figures are the overload goals'); asking for
    # several is refused before anything starts.
    out = tmp_path / "never"
    argv = ["bench", "--parts", "overload", "--runs", "2", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_FAILED
    assert "runs once" in capsys.readouterr().err
    assert not out.exists()
