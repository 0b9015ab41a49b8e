//! The routes whose handlers carry no `#[utoipa::path]` of their own: closures, services mounted
//! whole (`/mcp`), routes that take any method, and the protocol endpoints (their handlers live
//! with their flows). Each function here exists only for its annotation; the router never calls
//! it. Their error answers come from `errors.rs` like every other operation's.

#![allow(dead_code)]

/// Redirects to the dashboard.
#[utoipa::path(get, path = "/", tag = "dashboard",
    responses((status = 303, description = "to /dashboard", headers(("location" = String, description = "/dashboard")))))]
fn root() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "public",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object)))]
fn openapi_json() {}

/// Prometheus metrics of this instance, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "admin",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)),
    security(("admin" = [])))]
fn metrics() {}

/// The dashboard: one HTML page that asks for the admin token (or exchanges a login code).
#[utoipa::path(get, path = "/dashboard", tag = "dashboard",
    responses((status = 200, description = "the page", content_type = "text/html", body = String)))]
fn dashboard() {}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct LoginRequest {
    /// The one-time code `serve --dev` printed (`/dashboard#login=<code>`).
    code: String,
}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct LoginAnswer {
    admin_token: String,
}

/// Exchanges a one-time dashboard login code for the admin token, once.
#[utoipa::path(post, path = "/v1/dashboard/login", tag = "dashboard", request_body = LoginRequest,
    responses((status = 200, body = LoginAnswer)))]
fn dashboard_login() {}

/// Server-sent events: every tree's log entries as they are written (`EventSource` cannot send
/// headers, so the admin token may also come as the `token` query parameter).
#[utoipa::path(get, path = "/v1/events", tag = "dashboard",
    params(("token" = Option<String>, Query, description = "the admin token, for clients that cannot send headers")),
    responses((status = 200, description = "`text/event-stream`, one `entry` event per log entry", content_type = "text/event-stream", body = String)),
    security(("admin" = [])))]
fn events() {}

/// The role and allowed actions of the bearer token: the dashboard renders only those actions.
#[utoipa::path(get, path = "/v1/dashboard/session", tag = "dashboard",
    responses((status = 200, body = crate::api::dashboard::Session)), security(("admin" = [])))]
fn dashboard_session() {}

/// The latest log entries of every tree, oldest first (`{"entries": [...]}`): the dashboard's
/// backfill before the live stream.
#[utoipa::path(get, path = "/v1/events/recent", tag = "dashboard",
    params(("limit" = Option<usize>, Query, description = "how many entries (default 100, at most 500)")),
    responses((status = 200, description = "`{\"entries\": [log entry, ...]}`", body = Object)),
    security(("admin" = [])))]
fn events_recent() {}

/// Settled spend per hour or day and per agent, tree or protocol, from the log.
#[utoipa::path(get, path = "/v1/reports/series", tag = "admin",
    params(
        ("by" = Option<crate::series::SeriesBy>, Query, description = "agent (default), tree or protocol"),
        ("bucket" = Option<crate::series::Bucket>, Query, description = "hour (default) or day"),
        ("since_ms" = Option<u64>, Query, description = "start (default: 24 hours or 30 days before until_ms)"),
        ("until_ms" = Option<u64>, Query, description = "end (default: now)"),
    ),
    responses((status = 200, body = crate::series::SpendSeries)), security(("admin" = [])))]
fn reports_series() {}

/// MCP over streamable HTTP (stateless, JSON answers): the tools of `spendcap mcp`, each call
/// made with the agent's own token. Requests are JSON-RPC 2.0 messages and must accept
/// `application/json` and `text/event-stream`.
#[utoipa::path(post, path = "/mcp", tag = "agent",
    request_body(content = Object, description = "a JSON-RPC 2.0 request or notification", content_type = "application/json"),
    responses(
        (status = 200, description = "the JSON-RPC answer", content_type = "application/json", body = Object),
        (status = 202, description = "a notification or response was accepted"),
        (status = 400, description = "not a JSON-RPC message the server takes (the MCP SDK's plain-text answer)"),
        (status = 406, description = "the request does not accept application/json and text/event-stream"),
        (status = 413, description = "the body is over the limit"),
        (status = 415, description = "the body is not application/json")),
    security(("agent" = [])))]
fn mcp() {}

