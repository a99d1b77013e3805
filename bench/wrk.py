"""wrk (C, Lua) as the load generator of saturation and batch figures.

A Python generator shares the two cores with the product and measures itself as much as the
router, so throughput figures come from ``wrk`` with ``bench/wrk/transfers.lua`` (a fresh
Idempotency-Key per transfer; single transfers or ``POST /v1/transfers/batch``). The script
prints ``acked=N`` last, the line ``/work/shared/tools/cpu_per_transfer.py`` reads, so the same
command serves by hand:

    python -m bench.wrk prepare --dir .txr/x --accounts 500 --out /tmp/acc   # prints the token
    wrk -t2 -c64 -d15s -s bench/wrk/transfers.lua URL -- /tmp/acc TOKEN nonce [batch]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

SCRIPT: Final = "transfers.lua"
# wrk runs at least this long past its duration before we call it hung (it stops by itself).
WRK_GRACE_S: Final = 30.0
THREADS: Final = 2
_LINE_RE: Final = re.compile(r"^(acked|failed)=(\d+)$", re.M)
_LAT_RE: Final = re.compile(r"^p50_ms=([0-9.]+) p99_ms=([0-9.]+)$", re.M)


@dataclass(frozen=True, slots=True)
class WrkResult:
    connections: int
    duration_s: float
    batch: int
    acked: int
    failed: int
    rate: float  # acknowledged transfers per second
    p50_ms: float  # per HTTP request (a whole batch for batch runs)
    p99_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def script_path() -> Path:
    return Path(str(resources.files("bench").joinpath("wrk", SCRIPT)))


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (make setup installs it: apt-get install wrk)")
    return found


def command(
    url: str,
    accounts_file: Path,
    token: str,
    *,
    connections: int,
    duration_s: float,
    batch: int = 0,
    threads: int = THREADS,
) -> list[str]:
    return [
        wrk_binary(),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(script_path()),
        url,
        "--",
        str(accounts_file),
        token,
        uuid.uuid4().hex[:12],
        str(batch),
    ]


def parse(out: str, *, connections: int, duration_s: float, batch: int) -> WrkResult:
    counts = {k: int(v) for k, v in _LINE_RE.findall(out)}
    lat = _LAT_RE.search(out)
    if "acked" not in counts or lat is None:
        raise RuntimeError(f"wrk printed no summary: {out[-500:]!r}")
    return WrkResult(
        connections=connections,
        duration_s=duration_s,
        batch=batch,
        acked=counts["acked"],
        failed=counts.get("failed", 0),
        rate=counts["acked"] / duration_s,
        p50_ms=float(lat.group(1)),
        p99_ms=float(lat.group(2)),
    )


def run(
    url: str,
    accounts_file: Path,
    token: str,
    *,
    connections: int,
    duration_s: float,
    batch: int = 0,
) -> WrkResult:
    cmd = command(
        url, accounts_file, token, connections=connections, duration_s=duration_s, batch=batch
    )
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + WRK_GRACE_S, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr[-500:]}")
    return parse(done.stdout, connections=connections, duration_s=duration_s, batch=batch)


def write_accounts(path: Path, accounts: Sequence[str]) -> Path:
    path.write_text("\n".join(accounts) + "\n")
    return path


async def _prepare(url: str, token: str, region: str, n: int) -> list[str]:
    from bench import suite  # the same creation and funding as the suite

    _mint, accounts = await suite.setup_accounts(url, token, region, n)
    return accounts


def main(argv: Sequence[str] | None = None) -> int:
    from infra.local import cluster

    p = argparse.ArgumentParser(prog="python -m bench.wrk")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="create and fund accounts; print the token")
    prep.add_argument("--dir", type=Path, required=True)
    prep.add_argument("--accounts", type=int, default=500)
    prep.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from bench import suite

    desc = cluster.status(args.dir)
    region = next(iter(desc["regions"]))
    url = desc["regions"][region]["router"]
    tok = cluster.token(args.dir, suite.TENANT, suite.SCOPES, suite.TOKEN_TTL_S)
    accounts = asyncio.run(_prepare(url, tok, region, args.accounts))
    write_accounts(args.out, accounts)
    print(tok)  # noqa: T201 - the command's output
    print(url)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
