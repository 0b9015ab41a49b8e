//! AP2 through the daemon: a v0.2 human-not-present purchase end to end, a mandate's budget held
//! across merchants and daemon instances, refusals that leave the ledger untouched, receipts that
//! end a payment, and the v0.1 CartMandate → PaymentMandate round trip.
//!
//! Everything the providers see is produced here independently of spendcap's AP2 code: the user's
//! open mandates, the merchants' checkouts and carts, and the receipts are signed with the fixture
//! keys (`fixtures/ap2/keys`) by the test's own ES256 code (`p256`), and the closed mandates the
//! wiremock providers receive are verified with raw `p256` and recomputed hashes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::{RandomizedSigner, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use spendcap::protocols::ap2::{Ap2Args, Ap2Config, Ap2File, Ap2Service, Kek};
use spendcap::protocols::ProtocolConfig;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::{spawn_app_with, wait_for, Agent, AppOptions, TestApp};

pub(crate) const USD: u64 = 1_000_000;
const CP_AUDIENCE: &str = "cp.test";

// ---- the test's own JOSE / SD-JWT code ----

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256_b64(text: &str) -> String {
    b64(&Sha256::digest(text.as_bytes()))
}

fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).expect("base64url")
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/ap2/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

/// A fixture key: the signing key and the public JWK (with its `kid`).
struct TestKey {
    signing: SigningKey,
    public: Value,
}

impl TestKey {
    fn load(name: &str) -> TestKey {
        let private: Value = serde_json::from_str(&fixture(&format!("keys/{name}.private.jwk.json"))).expect("jwk");
        let d = unb64(private["d"].as_str().expect("d"));
        let signing = SigningKey::from_slice(&d).expect("P-256 scalar");
        let public: Value = serde_json::from_str(&fixture(&format!("keys/{name}.public.jwk.json"))).expect("jwk");
        TestKey { signing, public }
    }

    fn kid(&self) -> Option<&str> {
        self.public["kid"].as_str()
    }

    /// A compact ES256 JWS over `payload_text`.
    fn sign(&self, typ: &str, payload_text: &str) -> String {
        let mut header = json!({ "alg": "ES256", "typ": typ });
        if let Some(kid) = self.kid() {
            header["kid"] = json!(kid);
        }
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(payload_text.as_bytes()));
        self.sign_input(&input)
    }

    /// Signs a JWS signing input (`header.payload`), hedged (a new signature each time), in the
    /// low-S form verifiers accept.
    fn sign_input(&self, input: &str) -> String {
        let signature: Signature =
            self.signing.sign_with_rng(&mut p256::elliptic_curve::rand_core::OsRng, input.as_bytes());
        let signature = signature.normalize_s().unwrap_or(signature);
        format!("{input}.{}", b64(&signature.to_bytes()))
    }
}

/// `(r, n - s)`: the re-encoded copy of a compact JWS anyone can make without the key. It is a
/// valid ECDSA signature of the same bytes.
fn high_s(jwt: &str) -> String {
    let (input, signature) = jwt.rsplit_once('.').expect("a JWS");
    let signature = Signature::from_slice(&unb64(signature)).expect("r || s");
    let (r, s) = signature.split_scalars();
    let flipped = Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).expect("a valid signature");
    format!("{input}.{}", b64(&flipped.to_bytes()))
}

/// What a compact JWS's signer signed (`header.payload`), hashed: the identity the daemon keys
/// mandates and checkouts by.
fn content_id(jwt: &str) -> String {
    sha256_b64(jwt.rsplit_once('.').expect("a JWS").0)
}

/// Verifies a compact ES256 JWS with a public JWK; returns (header, payload).
fn verify_es256(jwt: &str, jwk: &Value) -> (Value, Value) {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a compact JWS");
    let point = p256::EncodedPoint::from_affine_coordinates(
        unb64(jwk["x"].as_str().expect("x")).as_slice().into(),
        unb64(jwk["y"].as_str().expect("y")).as_slice().into(),
        false,
    );
    let key = VerifyingKey::from_encoded_point(&point).expect("a P-256 point");
    let signature = Signature::from_slice(&unb64(parts[2])).expect("r || s");
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).expect("the signature verifies");
    let header: Value = serde_json::from_slice(&unb64(parts[0])).expect("header");
    let payload: Value = serde_json::from_slice(&unb64(parts[1])).expect("payload");
    assert_eq!(header["alg"], "ES256");
    (header, payload)
}

/// An array-element disclosure of already-serialized JSON: (encoded, digest).
fn disclosure(value_text: &str) -> (String, String) {
    let salt = b64(&rand::random::<[u8; 16]>());
    let encoded = b64(format!("[\"{salt}\",{value_text}]").as_bytes());
    let digest = sha256_b64(&encoded);
    (encoded, digest)
}

/// An open mandate SD-JWT: the content is the one disclosed `delegate_payload` element.
fn open_mandate(issuer: &TestKey, content_text: &str, nested: &[String], now: i64) -> String {
    let (content, digest) = disclosure(content_text);
    let payload = json!({ "iss": "https://agent-provider.example", "iat": now,
                          "delegate_payload": [{ "...": digest }], "_sd_alg": "sha-256" });
    let jwt = issuer.sign("dc+sd-jwt", &payload.to_string());
    let mut parts = vec![jwt];
    parts.extend(nested.iter().cloned());
    parts.push(content);
    format!("{}~", parts.join("~"))
}

fn merchant(id: &str) -> Value {
    json!({ "id": id, "name": format!("Merchant {id}"), "website": format!("https://{}.example", id.replace('_', "-")) })
}

/// What the user signs for the agent.
struct MandateTerms {
    /// `payment.budget` `max`, as decimal text in dollars.
    budget: Option<&'static str>,
    min_cents: i64,
    max_cents: i64,
    payees: Vec<&'static str>,
    merchants: Vec<&'static str>,
    /// What the checkout must contain.
    items: Items,
    /// A `payment.agent_recurrence` constraint.
    recurrence: Option<Value>,
}

impl Default for MandateTerms {
    fn default() -> MandateTerms {
        MandateTerms {
            budget: Some("150.10"),
            min_cents: 100,
            max_cents: 20_000,
            payees: vec!["merchant_1", "merchant_3"],
            merchants: vec!["merchant_1", "merchant_2"],
            items: Items::Shoes,
            recurrence: None,
        }
    }
}

#[derive(Clone, Copy)]
enum Items {
    /// One gold or silver sneaker and two socks (the fixture's checkout mandate).
    Shoes,
    /// One gift card.
    GiftCard,
}

struct OpenMandates {
    checkout: String,
    payment: String,
}

fn issue_mandates(issuer: &TestKey, agent_jwk: &Value, terms: &MandateTerms, now: i64) -> OpenMandates {
    let cnf = json!({ "jwk": { "kty": agent_jwk["kty"], "crv": agent_jwk["crv"], "x": agent_jwk["x"], "y": agent_jwk["y"] } });
    let mut nested = Vec::new();
    let mut disclose = |value: Value| {
        let (encoded, digest) = disclosure(&value.to_string());
        nested.push(encoded);
        json!({ "...": digest })
    };
    let mut constraints = Vec::new();
    match terms.items {
        Items::Shoes => {
            let gold = disclose(json!({ "id": "sku_gold_sneaker_9", "title": "Gold Sneaker, size 9" }));
            let silver = disclose(json!({ "id": "sku_silver_sneaker_9", "title": "Silver Sneaker, size 9" }));
            let socks = disclose(json!({ "id": "sku_socks_black", "title": "Black Socks" }));
            constraints.push(json!({ "type": "checkout.line_items", "items": [
                { "id": "shoes", "acceptable_items": [gold, silver], "quantity": 1 },
                { "id": "socks", "acceptable_items": [socks], "quantity": 2 } ] }));
        }
        Items::GiftCard => {
            let card = disclose(json!({ "id": "sku_gift_card", "title": "Gift card" }));
            constraints.push(json!({ "type": "checkout.line_items", "items": [
                { "id": "card", "acceptable_items": [card], "quantity": 1 } ] }));
        }
    }
    let allowed: Vec<Value> = terms.merchants.iter().map(|id| disclose(merchant(id))).collect();
    constraints.push(json!({ "type": "checkout.allowed_merchants", "allowed": allowed }));
    let checkout_content = json!({ "vct": "mandate.checkout.open.1", "constraints": constraints, "cnf": cnf,
                                   "iat": now, "exp": now + 30 * 86_400 });
    let checkout = open_mandate(issuer, &checkout_content.to_string(), &nested, now);

    let mut nested = Vec::new();
    let mut disclose = |value: Value| {
        let (encoded, digest) = disclosure(&value.to_string());
        nested.push(encoded);
        json!({ "...": digest })
    };
    let payees: Vec<Value> = terms.payees.iter().map(|id| disclose(merchant(id))).collect();
    let mut constraints = vec![json!({ "type": "payment.amount_range", "currency": "USD",
                                       "min": terms.min_cents, "max": terms.max_cents })];
    if terms.budget.is_some() {
        constraints.push(json!({ "type": "payment.budget", "max": "__BUDGET__", "currency": "USD" }));
    }
    constraints.push(json!({ "type": "payment.allowed_payees", "allowed": payees }));
    constraints.extend(terms.recurrence.clone());
    constraints.push(json!({ "type": "payment.allowed_payment_instruments",
                             "allowed": [{ "id": "card_4242", "type": "card", "description": "Visa ending 4242" }] }));
    constraints.push(json!({ "type": "payment.reference", "conditional_transaction_id": sha256_b64(&checkout) }));
    let payment_content = json!({ "vct": "mandate.payment.open.1", "constraints": constraints, "cnf": cnf,
                                  "iat": now, "exp": now + 30 * 86_400 });
    // The budget is a decimal number in dollars, written exactly.
    let text = payment_content.to_string().replace("\"__BUDGET__\"", terms.budget.unwrap_or("0"));
    let payment = open_mandate(issuer, &text, &nested, now);
    OpenMandates { checkout, payment }
}

/// A merchant-signed UCP checkout JWT.
struct CheckoutTerms {
    id: String,
    merchant: &'static str,
    /// (sku, title, unit price in cents, quantity)
    lines: Vec<(&'static str, &'static str, i64, u64)>,
    tax_cents: i64,
    currency: &'static str,
    exp_in: i64,
}

impl CheckoutTerms {
    fn shoes(id: &str) -> CheckoutTerms {
        CheckoutTerms {
            id: id.to_owned(),
            merchant: "merchant_1",
            lines: vec![
                ("sku_gold_sneaker_9", "Gold Sneaker, size 9", 12_345, 1),
                ("sku_socks_black", "Black Socks", 599, 2),
            ],
            tax_cents: 1_083,
            currency: "USD",
            exp_in: 3600,
        }
    }

    /// One gift card of `cents` (no tax).
    fn single(id: &str, merchant: &'static str, cents: i64) -> CheckoutTerms {
        CheckoutTerms {
            id: id.to_owned(),
            merchant,
            lines: vec![("sku_gift_card", "Gift card", cents, 1)],
            tax_cents: 0,
            currency: "USD",
            exp_in: 3600,
        }
    }

