/**
 * The one place that talks HTTP to the daemon: JSON in and out with `*_micros` fields as `bigint`,
 * error answers turned into typed errors, and bounded retries of a payment whose outcome is
 * unknown (with the same idempotency key, so a retry resumes the purchase and never pays twice).
 */

import { errorBody, errorFrom, OutcomeUnknown, type SpendcapError, TransportError } from "./errors.js";

/** The `fetch` this client calls (the global one unless given). */
export type FetchLike = (input: string | URL | Request, init?: RequestInit) => Promise<Response>;

/** How a client reaches the daemon. */
export interface ConnectionOptions {
  /** The daemon's base URL; default `$SPENDCAP_URL`, else `http://127.0.0.1:8402`. */
  url?: string;
  /** A `fetch` implementation; default the global `fetch`. */
  fetch?: FetchLike;
  /**
   * How often a payment whose outcome is unknown is retried with the same idempotency key before
   * `OutcomeUnknown` is thrown (default 2).
   */
  maxRetries?: number;
  /** Delay before the first such retry, doubled for each next one (default 200 ms). */
  retryDelayMs?: number;
}

/** One request to the daemon. */
export interface Call {
  method: "GET" | "POST" | "PUT" | "DELETE";
  path: string;
  query?: Record<string, string | number | bigint | undefined>;
  body?: unknown;
  idempotencyKey?: string | undefined;
  /** A payment: an unknown outcome (or no answer at all) is retried with the same key. */
  paying?: boolean;
}

export class Connection {
  readonly url: string;
  readonly #token: string;
  readonly #fetch: FetchLike;
  readonly #maxRetries: number;
  readonly #retryDelayMs: number;

  constructor(token: string, options: ConnectionOptions = {}) {
    if (token === "") {
      throw new TypeError("a spendcap token is required");
    }
    this.url = (options.url ?? process.env.SPENDCAP_URL ?? "http://127.0.0.1:8402").replace(/\/+$/, "");
    this.#token = token;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.#maxRetries = options.maxRetries ?? 2;
    this.#retryDelayMs = options.retryDelayMs ?? 200;
  }

  /** The options another connection with another token would need to reach the same daemon. */
  options(): ConnectionOptions {
    return {
      url: this.url,
      fetch: this.#fetch,
      maxRetries: this.#maxRetries,
      retryDelayMs: this.#retryDelayMs,
    };
  }

  /** The bearer header of this connection's token. */
  authorization(): string {
    return `Bearer ${this.#token}`;
  }

  /** The fetch this connection uses (for the x402 proxy form). */
  get fetch(): FetchLike {
    return this.#fetch;
  }

  /**
   * Sends the call and answers its parsed JSON body; error answers throw typed errors. The body is
   * read inside the attempt, so that a payment's answer lost half-way is retried like no answer.
   */
  async json<T>(call: Call): Promise<T> {
    return this.retrying(call.paying === true, call.idempotencyKey, async () => {
      const response = await this.#attempt(call);
      return decodeJson((await response.text()) || "null") as T;
    });
  }

  /** Sends the call and answers the response, its body unread (2xx only; error answers throw typed errors). */
  async send(call: Call): Promise<Response> {
    return this.retrying(call.paying === true, call.idempotencyKey, () => this.#attempt(call));
  }

  async #attempt(call: Call): Promise<Response> {
    const headers: Record<string, string> = { authorization: this.authorization() };
    if (call.body !== undefined) {
      headers["content-type"] = "application/json";
    }
    if (call.idempotencyKey !== undefined) {
      headers["idempotency-key"] = call.idempotencyKey;
    }
    const init: RequestInit = { method: call.method, headers };
    if (call.body !== undefined) {
      init.body = encodeJson(call.body);
    }
    const response = await this.#fetch(this.#target(call), init);
    if (!response.ok) {
      throw await errorOf(response, call.idempotencyKey);
    }
    // 202: held, waiting for a person's approval; nothing was sent (`ApprovalRequired`).
    if (response.status === 202) {
      let parsed: unknown = null;
      try {
        parsed = decodeJson(await response.clone().text());
      } catch {
        parsed = null;
      }
      const body = errorBody(202, parsed);
      if (body.code === "approval_required") {
        throw errorFrom(202, body, call.idempotencyKey);
      }
    }
    return response;
  }

