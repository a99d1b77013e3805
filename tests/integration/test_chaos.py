"""The short chaos pass of CI: every scenario, about 20 s each, through ``txr chaos run``.

Each scenario starts its own cluster (ports 6800-6899, moved by TXR_TEST_PORT_OFFSET), runs the
bank workload under its fault, heals, settles and checks every guarantee (chaos/checker.py, whose
own tests are tests/unit/test_chaos_checker.py). A longer run is one command away::

    .venv/bin/txr chaos run --scenario all --duration 120 --seed 7
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import pytest

from chaos.nemesis import SCENARIOS
from infra import cli
from tests.fixtures import PORT_OFFSET

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

BASE_PORT: Final = 6800 + PORT_OFFSET
DURATION_S: Final = 20
SEED: Final = 20261122


def test_every_scenario_keeps_every_guarantee(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chaos-out"
    code = cli.main(
        [
            "chaos",
            "run",
            "--scenario",
            "all",
            "--duration",
            str(DURATION_S),
            "--seed",
            str(SEED),
            "--json",
            "--base-port",
            str(BASE_PORT),
            "--out",
            str(out),
        ]
    )
    report: dict[str, Any] = json.loads(capsys.readouterr().out)
    by_name = {s["name"]: s for s in report["scenarios"]}
    failed = {
        n: {k: s.get(k) for k in ("error", "anomalies", "lost", "duplicated", "stale_reads")}
        for n, s in by_name.items()
        if not s["ok"]
    }
    assert code == 0, failed
    assert report["ok"]
    assert list(by_name) == list(SCENARIOS)
    for name, s in by_name.items():
        # The run did something under its fault, and the contract's fields are all there.
        assert s["acked"] > 0, name
        assert s["ops"] >= s["acked"] + s["unknown"], name
        assert (s["lost"], s["duplicated"], s["stale_reads"]) == (0, 0, 0), name
        assert s["conserved"] is True, name
        assert s["stale_epoch_writes"] == 0, name
        assert s["faults"], name
        assert all("healed_s" in f for f in s["faults"]), name
    assert json.loads((out / "chaos-report.json").read_text())["ok"]