    fn total_cents(&self) -> i64 {
        self.lines.iter().map(|(_, _, price, qty)| price * *qty as i64).sum::<i64>() + self.tax_cents
    }

    fn claims(&self, now: i64) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .enumerate()
            .map(|(n, (sku, title, price, qty))| {
                json!({ "id": format!("line_{n}"), "item": { "id": sku, "title": title, "price": price },
                        "quantity": qty, "totals": [{ "type": "subtotal", "amount": price * *qty as i64 }] })
            })
            .collect();
        let subtotal = self.total_cents() - self.tax_cents;
        json!({ "id": self.id, "merchant": merchant(self.merchant), "line_items": lines,
                "status": "ready_for_complete", "currency": self.currency,
                "totals": [{ "type": "subtotal", "amount": subtotal }, { "type": "tax", "amount": self.tax_cents },
                           { "type": "total", "amount": self.total_cents() }],
                "links": [], "iss": "https://merchant.example", "iat": now, "exp": now + self.exp_in })
    }

    fn sign(&self, key: &TestKey, now: i64) -> String {
        key.sign("JWT", &self.claims(now).to_string())
    }
}

// ---- the simulated providers ----

/// The closed link of a presented chain `<open>~~<closed JWT>~<disclosures>~`.
fn closed_jwt(chain: &str) -> String {
    let (_, closed) = chain.split_once("~~").expect("an open and a closed mandate");
    closed.split('~').next().expect("closed JWT").to_owned()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() as i64
}

/// The Credential Provider: issues a token that names the closed Payment Mandate it was issued
/// for (so the merchant's processor can reference it), or refuses with a signed Error receipt.
struct CredentialProvider {
    refuse: bool,
}

impl Respond for CredentialProvider {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("JSON");
        let reference = sha256_b64(&closed_jwt(body["payment_mandate"].as_str().expect("payment_mandate")));
        if self.refuse {
            let receipt = json!({ "status": "Error", "iss": "cp.test", "iat": now_secs(), "reference": reference,
                                  "error": "insufficient_funds", "error_description": "the card was declined",
                                  "payment_id": "pay_refused" });
            let jwt = TestKey::load("credential_provider").sign("JWT", &receipt.to_string());
            return ResponseTemplate::new(402).set_body_json(json!({ "payment_receipt": jwt }));
        }
        ResponseTemplate::new(200).set_body_json(json!({ "payment_token": format!("tok_{reference}") }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MerchantMode {
    Paid,
    Declined,
    /// The payment receipt is signed by a key nobody trusts.
    ForgedReceipt,
}

struct MerchantSim {
    mode: MerchantMode,
    orders: Arc<AtomicU64>,
}

impl Respond for MerchantSim {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("JSON");
        let checkout_reference = sha256_b64(&closed_jwt(body["checkout_mandate"].as_str().expect("checkout_mandate")));
        let payment_reference = body["payment_token"]
            .as_str()
            .and_then(|t| t.strip_prefix("tok_"))
            .expect("a token from the CP")
            .to_owned();
        let n = self.orders.fetch_add(1, Ordering::SeqCst);
        let (checkout_receipt, payment_receipt) = match self.mode {
            MerchantMode::Paid | MerchantMode::ForgedReceipt => (
                json!({ "status": "Success", "iss": "merchant", "iat": now_secs(), "reference": checkout_reference,
                        "order_id": format!("order_{n}") }),
                json!({ "status": "Success", "iss": "mpp", "iat": now_secs(), "reference": payment_reference,
                        "payment_id": format!("pay_{n}"), "psp_confirmation_id": format!("psp_{n}"),
                        "network_confirmation_id": format!("net_{n}") }),
            ),
            MerchantMode::Declined => (
                json!({ "status": "Error", "iss": "merchant", "iat": now_secs(), "reference": checkout_reference,
                        "error": "payment_failed", "error_description": "the processor declined the card" }),
                json!({ "status": "Error", "iss": "mpp", "iat": now_secs(), "reference": payment_reference,
                        "error": "card_declined", "error_description": "do not honor", "payment_id": format!("pay_{n}") }),
            ),
        };
        let processor = if self.mode == MerchantMode::ForgedReceipt { "attacker" } else { "processor" };
        ResponseTemplate::new(200).set_body_json(json!({
            "checkout_receipt": TestKey::load("merchant").sign("JWT", &checkout_receipt.to_string()),
            "payment_receipt": TestKey::load(processor).sign("JWT", &payment_receipt.to_string()),
        }))
    }
}

async fn credential_provider(refuse: bool) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ap2/v0.2/payment-credentials"))
        .respond_with(CredentialProvider { refuse })
        .mount(&server)
        .await;
    server
}

async fn merchant_server(mode: MerchantMode) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/ap2/v0\.2/checkouts/[^/]+/complete$"))
        .respond_with(MerchantSim { mode, orders: Arc::new(AtomicU64::new(0)) })
        .mount(&server)
        .await;
    server
}

fn public_jwk(name: &str) -> Value {
    TestKey::load(name).public
}

fn test_kek() -> Kek {
    Kek::from_bytes([42; 32])
}

fn ap2_config(cp: &MockServer, merchants: &[(&str, &MockServer)], v01: Option<&MockServer>) -> Ap2Config {
    let merchants: Vec<Value> = merchants
        .iter()
        .map(|(id, server)| {
            json!({ "id": id, "base_url": server.uri(), "keys": [public_jwk("merchant")], "v01_name": "Demo Merchant" })
        })
        .collect();
    let mut file = json!({
        "trusted_issuers": [public_jwk("user")],
        "credential_provider": { "base_url": cp.uri(), "audience": CP_AUDIENCE,
                                 "receipt_keys": [public_jwk("credential_provider")] },
        "processor_keys": [public_jwk("processor")],
        "merchants": merchants,
    });
    if let Some(processor) = v01 {
        file["v01"] = json!({ "processor_url": processor.uri(), "audience": "mpp.test" });
    }
    Ap2Config {
        file: Some(serde_json::from_value::<Ap2File>(file).expect("a valid AP2 configuration")),
        kek: Some(test_kek()),
        conformance: ConformanceSink::to_dir(ConformanceSink::test_dir()),
        ..Ap2Config::default()
    }
}

async fn spawn(config: Ap2Config) -> TestApp {
    spawn_app_with(AppOptions { protocols: ProtocolConfig { ap2: config, ..Default::default() }, ..Default::default() })
        .await
}

async fn agent_jwk(app: &TestApp, agent: &Agent) -> Value {
    let (status, body) = app.agent_call(&agent.token, reqwest::Method::GET, "/v1/ap2/key", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["jwk"].get("d").is_none(), "the private key never leaves the daemon: {body}");
    body["jwk"].clone()
}

async fn pay(app: &TestApp, agent: &Agent, mandates: &OpenMandates, checkout_jwt: &str) -> (u16, Value) {
    app.agent_call(
        &agent.token,
        reqwest::Method::POST,
        "/v1/ap2/payments",
        Some(json!({ "checkout_jwt": checkout_jwt, "open_checkout_mandate": mandates.checkout,
                     "open_payment_mandate": mandates.payment, "task": "buy-shoes" })),
    )
    .await
}

