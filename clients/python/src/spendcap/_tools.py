"""What the framework tools do, framework-free: each tool is a function of the agent client, the
model's arguments and the tool-call id, returning a small JSON-able result for the model.

A refusal is a result, not an exception: `{"ok": false, "code": "cap_exceeded", "remaining_usd":
"0.03", ..., "instruction": "Stop spending: ..."}`, so the model reads why and stops. The
idempotency key of every paying call is derived from the tool-call id, so a re-executed call
(a retried step, a resumed run) is the same purchase and never pays twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import (
    ApprovalRequired,
    BudgetRefused,
    OutcomeUnknown,
    PaymentRefused,
    ProviderDeclined,
    SpendcapError,
)
from ._models import Ap2Payment, Budget, Checkout, FetchResult
from ._money import Micros, Money, format_usd, to_micros
from ._sync import Agent

MAX_BODY_CHARS = 4000

STOP = (
    "Stop spending: spendcap refused this payment and nothing was paid. Do not retry it or try another "
    "paid call to get around the limit; finish with what you have or report that the budget is exhausted."
)
DECLINED = "The provider declined this payment; nothing was spent. Do not retry the same purchase unchanged."
UNKNOWN = (
    "The payment's outcome is unknown and its money stays held. Do not pay again for this; retrying this "
    "same tool call resumes the same purchase."
)

APPROVAL = (
    "This payment waits for a person's approval; its money is held for it and nothing was sent. Tell the "
    "user it needs approval (approval_id, reason). Do not pay for it another way meanwhile."
)

FETCH_DESCRIPTION = (
    "Fetch a URL over HTTP, paying for it with x402 if the server asks for payment, within this agent's "
    "budget. Returns the HTTP status, the body (truncated) and what was paid in USD."
)
BUDGET_DESCRIPTION = "Show this agent's spending budget in USD: cap, spent, held and remaining."
CHECKOUT_DESCRIPTION = (
    "Buy items from a merchant through an ACP checkout (Stripe Agentic Commerce Protocol), paid with the "
    "owner's card within this agent's budget. Give the merchant name and the item ids."
)
AP2_DESCRIPTION = (
    "Pay a merchant-signed AP2 checkout (Google Agent Payments Protocol) within this agent's budget and "
    "the user's mandate. Give the checkout JWT exactly as the merchant sent it."
)
OUTCOME_DESCRIPTION = (
    "Record how a task ended, for cost reports: outcome is success, failed or abandoned; task_type names "
    "the kind of task (e.g. research)."
)


@dataclass(frozen=True)
class ToolConfig:
    """What the application fixes for every tool call of one agent."""

    agent: Agent
    task: str = ""
    max_usd_per_call: Money | None = None
    ap2_mandates: tuple[str, str] | None = None
    # A payment that needs a person's approval: the tool call waits up to this long for the
    # decision and, once approved, pays from the held reservation in the same call (0: answer
    # `approval_required` at once).
    approval_wait_secs: int = 30


def idempotency_key(tool_call_id: str, tool: str) -> str:
    """A stable key per tool call: the same call id is the same purchase."""
    text = f"tool:{tool}:{tool_call_id}"
    if len(text) <= 255 and all(33 <= ord(c) <= 126 for c in text):
        return text
    return f"tool:{tool}:sha256:{hashlib.sha256(tool_call_id.encode()).hexdigest()}"


def encode(result: dict[str, Any]) -> str:
    return json.dumps(result, separators=(",", ":"))


def refusal(error: SpendcapError) -> dict[str, Any]:
    """The short, structured answer the model gets instead of a stack trace."""
    result: dict[str, Any] = {"ok": False, "code": error.code, "retryable": False}
    if isinstance(error, BudgetRefused):
        result["requested_usd"] = format_usd(error.requested_micros)
        result["remaining_usd"] = format_usd(error.remaining_micros)
        result["limited_by"] = error.limited_by
        result["instruction"] = STOP
    elif isinstance(error, PaymentRefused):
        result["detail"] = error.detail
        result["instruction"] = STOP
    elif isinstance(error, ProviderDeclined):
        result["reason"] = error.reason or error.detail
        result["instruction"] = DECLINED
    elif isinstance(error, ApprovalRequired):
        result["retryable"] = True
        result["approval_id"] = error.approval_id
        result["reason"] = error.reason
        result["amount_usd"] = format_usd(error.amount_micros)
        result["instruction"] = APPROVAL
    elif isinstance(error, OutcomeUnknown):
        result["retryable"] = True
        result["instruction"] = UNKNOWN
    else:
        result["detail"] = error.detail
    return result


REJECTED = (
    "A person rejected this payment in the run's approval step; nothing was paid. Do not retry it or pay "
    "for it another way; finish with what you have."
)


@dataclass(frozen=True)
class Rejection:
    """A framework-side "no" to a payment held for approval (a LangGraph resume with a reject
    decision), with what the model is told."""

    message: str | None = None


# A framework's own approval step for a payment spendcap holds for approval: a `Rejection`, or
# None to go on — the call then waits for spendcap's decision, which governs the money.
Ask = Callable[[ApprovalRequired], Rejection | None]


def approval_request(
    waiting: ApprovalRequired, tool: str, tool_call_id: str, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a person (or the application) is shown about a payment held for approval. `type`,
    `name`, `args` and `description` are the shape of LangChain's human-in-the-loop per-call
    approval request (`ToolApprovalRequest`), so tools that render those render this one."""
    amount_usd = format_usd(waiting.amount_micros)
    return {
        "type": "tool_approval",
        "spendcap": "approval_required",
        "approval_id": waiting.approval_id,
        "amount_usd": amount_usd,
        "reason": waiting.reason,
        "expires_at_ms": waiting.expires_at_ms,
        "tool": tool,
        "name": tool,
        "args": dict(args or {}),
        "tool_call_id": tool_call_id,
        "description": (
            f"spendcap holds ${amount_usd} for this payment until a person approves it ({waiting.reason}); "
            f"approve it in spendcap (approval {waiting.approval_id}), then resume"
        ),
    }


