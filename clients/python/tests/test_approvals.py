"""Approval holds through the Python client: a payment an approval rule matches raises
`ApprovalRequired` (held, nothing sent); the agent waits for the decision and repeats the call with
the same idempotency key to pay from the reservation, or gets `ApprovalRefused`."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from spendcap import ApprovalRefused, ApprovalRequired, Spendcap


def test_a_payment_waits_for_approval_and_resumes_from_its_reservation(admin: Spendcap, new_agent: Any) -> None:
    info, agent = new_agent("10.00")
    admin.set_controls(info.id, {"approval": {"above_micros": 1_000_000, "ttl_secs": 600}})
    with pytest.raises(ApprovalRequired) as waiting:
        agent.hold("2.50", service="api.example.com", task="t", idempotency_key="big-1")
    asked = waiting.value
    assert (asked.status, asked.reason, asked.amount, asked.idempotency_key) == (
        202,
        "above_amount",
        Decimal("2.5"),
        "big-1",
    )
    assert agent.me().held_micros == 2_500_000
    pending = [a["approval_id"] for a in admin.approvals("pending") if a["agent"] == info.id]
    assert pending == [asked.approval_id]
    # The agent finds it too (another process resuming the run, say), and only its own.
    assert [a["approval_id"] for a in agent.approvals("pending")] == [asked.approval_id]

    # A person approves while the agent waits (the long-poll wakes on the decision).
    def approve_soon() -> None:
        time.sleep(0.3)
        admin.approve(asked.approval_id, "fine")

    threading.Thread(target=approve_soon).start()
    decided = agent.wait_for_approval(asked.approval_id, wait_secs=20)
    assert (decided["state"], decided["note"]) == ("approved", "fine")
    hold = agent.hold("2.50", service="api.example.com", task="t", idempotency_key="big-1")
    assert hold.hold_id == asked.approval_id
    agent.settle(hold.hold_id, "2.00")
    budget = agent.me()
    assert (budget.spent_micros, budget.held_micros) == (2_000_000, 0)


def test_a_denied_payment_is_refused_and_its_money_released(admin: Spendcap, new_agent: Any) -> None:
    info, agent = new_agent("10.00")
    admin.set_controls(info.id, {"approval": {"services": ["*.casino.example"]}})
    with pytest.raises(ApprovalRequired) as waiting:
        agent.hold("1.00", service="slots.casino.example", idempotency_key="bet")
    admin.deny(waiting.value.approval_id, "no gambling")
    assert agent.me().held_micros == 0
    with pytest.raises(ApprovalRefused) as refused:
        agent.hold("1.00", service="slots.casino.example", idempotency_key="bet")
    assert (refused.value.status, refused.value.code) == (403, "approval_denied")
