"""What the write and read paths answer besides a result: domain outcomes, no HTTP.

The paths (``router.writes``, ``router.reads``, ``router.saga_step``) raise these; the edge
middleware and the batch handler turn them into problem+json (``router.errors.from_outcome``),
so the status codes and the wording of the contract live in one place. Each says what is known
about the write: :class:`NothingWritten` surely did not happen, :class:`UnknownOutcome` may have.
"""

from __future__ import annotations


class RouteOutcome(Exception):
    """Root of the request paths' non-results; ``detail`` is the client-facing sentence."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NothingWritten(RouteOutcome):
    """The shard (or this region's view of it) cannot serve now; nothing was written. Retry
    after ``retry_after_s`` seconds (503)."""

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class TenantOverloaded(NothingWritten):
    """The tenant's own share of a shard's queue is full; nothing was written (429)."""


class UnknownOutcome(RouteOutcome):
    """A write that may or may not have happened (504, G7): the client retries with the same
    Idempotency-Key to learn which."""


class Missing(RouteOutcome):
    """No such account or transfer for this tenant (404; another tenant's is missing too)."""


class Refused(RouteOutcome):
    """A business refusal with its stable code (422), e.g. ``currency_mismatch``."""

    def __init__(self, detail: str, *, code: str) -> None:
        super().__init__(detail)
        self.code = code


class KeyReused(RouteOutcome):
    """An Idempotency-Key already used for a different request (409 idempotency_key_reused)."""


class Invalid(RouteOutcome):
    """A request the paths cannot carry out as asked (422 invalid_request)."""
