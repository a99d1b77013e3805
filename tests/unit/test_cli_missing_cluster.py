"""Every ``txr`` command that reads a local cluster, pointed at a directory that holds none:
exit 1 with one line naming what is missing, never a traceback (API.md's exit codes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.cli import EXIT_FAILED, main

COMMANDS = [
    ["local", "status"],
    ["token", "--tenant", "t", "--scopes", "accounts:read"],
    ["token", "--admin"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["keys", "retire", "--kid", "k"],
    ["keys", "list-saga"],
    ["keys", "rotate-saga"],
    ["keys", "retire-saga"],
    ["limits", "show"],
    ["limits", "set", "--tenant", "t", "--rate", "5"],
    ["events", "tail", "--count", "1"],
    ["reconcile"],
    ["status"],
    ["autofailover", "on"],
    ["region", "fail", "us-east"],
    ["rehome", "--slot", "1", "--to", "s"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_a_missing_cluster_is_one_line_and_exit_1(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none"
    assert main([*argv, "--dir", str(missing)]) == EXIT_FAILED
    out, errout = capsys.readouterr()
    assert "Traceback" not in out + errout
    lines = [line for line in errout.splitlines() if line.strip()]
    assert lines, "says why on stderr"
    assert lines[-1].startswith("txr"), lines[-1]
    assert "no local cluster" in lines[-1] or "no key ring" in lines[-1], lines[-1]
    assert not missing.exists(), "reading a missing cluster creates nothing"
