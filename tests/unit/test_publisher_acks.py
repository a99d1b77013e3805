"""How ``JetStreamPublisher`` reads the stream's acknowledgements (its own reply inbox, one
future per wave): each answer kind lands on its publish, a publish never answered fails the wave
at the acknowledgement bound with the stored prefix, and nothing stays owed after a wave.

The server side (a real stream's acknowledgements, a refused message, duplicates, a server that
died) is tests/contracts/test_publisher.py's and tests/integration/test_events*.py's; here a
client object stands in for the connection so that one answer can be withheld."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from router.events import jetstream, stream
from tests.fixtures.events import account, account_created


class _Connection:
    """Answers each publish as ``answers`` says, in the order they were sent; None: never."""

    def __init__(self, answers: list[tuple[dict[str, str] | None, bytes] | None]) -> None:
        self.real = NATS()
        self.answers = answers
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.inbox: jetstream._AckInbox | None = None

    def new_inbox(self) -> str:
        return self.real.new_inbox()

    async def publish(
        self, subject: str, payload: bytes, *, reply: str, headers: dict[str, str]
    ) -> None:
        answer = self.answers[len(self.sent)]
        self.sent.append((subject, headers))
        assert self.inbox is not None
        if answer is not None:
            hdrs, data = answer
            await self.inbox._answer(Msg(self.real, subject=reply, data=data, headers=hdrs))


def _ack(seq: int, *, duplicate: bool = False) -> tuple[None, bytes]:
    body: dict[str, Any] = {"stream": stream.STREAM, "seq": seq}
    if duplicate:
        body["duplicate"] = True
    return None, orjson.dumps(body)


async def _wave(answers: list[tuple[dict[str, str] | None, bytes] | None]) -> Any:
    conn = _Connection(answers)
    inbox = jetstream._AckInbox(conn)  # type: ignore[arg-type]
    conn.inbox = inbox
    tenant = "acme"
    events = [account_created(tenant, account(n), 1) for n in range(len(answers))]
    acked = [False] * len(events)
    failure, dups = await jetstream.JetStreamPublisher([], name="t")._publish_wave(
        inbox, events, range(len(events)), acked
    )
    return failure, dups, acked, inbox, conn


async def test_every_answer_kind_lands_on_its_publish() -> None:
    failure, dups, acked, inbox, conn = await _wave([_ack(1), _ack(2, duplicate=True), _ack(3)])
    assert (failure, dups, acked, inbox.owed) == (None, 1, [True, True, True], 0)
    # Every publish names its stream and carries its id and tenant.
    assert all(h["Nats-Expected-Stream"] == stream.STREAM for _, h in conn.sent)
    assert all(
        h["Txr-Tenant"] == "acme" and h["Nats-Msg-Id"].startswith("evt_") for _, h in conn.sent
    )


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (({"Status": "503"}, b""), "no responders"),
        (
            (None, orjson.dumps({"error": {"code": 400, "description": "message size exceeds"}})),
            "message size exceeds",
        ),
        ((None, b"not json"), "not json"),
        ((None, orjson.dumps({"stream": "OTHER", "seq": 1})), "OTHER"),
        ((None, orjson.dumps([1, 2])), "refused"),
    ],
)
async def test_a_refusal_fails_the_wave_and_only_its_publish(
    answer: tuple[dict[str, str] | None, bytes], why: str
) -> None:
    failure, dups, acked, inbox, _ = await _wave([_ack(1), answer, _ack(2)])
    assert failure is not None
    assert why in failure
    assert (dups, acked, inbox.owed) == (0, [True, False, True], 0)


async def test_an_unanswered_publish_times_out_and_is_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jetstream, "PUBLISH_ACK_TIMEOUT_S", 0.2)
    failure, _, acked, inbox, _ = await _wave([_ack(1), None, _ack(2)])
    assert failure is not None
    assert "TimeoutError" in failure
    assert (acked, inbox.owed) == ([True, False, True], 0)
    # A late answer of a forgotten publish is ignored.
    await inbox._answer(Msg(NATS(), subject=inbox.prefix + "2", data=_ack(9)[1]))
    assert inbox.owed == 0


async def test_a_repeated_answer_never_counts_twice() -> None:
    wave = jetstream._Wave(2)
    wave.answer(0, jetstream._STORED)
    wave.answer(0, jetstream._DUPLICATE)
    assert (wave.owed, wave.outcomes, wave.done.done()) == (1, [jetstream._STORED, 0], False)
    wave.answer(1, jetstream._STORED)
    assert wave.done.done()
