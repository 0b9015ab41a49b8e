"""Approval holds through each framework's own human-in-the-loop mechanism, with scripted models,
the real daemon and its simulated x402 provider: a payment an approval rule matches stops the run
(OpenAI Agents SDK interruption, LangGraph interrupt) with the spendcap approval and nothing paid;
approved, the resumed run pays once from the held reservation; denied or rejected, the model
reads the refusal and nothing is paid."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from spendcap import Spendcap, SpendcapError

from conftest import Daemon
from scripted import ScriptedChatModel, agents_sdk_model, call, function_call, function_outputs, message

SEARCH = 20_000
FETCH_ARGS = {"method": "GET", "body": None, "max_usd": None}


def needs_approval_for_x402(admin: Spendcap, new_agent: Any) -> tuple[str, Any]:
    info, agent = new_agent("1.00")
    admin.set_controls(info.id, {"approval": {"protocols": ["x402"], "ttl_secs": 600}})
    return info.id, agent


def settled(admin: Spendcap, agent_id: str) -> list[int]:
    """The amounts of the agent's settle entries in the ledger log: what providers were paid."""
    return [e["amount"] for e in admin.log(agent=agent_id) if e.get("event") == "settle"]


def money(agent: Any) -> tuple[int, int]:
    budget = agent.me()
    return budget.spent_micros, budget.held_micros


# ---- OpenAI Agents SDK ---------------------------------------------------------------------


def sdk_run(daemon: Daemon, agent: Any, **options: Any) -> tuple[Any, Any, Any]:
    """A scripted researcher that makes one paid search and then says what the tool answered."""
    from agents import Agent as LlmAgent
    from agents import Runner, set_tracing_disabled

    from spendcap.openai_agents import spendcap_tools

    set_tracing_disabled(True)
    model = agents_sdk_model(
        [
            [function_call("paid_fetch", "call_1", url=f"{daemon.x402_url}/search?q=approval", **FETCH_ARGS)],
            lambda model_input: [message(json.dumps(function_outputs(model_input)["call_1"]))],
        ]
    )
    assistant = LlmAgent(name="researcher", model=model, tools=spendcap_tools(agent, task="sdk-approval", **options))
    return Runner.run_sync(assistant, "Search once."), assistant, model


