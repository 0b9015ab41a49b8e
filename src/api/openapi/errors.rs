//! Every operation's error answers, in one table: the `{code, detail}` body with, per status, the
//! codes that operation can answer (an `enum` on `code`). Answers every operation of a kind shares
//! are added from what the document already says about it: its security scheme (401, 403), a JSON
//! request body (400, 413, 415, 422), the ledger (503) and `internal` (500).
//!
//! The protocol endpoints' codes come from their providers' answers and from the adapters' parsers
//! (dozens of `x402_*`, `acp_*`, `ap2_*`, `api_*` codes): their `code` is documented as an open
//! string whose description names the families, not as an enum.

use serde_json::{json, Map, Value};

/// Codes that are open strings (the protocol endpoints); `description` names them.
pub const OPEN: &[&str] = &["*"];

const AMOUNT: &[&str] =
    &["amount_negative", "amount_zero", "amount_fractional", "amount_too_large", "amount_malformed"];
const CONTROLS: &[&str] = &[
    "invalid_controls",
    "invalid_limit",
    "unknown_period",
    "inverted_limits",
    "invalid_window",
    "invalid_breaker",
    "invalid_list",
    "unknown_protocol",
    "invalid_threshold",
    "invalid_task",
    "invalid_approval",
];
/// A budget refusal (402), from the hold or the precheck before anything is sent.
pub const REFUSALS: &[&str] = &[
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
];
/// The calling agent (or an ancestor) cannot manage anything now (403; nothing changed).
const CALLER_NOT_LIVE: &[&str] = &["agent_revoked", "agent_suspended", "agent_expired"];
const HOLD_ENDED: &[&str] = &["hold_settled", "hold_expired", "hold_voided", "hold_protocol_mismatch"];

