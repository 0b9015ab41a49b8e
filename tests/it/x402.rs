//! The x402 endpoint end to end: a real daemon on a real Redis, paying simulated resource servers
//! (wiremock over real HTTP, driven by `fixtures/x402/`). Every test checks what the user cares
//! about: the money on the ledger, the log lines, what the resource server received, and that
//! the payment it received is signed by the daemon's key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::x402::{parse_address, parse_payment_header, recover_signer, EvmSigner, PaymentPayload, TokenDomain};
use adapters::Micros;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::x402::X402Config;
use spendcap::protocols::ProtocolConfig;
use spendcap::receipt::Receipt;
use wiremock::matchers::{header_exists, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{spawn_app_with, wait_for, Agent, AppOptions, TestApp};

/// The public Hardhat/Anvil key #0 (the spec's test vector key).
const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const PAYER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
const PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";
const USDC_BASE_SEPOLIA: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/x402")
}

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(name)).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn base64_json(value: &Value) -> String {
    STANDARD.encode(serde_json::to_vec(value).expect("serializes"))
}

/// The daemon's x402 configuration in tests: the test key, 127.0.0.1 allow-listed (wiremock
/// listens there), and every payment recorded for the conformance check.
pub(crate) fn config() -> X402Config {
    X402Config {
        signer: Some(EvmSigner::from_hex(TEST_KEY).expect("test key")),
        allow_private: vec!["127.0.0.1".parse().expect("address")],
        conformance: ConformanceSink::to_dir(ConformanceSink::test_dir()),
        ..X402Config::default()
    }
}

pub(crate) async fn app_with(x402: X402Config) -> TestApp {
    spawn_app_with(AppOptions { protocols: ProtocolConfig { x402, ..Default::default() }, ..Default::default() }).await
}

fn v2_required(amount: &str) -> Value {
    let mut required = fixture("v2_payment_required.json");
    required["accepts"][0]["amount"] = json!(amount);
    required
}

fn v1_required(amount: &str) -> Value {
    let mut required = fixture("v1_payment_required.json");
    required["accepts"][0]["maxAmountRequired"] = json!(amount);
    required
}

/// The 402 a v2 server answers an unpaid request with.
fn v2_402(required: &Value) -> ResponseTemplate {
    ResponseTemplate::new(402).insert_header("payment-required", base64_json(required)).set_body_json(json!({}))
}

/// A paid answer with a successful settlement report.
fn v2_paid() -> ResponseTemplate {
    ResponseTemplate::new(200)
        .insert_header("payment-response", base64_json(&fixture("settlement_success.json")))
        .insert_header("x-upstream", "weather-v2")
        .set_body_raw(r#"{"forecast":"sunny"}"#, "application/json")
}

/// A v2 resource server at `/weather`: 402 without a payment, the resource with one.
pub(crate) async fn v2_server(amount: &str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_paid())
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required(amount))).with_priority(10).mount(&server).await;
    server
}

/// The payments a resource server received, decoded.
pub(crate) async fn payments(server: &MockServer) -> Vec<PaymentPayload> {
    let requests = server.received_requests().await.expect("requests are recorded");
    requests
        .iter()
        .filter(|r| r.headers.contains_key("payment-signature") || r.headers.contains_key("x-payment"))
        .map(|r| parse_payment_header(&r.headers).expect("the payment header is well-formed"))
        .collect()
}

async fn request_count(server: &MockServer) -> usize {
    server.received_requests().await.expect("requests are recorded").len()
}

fn usdc_base_sepolia() -> TokenDomain {
    TokenDomain {
        name: "USDC".to_owned(),
        version: "2".to_owned(),
        chain_id: 84532,
        verifying_contract: parse_address("asset", USDC_BASE_SEPOLIA).expect("address"),
    }
}

fn assert_signed_by_daemon(payment: &PaymentPayload) {
    let signer = recover_signer(payment.exact().expect("an exact payment"), &usdc_base_sepolia())
        .expect("the signature recovers");
    assert_eq!(signer.to_string(), PAYER, "the payment is signed by the daemon's key");
    assert_eq!(payment.exact().expect("an exact payment").authorization.from, PAYER);
}

pub(crate) async fn fetch(app: &TestApp, token: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/x402/fetch")).bearer_auth(token).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("fetch");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The agent's balance as it sees it (`/v1/me` releases due holds first).
async fn me(app: &TestApp, agent: &Agent) -> Value {
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The agent's log lines (without its creation), with `detail` parsed.
async fn log_of(app: &TestApp, agent: &Agent) -> Vec<Value> {
    let mut entries: Vec<Value> =
        app.log().await.into_iter().filter(|e| e["agent"] == agent.id.as_str() && e["event"] != "create").collect();
    for entry in &mut entries {
        let detail = entry["detail"].as_str().unwrap_or_default();
        entry["detail"] =
            if detail.is_empty() { json!({}) } else { serde_json::from_str(detail).expect("detail JSON") };
    }
    entries
}

fn events(entries: &[Value]) -> Vec<&str> {
    entries.iter().map(|e| e["event"].as_str().unwrap_or_default()).collect()
}

#[tokio::test]
async fn v2_paid_fetch_end_to_end() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("v2-payer", 1_000_000, None).await;

    let url = format!("{}/weather?city=Paris", server.uri());
    let (status, body) = fetch(&app, &agent.token, json!({"url": url, "task": "weather-1"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], 200);
    assert_eq!(body["body"], r#"{"forecast":"sunny"}"#);
    assert_eq!(body["headers"]["x-upstream"], "weather-v2");
    assert_eq!(body["replayed"], false);
    let payment = &body["payment"];
    assert_eq!(payment["status"], "settled");
    assert_eq!(payment["amount_micros"], 10_000);
    assert_eq!(payment["pay_to"], PAY_TO);
    assert_eq!(payment["network"], "eip155:84532");
    assert_eq!(payment["asset"], USDC_BASE_SEPOLIA);
    let transaction = fixture("settlement_success.json")["transaction"].clone();
    assert_eq!(payment["transaction"], transaction);

    // The server received one payment: v2, the fixture's requirement echoed, exactly the price,
    // valid for maxTimeoutSeconds, with a payment identifier, signed by the daemon's key.
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 1);
    let PaymentPayload::V2(v2) = &sent[0] else { panic!("a v2 server gets a v2 payment") };
    assert_eq!(serde_json::to_value(&v2.accepted).expect("serializes"), v2_required("10000")["accepts"][0]);
    let authorization = &v2.payload.authorization;
    assert_eq!((authorization.to.as_str(), authorization.value.as_str()), (PAY_TO, "10000"));
    assert_eq!(authorization.valid_after, "0");
    let valid_before: u64 = authorization.valid_before.parse().expect("number");
    let now_secs = app.clock.now_ms() / 1000;
    assert!((now_secs + 55..=now_secs + 60).contains(&valid_before), "validBefore {valid_before} vs now {now_secs}");
    assert_eq!(payment["nonce"], authorization.nonce.as_str());
    assert_eq!(payment["valid_before"], valid_before);
    let extensions = v2.extensions.as_ref().expect("the server declared payment-identifier");
    let payment_id = extensions["payment-identifier"]["info"]["id"].as_str().expect("an id is sent");
    assert!(payment_id.len() >= 16);
    assert_signed_by_daemon(&sent[0]);

    // The money: settled for the price, nothing left held.
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(10_000), Some(0)));

    // The receipt is signed by the daemon and names the host, payee, network, asset, nonce and
    // transaction.
    let receipt: Receipt = serde_json::from_value(payment["receipt"].clone()).expect("a receipt");
    let (_, key) = app.admin(Method::GET, "/v1/receipt-key", None).await;
    let key = spendcap::receipt::parse_public_key(key["public_key"].as_str().expect("key")).expect("public key");
    spendcap::receipt::verify(&receipt, &key).expect("the receipt verifies");
    assert_eq!(receipt.receipt.service, "127.0.0.1");
    assert_eq!(receipt.receipt.protocol, "x402");
    assert_eq!(receipt.receipt.task, "weather-1");
    assert_eq!(receipt.receipt.amount_micros, 10_000);
    let details = &receipt.receipt.details;
    assert_eq!(details["nonce"], authorization.nonce.as_str());
    assert_eq!(details["pay_to"], PAY_TO);
    assert_eq!(details["network"], "eip155:84532");
    assert_eq!(details["asset"], USDC_BASE_SEPOLIA);
    assert_eq!(details["transaction"], transaction);
    assert_eq!(details["payer"], PAYER);

    // The log: a hold and a settle, attributed to the host, carrying the same facts.
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "settle"]);
    for entry in &log {
        assert_eq!(entry["service"], "127.0.0.1");
        assert_eq!(entry["protocol"], "x402");
        assert_eq!(entry["task"], "weather-1");
        assert_eq!(entry["detail"]["nonce"], authorization.nonce.as_str());
        assert_eq!(entry["detail"]["pay_to"], PAY_TO);
        assert_eq!(entry["detail"]["network"], "eip155:84532");
        assert_eq!(entry["detail"]["asset"], USDC_BASE_SEPOLIA);
    }
    assert_eq!(log[0]["detail"]["payment_id"], payment_id);
    assert_eq!(log[1]["detail"]["transaction"], transaction);
}

