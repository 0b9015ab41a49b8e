//! A simulated x402 v2 resource server with its facilitator built in: each priced path answers
//! 402 with a `PAYMENT-REQUIRED` header (USDC on Base Sepolia), and serves the resource once a
//! `PAYMENT-SIGNATURE` carries an EIP-3009 authorization that pays exactly the price to its
//! address, inside its validity window, signed by the `from` address (recovered from the EIP-712
//! signature), with a nonce never seen before. A payment that fails any check is answered with a
//! 402 naming the reason, as a facilitator's verify step would.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use adapters::x402::{
    encode_header, parse_address, parse_payment_header, recover_signer, Address, PaymentPayload, PaymentRequirementsV2,
    ResourceInfo, SettlementResponse, TokenDomain, PAYMENT_REQUIRED, PAYMENT_RESPONSE,
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

/// A running resource server.
pub struct X402Resource {
    server: Server,
    state: Arc<ResourceState>,
}

struct ResourceState {
    /// Path → price in USDC atomic units (6 decimals: one unit is one micro-USD).
    prices: BTreeMap<String, u64>,
    pay_to: Address,
    domain: TokenDomain,
    seen_nonces: Mutex<HashSet<String>>,
    paid: Mutex<u64>,
}

impl X402Resource {
    /// Serves `prices` (path such as `/search`, price in micro-USD) on a loopback port.
    pub async fn start(prices: &[(&str, u64)]) -> std::io::Result<X402Resource> {
        let pay_to = parse_address("payTo", PAY_TO).map_err(std::io::Error::other)?;
        let verifying_contract = parse_address("asset", USDC).map_err(std::io::Error::other)?;
        let state = Arc::new(ResourceState {
            prices: prices.iter().map(|(path, price)| ((*path).to_owned(), *price)).collect(),
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

fn payment_required(url: &str, price: u64, error: &str) -> Response {
    let required = adapters::x402::PaymentRequiredV2 {
        x402_version: adapters::x402::Version,
        error: Some(error.to_owned()),
        resource: Some(ResourceInfo {
            url: url.to_owned(),
            description: Some("simulated paid resource".into()),
            mime_type: Some("application/json".into()),
            other: Map::new(),
        }),
        accepts: vec![requirement(price)],
        extensions: None,
    };
    match encode_header(&required) {
        Ok(header) => (StatusCode::PAYMENT_REQUIRED, [(PAYMENT_REQUIRED, header)], Json(json!({}))).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn resource(State(state): State<Arc<ResourceState>>, uri: OriginalUri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
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
    let nonce = &payment.exact().authorization.nonce;
    let settlement = SettlementResponse {
        success: true,
        error_reason: None,
        error_message: None,
        payer: Some(payer),
        transaction: format!("0x{}", hex::encode(Sha256::digest(nonce.as_bytes()))),
        network: NETWORK.into(),
        amount: Some(price.to_string()),
    };
    let body = json!({ "resource": path, "paid_micros": price, "data": format!("the contents of {path}") });
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
