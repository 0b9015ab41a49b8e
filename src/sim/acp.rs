//! A simulated ACP merchant and its PSP, on two loopback ports.
//!
//! The PSP (`POST /agentic_commerce/delegate_payment`) vaults the card it is given and issues a
//! delegated token bound to the allowance spendcap asks for. The merchant keeps checkout
//! sessions built from its catalog (`POST /checkout_sessions`, `GET /checkout_sessions/{id}`,
//! `…/complete`, `…/cancel`) and, at completion, charges the token at the PSP: the charge is
//! refused unless the token exists, is unused, names this merchant and session, has not
//! expired, and allows at least the session's total in its currency. Both check the bearer key
//! and replay the first answer of a repeated `Idempotency-Key` (except a 5xx, which a retry may
//! redo, as Stripe does).
//!
//! Tests can script faults ([`CompletionFault`], [`AcpShop::fail_reads`]); [`AcpShop::charged_cents`]
//! is what the PSP really charged, to compare with the ledger.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{lock, now_secs, random_id, Server};

pub const PSP_NAME: &str = "stripe";
pub const PSP_KEY: &str = "sk_sim_psp_key";
pub const MERCHANT_KEY: &str = "sk_sim_merchant_key";

/// A merchant's catalog entry: (id, name, unit price in US cents).
pub type Product = (&'static str, &'static str, u64);

/// The merchant and the PSP, running.
pub struct AcpShop {
    merchant: Server,
    psp: Server,
    merchant_name: String,
    state: Arc<ShopState>,
}

struct ShopState {
    merchant_id: String,
    catalog: BTreeMap<String, (String, u64)>,
    sessions: Mutex<HashMap<String, Session>>,
    tokens: Mutex<HashMap<String, Token>>,
    /// (path, Idempotency-Key) → the first answer.
    replays: Mutex<HashMap<(String, String), (StatusCode, Value)>>,
    orders: Mutex<u64>,
    charged_cents: Mutex<u64>,
    /// What the next completions do, in order (then: complete normally).
    faults: Mutex<VecDeque<CompletionFault>>,
    /// How many of the next session reads answer 503.
    failing_reads: Mutex<u32>,
}

/// What the merchant does with one completion, for tests that need a bad day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionFault {
    /// The issuer declines: nothing is charged, 402 `payment_declined`.
    Decline,
    /// Charges and completes, then answers only after the wait: the caller's timeout loses the
    /// answer, and only reading the session back tells it was paid.
    LoseAnswer(Duration),
    /// Waits, then answers 503 without charging: a timeout after which nothing moved.
    Stall(Duration),
    /// Answers 503 at once, without charging.
    Unavailable,
    /// Completes at this many cents less than the session's total (a discount applied at
    /// completion) and charges that.
    Discount(u64),
}

#[derive(Clone)]
struct Session {
    id: String,
    /// (id, name, unit cents, quantity)
    lines: Vec<(String, String, u64, u64)>,
    status: &'static str,
    order_id: Option<String>,
    /// Cents taken off the lines' sum at completion.
    discount: u64,
}

struct Token {
    max_amount: u64,
    currency: String,
    session_id: String,
    merchant_id: String,
    expires_at: i64,
    used: bool,
}

impl Session {
    fn total_cents(&self) -> u64 {
        let sum: u64 = self.lines.iter().map(|(_, _, unit, quantity)| unit * quantity).sum();
        sum.saturating_sub(self.discount)
    }

