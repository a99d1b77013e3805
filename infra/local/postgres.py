"""PostgreSQL servers of the local cluster: init, start, stop, standbys and promotion.

PostgreSQL refuses to run as root, so when we are root every server command runs as the
unprivileged ``postgres`` user (``runuser``) and data directories belong to it. A non-root
developer runs them as themselves. Servers listen on TCP loopback only (no Unix socket), so
their paths never hit the 107-byte socket path limit and nothing touches the system's default
instance on port 5432.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from psycopg.conninfo import make_conninfo

from infra.local import procs

# initdb and pg_ctl on a loaded two-core machine take a few seconds; give them ample room.
PG_CTL_TIMEOUT_S: Final = 60
BASEBACKUP_TIMEOUT_S: Final = 180
UNPRIVILEGED_USER: Final = "postgres"
# A postmaster killed with SIGKILL stays a zombie until init reaps it (a few seconds here), and
# PostgreSQL's lock-file check (kill(pid, 0)) takes a zombie for a running postmaster: a restart
# or pg_rewind's single-user recovery then refuses the data directory. How long we wait for the
# reaping before we judge the lock file stale ourselves.
CRASHED_POSTMASTER_REAP_S: Final = 10.0

ADMIN_ROLE: Final = "txr_admin"
APP_ROLE: Final = "txr_app"
RELAY_ROLE: Final = "txr_relay"
REPL_ROLE: Final = "txr_repl"
# The cluster's database on every server (migrations, shard init, every DSN).
DB_NAME: Final = "txr"


class PostgresError(RuntimeError):
    """A PostgreSQL server command failed; the message carries its output."""


def bindir() -> Path:
    """The directory of the newest installed PostgreSQL server binaries."""
    env = os.environ.get("TXR_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise PostgresError("PostgreSQL server binaries not found: install postgresql (15 or newer)")


def running_as_root() -> bool:
    return os.geteuid() == 0


def _as_pg_user(args: list[str]) -> list[str]:
    if running_as_root():
        return ["runuser", "-u", UNPRIVILEGED_USER, "--", *args]
    return args


def _chown_to_pg_user(path: Path) -> None:
    if running_as_root():
        pw = pwd.getpwnam(UNPRIVILEGED_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def pg_owned_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) owned by the server user, who writes logs and data in it."""
    path.mkdir(parents=True, exist_ok=True)
    _chown_to_pg_user(path)
    path.chmod(0o700)
    return path


def _pg_user_can_use(path: Path) -> bool:
    if not running_as_root():
        return True
    res = subprocess.run(_as_pg_user(["test", "-w", str(path), "-a", "-x", str(path)]), check=False)
    return res.returncode == 0


def state_root(cluster_dir: Path) -> Path:
    """Where this cluster's PostgreSQL data directories live.

    Normally ``<cluster_dir>/pg``. As root, ``cluster_dir`` may sit below a directory the
    ``postgres`` user cannot enter (``/root`` is 0700): then the data goes to a per-cluster
    directory under ``/var/tmp`` that it can, and the cluster state records where.
    """
    inside = cluster_dir / "pg"
    inside.mkdir(parents=True, exist_ok=True)
    _chown_to_pg_user(inside)
    inside.chmod(0o700)
    if _pg_user_can_use(inside):
        return inside
    digest = hashlib.sha256(str(cluster_dir.resolve()).encode()).hexdigest()[:16]
    outside = Path("/var/tmp/txr-pg") / digest
    outside.parent.mkdir(parents=True, exist_ok=True)
    outside.parent.chmod(0o755)
    outside.mkdir(exist_ok=True)
    _chown_to_pg_user(outside)
    outside.chmod(0o700)
    return outside


