"""The README's Python, LangChain and OpenAI Agents SDK snippets, extracted verbatim from
README.md and run against `spendcap demo --providers-only`. The framework snippets get `model`
(the reader's own chat model) as a scripted model; everything else is the snippet's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, BaseMessage

from conftest import REPO, Daemon
from scripted import ScriptedChatModel, agents_sdk_model, call, function_call, function_outputs, message

README = REPO / "README.md"
CLIENT_README = REPO / "clients" / "python" / "README.md"


def snippet(heading: str, readme: Path = README) -> str:
    """The first ```python block after `heading` in the README."""
    text = readme.read_text()
    start = text.index(f"\n{heading}\n")
    fence = text.index("```python\n", start) + len("```python\n")
    return text[fence : text.index("```", fence)]


def admin_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in daemon.env.items():
        monkeypatch.setenv(name, value)


def test_the_python_snippet_runs_the_pattern_and_stops_at_the_cap(daemon: Daemon) -> None:
    code = snippet("### Python")
    assert len(code.strip().splitlines()) <= 12
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **daemon.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "cap_exceeded 0.000000\n", "")


def test_the_orchestrators_snippet_funds_a_sub_agent_and_pays_with_a_task_token(daemon: Daemon) -> None:
    done = subprocess.run(
        [sys.executable, "-c", snippet("## Orchestrators")],
        env={**os.environ, **daemon.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "sub_agent_exceeds_parent cap\n1 20000\n", "")
    # The payment was the task token's task, whatever the fetch named.
    admin = {"Authorization": f"Bearer {daemon.admin_token}"}
    entries = [json.loads(line) for line in httpx.get(f"{daemon.url}/v1/log", headers=admin).text.splitlines()]
    settled = [e for e in entries if e.get("event") == "settle" and e.get("task") == "summarise-q3"]
    assert [e["amount"] for e in settled] == [20000], settled


def test_the_client_readme_quick_start(daemon: Daemon) -> None:
    done = subprocess.run(
        [sys.executable, "-c", snippet("## Quick start", CLIENT_README)],
        env={**os.environ, **daemon.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "200 0.020000\ncap_exceeded 0.400000 0.030000\n", "")


def the_refusal(messages: list[BaseMessage]) -> AIMessage:
    """What the scripted model says once it has read the last tool result."""
    return AIMessage(content=f"stopping: {json.loads(str(messages[-1].content))['code']}")


def test_the_langchain_snippet(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin_env(daemon, monkeypatch)
    search = f"{daemon.x402_url}/search"
    model = ScriptedChatModel(
        messages=iter(
            [
                call("get_budget", "c1"),
                call("paid_fetch", "c2", url=f"{search}?q=attention"),
                call("paid_fetch", "c3", url=f"{search}?q=transformers"),
                call("paid_fetch", "c4", url=f"{daemon.x402_url}/papers/attention"),
                the_refusal,
            ]
        )
    )
    namespace: dict[str, Any] = {"model": model}
    exec(snippet("### LangChain"), namespace)
    assert capsys.readouterr().out == "stopping: cap_exceeded\n"
    paid = [m for m in model.seen[-1] if getattr(m, "tool_call_id", None) in ("c2", "c3")]
    assert [json.loads(str(m.content))["paid_usd"] for m in paid] == ["0.02", "0.02"]


def test_the_agents_sdk_snippet(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agents import set_tracing_disabled

    set_tracing_disabled(True)
    admin_env(daemon, monkeypatch)
    search = f"{daemon.x402_url}/search"
    fetch_args = {"method": "GET", "body": None, "max_usd": None}
    model = agents_sdk_model(
        [
            [function_call("paid_fetch", "c1", url=f"{search}?q=attention", **fetch_args)],
            [function_call("paid_fetch", "c2", url=f"{search}?q=transformers", **fetch_args)],
            [function_call("paid_fetch", "c3", url=f"{daemon.x402_url}/papers/attention", **fetch_args)],
            lambda model_input: [message(f"stopping: {function_outputs(model_input)['c3']['code']}")],
        ]
    )
    namespace: dict[str, Any] = {"model": model}
    exec(snippet("### OpenAI Agents SDK"), namespace)
    assert capsys.readouterr().out == "stopping: cap_exceeded\n"
    assert function_outputs(model.inputs[-1])["c1"]["paid_usd"] == "0.02"


def paid_search(daemon: Daemon) -> list[int]:
    """The amounts of every settle entry for the README's task `research-7`, in log order."""
    admin = {"Authorization": f"Bearer {daemon.admin_token}"}
    entries = [json.loads(line) for line in httpx.get(f"{daemon.url}/v1/log", headers=admin).text.splitlines()]
    return [e["amount"] for e in entries if e.get("event") == "settle" and e.get("task") == "research-7"]


def test_the_langchain_approvals_snippet(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin_env(daemon, monkeypatch)
    before = paid_search(daemon)
    model = ScriptedChatModel(
        messages=iter(
            [
                call("paid_fetch", "a1", url=f"{daemon.x402_url}/search?q=attention"),
                lambda messages: AIMessage(content=f"paid {json.loads(str(messages[-1].content))['paid_usd']}"),
            ]
        )
    )
    exec(snippet("#### Approvals in LangChain"), {"model": model})
    assert capsys.readouterr().out == "approve? 0.02 above_amount\npaid 0.02\n"
    assert paid_search(daemon) == [*before, 20_000]


def test_the_agents_sdk_approvals_snippet(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agents import set_tracing_disabled

    set_tracing_disabled(True)
    admin_env(daemon, monkeypatch)
    before = paid_search(daemon)
    fetch_args = {"method": "GET", "body": None, "max_usd": None}
    model = agents_sdk_model(
        [
            [function_call("paid_fetch", "a1", url=f"{daemon.x402_url}/search?q=attention", **fetch_args)],
            lambda model_input: [message(f"paid {function_outputs(model_input)['a1']['paid_usd']}")],
        ]
    )
    exec(snippet("#### Approvals in the OpenAI Agents SDK"), {"model": model})
    assert capsys.readouterr().out == "approve? 0.02 above_amount\npaid 0.02\n"
    assert paid_search(daemon) == [*before, 20_000]