#[tokio::test]
async fn v1_paid_fetch_end_to_end() {
    let app = app_with(config()).await;
    let server = MockServer::start().await;
    let mut settlement = fixture("settlement_success.json");
    settlement["network"] = json!("base-sepolia");
    Mock::given(path("/report"))
        .and(header_exists("x-payment"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-payment-response", base64_json(&settlement))
                .set_body_raw("the v1 report", "text/plain"),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/report"))
        .respond_with(ResponseTemplate::new(402).set_body_json(v1_required("20000")))
        .with_priority(10)
        .mount(&server)
        .await;
    let agent = app.create_agent("v1-payer", 1_000_000, None).await;

    let request = json!({"url": format!("{}/report", server.uri()), "method": "post",
        "headers": {"content-type": "application/json"}, "body": "{\"q\":1}", "task": "report"});
    let (status, body) = fetch(&app, &agent.token, request, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body"], "the v1 report");
    assert_eq!(body["payment"]["status"], "settled");
    assert_eq!(body["payment"]["amount_micros"], 20_000);
    assert_eq!(body["payment"]["network"], "base-sepolia");

    let sent = payments(&server).await;
    assert_eq!(sent.len(), 1);
    let PaymentPayload::V1(v1) = &sent[0] else { panic!("a v1 server gets a v1 payment") };
    assert_eq!((v1.scheme.as_str(), v1.network.as_str()), ("exact", "base-sepolia"));
    let authorization = &v1.payload.authorization;
    assert_eq!((authorization.to.as_str(), authorization.value.as_str()), (PAY_TO, "20000"));
    let valid_after: u64 = authorization.valid_after.parse().expect("number");
    let valid_before: u64 = authorization.valid_before.parse().expect("number");
    assert_eq!(valid_before - valid_after, 600 + 60, "v1 backdates validAfter by 600 s");
    assert_signed_by_daemon(&sent[0]);
    // The request itself reached the server as the agent sent it, both times.
    let requests = server.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.method.as_str(), "POST");
        assert_eq!(request.body, b"{\"q\":1}");
        assert_eq!(request.headers["content-type"], "application/json");
    }

    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(20_000), Some(0)));
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "settle"]);
    assert_eq!(log[1]["detail"]["nonce"], authorization.nonce.as_str());
    assert_eq!(log[1]["detail"]["network"], "base-sepolia");
}

#[tokio::test]
async fn the_proxy_form_pays_for_a_plain_http_client() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    Mock::given(path("/free"))
        .respond_with(ResponseTemplate::new(200).set_body_raw("free lunch", "text/plain"))
        .mount(&server)
        .await;
    Mock::given(path("/moved"))
        .respond_with(ResponseTemplate::new(302).insert_header("location", "http://169.254.169.254/latest"))
        .mount(&server)
        .await;
    let agent = app.create_agent("proxy-payer", 1_000_000, None).await;
    // A plain client: only the URL changes (plus the token and a task label).
    let client = reqwest::Client::new();
    let proxied = |target: &str| format!("{}/v1/x402/proxy/{}{}", app.base, server.uri(), target);

    let response = client
        .get(proxied("/weather?city=Paris&units=metric"))
        .bearer_auth(&agent.token)
        .header("X-Spendcap-Task", "proxy-task")
        .header("Accept", "application/json")
        .send()
        .await
        .expect("proxied fetch");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-upstream"], "weather-v2");
    assert!(headers.contains_key("payment-response"), "the settlement report is passed back verbatim");
    assert_eq!(headers["x-spendcap-payment"], "settled");
    assert_eq!(headers["x-spendcap-amount-micros"], "10000");
    let receipt = URL_SAFE_NO_PAD.decode(headers["x-spendcap-receipt"].as_bytes()).expect("base64url receipt");
    let receipt: Receipt = serde_json::from_slice(&receipt).expect("receipt JSON");
    assert_eq!(receipt.receipt.task, "proxy-task");
    assert_eq!(receipt.receipt.details["nonce"], headers["x-spendcap-nonce"].to_str().expect("ASCII"));
    assert_eq!(response.text().await.expect("body"), r#"{"forecast":"sunny"}"#);

    // The upstream saw the agent's request (query and headers), never its spendcap token or
    // spendcap's own headers.
    let requests = server.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(request.url.query(), Some("city=Paris&units=metric"));
        assert_eq!(request.headers["accept"], "application/json");
        assert!(!request.headers.contains_key("authorization"));
        assert!(!request.headers.contains_key("x-spendcap-task"));
    }
    assert_signed_by_daemon(&payments(&server).await[0]);

    // Free resources pass through unpaid; redirects are passed back, not followed.
    let free = client.get(proxied("/free")).bearer_auth(&agent.token).send().await.expect("free fetch");
    assert_eq!(free.status(), 200);
    assert_eq!(free.headers()["x-spendcap-payment"], "none");
    assert_eq!(free.text().await.expect("body"), "free lunch");
    let redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let moved = redirect.get(proxied("/moved")).bearer_auth(&agent.token).send().await.expect("redirected fetch");
    assert_eq!(moved.status(), 302);
    assert_eq!(moved.headers()["location"], "http://169.254.169.254/latest");

    // The per-call maximum in a header: refused before anything is held or signed.
    let refused = client
        .get(proxied("/weather?city=Oslo"))
        .bearer_auth(&agent.token)
        .header("X-Spendcap-Max-Amount-Micros", "5000")
        .send()
        .await
        .expect("capped fetch");
    assert_eq!(refused.status(), 402);
    assert_eq!(refused.headers()["x-spendcap-error"], "x402_over_payment_maximum");
    let body: Value = refused.json().await.expect("JSON error");
    assert_eq!(body["code"], "x402_over_payment_maximum");
    assert_eq!(payments(&server).await.len(), 1);

    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(10_000), Some(0)));
}

