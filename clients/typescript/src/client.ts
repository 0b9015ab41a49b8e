/**
 * The two faces of the HTTP API: `Spendcap` with the admin token (agents, caps, revocation,
 * outcomes, reports, log, receipts) and `Agent` with an agent's token (its budget, holds, x402,
 * ACP, AP2, task outcomes). Thin: every method is one daemon request; the daemon decides.
 */

import { randomUUID } from "node:crypto";

import { type Call, Connection, type ConnectionOptions, decodeJson } from "./http.js";
import { type Amount, toMicros } from "./money.js";
import { verifyReceipts } from "./receipts.js";
import type {
  AcpCanceled,
  AcpCheckout,
  AgentView,
  Ap2Key,
  Ap2Mandate,
  Ap2Payment,
  Budget,
  FetchResult,
  Hold,
  OutcomeView,
  Receipt,
  ReceiptKey,
  Revoked,
  RotatedToken,
  Settled,
  TaskOutcome,
  Voided,
} from "./types.js";

/** Options of `Spendcap`: the admin token (default `$SPENDCAP_ADMIN_TOKEN`) and the connection. */
export interface SpendcapOptions extends ConnectionOptions {
  adminToken?: string;
}

/** `POST /v1/agents`. */
export interface CreateAgentOptions {
  /** Unique, 1 to 64 characters of `[a-z0-9_.-]`. */
  handle: string;
  /** The hard cap: USD text (`"1.50"`) or bigint micros. */
  cap: Amount;
  /** The parent agent (id or handle): the new agent joins its budget tree. */
  parent?: string;
  /** Expire this many seconds from now (holds after it: `agent_expired`). */
  ttlSecs?: number;
  /** Or expire at this time (ms since the epoch). */
  expiresAtMs?: number;
  labels?: Record<string, string>;
  /** Spending controls, as `PUT /v1/agents/{agent}/controls` takes them (`*_micros` as bigint). */
  controls?: Record<string, unknown>;
  /** A sub-agent for this task of its parent. */
  task?: string;
}

export type OperatorRole = "viewer" | "operator" | "admin";

export interface OperatorView {
  name: string;
  role: OperatorRole;
  /** The budget tree the token is limited to; `null`: every tree. */
  tree: string | null;
  created_at_ms: number;
  created_by: string;
  revoked_at_ms: number | null;
}

export interface CreatedOperator extends OperatorView {
  /** The bearer token (`sco_op_…`), shown only in this answer. */
  token: string;
}

export interface WhoAmI {
  name: string;
  role: OperatorRole;
  tree: string | null;
  actions: string[];
  /** Actions it may take only in the tightening direction (lower a cap, …). */
  tighten_only: string[];
}

export interface CreatedAgent {
  agent: AgentView;
  /** The agent's bearer token, shown only once. */
  token: string;
}

/** Options of `Spendcap.run`: the isolated agent's cap and where it sits. */
export interface RunOptions extends Omit<CreateAgentOptions, "handle"> {
  /** Default `run-<random>`. */
  handle?: string;
}

/** Filters of the log export and spend summaries. */
export interface LogFilter {
  agent?: string;
  task?: string;
  service?: string;
  protocol?: string;
  sinceMs?: number;
  untilMs?: number;
}

/** The administrator's client (admin token). */
export class Spendcap {
  readonly #connection: Connection;

  constructor(options: SpendcapOptions = {}) {
    const { adminToken, ...connection } = options;
    this.#connection = new Connection(adminToken ?? process.env.SPENDCAP_ADMIN_TOKEN ?? "", connection);
  }

  /** The daemon's base URL. */
  get url(): string {
    return this.#connection.url;
  }

  /** Creates an agent; its token is in the answer, once. */
  async createAgent(options: CreateAgentOptions): Promise<CreatedAgent> {
    return this.#json({ method: "POST", path: "/v1/agents", body: createBody(options) });
  }

