"""The local cluster's secrets directory: database passwords, the saga key and the JWT ring.

What this module owns: creating every secret of a new cluster under ``<dir>/secrets`` (mode
0700, files 0600), the paths the routers and relays read them from, reading the database
passwords back (operator commands, tests), and minting tokens with the cluster's key ring
(``txr token``, ``make run``'s dev token). Secrets are never logged.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infra.keys import KeyRing, KeyRingError
from infra.local import postgres
from infra.local.state import ClusterError
from router.auth import TENANT_SCOPES

SECRETS_DIR: Final = "secrets"
JWT_ISSUER: Final = "txr-local"
JWT_AUDIENCE: Final = "txrouter"
JWT_ADMIN_AUDIENCE: Final = "txrouter-admin"
# The dev token `make run` prints: every tenant scope (not admin), for a working day.
DEV_TOKEN_TTL_S: Final = 86400
# The JWT key ring (infra.keys) under the cluster's secrets directory.
JWT_RING_DIR: Final = "jwt"
# 32 hex chars = 128 random bits per database password.
PG_PASSWORD_BYTES: Final = 16
# The saga key (leg 2's HMAC, regionstore/sql/functions/saga.sql): 256 bits, as SHA-256's block
# needs at most.
SAGA_KEY_BYTES: Final = 32
# The files the routers and relays read each role's database password from.
APP_ROLE_FILE: Final = "db_app.password"
REPL_ROLE_FILE: Final = "db_repl.password"
RELAY_ROLE_FILE: Final = "db_relay.password"


def secrets_dir(cluster_dir: Path) -> Path:
    return cluster_dir.resolve() / SECRETS_DIR


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    path.chmod(0o600)


def create(cluster_dir: Path) -> postgres.Credentials:
    """Every secret of a new cluster: the JWT ring, the database passwords and the saga key."""
    d = secrets_dir(cluster_dir)
    d.mkdir(mode=0o700, exist_ok=True)
    d.chmod(0o700)
    KeyRing(d / JWT_RING_DIR).create()
    creds = postgres.Credentials(
        admin_password=secrets.token_hex(PG_PASSWORD_BYTES),
        app_password=secrets.token_hex(PG_PASSWORD_BYTES),
        repl_password=secrets.token_hex(PG_PASSWORD_BYTES),
        relay_password=secrets.token_hex(PG_PASSWORD_BYTES),
        saga_key=secrets.token_hex(SAGA_KEY_BYTES),
    )
    _write_secret(
        d / "pg.json",
        json.dumps(
            {
                "admin_role": postgres.ADMIN_ROLE,
                "admin_password": creds.admin_password,
                "app_role": postgres.APP_ROLE,
                "app_password": creds.app_password,
                "repl_role": postgres.REPL_ROLE,
                "repl_password": creds.repl_password,
                "relay_role": postgres.RELAY_ROLE,
                "relay_password": creds.relay_password,
            }
        ),
    )
    _write_secret(d / APP_ROLE_FILE, creds.app_password)
    # The relays' change feed decodes the commit log as the replication role.
    _write_secret(d / REPL_ROLE_FILE, creds.repl_password)
    _write_secret(d / RELAY_ROLE_FILE, creds.relay_password)
    return creds


def pg_passwords(cluster_dir: Path) -> dict[str, str]:
    data: dict[str, str] = json.loads((secrets_dir(cluster_dir) / "pg.json").read_text())
    return data


def key_ring(cluster_dir: Path) -> KeyRing:
    """The cluster's JWT key ring (``txr keys``); routers read its public ``jwks.json``."""
    return KeyRing(secrets_dir(cluster_dir) / JWT_RING_DIR)


def token(cluster_dir: Path, tenant: str, scopes: Sequence[str], ttl_s: int) -> str:
    """A tenant token (tenant scopes only; router.auth.TOKEN_TTL_S_MAX at most)."""
    try:
        return key_ring(cluster_dir).mint(
            tenant, list(scopes), ttl_s, issuer=JWT_ISSUER, audience=JWT_AUDIENCE
        )
    except KeyRingError as exc:
        raise ClusterError(str(exc)) from None


def admin_token(cluster_dir: Path, operator: str, ttl_s: int) -> str:
    """An operator token: scope ``admin`` in the admin audience (ADMIN_TOKEN_TTL_S_MAX at most)."""
    try:
        return key_ring(cluster_dir).mint(
            operator, [], ttl_s, issuer=JWT_ISSUER, audience=JWT_ADMIN_AUDIENCE, admin=True
        )
    except KeyRingError as exc:
        raise ClusterError(str(exc)) from None


def dev_token(cluster_dir: Path) -> str:
    return token(cluster_dir, "dev", sorted(TENANT_SCOPES), DEV_TOKEN_TTL_S)