/// One operation's own error answers: (method, path, [(status, codes)]). A status may appear
/// more than once; its codes are merged.
type Entry = (&'static str, &'static str, &'static [(u16, &'static [&'static str])]);

#[rustfmt::skip]
pub const TABLE: &[Entry] = &[
    ("get", "/", &[]),
    ("get", "/healthz", &[(503, &["clock_skew"])]),
    ("get", "/openapi.json", &[]),
    ("get", "/metrics", &[]),
    ("get", "/dashboard", &[]),
    ("post", "/v1/dashboard/login", &[(401, &["invalid_login_code"])]),
    ("get", "/v1/events", &[]),
    ("get", "/v1/dashboard/session", &[]),
    ("get", "/v1/events/recent", &[(400, &["invalid_query"])]),
    ("get", "/v1/reports/series", &[(400, &["invalid_query"]), (422, &["invalid_range", "range_too_long"])]),
    ("post", "/mcp", &[]),
    // Agents (admin).
    ("post", "/v1/agents", &[
        (400, &["invalid_argument"]),
        (409, &["handle_taken", "agent_exists"]),
        (422, &["invalid_handle", "invalid_expiry", "invalid_labels", "invalid_task", "invalid_label", "unknown_parent", "tree_too_deep"]),
        (422, AMOUNT), (422, CONTROLS)]),
    ("get", "/v1/agents", &[]),
    ("get", "/v1/agents/{agent}", &[(404, &["unknown_agent"])]),
    ("put", "/v1/agents/{agent}/cap", &[(400, &["invalid_argument"]), (404, &["unknown_agent"]), (409, &["cap_below_committed"]), (422, AMOUNT)]),
    ("post", "/v1/agents/{agent}/revoke", &[(404, &["unknown_agent"]), (422, &["invalid_reason"])]),
    ("post", "/v1/agents/{agent}/archive", &[(404, &["unknown_agent"])]),
    ("post", "/v1/agents/{agent}/rotate-token", &[(404, &["unknown_agent"])]),
    ("put", "/v1/agents/{agent}/controls", &[(400, &["invalid_argument"]), (404, &["unknown_agent"]), (409, &["changed_meanwhile"]), (422, CONTROLS)]),
    ("get", "/v1/agents/{agent}/controls", &[(404, &["unknown_agent"])]),
    ("put", "/v1/agents/{agent}/expiry", &[(400, &["invalid_argument"]), (404, &["unknown_agent"]), (422, &["invalid_expiry"])]),
    ("post", "/v1/agents/{agent}/reinstate", &[(404, &["unknown_agent"])]),
    ("get", "/v1/agents/{agent}/periods", &[(400, &["invalid_query"]), (404, &["unknown_agent"])]),
    // The generic budget authority (agent) and outcome-unknown holds.
    ("get", "/v1/me", &[]),
    ("get", "/v1/me/budget", &[(400, &["invalid_query"]), (422, &["invalid_label"])]),
    ("post", "/v1/holds", &[
        (202, &["approval_required"]), (403, &["approval_denied", "approval_expired"]), (409, &["hold_voided"]),
        (400, &["invalid_idempotency_key", "invalid_argument"]),
        (402, REFUSALS),
        (409, &["idempotency_in_flight"]),
        (422, &["invalid_label", "invalid_ttl", "invalid_details", "idempotency_conflict"]), (422, AMOUNT),
        (503, &["clock_skew"])]),
    ("get", "/v1/holds", &[(400, &["invalid_state", "invalid_query"]), (403, &["agent_scope"]), (404, &["unknown_agent"])]),
    ("post", "/v1/holds/{hold}/settle", &[
        (400, &["invalid_argument"]), (404, &["unknown_hold"]), (409, HOLD_ENDED),
        (422, &["amount_exceeds_hold", "invalid_details"]), (422, AMOUNT)]),
    ("post", "/v1/holds/{hold}/void", &[(400, &["invalid_argument"]), (404, &["unknown_hold"]), (409, HOLD_ENDED), (422, &["invalid_label"])]),
    ("post", "/v1/holds/{hold}/resolve", &[
        (400, &["invalid_argument"]), (404, &["unknown_hold"]), (409, &["hold_not_unknown"]), (409, HOLD_ENDED),
        (422, &["invalid_reason", "amount_required", "amount_exceeds_hold", "invalid_receipt"]), (422, AMOUNT)]),
    // Log, spend, receipts, reports.
    ("get", "/v1/log", &[(400, &["invalid_query"]), (404, &["unknown_agent"])]),
    ("get", "/v1/spend", &[(400, &["invalid_query"]), (404, &["unknown_agent"])]),
    ("get", "/v1/receipts", &[(400, &["invalid_query"]), (404, &["unknown_agent"])]),
    ("get", "/v1/receipt-key", &[]),
    ("post", "/v1/tasks/{task}/outcome", &[
        (400, &["invalid_argument"]), (403, &["not_own_task", "agent_revoked"]), (404, &["unknown_agent"]),
        (422, &["invalid_label", "agent_required"])]),
    ("get", "/v1/reports", &[(400, &["invalid_query"]), (404, &["unknown_agent"])]),
    // Orchestrators: sub-agents and task tokens (agent and admin).
    ("post", "/v1/me/agents", &[
        (400, &["invalid_argument"]),
        (403, &["sub_agent_exceeds_parent", "too_many_sub_agents", "task_token_not_allowed"]), (403, CALLER_NOT_LIVE),
        (409, &["handle_taken", "agent_exists"]),
        (422, &["invalid_handle", "invalid_expiry", "invalid_labels", "invalid_task", "invalid_label", "tree_too_deep"]),
        (422, AMOUNT), (422, CONTROLS)]),
    ("get", "/v1/me/agents", &[(403, &["task_token_not_allowed"])]),
    ("post", "/v1/me/agents/{agent}/revoke", &[
        (400, &["invalid_argument"]), (403, &["task_token_not_allowed"]), (403, CALLER_NOT_LIVE),
        (404, &["unknown_agent"]), (422, &["invalid_reason"])]),
    ("post", "/v1/me/tokens", &[
        (400, &["invalid_argument"]), (403, &["task_token_not_allowed"]), (403, CALLER_NOT_LIVE),
        (404, &["unknown_agent"]), (409, &["token_exists"]), (422, &["invalid_label", "invalid_task", "invalid_ttl"])]),
    ("get", "/v1/me/tokens", &[(403, &["task_token_not_allowed"])]),
    ("delete", "/v1/me/tokens/{token}", &[(403, &["task_token_not_allowed"]), (403, CALLER_NOT_LIVE), (404, &["unknown_token"])]),
    ("post", "/v1/agents/{agent}/tokens", &[
        (400, &["invalid_argument"]), (403, CALLER_NOT_LIVE), (404, &["unknown_agent"]), (409, &["token_exists"]),
        (422, &["invalid_body", "invalid_label", "invalid_task", "invalid_ttl"])]),
    ("get", "/v1/agents/{agent}/tokens", &[(404, &["unknown_agent"])]),
    ("delete", "/v1/agents/{agent}/tokens/{token}", &[(404, &["unknown_agent", "unknown_token"])]),
    // Approval holds (admin decides; an agent reads its own).
    ("get", "/v1/approvals", &[(400, &["invalid_state", "invalid_query"])]),
    ("get", "/v1/approvals/{id}", &[(400, &["invalid_query"]), (404, &["approval_not_found"])]),
    ("get", "/v1/me/approvals", &[(400, &["invalid_state", "invalid_query"])]),
    ("get", "/v1/me/approvals/{id}", &[(400, &["invalid_query"]), (404, &["approval_not_found"])]),
    ("post", "/v1/approvals/{id}/approve", &[
        (400, &["invalid_argument"]), (404, &["approval_not_found"]), (409, &["approval_expired", "approval_decided"]),
        (422, &["invalid_note"])]),
    ("post", "/v1/approvals/{id}/deny", &[
        (400, &["invalid_argument"]), (404, &["approval_not_found"]), (409, &["approval_expired", "approval_decided"]),
        (422, &["invalid_note"])]),
    // Operator tokens (roles).
    ("post", "/v1/operators", &[(404, &["unknown_agent"]), (409, &["operator_exists"]), (422, &["invalid_name"])]),
    ("get", "/v1/operators", &[]),
    ("post", "/v1/operators/{name}/revoke", &[(404, &["unknown_operator"])]),
    ("get", "/v1/whoami", &[]),
    // Protocol endpoints: open codes (see the module's comment).
    ("post", "/v1/x402/fetch", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    ("post", "/v1/acp/checkouts", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    ("post", "/v1/acp/checkouts/{checkout_session_id}/cancel", &[(400, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    ("get", "/v1/ap2/key", &[(403, &["agent_revoked"]), (503, &["ap2_not_configured"])]),
    ("get", "/v1/ap2/agents/{agent}/key", &[(403, &["agent_revoked"]), (404, &["unknown_agent"]), (503, &["ap2_not_configured"])]),
    ("post", "/v1/ap2/mandates", &[(400, OPEN), (403, OPEN), (409, OPEN), (422, OPEN), (503, OPEN)]),
    ("post", "/v1/ap2/agents/{agent}/mandates", &[(400, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (503, OPEN)]),
    ("get", "/v1/ap2/mandates/{mandate_id}", &[(404, &["ap2_unknown_mandate"]), (503, &["ap2_not_configured"])]),
    ("post", "/v1/ap2/payments", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    ("post", "/v1/ap2/v0.1/payments", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    ("post", "/v1/mpp/fetch", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
    // Paid MCP tools: the upstreams' tools, and one call of one (paid with x402: open codes).
    ("get", "/v1/mcp/tools", &[(403, &["agent_revoked", "x402_destination_forbidden"]), (502, &["mcp_upstream_unreachable"]), (503, &["mcp_not_configured"]), (504, &["mcp_upstream_timeout"])]),
    ("post", "/v1/mcp/call", &[(202, OPEN), (400, OPEN), (402, OPEN), (403, OPEN), (404, OPEN), (409, OPEN), (422, OPEN), (502, OPEN), (503, OPEN), (504, OPEN)]),
];

/// Operations that never reach the ledger: no 503 ledger answers.
const NO_LEDGER: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/openapi.json"),
    ("get", "/dashboard"),
    ("get", "/v1/receipt-key"),
    ("post", "/v1/dashboard/login"),
    ("get", "/metrics"),
];

/// Operations whose every answer is the upstream's or the daemon's (`default` response): they get
/// no table entry.
const PASS_THROUGH: &[&str] = &["/v1/x402/proxy/{target}", "/v1/apis/{name}/{path}", "/v1/mpp/proxy/{target}"];

pub const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The error answers of `method path`: the table's and those its kind shares.
fn answers(method: &str, path: &str, operation: &Value) -> Option<Vec<(u16, Vec<&'static str>)>> {
    let (_, _, own) = TABLE.iter().find(|(m, p, _)| *m == method && *p == path)?;
    let mut statuses: Vec<(u16, Vec<&'static str>)> = Vec::new();
    let mut add = |status: u16, codes: &[&'static str]| match statuses.iter_mut().find(|(s, _)| *s == status) {
        Some((_, known)) => known.extend(codes.iter().filter(|c| !known.contains(c)).collect::<Vec<_>>()),
        None => statuses.push((status, codes.to_vec())),
    };
    for (status, codes) in own.iter() {
        add(*status, codes);
    }
    let schemes: Vec<&str> = operation["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|requirement| requirement.keys().map(String::as_str))
        .collect();
    if !schemes.is_empty() {
        add(401, &["invalid_token"]);
    }
    if schemes == ["admin"] {
        add(403, &["admin_only"]);
    }
    // A task-scoped agent token works wherever the agent's own does, until it expires or is revoked.
    if schemes.contains(&"agent") {
        add(401, &["token_expired", "token_revoked"]);
    }
    // An operator token whose role does not allow the route (`api/operators.rs`, ROUTES).
    if schemes.contains(&"admin") {
        add(403, &["role_forbidden"]);
    }
    // `/mcp`'s body is read by the MCP SDK, which answers bad bodies itself (`routes.rs`).
    if operation["requestBody"]["content"]["application/json"].is_object() && path != "/mcp" {
        add(400, &["malformed_json", "invalid_body"]);
        add(413, &["body_too_large"]);
        add(415, &["unsupported_media_type"]);
        add(422, &["invalid_body", "duplicate_key"]);
    }
    if !NO_LEDGER.contains(&(method, path)) {
        add(503, &["ledger_unavailable", "ledger_outcome_unknown"]);
    }
    if path != "/" {
        add(500, &["internal"]);
    }
    statuses.sort_by_key(|(status, _)| *status);
    Some(statuses)
}

/// The `{code, detail}` body every error shares.
pub fn error_schema() -> Value {
    json!({
        "type": "object",
        "description": "An error: a stable snake_case `code` and a human-readable `detail`. Some errors add fields \
                        (a budget refusal its amounts, `ledger_outcome_unknown` the `idempotency_key` to retry with).",
        "required": ["code", "detail"],
        "properties": {
            "code": { "type": "string" },
            "detail": { "type": "string" }
        }
    })
}

fn describe(status: u16, codes: &[&str]) -> String {
    let reason = axum::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("error");
    if codes.contains(&"*") {
        return format!(
            "{reason}: `{{code, detail}}`; the code names the cause (budget refusals as for `POST /v1/holds`, \
             this protocol's `<protocol>_*` codes, the ledger's and the request's codes)"
        );
    }
    let listed: Vec<String> = codes.iter().map(|code| format!("`{code}`")).collect();
    format!("{reason}: {}", listed.join(", "))
}

fn response(status: u16, codes: &[&str]) -> Value {
    let open = codes.contains(&"*");
    let base = if status == 402 && !open {
        json!({ "$ref": "#/components/schemas/RefusalView" })
    } else {
        json!({ "$ref": "#/components/schemas/ErrorBody" })
    };
    let schema = if open {
        base
    } else {
        json!({ "allOf": [base, { "type": "object", "properties": { "code": { "type": "string", "enum": codes } } }] })
    };
    json!({
        "description": describe(status, codes),
        "content": { "application/json": { "schema": schema } }
    })
}

/// Adds every operation's error answers to `doc` (an OpenAPI document as JSON). An answer the
/// annotations already give for a status is replaced (they say the same in prose).
pub fn add(doc: &mut Value) {
    if let Some(schemas) = doc.pointer_mut("/components/schemas").and_then(Value::as_object_mut) {
        schemas.insert("ErrorBody".into(), error_schema());
    }
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        if PASS_THROUGH.contains(&path.as_str()) {
            continue;
        }
        for method in METHODS {
            let Some(operation) = item.get_mut(method) else { continue };
            let Some(statuses) = answers(method, path, operation) else { continue };
            let responses =
                operation.as_object_mut().map(|op| op.entry("responses").or_insert_with(|| Value::Object(Map::new())));
            let Some(Value::Object(responses)) = responses else { continue };
            for (status, codes) in statuses {
                responses.insert(status.to_string(), response(status, &codes));
            }
        }
    }
}
