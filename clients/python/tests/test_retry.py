"""OutcomeUnknown: when a paying call's answer is lost after the daemon acted, the client sends it
again with the same idempotency key, a bounded number of times, and the money moves once.

A small HTTP relay sits between the client and the real daemon; it forwards every request and
replaces the first answers to paying calls with what a lost outcome looks like."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from spendcap import Agent, OutcomeUnknown, TransportError

from conftest import Daemon

REPORT = 450_000


class Relay:
    def __init__(self, daemon_url: str) -> None:
        self.daemon_url = daemon_url
        self.lose = 0  # answers to paying calls still to lose
        self.mode = "outcome_unknown"  # or "drop": close the connection without answering
        self.forwarded: list[tuple[str, str | None]] = []
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.relay()

            def do_POST(self) -> None:
                self.relay()

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(
                    self.command, relay.daemon_url + self.path, headers=headers, content=body, timeout=30
                )
                relay.forwarded.append((self.path, self.headers.get("idempotency-key")))
                if self.command == "POST" and relay.lose > 0:
                    relay.lose -= 1
                    if relay.mode == "drop":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.answer(504, b'{"code":"ledger_outcome_unknown","detail":"the answer was lost"}')
                    return
                self.answer(answer.status_code, answer.content)

            def answer(self, status: int, content: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def relay(daemon: Daemon) -> Iterator[Relay]:
    relay = Relay(daemon.url)
    yield relay
    relay.server.shutdown()
    relay.server.server_close()


def test_a_lost_answer_is_retried_with_the_same_key_and_pays_once(daemon: Daemon, new_agent: Any, relay: Relay) -> None:
    _, direct = new_agent("1.00")
    agent = Agent(direct.token, url=relay.url, outcome_retries=3)
    relay.lose = 2
    order = agent.checkout(daemon.acp_merchant, items=["report_market"], task="t", idempotency_key="lost-1")
    assert (order.amount_micros, order.replayed) == (REPORT, True)
    checkouts = [f for f in relay.forwarded if f[0] == "/v1/acp/checkouts"]
    assert checkouts == [("/v1/acp/checkouts", "lost-1")] * 3
    assert direct.me().spent_micros == REPORT


def test_a_hold_without_a_key_gets_one_so_its_retry_holds_once(new_agent: Any, relay: Relay) -> None:
    _, direct = new_agent("1.00")
    agent = Agent(direct.token, url=relay.url)
    relay.lose = 1
    relay.mode = "drop"
    hold = agent.hold("0.25", service="api.openai.com")
    assert hold.replayed
    keys = {key for path, key in relay.forwarded if path == "/v1/holds"}
    assert len(keys) == 1 and None not in keys
    assert direct.me().held_micros == 250_000


def test_retries_are_bounded_then_outcome_unknown_is_raised(daemon: Daemon, new_agent: Any, relay: Relay) -> None:
    _, direct = new_agent("1.00")
    agent = Agent(direct.token, url=relay.url, outcome_retries=2)
    relay.lose = 10
    with pytest.raises(OutcomeUnknown) as unknown:
        agent.fetch(f"{daemon.x402_url}/search", task="t", idempotency_key="bounded-1")
    assert unknown.value.code == "ledger_outcome_unknown"
    assert [key for path, key in relay.forwarded if path == "/v1/x402/fetch"] == ["bounded-1"] * 3
    # The payment happened once, whatever the client saw.
    assert direct.me().spent_micros == 20_000

    relay.mode = "drop"
    with pytest.raises(TransportError):
        agent.fetch(f"{daemon.x402_url}/search", task="t", idempotency_key="bounded-2")
    assert direct.me().spent_micros == 40_000
