/**
 * `wrapFetch`: any code that calls `fetch` pays x402 through the daemon by changing nothing else.
 * Each request goes to the daemon's proxy form, `/v1/x402/proxy/<url>`, with the agent's token;
 * the upstream's answer comes back verbatim (whatever its status), and spendcap's own refusals —
 * the answers marked `X-Spendcap-Error` — are thrown as typed errors, never mistaken for the
 * upstream's.
 */

import type { Agent } from "./client.js";
import { errorOf, type FetchLike } from "./http.js";
import { type Amount, toMicros } from "./money.js";

/** Defaults for every request of a wrapped `fetch` (a request's own `X-Spendcap-*` headers win). */
export interface WrapFetchOptions {
  /** The task the spend is attributed to (`X-Spendcap-Task`). */
  task?: string;
  /** The most one request may pay (`X-Spendcap-Max-Amount-Micros`): USD text or bigint micros. */
  maxAmount?: Amount;
}

const PROXY_PATH = "/v1/x402/proxy/";

/**
 * A `fetch` that pays through the daemon for `agent`. The caller's `Authorization` header is
 * sent upstream (as `X-Spendcap-Upstream-Authorization`, which the daemon forwards as
 * `Authorization`); the agent's token only reaches the daemon. Throws `BudgetRefused` when
 * spendcap refuses to pay, `ProviderDeclined` when the server rejected the payment, and retries a
 * payment whose outcome is unknown a bounded number of times (the same request is the same
 * purchase, so a retry never pays twice).
 */
export function wrapFetch(
  fetch: FetchLike,
  agent: Agent,
  options: WrapFetchOptions = {},
): typeof globalThis.fetch {
  const connection = agent.connection;
  const maxAmount = options.maxAmount === undefined ? undefined : toMicros(options.maxAmount).toString();
  const wrapped = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const request = new Request(input, init);
    const headers = new Headers(request.headers);
    const upstreamAuthorization = headers.get("authorization");
    headers.delete("authorization");
    if (upstreamAuthorization !== null) {
      headers.set("x-spendcap-upstream-authorization", upstreamAuthorization);
    }
    headers.set("authorization", connection.authorization());
    if (options.task !== undefined && !headers.has("x-spendcap-task")) {
      headers.set("x-spendcap-task", options.task);
    }
    if (maxAmount !== undefined && !headers.has("x-spendcap-max-amount-micros")) {
      headers.set("x-spendcap-max-amount-micros", maxAmount);
    }
    const idempotencyKey =
      headers.get("x-spendcap-idempotency-key") ?? headers.get("idempotency-key") ?? undefined;
    // Read once, so that a retry sends the same bytes (the same purchase).
    const body = request.body === null ? undefined : await request.arrayBuffer();
    const target = `${connection.url}${PROXY_PATH}${request.url}`;
    return connection.retrying(true, idempotencyKey, async () => {
      const sent: RequestInit = {
        method: request.method,
        headers,
        redirect: "manual",
        signal: request.signal,
      };
      if (body !== undefined) {
        sent.body = body;
      }
      const response = await fetch(target, sent);
      if (response.headers.has("x-spendcap-error")) {
        throw await errorOf(response, idempotencyKey);
      }
      return response;
    });
  };
  return wrapped as typeof globalThis.fetch;
}
