"""JSON logs, one object per line, with the request id and trace id of the current request.

Nothing here logs headers or bodies: the Authorization header and DSNs never reach a log line.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)


class JsonFormatter(logging.Formatter):
    def __init__(self, region: str) -> None:
        super().__init__()
        self._region = region

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "region": self._region,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            doc["request_id"] = rid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            doc["trace_id"] = f"{ctx.trace_id:032x}"
        elif rid:
            # No span is made while nothing records them (router.tracing): the request's lines
            # still share one trace id, derived from its request id only when a line is written.
            doc["trace_id"] = hashlib.blake2b(rid.encode(), digest_size=16).hexdigest()
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(region: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(region))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log repeats what our middleware logs, with headers we do not control.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
