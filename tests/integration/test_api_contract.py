"""The served OpenAPI document matches the code; metrics, headers and logs are as promised."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from infra.keys import KeyRing
from router.app import create_app
from router.config import RouterConfig
from tests.fixtures.api import Api, new_tenant

pytestmark = pytest.mark.integration

REGIONS = ("us-east", "eu-west", "ap-south")
# Scrapes until every worker of a region has answered (the kernel picks one per connection).
METRICS_SCRAPES_MAX = 20


def _validator(doc: dict[str, Any], name: str) -> Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"urn:openapi#/components/schemas/{name}"}, registry=registry
    )


async def test_openapi_lists_exactly_the_routes_the_app_serves(api: Api, tmp_path: Path) -> None:
    r = await api.call("GET", "us-east", "/openapi.json")
    assert r.status == 200
    doc = r.body
    assert doc["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    secret = tmp_path / "k"
    secret.write_text("00" * 32)
    ring = KeyRing(tmp_path / "jwt")
    ring.create()
    config = RouterConfig(
        region="x",
        host="127.0.0.1",
        port=1,
        etcd_endpoints=("http://127.0.0.1:1",),
        dial={},
        db_user="u",
        db_password_file=secret,
        db_name="d",
        redis_url="redis://127.0.0.1:1",
        jwks_file=ring.jwks_path,
    )
    app = create_app(config)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert served == documented


async def test_responses_match_the_documented_schemas(api: Api) -> None:
    doc = (await api.call("GET", "eu-west", "/openapi.json")).body
    tenant = new_tenant()
    src = await api.funded(tenant, "eu-west", 50)
    dst = await api.open_account(tenant, "us-east")
    dst_same = await api.open_account(tenant, "eu-west")
    created = await api.call(
        "POST",
        "ap-south",
        "/v1/accounts",
        tenant=tenant,
        json={"currency": "JPY", "metadata": {"k": "v"}},
    )
    _validator(doc, "Account").validate(created.body)
    assert created.body["home_region"] == "ap-south", "defaults to the router's region"
    posted = await api.transfer(tenant, "us-east", src, dst_same, 5)
    _validator(doc, "Transfer").validate(posted.body)
    _validator(doc, "Account").validate(await api.account(tenant, "ap-south", dst))
    entries = await api.call("GET", "us-east", f"/v1/accounts/{src}/entries", tenant=tenant)
    _validator(doc, "EntriesPage").validate(entries.body)
    problem = await api.transfer(tenant, "us-east", src, dst_same, 10**9)
    _validator(doc, "Problem").validate(problem.body)


Sample = tuple[str, frozenset[tuple[str, str]]]
OPENS = (
    "txr_http_requests_total",
    {"method": "POST", "region": "eu-west", "route": "/v1/accounts", "status": "201"},
)
STORE_CALLS = (
    "txr_store_call_duration_seconds_count",
    {"op": "create_account", "region": "eu-west"},
)


async def _scrape_every_worker(
    api: Api, admin: str, pids: set[str]
) -> dict[str, dict[Sample, float]]:
    """Each worker's samples, by pid: /metrics answers for the worker that took the connection
    (the kernel picks one), so scrape over fresh connections until every worker answered."""
    seen: dict[str, dict[Sample, float]] = {}
    for _ in range(METRICS_SCRAPES_MAX * len(pids)):
        r = await api.call_url("GET", admin + "/metrics", headers={"Connection": "close"})
        assert r.status == 200
        text = r.body.decode()
        for name in ("txr_http_request_duration_seconds_bucket", "txr_fence_rejections_total"):
            assert name in text
        samples: dict[Sample, float] = {}
        pid = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
                if sample.name == "txr_router_worker_info":
                    pid = sample.labels["pid"]
        assert pid in pids, (pid, pids)
        seen[pid] = samples
        if set(seen) == pids:
            return seen
    raise AssertionError(f"workers {sorted(pids - set(seen))} never answered a scrape")


def _total(by_worker: dict[str, dict[Sample, float]], which: tuple[str, dict[str, str]]) -> float:
    """The sum over workers of every sample named ``which[0]`` carrying its labels."""
    name, labels = which
    want = set(labels.items())
    return sum(
        value
        for samples in by_worker.values()
        for (n, got), value in samples.items()
        if n == name and want <= got
    )


async def test_metrics_count_requests_by_route_status_and_region(api: Api) -> None:
    region = api.cluster.refresh_status()["regions"]["eu-west"]
    # /metrics is on the admin port (router.adminsite), one registry per worker process.
    admin = region["router_admin"]
    pids = {str(p) for p in region["router_pids"]}
    before = await _scrape_every_worker(api, admin, pids)
    tenant = new_tenant()
    opened = 3
    for _ in range(opened):
        await api.open_account(tenant, "eu-west")
    after = await _scrape_every_worker(api, admin, pids)
    # The counters moved by what this test did (the suite's tests run one at a time, and
    # nothing else opens accounts in eu-west meanwhile).
    assert _total(after, OPENS) - _total(before, OPENS) == opened
    assert _total(after, STORE_CALLS) - _total(before, STORE_CALLS) >= opened


async def test_health_and_readiness_in_every_region(api: Api) -> None:
    for region in REGIONS:
        h = await api.call("GET", region, "/healthz")
        assert h.status == 200
        r = await api.call("GET", region, "/readyz")
        assert r.status == 200
        assert r.body["ready"] is True
        assert r.body["etcd_reachable"] is True


async def test_no_token_or_secret_reaches_a_log(api: Api) -> None:
    tenant = new_tenant()
    token = api.token(tenant)
    acc = await api.open_account(tenant, "us-east")
    await api.call("GET", "ap-south", f"/v1/accounts/{acc}", token=token)
    await api.call("GET", "ap-south", "/v1/accounts/acc_zzz", token=token + "x")
    secrets = [token, token.split(".")[2]]
    # Every private signing key, as the PEM body lines (base64) that would leak first.
    for pem in api.cluster.keys.dir.glob("*.pem"):
        secrets += [line for line in pem.read_text().splitlines() if "-----" not in line]
    secrets += [p.read_text().strip() for p in (api.cluster.dir / "secrets").glob("*password*")]
    logs = list((api.cluster.dir / "logs").glob("router-*.log"))
    assert logs, "router logs are written"
    # Refused requests are logged with their ids (a worker that served only successes may
    # have logged nothing: those log at DEBUG).
    every = "".join(path.read_text(errors="replace") for path in logs)
    assert '"request_id"' in every
    assert '"trace_id"' in every
    for path in logs:
        text = path.read_text(errors="replace")
        for s in secrets:
            assert s not in text, f"a secret leaked into {path.name}"
        assert "Bearer" not in text


async def test_admin_status_shows_lag_and_rtts_to_operators_only(api: Api) -> None:
    tenant = new_tenant()
    r = await api.call(
        "GET", "us-east", "/v1/admin/status", token=api.token(tenant, ("accounts:read",))
    )
    assert r.status == 403
    # A tenant token is never an operator's, whatever its scope claim says.
    kid, key = api.cluster.keys.signing_key()
    now = int(time.time())
    forged_scope = jwt.encode(
        {"sub": tenant, "scope": "admin", "iat": now, "exp": now + 60}
        | {"iss": "txr-local", "aud": "txrouter"},
        key,
        algorithm="EdDSA",
        headers={"kid": kid},
    )
    r = await api.call("GET", "us-east", "/v1/admin/status", token=forged_scope)
    assert r.status == 403, r.body
    admin = api.cluster.admin_token()
    # ... and an operator token cannot act for a tenant.
    r = await api.call("GET", "us-east", "/v1/accounts/acc_zzz", token=admin)
    assert r.status == 403, r.body
    r = await api.call("GET", "us-east", "/v1/admin/status", token=admin)
    assert r.status == 200, r.body
    assert r.body["region"] == "us-east"
    assert set(r.body["invalidation_lag"]) == {"us-east-1", "eu-west-1", "ap-south-1"}
    assert any(t.startswith("node:") for t in r.body["rtt"])
    assert any(t.startswith("router:") for t in r.body["rtt"])