/// Fetches `target` (an absolute `http(s)://` URL appended to the prefix, query included) with
/// the request's method, headers and body, paying an x402 402 within the agent's cap, and answers
/// with the upstream's answer. Errors of the daemon carry `x-spendcap-error: <code>`.
#[utoipa::path(method(get, post, put, delete, patch, head, options, trace), path = "/v1/x402/proxy/{target}", tag = "x402",
    params(("target" = String, Path, description = "the URL to fetch (it may contain `/`)"),
           ("Idempotency-Key" = Option<String>, Header, description = "names the purchase")),
    responses((status = "default", description = "the upstream's answer (any status, headers and body), or the daemon's `{code, detail}`")),
    security(("agent" = [])))]
fn x402_proxy() {}

/// Fetches `target` like `/v1/x402/proxy/{target}`, paying an MPP 402 (`WWW-Authenticate:
/// Payment`) within the agent's cap, and answers with the upstream's answer. Errors of the daemon
/// carry `x-spendcap-error: <code>`.
#[utoipa::path(method(get, post, put, delete, patch, head, options, trace), path = "/v1/mpp/proxy/{target}", tag = "mpp",
    params(("target" = String, Path, description = "the URL to fetch (it may contain `/`)"),
           ("Idempotency-Key" = Option<String>, Header, description = "names the purchase")),
    responses((status = "default", description = "the upstream's answer (any status, headers and body), or the daemon's `{code, detail}`")),
    security(("agent" = [])))]
fn mpp_proxy() {}

/// Calls a configured keyed API (`SPENDCAP_APIS_*`) with the owner's credential: the agent's
/// token goes as `Authorization: Bearer` or `x-api-key`, the call is held at a bound it cannot
/// exceed, forwarded, and settled from the answer's usage. Errors of the daemon carry
/// `x-spendcap-error: <code>`.
#[utoipa::path(method(get, post, put, delete, patch, head, options, trace), path = "/v1/apis/{name}/{path}", tag = "keyed APIs",
    params(("name" = String, Path, description = "the configured API's name"),
           ("path" = String, Path, description = "the upstream path (it may contain `/`)"),
           ("Idempotency-Key" = Option<String>, Header,
            description = "names the call: it is made upstream at most once; a call waiting for approval resumes with it")),
    responses((status = "default", description = "the upstream's answer (any status, headers and body), or the daemon's `{code, detail}`")),
    security(("agent" = [])))]
fn keyed_api() {}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct AcpItem {
    id: String,
    name: Option<String>,
}

/// `POST /v1/acp/checkouts`: pay an existing session, or create one from items and pay it.
#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct AcpCheckoutRequest {
    /// A merchant's name from the ACP configuration.
    merchant: String,
    /// The session to pay; or give `items`.
    checkout_session_id: Option<String>,
    /// Items to create a session with (1 to 100, by the merchant's ids).
    items: Option<Vec<AcpItem>>,
    /// The currency of a session created from items (default `usd`).
    currency: Option<String>,
    /// Buyer contact for a session created from items (ACP's `Buyer`).
    #[schema(value_type = Option<Object>)]
    buyer: Option<()>,
    /// Where a session created from items is delivered (ACP's `FulfillmentDetails`).
    #[schema(value_type = Option<Object>)]
    fulfillment_details: Option<()>,
    /// The agent's task label, for attribution.
    task: Option<String>,
}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct AcpCancelRequest {
    merchant: String,
    /// The hold of a purchase left open (an `acp_outcome_unknown` answer names it).
    hold_id: Option<String>,
}

/// Pays a merchant's ACP checkout session: reads (or creates) it, holds its total, asks the PSP
/// for a delegated payment token capped at that total, completes the session, settles on an order.
#[utoipa::path(post, path = "/v1/acp/checkouts", tag = "ACP", request_body = AcpCheckoutRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key + same body returns the first result")),
    responses((status = 200, description = "the completed order, its hold, amount and receipt", body = Object)),
    security(("agent" = [])))]
fn acp_checkout() {}

/// Cancels a checkout session at its merchant (and voids the hold of a purchase left open once
/// the merchant confirms).
#[utoipa::path(post, path = "/v1/acp/checkouts/{checkout_session_id}/cancel", tag = "ACP", request_body = AcpCancelRequest,
    params(("checkout_session_id" = String, Path, description = "the merchant's session id")),
    responses((status = 200, description = "the canceled session", body = Object)),
    security(("agent" = [])))]
fn acp_cancel() {}

