"""Every API call as data: method, path, body, headers, how to read the answer, and whether it
may be retried with the same idempotency key. The sync and async clients only send these, so
they cannot drift apart and neither holds any money logic.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from ._models import (
    AgentInfo,
    Ap2Key,
    Ap2Payment,
    Budget,
    Canceled,
    Checkout,
    CreatedAgent,
    FetchResult,
    Hold,
    Receipt,
    ReceiptKey,
    Revoked,
    RotatedToken,
    Settlement,
    TaskOutcome,
    TaskToken,
    Voided,
)
from ._money import Money, to_micros

T = TypeVar("T")
Json = dict[str, Any]


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    body: Any = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None
    # A paying call whose repeat is the same purchase (same idempotency key, or the key the
    # daemon derives from the same request): retried when its outcome is unknown.
    retry: bool = False
    # The answer is JSON lines, not one JSON document.
    jsonl: bool = False


def segment(text: str) -> str:
    """One path segment (an agent handle, a task label, a hold id), percent-encoded."""
    return quote(text, safe="")


def new_idempotency_key() -> str:
    return f"sc-py-{uuid.uuid4().hex}"


def _key_header(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


def _params(**values: str | int | None) -> dict[str, str]:
    return {name: str(value) for name, value in values.items() if value is not None}


def _dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


# ---- admin ---------------------------------------------------------------------------------


def create_agent(
    handle: str,
    cap: Money,
    *,
    parent: str | None = None,
    ttl_secs: int | None = None,
    expires_at_ms: int | None = None,
    labels: Mapping[str, str] | None = None,
    controls: Mapping[str, Any] | None = None,
    task: str | None = None,
) -> Call[CreatedAgent]:
    body: Json = {"handle": handle, "cap_micros": to_micros(cap)}
    optional = {
        "parent": parent,
        "ttl_secs": ttl_secs,
        "expires_at_ms": expires_at_ms,
        "labels": dict(labels) if labels else None,
        "controls": dict(controls) if controls is not None else None,
        "task": task,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return Call("POST", "/v1/agents", CreatedAgent.from_json, body=body)


def list_agents() -> Call[list[AgentInfo]]:
    return Call("GET", "/v1/agents", lambda data: [AgentInfo.from_json(a) for a in data["agents"]])


def get_agent(agent: str) -> Call[AgentInfo]:
    return Call("GET", f"/v1/agents/{segment(agent)}", AgentInfo.from_json)


def set_cap(agent: str, cap: Money) -> Call[AgentInfo]:
    return Call("PUT", f"/v1/agents/{segment(agent)}/cap", AgentInfo.from_json, body={"cap_micros": to_micros(cap)})


def revoke(agent: str, reason: str) -> Call[Revoked]:
    return Call("POST", f"/v1/agents/{segment(agent)}/revoke", Revoked.from_json, body={"reason": reason})


def rotate_token(agent: str) -> Call[RotatedToken]:
    return Call("POST", f"/v1/agents/{segment(agent)}/rotate-token", RotatedToken.from_json)


def get_controls(agent: str) -> Call[Json]:
    return Call("GET", f"/v1/agents/{segment(agent)}/controls", _dict)


def set_controls(agent: str, controls: Mapping[str, Any]) -> Call[Json]:
    return Call("PUT", f"/v1/agents/{segment(agent)}/controls", _dict, body=dict(controls))


def reinstate(agent: str) -> Call[Json]:
    return Call("POST", f"/v1/agents/{segment(agent)}/reinstate", _dict)


def create_operator(name: str, role: str, *, tree: str | None = None) -> Call[Json]:
    body: Json = {"name": name, "role": role}
    if tree is not None:
        body["tree"] = tree
    return Call("POST", "/v1/operators", _dict, body=body)


def list_operators() -> Call[list[Json]]:
    return Call("GET", "/v1/operators", lambda data: [_dict(o) for o in data["operators"]])


def revoke_operator(name: str) -> Call[Json]:
    return Call("POST", f"/v1/operators/{segment(name)}/revoke", _dict)


def whoami() -> Call[Json]:
    return Call("GET", "/v1/whoami", _dict)


def record_outcome(task: str, outcome: str, task_type: str, *, agent: str | None = None) -> Call[TaskOutcome]:
    body: Json = {"outcome": outcome, "task_type": task_type}
    if agent is not None:
        body["agent"] = agent
    return Call("POST", f"/v1/tasks/{segment(task)}/outcome", TaskOutcome.from_json, body=body)


def report(*, agent: str | None = None, since_ms: int | None = None, until_ms: int | None = None) -> Call[Json]:
    return Call("GET", "/v1/reports", _dict, params=_params(agent=agent, since_ms=since_ms, until_ms=until_ms))


def spend(
    group_by: str,
    *,
    agent: str | None = None,
    task: str | None = None,
    service: str | None = None,
    protocol: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Call[list[Json]]:
    params = _params(
        group_by=group_by,
        agent=agent,
        task=task,
        service=service,
        protocol=protocol,
        since_ms=since_ms,
        until_ms=until_ms,
    )
    return Call("GET", "/v1/spend", lambda data: list(data["rows"]), params=params)


def log_params(
    format: str,
    *,
    agent: str | None = None,
    task: str | None = None,
    service: str | None = None,
    protocol: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> dict[str, str]:
    return _params(
        format=format,
        agent=agent,
        task=task,
        service=service,
        protocol=protocol,
        since_ms=since_ms,
        until_ms=until_ms,
    )


def receipts(agent: str) -> Call[list[Receipt]]:
    return Call(
        "GET",
        "/v1/receipts",
        lambda lines: [Receipt.from_json(line) for line in lines],
        params={"agent": agent},
        jsonl=True,
    )


def receipt_key() -> Call[ReceiptKey]:
    return Call("GET", "/v1/receipt-key", ReceiptKey.from_json)


def admin_ap2_key(agent: str) -> Call[Ap2Key]:
    return Call("GET", f"/v1/ap2/agents/{segment(agent)}/key", Ap2Key.from_json)


# ---- agent ---------------------------------------------------------------------------------


def me() -> Call[Budget]:
    return Call("GET", "/v1/me", Budget.from_json)


def own_approval(approval_id: str, wait_secs: int | None = None) -> Call[Json]:
    params = {"wait_secs": str(wait_secs)} if wait_secs is not None else None
    return Call("GET", f"/v1/me/approvals/{segment(approval_id)}", _json, params=params)


def own_approvals(state: str | None = None) -> Call[Json]:
    return Call("GET", "/v1/me/approvals", _json, params={"state": state} if state else None)


def approvals(state: str | None = None) -> Call[Json]:
    return Call("GET", "/v1/approvals", _json, params={"state": state} if state else None)


def decide_approval(approval_id: str, decision: str, note: str = "") -> Call[Json]:
    return Call("POST", f"/v1/approvals/{segment(approval_id)}/{decision}", _json, body={"note": note})


def _json(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def hold(
    amount: Money,
    *,
    service: str,
    task: str = "",
    ttl_secs: int | None = None,
    details: Mapping[str, str] | None = None,
    idempotency_key: str | None = None,
) -> Call[Hold]:
    body: Json = {"amount_micros": to_micros(amount), "service": service, "task": task}
    if ttl_secs is not None:
        body["ttl_secs"] = ttl_secs
    if details:
        body["details"] = dict(details)
    # Without a key the daemon has no way to tell a retry from a new hold, so one is made here.
    key = idempotency_key or new_idempotency_key()
    return Call("POST", "/v1/holds", Hold.from_json, body=body, headers=_key_header(key), retry=True)


def settle(hold_id: str, amount: Money, *, details: Mapping[str, str] | None = None) -> Call[Settlement]:
    body: Json = {"amount_micros": to_micros(amount)}
    if details:
        body["details"] = dict(details)
    # Settling a hold is idempotent by the hold id: a repeat answers the first settlement.
    return Call("POST", f"/v1/holds/{segment(hold_id)}/settle", Settlement.from_json, body=body, retry=True)


def void(hold_id: str, *, reason: str | None = None) -> Call[Voided]:
    body: Json = {} if reason is None else {"reason": reason}
    return Call("POST", f"/v1/holds/{segment(hold_id)}/void", Voided.from_json, body=body, retry=True)


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: str | bytes | None = None,
    json_body: Any = None,
    task: str = "",
    max_usd: Money | None = None,
    idempotency_key: str | None = None,
) -> Call[FetchResult]:
    request: Json = {"url": url, "method": method.upper(), "task": task}
    sent_headers = dict(headers or {})
    if json_body is not None:
        if body is not None:
            raise ValueError("give body or json_body, not both")
        body = json.dumps(json_body, separators=(",", ":"))
        sent_headers.setdefault("content-type", "application/json")
    if sent_headers:
        request["headers"] = sent_headers
    if isinstance(body, bytes):
        try:
            request["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            import base64

            request["body_base64"] = base64.b64encode(body).decode()
    elif body is not None:
        request["body"] = body
    if max_usd is not None:
        request["max_amount_micros"] = to_micros(max_usd)
    return Call(
        "POST",
        "/v1/x402/fetch",
        FetchResult.from_json,
        body=request,
        headers=_key_header(idempotency_key),
        retry=True,
    )


def checkout(
    merchant: str,
    checkout_session_id: str | None = None,
    *,
    items: Sequence[str | Mapping[str, Any]] | None = None,
    task: str = "",
    currency: str | None = None,
    buyer: Mapping[str, Any] | None = None,
    fulfillment_details: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> Call[Checkout]:
    if (checkout_session_id is None) == (items is None):
        raise ValueError("give checkout_session_id or items, not both")
    body: Json = {"merchant": merchant, "task": task}
    if checkout_session_id is not None:
        body["checkout_session_id"] = checkout_session_id
    if items is not None:
        body["items"] = [{"id": item} if isinstance(item, str) else dict(item) for item in items]
    optional = {
        "currency": currency,
        "buyer": dict(buyer) if buyer else None,
        "fulfillment_details": dict(fulfillment_details) if fulfillment_details else None,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return Call(
        "POST", "/v1/acp/checkouts", Checkout.from_json, body=body, headers=_key_header(idempotency_key), retry=True
    )


def cancel(checkout_session_id: str, *, merchant: str, hold_id: str | None = None) -> Call[Canceled]:
    body: Json = {"merchant": merchant}
    if hold_id is not None:
        body["hold_id"] = hold_id
    path = f"/v1/acp/checkouts/{segment(checkout_session_id)}/cancel"
    return Call("POST", path, Canceled.from_json, body=body, retry=True)


def ap2_key() -> Call[Ap2Key]:
    return Call("GET", "/v1/ap2/key", Ap2Key.from_json)


def register_mandates(open_checkout_mandate: str, open_payment_mandate: str) -> Call[Json]:
    body = {"open_checkout_mandate": open_checkout_mandate, "open_payment_mandate": open_payment_mandate}
    return Call("POST", "/v1/ap2/mandates", _dict, body=body)


def mandate(mandate_id: str) -> Call[Json]:
    return Call("GET", f"/v1/ap2/mandates/{segment(mandate_id)}", _dict)


def ap2_pay(
    checkout_jwt: str,
    *,
    open_checkout_mandate: str,
    open_payment_mandate: str,
    task: str = "",
    merchant: str | None = None,
    idempotency_key: str | None = None,
) -> Call[Ap2Payment]:
    body: Json = {
        "checkout_jwt": checkout_jwt,
        "open_checkout_mandate": open_checkout_mandate,
        "open_payment_mandate": open_payment_mandate,
        "task": task,
    }
    if merchant is not None:
        body["merchant"] = merchant
    return Call(
        "POST", "/v1/ap2/payments", Ap2Payment.from_json, body=body, headers=_key_header(idempotency_key), retry=True
    )


# ---- orchestrators: sub-agents and task tokens (agent token) --------------------------------


def create_sub_agent(
    handle: str,
    cap: Money,
    *,
    ttl_secs: int | None = None,
    expires_at_ms: int | None = None,
    labels: Mapping[str, str] | None = None,
    controls: Mapping[str, Any] | None = None,
    task: str | None = None,
) -> Call[CreatedAgent]:
    body: Json = {"handle": handle, "cap_micros": to_micros(cap)}
    optional = {
        "ttl_secs": ttl_secs,
        "expires_at_ms": expires_at_ms,
        "labels": dict(labels) if labels else None,
        "controls": dict(controls) if controls is not None else None,
        "task": task,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return Call("POST", "/v1/me/agents", CreatedAgent.from_json, body=body)


def sub_agents() -> Call[list[AgentInfo]]:
    return Call("GET", "/v1/me/agents", lambda data: [AgentInfo.from_json(a) for a in data["agents"]])


def revoke_sub_agent(agent: str, reason: str) -> Call[Revoked]:
    return Call("POST", f"/v1/me/agents/{segment(agent)}/revoke", Revoked.from_json, body={"reason": reason})


def task_token(task: str, ttl_secs: int, *, agent: str | None = None) -> Call[TaskToken]:
    body: Json = {"task": task, "ttl_secs": ttl_secs}
    if agent is not None:
        body["agent"] = agent
    return Call("POST", "/v1/me/tokens", TaskToken.from_json, body=body)


def revoke_task_token(token_id: str) -> Call[Json]:
    return Call("DELETE", f"/v1/me/tokens/{segment(token_id)}", _dict)
