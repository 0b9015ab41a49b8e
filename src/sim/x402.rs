//! A simulated x402 v2 resource server with its facilitator built in: each priced path answers
//! 402 with a `PAYMENT-REQUIRED` header (USDC on Base Sepolia), and serves the resource once a
//! `PAYMENT-SIGNATURE` carries an EIP-3009 authorization that pays exactly the price to its
//! address, inside its validity window, signed by the `from` address (recovered from the EIP-712
//! signature), with a nonce never seen before. A payment that fails any check is answered with a
//! 402 naming the reason, as a facilitator's verify step would.
//!
//! Paths started with [`X402Resource::start_with_upto`] are metered instead (`upto` scheme): the
//! 402 asks for a maximum, the payment must be a Permit2 witness authorization of that maximum
//! to the upto proxy for this payee and this facilitator ([`FACILITATOR`]), and the server
//! settles what the request used: `?used=<micro-USD>` (capped at the maximum), half the maximum
//! when the request does not say. The settlement report's `amount` is what was charged.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use adapters::x402::{
    encode_header, parse_address, parse_payment_header, recover_signer, recover_upto_signer, Address, PaymentPayload,
    PaymentRequirementsV2, ResourceInfo, SettlementResponse, TokenDomain, PAYMENT_REQUIRED, PAYMENT_RESPONSE,
    UPTO_PERMIT2_PROXY_ADDRESS,
};
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map};
use sha2::{Digest, Sha256};

use super::{lock, now_secs, Server};

/// Base Sepolia (CAIP-2) and its USDC contract, as the x402 specs' examples use.
pub const NETWORK: &str = "eip155:84532";
const CHAIN_ID: u64 = 84_532;
pub const USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
/// Where the simulated seller is paid.
pub const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
/// The facilitator the simulated server names for `upto` permits (only it may settle them).
pub const FACILITATOR: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

/// A running resource server.
pub struct X402Resource {
    server: Server,
    state: Arc<ResourceState>,
}

struct ResourceState {
    /// Path → price in USDC atomic units (6 decimals: one unit is one micro-USD).
    prices: BTreeMap<String, u64>,
    /// Path → the maximum of a metered (`upto`) resource, in micro-USD.
    upto: BTreeMap<String, u64>,
    pay_to: Address,
    domain: TokenDomain,
    seen_nonces: Mutex<HashSet<String>>,
    paid: Mutex<u64>,
}

impl X402Resource {
    /// Serves `prices` (path such as `/search`, price in micro-USD) on a loopback port.
    pub async fn start(prices: &[(&str, u64)]) -> std::io::Result<X402Resource> {
        X402Resource::start_with_upto(prices, &[]).await
    }

    /// Serves `prices` as [`X402Resource::start`] does, and the metered paths `upto` (path, the
    /// maximum in micro-USD) in the `upto` scheme.
    pub async fn start_with_upto(prices: &[(&str, u64)], upto: &[(&str, u64)]) -> std::io::Result<X402Resource> {
        let pay_to = parse_address("payTo", PAY_TO).map_err(std::io::Error::other)?;
        let verifying_contract = parse_address("asset", USDC).map_err(std::io::Error::other)?;
        let state = Arc::new(ResourceState {
            prices: prices.iter().map(|(path, price)| ((*path).to_owned(), *price)).collect(),
            upto: upto.iter().map(|(path, maximum)| ((*path).to_owned(), *maximum)).collect(),
            pay_to,
            domain: TokenDomain { name: "USDC".into(), version: "2".into(), chain_id: CHAIN_ID, verifying_contract },
            seen_nonces: Mutex::new(HashSet::new()),
            paid: Mutex::new(0),
        });
        let app = axum::Router::new().fallback(resource).with_state(state.clone());
        Ok(X402Resource { server: Server::start(app).await?, state })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        self.server.base()
    }

    /// Micro-USD received in payments that passed every check.
    pub fn received_micros(&self) -> u64 {
        *lock(&self.state.paid)
    }
}