async fn me(app: &TestApp, agent: &Agent) -> Value {
    let (status, body) = app.agent_call(&agent.token, reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn mandate_budget(app: &TestApp, agent: &Agent, mandates: &OpenMandates) -> Value {
    let (open_jwt, _) = mandates.payment.split_once('~').expect("SD-JWT");
    let id = content_id(open_jwt);
    let (status, body) =
        app.agent_call(&agent.token, reqwest::Method::GET, &format!("/v1/ap2/mandates/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) async fn received(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("JSON"))
        .collect()
}

/// The closed mandate of a presented chain, verified the way a verifier would, by this test's
/// own code: the open link exactly as the user issued it, an ES256 signature by the agent's key
/// over a `kb+sd-jwt`, `sd_hash` of the open link, the audience, and the content disclosure
/// (with property disclosures resolved).
fn verify_closed(chain: &str, open: &str, agent: &Value, audience: &str) -> Value {
    let (open_part, closed) = chain.split_once("~~").expect("two links");
    assert_eq!(format!("{open_part}~"), open, "the open mandate is presented exactly as issued");
    let mut parts = closed.trim_end_matches('~').split('~');
    let jwt = parts.next().expect("JWT");
    let (header, payload) = verify_es256(jwt, agent);
    assert_eq!(header["typ"], "kb+sd-jwt");
    assert_eq!(payload["sd_hash"], sha256_b64(open), "bound to the open mandate by sd_hash");
    assert_eq!(payload["aud"], audience);
    assert!(payload["nonce"].as_str().is_some_and(|n| n.len() >= 16));
    let disclosures: Vec<(String, Value)> =
        parts.map(|d| (sha256_b64(d), serde_json::from_slice(&unb64(d)).expect("disclosure JSON"))).collect();
    let content_digest = payload["delegate_payload"][0]["..."].as_str().expect("delegate_payload digest");
    let (_, content) = disclosures.iter().find(|(digest, _)| digest == content_digest).expect("content disclosed");
    let mut content = content[1].clone();
    if let Some(digests) = content.get("_sd").and_then(Value::as_array).cloned() {
        for digest in digests {
            let (_, property) = disclosures.iter().find(|(d, _)| Value::String(d.clone()) == digest).expect("property");
            content[property[1].as_str().expect("name")] = property[2].clone();
        }
        content.as_object_mut().expect("object").remove("_sd");
    }
    content
}

fn log_of<'a>(log: &'a [Value], event: &str) -> Vec<&'a Value> {
    log.iter().filter(|e| e["event"] == event).collect()
}

// ---- tests ----

#[tokio::test]
async fn ap2_v02_human_not_present_purchase_end_to_end() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("shopper", 500 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);

    // The owner (or the agent) registers the open mandates: verified, budget created.
    let (status, registered) = app
        .agent_call(
            &agent.token,
            reqwest::Method::POST,
            "/v1/ap2/mandates",
            Some(json!({ "open_checkout_mandate": mandates.checkout, "open_payment_mandate": mandates.payment })),
        )
        .await;
    assert_eq!(status, 201, "{registered}");
    assert_eq!(registered["budget_micros"], 150_100_000);
    assert_eq!(registered["remaining_micros"], 150_100_000);
    assert_eq!(registered["allowed_payees"], json!(["merchant_1", "merchant_3"]));

    let checkout = CheckoutTerms::shoes("chk_e2e");
    let checkout_jwt = checkout.sign(&TestKey::load("merchant"), now);
    let (status, paid) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["status"], "paid");
    assert_eq!(paid["amount_micros"], 146_260_000);
    assert_eq!(paid["service"], "merchant-1.example");
    assert_eq!(paid["checkout_id"], "chk_e2e");
    assert_eq!(paid["order_id"], "order_0");
    assert_eq!(paid["checkout_hash"], sha256_b64(&checkout_jwt));

    // Money: spent, nothing left held; the mandate's budget is charged the same.
    let balance = me(&app, &agent).await;
    assert_eq!(balance["spent_micros"], 146_260_000);
    assert_eq!(balance["held_micros"], 0);
    let budget = mandate_budget(&app, &agent, &mandates).await;
    assert_eq!(budget["spent_micros"], 146_260_000);
    assert_eq!(budget["remaining_micros"], 150_100_000 - 146_260_000);
    assert_eq!(budget["outstanding"], 0);

    // What the Credential Provider received: the open Payment Mandate as issued, chained to a
    // closed one signed by the agent's key, for exactly this checkout.
    let cp_requests = received(&cp).await;
    assert_eq!(cp_requests.len(), 1);
    let request = &cp_requests[0];
    assert_eq!(request["checkout_hash"], sha256_b64(&checkout_jwt));
    assert_eq!(request["open_checkout_hash"], sha256_b64(&mandates.checkout));
    let payment_chain = request["payment_mandate"].as_str().expect("chain");
    let closed_payment = verify_closed(payment_chain, &mandates.payment, &jwk, CP_AUDIENCE);
    assert_eq!(closed_payment["vct"], "mandate.payment.1");
    assert_eq!(closed_payment["transaction_id"], sha256_b64(&checkout_jwt));
    assert_eq!(closed_payment["payment_amount"], json!({ "amount": 14_626, "currency": "USD" }));
    assert_eq!(closed_payment["payee"]["id"], "merchant_1");
    assert_eq!(closed_payment["payment_instrument"]["id"], "card_4242");

    // What the merchant received: the Checkout Mandates, bound to the checkout JWT, and the token.
    let merchant_requests = shop.received_requests().await.unwrap_or_default();
    assert_eq!(merchant_requests.len(), 1);
    assert_eq!(merchant_requests[0].url.path(), "/ap2/v0.2/checkouts/chk_e2e/complete");
    let request: Value = serde_json::from_slice(&merchant_requests[0].body).expect("JSON");
    let closed_checkout =
        verify_closed(request["checkout_mandate"].as_str().expect("chain"), &mandates.checkout, &jwk, "merchant_1");
    assert_eq!(closed_checkout["vct"], "mandate.checkout.1");
    assert_eq!(closed_checkout["checkout_jwt"], checkout_jwt);
    assert_eq!(closed_checkout["checkout_hash"], sha256_b64(&checkout_jwt));
    assert_eq!(request["payment_token"], format!("tok_{}", sha256_b64(&closed_jwt(payment_chain))));

    // The log: one hold and one settle, the merchant as the service, with the checkout, the
    // mandate ids and the receipt references.
    let log = app.log().await;
    let holds = log_of(&log, "hold");
    let settles = log_of(&log, "settle");
    assert_eq!((holds.len(), settles.len()), (1, 1), "{log:?}");
    let payment_mandate_id = content_id(mandates.payment.split('~').next().expect("jwt"));
    assert_eq!(
        holds[0]["bucket"],
        format!("ap2:pm:{payment_mandate_id},ap2:co:{}", content_id(&checkout_jwt)),
        "charged to the mandate's budget and the checkout's own"
    );
    for entry in [holds[0], settles[0]] {
        assert_eq!(entry["service"], "merchant-1.example");
        assert_eq!(entry["protocol"], "ap2");
        assert_eq!(entry["task"], "buy-shoes");
    }
    let detail: Value = serde_json::from_str(settles[0]["detail"].as_str().expect("detail")).expect("JSON");
    assert_eq!(detail["checkout_id"], "chk_e2e");
    assert_eq!(detail["merchant_id"], "merchant_1");
    assert_eq!(detail["payment_mandate_id"], payment_mandate_id);
    assert_eq!(detail["checkout_mandate_id"], content_id(mandates.checkout.split('~').next().expect("jwt")));
    assert_eq!(detail["payment_receipt_reference"], sha256_b64(&closed_jwt(payment_chain)));
    assert_eq!(detail["order_id"], "order_0");
    assert_eq!(paid["receipt"]["receipt"]["service"], "merchant-1.example");
    assert_eq!(paid["receipt"]["receipt"]["details"]["checkout_id"], "chk_e2e");

    // The stored key is sealed: no PEM, no JWK in Redis.
    let redis = app.redis.as_ref().expect("redis");
    let stored =
        redis.cli(&["HGET", &format!("sc:{{{}}}:a:{}", agent.tree, agent.id), "x:ap2_key"]).expect("redis-cli");
    assert!(stored.starts_with("v1.") && !stored.contains("PRIVATE") && !stored.contains("\"d\""), "{stored}");

    // The same checkout again is the same payment: replayed, nothing new signed or charged.
    let (status, again) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["hold_id"], paid["hold_id"]);
    assert_eq!(received(&cp).await.len(), 1);
    assert_eq!(me(&app, &agent).await["spent_micros"], 146_260_000);
}

#[tokio::test]
async fn ap2_mandate_budget_holds_across_merchants_and_daemon_instances() {
    let cp = credential_provider(false).await;
    let shop_1 = merchant_server(MerchantMode::Paid).await;
    let shop_2 = merchant_server(MerchantMode::Paid).await;
    let merchants = [("merchant_1", &shop_1), ("merchant_2", &shop_2)];
    let first = spawn(ap2_config(&cp, &merchants, None)).await;
    let second = spawn_app_with(AppOptions {
        redis: Some((first.redis.clone().expect("redis"), "sc".into())),
        protocols: ProtocolConfig { ap2: ap2_config(&cp, &merchants, None), ..Default::default() },
        ..Default::default()
    })
    .await;
    let agent = first.create_agent("budgeted", 1_000 * USD, None).await;
    // Both instances ask for the key at once; they agree on one.
    let (jwk, jwk_2) = tokio::join!(agent_jwk(&first, &agent), agent_jwk(&second, &agent));
    assert_eq!(jwk, jwk_2);

    let now = (first.clock.now_ms() / 1000) as i64;
    let terms = MandateTerms {
        budget: Some("100.00"),
        min_cents: 100,
        max_cents: 10_000,
        payees: vec!["merchant_1", "merchant_2"],
        merchants: vec!["merchant_1", "merchant_2"],
        items: Items::GiftCard,
        ..MandateTerms::default()
    };
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &terms, now);
    let merchant_key = TestKey::load("merchant");

    // Six concurrent $60 checkouts, from both merchants, through both instances.
    let attempts: Vec<(usize, String)> = (0..6)
        .map(|n| {
            let shop = if n % 2 == 0 { "merchant_1" } else { "merchant_2" };
            (n, CheckoutTerms::single(&format!("chk_race_{n}"), shop, 6_000).sign(&merchant_key, now))
        })
        .collect();
    let results = futures::future::join_all(attempts.iter().map(|(n, jwt)| {
        let app = if n / 3 == 0 { &first } else { &second };
        pay(app, &agent, &mandates, jwt)
    }))
    .await;
    let paid = results.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(paid, 1, "{results:?}");
    for (status, body) in results.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 402, "{body}");
        assert!(["budget_busy", "budget_exceeded"].contains(&body["code"].as_str().unwrap_or_default()), "{body}");
    }
    // Exactly one closed mandate was signed and presented, for $60.
    let signed = |requests: Vec<Value>| -> u64 {
        requests
            .iter()
            .map(|r| {
                let closed =
                    verify_closed(r["payment_mandate"].as_str().expect("chain"), &mandates.payment, &jwk, CP_AUDIENCE);
                closed["payment_amount"]["amount"].as_u64().expect("amount") * 10_000
            })
            .sum()
    };
    assert_eq!(signed(received(&cp).await), 60 * USD);

    // Another $60 passes the budget: refused before signing; $40 fits exactly.
    let (status, refused) = pay(
        &second,
        &agent,
        &mandates,
        &CheckoutTerms::single("chk_more", "merchant_2", 6_000).sign(&merchant_key, now),
    )
    .await;
    assert_eq!(status, 402, "{refused}");
    assert_eq!(refused["code"], "budget_exceeded");
    assert_eq!(refused["remaining_micros"], 40 * USD);
    let (status, body) = pay(
        &first,
        &agent,
        &mandates,
        &CheckoutTerms::single("chk_rest", "merchant_2", 4_000).sign(&merchant_key, now),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let total_signed = signed(received(&cp).await);
    assert_eq!(total_signed, 100 * USD, "at most the budget was ever signed");
    let budget = mandate_budget(&second, &agent, &mandates).await;
    assert_eq!((budget["spent_micros"].as_u64(), budget["held_micros"].as_u64()), (Some(100 * USD), Some(0)));
    assert_eq!(me(&first, &agent).await["spent_micros"], 100 * USD);
    let completions = received(&shop_1).await.len() + received(&shop_2).await.len();
    assert_eq!(completions, 2);
}

#[tokio::test]
async fn ap2_payment_over_the_agent_cap_is_refused_before_anything_is_signed() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("small-cap", 100 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
    let checkout_jwt = CheckoutTerms::shoes("chk_cap").sign(&TestKey::load("merchant"), now);

    let (status, body) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "cap_exceeded");
    assert_eq!(body["remaining_micros"], 100 * USD);
    assert!(received(&cp).await.is_empty(), "nothing reached the Credential Provider");
    assert!(received(&shop).await.is_empty());
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
    let log = app.log().await;
    let refusals = log_of(&log, "refuse");
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0]["reason"], "cap_exceeded");
    assert_eq!(refusals[0]["service"], "merchant-1.example");
}

