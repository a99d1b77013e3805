"""OpenTelemetry tracing: one tracer for the router, spans around request, store and cache.

The SDK provider is installed once per process by ``setup_tracing``; exporting is opt-in
(``OTEL_TRACES_EXPORTER=console`` prints spans) because a local cluster has no collector.
Span attributes never carry tokens, secrets or request bodies.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

TRACER_NAME = "txrouter.router"

_installed = False


def setup_tracing(region: str) -> None:
    global _installed
    if _installed:
        return
    provider = TracerProvider(
        resource=Resource.create({"service.name": "txrouter-router", "txr.region": region})
    )
    if os.environ.get("OTEL_TRACES_EXPORTER") == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _installed = True


def tracer() -> trace.Tracer:
    # The API's proxy tracer follows the provider installed later, so one module-level tracer
    # serves every span; get_tracer() per span was a measurable share of the hot path.
    return _TRACER


_TRACER = trace.get_tracer(TRACER_NAME)
