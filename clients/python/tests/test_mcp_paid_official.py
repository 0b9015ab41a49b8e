"""Paid MCP tools: an upstream MCP server whose tool is paid with the official x402 package's MCP
binding (`x402.mcp.create_payment_wrapper`, x402 2.25: the tool answers an unpaid call with an
`isError` result carrying `PaymentRequired`, verifies the payment in `_meta["x402/payment"]` with
x402's own facilitator and settles it, reporting in `_meta["x402/payment-response"]`), served over
streamable HTTP by the official `mcp` SDK's low-level server. The daemon fronts it
(`SPENDCAP_MCP_UPSTREAMS`), pays within the agent's cap, and hands back the tool's real result,
both from `POST /v1/mcp/call` and from `spendcap mcp` (stdio) driven by the official `mcp` client.
Only the chain is local (`LocalChain`, as in test_x402_official.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import mcp_types as types
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.server.lowlevel.server import Server
from x402 import x402Facilitator, x402ResourceServer
from x402.mcp.server_async import PaymentWrapperConfig, create_payment_wrapper
from x402.mcp.types import MCPToolResult
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator
from x402.schemas import PaymentRequirements

from served import Served
from spendcap import Spendcap
from test_x402_official import NETWORK, PAY_TO, USDC, LocalChain

from conftest import REPO, Daemon, binary, start_daemon, unique

PRICE_ATOMIC = 10_000  # $0.01 in USDC's 6 decimals: 10,000 micro-USD


class PaidWeatherMcp:
    """An MCP server with one paid tool (`get_forecast`, $0.01) and one free tool named like one
    of spendcap's own (`get_budget`, so the daemon offers it prefixed)."""

    def __init__(self) -> None:
        self.chain = LocalChain()
        facilitator = x402Facilitator()
        register_exact_evm_facilitator(facilitator, self.chain, networks=NETWORK)
        resource_server = x402ResourceServer(facilitator)
        resource_server.register(NETWORK, ExactEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]
        resource_server.initialize()  # learns what the facilitator supports
        accepts = [
            PaymentRequirements(
                scheme="exact",
                network=NETWORK,
                asset=USDC,
                amount=str(PRICE_ATOMIC),
                pay_to=PAY_TO,
                max_timeout_seconds=300,
                extra={"name": "USDC", "version": "2"},
            )
        ]
        self.calls = 0  # every tools/call of get_forecast
        self.paid_calls = 0  # those that carried a payment
        self.served = 0  # the tool's own handler ran (verified payment)

        async def forecast(args: dict[str, Any], _context: Any) -> dict[str, Any]:
            self.served += 1
            return {"content": [{"type": "text", "text": json.dumps({"city": args["city"], "sky": "clear"})}]}

        # x402's annotations type the wrapper's input handler, not the wrapped one it returns.
        paid: Any = create_payment_wrapper(resource_server, PaymentWrapperConfig(accepts=accepts))(forecast)

        async def list_tools(_ctx: Any, _params: Any) -> types.ListToolsResult:
            schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            return types.ListToolsResult(
                tools=[
                    types.Tool(
                        name="get_forecast", description="Tomorrow's sky in a city ($0.01)", input_schema=schema
                    ),
                    types.Tool(name="get_budget", description="A free tool", input_schema={"type": "object"}),
                ]
            )

        async def call_tool(_ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            if params.name != "get_forecast":
                return types.CallToolResult(content=[types.TextContent(type="text", text="free")])
            meta = dict(params.meta or {})
            self.calls += 1
            self.paid_calls += "x402/payment" in meta
            result: MCPToolResult = await paid(params.arguments or {}, {"_meta": meta, "toolName": "get_forecast"})
            return types.CallToolResult.model_validate(
                {
                    "content": result.content,
                    "isError": result.is_error,
                    "structuredContent": result.structured_content,
                    "_meta": result.meta or None,
                }
            )

        server = Server("paid-weather", on_list_tools=list_tools, on_call_tool=call_tool)
        app = server.streamable_http_app(stateless_http=True, json_response=True)
        self.http = Served(app, "the paid MCP server")
        self.url = f"http://127.0.0.1:{self.http.port}/mcp"


@pytest.fixture(scope="module")
def upstream() -> Iterator[PaidWeatherMcp]:
    server = PaidWeatherMcp()
    yield server
    server.http.stop()


@pytest.fixture(scope="module")
def fronting(upstream: PaidWeatherMcp) -> Iterator[Daemon]:
    """A daemon that fronts the paid MCP server as upstream `weather`."""
    process, env = start_daemon({"SPENDCAP_MCP_UPSTREAMS": f"weather={upstream.url}"})
    try:
        yield Daemon(env)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def new_agent(daemon: Daemon, cap: str) -> tuple[str, str]:
    with Spendcap(daemon.admin_token, url=daemon.url) as admin:
        created = admin.create_agent(unique("mcp"), cap)
        return created.agent.id, created.token


def call(daemon: Daemon, token: str, key: str, city: str = "Paris") -> httpx.Response:
    body = {"upstream": "weather", "tool": "get_forecast", "arguments": {"city": city}, "task": "weather"}
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    return httpx.post(f"{daemon.url}/v1/mcp/call", json=body, headers=headers, timeout=60)


def spent(daemon: Daemon, token: str) -> int:
    me = httpx.get(f"{daemon.url}/v1/me", headers={"Authorization": f"Bearer {token}"}).raise_for_status().json()
    return int(me["spent_micros"])


def test_the_upstream_tools_are_offered_unchanged_and_prefixed_only_on_a_collision(
    fronting: Daemon, upstream: PaidWeatherMcp
) -> None:
    _, token = new_agent(fronting, "0.05")
    listed = httpx.get(f"{fronting.url}/v1/mcp/tools", headers={"Authorization": f"Bearer {token}"})
    tools = {tool["tool"]["name"]: tool for tool in listed.raise_for_status().json()["tools"]}
    assert set(tools) == {"get_forecast", "weather__get_budget"}
    forecast = tools["get_forecast"]
    assert (forecast["upstream"], forecast["upstream_tool"]) == ("weather", "get_forecast")
    assert forecast["tool"]["description"] == "Tomorrow's sky in a city ($0.01)"
    assert forecast["tool"]["inputSchema"]["required"] == ["city"]
    assert tools["weather__get_budget"]["upstream_tool"] == "get_budget"


def test_a_paid_tool_is_paid_once_within_the_cap_and_its_real_result_returned(
    fronting: Daemon, upstream: PaidWeatherMcp
) -> None:
    _, token = new_agent(fronting, "0.025")
    transfers = len(upstream.chain.transfers)
    first = call(fronting, token, "forecast-1")
    assert first.status_code == 200, first.text
    body = first.json()
    assert json.loads(body["result"]["content"][0]["text"]) == {"city": "Paris", "sky": "clear"}
    assert not body["result"].get("isError")
    payment = body["payment"]
    assert payment["status"] == "settled" and payment["amount_micros"] == PRICE_ATOMIC
    payer, to, value, nonce = upstream.chain.transfers[payment["transaction"]]
    assert payer == (payment.get("payer") or "").lower()
    assert (to, value, nonce) == (PAY_TO.lower(), PRICE_ATOMIC, payment["nonce"].lower())
    assert spent(fronting, token) == PRICE_ATOMIC

    # The same key again is the same purchase: replayed, the upstream is not paid twice.
    served = upstream.served
    again = call(fronting, token, "forecast-1")
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["result"] == body["result"]
    assert (len(upstream.chain.transfers), upstream.served) == (transfers + 1, served)
    assert spent(fronting, token) == PRICE_ATOMIC


def test_over_the_cap_nothing_is_signed(fronting: Daemon, upstream: PaidWeatherMcp) -> None:
    _, token = new_agent(fronting, "0.005")
    paid_calls, transfers = upstream.paid_calls, len(upstream.chain.transfers)
    refused = call(fronting, token, "forecast-over")
    assert refused.status_code == 402
    assert refused.json()["code"] == "cap_exceeded"
    # The upstream was asked unpaid (to learn the price), never sent a payment.
    assert (upstream.paid_calls, len(upstream.chain.transfers)) == (paid_calls, transfers)
    assert spent(fronting, token) == 0


def test_a_revoked_agent_reaches_no_upstream(fronting: Daemon, upstream: PaidWeatherMcp) -> None:
    agent, token = new_agent(fronting, "0.05")
    with Spendcap(fronting.admin_token, url=fronting.url) as admin:
        admin.revoke(agent, "run_over")
    calls = upstream.calls
    refused = call(fronting, token, "forecast-revoked")
    assert refused.status_code in (402, 403)
    assert refused.json()["code"] == "agent_revoked"
    assert upstream.calls == calls


def test_spendcap_mcp_offers_and_pays_the_upstream_tool_over_stdio(fronting: Daemon, upstream: PaidWeatherMcp) -> None:
    _, token = new_agent(fronting, "0.015")
    params = StdioServerParameters(
        command=binary(), args=["mcp"], env={"SPENDCAP_URL": fronting.url, "SPENDCAP_AGENT_TOKEN": token}
    )

    async def session() -> tuple[set[str], Any, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            names = {tool.name for tool in (await client.list_tools()).tools}
            meta: Any = {"spendcap/task": "weather", "spendcap/idempotency_key": "stdio-1"}
            paid = await client.call_tool("get_forecast", {"city": "Lyon"}, meta=meta)
            meta = {"spendcap/task": "weather", "spendcap/idempotency_key": "stdio-2"}
            refused = await client.call_tool("get_forecast", {"city": "Nice"}, meta=meta)
            return names, paid, refused

    names, paid, refused = asyncio.run(session())
    assert {"get_forecast", "weather__get_budget", "get_budget", "paid_fetch"} <= names
    assert not paid.is_error
    assert json.loads(paid.content[0].text) == {"city": "Lyon", "sky": "clear"}
    assert (paid.meta or {})["spendcap/payment"]["status"] == "settled"
    # The second call is past the cap: spendcap's refusal result, not the upstream's.
    assert refused.is_error
    assert refused.structured_content["code"] == "cap_exceeded"
    assert refused.structured_content["refusal"] is True
    assert spent(fronting, token) == PRICE_ATOMIC


def readme_blocks(marker: str, count: int) -> list[str]:
    """The ```sh blocks that follow `<!-- marker` in the README."""
    text = (REPO / "README.md").read_text()
    at = text.index(f"<!-- {marker}")
    blocks = []
    for _ in range(count):
        fence = text.index("```sh\n", at) + len("```sh\n")
        at = text.index("```", fence)
        blocks.append(text[fence:at])
    return blocks


def test_the_readme_paid_mcp_configuration_and_calls_run_as_written(upstream: PaidWeatherMcp) -> None:
    configure, calls = readme_blocks("paid-mcp", 2)
    # The configuration block, run in a shell: the environment it leaves is the daemon's.
    configure = configure.replace("https://weather.example/mcp", upstream.url)
    shell = subprocess.run(["bash", "-c", f"{configure}\nenv -0"], capture_output=True, check=True)
    env = dict(entry.split("=", 1) for entry in shell.stdout.decode().split("\0") if "=" in entry)
    process, exports = start_daemon({"SPENDCAP_MCP_UPSTREAMS": env["SPENDCAP_MCP_UPSTREAMS"]})
    try:
        daemon = Daemon(exports)
        _, token = new_agent(daemon, "0.05")
        host = daemon.url.removeprefix("http://")
        transfers = len(upstream.chain.transfers)
        ran = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + calls.replace("localhost:8402", host)],
            capture_output=True,
            text=True,
            env={**os.environ, "AGENT_TOKEN": token},
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        listed, paid = ran.stdout.strip().splitlines()[-3:-1], ran.stdout.strip().splitlines()[-1]
        assert '["weather","get_forecast","get_forecast"]' in listed, ran.stdout
        text, status, amount = json.loads(paid)
        assert (json.loads(text), status, amount) == ({"city": "Paris", "sky": "clear"}, "settled", PRICE_ATOMIC)
        assert len(upstream.chain.transfers) == transfers + 1
    finally:
        process.terminate()
        process.wait(timeout=10)
