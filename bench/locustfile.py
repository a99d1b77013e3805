"""Locust: a realistic mix against a running cluster (not part of ``txr bench``).

Mix per user: 80% reads (mostly ``cached``, some ``strong``, some entry pages), same-shard
transfers, cross-region transfers (sagas) and the occasional new account. Locust is the optional
extra ``bench`` (``pip install -e '.[bench]'``); nothing else imports this file.

Run headless against a local cluster started with ``txr local up --detach``::

    .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host http://127.0.0.1:7400            # a router of the cluster
    # token: $TXR_TOKEN, else minted from the cluster directory $TXR_DIR (default .txr/local)
    # TXR_OPEN_KEYED=1: the opens send an Idempotency-Key

The opens of the users' start (ten back to back per user, six homed in other regions, while
Locust is still spawning users) are reported as ``POST /v1/accounts (user start)``, apart from
the steady mix's ``POST /v1/accounts``: lumped together, the start burst was most of the opens
and their median (issue 11).
"""

# Locust ships no type information for its gevent-based classes; the file is typed for readers
# and left out of mypy rather than littered with ignores.
# mypy: ignore-errors

from __future__ import annotations

import functools
import os
import random
import uuid
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from locust import HttpUser, between, task

TENANT: Final = "locust"
# accounts:overdraft: the funding account they open may go below zero (API.md).
SCOPES: Final = ("accounts:read", "accounts:write", "accounts:overdraft", "transfers:write")
TOKEN_TTL_S: Final = 3600
CURRENCY: Final = "EUR"
LOOPBACK: Final = "127.0.0.1"
# The local cluster's regions (infra.local.cluster.DEFAULT_REGIONS); $TXR_REGIONS overrides.
REGIONS: Final = tuple(os.environ.get("TXR_REGIONS", "us-east,eu-west,ap-south").split(","))
# Accounts each simulated user creates at start, per region: enough pairs for both transfer kinds.
ACCOUNTS_PER_REGION: Final = 3
# Every user's accounts may go this far below zero, so random transfers never run dry.
OVERDRAFT: Final = 10**12
AMOUNT_MAX: Final = 100
ENTRIES_PAGE: Final = 20
# Think time between a user's requests (seconds): users are people and services, not a loop.
WAIT_MIN_S: Final = 0.05
WAIT_MAX_S: Final = 0.5
# Locust's names: the opens of a user's start (a burst of ten per user, most of them homed in
# another region) apart from the steady mix's opens, so each median says what it measures.
OPEN: Final = "POST /v1/accounts"
SETUP_OPEN: Final = "POST /v1/accounts (user start)"
# TXR_OPEN_KEYED=1: every open sends an Idempotency-Key (the keyed path, router/opens.py).
OPEN_KEYED: Final = os.environ.get("TXR_OPEN_KEYED", "") == "1"


@functools.cache
def _token() -> str:
    # Once per process: the users share one token (no key file read and signature per user
    # while other users' requests are being timed; gevent runs them on one thread).
    env = os.environ.get("TXR_TOKEN")
    if env:
        return env
    # Imported only here: with $TXR_TOKEN set, Locust needs nothing of txrouter installed.
    from infra.local import cluster

    cluster_dir = Path(os.environ.get("TXR_DIR", str(cluster.DEFAULT_DIR)))
    return cluster.token(cluster_dir, TENANT, SCOPES, TOKEN_TTL_S)


class BankUser(HttpUser):
    wait_time = between(WAIT_MIN_S, WAIT_MAX_S)

    def on_start(self) -> None:
        if urlsplit(self.host).hostname != LOOPBACK:
            raise RuntimeError(f"load goes to {LOOPBACK} only, not {self.host}")
        self.client.headers["Authorization"] = f"Bearer {_token()}"
        self.local_ids: list[str] = []
        self.remote_ids: list[str] = []
        # The router's region, from its first answer: an account homed there is "local" (a
        # keyed open without home_region is homed by its key, anywhere).
        self.here: str | None = None
        first = self._create(None, SETUP_OPEN)
        if first is None:
            raise RuntimeError("cannot create accounts: check the token and the host")
        self._keep(first)
        for region in REGIONS:
            for _ in range(ACCOUNTS_PER_REGION):
                acct = self._create(region, SETUP_OPEN)
                if acct is not None:
                    self._keep(acct)

    def _keep(self, acct: dict[str, str]) -> None:
        ids = self.local_ids if acct["home_region"] == self.here else self.remote_ids
        ids.append(acct["id"])

    def _create(self, region: str | None, name: str = OPEN) -> dict[str, str] | None:
        body: dict[str, object] = {"currency": CURRENCY, "overdraft_limit": OVERDRAFT}
        if region is not None:
            body["home_region"] = region
        headers = {"Idempotency-Key": uuid.uuid4().hex} if OPEN_KEYED else {}
        with self.client.post(
            "/v1/accounts", json=body, headers=headers, name=name, catch_response=True
        ) as r:
            if r.status_code != 201:
                r.failure(f"{r.status_code}")
                return None
            if self.here is None:
                # "<region>/<source>" (API.md): the region of the router that answered.
                self.here = r.headers.get("X-Served-By", "").split("/")[0] or None
            return r.json()

    def _transfer(self, src: str, dst: str, name: str) -> None:
        body = {
            "source": src,
            "destination": dst,
            "amount": random.randint(1, AMOUNT_MAX),
            "currency": CURRENCY,
        }
        with self.client.post(
            "/v1/transfers",
            json=body,
            headers={"Idempotency-Key": uuid.uuid4().hex},
            name=name,
            catch_response=True,
        ) as r:
            if r.status_code != 201:
                r.failure(f"{r.status_code}")

    def _any_account(self) -> str | None:
        pool = self.local_ids + self.remote_ids
        return random.choice(pool) if pool else None

    @task(60)
    def read_cached(self) -> None:
        acct = self._any_account()
        if acct:
            self.client.get(f"/v1/accounts/{acct}?consistency=cached", name="GET account cached")

    @task(10)
    def read_strong(self) -> None:
        acct = self._any_account()
        if acct:
            self.client.get(f"/v1/accounts/{acct}?consistency=strong", name="GET account strong")

    @task(10)
    def read_entries(self) -> None:
        acct = self._any_account()
        if acct:
            self.client.get(f"/v1/accounts/{acct}/entries?limit={ENTRIES_PAGE}", name="GET entries")

    @task(12)
    def transfer_same_shard(self) -> None:
        if len(self.local_ids) >= 2:
            src, dst = random.sample(self.local_ids, 2)
            self._transfer(src, dst, "POST transfer same-shard")

    @task(5)
    def transfer_cross_region(self) -> None:
        if self.local_ids and self.remote_ids:
            self._transfer(
                random.choice(self.local_ids),
                random.choice(self.remote_ids),
                "POST transfer cross-region",
            )

    @task(3)
    def open_account(self) -> None:
        # Without a key: the router's own region. With one: the key's, which may be another.
        acct = self._create(None)
        if acct is not None:
            self._keep(acct)
