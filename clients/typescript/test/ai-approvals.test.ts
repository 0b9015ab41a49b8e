/**
 * Approval holds through the AI SDK's own tool approval (`needsApproval`, `tool-approval-request`,
 * `tool-approval-response`), with a scripted model against the real daemon and its simulated x402
 * provider: a payment an approval rule matches ends the run with an approval request and nothing
 * paid; approved, the continued run pays once from the held reservation; denied, the model reads
 * the refusal and nothing is paid.
 */

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { type Agent, Spendcap } from "@spendcap/client";
import { decideApproval, spendcapApproval, spendcapTools } from "@spendcap/client/ai";
import { generateText, type ModelMessage, stepCountIs } from "ai";
import type { MockLanguageModelV3 } from "ai/test";

import { type Daemon, start } from "./daemon.js";
import { scriptedModel, toolResultsSeen } from "./model.js";

const SEARCH = 20_000n;
const RULE = { approval: { protocols: ["x402"], ttl_secs: 600 } };

let daemon: Daemon;
let admin: Spendcap;

before(async () => {
  daemon = await start();
  admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
});

after(async () => {
  await daemon.stop();
});

/** The amounts of the agent's settle entries in the ledger log: what providers were paid. */
async function settled(agentId: string): Promise<number[]> {
  const response = await fetch(`${daemon.env.SPENDCAP_URL}/v1/log?agent=${agentId}`, {
    headers: { authorization: `Bearer ${daemon.env.SPENDCAP_ADMIN_TOKEN}` },
  });
  const entries = (await response.text())
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => JSON.parse(line) as { event?: string; amount?: number });
  return entries.filter((entry) => entry.event === "settle").map((entry) => entry.amount ?? 0);
}

async function money(agent: Agent): Promise<[bigint, bigint]> {
  const budget = await agent.me();
  return [budget.spent_micros, budget.held_micros];
}

/** A scripted model that makes one paid search, then says what the tool answered. */
function searchOnce(callId: string): MockLanguageModelV3 {
  return scriptedModel([
    [
      {
        id: callId,
        tool: "paid_fetch",
        input: { url: `${daemon.env.SPENDCAP_SIM_X402_URL}/search?q=${callId}` },
      },
    ],
    "done",
  ]);
}

const PROMPT: ModelMessage[] = [{ role: "user", content: "Search once." }];

test("a payment that needs approval ends the run with the SDK's approval request; approved, it pays once", async () => {
  await admin.run({ cap: "1.00", controls: RULE }, async (agent, created) => {
    const model = searchOnce("approve-1");
    const tools = spendcapTools(agent, { task: "ai-approval" });
    const first = await generateText({ model, tools, stopWhen: stepCountIs(5), messages: PROMPT });

    const requests = first.content.filter((part) => part.type === "tool-approval-request");
    assert.equal(requests.length, 1);
    assert.equal(model.doGenerateCalls.length, 1, "the model is not asked again while the payment waits");
    const approval = spendcapApproval("approve-1");
    assert.ok(approval !== undefined);
    assert.deepEqual(
      [approval.tool, approval.amount_usd, approval.reason],
      ["paid_fetch", "0.02", "listed_protocol"],
    );
    const pending = (await admin.approvals("pending")).filter((a) => a.agent === created.agent.id);
    assert.deepEqual(
      pending.map((a) => a.approval_id),
      [approval.approval_id],
    );
    assert.deepEqual(await money(agent), [0n, SEARCH]);
    assert.deepEqual(await settled(created.agent.id), []);

    const [request] = requests;
    assert.ok(request !== undefined);
    const response = await decideApproval(request, true, { operator: admin, note: "fine" });
    const second = await generateText({
      model,
      tools,
      stopWhen: stepCountIs(5),
      messages: [...PROMPT, ...first.response.messages, { role: "tool", content: [response] }],
    });
    assert.equal(second.text, "done");
    const paid = toolResultsSeen(model, 1).get("approve-1") as Record<string, unknown>;
    assert.deepEqual([paid.ok, paid.status, paid.paid_usd], [true, 200, "0.02"]);
    assert.deepEqual(await money(agent), [SEARCH, 0n]);
    assert.deepEqual(await settled(created.agent.id), [Number(SEARCH)]);
    assert.equal((await admin.receipts(created.agent.id)).length, 1);
  });
});