    fn to_json(&self, merchant_id: &str, base: &str) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|(id, name, unit, quantity)| {
                let amount = unit * quantity;
                json!({ "id": format!("li_{id}"), "item": { "id": id }, "quantity": quantity, "name": name,
                        "unit_amount": unit,
                        "totals": [{ "type": "subtotal", "display_text": "Subtotal", "amount": amount },
                                   { "type": "total", "display_text": "Total", "amount": amount }] })
            })
            .collect();
        let total = self.total_cents();
        let mut session = json!({
            "id": self.id,
            "protocol": { "version": "2026-04-17" },
            "capabilities": {
                "payment": { "handlers": [{
                    "id": "card_tokenized", "name": "dev.acp.tokenized.card", "display_name": "Card",
                    "version": "2026-01-22", "spec": "https://acp.dev/handlers/tokenized.card",
                    "requires_delegate_payment": true, "requires_pci_compliance": false, "psp": PSP_NAME,
                    "config_schema": "https://acp.dev/schemas/handlers/tokenized.card/config.json",
                    "instrument_schemas": ["https://acp.dev/schemas/handlers/tokenized.card/instrument.json"],
                    "config": { "merchant_id": merchant_id, "psp": PSP_NAME, "accepted_brands": ["visa", "mastercard"],
                                "accepted_funding_types": ["credit", "debit"], "supports_3ds": false,
                                "environment": "sandbox" },
                    "display_order": 0 }] },
                "interventions": { "supported": [], "required": [], "enforcement": "conditional" }
            },
            "status": self.status,
            "currency": "usd",
            "line_items": lines,
            "totals": [{ "type": "subtotal", "display_text": "Subtotal", "amount": total },
                       { "type": "total", "display_text": "Total", "amount": total }],
            "messages": [],
            "links": [{ "type": "terms_of_use", "url": format!("{base}/terms") }]
        });
        if let Some(order) = &self.order_id {
            session["order"] = json!({ "id": order, "checkout_session_id": self.id,
                                       "permalink_url": format!("{base}/orders/{order}"), "status": "confirmed" });
        }
        session
    }
}

impl AcpShop {
    /// A merchant called `merchant_name` selling `catalog`, and its PSP.
    pub async fn start(merchant_name: &str, catalog: &[Product]) -> std::io::Result<AcpShop> {
        let state = Arc::new(ShopState {
            merchant_id: format!("acct_sim_{merchant_name}"),
            catalog: catalog.iter().map(|(id, name, cents)| ((*id).to_owned(), ((*name).to_owned(), *cents))).collect(),
            sessions: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            replays: Mutex::new(HashMap::new()),
            orders: Mutex::new(0),
            charged_cents: Mutex::new(0),
            faults: Mutex::new(VecDeque::new()),
            failing_reads: Mutex::new(0),
        });
        let merchant = Router::new()
            .route("/checkout_sessions", post(create_session))
            .route("/checkout_sessions/{id}", get(retrieve_session))
            .route("/checkout_sessions/{id}/complete", post(complete_session))
            .route("/checkout_sessions/{id}/cancel", post(cancel_session))
            .with_state(state.clone());
        let psp = Router::new().route("/agentic_commerce/delegate_payment", post(delegate)).with_state(state.clone());
        Ok(AcpShop {
            merchant: Server::start(merchant).await?,
            psp: Server::start(psp).await?,
            merchant_name: merchant_name.to_owned(),
            state,
        })
    }

    /// The `SPENDCAP_ACP_CONFIG` file for this shop, with a test card.
    pub fn config_json(&self) -> Value {
        json!({
            "psp": { "name": PSP_NAME, "base_url": self.psp.base(), "api_key": PSP_KEY },
            "merchants": [{ "name": self.merchant_name, "base_url": self.merchant.base(), "api_key": MERCHANT_KEY }],
            "card": { "number": "4242424242424242", "exp_month": "12", "exp_year": "2034", "cvc": "123",
                      "funding": "credit", "brand": "visa", "name": "Demo Owner" },
            "billing_address": { "name": "Demo Owner", "line_one": "1 Main Street", "city": "Springfield",
                                 "state": "IL", "country": "US", "postal_code": "62701" }
        })
    }

    /// US cents charged to delegated tokens so far.
    pub fn charged_cents(&self) -> u64 {
        *lock(&self.state.charged_cents)
    }

    /// Scripts what the next completions do, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = CompletionFault>) {
        lock(&self.state.faults).extend(faults);
    }

    /// The next `reads` session reads answer 503.
    pub fn fail_reads(&self, reads: u32) {
        *lock(&self.state.failing_reads) += reads;
    }

    /// Sessions by status (`completed`, `canceled`, ...), for tests.
    pub fn sessions_by_status(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for session in lock(&self.state.sessions).values() {
            *counts.entry(session.status.to_owned()).or_insert(0) += 1;
        }
        counts
    }
}

fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> (StatusCode, Value) {
    (status, json!({ "type": kind, "code": code, "message": message }))
}