#[tokio::test]
async fn ap2_tampered_or_disallowed_checkouts_and_mandates_are_refused_with_nothing_held() {
    let cp = credential_provider(false).await;
    let shop_1 = merchant_server(MerchantMode::Paid).await;
    let shop_2 = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop_1), ("merchant_2", &shop_2)], None)).await;
    let agent = app.create_agent("careful", 1_000 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let user = TestKey::load("user");
    let merchant_key = TestKey::load("merchant");
    let mandates = issue_mandates(&user, &jwk, &MandateTerms::default(), now);
    let valid = CheckoutTerms::shoes("chk_valid").sign(&merchant_key, now);
    let log_before = app.log().await.len();

    let edited = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
        let mut claims: Value = serde_json::from_slice(&unb64(&parts[1])).expect("claims");
        claims["totals"][2]["amount"] = json!(100);
        parts[1] = b64(claims.to_string().as_bytes());
        parts.join(".")
    };
    let alg_none = {
        let claims = CheckoutTerms::shoes("chk_none").claims(now);
        format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims.to_string().as_bytes()))
    };
    let expired = CheckoutTerms { exp_in: -1, ..CheckoutTerms::shoes("chk_old") }.sign(&merchant_key, now);
    let from_merchant_2 =
        CheckoutTerms { merchant: "merchant_2", ..CheckoutTerms::shoes("chk_m2") }.sign(&merchant_key, now);
    let too_much = {
        let mut terms = CheckoutTerms::shoes("chk_big");
        terms.tax_cents = 10_000;
        terms.sign(&merchant_key, now)
    };
    let euro = CheckoutTerms { currency: "EUR", ..CheckoutTerms::shoes("chk_eur") }.sign(&merchant_key, now);
    let hat = {
        let mut terms = CheckoutTerms::shoes("chk_hat");
        terms.lines.push(("sku_hat", "Hat", 100, 1));
        terms.sign(&merchant_key, now)
    };
    let other_key = issue_mandates(&user, &public_jwk("attacker"), &MandateTerms::default(), now);
    let untrusted = issue_mandates(&TestKey::load("attacker"), &jwk, &MandateTerms::default(), now);
    let monthly = MandateTerms {
        recurrence: Some(json!({ "type": "payment.agent_recurrence", "frequency": "MONTHLY", "max_occurrences": 12 })),
        ..MandateTerms::default()
    };
    let recurring = issue_mandates(&user, &jwk, &monthly, now);

    let cases: Vec<(&str, String, &OpenMandates, u16, &str)> = vec![
        ("payload edited", edited, &mandates, 422, "ap2_bad_signature"),
        (
            "signed by another key",
            CheckoutTerms::shoes("chk_x").sign(&TestKey::load("attacker"), now),
            &mandates,
            422,
            "ap2_bad_signature",
        ),
        ("alg none", alg_none, &mandates, 422, "ap2_alg_not_allowed"),
        ("expired", expired, &mandates, 422, "ap2_expired"),
        ("payee not allowed", from_merchant_2, &mandates, 422, "ap2_payee_not_allowed"),
        ("amount out of range", too_much, &mandates, 422, "ap2_amount_out_of_range"),
        ("currency mismatch", euro, &mandates, 422, "ap2_currency_mismatch"),
        ("line items not allowed", hat, &mandates, 422, "ap2_line_items_not_allowed"),
        ("malformed checkout", "not.a-jwt".to_owned(), &mandates, 400, "ap2_malformed_jwt"),
        ("mandates for another key", valid.clone(), &other_key, 422, "ap2_cnf_mismatch"),
        ("mandates by an untrusted issuer", valid.clone(), &untrusted, 422, "ap2_bad_signature"),
        // The daemon keeps no history of presentations, so it refuses what needs one.
        ("a recurrence it cannot count", valid.clone(), &recurring, 422, "ap2_unsupported_constraint"),
    ];
    for (case, checkout_jwt, mandates, expected_status, expected_code) in &cases {
        let (status, body) = pay(&app, &agent, mandates, checkout_jwt).await;
        assert_eq!(
            (status, body["code"].as_str().unwrap_or_default()),
            (*expected_status, *expected_code),
            "{case}: {body}"
        );
    }
    let malformed = OpenMandates { checkout: "garbage".into(), payment: mandates.payment.clone() };
    let (status, body) = pay(&app, &agent, &malformed, &valid).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("ap2_malformed_sd_jwt")), "{body}");

    // Nothing was held, logged, signed or sent.
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
    assert_eq!(app.log().await.len(), log_before, "the log is unchanged");
    assert!(received(&cp).await.is_empty());
    assert!(received(&shop_1).await.is_empty() && received(&shop_2).await.is_empty());
}

#[tokio::test]
async fn ap2_error_receipt_voids_the_hold_and_a_forged_receipt_never_settles() {
    for mode in [MerchantMode::Declined, MerchantMode::ForgedReceipt] {
        let cp = credential_provider(false).await;
        let shop = merchant_server(mode).await;
        let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
        let agent = app.create_agent("unlucky", 500 * USD, None).await;
        let jwk = agent_jwk(&app, &agent).await;
        let now = (app.clock.now_ms() / 1000) as i64;
        let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
        let checkout_jwt = CheckoutTerms::shoes("chk_fail").sign(&TestKey::load("merchant"), now);

        let (status, body) = pay(&app, &agent, &mandates, &checkout_jwt).await;
        assert_eq!(received(&shop).await.len(), 1, "the merchant was asked once");
        let log = app.log().await;
        let notes = log_of(&log, "note");
        assert_eq!(notes.len(), 1, "{log:?}");
        assert!(log_of(&log, "settle").is_empty(), "never settled");
        let balance = me(&app, &agent).await;
        assert_eq!(balance["spent_micros"], 0);
        match mode {
            MerchantMode::Declined => {
                assert_eq!(status, 402, "{body}");
                assert_eq!(body["code"], "ap2_payment_declined");
                assert_eq!(body["error"], "card_declined");
                assert_eq!(body["voided"], true);
                assert_eq!(notes[0]["reason"], "ap2_payment_declined");
                assert!(notes[0]["detail"].as_str().is_some_and(|d| d.contains("do not honor")), "{:?}", notes[0]);
                let voids = log_of(&log, "void");
                assert_eq!(voids.len(), 1);
                assert_eq!(voids[0]["reason"], "ap2_payment_declined");
                assert_eq!(balance["held_micros"], 0);
                let budget = mandate_budget(&app, &agent, &mandates).await;
                assert_eq!((budget["spent_micros"].as_u64(), budget["held_micros"].as_u64()), (Some(0), Some(0)));
            }
            MerchantMode::ForgedReceipt => {
                // A receipt that does not verify proves nothing: the merchant may have charged,
                // so the hold stays, counted, as `unknown` (see the test below).
                assert_eq!(status, 502, "{body}");
                assert_eq!(body["code"], "ap2_receipt_invalid");
                assert_eq!(body["provider_code"], "ap2_bad_signature");
                assert_eq!(body["hold_state"], "unknown");
                assert_eq!(notes[0]["reason"], "ap2_receipt_invalid");
                assert!(log_of(&log, "void").is_empty());
                assert_eq!(balance["held_micros"], 146_260_000);
            }
            MerchantMode::Paid => unreachable!("not a failure mode"),
        }
    }
}

#[tokio::test]
async fn ap2_credential_provider_refusal_voids_before_the_merchant_is_asked() {
    let cp = credential_provider(true).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("refused", 500 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
    let checkout_jwt = CheckoutTerms::shoes("chk_cp").sign(&TestKey::load("merchant"), now);

    let (status, body) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(
        (body["code"].as_str(), body["stage"].as_str()),
        (Some("ap2_payment_declined"), Some("credential_provider"))
    );
    assert_eq!(body["error"], "insufficient_funds");
    assert!(received(&shop).await.is_empty(), "no token, no merchant call");
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
    let log = app.log().await;
    assert_eq!(log_of(&log, "void")[0]["reason"], "ap2_credential_refused");
}

/// RFC 3339 UTC for Unix seconds (days to civil date, Howard Hinnant's algorithm).
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The v0.1 processor: checks nothing itself (the test does, on what it received) and answers
/// with a Payment Receipt signed by the processor key, referencing the mandate's id.
struct ProcessorSim;

impl Respond for ProcessorSim {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("JSON");
        let id = body["payment_mandate"]["payment_mandate_contents"]["payment_mandate_id"].as_str().expect("id");
        let receipt = json!({ "status": "Success", "iss": "mpp", "iat": now_secs(), "reference": id,
                              "payment_id": "pay_v01", "psp_confirmation_id": "psp_v01", "network_confirmation_id": "net_v01" });
        ResponseTemplate::new(200)
            .set_body_json(json!({ "payment_receipt": TestKey::load("processor").sign("JWT", &receipt.to_string()) }))
    }
}

fn jcs_sha256(value: &Value) -> Vec<u8> {
    Sha256::digest(serde_json_canonicalizer::to_vec(value).expect("JCS")).to_vec()
}

#[tokio::test]
async fn ap2_v01_cart_mandate_becomes_a_signed_payment_mandate_and_settles() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let processor = MockServer::start().await;
    Mock::given(method("POST")).and(path("/ap2/v0.1/payments")).respond_with(ProcessorSim).mount(&processor).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], Some(&processor))).await;
    let agent = app.create_agent("v01", 500 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;

    // Prices as JSON numbers in dollars, written exactly.
    let contents_text = format!(
        r#"{{"id":"cart_shoes_123","user_cart_confirmation_required":false,
            "payment_request":{{"method_data":[{{"supported_methods":"CARD","data":{{"network":["visa"]}}}}],
              "details":{{"id":"order_shoes_123",
                "display_items":[{{"label":"Gold Sneaker","amount":{{"currency":"USD","value":120.10}},"refund_period":30}},
                                 {{"label":"Shipping","amount":{{"currency":"USD","value":5.99}},"refund_period":30}}],
                "total":{{"label":"Total","amount":{{"currency":"USD","value":126.09}},"refund_period":30}}}}}},
            "cart_expiry":"{}","merchant_name":"Demo Merchant"}}"#,
        rfc3339(now + 3600)
    );
    let contents: Value = serde_json::from_str(&contents_text).expect("JSON");
    let authorization = TestKey::load("merchant").sign(
        "JWT",
        &json!({ "iss": "https://demo-merchant.example", "iat": now, "exp": now + 900,
                 "cart_hash": hex::encode(jcs_sha256(&contents)) })
        .to_string(),
    );
    let cart_text = format!(r#"{{"contents":{contents_text},"merchant_authorization":"{authorization}"}}"#);
    let cart: Value = serde_json::from_str(&cart_text).expect("JSON");
    let request_text = format!(r#"{{"cart_mandate":{cart_text},"task":"v01-shoes"}}"#);

    let response = app
        .http
        .post(app.url("/v1/ap2/v0.1/payments"))
        .bearer_auth(&agent.token)
        .header("content-type", "application/json")
        .body(request_text)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["amount_micros"], 126_090_000);
    assert_eq!(body["cart_id"], "cart_shoes_123");
    assert_eq!(me(&app, &agent).await["spent_micros"], 126_090_000);

    // What the processor received: a PaymentMandate for this cart, authorized by the agent's key.
    let requests = received(&processor).await;
    assert_eq!(requests.len(), 1);
    let mandate = &requests[0]["payment_mandate"];
    let contents_sent = &mandate["payment_mandate_contents"];
    assert_eq!(contents_sent["cart_mandate_id"], "cart_shoes_123");
    assert_eq!(contents_sent["cart_mandate_hash"], hex::encode(jcs_sha256(&cart)));
    assert_eq!(contents_sent["payment_details_total"]["amount"]["value"], json!(126.09));
    assert_eq!(contents_sent["payment_response"]["method_name"], "CARD");
    let (header, claims) = verify_es256(mandate["user_authorization"].as_str().expect("user_authorization"), &jwk);
    assert_eq!(header["typ"], "kb+jwt");
    assert_eq!(claims["aud"], "mpp.test");
    assert_eq!(claims["transaction_data"][0], b64(&jcs_sha256(&cart)));
    assert_eq!(claims["transaction_data"][1], b64(&jcs_sha256(contents_sent)));

    let log = app.log().await;
    let settles = log_of(&log, "settle");
    assert_eq!(settles.len(), 1);
    assert_eq!(settles[0]["service"], "Demo Merchant");
    let detail: Value = serde_json::from_str(settles[0]["detail"].as_str().expect("detail")).expect("JSON");
    assert_eq!(detail["payment_mandate_id"], contents_sent["payment_mandate_id"]);
    assert_eq!(detail["payment_receipt_reference"], contents_sent["payment_mandate_id"]);
    assert_eq!(detail["cart_id"], "cart_shoes_123");

    // Every mandate the daemon produced was recorded for the conformance check.
    let dir = ConformanceSink::test_dir().join("ap2-v0.1").join("PaymentMandate");
    wait_for("the v0.1 PaymentMandate record", Duration::from_secs(5), || {
        let dir = dir.clone();
        async move { std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false) }
    })
    .await;
}