  async listAgents(): Promise<AgentView[]> {
    return (await this.#json<{ agents: AgentView[] }>({ method: "GET", path: "/v1/agents" })).agents;
  }

  /** One agent, by id or handle. */
  async getAgent(agent: string): Promise<AgentView> {
    return this.#json({ method: "GET", path: `/v1/agents/${segment(agent)}` });
  }

  async setCap(agent: string, cap: Amount): Promise<AgentView> {
    return this.#json({
      method: "PUT",
      path: `/v1/agents/${segment(agent)}/cap`,
      body: { cap_micros: toMicros(cap) },
    });
  }

  /** Revokes the agent and its sub-agents: their very next payment is refused everywhere. */
  async revoke(agent: string, reason: string): Promise<Revoked> {
    return this.#json({ method: "POST", path: `/v1/agents/${segment(agent)}/revoke`, body: { reason } });
  }

  async rotateToken(agent: string): Promise<RotatedToken> {
    return this.#json({ method: "POST", path: `/v1/agents/${segment(agent)}/rotate-token` });
  }

  /** Replaces the agent's spending controls (the whole set; see the README). */
  async setControls(agent: string, controls: Record<string, unknown>): Promise<Record<string, unknown>> {
    return this.#json({ method: "PUT", path: `/v1/agents/${segment(agent)}/controls`, body: controls });
  }

  /** Payments waiting for (or decided about) a person's approval, newest first. */
  async approvals(state?: string): Promise<Record<string, unknown>[]> {
    const query = state === undefined ? "" : `?state=${encodeURIComponent(state)}`;
    const list = await this.#json<{ approvals: Record<string, unknown>[] }>({
      method: "GET",
      path: `/v1/approvals${query}`,
    });
    return list.approvals;
  }

  /** Approves (or, with `approve: false`, denies) a waiting payment, with a note for the log. */
  async decideApproval(approvalId: string, approve: boolean, note = ""): Promise<Record<string, unknown>> {
    const decision = approve ? "approve" : "deny";
    return this.#json({
      method: "POST",
      path: `/v1/approvals/${segment(approvalId)}/${decision}`,
      body: { note },
    });
  }

  /** Lifts a suspension by the runaway-loop breaker. */
  async reinstate(agent: string): Promise<{ agent_id: string; was_suspended: string | null }> {
    return this.#json({ method: "POST", path: `/v1/agents/${segment(agent)}/reinstate` });
  }

  /**
   * Creates an operator token with a role (`viewer`, `operator`, `admin`), optionally limited to
   * the budget tree of agent `tree`. The answer's `token` is shown only here.
   */
  async createOperator(options: {
    name: string;
    role: OperatorRole;
    tree?: string;
  }): Promise<CreatedOperator> {
    return this.#json({ method: "POST", path: "/v1/operators", body: { ...options } });
  }

  /** Every operator token's name, role, tree and dates (never a token). */
  async listOperators(): Promise<OperatorView[]> {
    return (await this.#json<{ operators: OperatorView[] }>({ method: "GET", path: "/v1/operators" }))
      .operators;
  }

  /** Revokes an operator token by name: it stops at once, on every instance. */
  async revokeOperator(
    name: string,
  ): Promise<{ name: string; revoked_at_ms: number; already_revoked: boolean }> {
    return this.#json({ method: "POST", path: `/v1/operators/${segment(name)}/revoke` });
  }

  /** This client's token: its name, role, tree and the actions it may take. */
  async whoami(): Promise<WhoAmI> {
    return this.#json({ method: "GET", path: "/v1/whoami" });
  }

  /** Records how one of the agent's tasks ended (one `outcome` log line, no balance change). */
  async recordOutcome(
    agent: string,
    task: string,
    outcome: TaskOutcome,
    taskType: string,
  ): Promise<OutcomeView> {
    return this.#json({
      method: "POST",
      path: `/v1/tasks/${segment(task)}/outcome`,
      body: { agent, outcome, task_type: taskType },
    });
  }

  /** The cost report (`GET /v1/reports`, JSON). */
  async report(
    filter: { agent?: string; sinceMs?: number; untilMs?: number } = {},
  ): Promise<Record<string, unknown>> {
    return this.#json({
      method: "GET",
      path: "/v1/reports",
      query: { format: "json", agent: filter.agent, since_ms: filter.sinceMs, until_ms: filter.untilMs },
    });
  }

  /** Spend summed by agent, task, service or protocol. */
  async spend(
    groupBy: "agent" | "task" | "service" | "protocol",
    filter: LogFilter = {},
  ): Promise<Record<string, unknown>> {
    return this.#json({
      method: "GET",
      path: "/v1/spend",
      query: { group_by: groupBy, ...logQuery(filter) },
    });
  }

  /**
   * Streams the log export, one line at a time (a JSON object per line for `jsonl`, CSV rows
   * with a header for `csv`), as the daemon pages through it.
   */
  async *exportLog(filter: LogFilter = {}, format: "jsonl" | "csv" = "jsonl"): AsyncGenerator<string> {
    const response = await this.#connection.send({
      method: "GET",
      path: "/v1/log",
      query: { format, ...logQuery(filter) },
    });
    yield* lines(response);
  }

  /** The receipt chain of the agent's budget tree, in order. */
  async receipts(agent: string): Promise<Receipt[]> {
    const response = await this.#connection.send({ method: "GET", path: "/v1/receipts", query: { agent } });
    const receipts: Receipt[] = [];
    for await (const line of lines(response)) {
      receipts.push(decodeJson(line) as Receipt);
    }
    return receipts;
  }

  /** The daemon's receipt signing key (public). */
  async receiptKey(): Promise<ReceiptKey> {
    return this.#json({ method: "GET", path: "/v1/receipt-key" });
  }

  /**
   * Verifies receipts offline: every Ed25519 signature, and per budget tree consecutive sequence
   * numbers chained by `prev_hash`. The key defaults to the daemon's own (`GET /v1/receipt-key`);
   * pass the one you pinned to trust it instead.
   */
  async verifyReceipts(
    receipts: Receipt[],
    publicKey?: string,
  ): Promise<{ receipts: number; trees: number }> {
    return verifyReceipts(receipts, publicKey ?? (await this.receiptKey()).public_key);
  }

  /** A client for an agent's token, reaching the same daemon. */
  agent(token: string): Agent {
    return new Agent(token, this.#connection.options());
  }

  /**
   * The run pattern: creates an isolated agent (its own cap, under `parent` if given), hands a
   * client for it to `work`, and revokes it when `work` ends, whatever the exit (`run_ended`, or
   * `run_failed` when `work` threw). Its next payment past the cap is refused with `BudgetRefused`.
   */
  async run<T>(options: RunOptions, work: (agent: Agent, created: CreatedAgent) => Promise<T>): Promise<T> {
    const handle = options.handle ?? `run-${randomUUID().slice(0, 12)}`;
    const created = await this.createAgent({ ...options, handle });
    let outcome: { ok: true; value: T } | { ok: false; error: unknown };
    try {
      outcome = { ok: true, value: await work(this.agent(created.token), created) };
    } catch (error) {
      outcome = { ok: false, error };
    }
    try {
      await this.revoke(created.agent.id, outcome.ok ? "run_ended" : "run_failed");
    } catch (revokeError) {
      // Both matter: the agent is still live, and why the run failed.
      throw outcome.ok
        ? revokeError
        : new AggregateError(
            [outcome.error, revokeError],
            "the run failed and its agent could not be revoked",
          );
    }
    if (!outcome.ok) {
      throw outcome.error;
    }
    return outcome.value;
  }

  #json<T>(call: Call): Promise<T> {
    return this.#connection.json<T>(call);
  }
}

