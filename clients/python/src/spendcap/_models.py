"""What the daemon answers, as typed, frozen dataclasses.

Amounts are `int` micro-USD fields (`*_micros`) exactly as on the wire, each with a `Decimal` USD
property of the same name without the suffix. `raw` keeps the whole answer for fields this
version of the client does not name.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any, TypeVar

from ._money import to_usd

T = TypeVar("T")
Json = dict[str, Any]


def _build(cls: type[T], data: Json, **overrides: Any) -> T:
    """`cls` from the answer's fields of the same names (absent ones are `None`), plus `raw`."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values = {name: data.get(name) for name in names if name != "raw"}
    values.update(overrides)
    if "raw" in names:
        values["raw"] = data
    return cls(**values)


def _receipt(value: Any) -> Receipt | None:
    return Receipt.from_json(value) if isinstance(value, dict) else None


@dataclass(frozen=True)
class Receipt:
    """spendcap's Ed25519-signed, hash-chained receipt of one settlement."""

    receipt: Json
    key_id: str
    signature: str

    @classmethod
    def from_json(cls, data: Json) -> Receipt:
        return cls(receipt=dict(data["receipt"]), key_id=str(data["key_id"]), signature=str(data["signature"]))

    def to_json(self) -> Json:
        return {"receipt": self.receipt, "key_id": self.key_id, "signature": self.signature}

    @property
    def seq(self) -> int:
        return int(self.receipt["seq"])

    @property
    def hold_id(self) -> str:
        return str(self.receipt["hold_id"])

    @property
    def amount_micros(self) -> int:
        return int(self.receipt["amount_micros"])

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)


@dataclass(frozen=True)
class AgentInfo:
    """An agent as the admin sees it."""

    id: str
    handle: str
    parent: str | None
    tree: str
    depth: int
    cap_micros: int
    spent_micros: int
    held_micros: int
    remaining_micros: int
    revoked: str | None
    revoked_at_ms: int | None
    expires_at_ms: int | None
    created_at_ms: int
    labels: dict[str, str]
    suspended: str | None
    suspended_at_ms: int | None
    task_of: str | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> AgentInfo:
        return _build(cls, data, labels=dict(data.get("labels") or {}))

    @property
    def cap(self) -> Decimal:
        return to_usd(self.cap_micros)

    @property
    def spent(self) -> Decimal:
        return to_usd(self.spent_micros)

    @property
    def held(self) -> Decimal:
        return to_usd(self.held_micros)

    @property
    def remaining(self) -> Decimal:
        return to_usd(self.remaining_micros)


@dataclass(frozen=True)
class CreatedAgent:
    """A new agent and its bearer token (shown once; the daemon keeps only its hash)."""

    agent: AgentInfo
    token: str = field(repr=False)

    @classmethod
    def from_json(cls, data: Json) -> CreatedAgent:
        return cls(agent=AgentInfo.from_json(data["agent"]), token=str(data["token"]))


@dataclass(frozen=True)
class Budget:
    """`GET /v1/me`: the agent's own cap, spend and holds; `available` counts every ancestor's cap."""

    agent_id: str
    cap_micros: int
    spent_micros: int
    held_micros: int
    remaining_micros: int
    available_micros: int
    revoked: str | None
    expires_at_ms: int | None
    suspended: str | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Budget:
        return _build(cls, data)

    @property
    def cap(self) -> Decimal:
        return to_usd(self.cap_micros)

    @property
    def spent(self) -> Decimal:
        return to_usd(self.spent_micros)

    @property
    def held(self) -> Decimal:
        return to_usd(self.held_micros)

    @property
    def remaining(self) -> Decimal:
        return to_usd(self.remaining_micros)

    @property
    def available(self) -> Decimal:
        return to_usd(self.available_micros)


@dataclass(frozen=True)
class Hold:
    """Money reserved against the cap until it is settled, voided or expires."""

    hold_id: str
    amount_micros: int
    expires_at_ms: int
    remaining_micros: int
    replayed: bool
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Hold:
        return _build(cls, data)

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)

    @property
    def remaining(self) -> Decimal:
        return to_usd(self.remaining_micros)


@dataclass(frozen=True)
class Settlement:
    """A settled hold: what was spent, what went back to the budget, and the signed receipt."""

    hold_id: str
    amount_micros: int
    released_micros: int
    replayed: bool
    receipt: Receipt | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Settlement:
        return _build(cls, data, receipt=_receipt(data.get("receipt")))

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)

    @property
    def released(self) -> Decimal:
        return to_usd(self.released_micros)


@dataclass(frozen=True)
class Voided:
    hold_id: str
    released_micros: int
    replayed: bool
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Voided:
        return _build(cls, data)

    @property
    def released(self) -> Decimal:
        return to_usd(self.released_micros)


