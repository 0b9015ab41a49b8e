"""OpenAI Agents SDK tools (`pip install 'spendcap[agents]'`): `function_tool`s for one agent.

    from agents import Agent as LlmAgent
    from spendcap.openai_agents import spendcap_tools
    assistant = LlmAgent(name="researcher", tools=spendcap_tools(agent, task="research-7"))

Tools: `get_budget`, `paid_fetch` (x402), `acp_checkout`, `ap2_pay` (when mandates are given),
`record_task_outcome`. A refusal is returned to the model as JSON `{"ok": false, "code",
"remaining_usd", ..., "instruction": "Stop spending: ..."}`; paying tools use the tool-call id
(`ToolContext.tool_call_id`) as their idempotency key.
"""

from __future__ import annotations

from typing import Any, Literal

from agents import Tool, function_tool
from agents.tool_context import ToolContext

from . import _tools
from ._money import Money
from ._sync import Agent


def spendcap_tools(
    agent: Agent,
    *,
    task: str = "",
    max_usd_per_call: Money | None = None,
    ap2_mandates: tuple[str, str] | None = None,
    approval_wait_secs: int = 30,
) -> list[Tool]:
    """The spendcap tools for one agent; `ap2_mandates` = (open checkout mandate, open payment
    mandate) adds `ap2_pay`."""
    config = _tools.ToolConfig(
        agent,
        task=task,
        max_usd_per_call=max_usd_per_call,
        ap2_mandates=ap2_mandates,
        approval_wait_secs=approval_wait_secs,
    )

    @function_tool(description_override=_tools.BUDGET_DESCRIPTION)
    def get_budget() -> str:
        return _tools.get_budget(config)

    @function_tool(description_override=_tools.FETCH_DESCRIPTION)
    def paid_fetch(
        ctx: ToolContext[Any],
        url: str,
        method: str = "GET",
        body: str | None = None,
        max_usd: str | None = None,
    ) -> str:
        return _tools.paid_fetch(config, ctx.tool_call_id, url, method, body, max_usd)

    @function_tool(description_override=_tools.CHECKOUT_DESCRIPTION)
    def acp_checkout(
        ctx: ToolContext[Any],
        merchant: str,
        items: list[str] | None = None,
        checkout_session_id: str | None = None,
    ) -> str:
        return _tools.acp_checkout(config, ctx.tool_call_id, merchant, items, checkout_session_id)

    @function_tool(description_override=_tools.AP2_DESCRIPTION)
    def ap2_pay(ctx: ToolContext[Any], checkout_jwt: str) -> str:
        return _tools.ap2_pay(config, ctx.tool_call_id, checkout_jwt)

    @function_tool(description_override=_tools.OUTCOME_DESCRIPTION)
    def record_task_outcome(
        outcome: Literal["success", "failed", "abandoned"], task_type: str, task: str | None = None
    ) -> str:
        return _tools.record_task_outcome(config, outcome, task_type, task)

    tools: list[Tool] = [get_budget, paid_fetch, acp_checkout, record_task_outcome]
    if ap2_mandates is not None:
        tools.insert(3, ap2_pay)
    return tools