#[tokio::test]
async fn ap2_without_configuration_serves_keys_but_refuses_payments() {
    let app = spawn(Ap2Config::default()).await;
    let agent = app.create_agent("plain", 10 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    assert_eq!((jwk["kty"].as_str(), jwk["crv"].as_str()), (Some("EC"), Some("P-256")));
    // The admin sees the same public key, for the owner's trusted surface.
    let (status, admin_view) = app.admin(reqwest::Method::GET, &format!("/v1/ap2/agents/{}/key", agent.id), None).await;
    assert_eq!(status, 200, "{admin_view}");
    assert_eq!(admin_view["jwk"], jwk);
    let (status, body) = app
        .agent_call(
            &agent.token,
            reqwest::Method::POST,
            "/v1/ap2/payments",
            Some(json!({ "checkout_jwt": "x", "open_checkout_mandate": "y", "open_payment_mandate": "z" })),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (503, Some("ap2_not_configured")), "{body}");
    let (status, _) = app.agent_call("sct_nope", reqwest::Method::GET, "/v1/ap2/key", None).await;
    assert_eq!(status, 401);
}

#[test]
fn ap2_configuration_loads_from_the_file_and_the_kek_from_env_or_file_never_echoing_it() {
    let dir = std::env::temp_dir().join(format!("spendcap-ap2-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kek_file = dir.join("kek");
    let kek_hex = "ab".repeat(32);
    std::fs::write(&kek_file, format!("{kek_hex}\n")).expect("write");
    let example = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/ap2/daemon_config.json");

    let args = Ap2Args {
        ap2_config: Some(example.clone()),
        ap2_kek_file: Some(kek_file.clone()),
        ap2_mandate_ttl_secs: Some(120),
        ..Ap2Args::default()
    };
    let config = Ap2Config::from_args(&args).expect("the example configuration loads");
    let file = config.file.as_ref().expect("file");
    assert_eq!((file.merchants.len(), file.trusted_issuers.len()), (1, 1));
    assert_eq!(config.mandate_ttl, Duration::from_secs(120));
    let from_file = config.kek.as_ref().expect("kek").id().to_owned();
    let from_env: Kek = kek_hex.parse().expect("kek");
    assert_eq!(from_file, from_env.id(), "the file and the variable name the same KEK");
    assert!(!format!("{config:?}").contains(&kek_hex), "Debug never shows the KEK");
    Ap2Service::build(config).expect("the daemon builds its AP2 service");

    // Both sources at once, a KEK that is not 32 bytes, an unknown option: start-up fails, and
    // the message never echoes the secret.
    let both = Ap2Args { ap2_kek: Some(kek_hex.parse().expect("text")), ..args.clone() };
    assert!(Ap2Config::from_args(&both).is_err());
    let short = Ap2Args { ap2_kek: Some("c2VjcmV0LXRvby1zaG9ydA".parse().expect("text")), ap2_kek_file: None, ..args };
    let message = Ap2Config::from_args(&short).expect_err("refused").to_string();
    assert!(!message.contains("c2VjcmV0LXRvby1zaG9ydA"), "{message}");
    assert!(format!("{short:?}").contains("<redacted>"));
    let typo = dir.join("typo.json");
    let mut text: Value = serde_json::from_str(&std::fs::read_to_string(&example).expect("read")).expect("JSON");
    text["trusted_isuers"] = json!([]);
    std::fs::write(&typo, text.to_string()).expect("write");
    let typo_args = Ap2Args { ap2_config: Some(typo), ..Ap2Args::default() };
    assert!(Ap2Config::from_args(&typo_args).expect_err("refused").to_string().contains("trusted_isuers"));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- issue 13: signatures, one payment per checkout, idempotency, early refusals ----

/// Two daemon instances on one Redis, paying through the same providers.
async fn two_instances(
    cp: &MockServer,
    merchants: &[(&str, &MockServer)],
    v01: Option<&MockServer>,
) -> (TestApp, TestApp) {
    let first = spawn(ap2_config(cp, merchants, v01)).await;
    let second = spawn_app_with(AppOptions {
        redis: Some((first.redis.clone().expect("redis"), "sc".into())),
        protocols: ProtocolConfig { ap2: ap2_config(cp, merchants, v01), ..Default::default() },
        ..Default::default()
    })
    .await;
    (first, second)
}

async fn pay_with(app: &TestApp, agent: &Agent, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/ap2/payments")).bearer_auth(&agent.token).json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

fn payment_body(mandates: &OpenMandates, checkout_jwt: &str, task: &str) -> Value {
    json!({ "checkout_jwt": checkout_jwt, "open_checkout_mandate": mandates.checkout,
            "open_payment_mandate": mandates.payment, "task": task })
}

/// The open Payment Mandate with its issuer JWT replaced.
fn with_issuer_jwt(mandate: &str, jwt: &str) -> String {
    let (_, rest) = mandate.split_once('~').expect("SD-JWT");
    format!("{jwt}~{rest}")
}

#[tokio::test]
async fn ap2_a_high_s_or_re_signed_copy_of_an_open_mandate_buys_no_second_budget() {
    let cp = credential_provider(false).await;
    let shop_1 = merchant_server(MerchantMode::Paid).await;
    let shop_2 = merchant_server(MerchantMode::Paid).await;
    let merchants = [("merchant_1", &shop_1), ("merchant_2", &shop_2)];
    let (first, second) = two_instances(&cp, &merchants, None).await;
    let agent = first.create_agent("malleable", 1_000 * USD, None).await;
    let jwk = agent_jwk(&first, &agent).await;
    let now = (first.clock.now_ms() / 1000) as i64;
    let terms = MandateTerms {
        budget: Some("100.00"),
        min_cents: 100,
        max_cents: 10_000,
        payees: vec!["merchant_1", "merchant_2"],
        merchants: vec!["merchant_1", "merchant_2"],
        items: Items::GiftCard,
        ..MandateTerms::default()
    };
    let user = TestKey::load("user");
    let mandates = issue_mandates(&user, &jwk, &terms, now);
    let issuer_jwt = mandates.payment.split('~').next().expect("JWT").to_owned();
    // The re-encoded copy anyone can make, and a second signature of the same content by the
    // user's key (a trusted surface that signs twice): both the same open mandate.
    let high_s_copy = OpenMandates {
        checkout: mandates.checkout.clone(),
        payment: with_issuer_jwt(&mandates.payment, &high_s(&issuer_jwt)),
    };
    let re_signed = OpenMandates {
        checkout: mandates.checkout.clone(),
        payment: with_issuer_jwt(&mandates.payment, &user.sign_input(issuer_jwt.rsplit_once('.').expect("JWS").0)),
    };
    assert_ne!(re_signed.payment, mandates.payment);
    let merchant_key = TestKey::load("merchant");
    let checkout = |id: &str, shop: &'static str| CheckoutTerms::single(id, shop, 6_000).sign(&merchant_key, now);
    let (original_checkout, copy_checkout, re_signed_checkout) = (
        checkout("chk_orig", "merchant_1"),
        checkout("chk_copy", "merchant_2"),
        checkout("chk_resigned", "merchant_2"),
    );

    // $60 under the original on one instance, $60 under each copy on the other, all at once.
    let (original, copy, again) = tokio::join!(
        pay(&first, &agent, &mandates, &original_checkout),
        pay(&second, &agent, &high_s_copy, &copy_checkout),
        pay(&second, &agent, &re_signed, &re_signed_checkout),
    );
    assert_eq!((copy.0, copy.1["code"].as_str()), (422, Some("ap2_signature_not_canonical")), "{}", copy.1);
    let paid: Vec<&(u16, Value)> = [&original, &again].into_iter().filter(|(status, _)| *status == 200).collect();
    assert_eq!(paid.len(), 1, "one of the original and the re-signed copy pays: {original:?} {again:?}");
    for (status, body) in [&original, &again].into_iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 402, "{body}");
        assert!(["budget_busy", "budget_exceeded"].contains(&body["code"].as_str().unwrap_or_default()), "{body}");
    }

    // At most the budget was signed and paid: one closed mandate for $60, one completion.
    let presented = received(&cp).await;
    assert_eq!(presented.len(), 1, "{presented:?}");
    let closed = verify_closed(
        presented[0]["payment_mandate"].as_str().expect("chain"),
        if original.0 == 200 { &mandates.payment } else { &re_signed.payment },
        &jwk,
        CP_AUDIENCE,
    );
    assert_eq!(closed["payment_amount"]["amount"], 6_000);
    assert_eq!(received(&shop_1).await.len() + received(&shop_2).await.len(), 1);
    assert_eq!(me(&first, &agent).await["spent_micros"], 60 * USD);
    let budget = mandate_budget(&second, &agent, &mandates).await;
    assert_eq!(
        (budget["spent_micros"].as_u64(), budget["remaining_micros"].as_u64()),
        (Some(60 * USD), Some(40 * USD))
    );
}

#[tokio::test]
async fn ap2_one_checkout_is_paid_once_whatever_the_idempotency_keys() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let (first, second) = two_instances(&cp, &[("merchant_1", &shop)], None).await;
    let agent = first.create_agent("double", 1_000 * USD, None).await;
    let jwk = agent_jwk(&first, &agent).await;
    let now = (first.clock.now_ms() / 1000) as i64;
    let terms = MandateTerms { budget: Some("500.00"), ..MandateTerms::default() };
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &terms, now);
    let merchant_key = TestKey::load("merchant");

    // One after the other, on both instances, with two keys and with none.
    let checkout_jwt = CheckoutTerms::shoes("chk_once").sign(&merchant_key, now);
    let body = payment_body(&mandates, &checkout_jwt, "buy-shoes");
    let (status, paid) = pay_with(&first, &agent, Some("key-a"), body.clone()).await;
    assert_eq!(status, 200, "{paid}");
    for (app, key) in [(&second, Some("key-b")), (&first, None), (&second, Some("key-a"))] {
        let (status, again) = pay_with(app, &agent, key, body.clone()).await;
        assert_eq!(status, 200, "{key:?}: {again}");
        assert_eq!((again["replayed"].as_bool(), &again["hold_id"]), (Some(true), &paid["hold_id"]), "{key:?}");
    }
    // Another task or instrument under another key changes nothing either: the checkout is paid.
    let (status, again) =
        pay_with(&second, &agent, Some("key-c"), payment_body(&mandates, &checkout_jwt, "another-task")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    assert_eq!(received(&cp).await.len(), 1, "one payment token");
    assert_eq!(received(&shop).await.len(), 1, "one completion");
    assert_eq!(me(&first, &agent).await["spent_micros"], 146_260_000);

    // At once: four keys on two instances for a new checkout. One payment; the others wait
    // (409) or replay it.
    let checkout_jwt = CheckoutTerms { tax_cents: 0, ..CheckoutTerms::shoes("chk_race") }.sign(&merchant_key, now);
    let body = payment_body(&mandates, &checkout_jwt, "buy-shoes");
    let keys = ["race-1", "race-2", "race-3", "race-4"];
    let answers = futures::future::join_all(
        keys.iter()
            .enumerate()
            .map(|(n, key)| pay_with(if n % 2 == 0 { &first } else { &second }, &agent, Some(key), body.clone())),
    )
    .await;
    let paid: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 200).map(|(_, b)| b).collect();
    assert!(!paid.is_empty(), "{answers:?}");
    assert!(paid.iter().all(|b| b["hold_id"] == paid[0]["hold_id"]), "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 200) {
        assert_eq!((*status, body["code"].as_str()), (409, Some("idempotency_in_flight")), "{body}");
    }
    for key in keys {
        let (status, again) = pay_with(&second, &agent, Some(key), body.clone()).await;
        assert_eq!((status, &again["hold_id"]), (200, &paid[0]["hold_id"]), "{again}");
    }
    assert_eq!(received(&cp).await.len(), 2);
    assert_eq!(received(&shop).await.len(), 2);
    assert_eq!(me(&second, &agent).await["spent_micros"], 146_260_000 + 135_430_000);
}

#[tokio::test]
async fn ap2_the_same_idempotency_key_with_another_request_is_a_conflict_and_replays_keep_their_status() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let declining = merchant_server(MerchantMode::Declined).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop), ("merchant_2", &declining)], None)).await;
    let agent = app.create_agent("keys", 1_000 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let terms =
        MandateTerms { budget: Some("500.00"), payees: vec!["merchant_1", "merchant_2"], ..MandateTerms::default() };
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &terms, now);
    let merchant_key = TestKey::load("merchant");
    let checkout_a = CheckoutTerms::shoes("chk_a").sign(&merchant_key, now);
    let checkout_b = CheckoutTerms { tax_cents: 0, ..CheckoutTerms::shoes("chk_b") }.sign(&merchant_key, now);

    let (status, paid) = pay_with(&app, &agent, Some("k1"), payment_body(&mandates, &checkout_a, "t1")).await;
    assert_eq!(status, 200, "{paid}");
    // The same key with another task, another checkout, a field added: 422, nothing sent.
    let mut merchant_named = payment_body(&mandates, &checkout_a, "t1");
    merchant_named["merchant"] = json!("merchant_1");
    for (case, body) in [
        ("another task", payment_body(&mandates, &checkout_a, "t2")),
        ("another checkout", payment_body(&mandates, &checkout_b, "t1")),
        ("the merchant named", merchant_named),
    ] {
        let (status, refused) = pay_with(&app, &agent, Some("k1"), body).await;
        assert_eq!((status, refused["code"].as_str()), (422, Some("idempotency_conflict")), "{case}: {refused}");
    }
    assert_eq!(received(&cp).await.len(), 1);
    let (status, again) = pay_with(&app, &agent, Some("k1"), payment_body(&mandates, &checkout_a, "t1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");

    // A declined payment replays as the 402 it was.
    let declined_checkout =
        CheckoutTerms { merchant: "merchant_2", ..CheckoutTerms::shoes("chk_declined") }.sign(&merchant_key, now);
    let (status, declined) =
        pay_with(&app, &agent, Some("k2"), payment_body(&mandates, &declined_checkout, "t1")).await;
    assert_eq!((status, declined["code"].as_str()), (402, Some("ap2_payment_declined")), "{declined}");
    for key in ["k2", "k3"] {
        let (status, again) =
            pay_with(&app, &agent, Some(key), payment_body(&mandates, &declined_checkout, "t1")).await;
        assert_eq!(
            (status, again["code"].as_str(), again["replayed"].as_bool()),
            (402, Some("ap2_payment_declined"), Some(true)),
            "{again}"
        );
    }
    assert_eq!(received(&declining).await.len(), 1);
    assert_eq!(me(&app, &agent).await["spent_micros"], 146_260_000);
}