@dataclass(frozen=True)
class X402Payment:
    """One x402 payment: `settled` (with a receipt) or `unconfirmed` (held until `valid_before`)."""

    status: str
    hold_id: str
    amount_micros: int
    network: str
    asset: str
    pay_to: str
    nonce: str
    valid_before: int
    transaction: str | None
    payer: str | None
    receipt: Receipt | None
    reason: str | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> X402Payment:
        return _build(cls, data, receipt=_receipt(data.get("receipt")))

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)


@dataclass(frozen=True)
class FetchResult:
    """The upstream's answer to a fetch (its own status, whatever it is) and what was paid for it."""

    status: int
    headers: dict[str, str]
    content: bytes
    payment: X402Payment | None
    replayed: bool
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> FetchResult:
        if isinstance(data.get("body_base64"), str):
            content = base64.b64decode(data["body_base64"])
        else:
            content = str(data.get("body") or "").encode()
        payment = data.get("payment")
        return _build(
            cls,
            data,
            headers=dict(data.get("headers") or {}),
            content=content,
            payment=X402Payment.from_json(payment) if isinstance(payment, dict) else None,
        )

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def paid_micros(self) -> int:
        return self.payment.amount_micros if self.payment else 0

    @property
    def paid(self) -> Decimal:
        return to_usd(self.paid_micros)


@dataclass(frozen=True)
class Checkout:
    """A completed ACP checkout: the merchant's order, the total in its minor units, what was spent."""

    status: str
    merchant: str
    checkout_session_id: str
    order: Json
    total: Json
    amount_micros: int
    hold_id: str
    replayed: bool
    receipt: Receipt | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Checkout:
        return _build(
            cls,
            data,
            order=dict(data.get("order") or {}),
            total=dict(data.get("total") or {}),
            receipt=_receipt(data.get("receipt")),
            replayed=bool(data.get("replayed")),
        )

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)


@dataclass(frozen=True)
class Canceled:
    status: str
    checkout_session_id: str
    hold_id: str | None
    released_micros: int
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Canceled:
        return _build(cls, data, released_micros=int(data.get("released_micros") or 0))

    @property
    def released(self) -> Decimal:
        return to_usd(self.released_micros)


@dataclass(frozen=True)
class Ap2Payment:
    """A settled AP2 payment, with the merchant's and Credential Provider's verified receipts."""

    status: str
    hold_id: str
    amount_micros: int
    service: str
    merchant_id: str
    checkout_id: str
    payment_mandate_id: str
    order_id: str | None
    payment_id: str | None
    replayed: bool
    receipt: Receipt | None
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Ap2Payment:
        return _build(cls, data, receipt=_receipt(data.get("receipt")), replayed=bool(data.get("replayed")))

    @property
    def amount(self) -> Decimal:
        return to_usd(self.amount_micros)


@dataclass(frozen=True)
class Ap2Key:
    """The agent's AP2 public key: what the user's trusted surface binds open mandates to (`cnf`)."""

    agent_id: str
    alg: str
    jwk: Json
    cnf: Json
    thumbprint: str
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Ap2Key:
        return _build(cls, data)


@dataclass(frozen=True)
class TaskOutcome:
    agent: str
    task: str
    task_type: str
    outcome: str
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> TaskOutcome:
        return _build(cls, data)


@dataclass(frozen=True)
class Revoked:
    agent_id: str
    reason: str
    revoked_at_ms: int
    already_revoked: bool
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> Revoked:
        return _build(cls, data)


@dataclass(frozen=True)
class RotatedToken:
    agent_id: str
    token: str = field(repr=False)

    @classmethod
    def from_json(cls, data: Json) -> RotatedToken:
        return cls(agent_id=str(data["agent_id"]), token=str(data["token"]))


@dataclass(frozen=True)
class ReceiptKey:
    """The daemon's receipt verification key (Ed25519, base64url)."""

    alg: str
    key_id: str
    public_key: str
    raw: Json = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Json) -> ReceiptKey:
        return _build(cls, data)


@dataclass(frozen=True)
class TaskToken:
    """A short-lived token of one agent for one task (shown once): its payments are that task's,
    and it is refused after `expires_at_ms` (the daemon's ledger clock) or once revoked."""

    token_id: str
    agent_id: str
    task: str
    expires_at_ms: int
    token: str = field(repr=False)

    @classmethod
    def from_json(cls, data: Json) -> TaskToken:
        return cls(
            token_id=str(data["token_id"]),
            agent_id=str(data["agent_id"]),
            task=str(data["task"]),
            expires_at_ms=int(data["expires_at_ms"]),
            token=str(data["token"]),
        )
