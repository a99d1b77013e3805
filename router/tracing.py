"""OpenTelemetry tracing: one tracer for the router, spans around request, store and cache.

The SDK provider is installed once per process by ``setup_tracing``; exporting is opt-in
(``OTEL_TRACES_EXPORTER=console`` prints spans) because a local cluster has no collector, and
while nothing exports, spans are sampled out (``OTEL_TRACES_SAMPLER`` overrides that).
Span attributes never carry tokens, secrets or request bodies.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Mapping
from contextlib import AbstractContextManager

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import SpanKind
from opentelemetry.util.types import AttributeValue

TRACER_NAME = "txrouter.router"

_installed = False
# True when spans go somewhere (an exporter, or a sampler chosen by the operator).
_recording = False
# Ids of unrecorded request spans: only log correlation uses them, as the SDK's own generator
# does (random.getrandbits), so no cryptographic source is needed.
_ids = random.Random()


def setup_tracing(region: str) -> None:
    global _installed, _recording
    if _installed:
        return
    exporting = os.environ.get("OTEL_TRACES_EXPORTER") == "console"
    _recording = exporting or "OTEL_TRACES_SAMPLER" in os.environ
    sampler: Sampler | None = None
    if not _recording:
        # Nothing would receive a recorded span: record none (see request_span).
        sampler = ALWAYS_OFF
    provider = TracerProvider(
        resource=Resource.create({"service.name": "txrouter-router", "txr.region": region}),
        sampler=sampler,
    )
    if exporting:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _installed = True


class _Unrecorded:
    """A request span nobody records: fresh ids made current for the request, so that its log
    lines carry a trace id, without the SDK's span machinery (sampler, attributes, timing):
    about 3 us instead of 50 us per request."""

    __slots__ = ("_token",)

    def __enter__(self) -> trace.Span:
        ctx = trace.SpanContext(
            _ids.getrandbits(128) or 1, _ids.getrandbits(64) or 1, is_remote=False
        )
        span = trace.NonRecordingSpan(ctx)
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(self, *_exc: object) -> None:
        otel_context.detach(self._token)


def tracing_enabled() -> bool:
    """True when request spans are recorded (something exports or samples them)."""
    return _recording


def request_span(
    name: str, attributes: Mapping[str, AttributeValue]
) -> AbstractContextManager[trace.Span]:
    """The span of one HTTP request (the root of its trace in this router)."""
    if _recording:
        return _TRACER.start_as_current_span(name, kind=SpanKind.SERVER, attributes=attributes)
    return _Unrecorded()


def child_span(
    name: str, attributes: Mapping[str, AttributeValue] | None = None
) -> AbstractContextManager[object]:
    """A span under the current one, or nothing when the current one is not recorded.

    A sampled-out request would only pay for a child span it drops (ids, sampler call, context
    switch); the request's own span is enough to put its trace id on its log lines.
    """
    if not trace.get_current_span().is_recording():
        return contextlib.nullcontext()
    return _TRACER.start_as_current_span(name, attributes=attributes)


def tracer() -> trace.Tracer:
    # The API's proxy tracer follows the provider installed later, so one module-level tracer
    # serves every span; get_tracer() per span was a measurable share of the hot path.
    return _TRACER


_TRACER = trace.get_tracer(TRACER_NAME)
