"""The framework tools through each framework's own tool-calling path, with a scripted model (no
network, no LLM), the real daemon and its simulated providers: the run pays, hits the cap, and
the model receives the refusal as a short structured result."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from conftest import Daemon

SEARCH = 20_000


# ---- LangChain -----------------------------------------------------------------------------


class ScriptedChatModel(GenericFakeChatModel):
    """LangChain's fake chat model, with tools bound as a real chat model binds them, recording
    every conversation it is given."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[dict[str, Any]] = Field(default_factory=list)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)

    def bind_tools(self, tools: Any, **kwargs: Any) -> Runnable[Any, AIMessage]:
        self.bound = [convert_to_openai_tool(tool) for tool in tools]
        return self.bind(tools=self.bound, **kwargs)


def call(name: str, call_id: str, **args: Any) -> AIMessage:
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}])


def run_langchain(model: ScriptedChatModel, tools: list[Any], prompt: str) -> list[BaseMessage]:
    """The tool-calling loop of langchain-core: the model answers, each tool call is invoked as a
    `ToolCall` (which yields the `ToolMessage`), until the model answers without tool calls."""
    bound = model.bind_tools(tools)
    by_name = {tool.name: tool for tool in tools}
    messages: list[BaseMessage] = [HumanMessage(prompt)]
    for _ in range(20):
        answer = bound.invoke(messages)
        messages.append(answer)
        if not answer.tool_calls:
            return messages
        messages.extend(by_name[tool_call["name"]].invoke(tool_call) for tool_call in answer.tool_calls)
    raise AssertionError("the scripted run did not end")


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


def agents_sdk_model(turns: list[list[Any]]) -> Any:
    """A scripted `Model` for the Agents SDK `Runner`: each call answers the next turn and keeps
    what it was given."""
    from agents import Model, ModelResponse, Usage

    class ScriptedModel(Model):
        def __init__(self) -> None:
            self.turns: Iterator[list[Any]] = iter(turns)
            self.inputs: list[Any] = []
            self.tool_names: list[str] = []

        async def get_response(
            self, system_instructions: Any, input: Any, model_settings: Any, tools: Any, *args: Any, **kwargs: Any
        ) -> ModelResponse:
            self.inputs.append(input)
            self.tool_names = [tool.name for tool in tools]
            return ModelResponse(output=next(self.turns), usage=Usage(), response_id=None)

        def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            raise NotImplementedError

    return ScriptedModel()


def function_call(name: str, call_id: str, **args: Any) -> Any:
    from openai.types.responses import ResponseFunctionToolCall

    return ResponseFunctionToolCall(
        id=f"fc_{call_id}",
        call_id=call_id,
        name=name,
        arguments=json.dumps(args),
        type="function_call",
        status="completed",
    )


def message(text: str) -> Any:
    from openai.types.responses import ResponseOutputMessage, ResponseOutputText

    return ResponseOutputMessage(
        id="msg_1",
        role="assistant",
        status="completed",
        type="message",
        content=[ResponseOutputText(text=text, type="output_text", annotations=[])],
    )


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
    outputs = {
        item["call_id"]: json.loads(item["output"])
        for item in model.inputs[-1]
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }
    assert outputs["call_2"]["paid_usd"] == "0.02"
    refusal = outputs["call_4"]
    assert (refusal["ok"], refusal["code"], refusal["remaining_usd"]) == (False, "cap_exceeded", "0.01")
    assert refusal["instruction"].startswith("Stop spending")
    assert agent.me().spent_micros == 2 * SEARCH
