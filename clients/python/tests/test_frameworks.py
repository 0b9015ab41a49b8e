"""The framework tools through each framework's own tool-calling path, with a scripted model (no
network, no LLM), the real daemon and its simulated providers: the run pays, hits the cap, and
the model receives the refusal as a short structured result."""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage, ToolMessage

from conftest import Daemon
from scripted import (
    ScriptedChatModel,
    agents_sdk_model,
    call,
    function_call,
    function_outputs,
    message,
    run_langchain,
)

SEARCH = 20_000


def test_langchain_tools_pay_hit_the_cap_and_the_model_receives_the_refusal(daemon: Daemon, new_agent: Any) -> None:
    from spendcap.langchain import spendcap_tools

    _, agent = new_agent("0.05")
    tools = spendcap_tools(agent, task="lc-research")
    search = f"{daemon.x402_url}/search"
    model = ScriptedChatModel(
        messages=iter(
            [
                call("get_budget", "call_1"),
                call("paid_fetch", "call_2", url=f"{search}?q=a"),
                call("paid_fetch", "call_3", url=f"{search}?q=b"),
                call("paid_fetch", "call_4", url=f"{daemon.x402_url}/papers/attention"),
                AIMessage(content="The budget is exhausted; stopping."),
            ]
        )
    )
    messages = run_langchain(model, tools, "Research attention.")

    assert [t["function"]["name"] for t in model.bound] == [
        "get_budget",
        "paid_fetch",
        "acp_checkout",
        "record_task_outcome",
    ]
    results = {m.tool_call_id: json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage)}
    assert results["call_1"]["remaining_usd"] == "0.05"
    assert (results["call_2"]["status"], results["call_2"]["paid_usd"]) == (200, "0.02")
    refusal = results["call_4"]
    assert (refusal["ok"], refusal["code"], refusal["remaining_usd"], refusal["retryable"]) == (
        False,
        "cap_exceeded",
        "0.01",
        False,
    )
    assert refusal["instruction"].startswith("Stop spending")
    # The model's last turn was given the refusal.
    last_input = model.seen[-1][-1]
    assert isinstance(last_input, ToolMessage) and "cap_exceeded" in str(last_input.content)
    assert agent.me().spent_micros == 2 * SEARCH

    # A re-executed tool call (same id) is the same purchase: nothing is paid twice.
    again = tools[1].invoke(
        {"name": "paid_fetch", "args": {"url": f"{search}?q=a"}, "id": "call_2", "type": "tool_call"}
    )
    assert json.loads(str(again.content))["paid_usd"] == "0.02"
    assert agent.me().spent_micros == 2 * SEARCH


def test_langchain_checkout_ap2_and_outcome_tools(daemon: Daemon, admin: Any, new_agent: Any) -> None:
    from spendcap.langchain import spendcap_tools

    info, agent = new_agent("0.80")
    mandates = daemon.ap2_mandates(agent.ap2_key().jwk)
    tools = spendcap_tools(
        agent, task="lc-shop", ap2_mandates=(mandates["open_checkout_mandate"], mandates["open_payment_mandate"])
    )
    model = ScriptedChatModel(
        messages=iter(
            [
                call("acp_checkout", "c1", merchant=daemon.acp_merchant, items=["report_market"]),
                call("ap2_pay", "c2", checkout_jwt=daemon.ap2_checkout()),
                call("acp_checkout", "c3", merchant=daemon.acp_merchant, items=["dataset_climate"]),
                call("record_task_outcome", "c4", outcome="success", task_type="shopping"),
                AIMessage(content="Bought the report and a profile; the dataset was over budget."),
            ]
        )
    )
    messages = run_langchain(model, tools, "Buy the market report, a company profile and the climate dataset.")
    results = {m.tool_call_id: json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage)}
    assert (results["c1"]["paid_usd"], results["c2"]["paid_usd"]) == ("0.45", "0.30")
    assert (results["c3"]["code"], results["c3"]["requested_usd"], results["c3"]["remaining_usd"]) == (
        "cap_exceeded",
        "0.99",
        "0.05",
    )
    assert results["c4"] == {"ok": True, "task": "lc-shop", "outcome": "success"}
    assert agent.me().spent_micros == 750_000
    row = next(r for r in admin.report(agent=info.id)["task_types"] if r["task_type"] == "shopping")
    assert row["successes"] == 1


