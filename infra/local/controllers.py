"""The local cluster's failover controllers: one ``python -m infra.controller`` per region.

What this module owns: each controller's command line and its start. The launcher
(``infra.local.cluster``) starts them last: a controller must never see a cluster that is still
coming up as one that lost its primaries. They retry their own connections, so alive is ready.
The processes are recorded (kind ``controller``) and ``txr local down`` stops them first.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from infra.local.children import Children


def proc_name(region: str) -> str:
    return f"controller-{region}"


def spawn(children: Children, cluster_dir: Path, *, regions: Sequence[str]) -> None:
    for r in regions:
        argv = [sys.executable, "-m", "infra.controller", "--dir", str(cluster_dir), "--region", r]
        children.spawn(proc_name(r), "controller", r, argv, " ".join(argv[2:]), python=True)
