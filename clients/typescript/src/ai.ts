/**
 * Tools for the Vercel AI SDK (`ai`'s `tool()`, zod input schemas): paid fetch, budget, ACP
 * checkout, AP2 pay and task outcome for one agent. A paying tool's idempotency key is derived
 * from the tool-call id, so a re-executed call never pays twice. A refusal comes back to the model
 * as a short structured result that tells it to stop spending, not as a stack trace.
 *
 * Approvals use the AI SDK's own tool approval: each paying tool's `needsApproval` sends the payment
 * once; when spendcap answers `approval_required` (the money is held, nothing was sent) the SDK
 * ends the step with a `tool-approval-request` (`spendcapApproval(toolCallId)` is the spendcap
 * approval it waits for), otherwise the tool returns what that one call answered. The money
 * decision is spendcap's: `decideApproval(request, approve, { operator })` decides in spendcap and
 * returns the SDK's `tool-approval-response`; the next `generateText` call with it executes the
 * tool again with the same key, which pays from the held reservation exactly once. An SDK approval
 * alone never bypasses spendcap (the call waits up to `approvalWaitSecs` for spendcap's decision,
 * and a denial reaches the model as `approval_denied`).
 *
 *   import { spendcapTools } from "@spendcap/client/ai";
 *   await generateText({ model, tools: spendcapTools(agent, { task: "research-7" }), stopWhen: stepCountIs(8), prompt });
 */

import { createHash } from "node:crypto";

import { type ModelMessage, type ToolApprovalResponse, tool } from "ai";
import { z } from "zod";

import type { Agent, Spendcap } from "./client.js";
import {
  ApprovalRefused,
  ApprovalRequired,
  BudgetRefused,
  OutcomeUnknown,
  PaymentRefused,
  ProviderDeclined,
  SpendcapError,
} from "./errors.js";
import { formatUsd } from "./money.js";
import type { Budget } from "./types.js";

/** Options of `spendcapTools`. */
export interface SpendcapToolsOptions {
  /** The task every payment is attributed to unless the model names one. */
  task?: string;
  /** The longest body `paid_fetch` hands back to the model (characters; default 4,000). */
  maxBodyChars?: number;
  /**
   * A payment that needs a person's approval stops the run with the SDK's tool approval request
   * (default true). False: the tool call itself waits up to `approvalWaitSecs` for spendcap's
   * decision and, once approved, pays in the same call.
   */
  needsApproval?: boolean;
  /** How long an approved (or `needsApproval: false`) call waits for spendcap's decision (seconds; default 30). */
  approvalWaitSecs?: number;
}

/** The spendcap approval a paying tool call waits for (what a person is shown). */
export interface SpendcapApproval {
  approval_id: string;
  amount_usd: string;
  /** `above_amount`, `new_service`, `listed_service` or `listed_protocol`. */
  reason: string;
  expires_at?: string;
  tool: string;
  tool_call_id: string;
}

// The spendcap approval each paying tool call held for approval waits for, by tool-call id (until
// the call executes).
const approvals = new Map<string, SpendcapApproval>();

/**
 * The spendcap approval the tool call `toolCallId` waits for, once its `needsApproval` found the
 * payment held (in this process); undefined for any other call.
 */
export function spendcapApproval(toolCallId: string): SpendcapApproval | undefined {
  return approvals.get(toolCallId);
}

/**
 * Decides a `tool-approval-request` of a spendcap paying tool in spendcap — approve or deny with
 * `operator` (an operator or admin client; approving needs one: the money decision is spendcap's)
 * — and returns the SDK's `tool-approval-response` for the next `generateText` call. A decision
 * spendcap no longer accepts (expired, already decided) leaves spendcap's, which the resumed call
 * reports to the model. Denying releases the held money at once; nothing is paid. Without an
 * operator, `agent` (the paying agent's client) withdraws the waiting payment when denying: a
 * void, which releases the money too (nothing was signed or sent for it, whatever its protocol).
 */