#[tokio::test]
async fn over_the_cap_or_the_maximum_nothing_is_signed() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let url = format!("{}/weather", server.uri());

    // Over the cap: the ledger refuses, the refusal is logged, no payment reaches the server.
    let poor = app.create_agent("poor", 5_000, None).await;
    let (status, body) = fetch(&app, &poor.token, json!({"url": url, "task": "t"}), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "cap_exceeded");
    assert_eq!((body["requested_micros"].as_u64(), body["remaining_micros"].as_u64()), (Some(10_000), Some(5_000)));
    let log = log_of(&app, &poor).await;
    assert_eq!(events(&log), ["refuse"]);
    assert_eq!(log[0]["reason"], "cap_exceeded");
    assert_eq!(log[0]["service"], "127.0.0.1");

    // Over the agent's per-call maximum, and over the daemon's per-payment maximum.
    let rich = app.create_agent("rich", 100_000_000, None).await;
    let (status, body) = fetch(&app, &rich.token, json!({"url": url, "max_amount_micros": 9_999}), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "x402_over_payment_maximum");
    assert_eq!((body["requested_micros"].as_u64(), body["maximum_micros"].as_u64()), (Some(10_000), Some(9_999)));
    let pricey = v2_server("2000000").await;
    let (status, body) = fetch(&app, &rich.token, json!({"url": format!("{}/weather", pricey.uri())}), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "x402_over_payment_maximum");
    let (status, body) = fetch(&app, &rich.token, json!({"url": url, "max_amount_micros": -1}), None).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("amount_negative")));

    // The servers saw requests, never a payment; nothing is held or spent.
    assert!(request_count(&server).await >= 2);
    assert!(payments(&server).await.is_empty());
    assert!(payments(&pricey).await.is_empty());
    assert!(log_of(&app, &rich).await.is_empty());
    for agent in [&poor, &rich] {
        let balance = me(&app, agent).await;
        assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
    }
}

#[tokio::test]
async fn a_refused_request_is_paid_once_the_cap_is_raised() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("topped-up", 5_000, None).await;
    let request = json!({"url": format!("{}/weather", server.uri()), "task": "t"});
    for key in [None, Some("explicit-1")] {
        let (status, body) = fetch(&app, &agent.token, request.clone(), key).await;
        assert_eq!((status, body["code"].as_str()), (402, Some("cap_exceeded")), "{body}");
    }
    let (status, _) =
        app.admin(Method::PUT, &format!("/v1/agents/{}/cap", agent.id), Some(json!({"cap_micros": 1_000_000}))).await;
    assert_eq!(status, 200);

    // The same request without a key is paid now; a refusal held nothing, so nothing is at risk.
    let (status, body) = fetch(&app, &agent.token, request.clone(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["status"], "settled");
    // Its retry finds that purchase and replays it.
    let (status, again) = fetch(&app, &agent.token, request.clone(), None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!((again["replayed"].as_bool(), &again["payment"]), (Some(true), &body["payment"]));
    // A refused purchase had no effect, so the ledger kept no answer for its key either: the
    // explicit key's retry is decided afresh and pays (its own purchase, under its own key).
    let (status, body) = fetch(&app, &agent.token, request.clone(), Some("explicit-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["payment"]["status"].as_str(), body["replayed"].as_bool()), (Some("settled"), Some(false)));
    let (status, again) = fetch(&app, &agent.token, request, Some("explicit-1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");

    assert_eq!(payments(&server).await.len(), 2);
    assert_eq!(events(&log_of(&app, &agent).await), ["refuse", "refuse", "cap", "hold", "settle", "hold", "settle"]);
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(20_000), Some(0)));
}

#[tokio::test]
async fn revoked_and_unauthenticated_callers_get_nothing_fetched() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let url = format!("{}/weather", server.uri());
    let agent = app.create_agent("to-revoke", 1_000_000, None).await;
    let (status, _) = app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({"reason": "runaway_loop"})))
        .await;
    assert_eq!(status, 200);

    let (status, body) = fetch(&app, &agent.token, json!({"url": url}), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "agent_revoked");
    // A token of the right shape for an agent that exists, but not its token.
    let forged = format!("sct_{}_{}", agent.id, "0".repeat(64));
    let (status, body) = fetch(&app, &forged, json!({"url": url}), None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")));
    let proxied = format!("{}/v1/x402/proxy/{url}", app.base);
    let response = app.http.get(proxied).bearer_auth(&forged).send().await.expect("proxy");
    assert_eq!(response.status(), 401);

    assert_eq!(request_count(&server).await, 0, "nothing was fetched for them");
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_never_pass_the_cap() {
    let app = Arc::new(app_with(config()).await);
    let server = v2_server("10000").await;
    let agent = Arc::new(app.create_agent("racer", 250_000, None).await);

    let mut tasks = Vec::new();
    for n in 0..50 {
        let (app, agent) = (app.clone(), agent.clone());
        let url = format!("{}/weather?n={n}", server.uri());
        tasks.push(tokio::spawn(
            async move { fetch(&app, &agent.token, json!({"url": url, "task": "race"}), None).await },
        ));
    }
    let mut outcomes = BTreeMap::new();
    for task in tasks {
        let (status, body) = task.await.expect("task");
        let outcome = match status {
            200 => body["payment"]["status"].as_str().unwrap_or("?").to_owned(),
            _ => body["code"].as_str().unwrap_or("?").to_owned(),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    assert_eq!(outcomes, BTreeMap::from([("cap_exceeded".to_owned(), 25), ("settled".to_owned(), 25)]));

    let sent = payments(&server).await;
    assert_eq!(sent.len(), 25, "exactly the paid fetches sent a payment");
    let nonces: BTreeSet<&str> =
        sent.iter().map(|p| p.exact().expect("an exact payment").authorization.nonce.as_str()).collect();
    assert_eq!(nonces.len(), 25);
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(250_000), Some(0)));
    let log = log_of(&app, &agent).await;
    let count = |event: &str| log.iter().filter(|e| e["event"] == event).count();
    assert_eq!((count("hold"), count("settle"), count("refuse")), (25, 25, 25));
}

/// A resource that asks $0.01 and rejects every payment (`insufficient_funds`, a 402 again).
async fn rejecting_server() -> MockServer {
    let server = MockServer::start().await;
    let mut rejection = v2_required("10000");
    rejection["error"] = json!("insufficient_funds");
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_402(&rejection))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required("10000"))).with_priority(10).mount(&server).await;
    server
}

