"""LangChain tools (`pip install 'spendcap[langchain]'`), built with `langchain-core`.

    from spendcap.langchain import spendcap_tools
    tools = spendcap_tools(agent, task="research-7")
    model = ChatOpenAI(...).bind_tools(tools)

Tools: `get_budget`, `paid_fetch` (x402), `acp_checkout`, `ap2_pay` (when mandates are given),
`record_task_outcome`. Each returns JSON text; a refusal is `{"ok": false, "code", "remaining_usd",
..., "instruction": "Stop spending: ..."}`. Paying tools take the tool-call id (injected by
LangChain, never shown to the model) as their idempotency key.

Approvals: inside a LangGraph graph with a checkpointer (LangChain 1.x `create_agent(...,
checkpointer=...)`, or your own graph's `ToolNode`), a payment spendcap holds for approval pauses
the graph with `langgraph.types.interrupt`, whose value is the approval (`approval_id`,
`amount_usd`, `reason`, `expires_at_ms`, `tool`, `tool_call_id`) with the keys of LangChain's
per-call human-in-the-loop request (`type: "tool_approval"`, `name`, `args`, `description`);
nothing was sent and the money is held. Resume with `Command(resume=...)` and a LangChain
human-in-the-loop decision. `{"type": "approve"}` sends the call again with the same idempotency
key and spendcap's decision governs: approved (by an operator, e.g. `admin.approve(approval_id)`
before resuming), it pays from the held reservation exactly once; denied, the model reads
`approval_denied`; still undecided, the call waits up to `approval_wait_secs`. `{"type":
"reject", "message": ...}`: nothing is paid, the agent withdraws the waiting payment (its held
money is released at once) and the model reads the rejection. Outside a graph (a plain tool loop),
the tool call itself waits up to `approval_wait_secs` for spendcap's decision.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from langchain_core.tools import BaseTool, InjectedToolCallId, StructuredTool

from . import _tools
from ._errors import ApprovalRequired
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

    def ask(tool: str, tool_call_id: str, args: dict[str, Any]) -> _tools.Ask:
        def interrupted(waiting: ApprovalRequired) -> _tools.Rejection | None:
            return _interrupt(_tools.approval_request(waiting, tool, tool_call_id, args))

        return interrupted

    def get_budget() -> str:
        return _tools.get_budget(config)

    def paid_fetch(
        url: str,
        tool_call_id: Annotated[str, InjectedToolCallId],
        method: str = "GET",
        body: str | None = None,
        max_usd: str | None = None,
    ) -> str:
        return _tools.paid_fetch(
            config,
            tool_call_id,
            url,
            method,
            body,
            max_usd,
            ask=ask("paid_fetch", tool_call_id, {"url": url, "method": method, "body": body, "max_usd": max_usd}),
        )

    def acp_checkout(
        merchant: str,
        tool_call_id: Annotated[str, InjectedToolCallId],
        items: list[str] | None = None,
        checkout_session_id: str | None = None,
    ) -> str:
        return _tools.acp_checkout(
            config,
            tool_call_id,
            merchant,
            items,
            checkout_session_id,
            ask=ask(
                "acp_checkout",
                tool_call_id,
                {"merchant": merchant, "items": items, "checkout_session_id": checkout_session_id},
            ),
        )

    def ap2_pay(checkout_jwt: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> str:
        return _tools.ap2_pay(
            config, tool_call_id, checkout_jwt, ask=ask("ap2_pay", tool_call_id, {"checkout_jwt": checkout_jwt})
        )

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


def _interrupt(request: dict[str, Any]) -> _tools.Rejection | None:
    """Pauses the running LangGraph graph with the approval `request` and, once resumed, answers
    the person's rejection, if it was one. None when the tool is not running in a graph that can
    pause (no langgraph, no graph, or no checkpointer): the call waits for spendcap's decision.

    The resume value is a LangChain human-in-the-loop decision — `{"type": "approve"}`,
    `{"type": "reject", "message": ...}` (`"respond"` too: the tool does not pay) — or a
    `{"decisions": [...]}` response holding one, or a bool."""
    try:
        from langgraph.config import get_config
        from langgraph.types import interrupt
    except ImportError:
        return None
    try:
        configurable = get_config().get("configurable", {})
    except RuntimeError:
        return None
    if "__pregel_scratchpad" not in configurable or "__pregel_checkpointer" not in configurable:
        return None
    decision = interrupt(request)
    if isinstance(decision, dict) and isinstance(decision.get("decisions"), list) and decision["decisions"]:
        decision = decision["decisions"][0]
    if decision is False:
        return _tools.Rejection()
    if isinstance(decision, dict) and decision.get("type") in ("reject", "respond"):
        message = decision.get("message")
        return _tools.Rejection(message if isinstance(message, str) and message else None)
    # Anything else goes on: the call asks spendcap again, whose decision governs the money.
    return None
