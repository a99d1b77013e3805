"""router.errors.from_outcome: each domain outcome of the request paths (router.outcomes) is
the problem the contract names, with its detail and Retry-After kept."""

from __future__ import annotations

import pytest

from router import outcomes
from router.errors import ApiError, from_outcome


@pytest.mark.parametrize(
    ("out", "status", "code", "retry_after"),
    [
        (outcomes.NothingWritten("down", retry_after_s=3), 503, "region_unavailable", "3"),
        (outcomes.TenantOverloaded("busy", retry_after_s=2), 429, "rate_limited", "2"),
        (outcomes.UnknownOutcome("maybe"), 504, "outcome_unknown", None),
        (outcomes.Missing("no such account"), 404, "not_found", None),
        (outcomes.Refused("currencies differ", code="currency_mismatch"), 422,
         "currency_mismatch", None),
        (outcomes.Invalid("no shard there"), 422, "invalid_request", None),
    ],
)  # fmt: skip
def test_each_outcome_maps_to_its_problem(
    out: outcomes.RouteOutcome, status: int, code: str, retry_after: str | None
) -> None:
    err: ApiError = from_outcome(out)
    assert (err.status, err.code, err.detail) == (status, code, out.detail)
    assert err.headers().get("Retry-After") == retry_after
    assert err.body()["code"] == code


def test_a_nothing_written_defaults_to_one_second() -> None:
    assert from_outcome(outcomes.NothingWritten("x")).headers() == {"Retry-After": "1"}
