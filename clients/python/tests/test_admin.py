"""The admin side against the real daemon: agents, caps, revocation, tokens, outcomes, reports,
the streamed log, receipts and their verification, and the run context manager."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

from spendcap import (
    AuthError,
    BudgetRefused,
    InvalidRequest,
    Receipt,
    ReceiptInvalid,
    Spendcap,
    usd,
)

from conftest import Daemon, unique


def test_dollars_go_in_exactly_and_come_back_as_micros_and_decimal(admin: Spendcap) -> None:
    handle = unique("exact")
    created = admin.create_agent(handle, "1.50", labels={"team": "research"})
    assert created.agent.cap_micros == 1_500_000
    assert created.agent.cap == Decimal("1.50")
    assert created.token.startswith("sct_")
    assert "sct_" not in repr(created)

    child = admin.create_agent(unique("child"), Decimal("0.25"), parent=handle)
    assert (child.agent.parent, child.agent.depth, child.agent.cap_micros) == (created.agent.id, 2, 250_000)
    assert admin.set_cap(handle, usd("2.000001")).cap_micros == 2_000_001
    shown = admin.agent(handle)
    assert (shown.id, shown.labels, shown.cap) == (created.agent.id, {"team": "research"}, Decimal("2.000001"))
    assert {a.id for a in admin.agents()} >= {created.agent.id, child.agent.id}


def test_floats_and_sub_micro_amounts_are_refused_before_anything_is_sent(admin: Spendcap) -> None:
    handle = unique("float")
    with pytest.raises(TypeError):
        admin.create_agent(handle, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finer than one micro-dollar"):
        admin.create_agent(handle, "0.0000001")
    with pytest.raises(InvalidRequest) as refused:
        admin.agent(handle)
    assert refused.value.code == "unknown_agent"


def test_bad_input_is_a_typed_error_with_the_daemons_code(admin: Spendcap) -> None:
    with pytest.raises(InvalidRequest) as bad:
        admin.create_agent("Not A Handle", "1.00")
    assert (bad.value.status, bad.value.code) == (422, "invalid_handle")
    handle = unique("dup")
    admin.create_agent(handle, "1.00")
    with pytest.raises(InvalidRequest) as taken:
        admin.create_agent(handle, "1.00")
    assert (taken.value.status, taken.value.code) == (409, "handle_taken")
    with pytest.raises(AuthError) as auth:
        Spendcap("not-the-admin-token-" + "x" * 20, url=admin.url).agents()
    assert (auth.value.status, auth.value.code) == (401, "invalid_token")


def test_revocation_refuses_the_next_payment_of_the_agent_and_its_sub_agents(admin: Spendcap, new_agent: Any) -> None:
    parent, parent_client = new_agent("1.00")
    _, child_client = new_agent("0.50", parent=parent.id)
    parent_client.hold("0.10", service="api.example.com").hold_id  # pays fine before
    revoked = admin.revoke(parent.handle, "runaway_loop")
    assert (revoked.reason, revoked.already_revoked) == ("runaway_loop", False)
    for client in (parent_client, child_client):
        with pytest.raises(BudgetRefused) as refused:
            client.hold("0.01", service="api.example.com")
        assert refused.value.code == "agent_revoked"
        assert refused.value.requested_micros == 10_000
    assert admin.agent(parent.id).revoked == "runaway_loop"


def test_a_rotated_token_stops_at_once(admin: Spendcap, new_agent: Any) -> None:
    info, old = new_agent("1.00")
    rotated = admin.rotate_token(info.handle)
    assert rotated.token != old.token
    with pytest.raises(AuthError):
        old.me()
    assert admin.agent_client(rotated.token).me().cap_micros == 1_000_000


def test_the_run_is_revoked_when_the_block_exits_whatever_the_exit(admin: Spendcap, daemon: Daemon) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), admin.run(cap="1.50", handle=unique("run")) as agent:
        assert agent.info is not None
        run_id = agent.info.id
        token = agent.token
        assert agent.me().cap == Decimal("1.50")
        raise Boom
    assert admin.agent(run_id).revoked == "run_ended"
    with pytest.raises(BudgetRefused) as refused:
        admin.agent_client(token).fetch(f"{daemon.x402_url}/search", task="after-run")
    assert refused.value.code == "agent_revoked"

    with admin.run(cap="0.10", reason="done") as agent:
        run_id = agent.id or ""
    assert admin.agent(run_id).revoked == "done"


def test_outcomes_reports_log_and_receipts(admin: Spendcap, new_agent: Any) -> None:
    info, agent = new_agent("5.00")
    for n, cost in enumerate(("0.40", "0.60", "0.50")):
        task = f"task-{n}"
        with agent.spend("1.00", service="api.openai.com", task=task) as spending:
            spending.charge(cost)
        agent.record_outcome(task, "success", task_type="summarize")
    admin.record_outcome(info.handle, "task-9", "failed", task_type="summarize")

    report = admin.report(agent=info.id)
    row = next(r for r in report["task_types"] if r["task_type"] == "summarize")
    assert (row["successes"], row["failed"]) == (3, 1)
    assert row["success_cost"]["median_micros"] == 500_000
    assert row["suggested_cap_micros"] == 1_250_000

    lines = list(admin.log(agent=info.id))
    settles = [line["amount"] for line in lines if line["event"] == "settle"]
    assert settles == [400_000, 600_000, 500_000]
    assert [line["event"] for line in lines].count("outcome") == 4
    csv = list(admin.log_csv(agent=info.id))
    assert csv[0].startswith("id,") and len([c for c in csv[1:] if c]) == len(lines)

    receipts = admin.receipts(info.handle)
    assert [r.amount_micros for r in receipts] == [400_000, 600_000, 500_000]
    assert admin.verify_receipts(receipts).receipts == 3
    edited = dataclasses.replace(receipts[1], receipt={**receipts[1].receipt, "amount_micros": 1})
    with pytest.raises(ReceiptInvalid):
        admin.verify_receipts([receipts[0], edited, receipts[2]])
    with pytest.raises(ReceiptInvalid, match="missing or out of order"):
        admin.verify_receipts([receipts[0], receipts[2]])
    assert isinstance(receipts[0], Receipt)


def test_a_plain_int_is_refused_as_ambiguous_and_usd_says_dollars(admin: Spendcap) -> None:
    with pytest.raises(TypeError, match="ambiguous"):
        admin.create_agent(unique("int"), 5)  # type: ignore[arg-type]
    assert admin.create_agent(unique("int"), usd(5)).agent.cap_micros == 5_000_000


def test_operator_tokens_have_roles_and_stop_when_revoked(admin: Spendcap, daemon: Daemon) -> None:
    handle = unique("watched")
    admin.create_agent(handle, "2.00")
    name = unique("oncall")
    created = admin.create_operator(name, "operator", tree=handle)
    assert created["token"].startswith("sco_op_") and created["role"] == "operator"
    assert any(o["name"] == name and "token" not in o for o in admin.operators())
    with Spendcap(created["token"], url=daemon.url) as oncall:
        me = oncall.whoami()
        assert (me["name"], me["role"], me["tighten_only"]) == (
            name,
            "operator",
            ["set_cap", "set_controls", "set_expiry"],
        )
        assert oncall.set_cap(handle, "1.00").cap_micros == 1_000_000
        with pytest.raises(AuthError) as raised:
            oncall.set_cap(handle, "3.00")
        assert (raised.value.status, raised.value.code) == (403, "role_forbidden")
        assert admin.agent(handle).cap_micros == 1_000_000
        assert admin.revoke_operator(name)["already_revoked"] is False
        with pytest.raises(AuthError) as gone:
            oncall.whoami()
        assert (gone.value.status, gone.value.code) == (401, "invalid_token")
    assert admin.whoami()["role"] == "admin"
