"""After a kill -9 the postmaster can stay a zombie for seconds (until init reaps it), and
PostgreSQL takes the zombie for a running server: pg_rewind's single-user recovery then refused
the data directory ("lock file postmaster.pid already exists"), which made `txr rejoin` after an
automatic failover fail intermittently. ``postgres.stop`` must leave such a directory startable,
and must never clear a lock file while a process of the server still runs in the directory.

The zombie here belongs to a parent that never reaps it (as init had not yet), so no wait of
ours can collect it: exactly the state the failing rejoin met.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from infra.local import postgres

# How long the forked child may take to exit on a loaded machine.
ZOMBIE_WAIT_S: Final = 10.0

# A parent that forks a child which exits at once, prints the child's pid and never reaps it.
_ZOMBIE_PARENT = (
    "import os, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os._exit(0)\n"
    "print(pid, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def zombie() -> Iterator[int]:
    parent = subprocess.Popen([sys.executable, "-c", _ZOMBIE_PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        # The parent may print before its child has run its exit (a loaded machine): wait,
        # bounded, until the child is the zombie the tests need.
        deadline = time.monotonic() + ZOMBIE_WAIT_S
        while _state(pid) != "Z":
            assert time.monotonic() < deadline, f"pid {pid} never became a zombie"
            time.sleep(0.01)
        yield pid
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def _lock(datadir: Path, pid: int) -> Path:
    lock = datadir / "postmaster.pid"
    lock.write_text(f"{pid}\n{datadir}\n")
    return lock


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


def test_a_zombie_postmaster_lock_is_cleared(
    tmp_path: Path, zombie: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "CRASHED_POSTMASTER_REAP_S", 0.2)
    assert _state(zombie) == "Z"
    lock = _lock(tmp_path, zombie)
    postgres.stop(tmp_path, "immediate")
    assert not lock.exists()


def test_a_lock_is_kept_while_a_backend_still_runs_there(
    tmp_path: Path, zombie: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orphaned backend keeps the data directory as its working directory (and the shared
    memory attached): clearing the lock file then would let a second server start over it."""
    monkeypatch.setattr(postgres, "CRASHED_POSTMASTER_REAP_S", 0.2)
    lock = _lock(tmp_path, zombie)
    backend = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        with pytest.raises(postgres.PostgresError, match="still run"):
            postgres.stop(tmp_path, "immediate")
        assert lock.exists()
    finally:
        backend.kill()
        backend.wait()


def test_a_reaped_postmaster_leaves_the_lock_to_postgresql(tmp_path: Path) -> None:
    """A pid that no longer exists: PostgreSQL itself overwrites such a stale lock file, and
    nothing waits."""
    done = subprocess.Popen(["true"])
    done.wait()
    lock = _lock(tmp_path, done.pid)
    postgres.stop(tmp_path, "immediate")
    assert lock.exists()