#[tokio::test]
async fn a_rejected_payment_stays_held_until_valid_before() {
    let app = app_with(config()).await;
    let server = rejecting_server().await;
    let agent = app.create_agent("rejected", 1_000_000, None).await;
    let request = json!({"url": format!("{}/weather", server.uri()), "task": "t"});

    let (status, body) = fetch(&app, &agent.token, request.clone(), Some("buy-1")).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "x402_payment_rejected");
    assert_eq!(body["reason"], "insufficient_funds");
    let held_until = body["held_until_ms"].as_u64().expect("held_until_ms");

    // No settle, no void: the authorization could still settle, so its amount stays held.
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(10_000)));
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "note"]);
    assert_eq!(log[1]["reason"], "x402_payment_rejected");
    assert_eq!(log[1]["detail"]["server_reason"], "insufficient_funds");
    assert_eq!(log[1]["detail"]["nonce"], body["nonce"]);

    // A retry of the same purchase re-sends the same authorization: no second hold.
    let (status, again) = fetch(&app, &agent.token, request.clone(), Some("buy-1")).await;
    assert_eq!((status, again["code"].as_str()), (402, Some("x402_payment_rejected")));
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "the very same signed authorization");

    // Once validBefore has passed, the ledger releases the hold by itself.
    app.clock.advance_ms((held_until - app.clock.now_ms()) as i64 + 1_000);
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "note", "note", "expire"]);
    assert_eq!(log[3]["released"], 10_000);

    // And the purchase signs nothing new under the same key.
    let (status, body) = fetch(&app, &agent.token, request, Some("buy-1")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("x402_authorization_expired")), "{body}");
    assert_eq!(payments(&server).await.len(), 2);
    assert_eq!(events(&log_of(&app, &agent).await).len(), 4);
}

#[tokio::test]
async fn a_lost_response_is_retried_with_the_same_authorization() {
    let app = app_with(X402Config { timeout: Duration::from_millis(1_000), ..config() }).await;
    let server = MockServer::start().await;
    // The first paid attempt is answered too late for the daemon: its response is lost.
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_paid().set_delay(Duration::from_secs(5)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_paid())
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required("10000"))).with_priority(10).mount(&server).await;
    let agent = app.create_agent("lost", 1_000_000, None).await;
    let request = json!({"url": format!("{}/weather", server.uri()), "task": "t"});

    let (status, body) = fetch(&app, &agent.token, request.clone(), None).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "x402_payment_outcome_unknown");
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(10_000)));

    // The plain retry (no idempotency key: the same request is the same purchase).
    let (status, body) = fetch(&app, &agent.token, request, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["status"], "settled");

    // One authorization, sent twice; one hold; settled once.
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "the retry re-sent the very same signed authorization");
    assert_signed_by_daemon(&sent[0]);
    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(10_000), Some(0)));
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "unknown", "settle"]);
    assert!(log[1]["reason"].as_str().expect("reason").starts_with("x402_outcome_unknown"), "{}", log[1]);
    assert_eq!(log[0]["hold"], log[2]["hold"]);
}

#[tokio::test]
async fn a_finished_purchase_is_replayed_and_a_new_price_is_a_conflict() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("replayer", 1_000_000, None).await;
    let request = json!({"url": format!("{}/weather", server.uri())});

    let (status, first) = fetch(&app, &agent.token, request.clone(), Some("order-7")).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = fetch(&app, &agent.token, request.clone(), Some("order-7")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["payment"], first["payment"]);
    assert_eq!(again["body"], first["body"]);
    assert_eq!(payments(&server).await.len(), 1, "paid once");

    // The same key for another price is a conflict; nothing is signed for it.
    server.reset().await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required("20000"))).mount(&server).await;
    let (status, body) = fetch(&app, &agent.token, request, Some("order-7")).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("idempotency_conflict")), "{body}");
    assert!(payments(&server).await.is_empty());

    let balance = me(&app, &agent).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(10_000), Some(0)));
    assert_eq!(events(&log_of(&app, &agent).await), ["hold", "settle"]);
}

/// One case of `fixtures/x402/parse/` (see its README).
struct ParseCase {
    name: String,
    case: Value,
}

fn parse_cases() -> Vec<ParseCase> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures().join("parse"))
        .expect("fixtures/x402/parse")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| ParseCase {
            name: path.file_stem().expect("name").to_string_lossy().into_owned(),
            case: serde_json::from_str(&std::fs::read_to_string(&path).expect("readable")).expect("JSON"),
        })
        .collect()
}

impl ParseCase {
    fn response(&self) -> ResponseTemplate {
        let mut response = ResponseTemplate::new(402);
        if let Some(headers) = self.case["headers"].as_object() {
            for (name, value) in headers {
                response = response.insert_header(name.as_str(), value.as_str().expect("header text"));
            }
        }
        if let Some(required) = self.case.get("payment_required") {
            response = response.insert_header("payment-required", base64_json(required));
        }
        match (self.case.get("body"), self.case["body_text"].as_str()) {
            (Some(body), _) => response.set_body_json(body),
            (None, Some(text)) => response.set_body_raw(text, "text/html"),
            (None, None) => response,
        }
    }
}

