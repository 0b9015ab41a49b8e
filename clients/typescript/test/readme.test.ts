/**
 * The repository README's `### TypeScript` and `### Vercel AI SDK` snippets, extracted verbatim,
 * type-checked and run with Node against the providers-only daemon (they read its `SPENDCAP_*`
 * variables). The AI SDK snippet's `model` is the one thing it does not define ("any AI SDK
 * model"): the test puts a scripted model in front of it, which calls `paid_fetch` for page after
 * page and finally says what the last tool result was — so the snippet's own output shows what the
 * model read.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { promisify } from "node:util";

import { Spendcap } from "@spendcap/client";
import ts from "typescript";

import { type Daemon, PACKAGE_DIR, REPO_DIR, start } from "./daemon.js";

const run = promisify(execFile);
const SNIPPETS_DIR = join(PACKAGE_DIR, "dist", "readme");

let daemon: Daemon;

before(async () => {
  daemon = await start();
});

after(async () => {
  await daemon.stop();
});

/** The first ```ts block under the heading `<heading>` of a README, verbatim. */
function snippet(heading: string, readmePath = join(REPO_DIR, "README.md")): string {
  const readme = readFileSync(readmePath, "utf8");
  const start = readme.indexOf(`\n${heading}\n`);
  assert.ok(start >= 0, `${readmePath} has a "${heading}" section`);
  const block = /\n```ts\n([\s\S]*?)\n```\n/.exec(readme.slice(start));
  assert.ok(block?.[1] !== undefined, `a ts block under "${heading}"`);
  return `${block[1]}\n`;
}

/** Type-checks `source` as an ES module of this package (strict), then runs it with Node. */
async function checkAndRun(name: string, source: string, env: Record<string, string> = {}): Promise<string> {
  mkdirSync(SNIPPETS_DIR, { recursive: true });
  const file = join(SNIPPETS_DIR, `${name}.ts`);
  writeFileSync(file, source);
  const options: ts.CompilerOptions = {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    types: ["node"],
  };
  const program = ts.createProgram([file], options);
  const diagnostics = ts
    .getPreEmitDiagnostics(program)
    .map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n"));
  assert.deepEqual(diagnostics, [], `${name} type-checks`);
  const js = ts.transpileModule(source, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.ESNext },
  }).outputText;
  const script = join(SNIPPETS_DIR, `${name}.mjs`);
  writeFileSync(script, js);
  const { stdout } = await run(process.execPath, [script], {
    cwd: PACKAGE_DIR,
    env: { ...process.env, ...daemon.env, ...env },
    timeout: 60_000,
  });
  return stdout;
}

test("the README's TypeScript snippet pays until the cap refuses, and revokes the run's agent", async () => {
  const stdout = await checkAndRun("typescript", snippet("### TypeScript"));
  assert.match(stdout, /^page 1: HTTP 200, paid 400000 micro-USD$/m);
  assert.match(stdout, /^page 3: HTTP 200, paid 400000 micro-USD$/m);
  assert.doesNotMatch(stdout, /^page 4:/m);
  assert.match(stdout, /^refused: cap_exceeded, \$0\.30 left$/m);

  const admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
  const agents = await admin.listAgents();
  assert.equal(agents.length, 1, "the snippet made one agent");
  const agent = agents[0];
  assert.ok(agent !== undefined);
  assert.equal(agent.spent_micros, 1_200_000n);
  assert.equal(agent.revoked, "run_ended");
});

const SCRIPTED_MODEL = `// Prepended by clients/typescript/test/readme.test.ts: the snippet's "any AI SDK model".
import { MockLanguageModelV3 } from "ai/test";
const model = new MockLanguageModelV3({
  doGenerate: async (options) => {
    const results = options.prompt.flatMap((message) =>
      message.role === "tool" ? message.content.filter((part) => part.type === "tool-result") : [],
    );
    const last = results.at(-1);
    const usage = {
      inputTokens: { total: 1, noCache: 1, cacheRead: 0, cacheWrite: 0 },
      outputTokens: { total: 1, text: 1, reasoning: 0 },
    };
    const refused = last !== undefined && last.output.type === "json" && JSON.stringify(last.output.value).includes('"ok":false');
    if (refused) {
      const said = "The last tool result: " + JSON.stringify(last.output.type === "json" ? last.output.value : null);
      return { content: [{ type: "text", text: said }], finishReason: { unified: "stop", raw: "stop" }, usage, warnings: [] };
    }
    const page = results.length + 1;
    const url = \`\${process.env.SPENDCAP_SIM_X402_URL}/papers/attention?page=\${page}\`;
    return {
      content: [{ type: "tool-call", toolCallId: \`call-\${page}\`, toolName: "paid_fetch", input: JSON.stringify({ url }) }],
      finishReason: { unified: "tool-calls", raw: "tool_calls" },
      usage,
      warnings: [],
    };
  },
});
`;

test("the README's Vercel AI SDK snippet: the model pays through the tools and reads the refusal", async () => {
  const stdout = await checkAndRun("vercel-ai", SCRIPTED_MODEL + snippet("### Vercel AI SDK"));
  const said = /^The last tool result: (.*)$/m.exec(stdout);
  assert.ok(said?.[1] !== undefined, stdout);
  const refusal = JSON.parse(said[1]) as Record<string, unknown>;
  assert.equal(refusal.ok, false);
  assert.equal(refusal.code, "cap_exceeded");
  assert.equal(refusal.requested_usd, "0.40");
  assert.equal(refusal.remaining_usd, "0.30");
  assert.equal(refusal.retryable, false);
});

