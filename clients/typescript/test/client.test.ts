/**
 * The client against a real daemon (`spendcap demo --providers-only`): the run pattern, every
 * protocol's payment, refusals as typed errors, receipts, the log; and against stand-in daemons
 * where a test needs an answer the simulated providers do not give (an unknown outcome, an
 * unreachable ledger).
 */

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  type Agent,
  ApprovalRefused,
  ApprovalRequired,
  AuthError,
  BudgetRefused,
  InvalidRequest,
  LedgerUnavailable,
  OutcomeUnknown,
  PaymentRefused,
  ProviderError,
  ReceiptInvalid,
  Spendcap,
  SpendcapError,
  TransportError,
  wrapFetch,
} from "@spendcap/client";

import { type Daemon, postJson, serve, start } from "./daemon.js";

let daemon: Daemon;
let admin: Spendcap;

before(async () => {
  daemon = await start();
  admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
});

after(async () => {
  await daemon.stop();
});

const x402 = (path: string) => `${daemon.env.SPENDCAP_SIM_X402_URL}${path}`;

describe("orchestrators", () => {
  test("an agent funds a sub-agent from what it has and pays with a task token for one task", async () => {
    await admin.run({ cap: "1.00" }, async (lead, created) => {
      const handle = created.agent.handle;
      const helper = await lead.createSubAgent({ handle: `${handle}-helper`, cap: "0.30" });
      assert.equal(helper.agent.parent, created.agent.id);
      const scoped = await lead.taskToken({ task: "ts-task", ttlSecs: 600, agent: helper.agent.id });
      assert.equal(scoped.agent_id, helper.agent.id);
      const worker = admin.agent(scoped.token);
      const paid = await worker.fetch({ url: x402("/search?q=ts"), task: "named-otherwise" });
      assert.equal(paid.payment?.status, "settled");
      const greedy = await lead
        .createSubAgent({ handle: `${handle}-greedy`, cap: "0.80" })
        .catch((e: unknown) => e);
      assert.ok(greedy instanceof AuthError, String(greedy));
      assert.equal(greedy.code, "sub_agent_exceeds_parent");
      assert.equal(greedy.body.bound, "cap");
      const below = await lead.subAgents();
      assert.deepEqual(
        below.map((a) => a.id),
        [helper.agent.id],
      );
      const revoked = await lead.revokeSubAgent(helper.agent.id, "done");
      assert.equal(revoked.already_revoked, false);
      const after = await worker.fetch({ url: x402("/search?q=ts2") }).catch((e: unknown) => e);
      assert.ok(after instanceof BudgetRefused && after.code === "agent_revoked", String(after));
      const entries = await collectLog();
      const settled = entries.filter((e) => e.event === "settle" && e.task === "ts-task");
      assert.equal(settled.length, 1, JSON.stringify(entries));
    });
  });
});

