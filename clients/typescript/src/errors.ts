/**
 * Every error the daemon answers is `{code, detail, …}` with a stable snake_case `code`; this
 * module turns it into one class per failure family, carrying the fields the daemon sent.
 */

/** The daemon's error body: `code` and `detail`, plus whatever fields the error carries. */
export type ErrorBody = { code: string; detail: string } & Record<string, unknown>;

/** Any error answer from the daemon (or a failure to reach it). */
export class SpendcapError extends Error {
  override name = "SpendcapError";
  /** The HTTP status (0 when the daemon could not be reached). */
  readonly status: number;
  /** The stable snake_case code, e.g. `cap_exceeded`. */
  readonly code: string;
  readonly detail: string;
  /** The whole error body, `*_micros` fields as `bigint`. */
  readonly body: ErrorBody;

  constructor(status: number, body: ErrorBody) {
    super(`${body.code}: ${body.detail}`);
    this.status = status;
    this.code = body.code;
    this.detail = body.detail;
    this.body = body;
  }
}

/**
 * Spendcap refused to pay (HTTP 402 of its own): a cap, a limit, a revoked, suspended or expired
 * agent, or a payment policy (an x402 price above the call's maximum, say). Nothing was paid, and
 * the same request will be refused again: stop spending, or change what is asked.
 */
export class BudgetRefused extends SpendcapError {
  override name = "BudgetRefused";
  /** What the payment asked for (absent for a policy refusal that names no amount). */
  readonly requestedMicros: bigint | undefined;
  /** What the agent may still spend, counting every ancestor's cap and limit. */
  readonly remainingMicros: bigint | undefined;
  /** The agent (this one or an ancestor) whose limit refused the payment. */
  readonly limitedBy: string | undefined;

  constructor(status: number, body: ErrorBody) {
    super(status, body);
    this.requestedMicros = bigintField(body, "requested_micros");
    this.remainingMicros = bigintField(body, "remaining_micros");
    this.limitedBy = typeof body.limited_by === "string" ? body.limited_by : undefined;
  }
}

/**
 * The other side (merchant, PSP, Credential Provider, processor, x402 server) declined the
 * payment. The hold was voided, except an x402 authorization the server rejected: it stays held
 * until its `validBefore` (`held_until_ms`), since whoever holds it could still settle it.
 */
export class ProviderDeclined extends SpendcapError {
  override name = "ProviderDeclined";
  /** The provider's own reason when it sent one (ACP `payment_declined`, AP2 `error`, x402 `reason`), else spendcap's code. */
  readonly reason: string;
  /** The provider's error object as the daemon shows it, when there is one. */
  readonly providerError: Record<string, unknown> | undefined;

  constructor(status: number, body: ErrorBody) {
    super(status, body);
    const provider = body.provider_error;
    this.providerError =
      provider !== null && typeof provider === "object" ? (provider as Record<string, unknown>) : undefined;
    const reasons = [this.providerError?.code, body.error, body.reason];
    this.reason = reasons.find((r): r is string => typeof r === "string" && r !== "") ?? body.code;
  }
}

/**
 * Nobody knows yet whether money moved (any code ending in `outcome_unknown`): the amount stays
 * held. Retrying with the same idempotency key resumes the same purchase and never pays twice; the
 * client does so a bounded number of times before it throws this.
 */
export class OutcomeUnknown extends SpendcapError {
  override name = "OutcomeUnknown";
  /** The hold that stays open, when the daemon named it (ACP cancel takes it). */
  readonly holdId: string | undefined;
  /** The idempotency key the retries used: retry again with it. */
  readonly idempotencyKey: string | undefined;

  constructor(status: number, body: ErrorBody, idempotencyKey?: string) {
    super(status, body);
    this.holdId = typeof body.hold_id === "string" ? body.hold_id : undefined;
    this.idempotencyKey = idempotencyKey;
  }
}

/** The ledger (Redis) is unreachable: every payment is refused (fail closed); nothing was paid. */
export class LedgerUnavailable extends SpendcapError {
  override name = "LedgerUnavailable";
}

/** A missing, unknown or rotated token, or an agent token on an admin route. */
export class AuthError extends SpendcapError {
  override name = "AuthError";
}

/** The request was refused as it stands (malformed, unknown, conflicting); nothing changed. */
export class InvalidRequest extends SpendcapError {
  override name = "InvalidRequest";
}

/** Codes of the daemon's 402s that are the provider's decision, not spendcap's. */
const PROVIDER_DECLINED_CODES = new Set([
  "x402_payment_rejected",
  "acp_merchant_error",
  "acp_merchant_declined",
  "acp_psp_error",
  "ap2_payment_declined",
]);

/** The error class for a daemon's error answer. */
export function errorFrom(status: number, body: ErrorBody, idempotencyKey?: string): SpendcapError {
  const code = body.code;
  if (code.endsWith("outcome_unknown")) {
    return new OutcomeUnknown(status, body, idempotencyKey);
  }
  if (code === "ledger_unavailable") {
    return new LedgerUnavailable(status, body);
  }
  if (status === 401 || code === "invalid_token" || code === "admin_only") {
    return new AuthError(status, body);
  }
  if (PROVIDER_DECLINED_CODES.has(code) || (body.provider_error !== undefined && status < 500)) {
    return new ProviderDeclined(status, body);
  }
  if (status === 402) {
    return new BudgetRefused(status, body);
  }
  if (status >= 400 && status < 500) {
    return new InvalidRequest(status, body);
  }
  return new SpendcapError(status, body);
}

/** Reads a body that should be `{code, detail}`; anything else becomes an `http_<status>` error. */
export function errorBody(status: number, parsed: unknown): ErrorBody {
  if (
    parsed !== null &&
    typeof parsed === "object" &&
    typeof (parsed as { code?: unknown }).code === "string"
  ) {
    const body = parsed as Record<string, unknown>;
    return { ...body, code: body.code as string, detail: typeof body.detail === "string" ? body.detail : "" };
  }
  return { code: `http_${status}`, detail: `the daemon answered HTTP ${status} without an error body` };
}

function bigintField(body: Record<string, unknown>, name: string): bigint | undefined {
  const value = body[name];
  if (typeof value === "bigint") {
    return value;
  }
  return typeof value === "number" && Number.isSafeInteger(value) ? BigInt(value) : undefined;
}