def test_agents_sdk_run_stops_for_approval_and_the_approved_resume_pays_once(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    from agents import Runner

    from spendcap.openai_agents import decide, spendcap_approval

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    result, assistant, model = sdk_run(daemon, agent)

    # The run stopped with the SDK's own interruption; spendcap holds the money, nothing was paid.
    assert result.final_output is None
    [item] = result.interruptions
    approval = spendcap_approval(item)
    assert approval is not None
    assert (approval["tool"], approval["tool_call_id"], approval["amount_usd"], approval["reason"]) == (
        "paid_fetch",
        "call_1",
        "0.02",
        "listed_protocol",
    )
    assert [a["approval_id"] for a in admin.approvals("pending") if a["agent"] == agent_id] == [approval["approval_id"]]
    assert money(agent) == (0, SEARCH)
    assert settled(admin, agent_id) == []
    assert len(model.inputs) == 1, "the model was not asked again while the payment waits"

    state = result.to_state()
    decide(state, item, approve=True, operator=admin, note="research budget")
    resumed = Runner.run_sync(assistant, state)
    answer = json.loads(resumed.final_output)
    assert (answer["ok"], answer["status"], answer["paid_usd"]) == (True, 200, "0.02"), answer
    assert money(agent) == (SEARCH, 0)
    assert settled(admin, agent_id) == [SEARCH]
    assert len(admin.receipts(agent_id)) == 1
    decided = agent.wait_for_approval(approval["approval_id"], wait_secs=0)
    assert (decided["state"], decided["note"]) == ("approved", "research budget")


def test_agents_sdk_approval_does_not_bypass_a_spendcap_denial(daemon: Daemon, admin: Spendcap, new_agent: Any) -> None:
    from agents import Runner

    from spendcap.openai_agents import spendcap_approval

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    result, assistant, _ = sdk_run(daemon, agent)
    [item] = result.interruptions
    approval = spendcap_approval(item)
    assert approval is not None
    admin.deny(approval["approval_id"], "not this one")

    # The application approves in the SDK only: the resumed call asks spendcap, which said no.
    state = result.to_state()
    state.approve(item)
    resumed = Runner.run_sync(assistant, state)
    answer = json.loads(resumed.final_output)
    assert (answer["ok"], answer["code"], answer["retryable"]) == (False, "approval_denied", False), answer
    assert answer["instruction"].startswith("Stop spending")
    assert money(agent) == (0, 0)
    assert settled(admin, agent_id) == []


def test_agents_sdk_rejection_releases_the_money_and_the_model_reads_it(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    from agents import Runner

    from spendcap.openai_agents import decide, spendcap_approval

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    result, assistant, _ = sdk_run(daemon, agent)
    [item] = result.interruptions
    approval = spendcap_approval(item)
    assert approval is not None
    state = result.to_state()
    # The operator's denial releases the held money at once.
    decide(state, item, approve=False, operator=admin, note="too expensive")
    assert money(agent) == (0, 0)

    resumed = Runner.run_sync(assistant, state)
    answer = json.loads(resumed.final_output)
    assert (answer["ok"], answer["code"], answer["detail"]) == (False, "approval_denied", "too expensive")
    assert "rejected" in answer["instruction"]
    assert settled(admin, agent_id) == []
    # Nothing can pay it later either: the held reservation is gone.
    with pytest.raises(Exception, match="approv"):
        admin.approve(approval["approval_id"], "changed my mind")
    assert money(agent) == (0, 0)


def test_agents_sdk_without_a_rule_pays_once_without_interrupting(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    info, agent = new_agent("1.00")
    result, _, _ = sdk_run(daemon, agent)
    assert result.interruptions == []
    answer = json.loads(result.final_output)
    assert (answer["ok"], answer["paid_usd"]) == (True, "0.02")
    assert money(agent) == (SEARCH, 0)
    assert settled(admin, info.id) == [SEARCH]


# ---- LangChain 1.x agent (LangGraph) -------------------------------------------------------


def says_what_the_tool_answered(messages: list[BaseMessage]) -> AIMessage:
    return AIMessage(content=str(messages[-1].content))


def langchain_graph(daemon: Daemon, agent: Any) -> Any:
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    from spendcap.langchain import spendcap_tools

    model = ScriptedChatModel(
        messages=iter(
            [
                call("paid_fetch", "call_1", url=f"{daemon.x402_url}/search?q=approval"),
                says_what_the_tool_answered,
            ]
        )
    )
    return create_agent(model, tools=spendcap_tools(agent, task="lc-approval"), checkpointer=InMemorySaver())


def interrupted(graph: Any, config: Any) -> dict[str, Any]:
    """The one interrupt value the paused graph waits on."""
    [task] = [t for t in graph.get_state(config).tasks if t.interrupts]
    [pending] = task.interrupts
    return dict(pending.value)


def test_langchain_agent_pauses_for_approval_and_the_approved_resume_pays_once(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    from langgraph.types import Command

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    graph = langchain_graph(daemon, agent)
    config: Any = {"configurable": {"thread_id": "approve"}}
    out = graph.invoke({"messages": [HumanMessage("Search once.")]}, config)

    request = out["__interrupt__"][0].value
    assert request == interrupted(graph, config)
    assert (request["spendcap"], request["tool"], request["amount_usd"], request["reason"]) == (
        "approval_required",
        "paid_fetch",
        "0.02",
        "listed_protocol",
    )
    # The shape of LangChain's per-call human-in-the-loop request, for the UIs that render those.
    assert (request["type"], request["name"], request["tool_call_id"]) == ("tool_approval", "paid_fetch", "call_1")
    assert request["args"]["url"].endswith("/search?q=approval")
    assert "$0.02" in request["description"]
    assert money(agent) == (0, SEARCH)
    assert settled(admin, agent_id) == []

    admin.approve(request["approval_id"], "fine")
    out = graph.invoke(Command(resume={"type": "approve"}), config)
    result = json.loads(str(out["messages"][-1].content))
    assert (result["ok"], result["status"], result["paid_usd"]) == (True, 200, "0.02"), result
    assert money(agent) == (SEARCH, 0)
    assert settled(admin, agent_id) == [SEARCH]
    assert len(admin.receipts(agent_id)) == 1


@pytest.mark.parametrize(
    "decision",
    [
        {"type": "reject", "message": "not now"},
        # A LangChain human-in-the-loop response (`HITLResponse`) with one decision.
        {"decisions": [{"type": "reject", "message": "not now"}]},
    ],
)
def test_langchain_agent_rejection_pays_nothing_and_the_model_reads_it(
    daemon: Daemon, admin: Spendcap, new_agent: Any, decision: dict[str, Any]
) -> None:
    from langgraph.types import Command

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    graph = langchain_graph(daemon, agent)
    config: Any = {"configurable": {"thread_id": f"reject-{agent_id}"}}
    graph.invoke({"messages": [HumanMessage("Search once.")]}, config)
    assert money(agent) == (0, SEARCH)

    out = graph.invoke(Command(resume=decision), config)
    tool_result = next(m for m in out["messages"] if isinstance(m, ToolMessage))
    result = json.loads(str(tool_result.content))
    assert (result["ok"], result["code"], result["retryable"], result["detail"]) == (
        False,
        "approval_denied",
        False,
        "not now",
    ), result
    assert json.loads(str(out["messages"][-1].content))["code"] == "approval_denied"
    assert settled(admin, agent_id) == []
    # The agent withdrew its x402 payment waiting for approval: the money is back at once, and
    # spendcap shows the approval canceled (an operator's later decision is refused).
    assert (result["released_now"], money(agent)) == (True, (0, 0))
    assert [a["state"] for a in admin.approvals() if a["approval_id"] == result["approval_id"]] == ["canceled"]
    with pytest.raises(SpendcapError):
        admin.approve(result["approval_id"], "too late")
    assert money(agent) == (0, 0)


def test_langchain_agent_resumed_without_a_spendcap_approval_pays_nothing(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    from langgraph.types import Command

    agent_id, agent = needs_approval_for_x402(admin, new_agent)
    graph = langchain_graph(daemon, agent)
    config: Any = {"configurable": {"thread_id": "denied"}}
    out = graph.invoke({"messages": [HumanMessage("Search once.")]}, config)
    admin.deny(out["__interrupt__"][0].value["approval_id"], "no")

    # The graph's "approve" only resumes the call: spendcap's denial governs.
    out = graph.invoke(Command(resume={"type": "approve"}), config)
    result = json.loads(str(out["messages"][-1].content))
    assert (result["ok"], result["code"]) == (False, "approval_denied"), result
    assert money(agent) == (0, 0)
    assert settled(admin, agent_id) == []


def test_agents_sdk_acp_checkout_waits_for_approval_and_pays_once(
    daemon: Daemon, admin: Spendcap, new_agent: Any
) -> None:
    from agents import Agent as LlmAgent
    from agents import Runner, set_tracing_disabled

    from spendcap.openai_agents import decide, spendcap_approval, spendcap_tools

    set_tracing_disabled(True)
    info, agent = new_agent("1.00")
    admin.set_controls(info.id, {"approval": {"above_micros": 400_000}})
    model = agents_sdk_model(
        [
            [
                function_call(
                    "acp_checkout",
                    "buy_1",
                    merchant=daemon.acp_merchant,
                    items=["report_market"],
                    checkout_session_id=None,
                )
            ],
            lambda model_input: [message(json.dumps(function_outputs(model_input)["buy_1"]))],
        ]
    )
    assistant = LlmAgent(name="shopper", model=model, tools=spendcap_tools(agent, task="sdk-shop"))
    result = Runner.run_sync(assistant, "Buy the market report.")
    [item] = result.interruptions
    approval = spendcap_approval(item)
    assert approval is not None
    assert (approval["tool"], approval["amount_usd"], approval["reason"]) == ("acp_checkout", "0.45", "above_amount")
    assert money(agent) == (0, 450_000)

    state = result.to_state()
    decide(state, item, approve=True, operator=admin)
    answer = json.loads(Runner.run_sync(assistant, state).final_output)
    assert (answer["ok"], answer["status"], answer["paid_usd"]) == (True, "completed", "0.45"), answer
    assert money(agent) == (450_000, 0)
    assert settled(admin, info.id) == [450_000]
    assert spendcap_approval(item) is None, "forgotten once the call ran"