export async function decideApproval(
  request: { approvalId: string; toolCall: { toolCallId: string } },
  approve: boolean,
  options: { operator?: Spendcap; agent?: Agent; note?: string } = {},
): Promise<ToolApprovalResponse> {
  const approval = approvals.get(request.toolCall.toolCallId);
  const note = options.note ?? "";
  if (approval !== undefined) {
    if (approve && options.operator === undefined) {
      throw new TypeError("approving a payment needs an operator or admin client (options.operator)");
    }
    try {
      if (options.operator !== undefined) {
        await options.operator.decideApproval(approval.approval_id, approve, note);
      } else if (!approve && options.agent !== undefined) {
        await options.agent.void(approval.approval_id, "rejected_in_the_run");
      }
    } catch (error) {
      if (!(error instanceof SpendcapError)) throw error;
    }
  }
  return {
    type: "tool-approval-response",
    approvalId: request.approvalId,
    approved: approve,
    ...(note === "" ? {} : { reason: note }),
  };
}

/** What a tool answers when spendcap or the provider said no, or the outcome is unknown. */
export interface ToolRefusal {
  ok: false;
  code: string;
  detail: string;
  /** What to do next, in one sentence the model can follow. */
  instruction: string;
  /**
   * False: the same call will fail the same way (an unknown outcome must not be paid again
   * either); true only for a payment still waiting for approval.
   */
  retryable: boolean;
  requested_usd?: string;
  remaining_usd?: string;
  limited_by?: string;
  provider_reason?: string;
  hold_id?: string;
  approval_id?: string;
  amount_usd?: string;
  reason?: string;
}

const USD = z
  .string()
  .regex(/^\d+(\.\d{1,6})?$/)
  .describe('US dollars as decimal text, e.g. "0.50"');

const FETCH_INPUT = z.object({
  url: z.string().describe("The http or https URL to fetch"),
  method: z.enum(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]).optional().describe("Default GET"),
  headers: z.record(z.string(), z.string()).optional().describe("Request headers to send"),
  body: z.string().optional().describe("Request body as text"),
  max_usd: USD.optional().describe("The most this call may pay, in US dollars"),
  task: z.string().optional().describe("The task this spend belongs to"),
});

const CHECKOUT_INPUT = z.object({
  merchant: z.string().describe("The merchant's name"),
  checkout_session_id: z.string().optional().describe("An existing checkout session to pay"),
  items: z.array(z.string()).min(1).max(100).optional().describe("Item ids to buy (instead of a session)"),
  task: z.string().optional().describe("The task this spend belongs to"),
});

const AP2_INPUT = z.object({
  checkout_jwt: z.string().describe("The merchant-signed checkout JWT"),
  open_checkout_mandate: z.string().describe("The user's open checkout mandate (SD-JWT)"),
  open_payment_mandate: z.string().describe("The user's open payment mandate (SD-JWT)"),
  task: z.string().optional().describe("The task this spend belongs to"),
});

