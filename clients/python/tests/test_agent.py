"""The agent side against the real daemon paying the simulated x402, ACP and AP2 providers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
import requests

from spendcap import (
    BudgetRefused,
    InvalidRequest,
    PaymentRefused,
    ProviderDeclined,
    Spendcap,
    usd,
)
from spendcap.requests_adapter import mount

from conftest import Daemon

SEARCH = 20_000  # the simulated x402 /search price, micros
REPORT = 450_000  # the simulated ACP merchant's report_market
PROFILE = 300_000  # the simulated AP2 merchant's company profile


def test_hold_then_settle_releases_the_rest(new_agent: Any) -> None:
    _, agent = new_agent("1.00")
    hold = agent.hold("0.20", service="api.openai.com", task="t", idempotency_key="call-1")
    assert (hold.amount_micros, hold.remaining_micros) == (200_000, 800_000)
    again = agent.hold("0.20", service="api.openai.com", task="t", idempotency_key="call-1")
    assert (again.hold_id, again.replayed) == (hold.hold_id, True)
    settled = agent.settle(hold.hold_id, "0.137")
    assert (settled.amount_micros, settled.released_micros) == (137_000, 63_000)
    assert settled.receipt is not None and settled.receipt.amount == Decimal("0.137")
    budget = agent.me()
    assert (budget.spent_micros, budget.held_micros, budget.remaining) == (137_000, 0, Decimal("0.863"))
    with pytest.raises(InvalidRequest) as ended:
        agent.void(hold.hold_id)
    assert ended.value.code == "hold_settled"


def test_spend_settles_the_charge_and_voids_on_an_exception(new_agent: Any) -> None:
    _, agent = new_agent("1.00")
    with agent.spend("0.30", service="api.anthropic.com", task="t") as spending:
        assert agent.me().held_micros == 300_000
        spending.charge("0.12")
    assert spending.settlement is not None and spending.settlement.amount_micros == 120_000

    with pytest.raises(RuntimeError), agent.spend("0.30", service="api.anthropic.com", task="t") as failed:
        raise RuntimeError("the call failed before it cost anything")
    assert failed.voided is not None and failed.voided.released_micros == 300_000

    # A charge that is known is settled even when the block fails afterwards.
    with pytest.raises(RuntimeError), agent.spend("0.30", service="api.anthropic.com", task="t") as charged:
        charged.charge("0.05")
        raise RuntimeError("parsing the answer failed")
    assert charged.settlement is not None and charged.settlement.amount_micros == 50_000

    with agent.spend("0.10", service="api.anthropic.com", task="t"):
        pass  # reports nothing: the whole estimate is spent
    budget = agent.me()
    assert (budget.spent_micros, budget.held_micros) == (120_000 + 50_000 + 100_000, 0)


def test_fetch_pays_within_the_cap_then_raises_the_refusal(daemon: Daemon, new_agent: Any) -> None:
    _, agent = new_agent("0.05")
    paid = agent.fetch(f"{daemon.x402_url}/search", task="t", idempotency_key="search-1")
    assert (paid.status, paid.paid_micros, paid.json()["resource"]) == (200, SEARCH, "/search")
    assert paid.payment is not None and paid.payment.status == "settled" and paid.payment.receipt is not None
    replay = agent.fetch(f"{daemon.x402_url}/search", task="t", idempotency_key="search-1")
    assert replay.replayed and replay.payment is not None and replay.payment.nonce == paid.payment.nonce

    # The upstream's own answers (a 404 here) are results, not errors.
    missing = agent.fetch(f"{daemon.x402_url}/nope", task="t")
    assert (missing.status, missing.payment) == (404, None)

    with pytest.raises(PaymentRefused) as over_max:
        agent.fetch(f"{daemon.x402_url}/search", task="t", max_usd="0.01", idempotency_key="search-2")
    assert over_max.value.code == "x402_over_payment_maximum"

    with pytest.raises(BudgetRefused) as refused:
        agent.fetch(f"{daemon.x402_url}/papers/attention", task="t")
    assert (refused.value.code, refused.value.requested, refused.value.remaining) == (
        "cap_exceeded",
        Decimal("0.4"),
        Decimal("0.03"),
    )
    assert agent.me().spent_micros == SEARCH


def test_an_httpx_client_pays_through_the_transport_and_sees_refusals_as_errors(daemon: Daemon, new_agent: Any) -> None:
    _, agent = new_agent("0.05")
    with httpx.Client(transport=agent.transport(task="poll")) as client:
        first = client.get(f"{daemon.x402_url}/search", params={"q": "a"})
        second = client.get(f"{daemon.x402_url}/search", params={"q": "a"})
        assert (first.status_code, first.json()["resource"], str(first.url)) == (
            200,
            "/search",
            f"{daemon.x402_url}/search?q=a",
        )
        assert first.headers["x-spendcap-payment"] == "settled"
        assert first.headers["x-spendcap-amount-micros"] == str(SEARCH)
        # Two requests are two purchases: the transport gives each its own key.
        assert second.headers["x-spendcap-nonce"] != first.headers["x-spendcap-nonce"]
        assert client.get(f"{daemon.x402_url}/nope").status_code == 404
        with pytest.raises(BudgetRefused) as refused:
            client.get(f"{daemon.x402_url}/papers/scaling")
    assert refused.value.code == "cap_exceeded" and refused.value.remaining_micros == 10_000

    with httpx.Client(transport=agent.transport(raise_refusals=False)) as client:
        answer = client.get(f"{daemon.x402_url}/papers/scaling")
    assert (answer.status_code, answer.headers["x-spendcap-error"]) == (402, "cap_exceeded")
    assert agent.me().spent_micros == 2 * SEARCH


async def test_an_async_httpx_client_pays_through_the_transport(daemon: Daemon, admin: Spendcap) -> None:
    from spendcap import AsyncAgent

    created = admin.create_agent(f"async-transport-{id(admin)}", "0.03")
    async with (
        AsyncAgent(created.token, url=daemon.url) as agent,
        httpx.AsyncClient(transport=agent.transport(task="t")) as client,
    ):
        answer = await client.get(f"{daemon.x402_url}/search")
        assert answer.headers["x-spendcap-amount-micros"] == str(SEARCH)
        with pytest.raises(BudgetRefused):
            await client.get(f"{daemon.x402_url}/search?again=1")
        assert (await agent.me()).spent_micros == SEARCH


def test_a_requests_session_pays_through_the_adapter(daemon: Daemon, new_agent: Any) -> None:
    _, agent = new_agent("0.03")
    session = mount(requests.Session(), agent, task="t")
    answer = session.get(f"{daemon.x402_url}/search", headers={"Authorization": "Bearer upstream-key"})
    assert (answer.status_code, answer.json()["resource"], answer.url) == (200, "/search", f"{daemon.x402_url}/search")
    assert answer.headers["X-Spendcap-Amount-Micros"] == str(SEARCH)
    with pytest.raises(BudgetRefused) as refused:
        session.get(f"{daemon.x402_url}/search?n=2")
    assert refused.value.code == "cap_exceeded"
    assert agent.me().spent_micros == SEARCH


def test_acp_checkout_pays_the_merchant_and_refuses_past_the_cap(daemon: Daemon, new_agent: Any) -> None:
    _, agent = new_agent("1.00")
    order = agent.checkout(daemon.acp_merchant, items=["report_market"], task="t", idempotency_key="report-1")
    assert (order.status, order.amount_micros, order.total) == ("completed", REPORT, {"amount": 45, "currency": "usd"})
    assert order.order["id"] and order.receipt is not None
    again = agent.checkout(daemon.acp_merchant, items=["report_market"], task="t", idempotency_key="report-1")
    assert (again.replayed, again.hold_id) == (True, order.hold_id)

    with pytest.raises(BudgetRefused) as refused:
        agent.checkout(daemon.acp_merchant, items=["dataset_climate"], task="t")
    assert (refused.value.requested_micros, refused.value.remaining_micros) == (990_000, 1_000_000 - REPORT)
    with pytest.raises(ProviderDeclined) as declined:
        agent.checkout(daemon.acp_merchant, items=["no_such_item"], task="t")
    assert declined.value.provider_error is not None and declined.value.provider_error["provider"] == "merchant"
    assert agent.me().spent_micros == REPORT


def test_ap2_pays_within_the_cap_and_the_mandate_budget(daemon: Daemon, new_agent: Any) -> None:
    _, agent = new_agent("0.80")
    key = agent.ap2_key()
    assert key.alg == "ES256"
    mandates = daemon.ap2_mandates(key.jwk)
    open_mandates = {
        "open_checkout_mandate": mandates["open_checkout_mandate"],
        "open_payment_mandate": mandates["open_payment_mandate"],
    }
    paid = [agent.pay(daemon.ap2_checkout(), task="enrich", **open_mandates) for _ in range(2)]
    assert [p.amount_micros for p in paid] == [PROFILE, PROFILE]
    assert all(p.status and p.receipt is not None for p in paid)
    with pytest.raises(BudgetRefused) as refused:
        agent.pay(daemon.ap2_checkout(), task="enrich", **open_mandates)
    assert (refused.value.code, refused.value.remaining) == ("cap_exceeded", Decimal("0.2"))
    assert agent.me().spent == usd("0.60").usd