# ---- OpenAI Agents SDK ---------------------------------------------------------------------


def test_agents_sdk_tools_pay_hit_the_cap_and_the_model_receives_the_refusal(daemon: Daemon, new_agent: Any) -> None:
    from agents import Agent as LlmAgent
    from agents import Runner, set_tracing_disabled

    from spendcap.openai_agents import spendcap_tools

    set_tracing_disabled(True)
    _, agent = new_agent("0.05")
    search = f"{daemon.x402_url}/search"
    fetch_args = {"method": "GET", "body": None, "max_usd": None}
    model = agents_sdk_model(
        [
            [function_call("get_budget", "call_1")],
            [function_call("paid_fetch", "call_2", url=f"{search}?q=a", **fetch_args)],
            [function_call("paid_fetch", "call_3", url=f"{search}?q=b", **fetch_args)],
            [function_call("paid_fetch", "call_4", url=f"{daemon.x402_url}/papers/attention", **fetch_args)],
            [message("The budget is exhausted; stopping.")],
        ]
    )
    assistant = LlmAgent(name="researcher", model=model, tools=spendcap_tools(agent, task="sdk-research"))
    result = Runner.run_sync(assistant, "Research attention.")

    assert result.final_output == "The budget is exhausted; stopping."
    assert model.tool_names == ["get_budget", "paid_fetch", "acp_checkout", "record_task_outcome"]
    outputs = function_outputs(model.inputs[-1])
    assert outputs["call_2"]["paid_usd"] == "0.02"
    refusal = outputs["call_4"]
    assert (refusal["ok"], refusal["code"], refusal["remaining_usd"]) == (False, "cap_exceeded", "0.01")
    assert refusal["instruction"].startswith("Stop spending")
    assert agent.me().spent_micros == 2 * SEARCH


def test_a_tool_payment_that_needs_approval_waits_and_pays_once_a_person_approves(
    daemon: Daemon, admin: Any, new_agent: Any
) -> None:
    import threading
    import time

    from spendcap.langchain import spendcap_tools

    info, agent = new_agent("1.00")
    admin.set_controls(info.id, {"approval": {"protocols": ["x402"], "ttl_secs": 600}})

    def approve_when_asked() -> None:
        for _ in range(100):
            pending = [a for a in admin.approvals("pending") if a["agent"] == info.id]
            if pending:
                admin.approve(pending[0]["approval_id"], "go ahead")
                return
            time.sleep(0.1)

    threading.Thread(target=approve_when_asked).start()
    tools = spendcap_tools(agent, task="lc-approval", approval_wait_secs=20)
    model = ScriptedChatModel(
        messages=iter(
            [
                call("paid_fetch", "call_1", url=f"{daemon.x402_url}/search?q=approved"),
                AIMessage(content="Done."),
            ]
        )
    )
    messages = run_langchain(model, tools, "Search once.")
    results = {m.tool_call_id: json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage)}
    assert (results["call_1"]["status"], results["call_1"]["paid_usd"]) == (200, "0.02"), results
    assert agent.me().spent_micros == SEARCH


def test_a_tool_payment_still_waiting_tells_the_model_what_to_do(daemon: Daemon, admin: Any, new_agent: Any) -> None:
    from spendcap.langchain import spendcap_tools

    info, agent = new_agent("1.00")
    admin.set_controls(info.id, {"approval": {"protocols": ["x402"]}})
    tools = spendcap_tools(agent, task="lc-waiting", approval_wait_secs=0)
    model = ScriptedChatModel(
        messages=iter([call("paid_fetch", "call_1", url=f"{daemon.x402_url}/search?q=w"), AIMessage(content="Asked.")])
    )
    messages = run_langchain(model, tools, "Search once.")
    result = next(json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage))
    assert (result["ok"], result["code"], result["retryable"], result["amount_usd"]) == (
        False,
        "approval_required",
        True,
        "0.02",
    )
    assert result["approval_id"] and "approval" in result["instruction"]
    assert agent.me().held_micros == SEARCH