/** Options of `Agent`: the connection (the token is the first argument, default `$SPENDCAP_AGENT_TOKEN`). */
export type AgentOptions = ConnectionOptions;

/** `POST /v1/holds`. */
export interface HoldOptions {
  /** How much to reserve: USD text or bigint micros. */
  amount: Amount;
  /** Who is paid: a host, a vendor, a model provider. */
  service: string;
  task?: string;
  ttlSecs?: number;
  details?: Record<string, string>;
  /** Names the hold: the same key and body return the first hold, never a second one. Default: a new UUID. */
  idempotencyKey?: string;
}

/** `POST /v1/x402/fetch`. */
export interface FetchOptions {
  url: string;
  method?: string;
  headers?: Record<string, string>;
  /** The body as text (or `bodyBase64` for bytes). */
  body?: string;
  bodyBase64?: string;
  task?: string;
  /** The most this call may pay: USD text or bigint micros. */
  maxAmount?: Amount;
  /** Names the purchase; without it, the same task + method + URL + body is the same purchase. */
  idempotencyKey?: string;
}

/** `POST /v1/acp/checkouts`: pay an existing session, or create one from items and pay it. */
export interface AcpCheckoutOptions {
  merchant: string;
  checkoutSessionId?: string;
  /** Items by the merchant's ids (instead of a session id). */
  items?: Array<string | { id: string; name?: string }>;
  currency?: string;
  buyer?: Record<string, unknown>;
  fulfillmentDetails?: Record<string, unknown>;
  task?: string;
  /**
   * Names the purchase. Without it a session is paid at most once; a purchase from items gets a
   * new UUID here, so that this client's own retries resume it instead of buying again.
   */
  idempotencyKey?: string;
}

