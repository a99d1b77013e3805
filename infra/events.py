"""Operators' view of the ledger events: ``txr events tail`` and the events part of
``txr status`` (publisher and webhook figures from every relay's /metrics, the stream's state).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import orjson
from nats.js.api import ConsumerConfig, DeliverPolicy
from prometheus_client.parser import text_string_to_metric_families

from infra.local import cluster
from router.events import stream

SCRAPE_TIMEOUT_S: Final = 2.0
STATUS_NATS_TIMEOUT_S: Final = 3.0
# tail: how long one wait for the next message lasts before it checks for Ctrl-C / --count.
TAIL_WAIT_S: Final = 1.0

_SUMS: Final = {
    "txr_events_published_total": "published",
    "txr_events_duplicates_total": "duplicates",
    "txr_events_publish_failures_total": "publish_failures",
    "txr_events_queue_batches": "publisher_queue_batches",
    "txr_webhook_queue_depth": "webhook_queue_depth",
}


def _scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    out: dict[str, Any] = dict.fromkeys(_SUMS.values(), 0.0)
    out["webhook_deliveries"] = {}
    lag_sum = lag_count = ack_sum = ack_count = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if math.isnan(s.value):
                continue
            if s.name in _SUMS:
                out[_SUMS[s.name]] += s.value
            elif s.name == "txr_webhook_deliveries_total":
                k = s.labels.get("outcome", "?")
                out["webhook_deliveries"][k] = out["webhook_deliveries"].get(k, 0) + s.value
            elif s.name == "txr_webhook_delivery_lag_seconds_sum":
                lag_sum += s.value
            elif s.name == "txr_webhook_delivery_lag_seconds_count":
                lag_count += s.value
            elif s.name == "txr_events_commit_to_ack_seconds_sum":
                ack_sum += s.value
            elif s.name == "txr_events_commit_to_ack_seconds_count":
                ack_count += s.value
    out["webhook_lag_mean_s"] = lag_sum / lag_count if lag_count else None
    out["commit_to_ack_mean_s"] = ack_sum / ack_count if ack_count else None
    return out


async def _stream_state(url: str) -> dict[str, Any]:
    nc = await stream.connect([url], name="txr-status")
    try:
        js = nc.jetstream(timeout=STATUS_NATS_TIMEOUT_S)
        info = await js.stream_info(stream.STREAM)
        st = info.state
        leader = info.cluster.leader if info.cluster is not None else None
        return {
            "messages": st.messages,
            "last_seq": st.last_seq,
            "consumers": st.consumer_count,
            "leader": leader,
        }
    finally:
        await nc.close()


def events_status(cluster_dir: Path) -> dict[str, Any]:
    """Per region: the relay's publisher and webhook figures; and the stream's state."""
    desc = cluster.status(cluster_dir)
    regions: dict[str, Any] = {}
    nats_url = None
    for region, r in desc["regions"].items():
        nats_url = nats_url or (r.get("nats") if r.get("nats_pid") else None)
        url = r.get("relays_metrics")
        if not url:
            continue
        try:
            regions[region] = _scrape(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            regions[region] = {"error": type(exc).__name__}
    out: dict[str, Any] = {"regions": regions}
    if nats_url is None:
        out["stream"] = {"error": "no NATS server running"}
        return out
    try:
        out["stream"] = asyncio.run(
            asyncio.wait_for(_stream_state(nats_url), STATUS_NATS_TIMEOUT_S * 2)
        )
    except Exception as exc:  # noqa: BLE001 - status reports, it never fails on one part
        out["stream"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def format_events(ev: dict[str, Any]) -> list[str]:
    lines = ["", "events: stream " + _fmt_stream(ev.get("stream") or {})]
    for region, r in (ev.get("regions") or {}).items():
        if "error" in r:
            lines.append(f"  {region:10s} relay metrics unreachable ({r['error']})")
            continue
        d = r.get("webhook_deliveries") or {}
        ack = r.get("commit_to_ack_mean_s")
        lag = r.get("webhook_lag_mean_s")
        lines.append(
            f"  {region:10s} published {int(r['published'])} (dups {int(r['duplicates'])},"
            f" failures {int(r['publish_failures'])}, queued {int(r['publisher_queue_batches'])}"
            f" batches, commit->ack {'-' if ack is None else f'{ack * 1000:.0f} ms'});"
            f" webhooks ok {int(d.get('ok', 0))} failed {int(d.get('failed', 0))}"
            f" failing {int(d.get('failing_marked', 0))} depth {int(r['webhook_queue_depth'])}"
            f" lag {'-' if lag is None else f'{lag * 1000:.0f} ms'}"
        )
    return lines


def _fmt_stream(s: dict[str, Any]) -> str:
    if "error" in s:
        return f"unreachable ({s['error']})"
    return (
        f"{stream.STREAM} {s.get('messages')} events, last seq {s.get('last_seq')},"
        f" leader {s.get('leader')}, {s.get('consumers')} consumers"
    )


async def tail(
    url: str,
    *,
    tenant: str | None,
    from_start: bool,
    count: int | None,
    emit: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> int:
    """Print the stream's events (one JSON line each: seq, subject, event) as they arrive."""
    subject = stream.tenant_filter(tenant) if tenant else f"{stream.SUBJECT_PREFIX}.>"
    nc = await stream.connect([url], name="txr-events-tail")
    seen = 0
    try:
        js = nc.jetstream(timeout=stream.JS_API_TIMEOUT_S)
        sub = await js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
            ),
        )
        while count is None or seen < count:
            if stop is not None and stop.is_set():
                break
            try:
                msg = await sub.next_msg(timeout=TAIL_WAIT_S)
            except TimeoutError:
                continue
            except Exception as exc:
                if type(exc).__name__ == "TimeoutError":
                    continue
                raise
            line = {
                "seq": msg.metadata.sequence.stream,
                "subject": msg.subject,
                "event": orjson.loads(msg.data),
            }
            emit(orjson.dumps(line).decode())
            seen += 1
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    finally:
        await nc.close()
    return seen
