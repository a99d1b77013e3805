"""The launcher's children: every process a starting cluster spawns, and the wait for each.

What this module owns: starting one named process of the cluster (its log at
``logs/<name>.log``, its pid, marker and argv recorded in ``cluster.json`` the moment it exists,
so ``txr local down`` and ``infra.local.control.restart`` find it), whether it still runs, and
the one bounded ready-poll every start-and-ready module waits with (``wait_ready``: a named
bound, an early failure quoting the log when the process exits). The service modules
(``wan_emulator``, ``etcd_server``, ``redis_server``, ``nats``, ``relays``, ``routers``,
``controllers``) build the command lines and the checks; the launcher (``cluster``) owns one
:class:`Children` per start-up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from infra.local import procs
from infra.local.state import Proc, State


class Children:
    """The processes one ``up`` started, by name, recorded in its state as they start."""

    def __init__(self, state: State, logs: Path, cwd: Path) -> None:
        self.state = state
        self.logs = logs
        self.cwd = cwd
        self._popen: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def spawn(
        self,
        name: str,
        kind: str,
        region: str | None,
        argv: Sequence[str],
        marker: str,
        *,
        python: bool = False,
    ) -> int:
        """Start ``argv`` as the cluster's process ``name`` and record it; ``python``: a Python
        child that imports this checkout (procs.python_env). Returns its pid."""
        log_path = self.log(name)
        p = procs.spawn(argv, log_path, env=procs.python_env() if python else None, cwd=self.cwd)
        self._popen[name] = p
        self.state.add_proc(
            Proc(
                name=name,
                kind=kind,
                region=region,
                pid=p.pid,
                marker=marker,
                log=log_path,
                argv=tuple(argv),
                python_env=python,
            )
        )
        return p.pid

    def alive(self, *names: str) -> Callable[[], bool]:
        """True while every one of ``names`` still runs."""
        popen = [self._popen[n] for n in names]
        return lambda: all(p.poll() is None for p in popen)

    def wait_ready(
        self,
        what: str,
        check: Callable[[], bool],
        timeout_s: float,
        *,
        of: Sequence[str],
    ) -> None:
        """Poll ``check`` until true, at most ``timeout_s``; fail at once, quoting the first
        process's log, when any of ``of`` exited."""
        procs.wait_until(what, check, timeout_s, alive=self.alive(*of), log_path=self.log(of[0]))
