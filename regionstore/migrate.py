"""Schema migrations: numbered SQL files applied in order, each in its own transaction.

Files are ``regionstore/migrations/NNNN_name.sql``. A migration is recorded in
``txr.schema_migrations`` in the same transaction that applies it, so a crash leaves either the
whole migration and its record or neither; applying again is a no-op. Migrations are forward
only: a released file is never edited, a fix is a new file.

Migration text may name the application role as ``__APP_ROLE__`` and the relays' role as
``__RELAY_ROLE__``; each is replaced by the quoted role name, so the roles' privileges (USAGE,
SELECT, EXECUTE, never UPDATE) live with the schema. The relay role is created (NOLOGIN) when
it does not exist yet, so a database migrated before it existed still migrates; the launcher
gives it its login.

Functions (issue 17): numbered migrations are for schema; a function lives once, in a file under
``regionstore/sql/functions/``, written as ``CREATE OR REPLACE``. Every migrate applies each file
whose rendered text differs from the checksum recorded in ``txr.function_files`` (after the
migrations, in file-name order, each in its own transaction with its record), so editing a file
is how a function changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg
from psycopg import sql

# The login role routers use. Defined here (not imported from infra: regionstore must not import
# it); the launcher creates the role under the same name.
APP_ROLE: Final = "txr_app"
# The relays' login role: a member of the application role, and the only one that may run the
# saga steps (sql/functions/saga.sql).
RELAY_ROLE: Final = "txr_relay"

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")
FUNCTIONS_DIR: Final = Path(__file__).parent / "sql" / "functions"
_FILE_RE: Final = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_ROLE_PLACEHOLDER: Final = "__APP_ROLE__"
_RELAY_PLACEHOLDER: Final = "__RELAY_ROLE__"

# Session advisory lock held while migrating, so two launchers never apply the same file twice.
_MIGRATE_LOCK_KEY: Final = 7478706500002

# A migration only creates objects in a fresh database or alters small tables; if it waits this
# long for a lock something is wrong, and failing beats blocking every writer behind it.
MIGRATION_LOCK_TIMEOUT_MS: Final = 10_000
CONNECT_TIMEOUT_S: Final = 10


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def available_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files, ascending by version; gaps or duplicates are a packaging bug."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = _FILE_RE.fullmatch(path.name)
        if not m:
            raise ValueError(f"migration file name not NNNN_name.sql: {path.name}")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [mig.version for mig in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migration versions must be 1..N without gaps: {versions}")
    return found


@dataclass(frozen=True, slots=True)
class Roles:
    app: str = APP_ROLE
    relay: str = RELAY_ROLE


def _render(text: str, conn: psycopg.Connection[object], roles: Roles) -> str:
    return text.replace(_ROLE_PLACEHOLDER, sql.Identifier(roles.app).as_string(conn)).replace(
        _RELAY_PLACEHOLDER, sql.Identifier(roles.relay).as_string(conn)
    )


def _ensure_role(conn: psycopg.Connection[object], role: str) -> None:
    # Roles are per cluster, not per database: the first database migrated creates it, and a
    # concurrent creator (another database of the cluster) is the only way this can race.
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))


def apply_migrations(
    admin_dsn: str,
    *,
    app_role: str = APP_ROLE,
    relay_role: str = RELAY_ROLE,
    migrations_dir: Path = MIGRATIONS_DIR,
    functions_dir: Path = FUNCTIONS_DIR,
) -> list[str]:
    """Apply the pending migrations; return their file names (empty when up to date).

    The directories are parameters so that a test can build a database the way an older
    release left it, then migrate it with this one."""
    applied: list[str] = []
    roles = Roles(app_role, relay_role)
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK_KEY,))
        try:
            with conn.transaction():
                _ensure_role(conn, relay_role)
                conn.execute("CREATE SCHEMA IF NOT EXISTS txr")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS txr.schema_migrations ("
                    " version int PRIMARY KEY,"
                    " name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
            for mig in available_migrations(migrations_dir):
                with conn.transaction():
                    conn.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(
                            sql.Literal(f"{MIGRATION_LOCK_TIMEOUT_MS}ms")
                        )
                    )
                    row = conn.execute(
                        "SELECT 1 FROM txr.schema_migrations WHERE version = %s", (mig.version,)
                    ).fetchone()
                    if row is not None:
                        continue
                    # No parameters: psycopg sends the file with the simple query protocol, which
                    # accepts many statements (and dollar-quoted function bodies).
                    conn.execute(_render(mig.path.read_text(), conn, roles).encode())
                    conn.execute(
                        "INSERT INTO txr.schema_migrations (version, name) VALUES (%s, %s)",
                        (mig.version, mig.name),
                    )
                applied.append(mig.path.name)
            applied.extend(_apply_functions(conn, roles, functions_dir))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK_KEY,))
    return applied


def function_files(directory: Path = FUNCTIONS_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


def _apply_functions(
    conn: psycopg.Connection[object], roles: Roles, directory: Path = FUNCTIONS_DIR
) -> list[str]:
    """Apply every function file whose rendered text changed since it was last applied."""
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS txr.function_files ("
            " name text PRIMARY KEY,"
            " sha256 text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    applied: list[str] = []
    for path in function_files(directory):
        text = _render(path.read_text(), conn, roles)
        digest = hashlib.sha256(text.encode()).hexdigest()
        with conn.transaction():
            conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{MIGRATION_LOCK_TIMEOUT_MS}ms")
                )
            )
            row = conn.execute(
                "SELECT sha256 FROM txr.function_files WHERE name = %s", (path.name,)
            ).fetchone()
            if row is not None and row == (digest,):
                continue
            conn.execute(text.encode())
            conn.execute(
                "INSERT INTO txr.function_files (name, sha256) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET sha256 = EXCLUDED.sha256, applied_at = now()",
                (path.name, digest),
            )
        applied.append(path.name)
    return applied