const SCRIPTED_SEARCH = `// Prepended by clients/typescript/test/readme.test.ts: the snippet's "any AI SDK model".
import { MockLanguageModelV3 } from "ai/test";
const model = new MockLanguageModelV3({
  doGenerate: async (options) => {
    const results = options.prompt.flatMap((message) =>
      message.role === "tool" ? message.content.filter((part) => part.type === "tool-result") : [],
    );
    const last = results.at(-1);
    const usage = {
      inputTokens: { total: 1, noCache: 1, cacheRead: 0, cacheWrite: 0 },
      outputTokens: { total: 1, text: 1, reasoning: 0 },
    };
    if (last !== undefined) {
      const said = "The tool result: " + JSON.stringify(last.output.type === "json" ? last.output.value : last.output);
      return { content: [{ type: "text", text: said }], finishReason: { unified: "stop", raw: "stop" }, usage, warnings: [] };
    }
    const url = \`\${process.env.SPENDCAP_SIM_X402_URL}/search?q=attention\`;
    return {
      content: [{ type: "tool-call", toolCallId: "call-1", toolName: "paid_fetch", input: JSON.stringify({ url }) }],
      finishReason: { unified: "tool-calls", raw: "tool_calls" },
      usage,
      warnings: [],
    };
  },
});
`;

test("the README's Vercel AI SDK approvals snippet: the run asks, spendcap approves, the next call pays once", async () => {
  const admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
  const before = new Set((await admin.listAgents()).map((agent) => agent.id));
  const stdout = await checkAndRun(
    "vercel-ai-approvals",
    SCRIPTED_SEARCH + snippet("#### Approvals in the Vercel AI SDK"),
  );
  assert.match(stdout, /^approve\? 0\.02 above_amount$/m);
  const said = /^The tool result: (.*)$/m.exec(stdout);
  assert.ok(said?.[1] !== undefined, stdout);
  const paid = JSON.parse(said[1]) as Record<string, unknown>;
  assert.deepEqual([paid.ok, paid.status, paid.paid_usd], [true, 200, "0.02"]);
  const made = (await admin.listAgents()).filter((agent) => !before.has(agent.id));
  assert.deepEqual(
    made.map((agent) => [agent.spent_micros, agent.held_micros, agent.revoked]),
    [[20_000n, 0n, "run_ended"]],
    "the snippet's agent paid $0.02 once and was revoked",
  );
});

test("the package README's examples run: the run pattern, withHold and wrapFetch", async () => {
  const readme = join(PACKAGE_DIR, "README.md");
  const admin = new Spendcap({ url: daemon.env.SPENDCAP_URL, adminToken: daemon.env.SPENDCAP_ADMIN_TOKEN });
  const ran = await checkAndRun("package-admin", snippet("## The admin side", readme));
  assert.match(ran, /^the run spent 20000 micro-USD$/m);
  const nightly = (await admin.listAgents()).filter((agent) => agent.labels.run === "nightly");
  assert.deepEqual(
    nightly.map((agent) => [agent.revoked, agent.spent_micros]),
    [["run_ended", 20_000n]],
  );

  const { agent, token } = await admin.createAgent({ handle: "package-readme", cap: "1.00" });
  const paid = await checkAndRun("package-agent", snippet("## The agent side", readme), {
    SPENDCAP_AGENT_TOKEN: token,
  });
  assert.match(paid, /^…call the model here… 200 \$0\.157 spent$/m);
  assert.equal((await admin.getAgent(agent.id)).spent_micros, 157_000n);
});

test("the benchmark the package README quotes runs and prints its four rows", async () => {
  // `npm run bench` is the build, then this; the build already ran before the tests.
  const { stdout } = await run(process.execPath, [join(PACKAGE_DIR, "dist", "bench", "latency.js")], {
    cwd: PACKAGE_DIR,
    env: { ...process.env, SPENDCAP_BENCH_N: "3" },
    timeout: 60_000,
  });
  const rows = stdout.split("\n").filter((line) => /^\| .* \| [\d.]+ ms \| [\d.]+ ms \|$/.test(line));
  assert.equal(rows.length, 4, stdout);
});

test("the package as packed installs into a fresh project and pays from there", async () => {
  const project = mkdtempSync(join(tmpdir(), "spendcap-client-"));
  try {
    // `npm pack` builds first (prepack); the build already ran before the tests, so skip it here.
    const npm = process.platform === "win32" ? "npm.cmd" : "npm";
    const packed = await run(npm, ["pack", "--ignore-scripts", "--silent", "--pack-destination", project], {
      cwd: PACKAGE_DIR,
    });
    const tarball = packed.stdout.trim().split("\n").at(-1) ?? "";
    assert.match(tarball, /^spendcap-client-.*\.tgz$/);
    writeFileSync(
      join(project, "package.json"),
      JSON.stringify({ name: "consumer", private: true, type: "module" }),
    );
    await run(npm, ["install", "--no-audit", "--no-fund", "--silent", `./${tarball}`], { cwd: project });
    writeFileSync(
      join(project, "pay.mjs"),
      `import { Spendcap } from "@spendcap/client";
const spent = await new Spendcap().run({ cap: "0.10" }, async (agent) => {
  await agent.fetch({ url: process.env.SPENDCAP_SIM_X402_URL + "/search?q=packed" });
  return (await agent.me()).spent_micros;
});
console.log("spent " + spent);
`,
    );
    const paid = await run(process.execPath, ["pay.mjs"], {
      cwd: project,
      env: { ...process.env, ...daemon.env },
    });
    assert.equal(paid.stdout.trim(), "spent 20000");
  } finally {
    rmSync(project, { recursive: true, force: true });
  }
});
