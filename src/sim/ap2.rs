//! Simulated AP2 v0.2 parties, each with its own ES256 key generated at start:
//!
//! - the **user's credential issuer**, which signs open Checkout and Payment Mandates (SD-JWT)
//!   bound to an agent's public key, with a `payment.budget` the agent may spend across
//!   checkouts ([`Ap2World::issue_mandates`]);
//! - a **merchant** that sells a catalog: `POST /checkouts` (this simulation's own way for an
//!   agent to ask for a cart) answers a merchant-signed UCP checkout JWT, and
//!   `POST /ap2/v0.2/checkouts/{id}/complete` verifies the presented Checkout Mandate chain
//!   (user signature, agent key binding, audience, the checkout it closes), redeems the payment
//!   token once at the Credential Provider, and answers a signed Checkout Receipt and a Payment
//!   Receipt signed by its payment processor;
//! - a **Credential Provider** (`POST /ap2/v0.2/payment-credentials`) that verifies the Payment
//!   Mandate chain and issues a one-time payment token for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use adapters::ap2::types::{CheckoutReceipt, PaymentReceipt, ReceiptStatus};
use adapters::ap2::{checkout_hash, sha256_b64url, verify_mandate_chain, AgentKey, Disclosure, Jwk};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{lock, now_secs, random_id, Server};

pub const CP_AUDIENCE: &str = "cp.sim";
const INSTRUMENT: &str = "card_4242";

/// A merchant's catalog entry: (sku, title, unit price in US cents).
pub type Sku = (&'static str, &'static str, i64);

/// What the user allows an agent: the merchant, the items it may buy, and the money.
pub struct MandateTerms<'a> {
    /// The skus any checkout may contain (one of each at most).
    pub items: &'a [&'a str],
    /// `payment.budget`: the most spent across every payment of these mandates, in US cents.
    pub budget_cents: i64,
    /// `payment.amount_range`: the most one payment may be, in US cents.
    pub max_payment_cents: i64,
    /// How long the mandates are valid, in seconds.
    pub valid_secs: i64,
}

/// A pair of open mandates as the user issued them, to present with every payment.
pub struct OpenMandates {
    pub checkout: String,
    pub payment: String,
}

/// The issuer, the merchant and the Credential Provider.
pub struct Ap2World {
    merchant: Server,
    credential_provider: Server,
    /// The user's side over HTTP (`POST /mandates`), for agents outside this process.
    user: Server,
    issuer: Arc<AgentKey>,
    state: Arc<WorldState>,
}

struct WorldState {
    merchant_id: String,
    merchant_key: AgentKey,
    processor_key: AgentKey,
    receipt_key: AgentKey,
    trusted_issuers: Vec<Jwk>,
    catalog: BTreeMap<String, (String, i64)>,
    /// checkout id → (checkout_hash of the JWT handed out, total cents, completed)
    checkouts: Mutex<HashMap<String, (String, i64, bool)>>,
    /// payment token → (payment reference, redeemed)
    tokens: Mutex<HashMap<String, (String, bool)>>,
    paid_cents: Mutex<i64>,
}

fn merchant_json(id: &str) -> Value {
    json!({ "id": id, "name": format!("Simulated {id}"), "website": format!("https://{}.example", id.replace('_', "-")) })
}

impl Ap2World {
    /// A merchant `merchant_id` selling `catalog`, its processor, and a Credential Provider.
    pub async fn start(merchant_id: &str, catalog: &[Sku]) -> std::io::Result<Ap2World> {
        let issuer = Arc::new(AgentKey::generate());
        let state = Arc::new(WorldState {
            merchant_id: merchant_id.to_owned(),
            merchant_key: AgentKey::generate(),
            processor_key: AgentKey::generate(),
            receipt_key: AgentKey::generate(),
            trusted_issuers: vec![issuer.public_jwk().clone()],
            catalog: catalog
                .iter()
                .map(|(sku, title, cents)| ((*sku).to_owned(), ((*title).to_owned(), *cents)))
                .collect(),
            checkouts: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            paid_cents: Mutex::new(0),
        });
        let merchant = Router::new()
            .route("/checkouts", post(create_checkout))
            .route("/ap2/v0.2/checkouts/{id}/complete", post(complete_checkout))
            .with_state(state.clone());
        let credential_provider =
            Router::new().route("/ap2/v0.2/payment-credentials", post(issue_credential)).with_state(state.clone());
        let user = Router::new()
            .route("/mandates", post(user_issues_mandates))
            .with_state(UserSide { issuer: issuer.clone(), state: state.clone() });
        Ok(Ap2World {
            merchant: Server::start(merchant).await?,
            credential_provider: Server::start(credential_provider).await?,
            user: Server::start(user).await?,
            issuer,
            state,
        })
    }