/** `POST /v1/ap2/payments`. */
export interface Ap2PayOptions {
  /** The merchant-signed checkout JWT. */
  checkoutJwt: string;
  /** The user's open mandates (SD-JWT), sent with every payment. */
  openCheckoutMandate: string;
  openPaymentMandate: string;
  merchant?: string;
  task?: string;
  /** Names the payment; without it the same checkout is the same payment. */
  idempotencyKey?: string;
}

/** What `withHold` settles: the amount used (USD text or bigint micros). */
export interface Used<T> {
  used: Amount;
  result: T;
}

/** An agent's client (agent token): its budget, and every way it pays. */
export class Agent {
  readonly #connection: Connection;

  constructor(token: string = process.env.SPENDCAP_AGENT_TOKEN ?? "", options: AgentOptions = {}) {
    this.#connection = new Connection(token, options);
  }

  /** The daemon's base URL. */
  get url(): string {
    return this.#connection.url;
  }

  /** The connection (for `wrapFetch`). */
  get connection(): Connection {
    return this.#connection;
  }

  /** Own cap, spent, held, remaining and available (counting ancestors). */
  async me(): Promise<Budget> {
    return this.#connection.json({ method: "GET", path: "/v1/me" });
  }

  /**
   * This agent's own approvals of the last week, newest first, optionally in one state (`pending`,
   * `approved`, `denied`, `expired`, `canceled`): how a process that did not make the payment
   * finds what waits for a person.
   */
  async approvals(state?: string): Promise<Record<string, unknown>[]> {
    const query = state === undefined ? "" : `?state=${encodeURIComponent(state)}`;
    const list = await this.#connection.json<{ approvals: Record<string, unknown>[] }>({
      method: "GET",
      path: `/v1/me/approvals${query}`,
    });
    return list.approvals;
  }

  /**
   * The approval of a payment that threw `ApprovalRequired`, waiting up to `waitSecs` (at most 60)
   * for a person's decision: `state` is then `approved` (repeat the call with the same
   * idempotency key), `denied`, `expired` or still `pending`.
   */
  async waitForApproval(approvalId: string, waitSecs = 30): Promise<Record<string, unknown>> {
    return this.#connection.json({
      method: "GET",
      path: `/v1/me/approvals/${encodeURIComponent(approvalId)}?wait_secs=${waitSecs}`,
    });
  }

  /** Reserves an amount against the cap (refused with `BudgetRefused` past it). */
  async hold(options: HoldOptions): Promise<Hold> {
    const body: Record<string, unknown> = {
      amount_micros: toMicros(options.amount),
      service: options.service,
      task: options.task ?? "",
    };
    if (options.ttlSecs !== undefined) body.ttl_secs = options.ttlSecs;
    if (options.details !== undefined) body.details = options.details;
    return this.#connection.json({
      method: "POST",
      path: "/v1/holds",
      body,
      idempotencyKey: options.idempotencyKey ?? randomUUID(),
      paying: true,
    });
  }

  /** Settles what the call really cost (at most the hold); the rest is released. */
  async settle(holdId: string, amount: Amount, details?: Record<string, string>): Promise<Settled> {
    const body: Record<string, unknown> = { amount_micros: toMicros(amount) };
    if (details !== undefined) body.details = details;
    return this.#connection.json({
      method: "POST",
      path: `/v1/holds/${segment(holdId)}/settle`,
      body,
      paying: true,
    });
  }

  /** Releases a hold: nothing was spent. */
  async void(holdId: string, reason?: string): Promise<Voided> {
    const body = reason === undefined ? {} : { reason };
    return this.#connection.json({
      method: "POST",
      path: `/v1/holds/${segment(holdId)}/void`,
      body,
      paying: true,
    });
  }

  /**
   * Holds an estimate, runs `work`, and settles the amount `work` reports it used; voids the hold
   * if `work` throws (nothing was spent), then rethrows.
   */
  async withHold<T>(options: HoldOptions, work: (hold: Hold) => Promise<Used<T>>): Promise<T> {
    const hold = await this.hold(options);
    let outcome: Used<T>;
    try {
      outcome = await work(hold);
    } catch (error) {
      await this.void(hold.hold_id, "call_failed");
      throw error;
    }
    await this.settle(hold.hold_id, outcome.used);
    return outcome.result;
  }

  /** Fetches a URL through the daemon, paying its x402 402 within the cap (JSON form). */
  async fetch(options: FetchOptions): Promise<FetchResult> {
    const body: Record<string, unknown> = { url: options.url, task: options.task ?? "" };
    if (options.method !== undefined) body.method = options.method;
    if (options.headers !== undefined) body.headers = options.headers;
    if (options.body !== undefined) body.body = options.body;
    if (options.bodyBase64 !== undefined) body.body_base64 = options.bodyBase64;
    if (options.maxAmount !== undefined) body.max_amount_micros = toMicros(options.maxAmount);
    return this.#connection.json({
      method: "POST",
      path: "/v1/x402/fetch",
      body,
      idempotencyKey: options.idempotencyKey,
      paying: true,
    });
  }

  /** Pays a merchant's ACP checkout session with the owner's card (which the agent never sees). */
  async acpCheckout(options: AcpCheckoutOptions): Promise<AcpCheckout> {
    const body: Record<string, unknown> = { merchant: options.merchant, task: options.task ?? "" };
    if (options.checkoutSessionId !== undefined) body.checkout_session_id = options.checkoutSessionId;
    if (options.items !== undefined) {
      body.items = options.items.map((item) => (typeof item === "string" ? { id: item } : item));
    }
    if (options.currency !== undefined) body.currency = options.currency;
    if (options.buyer !== undefined) body.buyer = options.buyer;
    if (options.fulfillmentDetails !== undefined) body.fulfillment_details = options.fulfillmentDetails;
    const fromItems = options.checkoutSessionId === undefined;
    return this.#connection.json({
      method: "POST",
      path: "/v1/acp/checkouts",
      body,
      idempotencyKey: options.idempotencyKey ?? (fromItems ? randomUUID() : undefined),
      paying: true,
    });
  }

  /** Cancels an ACP checkout session, voiding the hold an `acp_outcome_unknown` answer named. */
  async acpCancel(options: {
    merchant: string;
    checkoutSessionId: string;
    holdId?: string;
  }): Promise<AcpCanceled> {
    const body: Record<string, unknown> = { merchant: options.merchant };
    if (options.holdId !== undefined) body.hold_id = options.holdId;
    return this.#connection.json({
      method: "POST",
      path: `/v1/acp/checkouts/${segment(options.checkoutSessionId)}/cancel`,
      body,
    });
  }

  /** The agent's AP2 public key (the `cnf` its user signs open mandates for). */
  async ap2Key(): Promise<Ap2Key> {
    return this.#connection.json({ method: "GET", path: "/v1/ap2/key" });
  }

  /** Verifies the user's open mandates and creates the budget of the open payment mandate. */
  async ap2RegisterMandates(openCheckoutMandate: string, openPaymentMandate: string): Promise<Ap2Mandate> {
    return this.#connection.json({
      method: "POST",
      path: "/v1/ap2/mandates",
      body: { open_checkout_mandate: openCheckoutMandate, open_payment_mandate: openPaymentMandate },
    });
  }

  /** An open payment mandate's budget: spent, held, remaining. */
  async ap2Mandate(mandateId: string): Promise<Ap2Mandate> {
    return this.#connection.json({ method: "GET", path: `/v1/ap2/mandates/${segment(mandateId)}` });
  }

  /** Pays a merchant-signed AP2 checkout under the user's open mandates. */
  async ap2Pay(options: Ap2PayOptions): Promise<Ap2Payment> {
    const body: Record<string, unknown> = {
      checkout_jwt: options.checkoutJwt,
      open_checkout_mandate: options.openCheckoutMandate,
      open_payment_mandate: options.openPaymentMandate,
      task: options.task ?? "",
    };
    if (options.merchant !== undefined) body.merchant = options.merchant;
    return this.#connection.json({
      method: "POST",
      path: "/v1/ap2/payments",
      body,
      idempotencyKey: options.idempotencyKey,
      paying: true,
    });
  }

  /** Records how one of this agent's tasks ended. */
  async recordOutcome(task: string, outcome: TaskOutcome, taskType: string): Promise<OutcomeView> {
    return this.#connection.json({
      method: "POST",
      path: `/v1/tasks/${segment(task)}/outcome`,
      body: { outcome, task_type: taskType },
    });
  }

  /**
   * A sub-agent under this agent, funded from what it has left: its cap at most that, its
   * controls no looser than this agent's (else `AuthError` `sub_agent_exceeds_parent`, with
   * `bound`). Its token is in the answer, once.
   */
  async createSubAgent(options: CreateSubAgentOptions): Promise<CreatedAgent> {
    return this.#connection.json({ method: "POST", path: "/v1/me/agents", body: createBody(options) });
  }

  /** This agent's sub-agents, and theirs. */
  async subAgents(): Promise<AgentView[]> {
    return (await this.#connection.json<{ agents: AgentView[] }>({ method: "GET", path: "/v1/me/agents" }))
      .agents;
  }

  /** Revokes one of this agent's descendants (and everything under it), at once. */
  async revokeSubAgent(agent: string, reason: string): Promise<Revoked> {
    return this.#connection.json({
      method: "POST",
      path: `/v1/me/agents/${segment(agent)}/revoke`,
      body: { reason },
    });
  }

  /** A short-lived token for one task, of this agent or (`agent`) one of its descendants. */
  async taskToken(options: TaskTokenOptions): Promise<TaskToken> {
    const body: Record<string, unknown> = { task: options.task, ttl_secs: options.ttlSecs };
    if (options.agent !== undefined) body.agent = options.agent;
    return this.#connection.json({ method: "POST", path: "/v1/me/tokens", body });
  }

  /** Revokes a task token of this agent or of a descendant. */
  async revokeTaskToken(tokenId: string): Promise<{ token_id: string; already_revoked: boolean }> {
    return this.#connection.json({ method: "DELETE", path: `/v1/me/tokens/${segment(tokenId)}` });
  }
}