#[tokio::test]
async fn malformed_402s_hold_and_sign_nothing() {
    let max_response_bytes = 16 * 1024;
    let all = Micros::MAX.get();
    let app = app_with(X402Config { max_payment: Micros::MAX, max_response_bytes, ..config() }).await;
    let server = MockServer::start().await;
    let cases: Vec<ParseCase> = parse_cases().into_iter().filter(|c| c.case["expect"] != "ok").collect();
    assert!(cases.len() >= 30, "the fixture set is there ({} cases)", cases.len());
    for case in &cases {
        Mock::given(path(format!("/case/{}", case.name))).respond_with(case.response()).mount(&server).await;
    }
    // A 402 larger than the daemon reads.
    Mock::given(path("/case/oversized"))
        .respond_with(ResponseTemplate::new(402).set_body_raw(vec![b'{'; max_response_bytes + 1], "application/json"))
        .mount(&server)
        .await;
    let agent = app.create_agent("careful", 1_000_000_000, None).await;
    let before = me(&app, &agent).await;

    for case in &cases {
        let maximum = case.case["policy"]["max_payment_micros"].as_u64().unwrap_or(1_000_000).min(all);
        let request = json!({"url": format!("{}/case/{}", server.uri(), case.name), "max_amount_micros": maximum});
        let (status, body) = fetch(&app, &agent.token, request, None).await;
        let expected = case.case["expect"].as_str().expect("expect");
        assert_eq!(body["code"], expected, "case {}: {body}", case.name);
        assert!(status == 402 || status == 502, "case {}: status {status}", case.name);
        assert_eq!(body["upstream_status"], 402, "case {}", case.name);
    }
    let (status, body) =
        fetch(&app, &agent.token, json!({"url": format!("{}/case/oversized", server.uri())}), None).await;
    assert_eq!((status, body["code"].as_str()), (502, Some("x402_upstream_body_too_large")), "{body}");

    // Each case was fetched once, unpaid; nothing was held, signed, spent or logged.
    assert_eq!(request_count(&server).await, cases.len() + 1);
    assert!(payments(&server).await.is_empty());
    assert_eq!(me(&app, &agent).await, before);
    assert!(log_of(&app, &agent).await.is_empty());
}

#[tokio::test]
async fn private_destinations_are_refused_before_any_request() {
    // No allow-list: the loopback address wiremock listens on is refused like any private one.
    let app = app_with(X402Config { allow_private: Vec::new(), ..config() }).await;
    let server = v2_server("10000").await;
    let port = server.address().port();
    let agent = app.create_agent("ssrf", 1_000_000, None).await;

    for url in [
        format!("http://127.0.0.1:{port}/weather"),
        format!("http://localhost:{port}/weather"),
        format!("http://[::ffff:127.0.0.1]:{port}/weather"),
        format!("http://0x7f000001:{port}/weather"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://[fd00::1]/".to_owned(),
    ] {
        let (status, body) = fetch(&app, &agent.token, json!({"url": url}), None).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("x402_destination_forbidden")), "{url}: {body}");
    }
    let proxied = format!("{}/v1/x402/proxy/http://localhost:{port}/weather", app.base);
    let response = app.http.get(proxied).bearer_auth(&agent.token).send().await.expect("proxy");
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-spendcap-error"], "x402_destination_forbidden");
    for (url, code) in [("file:///etc/passwd", "invalid_url"), ("gopher://127.0.0.1/", "invalid_url")] {
        let (status, body) = fetch(&app, &agent.token, json!({"url": url}), None).await;
        assert_eq!((status, body["code"].as_str()), (422, Some(code)), "{url}: {body}");
    }

    assert_eq!(request_count(&server).await, 0, "no request reached the private address");
    assert!(log_of(&app, &agent).await.is_empty());
}

#[tokio::test]
async fn without_a_key_the_endpoint_is_not_configured() {
    let app = app_with(X402Config::default()).await;
    let agent = app.create_agent("keyless", 1_000_000, None).await;
    let (status, body) = fetch(&app, &agent.token, json!({"url": "https://api.example.com/weather"}), None).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("x402_not_configured")), "{body}");
    let proxied = format!("{}/v1/x402/proxy/https://api.example.com/weather", app.base);
    let response = app.http.get(proxied).bearer_auth(&agent.token).send().await.expect("proxy");
    assert_eq!(response.status(), 503);
    // Everything else works.
    assert_eq!(me(&app, &agent).await["cap_micros"], 1_000_000);
}

/// Issue 13 case 8: nothing is fetched for an agent that is revoked or whose controls deny x402
/// or the host, through either form, and each refusal is one like any other: its `refuse` line,
/// its count in the reports and in `spendcap_refusals_total`.
#[tokio::test]
async fn revoked_or_denied_agents_reach_no_server_and_every_refusal_is_counted() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let url = format!("{}/weather", server.uri());
    let revoked = app.create_agent("x-revoked", 1_000_000, None).await;
    let (status, _) = app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", revoked.id), Some(json!({"reason": "runaway_loop"})))
        .await;
    assert_eq!(status, 200);
    let no_x402 = app.create_agent("x-no-x402", 1_000_000, None).await;
    let no_host = app.create_agent("x-no-host", 1_000_000, None).await;
    for (agent, body) in [
        (&no_x402, json!({ "protocols": { "deny": ["x402"] } })),
        (&no_host, json!({ "services": { "deny": ["127.0.0.1"] } })),
    ] {
        let (status, shown) = app.admin(Method::PUT, &format!("/v1/agents/{}/controls", agent.id), Some(body)).await;
        assert_eq!(status, 200, "{shown}");
    }

    for (agent, code) in [(&revoked, "agent_revoked"), (&no_x402, "protocol_denied"), (&no_host, "service_denied")] {
        let (status, body) = fetch(&app, &agent.token, json!({"url": url, "task": "t9"}), None).await;
        assert_eq!((status, body["code"].as_str()), (402, Some(code)), "{body}");
        let response = app
            .http
            .get(format!("{}/v1/x402/proxy/{url}", app.base))
            .bearer_auth(&agent.token)
            .header("X-Spendcap-Task", "t9")
            .send()
            .await
            .expect("proxy");
        assert_eq!(response.status(), 402);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["code"], code);

        let log = log_of(&app, agent).await;
        let refusals: Vec<&Value> = log.iter().filter(|e| e["event"] == "refuse").collect();
        assert_eq!(refusals.len(), 2, "{log:?}");
        for line in refusals {
            assert_eq!(
                (line["reason"].as_str(), line["protocol"].as_str(), line["service"].as_str(), line["task"].as_str()),
                (Some(code), Some("x402"), Some("127.0.0.1"), Some("t9"))
            );
        }
        let (status, report) =
            app.admin(Method::GET, &format!("/v1/reports?format=json&agent={}", agent.id), None).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["refusals"][0]["reason"], code, "{report}");
        assert_eq!(report["refusals"][0]["count"], 2, "{report}");
    }
    assert_eq!(request_count(&server).await, 0, "nothing was sent for them");
    let scrape = crate::metrics::scrape_metrics(&app).await;
    for code in ["agent_revoked", "protocol_denied", "service_denied"] {
        let counted =
            crate::metrics::counter(&scrape, "spendcap_refusals_total", &[("reason", code), ("protocol", "x402")]);
        assert_eq!(counted, 2, "{code}");
    }
}