test("the SDK's approval does not bypass a spendcap denial", async () => {
  await admin.run({ cap: "1.00", controls: RULE }, async (agent, created) => {
    const model = searchOnce("deny-1");
    const tools = spendcapTools(agent, { task: "ai-approval" });
    const first = await generateText({ model, tools, stopWhen: stepCountIs(5), messages: PROMPT });
    const [request] = first.content.filter((part) => part.type === "tool-approval-request");
    assert.ok(request !== undefined);
    const approval = spendcapApproval("deny-1");
    assert.ok(approval !== undefined);
    await admin.decideApproval(approval.approval_id, false, "not this one");

    // The application approves in the SDK only: the call asks spendcap, which said no.
    const approved = {
      type: "tool-approval-response" as const,
      approvalId: request.approvalId,
      approved: true,
    };
    await generateText({
      model,
      tools,
      stopWhen: stepCountIs(5),
      messages: [...PROMPT, ...first.response.messages, { role: "tool", content: [approved] }],
    });
    const refusal = toolResultsSeen(model, 1).get("deny-1") as Record<string, unknown>;
    assert.deepEqual([refusal.ok, refusal.code, refusal.retryable], [false, "approval_denied", false]);
    assert.match(String(refusal.instruction), /Stop spending/);
    assert.deepEqual(await money(agent), [0n, 0n]);
    assert.deepEqual(await settled(created.agent.id), []);
  });
});

test("a denial releases the money at once and the model reads it", async () => {
  await admin.run({ cap: "1.00", controls: RULE }, async (agent, created) => {
    const model = searchOnce("reject-1");
    const tools = spendcapTools(agent, { task: "ai-approval" });
    const first = await generateText({ model, tools, stopWhen: stepCountIs(5), messages: PROMPT });
    const [request] = first.content.filter((part) => part.type === "tool-approval-request");
    assert.ok(request !== undefined);
    const response = await decideApproval(request, false, { operator: admin, note: "too expensive" });
    assert.deepEqual(await money(agent), [0n, 0n]);

    await generateText({
      model,
      tools,
      stopWhen: stepCountIs(5),
      messages: [...PROMPT, ...first.response.messages, { role: "tool", content: [response] }],
    });
    const seen = (model.doGenerateCalls[1]?.prompt ?? [])
      .flatMap((message) => (message.role === "tool" ? message.content : []))
      .find((part) => part.type === "tool-result" && part.toolCallId === "reject-1");
    assert.ok(seen?.type === "tool-result");
    assert.deepEqual(seen.output, { type: "execution-denied", reason: "too expensive" });
    assert.deepEqual(await settled(created.agent.id), []);
  });
});

test("without an operator the agent withdraws its waiting payment and the money is back", async () => {
  await admin.run({ cap: "1.00", controls: RULE }, async (agent, created) => {
    const model = searchOnce("withdraw-1");
    const tools = spendcapTools(agent, { task: "ai-approval" });
    const first = await generateText({ model, tools, stopWhen: stepCountIs(5), messages: PROMPT });
    const [request] = first.content.filter((part) => part.type === "tool-approval-request");
    assert.ok(request !== undefined);
    const approval = spendcapApproval(request.toolCall.toolCallId);
    assert.ok(approval !== undefined);
    // The agent finds it among its own pending approvals (another process could, too).
    const pending = (await agent.approvals("pending")).map((a) => a.approval_id);
    assert.deepEqual(pending, [approval.approval_id]);
    assert.deepEqual(await money(agent), [0n, SEARCH]);
    const response = await decideApproval(request, false, { agent, note: "not today" });
    assert.deepEqual(await money(agent), [0n, 0n]);
    const shown = await agent.waitForApproval(approval.approval_id, 0);
    assert.equal(shown.state, "canceled");

    await generateText({
      model,
      tools,
      stopWhen: stepCountIs(5),
      messages: [...PROMPT, ...first.response.messages, { role: "tool", content: [response] }],
    });
    assert.deepEqual(await settled(created.agent.id), []);
  });
});

test("without an approval rule a paying call pays once and asks nobody", async () => {
  await admin.run({ cap: "1.00" }, async (agent, created) => {
    const model = searchOnce("free-1");
    const result = await generateText({
      model,
      tools: spendcapTools(agent, { task: "ai-approval" }),
      stopWhen: stepCountIs(5),
      messages: PROMPT,
    });
    assert.equal(result.text, "done");
    assert.equal(result.content.filter((part) => part.type === "tool-approval-request").length, 0);
    const paid = toolResultsSeen(model, 1).get("free-1") as Record<string, unknown>;
    assert.deepEqual([paid.ok, paid.paid_usd, paid.replayed], [true, "0.02", false]);
    assert.deepEqual(await money(agent), [SEARCH, 0n]);
    assert.deepEqual(await settled(created.agent.id), [Number(SEARCH)]);
  });
});