def reject(config: ToolConfig, waiting: ApprovalRequired, message: str | None = None) -> dict[str, Any]:
    """A framework-side rejection: nothing is paid for this idempotency key. The agent voids its own
    held reservation so the money is free at once: a payment still waiting for approval has signed
    and sent nothing, so the daemon lets its agent withdraw it whatever its protocol
    (`released_now` is false only when spendcap had already decided it, or it lapsed)."""
    try:
        config.agent.void(waiting.approval_id)
        released_now = True
    except SpendcapError:
        released_now = False
    return {
        "ok": False,
        "code": "approval_denied",
        "retryable": False,
        "approval_id": waiting.approval_id,
        "detail": message or "rejected in the run's approval step",
        "released_now": released_now,
        "instruction": REJECTED,
    }


def approved(
    config: ToolConfig, pay: Callable[[], dict[str, Any]], ask: Ask | None = None
) -> Callable[[], dict[str, Any]]:
    """`pay`, for a payment that may need a person's approval. Spendcap decides about the money:
    once decided, the call is sent again with the same idempotency key, so an approved payment is
    paid from its held reservation (exactly once) and a denied or expired one answers
    `approval_denied` / `approval_expired`. `ask` is the framework's own approval step (a LangGraph
    interrupt): its rejection voids the hold; its approval does not approve anything in spendcap,
    it resumes the call, which then waits up to `approval_wait_secs` for spendcap's decision
    (still undecided: `approval_required`)."""

    def run() -> dict[str, Any]:
        try:
            return pay()
        except ApprovalRequired as waiting:
            if not waiting.approval_id:
                raise
            rejection = ask(waiting) if ask is not None else None
            if rejection is not None:
                return reject(config, waiting, rejection.message)
            if config.approval_wait_secs <= 0:
                raise
            decided = config.agent.wait_for_approval(waiting.approval_id, wait_secs=min(60, config.approval_wait_secs))
            if decided.get("state") == "pending":
                raise
            return pay()

    return run


def guarded(run: Callable[[], dict[str, Any]]) -> str:
    try:
        return encode(run())
    except SpendcapError as error:
        return encode(refusal(error))
    except (ValueError, TypeError) as error:
        return encode({"ok": False, "code": "invalid_arguments", "detail": str(error)})


def budget_view(budget: Budget) -> dict[str, Any]:
    return {
        "ok": True,
        "cap_usd": format_usd(budget.cap_micros),
        "spent_usd": format_usd(budget.spent_micros),
        "held_usd": format_usd(budget.held_micros),
        "remaining_usd": format_usd(budget.available_micros),
    }


def fetch_view(result: FetchResult) -> dict[str, Any]:
    text = result.text
    return {
        "ok": True,
        "status": result.status,
        "paid_usd": format_usd(result.paid_micros),
        "body": text[:MAX_BODY_CHARS] + ("…" if len(text) > MAX_BODY_CHARS else ""),
    }