/// Issue 13 case 9: a v2 server answers the paid request with 402 and a failed settlement
/// report. The provider's reason and its whole answer reach the agent, the log and the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settlement_passes_the_providers_reason_and_answer_through() {
    let receiver = MockServer::start().await;
    Mock::given(wiremock::matchers::method("POST"))
        .and(path("/hooks"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    let app = spawn_app_with(AppOptions {
        protocols: ProtocolConfig { x402: config(), ..Default::default() },
        alerts: Some(crate::alerts::alert_config(&receiver)),
        ..Default::default()
    })
    .await;
    let server = MockServer::start().await;
    let mut failure = fixture("settlement_failure.json");
    failure["errorReason"] = json!("transaction_failed");
    failure["errorMessage"] = json!("execution reverted");
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(
            ResponseTemplate::new(402)
                .insert_header("payment-response", base64_json(&failure))
                .insert_header("x-upstream", "weather-v2")
                .set_body_raw(r#"{"error":"settlement failed"}"#, "application/json"),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required("10000"))).with_priority(10).mount(&server).await;
    let agent = app.create_agent("failed-settle", 1_000_000, None).await;

    let (status, body) =
        fetch(&app, &agent.token, json!({"url": format!("{}/weather", server.uri()), "task": "t"}), Some("k1")).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("x402_payment_rejected")), "{body}");
    assert_eq!(
        (body["reason"].as_str(), body["message"].as_str()),
        (Some("transaction_failed"), Some("execution reverted"))
    );
    assert_eq!(body["upstream"]["status"], 402);
    assert_eq!(body["upstream"]["headers"]["x-upstream"], "weather-v2");
    assert_eq!(body["upstream"]["body"], r#"{"error":"settlement failed"}"#);
    assert!(body["upstream"]["headers"]["payment-response"].is_string());

    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "note"]);
    assert_eq!(log[1]["reason"], "x402_payment_rejected");
    assert_eq!(log[1]["detail"]["server_reason"], "transaction_failed");
    assert_eq!(log[1]["detail"]["server_message"], "execution reverted");
    assert_eq!(log[1]["detail"]["upstream_status"], "402");
    wait_for("the payment.note webhook", Duration::from_secs(10), || async {
        let requests = receiver.received_requests().await.unwrap_or_default();
        requests.iter().filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok()).any(|alert| {
            alert["type"] == "payment.note" && alert["data"]["detail"]["server_reason"] == "transaction_failed"
        })
    })
    .await;
}

/// Issue 13 case 10: the same Idempotency-Key with any other request is a conflict (before
/// anything is held or signed), and a replay answers with the first answer's status.
#[tokio::test]
async fn the_same_key_with_another_request_is_a_conflict() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("keyed", 1_000_000, None).await;
    let url = format!("{}/weather", server.uri());
    let first = json!({"url": url, "task": "t1", "max_amount_micros": 20_000});
    let (status, paid) = fetch(&app, &agent.token, first.clone(), Some("order-1")).await;
    assert_eq!(status, 200, "{paid}");
    for other in [
        json!({"url": url, "task": "t2", "max_amount_micros": 20_000}),
        json!({"url": url, "task": "t1", "max_amount_micros": 30_000}),
        json!({"url": url, "task": "t1", "max_amount_micros": 20_000, "headers": {"accept": "text/plain"}}),
        json!({"url": url, "task": "t1", "max_amount_micros": 20_000, "method": "POST", "body": "x"}),
    ] {
        let (status, body) = fetch(&app, &agent.token, other.clone(), Some("order-1")).await;
        assert_eq!((status, body["code"].as_str()), (422, Some("idempotency_conflict")), "{other}: {body}");
    }
    let (status, again) = fetch(&app, &agent.token, first, Some("order-1")).await;
    assert_eq!((status, again["replayed"].as_bool(), again["status"].as_u64()), (200, Some(true), Some(200)));
    assert_eq!(payments(&server).await.len(), 1, "paid once");
    assert_eq!(events(&log_of(&app, &agent).await), ["hold", "settle"]);

    // The generic holds: another task, amount, TTL or details under the same key is a conflict;
    // the replay of a created hold is a 201 again.
    let hold = |body: Value| {
        let (app, agent) = (&app, &agent);
        async move {
            let response = app
                .http
                .post(app.url("/v1/holds"))
                .bearer_auth(&agent.token)
                .header("Idempotency-Key", "h-1")
                .json(&body)
                .send()
                .await
                .expect("hold");
            (response.status().as_u16(), response.json::<Value>().await.expect("json"))
        }
    };
    let base = json!({"amount_micros": 5_000, "service": "api.example.com", "task": "a"});
    let (status, created) = hold(base.clone()).await;
    assert_eq!((status, created["replayed"].as_bool()), (201, Some(false)));
    for other in [
        json!({"amount_micros": 5_000, "service": "api.example.com", "task": "b"}),
        json!({"amount_micros": 5_001, "service": "api.example.com", "task": "a"}),
        json!({"amount_micros": 5_000, "service": "api.example.com", "task": "a", "ttl_secs": 60}),
        json!({"amount_micros": 5_000, "service": "api.example.com", "task": "a", "details": {"k": "v"}}),
    ] {
        let (status, body) = hold(other.clone()).await;
        assert_eq!((status, body["code"].as_str()), (422, Some("idempotency_conflict")), "{other}: {body}");
    }
    // The default TTL spelled out is the same request.
    let (status, replayed) =
        hold(json!({"amount_micros": 5_000, "service": "api.example.com", "task": "a", "ttl_secs": 300})).await;
    assert_eq!((status, replayed["replayed"].as_bool(), &replayed["hold_id"]), (201, Some(true), &created["hold_id"]));
    assert_eq!(me(&app, &agent).await["held_micros"], 5_000);
}

/// A paid request whose answer is lost may have moved money: the hold becomes `unknown` (listed,
/// counted, never expires), a retry with the same key resumes it with the same authorization and
/// settles it; without a retry it stays counted past `validBefore`.
#[tokio::test]
async fn a_lost_answer_stays_counted_as_unknown_until_a_retry_settles_it() {
    let app = app_with(X402Config { timeout: Duration::from_millis(1_000), ..config() }).await;
    let server = MockServer::start().await;
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_paid().set_delay(Duration::from_secs(5)))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/weather"))
        .and(header_exists("payment-signature"))
        .respond_with(v2_paid())
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(path("/weather")).respond_with(v2_402(&v2_required("10000"))).with_priority(10).mount(&server).await;
    let agent = app.create_agent("unsure-x402", 1_000_000, None).await;
    let resumed = json!({"url": format!("{}/weather", server.uri()), "task": "resumed"});
    let abandoned = json!({"url": format!("{}/weather", server.uri()), "task": "abandoned"});

    let (status, lost) = fetch(&app, &agent.token, resumed.clone(), Some("r-1")).await;
    assert_eq!((status, lost["code"].as_str()), (504, Some("x402_payment_outcome_unknown")), "{lost}");
    let (status, left) = fetch(&app, &agent.token, abandoned.clone(), Some("a-1")).await;
    assert_eq!((status, left["code"].as_str()), (504, Some("x402_payment_outcome_unknown")), "{left}");
    let (_, listed) = app.agent_call(&agent.token, Method::GET, "/v1/holds?state=unknown", None).await;
    let mut ids: Vec<&str> =
        listed["holds"].as_array().expect("holds").iter().filter_map(|h| h["hold_id"].as_str()).collect();
    ids.sort_unstable();
    let mut expected = vec![lost["hold_id"].as_str().expect("id"), left["hold_id"].as_str().expect("id")];
    expected.sort_unstable();
    assert_eq!(ids, expected, "exactly the lost answers are unknown");
    assert!(listed["holds"][0]["reason"].as_str().expect("reason").starts_with("x402_outcome_unknown"));
    let balance = me(&app, &agent).await;
    assert_eq!((balance["held_micros"].as_u64(), balance["unknown_micros"].as_u64()), (Some(20_000), Some(20_000)));

    // The retry resumes with the same authorization and settles the unknown hold.
    let (status, settled) = fetch(&app, &agent.token, resumed.clone(), Some("r-1")).await;
    assert_eq!(status, 200, "{settled}");
    assert_eq!(
        (settled["payment"]["status"].as_str(), settled["payment"]["hold_id"].as_str()),
        (Some("settled"), lost["hold_id"].as_str())
    );
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[0], sent[2], "the very same signed authorization");

    // The other one stays counted long after its validBefore: nothing says no money moved.
    app.clock.advance_ms(3_600_000);
    let balance = me(&app, &agent).await;
    assert_eq!(
        (balance["spent_micros"].as_u64(), balance["held_micros"].as_u64(), balance["unknown_micros"].as_u64()),
        (Some(10_000), Some(10_000), Some(10_000))
    );
    let (status, late) = fetch(&app, &agent.token, abandoned, Some("a-1")).await;
    assert_eq!((status, late["code"].as_str()), (409, Some("x402_payment_outcome_unknown")), "{late}");
    assert_eq!(payments(&server).await.len(), 3, "nothing is sent once the authorization ran out");
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "unknown", "hold", "unknown", "settle"]);
}