async function collectLog(): Promise<Array<Record<string, unknown>>> {
  const response = await fetch(`${daemon.env.SPENDCAP_URL}/v1/log`, {
    headers: { authorization: `Bearer ${daemon.env.SPENDCAP_ADMIN_TOKEN}` },
  });
  const text = await response.text();
  return text
    .split("\n")
    .filter((line) => line.length > 0)
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

describe("the run pattern", () => {
  test("an isolated agent pays until its cap refuses, and is revoked when the run ends", async () => {
    let agentId = "";
    let token = "";
    const refusal = await admin.run({ cap: "1.00" }, async (agent, created) => {
      agentId = created.agent.id;
      token = created.token;
      const first = await agent.fetch({ url: x402("/papers/attention"), task: "t1" });
      assert.equal(first.status, 200);
      assert.equal(first.payment?.status, "settled");
      assert.equal(first.payment?.amount_micros, 400_000n);
      const second = await agent.fetch({ url: x402("/papers/scaling"), task: "t1" });
      assert.equal(second.payment?.amount_micros, 350_000n);
      const refused = await agent
        .fetch({ url: x402("/papers/retrieval"), task: "t1" })
        .catch((e: unknown) => e);
      const budget = await agent.me();
      assert.deepEqual(
        [budget.spent_micros, budget.held_micros],
        [750_000n, 0n],
        "the refusal moved no money",
      );
      return refused;
    });
    assert.ok(refusal instanceof BudgetRefused, String(refusal));
    assert.equal(refusal.status, 402);
    assert.equal(refusal.code, "cap_exceeded");
    assert.equal(refusal.requestedMicros, 500_000n);
    assert.equal(refusal.remainingMicros, 250_000n);
    assert.equal(refusal.limitedBy, agentId);

    const shown = await admin.getAgent(agentId);
    assert.equal(shown.revoked, "run_ended");
    assert.equal(shown.spent_micros, 750_000n);
    const after = await admin
      .agent(token)
      .fetch({ url: x402("/search"), task: "t2" })
      .catch((e: unknown) => e);
    assert.ok(after instanceof BudgetRefused && after.code === "agent_revoked", String(after));
  });

  test("the agent is revoked when the run throws, and the error comes through", async () => {
    let agentId = "";
    await assert.rejects(
      admin.run({ cap: "0.50", handle: "run-that-fails" }, async (agent, created) => {
        agentId = created.agent.id;
        await agent.fetch({ url: x402("/search") });
        throw new Error("the agent crashed");
      }),
      /the agent crashed/,
    );
    const shown = await admin.getAgent("run-that-fails");
    assert.equal(shown.id, agentId);
    assert.equal(shown.revoked, "run_failed");
    assert.equal(shown.spent_micros, 20_000n);
  });

  test("a run whose agent cannot be revoked says so, with the run's own error", async () => {
    let revokes = 0;
    const standIn = await serve((request, response) => {
      const revoke = request.url?.endsWith("/revoke") === true;
      revokes += revoke ? 1 : 0;
      response.writeHead(revoke ? 503 : 201, { "content-type": "application/json" });
      response.end(
        revoke
          ? JSON.stringify({ code: "ledger_unavailable", detail: "the ledger is unavailable" })
          : JSON.stringify({ agent: { id: "ag_t_1" }, token: "sct_ag_t_1_x" }),
      );
    });
    try {
      const failing = new Spendcap({ url: standIn.url, adminToken: "a" });
      const error = await failing
        .run({ cap: "0.10" }, async () => {
          throw new Error("the agent crashed");
        })
        .catch((e: unknown) => e);
      assert.ok(error instanceof AggregateError, String(error));
      assert.match(String(error.errors[0]), /the agent crashed/);
      assert.ok(error.errors[1] instanceof LedgerUnavailable);
      assert.equal(revokes, 1);
    } finally {
      await standIn.close();
    }
  });
});

describe("wrapFetch", () => {
  test("pays through the proxy; spendcap's refusals throw, the upstream's answers come back verbatim", async () => {
    const seen: Array<string | undefined> = [];
    const upstream = await serve((request, response) => {
      seen.push(request.headers.authorization);
      if (request.url === "/broken") {
        response.writeHead(500, { "content-type": "text/plain" }).end("upstream broke");
      } else {
        response.writeHead(402, { "content-type": "text/plain" }).end("pay me my own way");
      }
    });
    try {
      await admin.run({ cap: "0.50" }, async (agent) => {
        const paidFetch = wrapFetch(fetch, agent, { task: "wrapped" });
        const paid = await paidFetch(x402("/search?q=a"));
        assert.equal(paid.status, 200);
        assert.equal(paid.headers.get("x-spendcap-payment"), "settled");
        assert.equal(paid.headers.get("x-spendcap-amount-micros"), "20000");
        assert.match(await paid.text(), /the contents of \/search/);

        const broken = await paidFetch(`${upstream.url}/broken`, {
          headers: { authorization: "Bearer upstream" },
        });
        assert.equal(broken.status, 500, "the upstream's own error is a response, not a spendcap error");
        assert.equal(await broken.text(), "upstream broke");
        assert.deepEqual(
          seen,
          ["Bearer upstream"],
          "the caller's Authorization went upstream, the agent's did not",
        );

        const unreadable = await paidFetch(`${upstream.url}/own-402`).catch((e: unknown) => e);
        assert.ok(unreadable instanceof ProviderError, String(unreadable));
        assert.equal(unreadable.code, "x402_bad_json");
        assert.equal(unreadable.body.upstream_status, 402);

        const capped = wrapFetch(fetch, agent, { maxAmount: "0.10" });
        const tooDear = await capped(x402("/papers/attention")).catch((e: unknown) => e);
        assert.ok(tooDear instanceof PaymentRefused && !(tooDear instanceof BudgetRefused), String(tooDear));
        assert.equal(tooDear.code, "x402_over_payment_maximum");
        assert.equal(tooDear.requestedMicros, 400_000n);

        const overCap = await paidFetch(x402("/papers/retrieval")).catch((e: unknown) => e);
        assert.ok(overCap instanceof BudgetRefused, String(overCap));
        assert.deepEqual([overCap.code, overCap.remainingMicros], ["cap_exceeded", 480_000n]);
        assert.equal((await agent.me()).spent_micros, 20_000n);
      });
    } finally {
      await upstream.close();
    }
  });
});

describe("ACP, AP2, holds, outcomes, log and receipts", () => {
  test("a payment that needs approval throws ApprovalRequired, and resumes from its reservation once approved", async () => {
    await admin.run({ cap: "10.00" }, async (agent, created) => {
      await admin.setControls(created.agent.id, { approval: { above_micros: 1_000_000, ttl_secs: 600 } });
      const waiting = await agent
        .hold({ amount: "2.50", service: "api.example.com", idempotencyKey: "ts-big" })
        .catch((e: unknown) => e);
      assert.ok(waiting instanceof ApprovalRequired, String(waiting));
      assert.equal(waiting.status, 202);
      assert.equal(waiting.reason, "above_amount");
      assert.equal(waiting.amountMicros, 2_500_000n);
      assert.equal(waiting.idempotencyKey, "ts-big");
      assert.equal((await agent.me()).held_micros, 2_500_000n);
      const decided = admin.decideApproval(waiting.approvalId, true, "fine");
      const seen = await agent.waitForApproval(waiting.approvalId, 20);
      await decided;
      assert.equal(seen.state, "approved");
      const hold = await agent.hold({ amount: "2.50", service: "api.example.com", idempotencyKey: "ts-big" });
      assert.equal(hold.hold_id, waiting.approvalId);

      const denied = await agent
        .hold({ amount: "3.00", service: "api.example.com", idempotencyKey: "ts-denied" })
        .catch((e: unknown) => e);
      assert.ok(denied instanceof ApprovalRequired);
      await admin.decideApproval(denied.approvalId, false, "no");
      const refused = await agent
        .hold({ amount: "3.00", service: "api.example.com", idempotencyKey: "ts-denied" })
        .catch((e: unknown) => e);
      assert.ok(refused instanceof ApprovalRefused, String(refused));
      assert.equal(refused.code, "approval_denied");
    });
  });

  test("an ACP checkout is paid, settled with a receipt that verifies, and a tampered one does not", async () => {
    await admin.run({ cap: "2.00" }, async (agent, created) => {
      const paid = await agent.acpCheckout({
        merchant: daemon.env.SPENDCAP_SIM_ACP_MERCHANT,
        items: ["report_market"],
        task: "buy-report",
      });
      assert.equal(paid.status, "completed");
      assert.equal(paid.amount_micros, 450_000n);
      assert.deepEqual(paid.total, { amount: 45, currency: "usd" });
      assert.equal((await agent.me()).spent_micros, 450_000n);

      const receipts = await admin.receipts(created.agent.id);
      assert.equal(receipts.length, 1);
      assert.equal(receipts[0]?.receipt.amount_micros, 450_000n);
      assert.deepEqual(await admin.verifyReceipts(receipts), { receipts: 1, trees: 1 });
      const tampered = structuredClone(receipts);
      if (tampered[0] !== undefined) tampered[0].receipt.amount_micros = 1n;
      await assert.rejects(admin.verifyReceipts(tampered), ReceiptInvalid);

      const canceled = await agent
        .acpCancel({
          merchant: daemon.env.SPENDCAP_SIM_ACP_MERCHANT,
          checkoutSessionId: paid.checkout_session_id,
        })
        .catch((e: unknown) => e);
      assert.ok(canceled instanceof SpendcapError, "a completed session cannot be canceled");
      assert.equal((await agent.me()).spent_micros, 450_000n, "the refused cancel changed nothing");
    });
  });

  test("an AP2 checkout is paid under the user's open mandates", async () => {
    await admin.run({ cap: "1.00" }, async (agent) => {
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
      const registered = await agent.ap2RegisterMandates(
        String(mandates.open_checkout_mandate),
        String(mandates.open_payment_mandate),
      );
      assert.deepEqual([registered.budget_micros, registered.spent_micros], [5_000_000n, 0n]);
      const paid = await agent.ap2Pay({
        checkoutJwt: String(cart.checkout_jwt),
        openCheckoutMandate: String(mandates.open_checkout_mandate),
        openPaymentMandate: String(mandates.open_payment_mandate),
        task: "profile",
      });
      assert.equal(paid.amount_micros, 300_000n);
      assert.equal(paid.replayed, false);
      assert.equal((await agent.me()).spent_micros, 300_000n);
      const mandate = await agent.ap2Mandate(registered.mandate_id);
      assert.deepEqual([mandate.spent_micros, mandate.remaining_micros], [300_000n, 4_700_000n]);
    });
  });

  test("withHold settles what was used and voids when the call fails", async () => {
    await admin.run({ cap: "1.00" }, async (agent) => {
      const answer = await agent.withHold(
        { amount: "0.20", service: "api.openai.com", task: "llm" },
        async (hold) => {
          assert.equal(hold.amount_micros, 200_000n);
          assert.equal((await agent.me()).held_micros, 200_000n);
          return { used: "0.137", result: "an answer" };
        },
      );
      assert.equal(answer, "an answer");
      await assert.rejects(
        agent.withHold({ amount: "0.30", service: "api.openai.com" }, async () => {
          throw new Error("the call failed");
        }),
        /the call failed/,
      );
      const budget = await agent.me();
      assert.deepEqual([budget.spent_micros, budget.held_micros], [137_000n, 0n]);
    });
  });

  test("task outcomes reach the report, and the log export streams every line item", async () => {
    await admin.run({ cap: "1.00", handle: "outcomes-run" }, async (agent, created) => {
      await agent.fetch({ url: x402("/search?q=outcomes"), task: "o-1" });
      await agent.fetch({ url: x402("/search?q=outcomes-2"), task: "o-2" });
      assert.equal((await agent.recordOutcome("o-1", "success", "lookup")).outcome, "success");
      assert.equal(
        (await admin.recordOutcome(created.agent.id, "o-2", "failed", "lookup")).outcome,
        "failed",
      );
      const report = JSON.stringify(await admin.report({ agent: created.agent.id }), (_k, v: unknown) =>
        typeof v === "bigint" ? v.toString() : v,
      );
      assert.match(report, /"lookup"/);

      const events: string[] = [];
      for await (const line of admin.exportLog({ agent: created.agent.id })) {
        events.push(String((JSON.parse(line) as { event?: unknown }).event));
      }
      assert.equal(events.filter((ev) => ev === "settle").length, 2, events.join(","));
      assert.equal(events.filter((ev) => ev === "outcome").length, 2, events.join(","));
    });
  });
});

describe("operator tokens", () => {
  test("an operator lowers but never raises a cap, and its token stops when revoked", async () => {
    const handle = `watched-${Date.now()}`;
    await admin.createAgent({ handle, cap: "2.00" });
    const name = `oncall-${Date.now()}`;
    const created = await admin.createOperator({ name, role: "operator", tree: handle });
    assert.ok(created.token.startsWith("sco_op_"));
    assert.ok((await admin.listOperators()).some((o) => o.name === name && !("token" in o)));
    const oncall = new Spendcap({ url: admin.url, adminToken: created.token });
    const me = await oncall.whoami();
    assert.deepEqual(
      [me.name, me.role, me.tighten_only],
      [name, "operator", ["set_cap", "set_controls", "set_expiry"]],
    );
    assert.equal((await oncall.setCap(handle, "1.00")).cap_micros, 1_000_000n);
    const raised = await oncall.setCap(handle, "3.00").catch((e: unknown) => e);
    assert.ok(
      raised instanceof AuthError && raised.status === 403 && raised.code === "role_forbidden",
      String(raised),
    );
    assert.equal((await admin.getAgent(handle)).cap_micros, 1_000_000n);
    assert.equal((await admin.revokeOperator(name)).already_revoked, false);
    const gone = await oncall.whoami().catch((e: unknown) => e);
    assert.ok(gone instanceof AuthError && gone.code === "invalid_token", String(gone));
  });
});

describe("errors", () => {
  test("bad tokens, admin routes and bad input are typed errors that change nothing", async () => {
    const stranger = admin.agent("sct_not_a_real_token");
    await assert.rejects(stranger.me(), AuthError);
    await admin.run({ cap: "1.00" }, async (agent) => {
      const asAdmin = new Spendcap({ url: admin.url, adminToken: "sct_x" });
      await assert.rejects(asAdmin.listAgents(), AuthError);
      const zero = await agent.hold({ amount: "0", service: "x" }).catch((e: unknown) => e);
      assert.ok(zero instanceof InvalidRequest && zero.code === "amount_zero", String(zero));
      await assert.rejects(agent.hold({ amount: 0.1 as unknown as string, service: "x" }), TypeError);
      await assert.rejects(agent.hold({ amount: "0.1234567", service: "x" }), RangeError);
      const over = await agent.hold({ amount: "1.000001", service: "x" }).catch((e: unknown) => e);
      assert.ok(over instanceof BudgetRefused && over.remainingMicros === 1_000_000n, String(over));
      assert.deepEqual((await agent.me()).held_micros, 0n);
    });
  });

  test("an unknown outcome is retried a bounded number of times with the same key, then thrown", async () => {
    const keys: Array<string | undefined> = [];
    let answers = 0;
    const standIn = await serve((request, response) => {
      keys.push(request.headers["idempotency-key"] as string | undefined);
      answers += 1;
      const body =
        answers === 5
          ? { status: "completed", amount_micros: 450000, hold_id: "hd_x", replayed: false }
          : { code: "acp_outcome_unknown", detail: "the merchant has not confirmed", hold_id: "hd_x" };
      response.writeHead(answers === 5 ? 200 : 504, { "content-type": "application/json" });
      response.end(JSON.stringify(body));
    });
    try {
      const agent: Agent = new Spendcap({ url: standIn.url, adminToken: "a", retryDelayMs: 1 }).agent(
        "sct_t",
      );
      const unknown = await agent.acpCheckout({ merchant: "m", items: ["i"] }).catch((e: unknown) => e);
      assert.ok(unknown instanceof OutcomeUnknown, String(unknown));
      assert.equal(unknown.holdId, "hd_x");
      assert.equal(keys.length, 3, "one attempt and two retries");
      assert.ok(
        keys[0] !== undefined && keys.every((key) => key === keys[0]),
        `the same key: ${keys.join(",")}`,
      );
      assert.equal(unknown.idempotencyKey, keys[0]);

      const resumed = await agent.acpCheckout({ merchant: "m", items: ["i"], idempotencyKey: "buy-1" });
      assert.equal(resumed.amount_micros, 450_000n, "the second retry found the purchase finished");
      assert.deepEqual(keys.slice(3), ["buy-1", "buy-1"]);
    } finally {
      await standIn.close();
    }
  });

  test("no answer: a payment is an unknown outcome (retried, same key), anything else a TransportError", async () => {
    const gone = await serve(() => undefined);
    await gone.close();
    const agent = new Spendcap({ url: gone.url, adminToken: "a", retryDelayMs: 1 }).agent("sct_t");
    const paying = await agent
      .hold({ amount: "0.10", service: "x", idempotencyKey: "k-1" })
      .catch((e: unknown) => e);
    assert.ok(paying instanceof OutcomeUnknown, String(paying));
    assert.deepEqual([paying.code, paying.idempotencyKey], ["daemon_outcome_unknown", "k-1"]);
    await assert.rejects(agent.me(), TransportError);
  });

  test("a payment's answer lost half-way is retried under the same key", async () => {
    const keys: Array<string | undefined> = [];
    const standIn = await serve((request, response) => {
      keys.push(request.headers["idempotency-key"] as string | undefined);
      const body = JSON.stringify({
        hold_id: "hd_t_1",
        amount_micros: 100000,
        expires_at_ms: 1,
        remaining_micros: 0,
        replayed: keys.length > 1,
      });
      response.writeHead(201, { "content-type": "application/json", "content-length": String(body.length) });
      if (keys.length === 1) {
        // Headers and the start of the body reach the client; then the connection drops.
        response.write(body.slice(0, 10), () => setImmediate(() => response.socket?.destroy()));
        return;
      }
      response.end(body);
    });
    try {
      const agent = new Spendcap({ url: standIn.url, adminToken: "a", retryDelayMs: 1 }).agent("sct_t");
      const hold = await agent.hold({ amount: "0.10", service: "x" });
      assert.deepEqual([hold.hold_id, hold.replayed], ["hd_t_1", true]);
      assert.equal(keys.length, 2);
      assert.ok(keys[0] !== undefined && keys[0] === keys[1], `the same key: ${keys.join(",")}`);
    } finally {
      await standIn.close();
    }
  });

  test("a ledger outage is LedgerUnavailable, not retried", async () => {
    let requests = 0;
    const standIn = await serve((_request, response) => {
      requests += 1;
      response.writeHead(503, { "content-type": "application/json" });
      response.end(JSON.stringify({ code: "ledger_unavailable", detail: "the ledger is unavailable" }));
    });
    try {
      const agent = new Spendcap({ url: standIn.url, adminToken: "a", retryDelayMs: 1 }).agent("sct_t");
      await assert.rejects(agent.hold({ amount: "0.10", service: "x" }), LedgerUnavailable);
      assert.equal(requests, 1);
    } finally {
      await standIn.close();
    }
  });
});