    /// The user's base URL: `POST /mandates` `{"jwk": <the agent's AP2 public key>, "items":
    /// ["sku", ...], "budget_cents": …, "max_payment_cents": …, "valid_secs": …}` answers
    /// `{"open_checkout_mandate": …, "open_payment_mandate": …}` as [`Ap2World::issue_mandates`].
    pub fn user_base(&self) -> &str {
        self.user.base()
    }

    /// The merchant's base URL (its `POST /checkouts` hands out carts).
    pub fn merchant_base(&self) -> &str {
        self.merchant.base()
    }

    /// The `SPENDCAP_AP2_CONFIG` file for this world.
    pub fn config_json(&self) -> Value {
        json!({
            "trusted_issuers": [self.issuer.public_jwk()],
            "credential_provider": { "base_url": self.credential_provider.base(), "audience": CP_AUDIENCE,
                                     "receipt_keys": [self.state.receipt_key.public_jwk()] },
            "processor_keys": [self.state.processor_key.public_jwk()],
            "merchants": [{ "id": self.state.merchant_id, "base_url": self.merchant.base(),
                            "keys": [self.state.merchant_key.public_jwk()] }],
        })
    }

    /// US cents the merchant was paid (both receipts `Success`).
    pub fn paid_cents(&self) -> i64 {
        *lock(&self.state.paid_cents)
    }

    /// The user signs open mandates for the agent whose public key is `agent`.
    pub fn issue_mandates(&self, agent: &Jwk, terms: &MandateTerms<'_>) -> Result<OpenMandates, String> {
        issue_mandates(&self.issuer, &self.state, agent, terms)
    }
}

/// The state of the user's HTTP side.
#[derive(Clone)]
struct UserSide {
    issuer: Arc<AgentKey>,
    state: Arc<WorldState>,
}

/// `POST /mandates` on the user's side (see [`Ap2World::user_base`]).
async fn user_issues_mandates(State(user): State<UserSide>, Json(body): Json<Value>) -> Response {
    let Ok(jwk) = serde_json::from_value::<Jwk>(body["jwk"].clone()) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "jwk must be the agent's AP2 public key");
    };
    let items: Vec<&str> =
        body["items"].as_array().map(Vec::as_slice).unwrap_or_default().iter().filter_map(Value::as_str).collect();
    let number = |name: &str, default: i64| body.get(name).map_or(Some(default), Value::as_i64);
    let (Some(budget_cents), Some(max_payment_cents), Some(valid_secs)) =
        (number("budget_cents", 500), number("max_payment_cents", 100), number("valid_secs", 3600))
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "budget_cents, max_payment_cents and valid_secs are integers",
        );
    };
    if items.is_empty() || budget_cents < 1 || max_payment_cents < 1 || !(1..=86_400).contains(&valid_secs) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "items must not be empty; amounts and valid_secs must be positive",
        );
    }
    let terms = MandateTerms { items: &items, budget_cents, max_payment_cents, valid_secs };
    match issue_mandates(&user.issuer, &user.state, &jwk, &terms) {
        Ok(mandates) => {
            Json(json!({ "open_checkout_mandate": mandates.checkout, "open_payment_mandate": mandates.payment }))
                .into_response()
        }
        Err(detail) => refuse(StatusCode::BAD_REQUEST, "invalid_request", &detail),
    }
}