/// A resource server with its facilitator: it settles each authorization at most once (by
/// nonce) and records what it settled. `mode` in the query string says how it answers a paid
/// request: `ok`, `decline` (402 with a failed settlement report, nothing settled), `lost`
/// (settles, then answers too late the first time; a re-sent authorization gets its settlement
/// again at once), `slow` (even the unpaid request is answered too late).
#[derive(Clone, Default)]
struct Facilitator {
    settled: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

impl Facilitator {
    fn total(&self) -> u64 {
        self.settled.lock().expect("lock").values().sum()
    }
}

impl wiremock::Respond for Facilitator {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let query: BTreeMap<String, String> = request.url.query_pairs().into_owned().collect();
        let price: u64 = query.get("price").and_then(|p| p.parse().ok()).unwrap_or(1_000);
        let mode = query.get("mode").cloned().unwrap_or_default();
        let late = Duration::from_secs(3);
        let Ok(payment) = parse_payment_header(&request.headers) else {
            let unpaid = v2_402(&v2_required(&price.to_string()));
            return if mode == "slow" { unpaid.set_delay(late) } else { unpaid };
        };
        let authorization = &payment.exact().expect("an exact payment").authorization;
        let nonce = authorization.nonce.clone();
        if mode == "decline" {
            return ResponseTemplate::new(402)
                .insert_header("payment-response", base64_json(&fixture("settlement_failure.json")))
                .set_body_raw(r#"{"error":"declined"}"#, "application/json");
        }
        let value: u64 = authorization.value.parse().expect("value");
        let first = self.settled.lock().expect("lock").insert(nonce, value).is_none();
        let paid = v2_paid();
        if mode == "lost" && first {
            paid.set_delay(late)
        } else {
            paid
        }
    }
}

/// Issue 13, x402: over a run with declines, timeouts, lost answers, duplicate keys and retries,
/// what the facilitator settled equals what the ledger settled for x402, and the holds left
/// `unknown` are exactly the lost answers not yet retried.
#[tokio::test]
async fn what_the_facilitator_settled_is_what_the_ledger_settled() {
    let app = app_with(X402Config { timeout: Duration::from_millis(1_000), ..config() }).await;
    let server = MockServer::start().await;
    let facilitator = Facilitator::default();
    Mock::given(path("/item")).respond_with(facilitator.clone()).mount(&server).await;
    let agent = app.create_agent("e2e-x402", 10_000_000, None).await;
    let buy = |n: u64, mode: &'static str| {
        let (app, agent, base) = (&app, &agent, server.uri());
        async move {
            let url = format!("{base}/item?n={n}&mode={mode}&price={}", 1_000 * n);
            fetch(app, &agent.token, json!({"url": url, "task": format!("task-{n}")}), Some(&format!("key-{n}"))).await
        }
    };
    let settled_in_ledger = || async {
        let log = log_of(&app, &agent).await;
        log.iter()
            .filter(|e| e["event"] == "settle" && e["protocol"] == "x402")
            .map(|e| e["amount"].as_u64().expect("amount"))
            .sum::<u64>()
    };

    for n in 1..=4 {
        let (status, body) = buy(n, "ok").await;
        assert_eq!((status, body["payment"]["status"].as_str()), (200, Some("settled")), "{body}");
    }
    let (status, duplicate) = buy(2, "ok").await;
    assert_eq!((status, duplicate["replayed"].as_bool()), (200, Some(true)), "a duplicate key replays");
    for n in 5..=6 {
        let (status, body) = buy(n, "decline").await;
        assert_eq!(
            (status, body["code"].as_str(), body["reason"].as_str()),
            (402, Some("x402_payment_rejected"), Some("insufficient_funds"))
        );
    }
    let (status, body) = buy(7, "slow").await;
    assert_eq!((status, body["code"].as_str()), (504, Some("x402_upstream_timeout")), "nothing held: {body}");
    let mut lost = BTreeMap::new();
    for n in 8..=10 {
        let (status, body) = buy(n, "lost").await;
        assert_eq!((status, body["code"].as_str()), (504, Some("x402_payment_outcome_unknown")), "{body}");
        lost.insert(n, body["hold_id"].as_str().expect("hold").to_owned());
    }

    // Every lost answer, and nothing else, is unknown; the difference is exactly their sum.
    let unknown = || {
        let (app, token) = (&app, agent.token.clone());
        async move {
            let (_, listed) = app.agent_call(&token, Method::GET, "/v1/holds?state=unknown", None).await;
            listed["holds"]
                .as_array()
                .expect("holds")
                .iter()
                .map(|h| h["hold_id"].as_str().expect("id").to_owned())
                .collect::<BTreeSet<String>>()
        }
    };
    assert_eq!(unknown().await, lost.values().cloned().collect::<BTreeSet<_>>());
    assert_eq!(facilitator.total(), 1_000 * (1 + 2 + 3 + 4 + 8 + 9 + 10));
    assert_eq!(facilitator.total() - settled_in_ledger().await, 1_000 * (8 + 9 + 10));

