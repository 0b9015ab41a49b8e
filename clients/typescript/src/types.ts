/**
 * What the daemon answers, as it sends it: snake_case field names, every integer `*_micros` field
 * a `bigint` (micro-USD). See the daemon's `GET /openapi.json` and README.
 */

export interface AgentView {
  id: string;
  handle: string;
  parent: string | null;
  tree: string;
  depth: number;
  cap_micros: bigint;
  spent_micros: bigint;
  held_micros: bigint;
  /** The agent's own cap - spent - held. */
  remaining_micros: bigint;
  revoked: string | null;
  revoked_at_ms: number | null;
  expires_at_ms: number | null;
  created_at_ms: number;
  labels: Record<string, string>;
  suspended?: string | null;
  suspended_at_ms?: number | null;
  task_of?: string | null;
}

export interface Revoked {
  agent_id: string;
  reason: string;
  revoked_at_ms: number;
  already_revoked: boolean;
}

export interface RotatedToken {
  agent_id: string;
  token: string;
}

/** `GET /v1/me`: the agent's own budget. */
export interface Budget {
  agent_id: string;
  cap_micros: bigint;
  spent_micros: bigint;
  held_micros: bigint;
  /** The agent's own cap - spent - held. */
  remaining_micros: bigint;
  /** What the agent can hold now, counting every ancestor's cap. */
  available_micros: bigint;
  revoked: string | null;
  expires_at_ms: number | null;
  suspended?: string | null;
}

export interface Hold {
  hold_id: string;
  amount_micros: bigint;
  expires_at_ms: number;
  remaining_micros: bigint;
  replayed: boolean;
}

/** A signed, hash-chained spendcap receipt (verify with `verifyReceipts`). */
export interface Receipt {
  receipt: {
    version: number;
    tree: string;
    seq: number;
    prev_hash: string;
    hold_id: string;
    agent_id: string;
    amount_micros: bigint;
    held_micros: bigint;
    currency: string;
    task: string;
    service: string;
    protocol: string;
    settled_at_ms: number;
    details: Record<string, unknown>;
  };
  key_id: string;
  signature: string;
}

export interface Settled {
  hold_id: string;
  amount_micros: bigint;
  released_micros: bigint;
  replayed: boolean;
  receipt: Receipt;
}

export interface Voided {
  hold_id: string;
  released_micros: bigint;
  replayed: boolean;
}

/** One x402 payment as the daemon reports it. */
export interface X402Payment {
  /** `settled` (receipt set) or `unconfirmed` (the amount stays held until `valid_before`). */
  status: "settled" | "unconfirmed";
  hold_id: string;
  amount_micros: bigint;
  network: string;
  asset: string;
  pay_to: string;
  nonce: string;
  valid_before: number;
  transaction?: string;
  payer?: string;
  receipt?: Receipt;
  reason?: string;
}

/** `POST /v1/x402/fetch`: the upstream's answer (its own status in `status`) and the payment. */
export interface FetchResult {
  status: number;
  headers: Record<string, string>;
  body?: string;
  body_base64?: string;
  payment: X402Payment | null;
  replayed: boolean;
}

/** A paid ACP checkout. */
export interface AcpCheckout {
  status: "completed";
  merchant: string;
  checkout_session_id: string;
  order: { id: string; permalink_url?: string; order_number?: string };
  /** The session total in the merchant's minor units. */
  total: { amount: number; currency: string };
  amount_micros: bigint;
  hold_id: string;
  replayed: boolean;
  receipt: Receipt;
}

export interface AcpCanceled {
  status: "canceled";
  merchant: string;
  checkout_session_id: string;
  hold_id: string | null;
  released_micros: bigint;
}

/** A paid AP2 checkout. */
export interface Ap2Payment {
  status: string;
  hold_id: string;
  amount_micros: bigint;
  service: string;
  merchant_id: string;
  checkout_id: string;
  checkout_hash: string;
  payment_mandate_id: string;
  checkout_mandate_id: string;
  order_id: string | null;
  payment_id: string | null;
  checkout_receipt: unknown;
  payment_receipt: unknown;
  receipt: Receipt;
  replayed: boolean;
}

/** The agent's AP2 public key, for the `cnf` of its open mandates. */
export interface Ap2Key {
  agent_id: string;
  alg: string;
  jwk: Record<string, string>;
  cnf: unknown;
  thumbprint: string;
}

/** An open mandate's budget as the ledger holds it (`POST /v1/ap2/mandates`, `GET /v1/ap2/mandates/{id}`). */
export interface Ap2Mandate {
  mandate_id: string;
  bucket_id: string;
  /** `payment.budget` in micro-USD; `null` when the mandate sets none (the agent's cap still applies). */
  budget_micros: bigint | null;
  spent_micros: bigint;
  held_micros: bigint;
  remaining_micros: bigint | null;
  /** Closed mandates outstanding (at most one: the budget is exclusive). */
  outstanding: number;
  checkout_mandate_id?: string;
  expires_at?: number;
  amount_range?: unknown;
  allowed_payees?: string[];
  allowed_merchants?: string[];
}

export type TaskOutcome = "success" | "failed" | "abandoned";

export interface OutcomeView {
  agent: string;
  task: string;
  task_type: string;
  outcome: TaskOutcome;
}

export interface ReceiptKey {
  alg: string;
  key_id: string;
  /** Ed25519 public key, base64url without padding. */
  public_key: string;
}
