/**
 * `@spendcap/client`: give an AI agent its own payment identity with a hard spending cap.
 * `Spendcap` (admin token) creates, caps and revokes agents and runs the run pattern; `Agent`
 * (agent token) pays x402, ACP and AP2 and holds for anything else; `wrapFetch` makes any `fetch`
 * pay through the daemon. Tools for the Vercel AI SDK are in `@spendcap/client/ai`.
 */

export {
  type AcpCheckoutOptions,
  Agent,
  type AgentOptions,
  type Ap2PayOptions,
  type CreateAgentOptions,
  type CreatedAgent,
  type CreatedOperator,
  type CreateSubAgentOptions,
  type FetchOptions,
  type HoldOptions,
  type LogFilter,
  type OperatorRole,
  type OperatorView,
  type RunOptions,
  Spendcap,
  type SpendcapOptions,
  type TaskToken,
  type TaskTokenOptions,
  type Used,
  type WhoAmI,
} from "./client.js";
export {
  ApprovalRefused,
  ApprovalRequired,
  AuthError,
  BudgetRefused,
  type ErrorBody,
  InvalidRequest,
  LedgerUnavailable,
  OutcomeUnknown,
  PaymentRefused,
  ProviderDeclined,
  ProviderError,
  ServerError,
  SpendcapError,
  TransportError,
} from "./errors.js";
export { type WrapFetchOptions, wrapFetch } from "./fetch.js";
export type { ConnectionOptions, FetchLike } from "./http.js";
export { type Amount, formatUsd, toMicros, usd } from "./money.js";
export { canonicalJson, GENESIS_HASH, ReceiptInvalid, verifyReceipts } from "./receipts.js";
export type * from "./types.js";
