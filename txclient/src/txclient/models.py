"""Typed results: the API's JSON objects with their fields as attributes.

Each object also keeps ``raw`` (the JSON exactly as received, including fields this version
does not know) and ``meta`` (what the answer's headers said: the region that answered, who
served it, its request id and consistency token, whether it was a replay, how many attempts
it took).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from txclient.errors import UnexpectedResponse

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Meta:
    status: int
    region: str
    request_id: str | None = None
    served_by: str | None = None
    consistency_token: str | None = None
    replayed: bool = False
    attempts: int = 1
    # The region of each attempt, in order (the last one answered).
    regions: tuple[str, ...] = ()


_NO_META = Meta(status=0, region="")


def _field(doc: Mapping[str, Any], name: str, kind: type[_T], *, nullable: bool = False) -> _T:
    value = doc.get(name)
    if value is None and nullable:
        return value  # type: ignore[return-value]
    # bool is an int in Python; the API never sends a bool where it means a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UnexpectedResponse(f"field {name!r} is not a {kind.__name__}: {value!r}")
    return value


def _object(doc: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise UnexpectedResponse(f"{what} is not a JSON object")
    return doc


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    currency: str
    balance: int
    overdraft_limit: int
    home_region: str
    shard: str
    version: int
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    meta: Meta = field(default=_NO_META, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any, meta: Meta = _NO_META) -> Account:
        d = _object(doc, "account")
        metadata = d.get("metadata")
        return cls(
            id=_field(d, "id", str),
            currency=_field(d, "currency", str),
            balance=_field(d, "balance", int),
            overdraft_limit=_field(d, "overdraft_limit", int),
            home_region=_field(d, "home_region", str),
            shard=_field(d, "shard", str),
            version=_field(d, "version", int),
            created_at=_field(d, "created_at", str),
            metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
            raw=dict(d),
            meta=meta,
        )


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    source: str
    destination: str
    amount: int
    currency: str
    status: str  # settled | pending | reversed
    created_at: str
    reference: str | None = None
    # Set when status is reversed: the destination's refusal code.
    refusal_code: str | None = None
    # True when the router answered with the stored outcome of an earlier call with this key.
    replayed: bool = False
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    meta: Meta = field(default=_NO_META, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any, meta: Meta = _NO_META, *, replayed: bool = False) -> Transfer:
        d = _object(doc, "transfer")
        return cls(
            id=_field(d, "id", str),
            source=_field(d, "source", str),
            destination=_field(d, "destination", str),
            amount=_field(d, "amount", int),
            currency=_field(d, "currency", str),
            status=_field(d, "status", str),
            created_at=_field(d, "created_at", str),
            reference=_field(d, "reference", str, nullable=True),
            refusal_code=_field(d, "refusal_code", str, nullable=True),
            replayed=replayed,
            raw=dict(d),
            meta=meta,
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger entry: ``amount`` is negative for a debit, positive for a credit."""

    account: str
    counterparty: str
    seq: int
    transfer_id: str
    amount: int
    balance_after: int
    created_at: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> Entry:
        d = _object(doc, "entry")
        return cls(
            account=_field(d, "account", str),
            counterparty=_field(d, "counterparty", str),
            seq=_field(d, "seq", int),
            transfer_id=_field(d, "transfer_id", str),
            amount=_field(d, "amount", int),
            balance_after=_field(d, "balance_after", int),
            created_at=_field(d, "created_at", str),
            raw=dict(d),
        )


@dataclass(frozen=True, slots=True)
class EntriesPage:
    data: list[Entry]
    next_cursor: str | None

    @classmethod
    def from_json(cls, doc: Any) -> EntriesPage:
        d = _object(doc, "entries page")
        data = d.get("data")
        if not isinstance(data, list):
            raise UnexpectedResponse("field 'data' is not a list")
        return cls([Entry.from_json(e) for e in data], _field(d, "next_cursor", str, nullable=True))


@dataclass(frozen=True, slots=True)
class Event:
    """A ledger event: ``data`` is the account or transfer object as JSON."""

    id: str
    type: str
    created_at: str
    data: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> Event:
        d = _object(doc, "event")
        return cls(
            id=_field(d, "id", str),
            type=_field(d, "type", str),
            created_at=_field(d, "created_at", str),
            data=dict(_object(d.get("data"), "event data")),
            raw=dict(d),
        )


@dataclass(frozen=True, slots=True)
class EventsPage:
    data: list[Event]
    # Where the next read starts (always set: poll it for newer events).
    next_cursor: str
    has_more: bool

    @classmethod
    def from_json(cls, doc: Any) -> EventsPage:
        d = _object(doc, "events page")
        data = d.get("data")
        if not isinstance(data, list):
            raise UnexpectedResponse("field 'data' is not a list")
        return cls(
            [Event.from_json(e) for e in data],
            _field(d, "next_cursor", str),
            _field(d, "has_more", bool),
        )


@dataclass(frozen=True, slots=True)
class Webhook:
    id: str
    url: str
    events: tuple[str, ...]
    status: str  # active | failing
    created_at: str
    failing_since: str | None = None
    # Only in the answer to create_webhook: the signing secret is shown once.
    secret: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: Any) -> Webhook:
        d = _object(doc, "webhook")
        events = d.get("events")
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            raise UnexpectedResponse("field 'events' is not a list of strings")
        return cls(
            id=_field(d, "id", str),
            url=_field(d, "url", str),
            events=tuple(events),
            status=_field(d, "status", str),
            created_at=_field(d, "created_at", str),
            failing_since=_field(d, "failing_since", str, nullable=True),
            secret=_field(d, "secret", str, nullable=True),
            raw=dict(d),
        )
