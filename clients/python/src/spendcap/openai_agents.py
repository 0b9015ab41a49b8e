"""OpenAI Agents SDK tools (`pip install 'spendcap[agents]'`): `function_tool`s for one agent.

    from agents import Agent as LlmAgent
    from spendcap.openai_agents import spendcap_tools
    assistant = LlmAgent(name="researcher", tools=spendcap_tools(agent, task="research-7"))

Tools: `get_budget`, `paid_fetch` (x402), `acp_checkout`, `ap2_pay` (when mandates are given),
`record_task_outcome`. A refusal is returned to the model as JSON `{"ok": false, "code",
"remaining_usd", ..., "instruction": "Stop spending: ..."}`; paying tools use the tool-call id
(`ToolContext.tool_call_id`) as their idempotency key.

Approvals use the SDK's own human-in-the-loop: each paying tool has a `needs_approval` callable
that sends the payment once (the tool-call id is its idempotency key). When spendcap answers
`approval_required` (its money is held, nothing was sent) the run stops with a `ToolApprovalItem`
in `result.interruptions`, and `spendcap_approval(item)` gives the spendcap approval it waits for.
Otherwise the tool returns what that one call answered. The money decision is spendcap's:

- `decide(state, item, approve=True, operator=...)` approves in spendcap (an operator or admin
  client) and in the run state; resuming the run (`Runner.run(agent, state)`) sends the call
  again with the same key, which pays from the held reservation, exactly once.
- An SDK approval alone (`state.approve(item)`) never bypasses spendcap: the resumed call waits up
  to `approval_wait_secs` for spendcap's decision, and a denial reaches the model as
  `approval_denied`.
- `decide(state, item, approve=False, operator=...)` denies in spendcap, so the money is released
  at once, and the model reads the rejection. Without an operator client the agent withdraws its
  own waiting payment (a void: nothing was signed or sent for it, whatever its protocol), which
  releases the money too; nothing is paid for it either way.

The SDK itself asks for approval, without calling `needs_approval`, when a model's arguments are
not exactly what the tool's schema parses (a non-strict model leaving out optional arguments):
such an interruption has no spendcap approval (`spendcap_approval(item)` is None), nothing was
sent, and approving it runs the call, which then follows spendcap's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from agents import RunState, Tool, ToolApprovalItem, function_tool
from agents.run_context import RunContextWrapper
from agents.tool_context import ToolContext

from . import _tools
from ._errors import ApprovalRequired, SpendcapError
from ._money import Money
from ._sync import Agent, Spendcap

# The spendcap approval each interrupted tool call waits for, by tool-call id (until the call runs).
_approvals: dict[str, dict[str, Any]] = {}

PayBuilder = Callable[[str, dict[str, Any]], Callable[[], dict[str, Any]]]


def spendcap_tools(
    agent: Agent,
    *,
    task: str = "",
    max_usd_per_call: Money | None = None,
    ap2_mandates: tuple[str, str] | None = None,
    approval_wait_secs: int = 30,
    needs_approval: bool = True,
) -> list[Tool]:
    """The spendcap tools for one agent; `ap2_mandates` = (open checkout mandate, open payment
    mandate) adds `ap2_pay`. With `needs_approval=False` a payment held for approval is not an
    SDK interruption: the tool call itself waits up to `approval_wait_secs` for the decision."""
    config = _tools.ToolConfig(
        agent,
        task=task,
        max_usd_per_call=max_usd_per_call,
        ap2_mandates=ap2_mandates,
        approval_wait_secs=approval_wait_secs,
    )
    # What a paying call answered in `needs_approval` when no approval was needed, by tool-call
    # id: the tool returns it instead of sending the call again.
    answered: dict[str, str] = {}

    def gate(tool: str, build: PayBuilder) -> Any:
        if not needs_approval:
            return False

        async def check(_context: RunContextWrapper[Any], params: dict[str, Any], call_id: str) -> bool:
            outcome = await asyncio.to_thread(_tools.first_attempt, build(call_id, params))
            if isinstance(outcome, ApprovalRequired):
                _approvals[call_id] = _tools.approval_request(outcome, tool, call_id)
                return True
            answered[call_id] = outcome
            return False

        return check

    def fetch_call(call_id: str, params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        return _tools.fetch_call(
            config,
            call_id,
            str(params.get("url", "")),
            str(params.get("method") or "GET"),
            params.get("body"),
            params.get("max_usd"),
        )

    def checkout_call(call_id: str, params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        return _tools.checkout_call(
            config, call_id, str(params.get("merchant", "")), params.get("items"), params.get("checkout_session_id")
        )

    def ap2_call(call_id: str, params: dict[str, Any]) -> Callable[[], dict[str, Any]]:
        return _tools.ap2_call(config, call_id, str(params.get("checkout_jwt", "")))

    @function_tool(description_override=_tools.BUDGET_DESCRIPTION)
    def get_budget() -> str:
        return _tools.get_budget(config)

    @function_tool(description_override=_tools.FETCH_DESCRIPTION, needs_approval=gate("paid_fetch", fetch_call))
    def paid_fetch(
        ctx: ToolContext[Any],
        url: str,
        method: str = "GET",
        body: str | None = None,
        max_usd: str | None = None,
    ) -> str:
        _approvals.pop(ctx.tool_call_id, None)
        return answered.pop(ctx.tool_call_id, None) or _tools.paid_fetch(
            config, ctx.tool_call_id, url, method, body, max_usd
        )

    @function_tool(description_override=_tools.CHECKOUT_DESCRIPTION, needs_approval=gate("acp_checkout", checkout_call))
    def acp_checkout(
        ctx: ToolContext[Any],
        merchant: str,
        items: list[str] | None = None,
        checkout_session_id: str | None = None,
    ) -> str:
        _approvals.pop(ctx.tool_call_id, None)
        return answered.pop(ctx.tool_call_id, None) or _tools.acp_checkout(
            config, ctx.tool_call_id, merchant, items, checkout_session_id
        )

    @function_tool(description_override=_tools.AP2_DESCRIPTION, needs_approval=gate("ap2_pay", ap2_call))
    def ap2_pay(ctx: ToolContext[Any], checkout_jwt: str) -> str:
        _approvals.pop(ctx.tool_call_id, None)
        return answered.pop(ctx.tool_call_id, None) or _tools.ap2_pay(config, ctx.tool_call_id, checkout_jwt)

    @function_tool(description_override=_tools.OUTCOME_DESCRIPTION)
    def record_task_outcome(
        outcome: Literal["success", "failed", "abandoned"], task_type: str, task: str | None = None
    ) -> str:
        return _tools.record_task_outcome(config, outcome, task_type, task)

    tools: list[Tool] = [get_budget, paid_fetch, acp_checkout, record_task_outcome]
    if ap2_mandates is not None:
        tools.insert(3, ap2_pay)
    return tools


def _call_id(item: ToolApprovalItem) -> str:
    raw = item.raw_item
    call_id = raw.get("call_id") if isinstance(raw, dict) else getattr(raw, "call_id", None)
    return str(call_id or "")


def spendcap_approval(item: ToolApprovalItem) -> dict[str, Any] | None:
    """The spendcap approval an interrupted paying call waits for — `approval_id`, `amount_usd`,
    `reason`, `expires_at_ms`, `tool`, `tool_call_id` — or None when the interruption is not a
    spendcap payment (another tool's approval) or was made by another process (there, decide in
    spendcap by the approval id from `admin.approvals("pending")`; the resumed call follows it)."""
    return _approvals.get(_call_id(item))


def decide(
    state: RunState[Any, Any],
    item: ToolApprovalItem,
    *,
    approve: bool,
    operator: Spendcap | None = None,
    agent: Agent | None = None,
    note: str = "",
) -> None:
    """Decides an interrupted payment in spendcap and in the run state, so that resuming the run
    pays it (from the held reservation, exactly once) or tells the model it was rejected.

    Approving needs `operator` (an operator or admin client): the decision about the money is
    spendcap's. Rejecting denies with `operator` (the money is released now), or else the `agent`
    withdraws its own waiting payment (a void, which releases the money too). Nothing is paid for a
    rejected call. A decision spendcap no longer
    accepts (the approval expired or was already decided) leaves spendcap's: the resumed call
    reports it to the model."""
    approval = spendcap_approval(item)
    if approval is not None:
        approval_id = approval["approval_id"]
        try:
            if approve:
                if operator is None:
                    raise ValueError("approving a payment needs an operator or admin client (operator=)")
                operator.approve(approval_id, note)
            elif operator is not None:
                operator.deny(approval_id, note)
            elif agent is not None:
                agent.void(approval_id)
        except SpendcapError:
            pass  # Spendcap already decided (or the approval expired): the resumed call says which.
    if approve:
        state.approve(item)
    else:
        result = {"ok": False, "code": "approval_denied", "retryable": False, "instruction": _tools.REJECTED}
        if note:
            result["detail"] = note
        state.reject(item, rejection_message=_tools.encode(result))