def checkout_view(checkout: Checkout) -> dict[str, Any]:
    return {
        "ok": True,
        "status": checkout.status,
        "order_id": checkout.order.get("id"),
        "paid_usd": format_usd(checkout.amount_micros),
    }


def ap2_view(payment: Ap2Payment) -> dict[str, Any]:
    return {
        "ok": True,
        "status": payment.status,
        "order_id": payment.order_id,
        "paid_usd": format_usd(payment.amount_micros),
    }


def _max_usd(config: ToolConfig, max_usd: str | None) -> Money | None:
    if max_usd is None:
        return config.max_usd_per_call
    limit = to_micros(max_usd)
    if config.max_usd_per_call is not None:
        limit = min(limit, to_micros(config.max_usd_per_call))
    return Micros(limit)


def get_budget(config: ToolConfig) -> str:
    return guarded(lambda: budget_view(config.agent.me()))


def fetch_call(
    config: ToolConfig,
    tool_call_id: str,
    url: str,
    method: str = "GET",
    body: str | None = None,
    max_usd: str | None = None,
) -> Callable[[], dict[str, Any]]:
    return lambda: fetch_view(
        config.agent.fetch(
            url,
            method=method,
            body=body,
            task=config.task,
            max_usd=_max_usd(config, max_usd),
            idempotency_key=idempotency_key(tool_call_id, "paid_fetch"),
        )
    )


def checkout_call(
    config: ToolConfig,
    tool_call_id: str,
    merchant: str,
    items: Sequence[str] | None = None,
    checkout_session_id: str | None = None,
) -> Callable[[], dict[str, Any]]:
    return lambda: checkout_view(
        config.agent.checkout(
            merchant,
            checkout_session_id,
            items=list(items) if items is not None and checkout_session_id is None else None,
            task=config.task,
            idempotency_key=idempotency_key(tool_call_id, "acp_checkout"),
        )
    )


def ap2_call(config: ToolConfig, tool_call_id: str, checkout_jwt: str) -> Callable[[], dict[str, Any]]:
    def pay() -> dict[str, Any]:
        if config.ap2_mandates is None:
            return {"ok": False, "code": "ap2_no_mandate", "detail": "no AP2 mandate was given to this agent"}
        checkout_mandate, payment_mandate = config.ap2_mandates
        return ap2_view(
            config.agent.pay(
                checkout_jwt,
                open_checkout_mandate=checkout_mandate,
                open_payment_mandate=payment_mandate,
                task=config.task,
                idempotency_key=idempotency_key(tool_call_id, "ap2_pay"),
            )
        )

    return pay


def first_attempt(pay: Callable[[], dict[str, Any]]) -> ApprovalRequired | str:
    """A paying call sent once, without waiting: spendcap's 202 as the `ApprovalRequired` (the
    money is held, nothing was sent), anything else as the tool's result text."""
    try:
        return guarded(_raise_held(pay))
    except _HeldForApproval as held:
        return held.waiting


class _HeldForApproval(Exception):
    def __init__(self, waiting: ApprovalRequired) -> None:
        super().__init__(waiting.approval_id)
        self.waiting = waiting


def _raise_held(pay: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    def run() -> dict[str, Any]:
        try:
            return pay()
        except ApprovalRequired as waiting:
            if not waiting.approval_id:
                raise
            raise _HeldForApproval(waiting) from waiting

    return run


def paid_fetch(
    config: ToolConfig,
    tool_call_id: str,
    url: str,
    method: str = "GET",
    body: str | None = None,
    max_usd: str | None = None,
    ask: Ask | None = None,
) -> str:
    return guarded(approved(config, fetch_call(config, tool_call_id, url, method, body, max_usd), ask))


def acp_checkout(
    config: ToolConfig,
    tool_call_id: str,
    merchant: str,
    items: Sequence[str] | None = None,
    checkout_session_id: str | None = None,
    ask: Ask | None = None,
) -> str:
    return guarded(approved(config, checkout_call(config, tool_call_id, merchant, items, checkout_session_id), ask))


def ap2_pay(config: ToolConfig, tool_call_id: str, checkout_jwt: str, ask: Ask | None = None) -> str:
    return guarded(approved(config, ap2_call(config, tool_call_id, checkout_jwt), ask))


def record_task_outcome(config: ToolConfig, outcome: str, task_type: str, task: str | None = None) -> str:
    def run() -> dict[str, Any]:
        recorded = config.agent.record_outcome(task or config.task, outcome, task_type=task_type)
        return {"ok": True, "task": recorded.task, "outcome": recorded.outcome}

    return guarded(run)