fn reply((status, body): (StatusCode, Value)) -> Response {
    (status, Json(body)).into_response()
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let expected = format!("Bearer {key}");
    headers.get("authorization").and_then(|value| value.to_str().ok()) == Some(expected.as_str())
}

/// Runs `answer` once per Idempotency-Key (per path); repeats get the first answer.
fn idempotent(
    state: &ShopState,
    path: String,
    headers: &HeaderMap,
    answer: impl FnOnce() -> (StatusCode, Value),
) -> Response {
    let key = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).map(str::to_owned);
    if let Some(key) = &key {
        if let Some((status, body)) = lock(&state.replays).get(&(path.clone(), key.clone())) {
            return reply((*status, body.clone()));
        }
    }
    let (status, body) = answer();
    if let Some(key) = key.filter(|_| !status.is_server_error()) {
        lock(&state.replays).insert((path, key), (status, body.clone()));
    }
    reply((status, body))
}

fn base_of(headers: &HeaderMap) -> String {
    format!("http://{}", headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost"))
}

async fn create_session(State(state): State<Arc<ShopState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !authorized(&headers, MERCHANT_KEY) {
        return reply(error(StatusCode::UNAUTHORIZED, "invalid_request", "unauthorized", "bad API key"));
    }
    let base = base_of(&headers);
    idempotent(&state, "/checkout_sessions".into(), &headers, || {
        if body["currency"].as_str().unwrap_or("usd") != "usd" {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_currency", "only usd is sold here");
        }
        let mut lines: Vec<(String, String, u64, u64)> = Vec::new();
        for item in body["line_items"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let id = item["id"].as_str().unwrap_or_default();
            let Some((name, cents)) = state.catalog.get(id) else {
                return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_item", "no such item");
            };
            match lines.iter_mut().find(|line| line.0 == id) {
                Some(line) => line.3 += 1,
                None => lines.push((id.to_owned(), name.clone(), *cents, 1)),
            }
        }
        if lines.is_empty() {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "missing", "line_items is empty");
        }
        let session = Session { id: random_id("cs"), lines, status: "ready_for_payment", order_id: None, discount: 0 };
        let answer = session.to_json(&state.merchant_id, &base);
        lock(&state.sessions).insert(session.id.clone(), session);
        (StatusCode::CREATED, answer)
    })
}

async fn retrieve_session(State(state): State<Arc<ShopState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&headers, MERCHANT_KEY) {
        return reply(error(StatusCode::UNAUTHORIZED, "invalid_request", "unauthorized", "bad API key"));
    }
    {
        let mut failing = lock(&state.failing_reads);
        if *failing > 0 {
            *failing -= 1;
            return reply(unavailable());
        }
    }
    match lock(&state.sessions).get(&id) {
        Some(session) => Json(session.to_json(&state.merchant_id, &base_of(&headers))).into_response(),
        None => reply(error(StatusCode::NOT_FOUND, "invalid_request", "not_found", "no such session")),
    }
}

async fn complete_session(
    State(state): State<Arc<ShopState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    if !authorized(&headers, MERCHANT_KEY) {
        return reply(error(StatusCode::UNAUTHORIZED, "invalid_request", "unauthorized", "bad API key"));
    }
    let base = base_of(&headers);
    let path = format!("/checkout_sessions/{id}/complete");
    let key = headers.get("idempotency-key").and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    // A replayed key repeats the first answer and takes no fault of its own.
    let replayed = lock(&state.replays).contains_key(&(path.clone(), key));
    let fault = if replayed { None } else { lock(&state.faults).pop_front() };
    match fault {
        Some(CompletionFault::Unavailable) => return reply(unavailable()),
        Some(CompletionFault::Stall(wait)) => {
            tokio::time::sleep(wait).await;
            return reply(unavailable());
        }
        _ => {}
    }
    let answer = idempotent(&state, path, &headers, || {
        let mut sessions = lock(&state.sessions);
        let Some(session) = sessions.get_mut(&id) else {
            return error(StatusCode::NOT_FOUND, "invalid_request", "not_found", "no such session");
        };
        if session.status != "ready_for_payment" {
            return error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "invalid_state", "session is not payable");
        }
        if body["payment_data"]["handler_id"] != "card_tokenized" {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_handler", "unknown payment handler");
        }
        if fault == Some(CompletionFault::Decline) {
            return error(
                StatusCode::PAYMENT_REQUIRED,
                "processing_error",
                "payment_declined",
                "declined by the issuer",
            );
        }
        if let Some(CompletionFault::Discount(cents)) = fault {
            session.discount = cents.min(session.total_cents().saturating_sub(1));
        }
        let token = body["payment_data"]["instrument"]["credential"]["token"].as_str().unwrap_or_default();
        let total = session.total_cents();
        if let Err(reason) = charge(&state, token, &session.id, total) {
            session.discount = 0;
            return error(StatusCode::PAYMENT_REQUIRED, "processing_error", "payment_declined", reason);
        }
        *lock(&state.charged_cents) += total;
        let order = {
            let mut orders = lock(&state.orders);
            *orders += 1;
            format!("ord_{:05}", *orders)
        };
        session.status = "completed";
        session.order_id = Some(order);
        (StatusCode::OK, session.to_json(&state.merchant_id, &base))
    });
    if let Some(CompletionFault::LoseAnswer(wait)) = fault {
        tokio::time::sleep(wait).await;
    }
    answer
}