/// The user (`issuer`) signs open mandates for the agent whose public key is `agent`.
fn issue_mandates(
    issuer: &AgentKey,
    world: &WorldState,
    agent: &Jwk,
    terms: &MandateTerms<'_>,
) -> Result<OpenMandates, String> {
    let now = now_secs() as i64;
    let cnf = json!({ "jwk": { "kty": agent.kty, "crv": agent.crv, "x": agent.x, "y": agent.y } });
    let mut nested = Vec::new();
    let mut disclose = |value: Value| -> Result<Value, String> {
        let disclosure = Disclosure::element(&value).map_err(|e| e.to_string())?;
        let digest = json!({ "...": disclosure.digest() });
        nested.push(disclosure.encoded().to_owned());
        Ok(digest)
    };
    let mut lines = Vec::new();
    for sku in terms.items {
        let (title, _) = world.catalog.get(*sku).ok_or_else(|| format!("{sku} is not sold here"))?;
        let item = disclose(json!({ "id": sku, "title": title }))?;
        lines.push(json!({ "id": format!("line_{sku}"), "acceptable_items": [item], "quantity": 1 }));
    }
    let merchant = disclose(merchant_json(&world.merchant_id))?;
    let content = json!({ "vct": "mandate.checkout.open.1", "cnf": cnf, "iat": now, "exp": now + terms.valid_secs,
        "constraints": [{ "type": "checkout.line_items", "items": lines },
                        { "type": "checkout.allowed_merchants", "allowed": [merchant] }] });
    let checkout = open_mandate(issuer, content, nested, now)?;

    // Dollars as a JSON number: the shortest form of a whole number of cents is exact.
    let budget = terms.budget_cents as f64 / 100.0;
    let mut nested = Vec::new();
    let payee = Disclosure::element(&merchant_json(&world.merchant_id)).map_err(|e| e.to_string())?;
    nested.push(payee.encoded().to_owned());
    let content = json!({ "vct": "mandate.payment.open.1", "cnf": cnf, "iat": now, "exp": now + terms.valid_secs,
        "constraints": [
            { "type": "payment.amount_range", "currency": "USD", "min": 1, "max": terms.max_payment_cents },
            { "type": "payment.budget", "max": budget, "currency": "USD" },
            { "type": "payment.allowed_payees", "allowed": [{ "...": payee.digest() }] },
            { "type": "payment.allowed_payment_instruments",
              "allowed": [{ "id": INSTRUMENT, "type": "card", "description": "Visa ending 4242" }] },
            { "type": "payment.reference", "conditional_transaction_id": sha256_b64url(checkout.as_bytes()) }] });
    let payment = open_mandate(issuer, content, nested, now)?;
    Ok(OpenMandates { checkout, payment })
}

/// `<issuer JWT>~<nested disclosures>~<content disclosure>~`.
fn open_mandate(issuer: &AgentKey, content: Value, nested: Vec<String>, now: i64) -> Result<String, String> {
    let disclosure = Disclosure::element(&content).map_err(|e| e.to_string())?;
    let payload = json!({ "iss": "https://issuer.sim", "iat": now, "_sd_alg": "sha-256",
                          "delegate_payload": [{ "...": disclosure.digest() }] });
    let jwt = issuer.sign_jws(Some("dc+sd-jwt"), None, &payload.to_string()).map_err(|e| e.to_string())?;
    let mut parts = vec![jwt];
    parts.extend(nested);
    parts.push(disclosure.encoded().to_owned());
    Ok(format!("{}~", parts.join("~")))
}

fn refuse(status: StatusCode, code: &str, detail: &str) -> Response {
    (status, Json(json!({ "error": code, "error_description": detail }))).into_response()
}

