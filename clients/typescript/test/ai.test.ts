/**
 * The Vercel AI SDK tools through the SDK's own tool-calling loop (`generateText` with a scripted
 * `MockLanguageModelV3`, `stopWhen`), against the real daemon and its simulated providers: the
 * run pays, a re-executed tool call does not pay twice, the cap refuses, and the model reads the
 * refusal as a short structured result.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Spendcap } from "@spendcap/client";
import { spendcapTools } from "@spendcap/client/ai";
import { generateText, stepCountIs } from "ai";

import { type Daemon, postJson, start } from "./daemon.js";
import { scriptedModel, toolResultsSeen } from "./model.js";

let daemon: Daemon;
let admin: Spendcap;

before(async () => {
  daemon = await start();
  admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
});

after(async () => {
  await daemon.stop();
});

test("the model pays with paid_fetch until the cap refuses, and reads the refusal", async () => {
  const x402 = daemon.env.SPENDCAP_SIM_X402_URL;
  await admin.run({ cap: "1.00" }, async (agent) => {
    const model = scriptedModel([
      [{ id: "call-budget", tool: "get_budget", input: {} }],
      [{ id: "call-1", tool: "paid_fetch", input: { url: `${x402}/papers/scaling` } }],
      // The same tool call executed again (a retried step): the same payment, not a second one.
      [{ id: "call-1", tool: "paid_fetch", input: { url: `${x402}/papers/scaling` } }],
      // A new call for the same URL is a new purchase.
      [{ id: "call-2", tool: "paid_fetch", input: { url: `${x402}/papers/scaling` } }],
      [{ id: "call-3", tool: "paid_fetch", input: { url: `${x402}/papers/attention` } }],
      "I have run out of budget, so I stop here.",
    ]);
    const result = await generateText({
      model,
      tools: spendcapTools(agent, { task: "research-1" }),
      stopWhen: stepCountIs(10),
      prompt: "Read the papers.",
    });
    assert.equal(result.text, "I have run out of budget, so I stop here.");
    assert.equal(model.doGenerateCalls.length, 6, "the loop ran every scripted step");

    assert.deepEqual(toolResultsSeen(model, 1).get("call-budget"), {
      ok: true,
      cap_usd: "1.00",
      spent_usd: "0.00",
      held_usd: "0.00",
      remaining_usd: "1.00",
      revoked: null,
      suspended: null,
    });
    const first = toolResultsSeen(model, 2).get("call-1") as Record<string, unknown>;
    assert.deepEqual([first.ok, first.status, first.paid_usd, first.replayed], [true, 200, "0.35", false]);
    const again = toolResultsSeen(model, 3).get("call-1") as Record<string, unknown>;
    assert.deepEqual([again.paid_usd, again.replayed], ["0.35", true]);
    const second = toolResultsSeen(model, 4).get("call-2") as Record<string, unknown>;
    assert.deepEqual([second.paid_usd, second.replayed], ["0.35", false]);

    const refusal = toolResultsSeen(model, 5).get("call-3") as Record<string, unknown>;
    assert.equal(refusal.ok, false);
    assert.equal(refusal.code, "cap_exceeded");
    assert.equal(refusal.requested_usd, "0.40");
    assert.equal(refusal.remaining_usd, "0.30");
    assert.equal(refusal.retryable, false);
    assert.match(String(refusal.instruction), /Stop spending/);

    const budget = await agent.me();
    assert.deepEqual([budget.spent_micros, budget.held_micros], [700_000n, 0n]);
  });
});

test("the model buys through ACP and AP2 and records the task's outcome", async () => {
  await admin.run({ cap: "1.00" }, async (agent, created) => {
    const key = await agent.ap2Key();
    const mandates = await postJson(`${daemon.env.SPENDCAP_SIM_AP2_USER_URL}/mandates`, {
      jwk: key.jwk,
      items: ["sku_company_profile"],
      budget_cents: 500,
      max_payment_cents: 100,
    });
    const cart = await postJson(`${daemon.env.SPENDCAP_SIM_AP2_MERCHANT_URL}/checkouts`, {
      items: ["sku_company_profile"],
    });
    const model = scriptedModel([
      [
        {
          id: "call-acp",
          tool: "acp_checkout",
          input: { merchant: daemon.env.SPENDCAP_SIM_ACP_MERCHANT, items: ["report_market"] },
        },
      ],
      [
        {
          id: "call-ap2",
          tool: "ap2_pay",
          input: {
            checkout_jwt: cart.checkout_jwt,
            open_checkout_mandate: mandates.open_checkout_mandate,
            open_payment_mandate: mandates.open_payment_mandate,
          },
        },
      ],
      [
        {
          id: "call-outcome",
          tool: "record_task_outcome",
          input: { outcome: "success", task_type: "sourcing" },
        },
      ],
      "Bought the report and the profile.",
    ]);
    await generateText({
      model,
      tools: spendcapTools(agent, { task: "sourcing-1" }),
      stopWhen: stepCountIs(6),
      prompt: "Buy the market report and the company profile.",
    });
    const acp = toolResultsSeen(model, 1).get("call-acp") as Record<string, unknown>;
    assert.deepEqual([acp.ok, acp.status, acp.paid_usd], [true, "completed", "0.45"]);
    const ap2 = toolResultsSeen(model, 2).get("call-ap2") as Record<string, unknown>;
    assert.deepEqual([ap2.ok, ap2.paid_usd], [true, "0.30"]);
    const outcome = toolResultsSeen(model, 3).get("call-outcome") as Record<string, unknown>;
    assert.deepEqual([outcome.ok, outcome.task, outcome.outcome], [true, "sourcing-1", "success"]);

    assert.equal((await agent.me()).spent_micros, 750_000n);
    const tasks = await admin.spend("task", { agent: created.agent.id });
    assert.match(
      JSON.stringify(tasks, (_k, v: unknown) => (typeof v === "bigint" ? Number(v) : v)),
      /sourcing-1/,
    );
  });
});
