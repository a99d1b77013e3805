"""CPU of one PostgreSQL server's processes by kind, over a load command (a bench helper).

    python scripts/pg_cpu_split.py --pid POSTMASTER_PID -- wrk ...

Prints seconds of CPU per process title group (client backends of txr_app, walsenders of the
relays' logical slots, the standby's physical walsender, background processes), so the
primary's share per transfer can be split between the write path and the change feed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from collections import Counter


def snapshot(ppid: int) -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    tck = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            if int(stat[1]) != ppid and int(d) != ppid:
                continue
            with open(f"/proc/{d}/cmdline") as f:
                title = f.read().replace("\0", " ").strip()
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (title, (int(stat[11]) + int(stat[12])) / tck)
    return out


def group(title: str) -> str:
    title = re.sub(r"\d+\.\d+\.\d+\.\d+\(\d+\)", "", title)
    title = re.sub(r" (idle|active|streaming|SELECT|idle in transaction).*$", "", title)
    return title[:60]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    before = snapshot(a.pid)
    done = subprocess.run(
        a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd, capture_output=True, text=True, check=False
    )
    after = snapshot(a.pid)
    acked = [int(x) for x in re.findall(r"acked=(\d+)", done.stdout)]
    n = acked[-1] if acked else 0
    by: Counter[str] = Counter()
    for pid, (title, t) in after.items():
        by[group(title)] += t - before.get(pid, (title, 0.0))[1]
    print(f"acked={n}")
    for g, t in by.most_common():
        if t > 0:
            print(f"{t:8.2f} s  {t / max(n, 1) * 1e6:8.0f} us/transfer  {g}")


if __name__ == "__main__":
    main()