/** The five spendcap tools for `agent`, keyed by the names the model sees. */
export function spendcapTools(agent: Agent, options: SpendcapToolsOptions = {}) {
  const defaultTask = options.task ?? "";
  const maxBodyChars = options.maxBodyChars ?? 4000;
  const withApproval = options.needsApproval ?? true;
  const approvalWaitSecs = options.approvalWaitSecs ?? 30;
  // What a paying call answered in `needsApproval` when no approval was needed, by tool-call id:
  // `execute` returns it instead of sending the call again.
  const answered = new Map<string, { value: unknown } | { error: unknown }>();

  /** Sends `pay` again once spendcap decided, if the payment waits for approval. */
  async function decided<T>(pay: () => Promise<T>): Promise<T> {
    try {
      return await pay();
    } catch (error) {
      if (!(error instanceof ApprovalRequired) || error.approvalId === "" || approvalWaitSecs <= 0)
        throw error;
      const approval = await agent.waitForApproval(error.approvalId, Math.min(60, approvalWaitSecs));
      if (approval.state === "pending") throw error;
      return pay();
    }
  }

  /** A paying tool's `needsApproval` and `execute` around `pay`, which sends the payment once. */
  function paying<I, T>(name: string, pay: (input: I, toolCallId: string) => Promise<T>) {
    return {
      needsApproval: async (
        input: I,
        { toolCallId, messages }: { toolCallId: string; messages: ModelMessage[] },
      ) => {
        // Asked again when the run resumes with the SDK's approval: it still needs one.
        if (!withApproval || approvals.has(toolCallId) || approvalRequested(messages, toolCallId)) {
          return withApproval;
        }
        try {
          answered.set(toolCallId, { value: await pay(input, toolCallId) });
          return false;
        } catch (error) {
          if (error instanceof ApprovalRequired && error.approvalId !== "") {
            approvals.set(toolCallId, approvalView(error, name, toolCallId));
            return true;
          }
          answered.set(toolCallId, { error });
          return false;
        }
      },
      execute: async (input: I, { toolCallId }: { toolCallId: string }): Promise<T | ToolRefusal> => {
        const earlier = answered.get(toolCallId);
        answered.delete(toolCallId);
        approvals.delete(toolCallId);
        if (earlier === undefined) return answer(() => decided(() => pay(input, toolCallId)));
        if ("error" in earlier) return answer(() => Promise.reject(earlier.error));
        return earlier.value as T;
      },
    };
  }

  return {
    get_budget: tool({
      description:
        "Your spending budget in US dollars: cap, spent, held (reserved for payments in progress) and what you can still spend. Read-only.",
      inputSchema: z.object({}),
      execute: async () => answer(async () => budgetView(await agent.me())),
    }),
    paid_fetch: tool({
      description:
        "Fetch a URL over HTTP, paying for it (x402) from your budget when the server asks for payment. Returns the server's status and body and what was paid. Refused when it would pass your budget.",
      inputSchema: FETCH_INPUT,
      ...paying("paid_fetch", async (input: z.infer<typeof FETCH_INPUT>, toolCallId: string) => {
        const fetched = await agent.fetch({
          url: input.url,
          ...(input.method === undefined ? {} : { method: input.method }),
          ...(input.headers === undefined ? {} : { headers: input.headers }),
          ...(input.body === undefined ? {} : { body: input.body }),
          ...(input.max_usd === undefined ? {} : { maxAmount: input.max_usd }),
          task: input.task ?? defaultTask,
          idempotencyKey: idempotencyKey(toolCallId),
        });
        const body = fetched.body ?? (fetched.body_base64 === undefined ? "" : "(binary body)");
        return {
          ok: true as const,
          status: fetched.status,
          body: body.length > maxBodyChars ? `${body.slice(0, maxBodyChars)}… (truncated)` : body,
          paid_usd: formatUsd(fetched.payment?.amount_micros ?? 0n),
          payment_status: fetched.payment?.status ?? "none",
          replayed: fetched.replayed,
        };
      }),
    }),
    acp_checkout: tool({
      description:
        "Buy from a merchant through its ACP checkout, paid with the owner's card from your budget: give the merchant and either a checkout session id or item ids. Refused when it would pass your budget.",
      inputSchema: CHECKOUT_INPUT,
      ...paying("acp_checkout", async (input: z.infer<typeof CHECKOUT_INPUT>, toolCallId: string) => {
        const paid = await agent.acpCheckout({
          merchant: input.merchant,
          ...(input.checkout_session_id === undefined
            ? {}
            : { checkoutSessionId: input.checkout_session_id }),
          ...(input.items === undefined ? {} : { items: input.items }),
          task: input.task ?? defaultTask,
          idempotencyKey: idempotencyKey(toolCallId),
        });
        return {
          ok: true as const,
          status: paid.status,
          order_id: paid.order.id,
          checkout_session_id: paid.checkout_session_id,
          paid_usd: formatUsd(paid.amount_micros),
          replayed: paid.replayed,
        };
      }),
    }),
    ap2_pay: tool({
      description:
        "Pay a merchant's signed AP2 checkout under your user's open mandates, from your budget. Refused when it would pass your budget or the mandate's.",
      inputSchema: AP2_INPUT,
      ...paying("ap2_pay", async (input: z.infer<typeof AP2_INPUT>, toolCallId: string) => {
        const paid = await agent.ap2Pay({
          checkoutJwt: input.checkout_jwt,
          openCheckoutMandate: input.open_checkout_mandate,
          openPaymentMandate: input.open_payment_mandate,
          task: input.task ?? defaultTask,
          idempotencyKey: idempotencyKey(toolCallId),
        });
        return {
          ok: true as const,
          status: paid.status,
          merchant_id: paid.merchant_id,
          order_id: paid.order_id,
          paid_usd: formatUsd(paid.amount_micros),
          replayed: paid.replayed,
        };
      }),
    }),
    record_task_outcome: tool({
      description:
        "Record how a task ended (success, failed or abandoned) so its cost is attributed; call it once when the task is done.",
      inputSchema: z.object({
        task: z.string().optional().describe("The task; default the current one"),
        outcome: z.enum(["success", "failed", "abandoned"]),
        task_type: z.string().describe("What kind of task it was, e.g. research"),
      }),
      execute: async (input) =>
        answer(async () => {
          const recorded = await agent.recordOutcome(
            input.task ?? defaultTask,
            input.outcome,
            input.task_type,
          );
          return { ok: true as const, ...recorded };
        }),
    }),
  };
}