  /**
   * Runs `attempt`, retrying a paying call whose outcome is unknown (an `…outcome_unknown` answer,
   * or no answer at all) up to `maxRetries` times. Each retry must repeat the same purchase:
   * the same idempotency key, or the same request the daemon recognises as the same purchase.
   */
  async retrying<T>(
    paying: boolean,
    idempotencyKey: string | undefined,
    attempt: () => Promise<T>,
  ): Promise<T> {
    for (let retry = 0; ; retry += 1) {
      let unknown: OutcomeUnknown;
      try {
        return await attempt();
      } catch (error) {
        unknown = unknownOutcome(error, paying, idempotencyKey, this.url);
      }
      if (retry >= this.#maxRetries) {
        throw unknown;
      }
      await delay(this.#retryDelayMs * 2 ** retry);
    }
  }

  #target(call: Call): string {
    const url = new URL(this.url + call.path);
    for (const [name, value] of Object.entries(call.query ?? {})) {
      if (value !== undefined) {
        url.searchParams.set(name, String(value));
      }
    }
    return url.toString();
  }
}

/** The typed error of a daemon's error answer. */
export async function errorOf(response: Response, idempotencyKey?: string): Promise<SpendcapError> {
  const text = await response.text();
  let parsed: unknown = null;
  try {
    parsed = decodeJson(text);
  } catch {
    // Not JSON (a proxy in between, say): keep the status, with a code that says so.
  }
  return errorFrom(response.status, errorBody(response.status, parsed), idempotencyKey);
}

/**
 * Whether a failed attempt of a payment may be retried: an `OutcomeUnknown` answer, or no answer
 * at all (`fetch` failed with a `TypeError`: the payment may have been made). Anything else
 * (another error answer, an abort, any failure of a call that does not pay) is rethrown as it is,
 * except that a call that does not pay and got no answer throws `TransportError`.
 */
function unknownOutcome(
  error: unknown,
  paying: boolean,
  idempotencyKey: string | undefined,
  url: string,
): OutcomeUnknown {
  if (error instanceof OutcomeUnknown && paying) {
    return error;
  }
  if (!(error instanceof TypeError)) {
    throw error;
  }
  if (!paying) {
    throw new TransportError(0, {
      code: "transport_error",
      detail: `no answer from ${url}: ${String(error)}`,
    });
  }
  return new OutcomeUnknown(
    0,
    {
      code: "daemon_outcome_unknown",
      detail: `no answer from ${url} (${String(error)}); the payment may have been made: retry it with the same idempotency key`,
    },
    idempotencyKey,
  );
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * JSON with `bigint` values written as exact JSON integers (`JSON.stringify` refuses them, and a
 * number cannot hold every one). Plain data only: objects, arrays, strings, numbers, booleans,
 * null; `undefined` properties are left out, as `JSON.stringify` does.
 */
export function encodeJson(value: unknown): string {
  if (typeof value === "bigint") {
    return value.toString();
  }
  if (Array.isArray(value)) {
    return `[${value.map((item) => (item === undefined ? "null" : encodeJson(item))).join(",")}]`;
  }
  if (value !== null && typeof value === "object") {
    const fields = Object.entries(value as Record<string, unknown>).filter(([, item]) => item !== undefined);
    return `{${fields.map(([name, item]) => `${JSON.stringify(name)}:${encodeJson(item)}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}

/** Parses the daemon's JSON; integer `*_micros` fields become `bigint`. */
export function decodeJson(text: string): unknown {
  return JSON.parse(text, (key, value: unknown) =>
    key.endsWith("_micros") && typeof value === "number" && Number.isInteger(value) ? BigInt(value) : value,
  );
}
