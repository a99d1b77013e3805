"""The history of a chaos run: every client operation with its invocation and completion.

As in Jepsen, an operation completes ``ok`` (it happened, the answer says so), ``fail`` (it
certainly did not happen: a refusal such as insufficient funds, or only "not started" answers
such as 503), or ``info`` (unknown: a timeout, a 504, a dropped connection; it may or may not
have happened and the checker must allow both). Times are seconds on the runner's monotonic
clock, relative to the start of the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

OpOutcome = Literal["ok", "fail", "info"]
ReadLevel = Literal["strong", "session", "cached"]


@dataclass
class TransferOp:
    process: int
    key: str
    source: str
    destination: str
    amount: int
    invoke_t: float
    complete_t: float = 0.0
    outcome: OpOutcome = "info"
    # Set when ok: the transfer's id and status in the acknowledgement.
    transfer_id: str | None = None
    status: str | None = None
    # Error code of the last answer (fail or info), or the client error.
    code: str | None = None
    attempts: int = 0
    via: list[str] = field(default_factory=list)
    # Account versions the acknowledgement's consistency token carries for the two accounts.
    versions: dict[str, int] = field(default_factory=dict)


@dataclass
class ReadOp:
    process: int
    account: str
    level: ReadLevel
    via: str
    invoke_t: float
    # The version of this account in the token the client sent (0: none).
    token_version: int = 0
    complete_t: float = 0.0
    outcome: OpOutcome = "info"
    version: int | None = None
    balance: int | None = None
    served_by: str | None = None
    code: str | None = None


@dataclass
class Account:
    id: str
    region: str
    shard: str
    overdraft_limit: int
    funding: bool = False


@dataclass
class History:
    """Everything the checker needs from the client side; appended to by the workload."""

    tenant: str = ""
    accounts: dict[str, Account] = field(default_factory=dict)
    transfers: list[TransferOp] = field(default_factory=list)
    reads: list[ReadOp] = field(default_factory=list)

    def ops(self) -> int:
        return len(self.transfers) + len(self.reads)

    def events(self) -> Iterator[dict[str, object]]:
        """Jepsen-style invoke/complete events in time order, for the run's history file."""
        out: list[tuple[float, int, dict[str, object]]] = []
        ops: list[TransferOp | ReadOp] = [*self.transfers, *self.reads]
        for i, op in enumerate(ops):
            kind = "transfer" if isinstance(op, TransferOp) else "read"
            body = asdict(op)
            out.append((op.invoke_t, 0, {"type": "invoke", "f": kind, "op": i, **body}))
            out.append((op.complete_t, 1, {"type": op.outcome, "f": kind, "op": i, **body}))
        for _t, _order, event in sorted(out, key=lambda e: (e[0], e[1])):
            yield event

    def save(self, path: Path) -> None:
        with path.open("w") as f:
            for event in self.events():
                f.write(json.dumps(event, sort_keys=True) + "\n")
