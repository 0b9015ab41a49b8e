/**
 * The real daemon for the tests: `spendcap demo --providers-only --listen 127.0.0.1:0` (the
 * in-process ledger and the simulated x402, ACP and AP2 providers over real HTTP), started from
 * `$SPENDCAP_BIN` or the repository's `target/debug/spendcap`. It prints `export NAME=value`
 * lines; `start()` waits for them (with a deadline) and answers them with a `stop()`.
 */

import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** The package directory (dist/test/ is two levels below it). */
export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const REPO_DIR = resolve(PACKAGE_DIR, "..", "..");

const NAMES = [
  "SPENDCAP_URL",
  "SPENDCAP_ADMIN_TOKEN",
  "SPENDCAP_SIM_X402_URL",
  "SPENDCAP_SIM_ACP_MERCHANT",
  "SPENDCAP_SIM_AP2_MERCHANT_URL",
  "SPENDCAP_SIM_AP2_USER_URL",
] as const;

export type DaemonEnv = Record<(typeof NAMES)[number], string>;

export interface Daemon {
  env: DaemonEnv;
  stop(): Promise<void>;
}

/** Starts the providers-only daemon and waits (at most 60 s) for every variable it prints. */
export async function start(): Promise<Daemon> {
  const binary = process.env.SPENDCAP_BIN ?? join(REPO_DIR, "target", "debug", "spendcap");
  if (!existsSync(binary)) {
    throw new Error(`no spendcap binary at ${binary}: run \`cargo build\` or set SPENDCAP_BIN`);
  }
  const child = spawn(binary, ["demo", "--providers-only", "--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "inherit"],
    env: { ...process.env, SPENDCAP_LOG: process.env.SPENDCAP_LOG ?? "warn" },
  });
  const stop = () => stopChild(child);
  try {
    const env = await exports(child, 60_000);
    return { env, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

async function exports(child: ChildProcess, deadlineMs: number): Promise<DaemonEnv> {
  const found: Partial<DaemonEnv> = {};
  const lines = createInterface({ input: child.stdout as NodeJS.ReadableStream });
  const timer = setTimeout(() => lines.close(), deadlineMs);
  try {
    for await (const line of lines) {
      const match = /^export ([A-Z0-9_]+)=(.*)$/.exec(line);
      if (match?.[1] !== undefined && (NAMES as readonly string[]).includes(match[1])) {
        found[match[1] as keyof DaemonEnv] = match[2] ?? "";
      }
      if (NAMES.every((name) => found[name] !== undefined)) {
        // Keep draining stdout so the daemon never blocks on a full pipe.
        child.stdout?.resume();
        return found as DaemonEnv;
      }
    }
  } finally {
    clearTimeout(timer);
  }
  throw new Error(`the daemon did not print ${NAMES.filter((n) => found[n] === undefined).join(", ")}`);
}

function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    child.once("exit", () => resolve());
    child.kill("SIGTERM");
  });
}

/** A local HTTP server for one test (an upstream, or a stand-in daemon), on a free loopback port. */
export async function serve(
  handler: (request: IncomingMessage, response: ServerResponse) => void,
): Promise<{ url: string; close(): Promise<void> }> {
  const server: Server = createServer(handler);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** POSTs JSON to a simulated provider (the AP2 user and merchant) and answers its JSON. */
export async function postJson(url: string, body: unknown): Promise<Record<string, unknown>> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!response.ok) {
    throw new Error(`${url}: HTTP ${response.status} ${await response.text()}`);
  }
  return (await response.json()) as Record<string, unknown>;
}
