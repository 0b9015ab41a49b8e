"""The official OpenAI and Anthropic SDKs as an agent's clients of keyed APIs: each SDK points its
base URL at the daemon (`/v1/apis/openai/v1`, `/v1/apis/anthropic`) and uses the agent's spendcap
token as its API key. The daemon's upstream is the simulated LLM provider of
`spendcap demo --providers-only` (src/sim/llm.rs), which answers in each API's format, checks the
owner's key and reports usage; the daemon holds, forwards with the owner's key and settles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from spendcap import Spendcap

from conftest import Daemon, unique

# micro-USD per million tokens (input, output), as src/sim/llm.rs prices its models.
SIM_GPT = (2_000_000, 8_000_000)
SIM_CLAUDE = (3_000_000, 15_000_000)
REPLY = "Hello from the simulated model, paid within your cap."


def cost(price: tuple[int, int], input_tokens: int, output_tokens: int) -> int:
    """What the daemon settles: tokens times price per million, rounded up to the micro-USD."""
    return -(-(input_tokens * price[0] + output_tokens * price[1]) // 1_000_000)


@pytest.fixture
def token(admin: Spendcap) -> str:
    return admin.create_agent(unique("llm"), "1.00").token


def balance(admin: Spendcap, token: str) -> tuple[int, int]:
    with admin.agent_client(token) as agent:
        budget = agent.me()
    return budget.spent_micros, budget.held_micros


def settles(admin: Spendcap, token: str) -> list[dict[str, Any]]:
    """The agent's settle log lines, with their details parsed."""
    with admin.agent_client(token) as agent:
        agent_id = agent.me().agent_id
    lines = [e for e in admin.log() if e["agent"] == agent_id and e["event"] == "settle"]
    for line in lines:
        line["detail"] = json.loads(line["detail"]) if line["detail"] else {}
    return lines


@pytest.fixture
def gpt(daemon: Daemon, token: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=daemon.env["SPENDCAP_SIM_OPENAI_BASE_URL"], api_key=token, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(daemon: Daemon, token: str) -> Iterator[anthropic.Anthropic]:
    base_url = daemon.env["SPENDCAP_SIM_ANTHROPIC_BASE_URL"]
    with anthropic.Anthropic(base_url=base_url, api_key=token, max_retries=0) as client:
        yield client


def test_openai_chat_completion_is_settled_from_its_usage(admin: Spendcap, token: str, gpt: openai.OpenAI) -> None:
    raw = gpt.chat.completions.with_raw_response.create(
        model="sim-gpt", messages=[{"role": "user", "content": "Say hello"}], max_completion_tokens=5
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the simulated model,"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 5
    charged = cost(SIM_GPT, usage.prompt_tokens, usage.completion_tokens)
    assert raw.headers["x-spendcap-amount-micros"] == str(charged)
    assert raw.headers["x-spendcap-payment"] == "settled"
    assert balance(admin, token) == (charged, 0)


def test_openai_chat_stream_arrives_whole_and_is_settled(admin: Spendcap, token: str, gpt: openai.OpenAI) -> None:
    stream = gpt.chat.completions.create(
        model="sim-gpt", messages=[{"role": "user", "content": "Say hello"}], max_completion_tokens=9, stream=True
    )
    chunks = list(stream)
    # The daemon asked for usage; the usage chunk this client did not ask for is not passed on.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == REPLY
    [settle] = settles(admin, token)
    tokens = int(settle["detail"]["input_tokens"]), int(settle["detail"]["output_tokens"])
    assert tokens[1] == 9
    assert (settle["amount"], settle["service"], settle["protocol"]) == (cost(SIM_GPT, *tokens), "openai", "api")
    assert balance(admin, token) == (cost(SIM_GPT, *tokens), 0)


def test_openai_stream_with_usage_asked_keeps_its_usage_chunk(admin: Spendcap, token: str, gpt: openai.OpenAI) -> None:
    stream = gpt.chat.completions.create(
        model="sim-gpt",
        messages=[{"role": "user", "content": "Say hello"}],
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 3
    assert balance(admin, token) == (cost(SIM_GPT, usage[0].prompt_tokens, 3), 0)


def test_openai_responses_call_and_stream(admin: Spendcap, token: str, gpt: openai.OpenAI) -> None:
    response = gpt.responses.create(model="sim-gpt", input="Say hello", max_output_tokens=4)
    assert response.output_text == "Hello from the simulated"
    assert response.usage is not None
    first = cost(SIM_GPT, response.usage.input_tokens, response.usage.output_tokens)
    assert balance(admin, token) == (first, 0)
    with gpt.responses.stream(model="sim-gpt", input="Say hello", max_output_tokens=2) as stream:
        text = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == "Hello from"
    assert final.usage is not None
    second = cost(SIM_GPT, final.usage.input_tokens, final.usage.output_tokens)
    assert balance(admin, token) == (first + second, 0)


def test_anthropic_message_and_stream(admin: Spendcap, token: str, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="sim-claude", max_tokens=3, messages=[{"role": "user", "content": "Say hello"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "Hello from the"
    first = cost(SIM_CLAUDE, message.usage.input_tokens, message.usage.output_tokens)
    assert balance(admin, token) == (first, 0)
    with claude.messages.stream(
        model="sim-claude", max_tokens=20, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    second = cost(SIM_CLAUDE, final.usage.input_tokens, final.usage.output_tokens)
    assert balance(admin, token) == (first + second, 0)


def test_a_call_over_the_cap_is_refused_before_it_reaches_the_provider(admin: Spendcap, daemon: Daemon) -> None:
    poor = admin.create_agent(unique("poor"), "0.000100").token
    base_url = daemon.env["SPENDCAP_SIM_ANTHROPIC_BASE_URL"]
    claude = anthropic.Anthropic(base_url=base_url, api_key=poor, max_retries=0)
    with claude, pytest.raises(anthropic.APIStatusError) as refused:
        claude.messages.create(model="sim-claude", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 402
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "cap_exceeded"
    gpt = openai.OpenAI(base_url=daemon.env["SPENDCAP_SIM_OPENAI_BASE_URL"], api_key=poor, max_retries=0)
    with gpt, pytest.raises(openai.APIStatusError) as declined:
        gpt.chat.completions.create(model="sim-gpt", messages=[{"role": "user", "content": "Hi"}])
    assert declined.value.status_code == 402
    assert balance(admin, poor) == (0, 0)


def readme_snippet(heading: str) -> str:
    """The first ```python block after `heading` in the repository's README."""
    text = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    fence = text.index("```python\n", start) + len("```python\n")
    return text[fence : text.index("```", fence)]


@pytest.mark.parametrize(
    ("heading", "printed"),
    [("### OpenAI SDK", "Hello from the simulated model,\n"), ("### Anthropic SDK", "Hello from the\n")],
)
def test_the_readme_sdk_snippets(daemon: Daemon, admin: Spendcap, token: str, heading: str, printed: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", readme_snippet(heading)],
        env={**os.environ, **daemon.env, "SPENDCAP_AGENT_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, printed, "")
    spent, held = balance(admin, token)
    assert spent > 0 and held == 0
