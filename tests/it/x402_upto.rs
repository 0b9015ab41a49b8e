//! x402 `upto` end to end: the daemon holds the maximum, signs a Permit2 witness authorization
//! of it, and settles what the server reports it settled (releasing the rest). Against the
//! simulated provider (`sim::x402`, which verifies the Permit2 signature, payee, facilitator,
//! amount, window and nonce and charges the usage) and wiremock servers for the misbehaving cases.

use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::x402::{
    parse_payment_header, recover_upto_signer, EvmSigner, PaymentPayload, PERMIT2_ADDRESS, UPTO_PERMIT2_PROXY_ADDRESS,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::x402::X402Config;
use spendcap::protocols::ProtocolConfig;
use spendcap::receipt::Receipt;
use spendcap::sim::x402::{X402Resource, FACILITATOR, NETWORK, PAY_TO, USDC};
use wiremock::matchers::{header_exists, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::{spawn_app_with, Agent, AppOptions, TestApp};

const TEST_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const PAYER: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";

/// Every payment recorded for `../shared/tools/conform` and for `scripts/conform-sdk` (which
/// checks the upto payload and its signature with the official SDK).
fn config() -> X402Config {
    X402Config {
        signer: Some(EvmSigner::from_hex(TEST_KEY).expect("test key")),
        allow_private: vec!["127.0.0.1".parse().expect("address")],
        conformance: ConformanceSink::to_dir(ConformanceSink::test_dir()).also_to(ConformanceSink::sdk_test_dir()),
        ..X402Config::default()
    }
}

async fn app_with(x402: X402Config) -> TestApp {
    spawn_app_with(AppOptions { protocols: ProtocolConfig { x402, ..Default::default() }, ..Default::default() }).await
}

async fn fetch(app: &TestApp, token: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = app.http.post(app.url("/v1/x402/fetch")).bearer_auth(token).json(&body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("fetch");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn balance(app: &TestApp, agent: &Agent) -> (u64, u64) {
    let (status, body) = app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{body}");
    (body["spent_micros"].as_u64().expect("spent"), body["held_micros"].as_u64().expect("held"))
}

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

fn events(entries: &[Value]) -> Vec<String> {
    entries.iter().map(|e| e["event"].as_str().unwrap_or_default().to_owned()).collect()
}

fn b64(value: &Value) -> String {
    STANDARD.encode(serde_json::to_vec(value).expect("serializes"))
}

/// The upto 402 a wiremock server answers with: a maximum of `maximum` atomic units.
fn upto_required(maximum: &str) -> Value {
    json!({
        "x402Version": 2,
        "error": "Payment required",
        "resource": {"url": "http://127.0.0.1/llm", "mimeType": "application/json"},
        "accepts": [{
            "scheme": "upto", "network": NETWORK, "amount": maximum, "asset": USDC, "payTo": PAY_TO,
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2", "facilitatorAddress": FACILITATOR}
        }]
    })
}

fn settled(amount: Option<&str>) -> ResponseTemplate {
    let mut settlement = json!({"success": true, "transaction": "0xabc", "network": NETWORK, "payer": PAYER});
    if let Some(amount) = amount {
        settlement["amount"] = json!(amount);
    }
    ResponseTemplate::new(200)
        .insert_header("payment-response", b64(&settlement))
        .set_body_raw(r#"{"text":"generated"}"#, "application/json")
}

/// A wiremock upto server at `/llm` whose paid answer is `paid`.
async fn upto_server(maximum: &str, paid: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(path("/llm"))
        .and(header_exists("payment-signature"))
        .respond_with(paid)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/llm"))
        .respond_with(
            ResponseTemplate::new(402)
                .insert_header("payment-required", b64(&upto_required(maximum)))
                .set_body_json(json!({})),
        )
        .with_priority(10)
        .mount(&server)
        .await;
    server
}

async fn payments(server: &MockServer) -> Vec<PaymentPayload> {
    let requests = server.received_requests().await.expect("requests are recorded");
    requests
        .iter()
        .filter(|r| r.headers.contains_key("payment-signature"))
        .map(|r| parse_payment_header(&r.headers).expect("the payment header is well-formed"))
        .collect()
}

#[tokio::test]
async fn upto_holds_the_maximum_and_settles_what_the_server_used() {
    let app = app_with(config()).await;
    let provider = X402Resource::start_with_upto(&[], &[("/generate", 50_000)]).await.expect("sim starts");
    let agent = app.create_agent("metered", 1_000_000, None).await;

    let url = format!("{}/generate?used=12345", provider.base());
    let (status, body) = fetch(&app, &agent.token, json!({"url": url, "task": "summarise"}), None).await;
    assert_eq!(status, 200, "{body}");
    let payment = &body["payment"];
    assert_eq!(payment["status"], "settled", "{body}");
    assert_eq!(payment["scheme"], "upto");
    assert_eq!(payment["amount_micros"], 12_345, "the amount the server reports it settled");
    assert_eq!(payment["maximum_micros"], 50_000);

    // What the simulated facilitator accepted (it verified the Permit2 signature) and charged is
    // what the ledger settled; the rest of the maximum is released.
    assert_eq!(provider.received_micros(), 12_345);
    assert_eq!(balance(&app, &agent).await, (12_345, 0));

    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "settle"]);
    assert_eq!(log[0]["amount"], 50_000, "the hold is for the maximum: {}", log[0]);
    assert_eq!(log[1]["amount"], 12_345, "{}", log[1]);
    assert_eq!(log[1]["detail"]["scheme"], "upto");
    assert_eq!(log[1]["detail"]["maximum_micros"], "50000");
    let receipt: Receipt = serde_json::from_value(payment["receipt"].clone()).expect("a receipt");
    assert_eq!(receipt.receipt.amount_micros, 12_345);

    // Nothing used: the spec allows a zero settlement; the whole maximum comes back.
    let url = format!("{}/generate?used=0", provider.base());
    let (status, body) = fetch(&app, &agent.token, json!({"url": url, "task": "summarise"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["payment"]["status"].as_str(), body["payment"]["amount_micros"].as_u64()),
        (Some("settled"), Some(0))
    );
    assert_eq!(balance(&app, &agent).await, (12_345, 0));
    assert_eq!(provider.received_micros(), 12_345);
}

#[tokio::test]
async fn the_permit_is_the_official_clients_shape_signed_by_the_daemon() {
    let app = app_with(config()).await;
    let server = upto_server("40000", settled(Some("1000"))).await;
    let agent = app.create_agent("shape", 1_000_000, None).await;
    let (status, body) =
        fetch(&app, &agent.token, json!({"url": format!("{}/llm", server.uri()), "task": "t"}), None).await;
    assert_eq!(status, 200, "{body}");
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 1);
    let PaymentPayload::UptoV2(payment) = &sent[0] else { panic!("an upto payment: {:?}", sent[0]) };
    assert_eq!(serde_json::to_value(&payment.accepted).expect("serializes"), upto_required("40000")["accepts"][0]);
    let permit = &payment.payload.permit2_authorization;
    assert_eq!(permit.from, PAYER);
    assert_eq!(permit.permitted.amount, "40000", "the maximum is authorised, not less");
    assert_eq!(permit.permitted.token, USDC);
    assert_eq!(permit.spender, UPTO_PERMIT2_PROXY_ADDRESS.to_string());
    assert_eq!(permit.witness.to, PAY_TO);
    assert_eq!(permit.witness.facilitator, FACILITATOR);
    assert_eq!(permit.witness.valid_after, "0");
    let deadline: u64 = permit.deadline.parse().expect("number");
    let now = app.clock.now_ms() / 1000;
    assert!((now + 55..=now + 60).contains(&deadline), "deadline {deadline} vs now {now}");
    assert_eq!(body["payment"]["valid_before"], deadline);
    assert_eq!(recover_upto_signer(&payment.payload, 84532).expect("recovers").to_string(), PAYER);
    assert_ne!(PERMIT2_ADDRESS, UPTO_PERMIT2_PROXY_ADDRESS);
}

#[tokio::test]
async fn a_settlement_above_the_maximum_settles_the_maximum_as_an_incident() {
    let app = app_with(config()).await;
    let server = upto_server("20000", settled(Some("25000"))).await;
    let agent = app.create_agent("overcharged", 1_000_000, None).await;
    let (status, body) =
        fetch(&app, &agent.token, json!({"url": format!("{}/llm", server.uri()), "task": "t"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["amount_micros"], 20_000, "{body}");
    assert_eq!(balance(&app, &agent).await, (20_000, 0));
    let log = log_of(&app, &agent).await;
    assert_eq!(events(&log), ["hold", "note", "settle"]);
    assert_eq!(log[1]["reason"], "incident_x402_upto_settled_above_maximum", "{}", log[1]);
    assert_eq!(log[1]["detail"]["reported_amount"], "25000");
    assert_eq!(log[2]["amount"], 20_000);

    // A report without the amount the scheme requires: the maximum too, and an incident.
    let server = upto_server("20000", settled(None)).await;
    let (status, body) =
        fetch(&app, &agent.token, json!({"url": format!("{}/llm", server.uri()), "task": "t2"}), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(balance(&app, &agent).await, (40_000, 0));
    let log = log_of(&app, &agent).await;
    assert!(log.iter().any(|e| e["reason"] == "incident_x402_upto_settled_amount_unreadable"), "{log:?}");
}

#[tokio::test]
async fn over_the_cap_nothing_is_signed_and_revoked_agents_reach_nothing() {
    let app = app_with(config()).await;
    let server = upto_server("50000", settled(Some("1"))).await;
    let agent = app.create_agent("small", 30_000, None).await;
    let request = json!({"url": format!("{}/llm", server.uri()), "task": "t"});
    // The maximum is what is held, so a cap below the maximum refuses, however little is used.
    let (status, body) = fetch(&app, &agent.token, request.clone(), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "cap_exceeded");
    assert_eq!((body["requested_micros"].as_u64(), body["remaining_micros"].as_u64()), (Some(50_000), Some(30_000)));
    // The agent's own maximum below the server's: refused by policy.
    let rich = app.create_agent("capped-call", 1_000_000, None).await;
    let mut small = request.clone();
    small["max_amount_micros"] = json!(10_000);
    let (status, body) = fetch(&app, &rich.token, small, None).await;
    assert_eq!(body["code"], "x402_over_payment_maximum", "{status} {body}");
    assert!(payments(&server).await.is_empty(), "nothing was signed");
    assert_eq!(balance(&app, &agent).await, (0, 0));

    let (status, _) = app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", rich.id), Some(json!({"reason": "runaway_loop"})))
        .await;
    assert_eq!(status, 200);
    let before = server.received_requests().await.expect("recorded").len();
    let (status, body) = fetch(&app, &rich.token, request, None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");
    assert_eq!(server.received_requests().await.expect("recorded").len(), before, "no request left the daemon");
}

#[tokio::test]
async fn an_unknown_outcome_holds_the_maximum_and_a_retry_pays_once_with_the_same_permit() {
    let app = app_with(X402Config { timeout: Duration::from_millis(1_000), ..config() }).await;
    let server = MockServer::start().await;
    Mock::given(path("/llm"))
        .and(header_exists("payment-signature"))
        .respond_with(settled(Some("7000")).set_delay(Duration::from_secs(5)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(path("/llm"))
        .and(header_exists("payment-signature"))
        .respond_with(settled(Some("7000")))
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(path("/llm"))
        .respond_with(
            ResponseTemplate::new(402)
                .insert_header("payment-required", b64(&upto_required("30000")))
                .set_body_json(json!({})),
        )
        .with_priority(10)
        .mount(&server)
        .await;
    let agent = app.create_agent("lost", 1_000_000, None).await;
    let request = json!({"url": format!("{}/llm", server.uri()), "task": "t"});

    let (status, body) = fetch(&app, &agent.token, request.clone(), Some("k1")).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "x402_payment_outcome_unknown");
    assert_eq!(balance(&app, &agent).await, (0, 30_000), "the whole maximum stays counted");

    let (status, body) = fetch(&app, &agent.token, request, Some("k1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["amount_micros"], 7_000);
    let sent = payments(&server).await;
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "the retry re-sent the very same permit");
    assert_eq!(balance(&app, &agent).await, (7_000, 0));
    assert_eq!(events(&log_of(&app, &agent).await), ["hold", "unknown", "settle"]);
}