#[tokio::test]
async fn ap2_v01_one_cart_is_paid_once_and_a_key_names_one_request() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let processor = MockServer::start().await;
    Mock::given(method("POST")).and(path("/ap2/v0.1/payments")).respond_with(ProcessorSim).mount(&processor).await;
    let (first, second) = two_instances(&cp, &[("merchant_1", &shop)], Some(&processor)).await;
    let agent = first.create_agent("carts", 1_000 * USD, None).await;
    let now = (first.clock.now_ms() / 1000) as i64;

    let request = cart_request(now, "cart_once", 2_500, "t1");
    let (status, paid) = pay_cart(&first, &agent, Some("c1"), &request).await;
    assert_eq!(status, 200, "{paid}");
    // Another key, no key, the other instance: the same payment, replayed.
    for (app, key) in [(&second, Some("c2")), (&first, None)] {
        let (status, again) = pay_cart(app, &agent, key, &request).await;
        assert_eq!(
            (status, again["replayed"].as_bool(), &again["hold_id"]),
            (200, Some(true), &paid["hold_id"]),
            "{again}"
        );
    }
    // The same cart under a fresh merchant signature is the same cart.
    let re_signed = cart_request(now, "cart_once", 2_500, "t1");
    assert_ne!(re_signed, request);
    let (status, again) = pay_cart(&second, &agent, Some("c3"), &re_signed).await;
    assert_eq!((status, &again["hold_id"]), (200, &paid["hold_id"]), "{again}");
    // The same key with another task or another cart: 422.
    for other in [cart_request(now, "cart_once", 2_500, "t2"), cart_request(now, "cart_other", 2_500, "t1")] {
        let (status, refused) = pay_cart(&first, &agent, Some("c1"), &other).await;
        assert_eq!((status, refused["code"].as_str()), (422, Some("idempotency_conflict")), "{refused}");
    }
    assert_eq!(received(&processor).await.len(), 1, "one PaymentMandate presented");
    assert_eq!(me(&first, &agent).await["spent_micros"], 25 * USD);
}

#[tokio::test]
async fn ap2_revoked_or_denied_agents_reach_no_provider_and_leave_one_refusal() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let processor = MockServer::start().await;
    Mock::given(method("POST")).and(path("/ap2/v0.1/payments")).respond_with(ProcessorSim).mount(&processor).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], Some(&processor))).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let merchant_key = TestKey::load("merchant");

    let cases: [(&str, Value, &str); 3] = [
        ("revoked", Value::Null, "agent_revoked"),
        ("no-ap2", json!({ "protocols": { "deny": ["ap2"] } }), "protocol_denied"),
        ("no-merchant", json!({ "services": { "deny": ["merchant_1"] } }), "service_denied"),
    ];
    for (handle, controls, reason) in cases {
        let agent = app.create_agent(handle, 1_000 * USD, None).await;
        let jwk = agent_jwk(&app, &agent).await;
        let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
        if controls.is_null() {
            let (status, body) = app
                .admin(
                    reqwest::Method::POST,
                    &format!("/v1/agents/{}/revoke", agent.id),
                    Some(json!({ "reason": "test" })),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        } else {
            let (status, body) =
                app.admin(reqwest::Method::PUT, &format!("/v1/agents/{}/controls", agent.id), Some(controls)).await;
            assert_eq!(status, 200, "{body}");
        }
        let before = app.log().await.iter().filter(|e| e["event"] == "refuse").count();
        let checkout_jwt = CheckoutTerms::shoes(&format!("chk_{handle}")).sign(&merchant_key, now);
        let (status, body) = pay(&app, &agent, &mandates, &checkout_jwt).await;
        assert_eq!((status, body["code"].as_str()), (402, Some(reason)), "{handle} v0.2: {body}");
        let (status, body) =
            pay_cart(&app, &agent, None, &cart_request(now, &format!("cart_{handle}"), 2_500, "t")).await;
        assert_eq!((status, body["code"].as_str()), (402, Some(reason)), "{handle} v0.1: {body}");
        // One refusal per payment, logged like any other.
        let log = app.log().await;
        let refusals: Vec<&Value> =
            log_of(&log, "refuse").into_iter().filter(|e| e["agent"] == agent.id.as_str()).collect();
        assert_eq!(refusals.len(), 2, "{handle}: {log:?}");
        assert!(refusals.iter().all(|r| r["reason"] == reason), "{refusals:?}");
        assert_eq!(log.iter().filter(|e| e["event"] == "refuse").count(), before + 2);
    }
    assert!(received(&cp).await.is_empty(), "nothing reached the Credential Provider");
    assert!(received(&shop).await.is_empty(), "nothing reached the merchant");
    assert!(received(&processor).await.is_empty(), "nothing reached the v0.1 processor");
}

/// A v0.1 payment request (JSON text, prices exact) for a merchant-signed cart of `cents`.
pub(crate) fn cart_request(now: i64, cart_id: &str, cents: u64, task: &str) -> String {
    let value = format!("{}.{:02}", cents / 100, cents % 100);
    let contents_text = format!(
        r#"{{"id":"{cart_id}","user_cart_confirmation_required":false,
            "payment_request":{{"method_data":[{{"supported_methods":"CARD","data":{{"network":["visa"]}}}}],
              "details":{{"id":"order_{cart_id}",
                "display_items":[{{"label":"Gift card","amount":{{"currency":"USD","value":{value}}},"refund_period":30}}],
                "total":{{"label":"Total","amount":{{"currency":"USD","value":{value}}},"refund_period":30}}}}}},
            "cart_expiry":"{}","merchant_name":"Demo Merchant"}}"#,
        rfc3339(now + 3600)
    );
    let contents: Value = serde_json::from_str(&contents_text).expect("JSON");
    let authorization = TestKey::load("merchant").sign(
        "JWT",
        &json!({ "iss": "https://demo-merchant.example", "iat": now, "exp": now + 900,
                 "cart_hash": hex::encode(jcs_sha256(&contents)) })
        .to_string(),
    );
    format!(
        r#"{{"cart_mandate":{{"contents":{contents_text},"merchant_authorization":"{authorization}"}},"task":"{task}"}}"#
    )
}

