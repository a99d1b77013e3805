"""infra.local.children: a spawned child is recorded in the state file the moment it exists
(what ``down`` and ``control.restart`` need), and the shared ready-poll returns once its check
holds, fails at once quoting the log when a watched process exits, and fails at its bound."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Final

import pytest

from infra.local import procs
from infra.local.children import Children
from infra.local.state import State, load_state

# Far longer than any step here takes; a test that reaches it has failed.
SLOW_CHILD_S: Final = 30
NOT_READY_BOUND_S: Final = 0.3


def _children(tmp_path: Path) -> Children:
    state = State(tmp_path / "cluster.json", {"regions": []})
    return Children(state, tmp_path / "logs", tmp_path)


def test_a_child_is_recorded_with_what_a_restart_needs(tmp_path: Path) -> None:
    ch = _children(tmp_path)
    argv = [sys.executable, "-c", f"import time; time.sleep({SLOW_CHILD_S})"]
    pid = ch.spawn("sleeper-a", "sleeper", "a", argv, "time.sleep", python=True)
    try:
        proc = load_state(tmp_path).proc("sleeper-a")
        assert proc is not None
        assert (proc.pid, proc.kind, proc.region, proc.argv) == (pid, "sleeper", "a", tuple(argv))
        assert (proc.marker, proc.python_env, proc.log) == (
            "time.sleep", True, tmp_path / "logs" / "sleeper-a.log",
        )  # fmt: skip
        ch.wait_ready("sleeper a", lambda: True, NOT_READY_BOUND_S, of=["sleeper-a"])
        with pytest.raises(procs.ProcessError, match="not ready after"):
            ch.wait_ready("sleeper a", lambda: False, NOT_READY_BOUND_S, of=["sleeper-a"])
    finally:
        procs.terminate(pid, "time.sleep")


def test_the_ready_poll_fails_early_when_a_watched_child_exits(tmp_path: Path) -> None:
    ch = _children(tmp_path)
    ch.spawn("sleeper", "sleeper", None, ["sleep", str(SLOW_CHILD_S)], "sleep")
    ch.spawn("dies", "dies", None, ["sh", "-c", "echo it broke; exit 3"], "sh")
    t0 = time.monotonic()
    try:
        with pytest.raises(procs.ProcessError, match="the process exited") as err:
            ch.wait_ready("both", lambda: False, SLOW_CHILD_S, of=["sleeper", "dies"])
        assert time.monotonic() - t0 < SLOW_CHILD_S / 2
        # The hint quotes the first watched process's log (the region's first worker).
        assert "sleeper.log" in str(err.value)
    finally:
        for p in load_state(tmp_path).procs:
            procs.terminate(p.pid, p.marker)
