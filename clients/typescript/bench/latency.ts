/**
 * What the client adds to a request (a benchmark that prints figures, not a timed test): p50 and
 * p90 of `agent.me()` against the same `GET /v1/me` with plain `fetch`, and of a paid x402 fetch
 * through `wrapFetch` against the same proxy request with plain `fetch`, interleaved, against
 * `spendcap demo --providers-only`, each round in a rotated order. `npm run bench` (SPENDCAP_BENCH_N requests each, default 300).
 */

import { Spendcap, wrapFetch } from "@spendcap/client";

import { start } from "../test/daemon.js";

const N = Number(process.env.SPENDCAP_BENCH_N ?? "300");

function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] ?? Number.NaN;
}

async function timed(call: () => Promise<unknown>): Promise<number> {
  const started = process.hrtime.bigint();
  await call();
  return Number(process.hrtime.bigint() - started) / 1e6;
}

const daemon = await start();
try {
  const admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
  const { token } = await admin.createAgent({ handle: "bench", cap: "1000", controls: { breaker: null } });
  const agent = admin.agent(token);
  const paidFetch = wrapFetch(fetch, agent);
  const auth = { authorization: `Bearer ${token}` };
  const search = (i: number, form: string) => `${daemon.env.SPENDCAP_SIM_X402_URL}/search?q=${form}-${i}`;

  const rows: Array<[string, number[]]> = [
    ["GET /v1/me, plain fetch", []],
    ["GET /v1/me, agent.me()", []],
    ["paid x402 fetch via the proxy, plain fetch", []],
    ["paid x402 fetch via the proxy, wrapFetch", []],
  ];
  for (let i = 0; i < 20; i += 1) {
    await agent.me();
    await (await fetch(`${daemon.env.SPENDCAP_URL}/v1/me`, { headers: auth })).text();
  }
  const calls: Array<(i: number) => Promise<unknown>> = [
    async () => (await fetch(`${daemon.env.SPENDCAP_URL}/v1/me`, { headers: auth })).json(),
    () => agent.me(),
    async (i) => {
      const response = await fetch(`${daemon.env.SPENDCAP_URL}/v1/x402/proxy/${search(i, "plain")}`, {
        headers: auth,
      });
      if (response.headers.get("x-spendcap-payment") !== "settled") throw new Error("not paid");
      return response.text();
    },
    async (i) => {
      const response = await paidFetch(search(i, "wrapped"));
      if (response.headers.get("x-spendcap-payment") !== "settled") throw new Error("not paid");
      return response.text();
    },
  ];
  for (let i = 0; i < N; i += 1) {
    // Each round starts with another of the four, so none always follows the same one.
    for (let k = 0; k < calls.length; k += 1) {
      const which = (i + k) % calls.length;
      rows[which]?.[1].push(await timed(() => calls[which]?.(i) ?? Promise.resolve()));
    }
  }
  console.log(`| request (${N} each, interleaved, one at a time) | p50 | p90 |`);
  console.log("|---|---|---|");
  for (const [name, samples] of rows) {
    console.log(
      `| ${name} | ${percentile(samples, 50).toFixed(3)} ms | ${percentile(samples, 90).toFixed(3)} ms |`,
    );
  }
} finally {
  await daemon.stop();
}
