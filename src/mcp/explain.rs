//! What a code means to an agent, and whether anything can be done about it: the table behind
//! the `explain_refusal` tool and the `what_to_do` of every error result.

use serde::Serialize;

use crate::ledger::RefusalReason;

/// One code, explained for a model.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    pub code: &'static str,
    /// True for the ledger's budget refusals: the payment would pass a limit someone set.
    pub budget_refusal: bool,
    pub meaning: &'static str,
    pub what_to_do: &'static str,
    /// Whether calling again, with the same `idempotency_key`, can succeed. A retry with the same
    /// key never pays twice.
    pub retryable: bool,
}

const fn refusal(code: &'static str, meaning: &'static str, what_to_do: &'static str) -> Explanation {
    Explanation { code, budget_refusal: true, meaning, what_to_do, retryable: false }
}

const fn other(code: &'static str, meaning: &'static str, what_to_do: &'static str, retryable: bool) -> Explanation {
    Explanation { code, budget_refusal: false, meaning, what_to_do, retryable }
}

const STOP: &str = "Stop spending: nothing you can change in this call makes it pass. Finish with what you have, \
                    or tell the person who runs you that the budget is spent (a person can raise the cap).";

/// Every budget refusal first (in [`RefusalReason::ALL`] order), then the other codes an agent
/// meets most.
const EXPLANATIONS: &[Explanation] = &[
    refusal("cap_exceeded", "This payment would take your spending (or a parent budget's, see limited_by) over its cap. Nothing was paid.", STOP),
    refusal("agent_revoked", "Your payment identity was revoked by its operator. Nothing was paid and nothing more will be.", "Stop: no payment will go through again. Finish without paying, and report that you were revoked."),
    refusal("agent_expired", "Your payment identity has passed its expiry time. Nothing was paid.", "Stop spending; a person can extend the expiry."),
    refusal("budget_exceeded", "An extra budget this payment is charged against (an AP2 mandate's budget) has too little left. Nothing was paid.", "Do not retry this payment; ask the user for a new mandate if the purchase is still wanted."),
    refusal("budget_busy", "The mandate's budget already has a payment in progress; it allows one at a time. Nothing was paid.", "Wait for the other payment to finish, then try again once; do not loop."),
    refusal("agent_suspended", "Your runaway-loop breaker tripped (too many payments, too fast or identical), and you are suspended. Nothing was paid.", "Stop: you were repeating payments. A person must reinstate you; check your logic before continuing."),
    refusal("protocol_denied", "Your controls do not allow paying with this protocol. Nothing was paid.", "Do not retry; use another way that your controls allow, or go without."),
    refusal("service_denied", "Your controls do not allow paying this service or payee. Nothing was paid.", "Do not retry; this payee is off limits for you."),
    refusal("per_payment_limit_exceeded", "This single payment is above your per-payment limit. Nothing was paid.", "Do not retry it; only a cheaper purchase can pass."),
    refusal("daily_limit_exceeded", "This payment would pass your daily limit. Nothing was paid.", "Stop spending until the next day (UTC), or ask a person to raise the limit."),
    refusal("weekly_limit_exceeded", "This payment would pass your weekly limit. Nothing was paid.", "Stop spending until next week (UTC, from Monday), or ask a person to raise the limit."),
    refusal("monthly_limit_exceeded", "This payment would pass your monthly limit. Nothing was paid.", "Stop spending until next month (UTC), or ask a person to raise the limit."),
    refusal("all_time_limit_exceeded", "This payment would pass your all-time limit. Nothing was paid.", STOP),
    refusal("task_cap_exceeded", "This payment would take this task's spending over its per-task cap. Nothing was paid.", "Finish this task with what you have; a new task has its own allowance."),
    other("invalid_token", "The agent token is missing, malformed, unknown or was rotated.", "Stop: you cannot pay. Ask a person for a valid agent token.", false),
    other("token_expired", "This task token's lifetime is over (tokens for one task are short-lived). Nothing was paid.", "Stop: ask whoever gave you the token (your orchestrator or a person) for a new one if the task is still wanted.", false),
    other("token_revoked", "This task token was revoked, by its agent's orchestrator or an operator. Nothing was paid.", "Stop: you cannot pay with it again; report that the token was revoked.", false),
    other("sub_agent_exceeds_parent", "The sub-agent you asked for would have more budget or looser controls than you have left (see bound). Nothing was created.", "Ask for a smaller cap or tighter controls, within what you have left.", false),
    other("ledger_unavailable", "spendcap's ledger did not answer; it refused rather than risk passing a cap. Nothing was paid.", "Retry later with the same idempotency_key.", true),
    other("daemon_unreachable", "The spendcap daemon could not be reached, or its answer was lost: the payment may or may not have happened.", "Retry with the same idempotency_key: it never pays twice, and it tells you what happened.", true),
    other("idempotency_in_flight", "A call with this idempotency_key is still running.", "Wait a moment, then call again with the same idempotency_key to get its result.", true),
    other("idempotency_conflict", "This idempotency_key was already used for a different request.", "Use a new idempotency_key for a new purchase; reuse a key only to retry the very same call.", false),
    other("x402_payment_outcome_unknown", "The payment was sent but its outcome is unknown: the money stays held against your budget until it is resolved.", "Retry with the same idempotency_key: it re-sends the same authorization and can never pay twice.", true),
    other("x402_payment_rejected", "The server refused the signed payment. The authorization stays held until it expires unless the server settles it.", "Do not retry in a loop; try another resource or report the failure.", false),
    other("x402_over_payment_maximum", "The price is above the most you allowed for this call (max_usd) or the daemon's per-payment maximum. Nothing was paid.", "Only retry with a higher max_usd if the price is worth it.", false),
    other("mcp_upstream_unknown", "No upstream MCP server of that name is configured on the daemon.", "Call the tools as listed (tools/list); do not guess upstream names.", false),
    other("mcp_upstream_unreachable", "The upstream MCP server did not answer. Nothing was paid.", "Try again later.", true),
    other("mcp_upstream_timeout", "The upstream MCP server did not answer in time. Nothing was paid.", "Try again later.", true),
    other("mcp_not_configured", "The daemon fronts no upstream MCP server.", "Use spendcap's own tools.", false),
    other("x402_destination_forbidden", "The URL's host is not a public address the daemon may fetch. Nothing was sent.", "Use a public URL.", false),
    other("x402_not_configured", "This daemon has no x402 payment key.", "x402 payments are not available here; do not retry.", false),
    other("mpp_payment_outcome_unknown", "The MPP credential was sent but its outcome is unknown: the money stays held against your budget until it is resolved.", "Retry with the same idempotency_key: it re-sends the same credential and can never pay twice.", true),
    other("mpp_payment_rejected", "The server refused the MPP credential. Its token stays held until it expires unless the server charges it.", "Do not retry in a loop; try another resource or report the failure.", false),
    other("mpp_over_payment_maximum", "The price is above the most you allowed for this call (max_usd) or the daemon's per-payment maximum for MPP. Nothing was paid.", "Only retry with a higher max_usd if the price is worth it.", false),
    other("mpp_no_acceptable_challenge", "The server offers no MPP payment method, intent or currency this daemon may pay (it pays stripe charges in USD). Nothing was paid.", "Do not retry; use another resource.", false),
    other("mpp_destination_forbidden", "The URL's host is not a public address the daemon may fetch. Nothing was sent.", "Use a public URL.", false),
    other("mpp_not_configured", "This daemon has no MPP configuration.", "MPP payments are not available here; do not retry.", false),
    other("acp_outcome_unknown", "The checkout's outcome is unknown: the money stays held until it is resolved.", "Retry with the same idempotency_key to resume the same purchase; it never pays twice.", true),
    other("acp_not_configured", "This daemon has no ACP configuration.", "ACP checkouts are not available here; do not retry.", false),
    other("acp_unknown_merchant", "No merchant of that name is configured.", "Use a configured merchant name.", false),
    other("acp_total_changed", "The checkout's total changed while it was being paid.", "Read the new total and decide again; a new call is a new purchase.", false),
    other("ap2_outcome_unknown", "The AP2 payment's outcome is unknown: the money stays held until it is resolved.", "Retry with the same idempotency_key; it never pays twice.", true),
    other("ap2_not_configured", "This daemon has no AP2 configuration.", "AP2 payments are not available here; do not retry.", false),
    other("approval_required", "This payment needs a person's approval. Its amount is held for you (nobody else can spend it meanwhile) and nothing was sent yet.", "Tell the user the payment waits for approval (approval_id, reason). Once approved, call again with the same idempotency_key: it pays from the held amount, exactly once. Do not pay another way meanwhile.", true),
    other("approval_denied", "A person denied this payment; its held amount was released. Nothing was paid.", "Do not retry it; go without, or ask the user what to do (see note).", false),
    other("approval_expired", "Nobody approved this payment in time; its held amount was released. Nothing was paid.", "Only if it is still needed, make it again with a new idempotency_key and ask the user to approve it.", false),
    other("approval_not_found", "No such approval (or it is not yours).", "Check the approval_id from the approval_required answer.", false),
    other("amount_malformed", "max_usd is not a decimal number of dollars like \"0.25\".", "Send max_usd as a decimal string.", false),
];

/// The explanation of a code, if it is one spendcap documents for agents.
pub fn explain(code: &str) -> Option<&'static Explanation> {
    EXPLANATIONS.iter().find(|explanation| explanation.code == code)
}

/// Whether a code is one of the ledger's budget refusals.
pub(crate) fn is_budget_refusal(code: &str) -> bool {
    RefusalReason::from_code(code).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_budget_refusal_is_explained_as_final() {
        for reason in RefusalReason::ALL {
            let explanation = explain(reason.code()).unwrap_or_else(|| panic!("{} has no explanation", reason.code()));
            assert!(explanation.budget_refusal && !explanation.retryable, "{explanation:?}");
        }
        let budget: Vec<_> = EXPLANATIONS.iter().filter(|e| e.budget_refusal).map(|e| e.code).collect();
        assert_eq!(budget.len(), RefusalReason::ALL.len(), "only ledger refusals are budget refusals: {budget:?}");
        let mut codes: Vec<_> = EXPLANATIONS.iter().map(|e| e.code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), EXPLANATIONS.len(), "one entry per code");
    }
}
