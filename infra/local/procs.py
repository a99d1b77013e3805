"""Starting, probing and stopping the local cluster's processes (the primitives: no state file).

What this module owns: spawning a command in its own session with its log, the Python child's
environment, liveness by pid and marker, the port and HTTP probes, the bounded poll every
readiness wait uses (``wait_until``), and SIGTERM-then-SIGKILL stops.

Every process starts in its own session (``start_new_session``): a Ctrl-C in the terminal then
reaches only the launcher, which stops the cluster in a deliberate order, instead of hitting
every server at once. Before a pid is signalled its command line is checked against a marker
recorded at start, so a pid reused by an unrelated process after a crash is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

# How long a server gets to exit on SIGTERM before SIGKILL: enough for redis, etcd and the
# routers to close their sockets; more only slows `txr local down` when something is wedged.
TERM_GRACE_S: Final = 10.0
KILL_GRACE_S: Final = 5.0
POLL_INTERVAL_S: Final = 0.05
# A port probe: loopback answers in microseconds, so anything slower is "not listening".
CONNECT_PROBE_TIMEOUT_S: Final = 0.5
# One HTTP probe of a loopback health or monitor endpoint.
HTTP_PROBE_TIMEOUT_S: Final = 2.0


# Children this process started, by pid. Keeping the Popen objects lets us reap them through
# Popen (so it records their exit and does not warn that they "still run" when collected) and
# keeps them referenced while a detached cluster outlives the calls that started it.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ProcessError(RuntimeError):
    """A process could not be started, did not come up or did not go away."""


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        p = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=str(cwd) if cwd else None,
        )
    _CHILDREN[p.pid] = p
    return p


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child, so it does not linger as a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def is_alive(pid: int, marker: str | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, given a marker, its command line has it."""
    if pid <= 0:
        return False
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return marker is None or marker in cmdline(pid)


def _signal(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            # Our processes lead their own session and group; signalling the group also stops
            # helpers they forked (none today, but a wrapper script would have some).
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def wait_gone(pid: int, timeout_s: float, marker: str | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def terminate(pid: int, marker: str | None, *, group: bool = True) -> None:
    """SIGTERM, wait, SIGKILL, wait. Raises when the process still exists afterwards."""
    terminate_all([(pid, marker)], group=group)


def terminate_all(targets: Sequence[tuple[int, str | None]], *, group: bool = True) -> None:
    """``terminate`` for several processes at once: all get SIGTERM together and share one
    grace period, so stopping n processes takes the slowest one's shutdown, not the sum
    (three etcd members stopped one by one each wait for the others' leader elections).
    Raises, naming them, when any still exists after SIGKILL."""
    live = [(pid, marker) for pid, marker in targets if is_alive(pid, marker)]
    for pid, _ in live:
        _signal(pid, signal.SIGTERM, group=group)
    deadline = time.monotonic() + TERM_GRACE_S
    while live and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        live = [(pid, marker) for pid, marker in live if is_alive(pid, marker)]
    for pid, _ in live:
        _signal(pid, signal.SIGKILL, group=group)
    stuck = [pid for pid, marker in live if not wait_gone(pid, KILL_GRACE_S, marker)]
    if stuck:
        raise ProcessError(f"pids {stuck} survived SIGKILL")


def children_of(pid: int) -> list[int]:
    """``pid``'s direct children (from /proc), e.g. a postmaster's backends and walsenders."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def wait_all_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait until every pid in ``pids`` has exited, SIGKILL what is left at the bound; the
    pids that still exist after that (none, unless the kernel is stuck)."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if is_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        left = [p for p in left if is_alive(p)]
    for p in left:
        _signal(p, signal.SIGKILL, group=False)
    return [p for p in left if not wait_gone(p, KILL_GRACE_S)]


def python_env() -> dict[str, str]:
    """The environment of a Python child: it imports our packages from this checkout, whether
    or not the checkout is installed."""
    # infra/local/procs.py -> the checkout's root.
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def http_get(url: str) -> bytes | None:
    """The body of a loopback endpoint's 200 answer; None when it is not listening, answers
    anything else or takes longer than ``HTTP_PROBE_TIMEOUT_S``."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as resp:  # noqa: S310
            body: bytes = resp.read()
            return body if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def http_ok(url: str, expect: Callable[[bytes], bool] | None = None) -> bool:
    """``url`` answers 200 (with a body ``expect`` accepts, when given)."""
    body = http_get(url)
    return body is not None and (expect is None or expect(body))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_PROBE_TIMEOUT_S)
        return s.connect_ex((host, port)) == 0


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``port`` and we could bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR lets a port in TIME_WAIT (a cluster just stopped) count as free, as it
        # does for the servers that will bind it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout_s: float,
    *,
    alive: Callable[[], bool] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``check`` until true; fail early when ``alive`` says the process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        if alive is not None and not alive():
            raise ProcessError(f"{what}: the process exited{_log_hint(log_path)}")
        if time.monotonic() > deadline:
            raise ProcessError(f"{what}: not ready after {timeout_s:.0f}s{_log_hint(log_path)}")
        time.sleep(POLL_INTERVAL_S * 2)


def _log_hint(log_path: Path | None) -> str:
    if log_path is None:
        return ""
    tail = ""
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace")[-1500:]
    return f" (log {log_path}):\n{tail}" if tail else f" (log {log_path})"