pub(crate) async fn pay_cart(app: &TestApp, agent: &Agent, key: Option<&str>, request_text: &str) -> (u16, Value) {
    let mut request = app
        .http
        .post(app.url("/v1/ap2/v0.1/payments"))
        .bearer_auth(&agent.token)
        .header("content-type", "application/json")
        .body(request_text.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

#[tokio::test]
async fn ap2_an_unverifiable_receipt_keeps_the_hold_as_outcome_unknown_until_an_admin_resolves_it() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::ForgedReceipt).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("unsure", 1_000 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let terms = MandateTerms { budget: Some("500.00"), ..MandateTerms::default() };
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &terms, now);
    let merchant_key = TestKey::load("merchant");
    let checkout_jwt = CheckoutTerms::shoes("chk_unsure").sign(&merchant_key, now);

    let (status, body) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(
        (status, body["code"].as_str(), body["hold_state"].as_str()),
        (502, Some("ap2_receipt_invalid"), Some("unknown")),
        "{body}"
    );
    let hold = body["hold_id"].as_str().expect("hold id").to_owned();

    // Long after the closed mandates are dead, it is still counted, and the mandate's budget
    // is still busy: the merchant may have charged.
    app.clock.advance_ms(3_600_000);
    let balance = me(&app, &agent).await;
    assert_eq!(
        (balance["held_micros"].as_u64(), balance["unknown_micros"].as_u64(), balance["unknown_holds"].as_u64()),
        (Some(146_260_000), Some(146_260_000), Some(1)),
        "{balance}"
    );
    let later = (app.clock.now_ms() / 1000) as i64;
    let another = CheckoutTerms::shoes("chk_next").sign(&merchant_key, later);
    let (status, busy) = pay(&app, &agent, &mandates, &another).await;
    assert_eq!((status, busy["code"].as_str()), (402, Some("budget_busy")), "{busy}");

    // The agent and the admin see it as unknown, with why.
    let (status, mine) = app.agent_call(&agent.token, reqwest::Method::GET, "/v1/holds?state=unknown", None).await;
    assert_eq!(status, 200, "{mine}");
    let listed = &mine["holds"][0];
    assert_eq!((listed["hold_id"].as_str(), listed["protocol"].as_str()), (Some(hold.as_str()), Some("ap2")), "{mine}");
    assert!(listed["reason"].as_str().is_some_and(|r| r.contains("ap2_receipt_invalid")), "{mine}");
    let (_, all) = app.admin(reqwest::Method::GET, "/v1/holds?state=unknown", None).await;
    assert_eq!(all["total_micros"], 146_260_000, "{all}");

    // The admin learns from the merchant that nothing was charged, and voids it: the budget is
    // free again and the next payment is held (and, this merchant's receipts being forged,
    // ends unknown again rather than budget_busy).
    let (status, resolved) = app
        .admin(
            reqwest::Method::POST,
            &format!("/v1/holds/{hold}/resolve"),
            Some(json!({ "outcome": "voided", "reason": "merchant confirms order chk_unsure was never charged" })),
        )
        .await;
    assert_eq!(status, 200, "{resolved}");
    let budget = mandate_budget(&app, &agent, &mandates).await;
    assert_eq!((budget["held_micros"].as_u64(), budget["outstanding"].as_u64()), (Some(0), Some(0)), "{budget}");
    assert_eq!(me(&app, &agent).await["held_micros"], 0);
    let (status, next) = pay(&app, &agent, &mandates, &another).await;
    assert_eq!((status, next["code"].as_str()), (502, Some("ap2_receipt_invalid")), "{next}");
    let log = app.log().await;
    let voids = log_of(&log, "void");
    assert_eq!(voids.len(), 1, "{log:?}");
    assert_eq!(voids[0]["hold"], hold.as_str());
}

// ---- issue 13: what the providers charged is what the ledger settled ----

/// What a fault-injecting provider charged: per order (checkout or cart id), once.
#[derive(Default)]
struct Charges {
    /// Prices the test announces before paying, in cents.
    prices: std::collections::HashMap<String, u64>,
    charged: std::collections::HashMap<String, u64>,
    attempts: std::collections::HashMap<String, u32>,
}

type SharedCharges = Arc<std::sync::Mutex<Charges>>;

/// How a provider treats an order, by its id's prefix: `ok` pays; `decline` refuses with a
/// signed Error receipt; `busy` answers 503 without charging the first time; `slow` times out
/// without charging the first time; `lost` charges and loses its answer the first time; `gone`
/// charges and never answers. Later attempts of an order pay it, charging it at most once.
enum Fate {
    Pay,
    Decline,
    Unavailable,
    TimeOut { charge: bool },
}

fn fate(id: &str, attempt: u32) -> Fate {
    match id.split('_').next().unwrap_or_default() {
        "decline" => Fate::Decline,
        "busy" if attempt == 0 => Fate::Unavailable,
        "slow" if attempt == 0 => Fate::TimeOut { charge: false },
        "lost" if attempt == 0 => Fate::TimeOut { charge: true },
        "gone" => Fate::TimeOut { charge: true },
        _ => Fate::Pay,
    }
}

/// Longer than the daemon's provider timeout in the test below.
const LOST: Duration = Duration::from_secs(3);

impl Charges {
    /// Decides this attempt's fate and books the charge it makes.
    fn attempt(charges: &SharedCharges, id: &str) -> (Fate, u64) {
        let mut book = charges.lock().expect("charges");
        let attempt = *book.attempts.entry(id.to_owned()).and_modify(|n| *n += 1).or_insert(0);
        let fate = fate(id, attempt);
        let charges_now = matches!(fate, Fate::Pay | Fate::TimeOut { charge: true });
        let price = *book.prices.get(id).expect("the test announced the price");
        if charges_now {
            book.charged.entry(id.to_owned()).or_insert(price);
        }
        (fate, price)
    }
}

struct ChargingMerchant {
    charges: SharedCharges,
}

impl Respond for ChargingMerchant {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().split('/').nth(4).expect("checkout id").to_owned();
        let body: Value = serde_json::from_slice(&request.body).expect("JSON");
        let checkout_reference = sha256_b64(&closed_jwt(body["checkout_mandate"].as_str().expect("checkout_mandate")));
        let payment_reference =
            body["payment_token"].as_str().and_then(|t| t.strip_prefix("tok_")).expect("a CP token").to_owned();
        let (fate, _) = Charges::attempt(&self.charges, &id);
        let receipts = |ok: bool| {
            let (checkout, payment) = if ok {
                (
                    json!({ "status": "Success", "iss": "merchant", "iat": now_secs(), "reference": checkout_reference,
                            "order_id": format!("order_{id}") }),
                    json!({ "status": "Success", "iss": "mpp", "iat": now_secs(), "reference": payment_reference,
                            "payment_id": format!("pay_{id}"), "psp_confirmation_id": format!("psp_{id}"),
                            "network_confirmation_id": format!("net_{id}") }),
                )
            } else {
                (
                    json!({ "status": "Error", "iss": "merchant", "iat": now_secs(), "reference": checkout_reference,
                            "error": "payment_failed", "error_description": "declined" }),
                    json!({ "status": "Error", "iss": "mpp", "iat": now_secs(), "reference": payment_reference,
                            "error": "card_declined", "error_description": "do not honor", "payment_id": format!("pay_{id}") }),
                )
            };
            json!({ "checkout_receipt": TestKey::load("merchant").sign("JWT", &checkout.to_string()),
                    "payment_receipt": TestKey::load("processor").sign("JWT", &payment.to_string()) })
        };
        match fate {
            Fate::Pay => ResponseTemplate::new(200).set_body_json(receipts(true)),
            Fate::Decline => ResponseTemplate::new(200).set_body_json(receipts(false)),
            Fate::Unavailable => ResponseTemplate::new(503).set_body_json(json!({ "error": "unavailable" })),
            Fate::TimeOut { .. } => ResponseTemplate::new(200).set_body_json(receipts(true)).set_delay(LOST),
        }
    }
}

struct ChargingProcessor {
    charges: SharedCharges,
}

impl Respond for ChargingProcessor {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).expect("JSON");
        let id = body["cart_mandate"]["contents"]["id"].as_str().expect("cart id").to_owned();
        let reference = body["payment_mandate"]["payment_mandate_contents"]["payment_mandate_id"]
            .as_str()
            .expect("mandate id")
            .to_owned();
        let (fate, _) = Charges::attempt(&self.charges, &id);
        let receipt = |ok: bool| {
            let receipt = if ok {
                json!({ "status": "Success", "iss": "mpp", "iat": now_secs(), "reference": reference, "payment_id": format!("pay_{id}"),
                        "psp_confirmation_id": format!("psp_{id}"), "network_confirmation_id": format!("net_{id}") })
            } else {
                json!({ "status": "Error", "iss": "mpp", "iat": now_secs(), "reference": reference,
                        "error": "card_declined", "error_description": "do not honor", "payment_id": format!("pay_{id}") })
            };
            json!({ "payment_receipt": TestKey::load("processor").sign("JWT", &receipt.to_string()) })
        };
        match fate {
            Fate::Pay => ResponseTemplate::new(200).set_body_json(receipt(true)),
            Fate::Decline => ResponseTemplate::new(200).set_body_json(receipt(false)),
            Fate::Unavailable => ResponseTemplate::new(503).set_body_json(json!({ "error": "unavailable" })),
            Fate::TimeOut { .. } => ResponseTemplate::new(200).set_body_json(receipt(true)).set_delay(LOST),
        }
    }
}