/** `POST /v1/me/agents`: a sub-agent of the calling agent (no `parent`: it is the caller). */
export type CreateSubAgentOptions = Omit<CreateAgentOptions, "parent">;

/** `POST /v1/me/tokens`. */
export interface TaskTokenOptions {
  /** The task the token's payments are attributed to. */
  task: string;
  /** Lifetime in seconds (1 to 30 days), by the daemon's ledger clock. */
  ttlSecs: number;
  /** A descendant (id or handle) to make it for; default this agent. */
  agent?: string;
}

/** A task token, shown once: it pays for its task until it expires or is revoked. */
export interface TaskToken {
  token_id: string;
  token: string;
  agent_id: string;
  task: string;
  expires_at_ms: number;
}

function createBody(options: CreateAgentOptions): Record<string, unknown> {
  const body: Record<string, unknown> = { handle: options.handle, cap_micros: toMicros(options.cap) };
  if (options.parent !== undefined) body.parent = options.parent;
  if (options.ttlSecs !== undefined) body.ttl_secs = options.ttlSecs;
  if (options.expiresAtMs !== undefined) body.expires_at_ms = options.expiresAtMs;
  if (options.labels !== undefined) body.labels = options.labels;
  if (options.controls !== undefined) body.controls = options.controls;
  if (options.task !== undefined) body.task = options.task;
  return body;
}

function logQuery(filter: LogFilter): Record<string, string | number | undefined> {
  return {
    agent: filter.agent,
    task: filter.task,
    service: filter.service,
    protocol: filter.protocol,
    since_ms: filter.sinceMs,
    until_ms: filter.untilMs,
  };
}

/** A path segment, percent-encoded. */
function segment(text: string): string {
  return encodeURIComponent(text);
}

/** The lines of a streamed text body, as they arrive. */
async function* lines(response: Response): AsyncGenerator<string> {
  if (response.body === null) {
    return;
  }
  const decoder = new TextDecoder();
  let pending = "";
  for await (const chunk of response.body as AsyncIterable<Uint8Array>) {
    pending += decoder.decode(chunk, { stream: true });
    let end = pending.indexOf("\n");
    while (end >= 0) {
      const line = pending.slice(0, end).replace(/\r$/, "");
      pending = pending.slice(end + 1);
      if (line !== "") yield line;
      end = pending.indexOf("\n");
    }
  }
  pending += decoder.decode();
  if (pending !== "") yield pending;
}