/**
 * The idempotency key of a tool call: the same call (same id) is the same payment. Ids outside
 * the header's alphabet or length are hashed.
 */
export function idempotencyKey(toolCallId: string): string {
  const key = `tool-call:${toolCallId}`;
  return /^[\x21-\x7e]{1,255}$/.test(key)
    ? key
    : `tool-call-sha256:${createHash("sha256").update(toolCallId).digest("hex")}`;
}

function budgetView(budget: Budget) {
  return {
    ok: true as const,
    cap_usd: formatUsd(budget.cap_micros),
    spent_usd: formatUsd(budget.spent_micros),
    held_usd: formatUsd(budget.held_micros),
    remaining_usd: formatUsd(budget.available_micros),
    revoked: budget.revoked,
    suspended: budget.suspended ?? null,
  };
}

/** Whether the conversation already asked for approval of the tool call `toolCallId`. */
function approvalRequested(messages: ModelMessage[], toolCallId: string): boolean {
  return messages.some(
    (message) =>
      message.role === "assistant" &&
      typeof message.content !== "string" &&
      message.content.some((part) => part.type === "tool-approval-request" && part.toolCallId === toolCallId),
  );
}

function approvalView(error: ApprovalRequired, tool: string, toolCallId: string): SpendcapApproval {
  const expiresAt = error.body.expires_at;
  return {
    approval_id: error.approvalId,
    amount_usd: formatUsd(error.amountMicros ?? 0n),
    reason: error.reason,
    ...(typeof expiresAt === "string" ? { expires_at: expiresAt } : {}),
    tool,
    tool_call_id: toolCallId,
  };
}

/** Runs a tool's call; spendcap's errors become a `ToolRefusal` the model reads. */
async function answer<T>(call: () => Promise<T>): Promise<T | ToolRefusal> {
  try {
    return await call();
  } catch (error) {
    if (error instanceof SpendcapError) {
      return refusal(error);
    }
    throw error;
  }
}

/** The short structured result a refusal becomes. */
export function refusal(error: SpendcapError): ToolRefusal {
  const result: ToolRefusal = {
    ok: false,
    code: error.code,
    detail: error.detail,
    instruction: "Do not retry this payment.",
    retryable: false,
  };
  if (error instanceof PaymentRefused) {
    result.instruction =
      error instanceof BudgetRefused
        ? "Stop spending: your budget refused this payment and will refuse it again. Finish with what you have."
        : "Spendcap's payment policy refused this payment; do not retry it unchanged.";
    if (error.requestedMicros !== undefined) result.requested_usd = formatUsd(error.requestedMicros);
    if (error.remainingMicros !== undefined) result.remaining_usd = formatUsd(error.remainingMicros);
    if (error.limitedBy !== undefined) result.limited_by = error.limitedBy;
  } else if (error instanceof ProviderDeclined) {
    result.instruction = "The seller declined this payment; do not retry it unchanged.";
    result.provider_reason = error.reason;
  } else if (error instanceof ApprovalRequired) {
    result.retryable = true;
    result.instruction =
      "This payment waits for a person's approval; its money is held for it and nothing was sent. Tell the user it needs approval (approval_id, reason). Do not pay for it another way meanwhile.";
    result.approval_id = error.approvalId;
    result.reason = error.reason;
    if (error.amountMicros !== undefined) result.amount_usd = formatUsd(error.amountMicros);
  } else if (error instanceof ApprovalRefused) {
    result.instruction =
      "Stop spending: this payment was not approved and nothing was paid. Do not retry it or pay for it another way.";
  } else if (error instanceof OutcomeUnknown) {
    result.instruction =
      "The payment may have gone through: do not pay again; check get_budget, and report it if it matters.";
    if (error.holdId !== undefined) result.hold_id = error.holdId;
  }
  return result;
}
