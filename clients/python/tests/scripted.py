"""Scripted models for the frameworks' own tool-calling paths (no network, no LLM): LangChain's
fake chat model with tools bound as a real chat model binds them, and a `Model` for the Agents SDK
`Runner` whose turns may depend on what it was given."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field


class ScriptedChatModel(GenericFakeChatModel):
    """LangChain's fake chat model, with tools bound as a real chat model binds them, recording
    every conversation it is given."""

    messages: Iterator[Any]  # AIMessages, or functions of the conversation that make one
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[dict[str, Any]] = Field(default_factory=list)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        """The next scripted answer; an answer may be a function of the conversation so far."""
        self.seen.append(list(messages))
        turn: Any = next(self.messages)
        answer = turn(messages) if callable(turn) else turn
        return ChatResult(generations=[ChatGeneration(message=answer)])

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


Turn = list[Any] | Callable[[Any], list[Any]]


def agents_sdk_model(turns: list[Turn]) -> Any:
    """A scripted `Model` for the Agents SDK `Runner`: each call answers the next turn (a list of
    output items, or a function of the model's input that makes them) and keeps what it was given."""
    from agents import Model, ModelResponse, Usage

    class ScriptedModel(Model):
        def __init__(self) -> None:
            self.turns: Iterator[Turn] = iter(turns)
            self.inputs: list[Any] = []
            self.tool_names: list[str] = []

        async def get_response(
            self, system_instructions: Any, input: Any, model_settings: Any, tools: Any, *args: Any, **kwargs: Any
        ) -> ModelResponse:
            self.inputs.append(input)
            self.tool_names = [tool.name for tool in tools]
            turn = next(self.turns)
            output = turn(input) if callable(turn) else turn
            return ModelResponse(output=output, usage=Usage(), response_id=None)

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


def function_outputs(model_input: Any) -> dict[str, Any]:
    """The tool results in an Agents SDK model input, by call id, decoded."""
    return {
        item["call_id"]: json.loads(item["output"])
        for item in model_input
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }
