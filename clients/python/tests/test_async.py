"""The async clients: the same surface as the sync ones, against the same real daemon."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from spendcap import AsyncAgent, AsyncSpendcap, BudgetRefused

from conftest import Daemon, unique


async def test_the_async_run_pays_hits_the_cap_and_is_revoked(daemon: Daemon) -> None:
    async with AsyncSpendcap(daemon.admin_token, url=daemon.url) as admin:
        async with admin.run(cap="0.05", handle=unique("async-run")) as agent:
            assert isinstance(agent, AsyncAgent)
            run_id = agent.id or ""
            # Concurrent fetches: the cap holds whatever the interleaving.
            results = await asyncio.gather(
                *(agent.fetch(f"{daemon.x402_url}/search?n={n}", task="t") for n in range(4)),
                return_exceptions=True,
            )
            paid = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BudgetRefused)]
            assert (len(paid), len(refused)) == (2, 2)
            assert all(r.code == "cap_exceeded" for r in refused)
            budget = await agent.me()
            assert (budget.spent, budget.held_micros) == (Decimal("0.04"), 0)

            async with agent.spend("0.01", service="api.openai.com", task="t") as spending:
                spending.charge("0.004")
            assert (await agent.me()).spent_micros == 44_000
        assert (await admin.agent(run_id)).revoked == "run_ended"

        settles = [line async for line in admin.log(agent=run_id) if line["event"] == "settle"]
        assert sorted(line["amount"] for line in settles) == [4_000, 20_000, 20_000]
        receipts = await admin.receipts(run_id)
        assert (await admin.verify_receipts(receipts)).receipts == 3


async def test_async_errors_are_the_same_types(daemon: Daemon) -> None:
    async with AsyncSpendcap(daemon.admin_token, url=daemon.url) as admin:
        created = await admin.create_agent(unique("async-err"), "0.10")
        async with admin.agent_client(created.token) as agent:
            await admin.revoke(created.agent.id, "test")
            with pytest.raises(BudgetRefused) as refused:
                await agent.hold("0.01", service="api.openai.com")
            assert refused.value.code == "agent_revoked"


async def test_the_async_orchestrator_funds_and_revokes_a_sub_agent(daemon: Daemon) -> None:
    async with (
        AsyncSpendcap(daemon.admin_token, url=daemon.url) as admin,
        admin.run(cap="0.10", handle=unique("async-lead")) as lead,
    ):
        helper = await lead.create_sub_agent(unique("async-helper"), "0.04")
        assert [a.id for a in await lead.sub_agents()] == [helper.agent.id]
        scoped = await lead.task_token("async-task", 60, agent=helper.agent.id)
        async with AsyncAgent(scoped.token, url=daemon.url) as worker:
            await worker.fetch(f"{daemon.x402_url}/search?q=async", task="other")
            revoked = await lead.revoke_sub_agent(helper.agent.id, "done")
            assert revoked.already_revoked is False
            with pytest.raises(BudgetRefused) as refused:
                await worker.fetch(f"{daemon.x402_url}/search?q=again")
            assert refused.value.code == "agent_revoked"
        settles = [line async for line in admin.log(agent=helper.agent.id) if line["event"] == "settle"]
        assert [(line["task"], line["amount"]) for line in settles] == [("async-task", 20_000)]