fn requirement(price: u64) -> PaymentRequirementsV2 {
    let mut extra = Map::new();
    extra.insert("name".into(), json!("USDC"));
    extra.insert("version".into(), json!("2"));
    PaymentRequirementsV2 {
        scheme: "exact".into(),
        network: NETWORK.into(),
        amount: price.to_string(),
        asset: USDC.into(),
        pay_to: PAY_TO.into(),
        max_timeout_seconds: 60,
        extra: Some(extra),
        other: Map::new(),
    }
}

fn upto_requirement(maximum: u64) -> PaymentRequirementsV2 {
    let mut requirement = requirement(maximum);
    requirement.scheme = "upto".into();
    if let Some(extra) = requirement.extra.as_mut() {
        extra.insert("facilitatorAddress".into(), json!(FACILITATOR));
    }
    requirement
}

fn payment_required(url: &str, price: u64, error: &str) -> Response {
    payment_required_for(url, requirement(price), error)
}

fn payment_required_for(url: &str, requirement: PaymentRequirementsV2, error: &str) -> Response {
    let required = adapters::x402::PaymentRequiredV2 {
        x402_version: adapters::x402::Version,
        error: Some(error.to_owned()),
        resource: Some(ResourceInfo {
            url: url.to_owned(),
            description: Some("simulated paid resource".into()),
            mime_type: Some("application/json".into()),
            other: Map::new(),
        }),
        accepts: vec![requirement],
        extensions: None,
    };
    match encode_header(&required) {
        Ok(header) => (StatusCode::PAYMENT_REQUIRED, [(PAYMENT_REQUIRED, header)], Json(json!({}))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn resource(State(state): State<Arc<ResourceState>>, uri: OriginalUri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    if let Some(&maximum) = state.upto.get(&path) {
        return metered(&state, &uri, &headers, maximum);
    }
    let Some(&price) = state.prices.get(&path) else {
        return (StatusCode::NOT_FOUND, Json(json!({ "error": "no such resource" }))).into_response();
    };
    let url = format!("http://{}{}", headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost"), path);
    if headers.get(adapters::x402::PAYMENT_SIGNATURE).is_none() {
        return payment_required(&url, price, "Payment required");
    }
    let payment = match parse_payment_header(&headers) {
        Ok(payment) => payment,
        Err(_) => return payment_required(&url, price, "invalid_payload"),
    };
    let payer = match verify(&state, &payment, price) {
        Ok(payer) => payer,
        Err(reason) => return payment_required(&url, price, reason),
    };
    *lock(&state.paid) += price;
    let nonce = payment.exact().map(|exact| exact.authorization.nonce.clone()).unwrap_or_default();
    paid(&path, &nonce, payer, price)
}

/// The paid answer: the resource, and the settlement report of `charged` micro-USD.
fn paid(path: &str, nonce: &str, payer: String, charged: u64) -> Response {
    let settlement = SettlementResponse {
        success: true,
        error_reason: None,
        error_message: None,
        payer: Some(payer),
        transaction: format!("0x{}", hex::encode(Sha256::digest(nonce.as_bytes()))),
        network: NETWORK.into(),
        amount: Some(charged.to_string()),
    };
    let body = json!({ "resource": path, "paid_micros": charged, "data": format!("the contents of {path}") });
    match encode_header(&settlement) {
        Ok(header) => (StatusCode::OK, [(PAYMENT_RESPONSE, header)], Json(body)).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The facilitator's verify step; the payer's address on success, else an x402 error reason.
fn verify(state: &ResourceState, payment: &PaymentPayload, price: u64) -> Result<String, &'static str> {
    let PaymentPayload::V2(payment) = payment else {
        return Err("invalid_x402_version");
    };
    if payment.accepted != requirement(price) {
        return Err("invalid_payment_requirements");
    }
    let authorization = &payment.payload.authorization;
    let to = parse_address("to", &authorization.to).map_err(|_| "invalid_payload")?;
    if to != state.pay_to {
        return Err("invalid_exact_evm_payload_recipient_mismatch");
    }
    if authorization.value != price.to_string() {
        return Err("invalid_exact_evm_payload_authorization_value");
    }
    let now = now_secs();
    let valid_after: u64 = authorization.valid_after.parse().map_err(|_| "invalid_payload")?;
    let valid_before: u64 = authorization.valid_before.parse().map_err(|_| "invalid_payload")?;
    if valid_after > now {
        return Err("invalid_exact_evm_payload_authorization_valid_after");
    }
    // Facilitators want a few seconds left to get the transfer mined (x402's reference
    // facilitator asks for 6).
    if valid_before <= now + 6 {
        return Err("invalid_exact_evm_payload_authorization_valid_before");
    }
    let from = parse_address("from", &authorization.from).map_err(|_| "invalid_payload")?;
    let signer = recover_signer(&payment.payload, &state.domain).map_err(|_| "invalid_exact_evm_payload_signature")?;
    if signer != from {
        return Err("invalid_exact_evm_payload_signature");
    }
    if !lock(&state.seen_nonces).insert(authorization.nonce.clone()) {
        return Err("invalid_exact_evm_payload_nonce_used");
    }
    Ok(authorization.from.clone())
}

/// A metered resource: 402 for the maximum, then the permit checked and what was used charged.
fn metered(state: &ResourceState, uri: &OriginalUri, headers: &HeaderMap, maximum: u64) -> Response {
    let path = uri.path().to_owned();
    let url = format!("http://{}{}", headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost"), path);
    if headers.get(adapters::x402::PAYMENT_SIGNATURE).is_none() {
        return payment_required_for(&url, upto_requirement(maximum), "Payment required");
    }
    let verified = parse_payment_header(headers)
        .map_err(|_| "invalid_payload")
        .and_then(|payment| verify_upto(state, &payment, maximum).map(|payer| (payer, payment)));
    let (payer, payment) = match verified {
        Ok(verified) => verified,
        Err(reason) => return payment_required_for(&url, upto_requirement(maximum), reason),
    };
    let used = uri
        .query()
        .and_then(|query| query.split('&').find_map(|pair| pair.strip_prefix("used=")))
        .and_then(|used| used.parse::<u64>().ok())
        .unwrap_or(maximum / 2)
        .min(maximum);
    *lock(&state.paid) += used;
    let nonce = payment.upto().map(|upto| upto.permit2_authorization.nonce.clone()).unwrap_or_default();
    paid(&path, &nonce, payer, used)
}

/// The upto facilitator's verify step (as x402's `verify_upto_permit2`, without a chain).
fn verify_upto(state: &ResourceState, payment: &PaymentPayload, maximum: u64) -> Result<String, &'static str> {
    let PaymentPayload::UptoV2(payment) = payment else {
        return Err("invalid_upto_evm_scheme");
    };
    if payment.accepted != upto_requirement(maximum) {
        return Err("invalid_payment_requirements");
    }
    let authorization = &payment.payload.permit2_authorization;
    let address = |field, text: &str| parse_address(field, text).map_err(|_| "invalid_permit2_payload_format");
    if address("spender", &authorization.spender)? != UPTO_PERMIT2_PROXY_ADDRESS {
        return Err("invalid_permit2_spender");
    }
    if address("to", &authorization.witness.to)? != state.pay_to {
        return Err("invalid_permit2_recipient_mismatch");
    }
    if address("facilitator", &authorization.witness.facilitator)? != address("facilitator", FACILITATOR)? {
        return Err("invalid_upto_evm_facilitator_mismatch");
    }
    if address("token", &authorization.permitted.token)? != state.domain.verifying_contract {
        return Err("invalid_permit2_token_mismatch");
    }
    if authorization.permitted.amount != maximum.to_string() {
        return Err("invalid_permit2_amount_mismatch");
    }
    let now = now_secs();
    let deadline: u64 = authorization.deadline.parse().map_err(|_| "invalid_permit2_payload_format")?;
    let valid_after: u64 = authorization.witness.valid_after.parse().map_err(|_| "invalid_permit2_payload_format")?;
    if deadline < now + 6 {
        return Err("invalid_permit2_deadline_expired");
    }
    if valid_after > now {
        return Err("invalid_permit2_not_yet_valid");
    }
    let signer = recover_upto_signer(&payment.payload, CHAIN_ID).map_err(|_| "invalid_permit2_signature")?;
    if signer != address("from", &authorization.from)? {
        return Err("invalid_permit2_signature");
    }
    if !lock(&state.seen_nonces).insert(format!("permit2:{}", authorization.nonce)) {
        return Err("invalid_permit2_nonce_used");
    }
    Ok(authorization.from.clone())
}
