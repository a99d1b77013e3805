"""The short chaos pass of CI: one test per scenario, about 20 s of faults each, through
``txr chaos run`` (a failure names its scenario in the test id).

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
from tests.fixtures import PORT_OFFSET, SLOW_TEST_TIMEOUT_S

pytestmark = [
    pytest.mark.integration,
    pytest.mark.chaos,
    pytest.mark.timeout(SLOW_TEST_TIMEOUT_S),
]

BASE_PORT: Final = 6800 + PORT_OFFSET
DURATION_S: Final = 20
SEED: Final = 20261122


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_keeps_every_guarantee(
    scenario: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "chaos-out"
    code = cli.main(
        [
            "chaos",
            "run",
            "--scenario",
            scenario,
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
    [s] = report["scenarios"]
    assert s["name"] == scenario
    failed = {k: s.get(k) for k in ("error", "anomalies", "lost", "duplicated", "stale_reads")}
    assert code == 0, failed
    assert report["ok"], failed
    # The run did something under its fault, and the contract's fields are all there.
    assert s["acked"] > 0
    assert s["ops"] >= s["acked"] + s["unknown"]
    assert (s["lost"], s["duplicated"], s["stale_reads"]) == (0, 0, 0)
    assert s["conserved"] is True
    assert s["stale_epoch_writes"] == 0
    assert s["faults"]
    assert all("healed_s" in f for f in s["faults"])
    assert json.loads((out / "chaos-report.json").read_text())["ok"]
