"""infra.local.procs.terminate_all: every process gets SIGTERM before any is waited for (so a
cluster's n processes of a kind stop in one grace period, not n), a process that ignores
SIGTERM is killed, and a pid that is already gone is no error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from infra.local import procs

# Each child notes when SIGTERM reached it, lingers this long (a server's graceful shutdown),
# then notes its exit. Long enough that a sequential stop could not fit the next child's SIGTERM
# before this one's exit even on a loaded machine.
LINGER_S: Final = 1.0
CHILDREN: Final = 3
READY_WAIT_S: Final = 20.0

_GRACEFUL = """
import signal, sys, time
out = sys.argv[1]
def on_term(*_):
    with open(out, "a") as f:
        f.write(f"term {time.time()}\\n")
    time.sleep(float(sys.argv[2]))
    with open(out, "a") as f:
        f.write(f"exit {time.time()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(out + ".ready", "w").close()
time.sleep(600)
"""

_STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(600)
"""


def _start(script: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", script, str(out), *extra], start_new_session=True)
    deadline = time.monotonic() + READY_WAIT_S
    while not Path(f"{out}.ready").exists():
        assert time.monotonic() < deadline, "the child installed its signal handler"
        time.sleep(0.02)
    return p


def test_all_get_sigterm_before_any_is_waited_for(tmp_path: Path) -> None:
    outs = [tmp_path / f"child{i}" for i in range(CHILDREN)]
    children = [_start(_GRACEFUL, out, str(LINGER_S)) for out in outs]
    try:
        procs.terminate_all([(p.pid, None) for p in children])
        assert not any(procs.is_alive(p.pid) for p in children)
    finally:
        for p in children:
            p.kill()
            p.wait()
    notes = [dict(line.split() for line in out.read_text().splitlines()) for out in outs]
    terms = [float(n["term"]) for n in notes]
    exits = [float(n["exit"]) for n in notes]
    # A stop one at a time would signal child k+1 only after child k had exited.
    assert max(terms) < min(exits), (terms, exits)


def test_one_that_ignores_sigterm_is_killed_and_a_gone_pid_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "TERM_GRACE_S", 0.5)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stubborn = _start(_STUBBORN, tmp_path / "stubborn")
    try:
        procs.terminate_all([(gone.pid, None), (stubborn.pid, None)])
        assert not procs.is_alive(stubborn.pid), "SIGKILL ended what SIGTERM did not"
    finally:
        stubborn.kill()
        stubborn.wait()