/// `POST /checkouts` `{ "items": ["sku", ...] }` → a merchant-signed checkout JWT.
async fn create_checkout(State(state): State<Arc<WorldState>>, Json(body): Json<Value>) -> Response {
    let now = now_secs() as i64;
    let mut lines = Vec::new();
    let mut total = 0i64;
    for (n, sku) in body["items"].as_array().map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
        let sku = sku.as_str().unwrap_or_default();
        let Some((title, price)) = state.catalog.get(sku) else {
            return refuse(StatusCode::BAD_REQUEST, "invalid_item", "no such item");
        };
        total += price;
        lines.push(json!({ "id": format!("line_{n}"), "item": { "id": sku, "title": title, "price": price },
                           "quantity": 1, "totals": [{ "type": "subtotal", "amount": price }] }));
    }
    if lines.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "items is empty");
    }
    let id = random_id("chk");
    let claims = json!({ "id": id, "merchant": merchant_json(&state.merchant_id), "line_items": lines,
                         "status": "ready_for_complete", "currency": "USD",
                         "totals": [{ "type": "subtotal", "amount": total }, { "type": "total", "amount": total }],
                         "links": [], "iss": "https://merchant.sim", "iat": now, "exp": now + 900 });
    let jwt = match state.merchant_key.sign_jws(Some("JWT"), None, &claims.to_string()) {
        Ok(jwt) => jwt,
        Err(_) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "signing failed"),
    };
    lock(&state.checkouts).insert(id.clone(), (checkout_hash(&jwt), total, false));
    Json(json!({ "checkout_id": id, "checkout_jwt": jwt, "total_cents": total })).into_response()
}

async fn issue_credential(State(state): State<Arc<WorldState>>, Json(body): Json<Value>) -> Response {
    let chain = body["payment_mandate"].as_str().unwrap_or_default();
    let verified = match verify_mandate_chain(chain, &state.trusted_issuers, Some(CP_AUDIENCE), None, now_secs() as i64)
    {
        Ok(verified) => verified,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_mandate", &e.to_string()),
    };
    let token = random_id("tok");
    lock(&state.tokens).insert(token.clone(), (verified.closed.jwt_hash(), false));
    Json(json!({ "payment_token": token })).into_response()
}

async fn complete_checkout(
    State(state): State<Arc<WorldState>>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Response {
    let now = now_secs() as i64;
    let chain = body["checkout_mandate"].as_str().unwrap_or_default();
    let verified = match verify_mandate_chain(chain, &state.trusted_issuers, Some(&state.merchant_id), None, now) {
        Ok(verified) => verified,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_mandate", &e.to_string()),
    };
    let closed: Value = serde_json::from_str(&verified.closed_content_json).unwrap_or_default();
    let mut checkouts = lock(&state.checkouts);
    let Some((hash, total, completed)) = checkouts.get_mut(&id) else {
        return refuse(StatusCode::NOT_FOUND, "not_found", "no such checkout");
    };
    if closed["checkout_hash"].as_str() != Some(hash.as_str()) {
        return refuse(StatusCode::BAD_REQUEST, "invalid_mandate", "the mandate closes another checkout");
    }
    if *completed {
        return refuse(StatusCode::CONFLICT, "already_completed", "the checkout was completed");
    }
    let payment_reference = {
        let mut tokens = lock(&state.tokens);
        match tokens.get_mut(body["payment_token"].as_str().unwrap_or_default()) {
            Some((reference, redeemed)) if !*redeemed => {
                *redeemed = true;
                reference.clone()
            }
            _ => return refuse(StatusCode::BAD_REQUEST, "invalid_token", "unknown or used payment token"),
        }
    };
    *completed = true;
    *lock(&state.paid_cents) += *total;
    let order = random_id("order");
    let checkout_receipt = CheckoutReceipt {
        status: ReceiptStatus::Success,
        iss: state.merchant_id.clone(),
        iat: now,
        reference: verified.closed.jwt_hash(),
        error: None,
        error_description: None,
        order_id: Some(order.clone()),
    };
    let payment_receipt = PaymentReceipt {
        status: ReceiptStatus::Success,
        iss: "processor.sim".into(),
        iat: now,
        reference: payment_reference,
        error: None,
        error_description: None,
        payment_id: random_id("pay"),
        psp_confirmation_id: Some(random_id("psp")),
        network_confirmation_id: Some(random_id("net")),
    };
    let sign = |key: &AgentKey, receipt: Value| key.sign_jws(Some("JWT"), None, &receipt.to_string());
    let (Ok(checkout_jwt), Ok(payment_jwt)) =
        (sign(&state.merchant_key, json!(checkout_receipt)), sign(&state.processor_key, json!(payment_receipt)))
    else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "signing failed");
    };
    Json(json!({ "checkout_receipt": checkout_jwt, "payment_receipt": payment_jwt })).into_response()
}