def _run(args: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(
            _as_pg_user(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
            cwd="/",
        )
    except subprocess.TimeoutExpired as exc:
        raise PostgresError(f"{Path(args[0]).name} timed out after {timeout}s") from exc
    if res.returncode != 0:
        raise PostgresError(f"{Path(args[0]).name} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res.stdout


def _write_pg_file(path: Path, text: str, mode: int = 0o600) -> None:
    path.write_text(text)
    path.chmod(mode)
    _chown_to_pg_user(path)


def application_name(node_name: str) -> str:
    """A node name as PostgreSQL identifiers allow it (standby and slot names)."""
    return re.sub(r"[^a-z0-9_]", "_", node_name.lower())


@dataclass(frozen=True)
class Credentials:
    admin_password: str
    app_password: str
    repl_password: str
    # The relays' role (RELAY_ROLE); hex like the others.
    relay_password: str
    # The saga key every shard signs and checks leg 2 with (regionstore.admin.set_saga_identity):
    # hex, at least 32 bytes.
    saga_key: str


def write_passfile(root: Path, creds: Credentials) -> Path:
    """A libpq password file readable only by the server user (standbys use it)."""
    path = root / "pgpass"
    _write_pg_file(
        path,
        f"*:*:*:{REPL_ROLE}:{creds.repl_password}\n*:*:*:{ADMIN_ROLE}:{creds.admin_password}\n",
    )
    return path


def _common_conf(port: int) -> str:
    return "\n".join(
        [
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            "unix_socket_directories = ''",
            "max_connections = 200",
            "shared_buffers = '128MB'",
            "wal_level = logical",
            "wal_log_hints = on",
            # The change feed's failover step asks which accounts were committed after a point
            # in time (regionstore/sql/functions/changefeed.sql); commit times are WAL-logged,
            # so a promoted standby answers for its old primary's commits too.
            "track_commit_timestamp = on",
            # Loaded so that `txr bench` (and an operator) can count the database's work per
            # transfer; it tracks top-level statements until someone turns nested ones on.
            "shared_preload_libraries = 'pg_stat_statements'",
            "max_wal_senders = 16",
            "max_replication_slots = 16",
            # A dead region's slot must not fill the disk; past this the standby must rebuild.
            "max_slot_wal_keep_size = '2GB'",
            # pg_rewind reads the former primary's WAL back to the last checkpoint it shares
            # with the new primary. A former primary that kept running through an automatic
            # failover (cut off by a partition, or paused) checkpoints and recycles that WAL
            # (chaos partition: "could not find previous WAL record"); keep enough of it.
            "wal_keep_size = '256MB'",
            "hot_standby = on",
            "hot_standby_feedback = on",
            "synchronous_commit = on",
            # Report replay progress often, so lag figures and switchover waits are fresh.
            "wal_receiver_status_interval = '1s'",
            "wal_sender_timeout = '10s'",
            "wal_receiver_timeout = '10s'",
            # A standby whose stream broke (a partition, a failover) retries this often; the
            # 5 s default kept the primary's commits waiting up to 5 s after a heal (the chaos
            # suite's partition scenario measured 3.1 s to the first acknowledged write).
            "wal_retrieve_retry_interval = '1s'",
            "password_encryption = 'scram-sha-256'",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_min_messages = warning",
            "datestyle = 'iso, ymd'",
            "timezone = 'UTC'",
            "",
        ]
    )


_HBA: Final = (
    "# txrouter local cluster: loopback TCP only, passwords always.\n"
    f"host all all 127.0.0.1/32 scram-sha-256\n"
    f"host replication {REPL_ROLE} 127.0.0.1/32 scram-sha-256\n"
)


def init_primary(datadir: Path, port: int, creds: Credentials) -> None:
    """initdb a new primary.

    It starts without a synchronous standby: every commit would otherwise wait for a standby
    that cannot exist until this primary is up. The launcher names the standby (ALTER SYSTEM)
    once it streams, before any router is told about the shard.
    """
    datadir.parent.mkdir(parents=True, exist_ok=True)
    pwfile = datadir.parent / f".{datadir.name}.pw"
    _write_pg_file(pwfile, creds.admin_password + "\n")
    try:
        _run(
            [
                str(bindir() / "initdb"),
                "-D",
                str(datadir),
                "-U",
                ADMIN_ROLE,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--data-checksums",
                # NEW_FILES_NOT_SYNCED: see init_standby.
                "--no-sync",
            ],
            timeout=PG_CTL_TIMEOUT_S,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    _write_pg_file(datadir / "postgresql.auto.conf", _common_conf(port))
    _write_pg_file(datadir / "pg_hba.conf", _HBA)


def create_roles_sql(creds: Credentials) -> list[tuple[str, tuple[str, ...]]]:
    """Statements (run as the admin role) that create the app, relay and replication roles."""
    # CREATE ROLE cannot take bind parameters; the passwords are generated hex strings, which
    # we check here so that quoting can never be broken.
    for pw in (creds.app_password, creds.repl_password, creds.relay_password):
        assert re.fullmatch(r"[0-9a-f]{16,128}", pw), "generated passwords are hex"
    return [
        (f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{creds.app_password}'", ()),
        # The relays: the saga steps (leg 2, settle) and the app role's reads (migration 0006).
        (f"CREATE ROLE {RELAY_ROLE} LOGIN PASSWORD '{creds.relay_password}'", ()),
        (f"CREATE ROLE {REPL_ROLE} LOGIN REPLICATION PASSWORD '{creds.repl_password}'", ()),
        # The change feed decodes only what the synchronous standby has flushed
        # (regionstore/changefeed.py); pg_stat_replication shows that position only to
        # roles with pg_read_all_stats.
        (f"GRANT pg_read_all_stats TO {REPL_ROLE}", ()),
    ]


def init_standby(
    datadir: Path,
    port: int,
    *,
    primary_host: str,
    primary_port: int,
    passfile: Path,
    app_name: str,
) -> None:
    """Clone a standby from a running primary (reached at ``primary_host:primary_port``)."""
    env = dict(os.environ, PGPASSFILE=str(passfile))
    _run(
        [
            str(bindir() / "pg_basebackup"),
            "-h",
            primary_host,
            "-p",
            str(primary_port),
            "-U",
            REPL_ROLE,
            "-D",
            str(datadir),
            "-X",
            "stream",
            "-C",
            "-S",
            app_name,
            "--no-password",
            "-c",
            "fast",
            # NEW_FILES_NOT_SYNCED: a new server's files are not fsynced before it starts. The
            # faults a local cluster is built to survive are process kills, which keep the page
            # cache; only a host crash could lose those writes, and a local cluster (under /tmp
            # or a work directory) is rebuilt after one anyway. It saves seconds of I/O on every
            # start, and the test suite starts about twenty clusters.
            "--no-sync",
        ],
        timeout=BASEBACKUP_TIMEOUT_S,
        env=env,
    )
    configure_as_standby(
        datadir,
        port,
        primary_host=primary_host,
        primary_port=primary_port,
        passfile=passfile,
        app_name=app_name,
    )


def configure_as_standby(
    datadir: Path,
    port: int,
    *,
    primary_host: str,
    primary_port: int,
    passfile: Path,
    app_name: str,
) -> None:
    # make_conninfo quotes each value as libpq needs (a path with a space stays one value);
    # the server's config syntax then doubles any single quote inside the quoted setting.
    conninfo = make_conninfo(
        host=primary_host,
        port=primary_port,
        user=REPL_ROLE,
        passfile=str(passfile),
        application_name=app_name,
    ).replace("'", "''")
    conf = _common_conf(port) + (
        f"primary_conninfo = '{conninfo}'\nprimary_slot_name = '{app_name}'\n"
    )
    _write_pg_file(datadir / "postgresql.auto.conf", conf)
    _write_pg_file(datadir / "standby.signal", "")


def start(datadir: Path, logfile: Path) -> int:
    """Start the server and wait until it accepts connections; return the postmaster pid."""
    if not logfile.exists():
        logfile.touch()
    _chown_to_pg_user(logfile)
    _run(
        [
            str(bindir() / "pg_ctl"),
            "start",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-D",
            str(datadir),
            "-l",
            str(logfile),
        ],
        timeout=PG_CTL_TIMEOUT_S + 5,
    )
    return postmaster_pid(datadir)


def postmaster_pid(datadir: Path) -> int:
    pidfile = datadir / "postmaster.pid"
    deadline = time.monotonic() + 5
    while True:
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            if time.monotonic() > deadline:
                raise PostgresError(f"no postmaster.pid in {datadir}") from None
            time.sleep(0.05)


def stop(datadir: Path, mode: str = "fast") -> None:
    """Stop the server if it runs (``fast`` rolls back sessions; ``immediate`` is a crash)."""
    if not (datadir / "postmaster.pid").exists():
        return
    # A server killed with SIGKILL leaves its pid file behind, and pg_ctl stop then fails
    # ("could not send stop signal"): nothing runs, so there is nothing to stop.
    try:
        pid = postmaster_pid(datadir)
    except PostgresError:
        return
    if not procs.is_alive(pid, str(datadir)):
        _clear_after_crash(datadir, pid)
        return
    _run(
        [
            str(bindir() / "pg_ctl"),
            "stop",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-m",
            mode,
            "-D",
            str(datadir),
        ],
        timeout=PG_CTL_TIMEOUT_S + 5,
    )


def _clear_after_crash(datadir: Path, pid: int) -> None:
    """Leave ``datadir`` startable after its postmaster crashed: wait until the dead postmaster
    is reaped; if it is still a zombie after the bound, and no process runs in the directory
    (every backend has it as its working directory), its lock file is stale: remove it."""
    deadline = time.monotonic() + CRASHED_POSTMASTER_REAP_S
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            if _processes_in(datadir):
                raise PostgresError(f"processes of a crashed server still run in {datadir}")
            (datadir / "postmaster.pid").unlink(missing_ok=True)
            return
        time.sleep(procs.POLL_INTERVAL_S)


def _processes_in(datadir: Path) -> list[int]:
    """Pids whose working directory is ``datadir`` (a zombie has none)."""
    target = datadir.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cwd").resolve(strict=True) == target:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def promote(datadir: Path) -> None:
    _run(
        [
            str(bindir() / "pg_ctl"),
            "promote",
            "-w",
            "-t",
            str(PG_CTL_TIMEOUT_S),
            "-D",
            str(datadir),
        ],
        timeout=PG_CTL_TIMEOUT_S + 5,
    )


def dsn(host: str, port: int, role: str, password: str, dbname: str = "postgres") -> str:
    """A URL (the form API.md's status shows); each part percent-encoded, so a password with
    ``@`` or ``/`` can neither break it nor point it elsewhere."""
    role_q, password_q, db_q = (quote(x, safe="") for x in (role, password, dbname))
    return f"postgresql://{role_q}:{password_q}@{host}:{port}/{db_q}"


def redact(dsn_text: str) -> str:
    """A DSN fit for logs and status output: the password replaced."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn_text)