fn unavailable() -> (StatusCode, Value) {
    error(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "unavailable", "try again later")
}

/// The PSP's side of a charge: the token's allowance must cover it.
fn charge(state: &ShopState, token: &str, session_id: &str, cents: u64) -> Result<(), &'static str> {
    let mut tokens = lock(&state.tokens);
    let token = tokens.get_mut(token).ok_or("unknown payment token")?;
    if token.used {
        return Err("the token was already used");
    }
    if token.merchant_id != state.merchant_id || token.session_id != session_id {
        return Err("the token is for another merchant or session");
    }
    if token.currency != "usd" || token.max_amount < cents {
        return Err("the token's allowance does not cover the total");
    }
    if token.expires_at <= now_secs() as i64 {
        return Err("the token has expired");
    }
    token.used = true;
    Ok(())
}

async fn cancel_session(State(state): State<Arc<ShopState>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&headers, MERCHANT_KEY) {
        return reply(error(StatusCode::UNAUTHORIZED, "invalid_request", "unauthorized", "bad API key"));
    }
    let base = base_of(&headers);
    idempotent(&state, format!("/checkout_sessions/{id}/cancel"), &headers, || {
        let mut sessions = lock(&state.sessions);
        let Some(session) = sessions.get_mut(&id) else {
            return error(StatusCode::NOT_FOUND, "invalid_request", "not_found", "no such session");
        };
        if session.status == "completed" {
            return error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", "invalid_state", "already completed");
        }
        session.status = "canceled";
        (StatusCode::OK, session.to_json(&state.merchant_id, &base))
    })
}

async fn delegate(State(state): State<Arc<ShopState>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if !authorized(&headers, PSP_KEY) {
        return reply(error(StatusCode::UNAUTHORIZED, "invalid_request", "unauthorized", "bad API key"));
    }
    idempotent(&state, "/agentic_commerce/delegate_payment".into(), &headers, || {
        let card = &body["payment_method"];
        if card["type"] != "card" || card["number"].as_str().is_none_or(|n| n.len() < 12) {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_card", "not a card");
        }
        let allowance = &body["allowance"];
        let expires_at = allowance["expires_at"].as_str().and_then(adapters::ap2::parse_datetime);
        let (Some(max_amount), Some(currency), Some(session_id), Some(merchant_id), Some(expires_at)) = (
            allowance["max_amount"].as_u64(),
            allowance["currency"].as_str(),
            allowance["checkout_session_id"].as_str(),
            allowance["merchant_id"].as_str(),
            expires_at,
        ) else {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_allowance", "incomplete allowance");
        };
        if allowance["reason"] != "one_time" {
            return error(StatusCode::BAD_REQUEST, "invalid_request", "invalid_allowance", "only one_time");
        }
        let id = random_id("vt");
        let token = Token {
            max_amount,
            currency: currency.to_owned(),
            session_id: session_id.to_owned(),
            merchant_id: merchant_id.to_owned(),
            expires_at,
            used: false,
        };
        lock(&state.tokens).insert(id.clone(), token);
        let created = adapters::acp::rfc3339_utc(now_secs() * 1000).unwrap_or_default();
        (StatusCode::CREATED, json!({ "id": id, "created": created, "metadata": {} }))
    })
}
