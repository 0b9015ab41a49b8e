"""LangChain tools (`pip install 'spendcap[langchain]'`), built with `langchain-core`.

    from spendcap.langchain import spendcap_tools
    tools = spendcap_tools(agent, task="research-7")
    model = ChatOpenAI(...).bind_tools(tools)

Tools: `get_budget`, `paid_fetch` (x402), `acp_checkout`, `ap2_pay` (when mandates are given),
`record_task_outcome`. Each returns JSON text; a refusal is `{"ok": false, "code", "remaining_usd",
..., "instruction": "Stop spending: ..."}`. Paying tools take the tool-call id (injected by
LangChain, never shown to the model) as their idempotency key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from langchain_core.tools import BaseTool, InjectedToolCallId, StructuredTool

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
) -> list[BaseTool]:
    """The spendcap tools for one agent; `ap2_mandates` = (open checkout mandate, open payment
    mandate) adds `ap2_pay`."""
    config = _tools.ToolConfig(
        agent,
        task=task,
        max_usd_per_call=max_usd_per_call,
        ap2_mandates=ap2_mandates,
        approval_wait_secs=approval_wait_secs,
    )

    def get_budget() -> str:
        return _tools.get_budget(config)

    def paid_fetch(
        url: str,
        tool_call_id: Annotated[str, InjectedToolCallId],
        method: str = "GET",
        body: str | None = None,
        max_usd: str | None = None,
    ) -> str:
        return _tools.paid_fetch(config, tool_call_id, url, method, body, max_usd)

    def acp_checkout(
        merchant: str,
        tool_call_id: Annotated[str, InjectedToolCallId],
        items: list[str] | None = None,
        checkout_session_id: str | None = None,
    ) -> str:
        return _tools.acp_checkout(config, tool_call_id, merchant, items, checkout_session_id)

    def ap2_pay(checkout_jwt: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        return _tools.ap2_pay(config, tool_call_id, checkout_jwt)

    def record_task_outcome(
        outcome: Literal["success", "failed", "abandoned"], task_type: str, task: str | None = None
    ) -> str:
        return _tools.record_task_outcome(config, outcome, task_type, task)

    tools: list[BaseTool] = [
        StructuredTool.from_function(get_budget, description=_tools.BUDGET_DESCRIPTION),
        StructuredTool.from_function(paid_fetch, description=_tools.FETCH_DESCRIPTION),
        StructuredTool.from_function(acp_checkout, description=_tools.CHECKOUT_DESCRIPTION),
        StructuredTool.from_function(record_task_outcome, description=_tools.OUTCOME_DESCRIPTION),
    ]
    if ap2_mandates is not None:
        tools.insert(3, StructuredTool.from_function(ap2_pay, description=_tools.AP2_DESCRIPTION))
    return tools
