"""txclient's pure policy, with a fake clock: full-jitter backoff, the retry budget, Retry-After,
region choice (RTT, pinning, failover and drift back), and the session token merge, which must
agree with how the server reads and writes tokens (consistency/tokens.py)."""

from __future__ import annotations

import ast
import random
import sys
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consistency import limits as server_limits
from consistency import tokens as server_tokens
from txclient import errors, limits, session
from txclient.regions import RegionSelector
from txclient.retry import Backoff, RetryBudget, parse_retry_after, verdict_for_status


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling() -> None:
    b = Backoff(base_s=0.05, cap_s=2.0, rng=random.Random(7))
    assert [b.ceiling_s(n) for n in range(8)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.ceiling_s(10_000) == 2.0, "the exponent is bounded: no overflow, still the cap"
    for n in range(8):
        samples = [b.delay_s(n) for _ in range(2000)]
        assert all(0.0 <= s <= b.ceiling_s(n) for s in samples)
        # Full jitter: spread over the whole range, not clustered at the ceiling.
        assert min(samples) < 0.1 * b.ceiling_s(n)
        assert max(samples) > 0.9 * b.ceiling_s(n)
        mean = sum(samples) / len(samples)
        assert 0.4 * b.ceiling_s(n) < mean < 0.6 * b.ceiling_s(n)


def test_backoff_waits_at_least_what_retry_after_asks() -> None:
    b = Backoff(base_s=0.05, cap_s=2.0, rng=random.Random(1))
    assert all(b.delay_s(0, retry_after_s=1.0) == 1.0 for _ in range(100))
    assert all(b.delay_s(3, retry_after_s=0.0) <= 0.4 for _ in range(100))


def test_retry_after_parses_seconds_and_http_dates_bounded() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("100000") == limits.RETRY_AFTER_S_MAX
    now = datetime(2026, 12, 1, 8, 0, 0, tzinfo=UTC)
    later = format_datetime(datetime(2026, 12, 1, 8, 0, 3, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(later, now_wall=now.timestamp()) == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("status", "retry", "unknown", "move"),
    [
        (429, True, False, False),
        (503, True, False, True),
        (504, True, True, False),
        (502, True, True, False),
        (400, False, False, False),
        (409, False, False, False),
        (422, False, False, False),
    ],
)
def test_what_each_status_means(status: int, retry: bool, unknown: bool, move: bool) -> None:
    v = verdict_for_status(status, None)
    assert (v.retry, v.unknown, v.move) == (retry, unknown, move)


# -- retry budget -----------------------------------------------------------------------------


def test_budget_allows_a_burst_then_only_the_refill_rate() -> None:
    clock = FakeClock()
    b = RetryBudget(tokens_max=5, refill_per_s=2, success_credit=0, clock=clock)
    assert [b.try_spend() for _ in range(7)] == [True] * 5 + [False] * 2
    # Steps that are exact in binary floating point, so the count is exact too.
    clock.advance(0.375)  # 0.75 tokens: still not one
    assert not b.try_spend()
    clock.advance(0.125)
    assert b.try_spend()
    assert not b.try_spend()
    # A storm of retries over 10 s gets the refill and no more.
    granted = 0
    for _ in range(640):
        clock.advance(1 / 64)
        granted += b.try_spend()
    assert granted == 20
    clock.advance(3600)
    assert b.tokens == 5, "capped at the bucket size"


def test_budget_is_refunded_by_successes() -> None:
    clock = FakeClock()
    b = RetryBudget(tokens_max=10, refill_per_s=0, success_credit=0.2, clock=clock)
    while b.try_spend():
        pass
    assert b.tokens < 1
    for _ in range(5):
        b.on_success()
    assert b.try_spend(), "five successes buy one retry"
    assert not b.try_spend()
    for _ in range(1000):
        b.on_success()
    assert b.tokens == 10


# -- regions ----------------------------------------------------------------------------------

ENDPOINTS = {"us-east": "http://u", "eu-west": "http://e/", "ap-south": "http://a"}


def test_the_lowest_rtt_wins_and_follows_the_ewma() -> None:
    clock = FakeClock()
    s = RegionSelector(ENDPOINTS, clock=clock, alpha=0.5)
    assert s.best() == "us-east", "unmeasured: the order the caller gave"
    assert s.url("eu-west") == "http://e"
    s.observe_rtt("us-east", 0.090)
    s.observe_rtt("eu-west", 0.030)
    s.observe_rtt("ap-south", 0.060)
    assert s.ranked() == ["eu-west", "ap-south", "us-east"]
    # One slow probe moves the average half way, not to the sample.
    s.observe_rtt("eu-west", 0.110)
    assert s.rtt_s("eu-west") == pytest.approx(0.070)
    assert s.best() == "ap-south"


def test_a_failed_region_is_skipped_then_drifted_back_to() -> None:
    clock = FakeClock()
    s = RegionSelector(ENDPOINTS, prefer="eu-west", clock=clock, down_s=3.0)
    s.observe_rtt("us-east", 0.01)
    assert s.best() == "eu-west", "pinned beats a lower RTT"
    s.mark_down("eu-west")
    assert s.best() == "us-east"
    assert s.ranked()[-1] == "eu-west"
    clock.advance(2.0)
    s.probe_failed("eu-west")  # still dead: the background probe keeps it down
    clock.advance(2.0)
    assert s.best() == "us-east"
    clock.advance(1.1)
    assert s.best() == "eu-west", "back to the pinned region once it stops failing"


def test_every_region_down_picks_the_one_back_soonest() -> None:
    clock = FakeClock()
    s = RegionSelector(ENDPOINTS, clock=clock, down_s=3.0)
    for r in ("ap-south", "us-east", "eu-west"):
        s.mark_down(r)
        clock.advance(0.5)
    assert s.best() == "ap-south"


def test_selector_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="endpoints"):
        RegionSelector({})
    with pytest.raises(ValueError, match="prefer"):
        RegionSelector(ENDPOINTS, prefer="mars")


# -- session tokens agree with the server ------------------------------------------------------

pairs_st = st.dictionaries(st.integers(0, 2**62), st.integers(0, 10**9), max_size=40)


def test_client_bounds_mirror_the_server() -> None:
    assert limits.TOKEN_ACCOUNTS_MAX == server_limits.TOKEN_ACCOUNTS_MAX
    assert limits.TOKEN_LEN_MAX == server_tokens.TOKEN_LEN_MAX


@given(pairs_st, pairs_st)
def test_merge_agrees_with_the_server(held: dict[int, int], newest: dict[int, int]) -> None:
    """The client holding ``held`` merges an answer carrying ``newest``: the token it sends next
    is what the server would have written had the request carried ``held`` (the server's merge),
    the server can read it, and it never goes backwards for any account it keeps."""
    held = dict(list(held.items())[: server_limits.TOKEN_ACCOUNTS_MAX])
    newest = dict(list(newest.items())[: server_limits.TOKEN_ACCOUNTS_MAX])
    s = session.Session(server_tokens.encode(held, []) if held else None)
    s.observe(server_tokens.encode({}, newest.items()))
    server_view = server_tokens.decode(server_tokens.encode(held, newest.items()))
    sent = server_tokens.decode(s.token)
    assert sent == server_view
    assert list(sent) == list(server_view), "same order: the same accounts drop off first"
    for acc, ver in sent.items():
        assert ver >= held.get(acc, 0)
        assert ver >= newest.get(acc, 0)


@given(st.lists(pairs_st, min_size=1, max_size=6))
def test_tokens_from_many_regions_merge_to_the_highest_version(
    answers: list[dict[int, int]],
) -> None:
    s = session.Session()
    for doc in answers:
        doc = dict(list(doc.items())[: server_limits.TOKEN_ACCOUNTS_MAX])
        s.observe(server_tokens.encode({}, doc.items()) if doc else None)
    sent = server_tokens.decode(s.token)
    assert len(sent) <= server_limits.TOKEN_ACCOUNTS_MAX
    last = dict(list(answers[-1].items())[: server_limits.TOKEN_ACCOUNTS_MAX])
    assert set(last) <= set(sent), "the newest answer's accounts are always kept"
    docs = [dict(list(d.items())[: server_limits.TOKEN_ACCOUNTS_MAX]) for d in answers]
    for acc, ver in sent.items():
        # The token holds at most TOKEN_ACCOUNTS_MAX accounts: an account pushed out by a full
        # answer and seen again later starts over from that later answer (hypothesis found
        # [{1: 52164}, <a full answer without 1>, {1: 1}] -> 1). So a version is never below
        # the newest answer's for that account, and never above any answer's.
        assert ver <= max(d.get(acc, 0) for d in docs)
        newest = next(d[acc] for d in reversed(docs) if acc in d)
        assert ver >= newest


def test_an_unreadable_token_is_sent_back_as_it_came() -> None:
    s = session.Session()
    s.observe(server_tokens.encode({}, [(5, 3)]))
    s.observe("bm90LWEtdG9rZW4")  # base64 of "not-a-token": from a server newer than us
    assert s.token == "bm90LWEtdG9rZW4"
    s.observe(server_tokens.encode({}, [(6, 1)]))
    assert server_tokens.decode(s.token) == {6: 1}


# -- errors -----------------------------------------------------------------------------------


def test_one_class_per_problem_code_of_the_openapi_document() -> None:
    import yaml

    doc = yaml.safe_load((Path("router") / "openapi.yaml").read_text())
    codes = doc["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
    for code in codes:
        cls = errors.BY_CODE[code]
        assert issubclass(cls, errors.TxError)
        assert cls.code_default == code
        err = errors.from_problem(
            {"code": code, "detail": "d"}, status=418, request_id="r", retry_after=1.0, region="x"
        )
        assert type(err) is cls
        assert (err.code, err.status, err.request_id, err.retry_after) == (code, 418, "r", 1.0)
    unknown = errors.from_problem(
        {"code": "new_code"}, status=422, request_id=None, retry_after=None, region=None
    )
    assert type(unknown) is errors.TxError
    assert unknown.code == "new_code"


# -- isolation --------------------------------------------------------------------------------


def test_txclient_imports_only_the_stdlib_httpx_and_optional_opentelemetry() -> None:
    """A user installs txclient alone: it must not import the server's packages (or anything
    its own pyproject does not declare)."""
    import txclient

    allowed = set(sys.stdlib_module_names) | {"httpx", "opentelemetry", "txclient"}
    root = Path(txclient.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
