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
 * Spendcap itself refused to pay (an HTTP 402 of its own, before anything was signed or sent):
 * nothing was paid, and the same request will be refused again. `BudgetRefused` is the budget's
 * refusal; this class alone is a payment policy's (an x402 price above the call's maximum, an
 * unknown network or asset, …).
 */
export class PaymentRefused extends SpendcapError {
  override name = "PaymentRefused";
  /** What the payment asked for, when the daemon said. */
  readonly requestedMicros: bigint | undefined;
  /** What the agent may still spend, counting every ancestor's cap and limit, when the daemon said. */
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
 * The agent's budget refused the payment: its cap or an ancestor's, a period, task or mandate
 * budget, an allow- or deny-list, or its state (revoked, suspended, expired). Never worth retrying
 * unchanged: stop spending.
 */
export class BudgetRefused extends PaymentRefused {
  override name = "BudgetRefused";
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

/**
 * HTTP 202: the payment waits for a person's approval. Its amount is held (nothing else can spend
 * it meanwhile) and nothing was sent. Wait with `agent.waitForApproval(e.approvalId)`, then repeat
 * the same call with `idempotencyKey`: once approved it pays from the held amount, exactly once.
 */
export class ApprovalRequired extends SpendcapError {
  override name = "ApprovalRequired";
  readonly approvalId: string;
  /** `above_amount`, `new_service`, `listed_service` or `listed_protocol`. */
  readonly reason: string;
  readonly amountMicros: bigint | undefined;
  /** The key to repeat the call with. */
  readonly idempotencyKey: string | undefined;

  constructor(status: number, body: ErrorBody, idempotencyKey?: string) {
    super(status, body);
    this.approvalId = typeof body.approval_id === "string" ? body.approval_id : "";
    this.reason = typeof body.reason === "string" ? body.reason : "";
    this.amountMicros = bigintField(body, "amount_micros");
    this.idempotencyKey = typeof body.idempotency_key === "string" ? body.idempotency_key : idempotencyKey;
  }
}

/** A person denied the payment (`approval_denied`) or nobody approved it in time (`approval_expired`): released, nothing paid. */
export class ApprovalRefused extends SpendcapError {
  override name = "ApprovalRefused";
}

/** A provider failed or could not be read (a 502 or 504 that is not an unknown outcome): nothing was spent. */
export class ProviderError extends SpendcapError {
  override name = "ProviderError";
}

/** Any other error of the daemon (5xx, a protocol not configured). */
export class ServerError extends SpendcapError {
  override name = "ServerError";
}

/** The daemon could not be reached (a call that pays throws `OutcomeUnknown` instead: it may have paid). */
export class TransportError extends SpendcapError {
  override name = "TransportError";
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

/** The budget refusals' codes (README, "HTTP API"). */
const BUDGET_CODES = new Set([
  "cap_exceeded",
  "agent_revoked",
  "agent_expired",
  "agent_suspended",
  "protocol_denied",
  "service_denied",
  "per_payment_limit_exceeded",
  "daily_limit_exceeded",
  "weekly_limit_exceeded",
  "monthly_limit_exceeded",
  "all_time_limit_exceeded",
  "task_cap_exceeded",
  "budget_exceeded",
  "budget_busy",
]);

/** Codes with which a provider said no to a payment it was offered. */
const PROVIDER_DECLINED_CODES = new Set([
  "x402_payment_rejected",
  "mpp_payment_rejected",
  "mpp_psp_refused",
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
  if (code === "approval_required") {
    return new ApprovalRequired(status, body, idempotencyKey);
  }
  if (code === "approval_denied" || code === "approval_expired") {
    return new ApprovalRefused(status, body);
  }
  if ((status === 401 || status === 403) && code !== "x402_destination_forbidden") {
    return new AuthError(status, body);
  }
  if (PROVIDER_DECLINED_CODES.has(code)) {
    return new ProviderDeclined(status, body);
  }
  if (status === 402) {
    return BUDGET_CODES.has(code) || "limited_by" in body
      ? new BudgetRefused(status, body)
      : new PaymentRefused(status, body);
  }
  if (status >= 400 && status < 500) {
    return new InvalidRequest(status, body);
  }
  if (status === 502 || status === 504) {
    return new ProviderError(status, body);
  }
  return new ServerError(status, body);
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
