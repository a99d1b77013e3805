"""The PostgreSQL ceiling: pgbench through one shard primary with an equivalent transfer.

The equivalent transfer is a SQL function in its own schema ``bench`` (never touched by the
product): two UPDATEs of ``bench.accounts`` and one INSERT into ``bench.history``, one transfer per
transaction, committed under the primary's own settings (``synchronous_commit=on`` with a
synchronous standby), so every commit waits for the standby exactly like a router batch does.
pgbench runs as the ``postgres`` user when we are root (it refuses nothing as root, but the
launcher's convention is that PostgreSQL tools run unprivileged) with the admin password in the
environment, never on the command line.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import psycopg

from infra.local import postgres

# Rows in the bench accounts table. Many rows keep row-lock waits rare, as with the router's
# many pre-funded accounts; the ceiling is about commits, not about hot rows.
BENCH_ACCOUNTS: Final = 10_000
# Starting balance of each bench account: far above anything a run can move (1 per transfer).
BENCH_START_BALANCE: Final = 10**12
# Two cores: two pgbench threads; clients well above cores so that commits queue behind the
# synchronous standby's acknowledgement and PostgreSQL groups WAL flushes (its own batching).
PGBENCH_THREADS: Final = 2
# Client counts tried; the ceiling is the best of them (the optimum depends on the machine).
PGBENCH_CLIENTS_FULL: Final = (8, 32, 64)
PGBENCH_CLIENTS_QUICK: Final = (32,)
# pgbench must finish within its -T plus this much (connection set-up, final report).
PGBENCH_GRACE_S: Final = 30.0
# A run that completed no transaction (every client still connecting on a loaded machine) is
# repeated this many times, each twice as long.
PGBENCH_RETRIES_MAX: Final = 1
# Creating the schema and loading the rows; a generous bound for a loaded laptop.
SETUP_TIMEOUT_S: Final = 60.0

_SCHEMA_SQL: Final = """
DROP SCHEMA IF EXISTS bench CASCADE;
CREATE SCHEMA bench;
CREATE TABLE bench.accounts (id int PRIMARY KEY, balance bigint NOT NULL, version bigint NOT NULL);
CREATE TABLE bench.history (
    id bigserial PRIMARY KEY,
    source int NOT NULL,
    destination int NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION bench.transfer(p_source int, p_destination int, p_amount bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE bench.accounts SET balance = balance - p_amount, version = version + 1
     WHERE id = p_source;
    UPDATE bench.accounts SET balance = balance + p_amount, version = version + 1
     WHERE id = p_destination;
    INSERT INTO bench.history (source, destination, amount)
    VALUES (p_source, p_destination, p_amount);
END
$$;
"""

# One transfer per transaction (pgbench wraps each script run in its own implicit transaction).
_SCRIPT: Final = """\\set src random(1, :naccounts)
\\set dst random(1, :naccounts)
SELECT bench.transfer(:src, :dst, 1);
"""

_TPS_RE: Final = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LAT_RE: Final = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TX_RE: Final = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE: Final = re.compile(r"^number of failed transactions: (\d+)", re.M)


class CeilingError(RuntimeError):
    """pgbench or the bench schema set-up failed; the message carries pgbench's output."""


@dataclass(frozen=True, slots=True)
class PgbenchRun:
    clients: int
    threads: int
    duration_s: float
    tps: float
    transactions: int
    failed: int
    latency_avg_ms: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def setup_schema(admin_dsn: str, accounts: int = BENCH_ACCOUNTS) -> None:
    """(Re)create schema ``bench`` with ``accounts`` funded rows on the shard primary."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"SET statement_timeout = '{int(SETUP_TIMEOUT_S)}s'")
        conn.execute(_SCHEMA_SQL)
        conn.execute(
            "INSERT INTO bench.accounts (id, balance, version) "
            "SELECT g, %s, 1 FROM generate_series(1, %s) g",
            (BENCH_START_BALANCE, accounts),
        )
        conn.execute("ANALYZE bench.accounts")


def drop_schema(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("DROP SCHEMA IF EXISTS bench CASCADE")


def history_rows(admin_dsn: str) -> int:
    with psycopg.connect(admin_dsn, connect_timeout=10) as conn:
        row = conn.execute("SELECT count(*) FROM bench.history").fetchone()
    assert row is not None
    return int(row[0])


def replication_settings(admin_dsn: str) -> dict[str, Any]:
    """What makes a commit durable here, recorded so that the report shows both sides paid it."""
    with psycopg.connect(admin_dsn, connect_timeout=10) as conn:
        commit = conn.execute("SHOW synchronous_commit").fetchone()
        names = conn.execute("SHOW synchronous_standby_names").fetchone()
        states = conn.execute(
            "SELECT application_name, sync_state FROM pg_stat_replication ORDER BY 1"
        ).fetchall()
    assert commit is not None
    assert names is not None
    return {
        "synchronous_commit": commit[0],
        "synchronous_standby_names": names[0],
        "standbys": {str(a): str(b) for a, b in states},
    }


def _script_path(workdir: Path) -> Path:
    """The pgbench script, in a directory the unprivileged user can read."""
    d = workdir / "pgbench"
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    path = d / "transfer.sql"
    path.write_text(_SCRIPT)
    path.chmod(0o644)
    return path


def run_pgbench(
    admin_dsn: str,
    workdir: Path,
    *,
    clients: int,
    duration_s: float,
    threads: int = PGBENCH_THREADS,
    accounts: int = BENCH_ACCOUNTS,
) -> PgbenchRun:
    """One pgbench run of the transfer script against the primary named by ``admin_dsn``."""
    parts = urlsplit(admin_dsn)
    assert parts.hostname == "127.0.0.1", "benchmark traffic stays on loopback"
    script = _script_path(workdir)
    args = [
        str(postgres.bindir() / "pgbench"),
        "-n",  # no vacuum of pgbench's own tables: we do not use them
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(threads, clients)),
        "-T",
        str(max(1, round(duration_s))),
        "-D",
        f"naccounts={accounts}",
        "-f",
        str(script),
        "-h",
        parts.hostname,
        "-p",
        str(parts.port),
        "-U",
        parts.username or postgres.ADMIN_ROLE,
        (parts.path or "/txr").lstrip("/"),
    ]
    if postgres.running_as_root():
        args = ["runuser", "-u", postgres.UNPRIVILEGED_USER, "--", *args]
    # The password goes through the environment: argv is visible to every local user.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": parts.password or ""}
    try:
        res = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=duration_s + PGBENCH_GRACE_S,
            check=False,
            env=env,
            cwd="/",
        )
    except subprocess.TimeoutExpired as exc:
        raise CeilingError(
            f"pgbench did not finish within {duration_s + PGBENCH_GRACE_S}s"
        ) from exc
    out = res.stdout
    tps = _TPS_RE.search(out)
    if res.returncode != 0 or tps is None:
        raise CeilingError(f"pgbench failed ({res.returncode}): {(res.stderr or out)[-2000:]}")
    lat = _LAT_RE.search(out)
    tx = _TX_RE.search(out)
    failed = _FAILED_RE.search(out)
    return PgbenchRun(
        clients=clients,
        threads=min(threads, clients),
        duration_s=duration_s,
        tps=float(tps.group(1)),
        transactions=int(tx.group(1)) if tx else 0,
        failed=int(failed.group(1)) if failed else 0,
        latency_avg_ms=float(lat.group(1)) if lat else 0.0,
    )


def _run_with_retry(
    admin_dsn: str, workdir: Path, *, clients: int, duration_s: float
) -> PgbenchRun:
    """One run; on a machine so loaded that pgbench finished no transaction in its time
    (its clients still connecting), once more for twice as long (PGBENCH_RETRIES_MAX)."""
    for attempt in range(PGBENCH_RETRIES_MAX + 1):
        try:
            return run_pgbench(
                admin_dsn, workdir, clients=clients, duration_s=duration_s * 2**attempt
            )
        except CeilingError as exc:
            if attempt == PGBENCH_RETRIES_MAX or "actually processed: 0" not in str(exc):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def measure(
    admin_dsn: str, workdir: Path, *, clients: tuple[int, ...], duration_s: float
) -> dict[str, Any]:
    """The ceiling: the best of one pgbench run per client count, with every run reported."""
    setup_schema(admin_dsn)
    runs = [_run_with_retry(admin_dsn, workdir, clients=c, duration_s=duration_s) for c in clients]
    best = max(runs, key=lambda r: r.tps)
    return {
        "tps": best.tps,
        "best_clients": best.clients,
        "runs": [r.to_json() for r in runs],
        "history_rows": history_rows(admin_dsn),
        "replication": replication_settings(admin_dsn),
        "transaction": "bench.transfer: 2 UPDATE + 1 INSERT, one transfer per transaction",
    }