#[tokio::test]
async fn ap2_what_the_merchants_charged_is_what_the_ledger_settled() {
    let charges: SharedCharges = Arc::default();
    let cp = credential_provider(false).await;
    let shop = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/ap2/v0\.2/checkouts/[^/]+/complete$"))
        .respond_with(ChargingMerchant { charges: charges.clone() })
        .mount(&shop)
        .await;
    let processor = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ap2/v0.1/payments"))
        .respond_with(ChargingProcessor { charges: charges.clone() })
        .mount(&processor)
        .await;
    let config = || Ap2Config {
        timeout: Duration::from_millis(500),
        ..ap2_config(&cp, &[("merchant_1", &shop)], Some(&processor))
    };
    let first = spawn(config()).await;
    let second = spawn_app_with(AppOptions {
        redis: Some((first.redis.clone().expect("redis"), "sc".into())),
        protocols: ProtocolConfig { ap2: config(), ..Default::default() },
        ..Default::default()
    })
    .await;
    let agent = first.create_agent("summed", 10_000 * USD, None).await;
    let jwk = agent_jwk(&first, &agent).await;
    let now = (first.clock.now_ms() / 1000) as i64;
    let terms = MandateTerms {
        budget: Some("5000.00"),
        items: Items::GiftCard,
        payees: vec!["merchant_1"],
        merchants: vec!["merchant_1"],
        ..MandateTerms::default()
    };
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &terms, now);
    let merchant_key = TestKey::load("merchant");
    let mut unknown_holds: Vec<(String, String)> = Vec::new();

    // v0.2: each checkout paid by the agent with a key, then retried with the same key while
    // its outcome is unknown; duplicates with other keys; a high-S copy of one checkout.
    let orders: [(&str, u64); 7] = [
        ("ok_1", 1_000),
        ("decline_1", 2_000),
        ("busy_1", 3_000),
        ("slow_1", 4_000),
        ("lost_1", 5_000),
        ("ok_2", 6_000),
        ("gone_1", 7_000),
    ];
    for (n, (id, cents)) in orders.iter().enumerate() {
        charges.lock().expect("charges").prices.insert((*id).to_owned(), *cents);
        let checkout_jwt = CheckoutTerms::single(id, "merchant_1", *cents as i64).sign(&merchant_key, now);
        let body = payment_body(&mandates, &checkout_jwt, "e2e");
        let app = if n % 2 == 0 { &first } else { &second };
        let key = format!("key-{id}");
        let (mut status, mut answer) = pay_with(app, &agent, Some(&key), body.clone()).await;
        for _retry in 0..3 {
            if status != 502 || id.starts_with("gone") {
                break;
            }
            assert_eq!(answer["hold_state"], "unknown", "{id}: {answer}");
            (status, answer) =
                pay_with(if n % 2 == 0 { &second } else { &first }, &agent, Some(&key), body.clone()).await;
        }
        match id.split('_').next() {
            Some("decline") => {
                assert_eq!((status, answer["code"].as_str()), (402, Some("ap2_payment_declined")), "{answer}")
            }
            Some("gone") => {
                assert_eq!((status, answer["code"].as_str()), (502, Some("ap2_outcome_unknown")), "{answer}");
                unknown_holds.push(((*id).to_owned(), answer["hold_id"].as_str().expect("hold").to_owned()));
            }
            _ => assert_eq!(status, 200, "{id}: {answer}"),
        }
        // The same checkout under another key replays the same answer; its high-S copy is refused.
        if id.starts_with("ok") {
            let (again, replayed) = pay_with(&second, &agent, Some(&format!("dup-{id}")), body.clone()).await;
            assert_eq!((again, replayed["replayed"].as_bool()), (200, Some(true)), "{replayed}");
            let copy = payment_body(&mandates, &high_s(&checkout_jwt), "e2e");
            let (refused, body) = pay_with(&first, &agent, Some(&format!("copy-{id}")), copy).await;
            assert_eq!((refused, body["code"].as_str()), (422, Some("ap2_signature_not_canonical")), "{body}");
        }
    }

    // v0.1 carts through the processor, on both instances.
    let carts: [(&str, u64); 4] =
        [("ok_cart", 1_500), ("decline_cart", 2_500), ("lost_cart", 3_500), ("busy_cart", 4_500)];
    for (n, (id, cents)) in carts.iter().enumerate() {
        charges.lock().expect("charges").prices.insert((*id).to_owned(), *cents);
        let request = cart_request(now, id, *cents, "e2e-v01");
        let key = format!("key-{id}");
        let (mut status, mut answer) =
            pay_cart(if n % 2 == 0 { &first } else { &second }, &agent, Some(&key), &request).await;
        for _retry in 0..3 {
            if status != 502 {
                break;
            }
            (status, answer) = pay_cart(&first, &agent, Some(&key), &request).await;
        }
        if id.starts_with("decline") {
            assert_eq!((status, answer["code"].as_str()), (402, Some("ap2_payment_declined")), "{answer}");
        } else {
            assert_eq!(status, 200, "{id}: {answer}");
        }
        let (again, replayed) = pay_cart(&second, &agent, Some(&format!("dup-{id}")), &request).await;
        assert_eq!((again, replayed["replayed"].as_bool()), (status, Some(true)), "{replayed}");
    }

    // The operator resolves what stayed unknown from the merchant's own books.
    let (_, listed) = first.admin(reqwest::Method::GET, "/v1/holds?state=unknown", None).await;
    let listed: Vec<&str> =
        listed["holds"].as_array().expect("holds").iter().filter_map(|h| h["hold_id"].as_str()).collect();
    assert_eq!(listed, unknown_holds.iter().map(|(_, h)| h.as_str()).collect::<Vec<_>>());
    for (id, hold) in &unknown_holds {
        let charged = charges.lock().expect("charges").charged.get(id).copied();
        let body = match charged {
            Some(cents) => {
                json!({ "outcome": "settled", "amount_micros": cents * 10_000, "reason": format!("merchant charged order {id}") })
            }
            None => json!({ "outcome": "voided", "reason": format!("merchant never charged order {id}") }),
        };
        let (status, resolved) =
            second.admin(reqwest::Method::POST, &format!("/v1/holds/{hold}/resolve"), Some(body)).await;
        assert_eq!(status, 200, "{resolved}");
    }

    // What the merchant and the processor charged is what the ledger settled for AP2.
    let charged: u64 = charges.lock().expect("charges").charged.values().map(|cents| cents * 10_000).sum();
    let log = first.log().await;
    let settled: u64 = log_of(&log, "settle")
        .iter()
        .filter(|e| e["protocol"] == "ap2")
        .map(|e| e["amount"].as_u64().expect("amount"))
        .sum();
    assert_eq!(settled, charged, "settled {settled} vs charged {charged}");
    assert_eq!(charged, (1_000 + 3_000 + 4_000 + 5_000 + 6_000 + 7_000 + 1_500 + 3_500 + 4_500) * 10_000);
    let balance = me(&first, &agent).await;
    assert_eq!(
        (balance["spent_micros"].as_u64(), balance["held_micros"].as_u64(), balance["unknown_micros"].as_u64()),
        (Some(charged), Some(0), Some(0)),
        "{balance}"
    );
}

/// The ledger calls and provider requests of one AP2 v0.2 payment, as Redis and the providers
/// saw them (see `calls.rs`), after the open mandates are registered: the balance the flow reads
/// first, the agent's key, precheck, the checkout's
/// claim (its own budget, created once per checkout), the hold (charging the mandate's budget
/// and the claim), and the settle (the receipt signed ahead and linked, and the answer stored
/// for duplicates, in the same call); one Credential Provider token, one merchant completion.
#[tokio::test]
async fn ap2_a_payment_costs_its_counted_ledger_calls_and_provider_requests() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("counted", 500 * USD, None).await;
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
    let body = json!({ "open_checkout_mandate": mandates.checkout, "open_payment_mandate": mandates.payment });
    let (status, registered) =
        app.agent_call(&agent.token, reqwest::Method::POST, "/v1/ap2/mandates", Some(body)).await;
    assert_eq!(status, 201, "{registered}");
    let checkout_jwt = CheckoutTerms::shoes("chk_counted").sign(&TestKey::load("merchant"), now);
    let redis = app.redis.clone().expect("a Redis ledger");
    let (cp_before, shop_before) = (received(&cp).await.len(), received(&shop).await.len());
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let (status, paid) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    let calls = crate::calls::purchase_calls(calls.stop(&redis));
    assert_eq!((status, paid["status"].as_str()), (200, Some("paid")), "{paid}");
    let expected = [
        // Authentication's standing read and the agent's AP2 key (an attribute, `HGET`).
        "FCALL spendcap_balance",
        "HGET",
        "FCALL spendcap_precheck",
        // The open payment mandate's budget (ensured) and the checkout's claim.
        "FCALL spendcap_create_bucket",
        "FCALL spendcap_create_bucket",
        "FCALL spendcap_hold",
        "FCALL spendcap_settle",
    ];
    assert_eq!(calls, expected, "ledger calls of one payment");
    assert_eq!((received(&cp).await.len() - cp_before, received(&shop).await.len() - shop_before), (1, 1));
}

#[tokio::test]
async fn ap2_a_payment_waiting_for_approval_signs_nothing_and_pays_once_approved() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let agent = app.create_agent("approved-shopper", 500 * USD, None).await;
    let rule = json!({ "approval": { "above_micros": 100_000_000, "ttl_secs": 600 } });
    let (status, shown) = app.admin(reqwest::Method::PUT, "/v1/agents/approved-shopper/controls", Some(rule)).await;
    assert_eq!(status, 200, "{shown}");
    let jwk = agent_jwk(&app, &agent).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
    let checkout_jwt = CheckoutTerms::shoes("chk_approval").sign(&TestKey::load("merchant"), now);

    let (status, waiting) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert!(received(&cp).await.is_empty(), "no closed mandate reached the Credential Provider");
    assert!(received(&shop).await.is_empty(), "nothing reached the merchant");
    assert_eq!(me(&app, &agent).await["held_micros"], 146_260_000, "held meanwhile");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();

    let (status, _) = app.admin(reqwest::Method::POST, &format!("/v1/approvals/{id}/approve"), Some(json!({}))).await;
    assert_eq!(status, 200);
    let (status, paid) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!((status, paid["status"].as_str()), (200, Some("paid")), "{paid}");
    let (status, again) = pay(&app, &agent, &mandates, &checkout_jwt).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(received(&cp).await.len(), 1, "paid once");
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(146_260_000), Some(0)));
}

/// A daemon paying AP2 v0.1 carts through `processor` (the v0.1 processor simulation), with the
/// v0.2 Credential Provider and merchant beside it: (app, processor, credential provider, shop).
pub(crate) async fn v01_world() -> (TestApp, MockServer, MockServer, MockServer) {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let processor = MockServer::start().await;
    Mock::given(method("POST")).and(path("/ap2/v0.1/payments")).respond_with(ProcessorSim).mount(&processor).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], Some(&processor))).await;
    (app, processor, cp, shop)
}

/// Registering open mandates names who did it on the `budget` log entry: the agent itself
/// (`agent:<id>`) or the admin-side principal that registered them for it.
#[tokio::test]
async fn registering_open_mandates_is_attributed_in_the_log() {
    let cp = credential_provider(false).await;
    let shop = merchant_server(MerchantMode::Paid).await;
    let app = spawn(ap2_config(&cp, &[("merchant_1", &shop)], None)).await;
    let now = (app.clock.now_ms() / 1000) as i64;
    let mut by = Vec::new();
    for (handle, as_admin) in [("self-registered", false), ("admin-registered", true)] {
        let agent = app.create_agent(handle, 500 * USD, None).await;
        let jwk = agent_jwk(&app, &agent).await;
        let mandates = issue_mandates(&TestKey::load("user"), &jwk, &MandateTerms::default(), now);
        let body = json!({ "open_checkout_mandate": mandates.checkout, "open_payment_mandate": mandates.payment });
        let (status, registered) = if as_admin {
            app.admin(reqwest::Method::POST, &format!("/v1/ap2/agents/{}/mandates", agent.id), Some(body)).await
        } else {
            app.agent_call(&agent.token, reqwest::Method::POST, "/v1/ap2/mandates", Some(body)).await
        };
        assert_eq!(status, 201, "{registered}");
        let log = app.log().await;
        let entry = log_of(&log, "budget").into_iter().find(|e| e["agent"] == agent.id.as_str()).cloned();
        let entry = entry.unwrap_or_else(|| panic!("a budget entry for {handle}"));
        by.push((entry["by"].as_str().unwrap_or_default().to_owned(), agent.id.clone()));
    }
    assert_eq!(by[0].0, format!("agent:{}", by[0].1));
    assert_eq!(by[1].0, "admin");
}