/// The agent's AP2 public key (a P-256 JWK) and its `cnf` form.
#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct Ap2KeyView {
    agent_id: String,
    alg: String,
    #[schema(value_type = Object)]
    jwk: (),
    #[schema(value_type = Object)]
    cnf: (),
    /// RFC 7638 thumbprint of `jwk`.
    thumbprint: String,
}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct Ap2MandatesRequest {
    /// The user-signed open Checkout Mandate (SD-JWT `<jwt>~<disclosures>~`).
    open_checkout_mandate: String,
    /// The user-signed open Payment Mandate.
    open_payment_mandate: String,
}

/// An open mandate and its exclusive budget.
#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct Ap2MandateView {
    mandate_id: String,
    bucket_id: String,
    budget_micros: Option<u64>,
    spent_micros: u64,
    held_micros: u64,
    remaining_micros: Option<u64>,
    outstanding: u64,
    checkout_mandate_id: Option<String>,
    expires_at: Option<i64>,
    #[schema(value_type = Option<Object>)]
    amount_range: Option<()>,
    allowed_payees: Option<Vec<String>>,
    allowed_merchants: Option<Vec<String>>,
}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct Ap2PaymentRequest {
    /// The merchant-signed UCP Checkout JWT, exactly as received.
    checkout_jwt: String,
    /// The user-signed open Checkout Mandate (SD-JWT), exactly as issued.
    open_checkout_mandate: String,
    /// The user-signed open Payment Mandate (SD-JWT), exactly as issued.
    open_payment_mandate: String,
    /// The configured merchant id [default: the checkout's `merchant.id`].
    merchant: Option<String>,
    /// The agent's task label, for attribution.
    task: Option<String>,
    #[schema(value_type = Option<Object>)]
    payment_instrument: Option<()>,
    #[schema(value_type = Option<Object>)]
    pisp: Option<()>,
}

#[derive(utoipa::ToSchema)]
#[allow(unused)]
struct Ap2CartPaymentRequest {
    /// The merchant's CartMandate (a JSON object, with `merchant_authorization`), as received.
    #[schema(value_type = Object)]
    cart_mandate: (),
    /// The configured merchant id [default: the merchant whose `v01_name` is the cart's
    /// `merchant_name`].
    merchant: Option<String>,
    task: Option<String>,
    /// Method-specific details for the PaymentResponse.
    #[schema(value_type = Option<Object>)]
    method_details: Option<()>,
}

#[utoipa::path(get, path = "/v1/ap2/key", tag = "AP2", responses((status = 200, body = Ap2KeyView)), security(("agent" = [])))]
fn ap2_own_key() {}

#[utoipa::path(get, path = "/v1/ap2/agents/{agent}/key", tag = "AP2",
    params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 200, body = Ap2KeyView)), security(("admin" = [])))]
fn ap2_admin_key() {}

/// Registers the agent's open mandates (their budget becomes an exclusive bucket).
#[utoipa::path(post, path = "/v1/ap2/mandates", tag = "AP2", request_body = Ap2MandatesRequest,
    responses((status = 201, body = Ap2MandateView)), security(("agent" = [])))]
fn ap2_register_mandates() {}

#[utoipa::path(post, path = "/v1/ap2/agents/{agent}/mandates", tag = "AP2", request_body = Ap2MandatesRequest,
    params(("agent" = String, Path, description = "agent id or handle")),
    responses((status = 201, body = Ap2MandateView)), security(("admin" = [])))]
fn ap2_admin_register_mandates() {}

#[utoipa::path(get, path = "/v1/ap2/mandates/{mandate_id}", tag = "AP2",
    params(("mandate_id" = String, Path, description = "the open Payment Mandate's id")),
    responses((status = 200, body = Ap2MandateView)), security(("agent" = [])))]
fn ap2_show_mandate() {}

/// Pays a merchant-signed v0.2 checkout under the agent's open mandates.
#[utoipa::path(post, path = "/v1/ap2/payments", tag = "AP2", request_body = Ap2PaymentRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key + same body returns the first result")),
    responses((status = 200, description = "the payment, its hold, amount, mandates and receipt", body = Object)),
    security(("agent" = [])))]
fn ap2_pay() {}

/// Pays a v0.1 CartMandate through the v0.1 processor.
#[utoipa::path(post, path = "/v1/ap2/v0.1/payments", tag = "AP2", request_body = Ap2CartPaymentRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "same key + same body returns the first result")),
    responses((status = 200, description = "the payment, its hold, amount, PaymentMandate and receipt", body = Object)),
    security(("agent" = [])))]
fn ap2_v01_pay() {}