    // Retries with the same keys resume the same authorizations and settle.
    for n in [8, 9] {
        let (status, body) = buy(n, "lost").await;
        assert_eq!((status, body["payment"]["hold_id"].as_str()), (200, Some(lost[&n].as_str())), "{body}");
    }
    assert_eq!(unknown().await, BTreeSet::from([lost[&10].clone()]));
    // Long past every validBefore: the declined authorizations' holds are released, the lost one
    // still counts.
    app.clock.advance_ms(3_600_000);
    let balance = me(&app, &agent).await;
    assert_eq!((balance["held_micros"].as_u64(), balance["unknown_micros"].as_u64()), (Some(10_000), Some(10_000)));
    // An admin who checked the chain settles it.
    let (status, resolved) = app
        .admin(
            Method::POST,
            &format!("/v1/holds/{}/resolve", lost[&10]),
            Some(json!({"outcome": "settled", "amount_micros": 10_000, "reason": "the transfer is on chain"})),
        )
        .await;
    assert_eq!(status, 200, "{resolved}");

    assert_eq!(settled_in_ledger().await, facilitator.total(), "the two sums are equal");
    let balance = me(&app, &agent).await;
    assert_eq!(
        (balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()),
        (Some(facilitator.total()), Some(0))
    );
    let log = log_of(&app, &agent).await;
    assert_eq!(log.iter().filter(|e| e["event"] == "hold").count(), 9, "one hold per purchase, none for the timeout");
    assert_eq!(log.iter().filter(|e| e["event"] == "expire").count(), 2, "the declined ones, at validBefore");
}

/// The ledger calls of one purchase, as Redis saw them (`MONITOR`, see `calls.rs`): what a paid
/// x402 fetch costs the ledger, and so what a change to the flow must not silently grow. A
/// purchase is: precheck, hold (with its idempotency record; asked, its reply names the tree's receipt
/// chain head) and settle (the receipt signed ahead and linked, and the purchase's answer stored
/// for its retries, in the same call) — 3 FCALLs, nothing else — and 2 upstream requests (the
/// unpaid one that gets the 402, the paid one). The same for the first receipt of a tree.
#[tokio::test]
async fn a_paid_fetch_costs_three_ledger_calls_and_two_upstream_requests() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("counted", 1_000_000, None).await;
    let redis = app.redis.clone().expect("a Redis ledger");
    let url = format!("{}/weather", server.uri());
    for key in ["first", "second"] {
        let before = server.received_requests().await.expect("recorded").len();
        let calls = crate::calls::LedgerCalls::watch(&redis);
        let (status, body) = fetch(&app, &agent.token, json!({"url": url, "task": "counted"}), Some(key)).await;
        let calls = crate::calls::purchase_calls(calls.stop(&redis));
        assert_eq!((status, body["payment"]["status"].as_str()), (200, Some("settled")), "{body}");
        assert_eq!(
            calls,
            ["FCALL spendcap_precheck", "FCALL spendcap_hold", "FCALL spendcap_settle"],
            "ledger calls of the {key} paid fetch"
        );
        assert_eq!(server.received_requests().await.expect("recorded").len() - before, 2, "upstream requests");
        // The answer stored by the settle is what a retry gets.
        let (status, again) = fetch(&app, &agent.token, json!({"url": url, "task": "counted"}), Some(key)).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["payment"]["receipt"], body["payment"]["receipt"], "the retry replays the same receipt");
        assert_eq!(again["replayed"], json!(true), "{again}");
    }
}

/// A payment the server rejects keeps its hold (the authorization is live until validBefore):
/// the note that logs the rejection also releases the purchase's key, in the same ledger call,
/// so that the retry re-sends the same authorization.
#[tokio::test]
async fn a_rejected_payment_costs_three_ledger_calls_and_its_retry_resumes() {
    let app = app_with(config()).await;
    let server = rejecting_server().await;
    let agent = app.create_agent("rejected-counted", 1_000_000, None).await;
    let redis = app.redis.clone().expect("a Redis ledger");
    let request = json!({"url": format!("{}/weather", server.uri()), "task": "t"});
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let (status, body) = fetch(&app, &agent.token, request.clone(), Some("rejected-1")).await;
    let calls = crate::calls::purchase_calls(calls.stop(&redis));
    assert_eq!((status, body["code"].as_str()), (402, Some("x402_payment_rejected")), "{body}");
    assert_eq!(
        calls,
        ["FCALL spendcap_precheck", "FCALL spendcap_hold", "FCALL spendcap_note"],
        "ledger calls of a rejected payment (the note releases the key)"
    );
    let (status, again) = fetch(&app, &agent.token, request, Some("rejected-1")).await;
    assert_eq!((status, again["code"].as_str()), (402, Some("x402_payment_rejected")), "{again}");
    let sent = payments(&server).await;
    assert_eq!((sent.len(), sent.first() == sent.last()), (2, true), "the retry re-sent the same authorization");
}

/// Upgrade compatibility: idempotency records written by the previous release (stored by
/// `spendcap_idem_finish`, an error without its kind) still replay, now that the settle stores
/// a paid purchase's answer itself. The records are written directly into Redis.
#[tokio::test]
async fn records_the_previous_release_stored_still_replay() {
    let app = app_with(config()).await;
    let server = v2_server("10000").await;
    let agent = app.create_agent("upgraded", 1_000_000, None).await;
    let redis = app.redis.clone().expect("a Redis ledger");
    let url = format!("{}/weather", server.uri());
    let request = json!({"url": url, "task": "upgrade"});
    let (status, _) = fetch(&app, &agent.token, request.clone(), Some("new")).await;
    assert_eq!(status, 200);
    let record = redis.cli(&["--scan", "--pattern", "*:i:*:x402:k:new"]).expect("scan");
    let record = record.trim();
    assert!(!record.is_empty(), "the purchase's idempotency record");
    let fingerprint = redis.cli(&["HGET", record, "fp"]).expect("fp");
    let old = [
        (
            "old-delivered",
            r#"{"kind":"delivered","status":200,"headers":[["content-type","text/plain"]],"body_base64":"b2xkIGFuc3dlcg==","payment":null}"#,
        ),
        ("old-error", r#"{"kind":"error","code":"x402_already_paid","detail":"paid before the upgrade","extra":null}"#),
    ];
    for (key, response) in old {
        let old_record = record.replace(":x402:k:new", &format!(":x402:k:{key}"));
        let written = redis.cli(&[
            "HSET",
            &old_record,
            "fp",
            fingerprint.trim(),
            "status",
            "done",
            "hold",
            "",
            "response",
            response,
        ]);
        assert!(written.is_some(), "writes the old record");
    }
    let before = server.received_requests().await.expect("recorded").len();
    let (status, body) = fetch(&app, &agent.token, request.clone(), Some("old-delivered")).await;
    assert_eq!((status, body["replayed"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(body["body"], "old answer", "{body}");
    let (status, body) = fetch(&app, &agent.token, request, Some("old-error")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("x402_already_paid")), "{body}");
    assert_eq!(body["replayed"], true, "{body}");
    // A replay pays nothing and fetches nothing but the 402.
    assert_eq!(server.received_requests().await.expect("recorded").len() - before, 2, "only the unpaid requests");
}
