//! The ACP endpoint against a wiremock merchant and PSP over real HTTP, with a real Redis ledger:
//! money, answers, log lines, and exactly what each provider received.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use adapters::conformance::ConformanceSink;
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::alerts::{AlertConfig, WebhookSecret};
use spendcap::protocols::acp::{AcpConfig, ResolvePolicy};
use spendcap::protocols::ProtocolConfig;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::support::{spawn_app_with, wait_for, Agent, AppOptions, TestApp, ADMIN_TOKEN};

const MERCHANT: &str = "acme";
const SESSION: &str = "checkout_session_123";
const SESSION_PATH: &str = "/checkout_sessions/checkout_session_123";
const COMPLETE_PATH: &str = "/checkout_sessions/checkout_session_123/complete";
const CANCEL_PATH: &str = "/checkout_sessions/checkout_session_123/cancel";
const DELEGATE_PATH: &str = "/agentic_commerce/delegate_payment";
const CARD_NUMBER: &str = "4242424242424242";
/// The delegated token in `psp_delegate_payment_response.json`.
const TOKEN: &str = "vt_01J8Z3WXYZ9ABC";
const MERCHANT_KEY: &str = "sk_test_merchant_secret_5f1c";
const PSP_KEY: &str = "sk_test_psp_secret_9d2e";
/// `session_ready.json`'s total: 480 US cents.
const JACKET: u64 = 4_800_000;

fn fixture(name: &str) -> String {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/acp").join(name);
    std::fs::read_to_string(&file).unwrap_or_else(|error| panic!("fixture {}: {error}", file.display()))
}

fn answer(status: u16, fixture_name: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(fixture(fixture_name), "application/json")
}

fn unavailable() -> ResponseTemplate {
    ResponseTemplate::new(503).set_body_raw(
        r#"{"type":"service_unavailable","code":"unavailable","message":"try later"}"#,
        "application/json",
    )
}

/// A daemon with ACP pointed at a wiremock merchant (`acme`) and PSP (`stripe`).
struct Shop {
    app: TestApp,
    merchant: MockServer,
    psp: MockServer,
    options: ShopOptions,
}

#[derive(Clone)]
struct ShopOptions {
    timeout: Duration,
    /// The daemon's own read-backs of unknown outcomes; off unless a test is about them.
    resolve: ResolvePolicy,
    alerts: Option<AlertConfig>,
}

impl Default for ShopOptions {
    fn default() -> ShopOptions {
        ShopOptions { timeout: Duration::from_secs(5), resolve: ResolvePolicy::disabled(), alerts: None }
    }
}

async fn shop() -> Shop {
    shop_with(Duration::from_secs(5)).await
}

async fn shop_with(timeout: Duration) -> Shop {
    shop_of(ShopOptions { timeout, ..ShopOptions::default() }).await
}

fn acp_config(merchant: &MockServer, psp: &MockServer, options: &ShopOptions) -> AcpConfig {
    let file = json!({
        "psp": { "name": "stripe", "base_url": psp.uri(), "api_key": PSP_KEY },
        "merchants": [{ "name": MERCHANT, "base_url": merchant.uri(), "api_key": MERCHANT_KEY }],
        "card": { "number": CARD_NUMBER, "exp_month": "11", "exp_year": "2030", "cvc": "987",
                  "funding": "credit", "brand": "visa", "name": "Olive Owner" },
        "billing_address": { "name": "Olive Owner", "line_one": "1 Main Street", "city": "Springfield",
                             "state": "IL", "country": "US", "postal_code": "62701" }
    });
    let mut config = AcpConfig::from_json(&file.to_string()).expect("valid ACP configuration");
    config.conformance = ConformanceSink::to_dir(ConformanceSink::test_dir());
    config.timeout = options.timeout;
    config.resolve = options.resolve;
    config
}

async fn shop_of(options: ShopOptions) -> Shop {
    let merchant = MockServer::start().await;
    let psp = MockServer::start().await;
    let app = spawn_app_with(AppOptions {
        protocols: ProtocolConfig { acp: acp_config(&merchant, &psp, &options), ..Default::default() },
        alerts: options.alerts.clone(),
        ..Default::default()
    })
    .await;
    Shop { app, merchant, psp, options }
}

impl Shop {
    /// Another daemon instance on the same Redis, clock and providers.
    async fn second_instance(&self) -> TestApp {
        let redis = self.app.redis.clone().expect("redis");
        spawn_app_with(AppOptions {
            redis: Some((redis, "sc".to_owned())),
            clock: self.app.clock.clone(),
            protocols: ProtocolConfig {
                acp: acp_config(&self.merchant, &self.psp, &self.options),
                ..Default::default()
            },
            ..Default::default()
        })
        .await
    }

    async fn serve(&self, verb: &str, route: &str, response: ResponseTemplate) {
        Mock::given(method(verb)).and(path(route)).respond_with(response).mount(&self.merchant).await;
    }

    /// Answers only the next matching request (mocks are tried in the order they were mounted).
    async fn serve_once(&self, verb: &str, route: &str, response: ResponseTemplate) {
        Mock::given(method(verb)).and(path(route)).respond_with(response).up_to_n_times(1).mount(&self.merchant).await;
    }

    async fn serve_delegation(&self, response: ResponseTemplate) {
        Mock::given(method("POST")).and(path(DELEGATE_PATH)).respond_with(response).mount(&self.psp).await;
    }

    /// The happy merchant and PSP: a ready session, a token, a completed order.
    async fn serve_happy_path(&self) {
        self.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
        self.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
        self.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json")).await;
    }

    async fn checkout(&self, agent: &Agent, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut request = self.app.http.post(self.app.url("/v1/acp/checkouts")).bearer_auth(&agent.token).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.expect("checkout request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn cancel(&self, agent: &Agent, body: Value) -> (u16, Value) {
        self.app
            .agent_call(&agent.token, Method::POST, &format!("/v1/acp/checkouts/{SESSION}/cancel"), Some(body))
            .await
    }

    /// (spent, held) of an agent.
    async fn money(&self, agent: &Agent) -> (u64, u64) {
        let shown = self.app.show(&agent.id).await;
        (shown["spent_micros"].as_u64().expect("spent"), shown["held_micros"].as_u64().expect("held"))
    }

    /// The agent's log lines as (event, reason).
    async fn events(&self, agent: &Agent) -> Vec<(String, String)> {
        let log = self.app.log().await;
        log.iter()
            // `budget` entries are the sessions' exclusive budgets, created once per session.
            .filter(|entry| {
                entry["agent"] == agent.id.as_str() && entry["event"] != "create" && entry["event"] != "budget"
            })
            .map(|entry| {
                (entry["event"].as_str().unwrap_or("").to_owned(), entry["reason"].as_str().unwrap_or("").to_owned())
            })
            .collect()
    }

    async fn log_entry(&self, agent: &Agent, event: &str) -> Value {
        self.app
            .log()
            .await
            .into_iter()
            .find(|entry| entry["agent"] == agent.id.as_str() && entry["event"] == event)
            .unwrap_or_else(|| panic!("no {event} entry for {}", agent.id))
    }
}

fn pay_session() -> Value {
    json!({ "merchant": MERCHANT, "checkout_session_id": SESSION, "task": "buy-jacket" })
}

async fn received(server: &MockServer, verb: &str, route: &str) -> Vec<Request> {
    let all = server.received_requests().await.expect("request recording is on");
    all.into_iter().filter(|request| request.method.as_str() == verb && request.url.path() == route).collect()
}

fn header<'r>(request: &'r Request, name: &str) -> &'r str {
    request.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("")
}

fn json_body(request: &Request) -> Value {
    serde_json::from_slice(&request.body).expect("JSON request body")
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time with whole seconds (`…T…Z`).
fn unix_secs(rfc3339: &str) -> u64 {
    let number = |range: std::ops::Range<usize>| rfc3339[range].parse::<i64>().expect("digits");
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    // Howard Hinnant's days_from_civil, for dates after 1970.
    let (year, month) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    (days * 86_400 + number(11..13) * 3600 + number(14..16) * 60 + number(17..19)) as u64
}

/// Captures everything the daemon logs on this test's thread (the test runtime is
/// single-threaded, so the server's tasks run here too).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

#[tokio::test]
async fn acp_checkout_completes_end_to_end_and_balances_log_and_receipt_show_it() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let shop = shop().await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("shopper", 10_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["merchant"], MERCHANT);
    assert_eq!(body["checkout_session_id"], SESSION);
    assert_eq!(body["order"]["id"], "ord_abc123");
    assert_eq!(body["order"]["permalink_url"], "https://www.testshop.com/orders/ord_abc123");
    assert_eq!(body["total"], json!({ "amount": 480, "currency": "usd" }));
    assert_eq!(body["amount_micros"], JACKET);
    assert_eq!(body["replayed"], false);
    let hold = body["hold_id"].as_str().expect("hold id").to_owned();

    // Money: spent once, nothing left held.
    assert_eq!(shop.money(&agent).await, (JACKET, 0));

    // The receipt: signed, for the merchant, carrying the session, order and permalink.
    let receipt = &body["receipt"]["receipt"];
    assert_eq!(receipt["amount_micros"], JACKET);
    assert_eq!(receipt["service"], MERCHANT);
    assert_eq!(receipt["protocol"], "acp");
    assert_eq!(receipt["task"], "buy-jacket");
    assert_eq!(receipt["hold_id"], hold.as_str());
    assert_eq!(receipt["details"]["checkout_session_id"], SESSION);
    assert_eq!(receipt["details"]["order_id"], "ord_abc123");
    assert_eq!(receipt["details"]["permalink_url"], "https://www.testshop.com/orders/ord_abc123");
    let chain = shop
        .app
        .http
        .get(shop.app.url(&format!("/v1/receipts?agent={}", agent.id)))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("receipts")
        .text()
        .await
        .expect("text");
    let chained: Value = serde_json::from_str(chain.lines().next().expect("one receipt")).expect("receipt JSON");
    assert_eq!(chained, body["receipt"], "the answer's receipt is the chained one");

    // The log: a hold and a settle, attributed to the merchant, with the session and order.
    assert_eq!(shop.events(&agent).await, [("hold".into(), "".into()), ("settle".into(), "".into())]);
    let held = shop.log_entry(&agent, "hold").await;
    assert_eq!((held["service"].as_str(), held["protocol"].as_str()), (Some(MERCHANT), Some("acp")));
    assert_eq!(held["amount"], JACKET);
    assert!(held["detail"].as_str().unwrap_or("").contains(SESSION), "{held}");
    let settled = shop.log_entry(&agent, "settle").await;
    let detail: Value = serde_json::from_str(settled["detail"].as_str().expect("detail")).expect("detail JSON");
    assert_eq!(detail["checkout_session_id"], SESSION);
    assert_eq!(detail["order_id"], "ord_abc123");
    assert_eq!(detail["permalink_url"], "https://www.testshop.com/orders/ord_abc123");
    assert_eq!(settled["service"], MERCHANT);

    // The PSP got the owner's card, once, with an allowance of exactly the held total for this
    // session and the handler's merchant, expiring with the hold.
    let delegations = received(&shop.psp, "POST", DELEGATE_PATH).await;
    assert_eq!(delegations.len(), 1);
    let delegation = json_body(&delegations[0]);
    assert_eq!(delegation["payment_method"]["number"], CARD_NUMBER);
    assert_eq!(header(&delegations[0], "authorization"), format!("Bearer {PSP_KEY}"));
    assert_eq!(header(&delegations[0], "idempotency-key"), format!("{hold}:delegate"));
    let allowance = &delegation["allowance"];
    assert_eq!(allowance["reason"], "one_time");
    assert_eq!(allowance["max_amount"], 480);
    assert_eq!(allowance["currency"], "usd");
    assert_eq!(allowance["checkout_session_id"], SESSION);
    assert_eq!(allowance["merchant_id"], "acct_1234567890");
    let redis = shop.app.redis.as_ref().expect("redis");
    let hold_key = format!("sc:{{{}}}:h:{hold}", agent.tree);
    let hold_expires_ms: u64 =
        redis.cli(&["HGET", &hold_key, "expires_at"]).expect("redis-cli").trim().parse().expect("expires_at");
    assert_eq!(unix_secs(allowance["expires_at"].as_str().expect("expires_at")), hold_expires_ms / 1000);

    // The merchant was completed with the delegated token through the delegate handler.
    let completions = received(&shop.merchant, "POST", COMPLETE_PATH).await;
    assert_eq!(completions.len(), 1);
    let completion = json_body(&completions[0]);
    assert_eq!(completion["payment_data"]["handler_id"], "card_tokenized");
    assert_eq!(
        completion["payment_data"]["instrument"],
        json!({ "type": "card", "credential": { "type": "spt", "token": TOKEN } })
    );
    assert_eq!(header(&completions[0], "idempotency-key"), format!("{hold}:complete"));
    assert_eq!(header(&completions[0], "authorization"), format!("Bearer {MERCHANT_KEY}"));
    assert_eq!(header(&completions[0], "api-version"), "2026-04-17");

    // Neither the card, the token nor a provider key reaches the agent, the log or a log line.
    let exported = shop.app.log().await.iter().map(Value::to_string).collect::<String>();
    let logged = logs.text();
    assert!(logged.contains("ACP checkout completed"), "the daemon's logs are captured: {logged}");
    for secret in [CARD_NUMBER, TOKEN, PSP_KEY, MERCHANT_KEY, "1 Main Street"] {
        assert!(!body.to_string().contains(secret), "{secret} reached the agent");
        assert!(!exported.contains(secret), "{secret} is in the ledger log");
        assert!(!logged.contains(secret), "{secret} is in a log line");
    }
}

#[tokio::test]
async fn acp_over_the_cap_is_a_402_and_neither_the_psp_nor_complete_is_called() {
    let shop = shop().await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("frugal", 1_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "cap_exceeded");
    assert_eq!(body["requested_micros"], JACKET);
    assert_eq!(body["remaining_micros"], 1_000_000);
    assert_eq!(body["checkout_session_id"], SESSION);

    assert!(received(&shop.psp, "POST", DELEGATE_PATH).await.is_empty(), "the PSP was asked");
    assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty(), "complete was called");
    assert_eq!(received(&shop.merchant, "GET", SESSION_PATH).await.len(), 1);
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await, [("refuse".into(), "cap_exceeded".into())]);
}

#[tokio::test]
async fn acp_a_merchant_decline_voids_the_hold_and_passes_the_merchants_code_on() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;

    // Declined with an error object.
    shop.serve_once("POST", COMPLETE_PATH, answer(402, "error_payment_declined.json")).await;
    let agent = shop.app.create_agent("declined", 10_000_000, None).await;
    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "acp_merchant_error");
    assert_eq!(body["detail"], "The card was declined by the issuer.");
    assert_eq!(body["provider_error"]["provider"], "merchant");
    assert_eq!(body["provider_error"]["code"], "payment_declined");
    assert_eq!(body["provider_error"]["message"], "The card was declined by the issuer.");
    assert_eq!((body["voided"].as_bool(), body["released_micros"].as_u64()), (Some(true), Some(JACKET)));
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(
        shop.events(&agent).await,
        [
            ("hold".into(), "".into()),
            ("note".into(), "merchant_declined".into()),
            ("void".into(), "merchant_declined".into())
        ]
    );
    let note = shop.log_entry(&agent, "note").await;
    assert!(note["detail"].as_str().unwrap_or("").contains("payment_declined"), "{note}");

    // Declined as ACP 2026-04-17 also does it: a 200 session, still ready, with an error message.
    shop.serve_once("POST", COMPLETE_PATH, answer(200, "complete_declined_session.json")).await;
    let other = shop.app.create_agent("declined-again", 10_000_000, None).await;
    let (status, body) = shop.checkout(&other, pay_session(), None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "acp_merchant_declined");
    assert_eq!(body["session_status"], "ready_for_payment");
    assert_eq!(body["messages"][0]["code"], "payment_declined");
    assert_eq!(body["detail"], "Your payment was declined. Please try a different payment method.");
    assert_eq!(shop.money(&other).await, (0, 0));
    assert_eq!(shop.events(&other).await.last(), Some(&("void".into(), "merchant_declined".into())));
}

#[tokio::test]
async fn acp_a_psp_error_voids_the_hold_and_complete_is_never_called() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(400, "psp_error_invalid_card.json")).await;
    let agent = shop.app.create_agent("psp-trouble", 10_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "acp_psp_error");
    assert_eq!(body["provider_error"]["provider"], "psp");
    assert_eq!(body["provider_error"]["code"], "invalid_card");
    // The PSP's own words may describe the card; they are not passed on.
    assert_eq!(body["provider_error"]["message"], Value::Null);
    assert!(!body.to_string().contains("Invalid card number"), "{body}");
    assert_eq!(body["voided"], true);

    assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty());
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await.last(), Some(&("void".into(), "psp_error".into())));
}

#[tokio::test]
async fn acp_a_timeout_at_completion_cancels_the_session_and_voids_the_hold() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json").set_delay(Duration::from_secs(4))).await;
    shop.serve("POST", CANCEL_PATH, answer(200, "session_canceled.json")).await;
    let agent = shop.app.create_agent("slow-merchant", 10_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "acp_timeout");
    assert_eq!(body["voided"], true);
    assert_eq!(body["session_status"], "canceled");
    let hold = body["hold_id"].as_str().expect("hold id");

    // Before voiding, the session was read back (not completed) and canceled at the merchant.
    assert_eq!(received(&shop.merchant, "GET", SESSION_PATH).await.len(), 2);
    let cancels = received(&shop.merchant, "POST", CANCEL_PATH).await;
    assert_eq!(cancels.len(), 1);
    assert!(header(&cancels[0], "idempotency-key").starts_with(&format!("{hold}:cancel:")));
    assert_eq!(json_body(&cancels[0])["intent_trace"]["reason_code"], "other");
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await, [("hold".into(), "".into()), ("void".into(), "timeout".into())]);
}

/// A purchase whose completion timed out and whose merchant then answered nothing: the hold
/// stays. Returns the agent and the hold id.
async fn purchase_in_doubt(shop: &Shop, handle: &str, key: &str) -> (Agent, String) {
    shop.serve_once("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_once("GET", SESSION_PATH, unavailable()).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json").set_delay(Duration::from_secs(4))).await;
    shop.serve_once("POST", CANCEL_PATH, unavailable()).await;
    let agent = shop.app.create_agent(handle, 10_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), Some(key)).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "acp_outcome_unknown");
    assert_eq!(body["cause"]["code"], "acp_timeout");
    assert_eq!(body.get("voided"), None);
    // The merchant may have charged: the money stays held, and nothing is spent yet; the hold is
    // marked unknown, so it does not lapse at its TTL.
    assert_eq!(shop.money(&agent).await, (0, JACKET));
    assert_eq!(shop.events(&agent).await.last(), Some(&("unknown".into(), "acp_timeout".into())));
    (agent, body["hold_id"].as_str().expect("hold id").to_owned())
}

#[tokio::test]
async fn acp_a_completion_in_doubt_keeps_the_hold_and_a_retry_settles_it_once() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    let (agent, hold) = purchase_in_doubt(&shop, "in-doubt", "jacket-1").await;

    // The merchant did complete it. The retry with the same key resumes the same hold and
    // settles it, without asking the PSP or completing again.
    shop.serve("GET", SESSION_PATH, answer(200, "session_completed.json")).await;
    let (status, body) = shop.checkout(&agent, pay_session(), Some("jacket-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hold_id"], hold.as_str());
    assert_eq!(body["order"]["id"], "ord_abc123");
    assert_eq!(shop.money(&agent).await, (JACKET, 0));

    let (status, again) = shop.checkout(&agent, pay_session(), Some("jacket-1")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["receipt"], body["receipt"]);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(received(&shop.psp, "POST", DELEGATE_PATH).await.len(), 1);
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1);
}

#[tokio::test]
async fn acp_cancel_voids_a_held_purchase_once_the_merchant_confirms() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    let (agent, hold) = purchase_in_doubt(&shop, "gives-up", "jacket-2").await;

    shop.serve("POST", CANCEL_PATH, answer(200, "session_canceled.json")).await;
    let (status, body) = shop.cancel(&agent, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    assert_eq!(body["hold_id"], hold.as_str());
    assert_eq!(body["released_micros"], JACKET);
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await.last(), Some(&("void".into(), "canceled_by_agent".into())));
    let cancels = received(&shop.merchant, "POST", CANCEL_PATH).await;
    assert!(cancels.iter().all(|request| header(request, "idempotency-key").starts_with(&format!("{hold}:cancel:"))));

    // A retry of the purchase finds the session canceled, and spends nothing.
    shop.serve("GET", SESSION_PATH, answer(200, "session_canceled.json")).await;
    let (status, body) = shop.checkout(&agent, pay_session(), Some("jacket-2")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("acp_session_not_ready")), "{body}");
    assert_eq!(shop.money(&agent).await, (0, 0));

    // Another agent's hold cannot be canceled with this agent's token.
    let stranger = shop.app.create_agent("stranger", 10_000_000, None).await;
    let (status, body) = shop.cancel(&stranger, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_hold")), "{body}");
}

#[tokio::test]
async fn acp_a_retried_checkout_with_the_same_key_pays_once() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    // The merchant is still processing the first completion: the client waits as told and asks
    // again with the same key.
    shop.serve_once(
        "POST",
        COMPLETE_PATH,
        answer(409, "error_idempotency_in_flight.json").insert_header("Retry-After", "0"),
    )
    .await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json")).await;
    let agent = shop.app.create_agent("retrier", 10_000_000, None).await;

    let (status, first) = shop.checkout(&agent, pay_session(), Some("order-7")).await;
    assert_eq!(status, 200, "{first}");
    let hold = first["hold_id"].as_str().expect("hold id");
    let completions = received(&shop.merchant, "POST", COMPLETE_PATH).await;
    assert_eq!(completions.len(), 2);
    assert!(completions.iter().all(|request| header(request, "idempotency-key") == format!("{hold}:complete")));

    let (status, second) = shop.checkout(&agent, pay_session(), Some("order-7")).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["replayed"], true);
    assert_eq!(second["hold_id"], hold);
    assert_eq!(second["receipt"], first["receipt"]);

    // The same key for another purchase is a conflict, not a payment.
    let mut other_session: Value = serde_json::from_str(&fixture("session_ready.json")).expect("fixture");
    other_session["id"] = json!("checkout_session_456");
    shop.serve(
        "GET",
        "/checkout_sessions/checkout_session_456",
        ResponseTemplate::new(200).set_body_json(other_session),
    )
    .await;
    let other = json!({ "merchant": MERCHANT, "checkout_session_id": "checkout_session_456" });
    let (status, third) = shop.checkout(&agent, other, Some("order-7")).await;
    assert_eq!((status, third["code"].as_str()), (422, Some("idempotency_conflict")), "{third}");

    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(received(&shop.psp, "POST", DELEGATE_PATH).await.len(), 1);
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 2);
    let settles = shop.events(&agent).await.into_iter().filter(|(event, _)| event == "settle").count();
    assert_eq!(settles, 1);
}

#[tokio::test]
async fn acp_a_duplicate_while_the_first_is_in_flight_is_a_409() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json").set_delay(Duration::from_millis(1500)))
        .await;
    let agent = shop.app.create_agent("impatient", 10_000_000, None).await;

    let (http, url, token) = (shop.app.http.clone(), shop.app.url("/v1/acp/checkouts"), agent.token.clone());
    let first = tokio::spawn(async move {
        let response = http.post(url).bearer_auth(token).json(&pay_session()).send().await.expect("first");
        response.status().as_u16()
    });
    wait_for("the first purchase to hold", Duration::from_secs(10), || {
        let (shop, agent) = (&shop, &agent);
        async move { shop.money(agent).await.1 == JACKET }
    })
    .await;
    // Without an Idempotency-Key the purchase is keyed by merchant and session: the same one.
    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("idempotency_in_flight")), "{body}");

    assert_eq!(first.await.expect("first finishes"), 200);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1);
}

#[tokio::test]
async fn acp_sessions_that_cannot_be_paid_get_clear_codes_and_hold_nothing() {
    let shop = shop().await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    let agent = shop.app.create_agent("careful", 10_000_000, None).await;
    // (merchant's answer to the session read, status, code)
    let cases = [
        ("session_not_ready.json", 409, "acp_session_not_ready"),
        ("session_canceled.json", 409, "acp_session_not_ready"),
        ("session_wrong_currency.json", 422, "acp_currency_not_supported"),
        ("session_ready_no_delegate_handler.json", 422, "acp_no_delegate_handler"),
        ("session_fractional_total.json", 502, "acp_bad_total"),
        ("session_without_total.json", 502, "acp_bad_total"),
        ("session_malformed_total_string.json", 502, "acp_malformed_response"),
        ("session_malformed_missing_fields.json", 502, "acp_malformed_response"),
    ];
    for (fixture_name, want_status, want_code) in cases {
        shop.merchant.reset().await;
        shop.serve("GET", SESSION_PATH, answer(200, fixture_name)).await;
        let (status, body) = shop.checkout(&agent, pay_session(), None).await;
        assert_eq!((status, body["code"].as_str()), (want_status, Some(want_code)), "{fixture_name}: {body}");
        assert_eq!(body["checkout_session_id"], SESSION, "{fixture_name}");
        assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty(), "{fixture_name}");
    }
    // A session that is not ready says what the buyer would have to fix.
    shop.merchant.reset().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_not_ready.json")).await;
    let (_, not_ready) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(
        not_ready["detail"],
        "checkout session is not_ready_for_payment, not ready_for_payment (missing: A shipping address is required.)"
    );

    assert!(received(&shop.psp, "POST", DELEGATE_PATH).await.is_empty());
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert!(shop.events(&agent).await.is_empty(), "nothing was held or logged");
}

#[tokio::test]
async fn acp_a_session_someone_else_completed_is_not_paid_again() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_completed.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    let agent = shop.app.create_agent("latecomer", 10_000_000, None).await;

    // Only the hold can tell a purchase of this agent's (resumed) from someone else's payment;
    // this one is new, so it is voided at once.
    let (status, body) = shop.checkout(&agent, pay_session(), Some("late-1")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("acp_session_not_ready")), "{body}");
    assert_eq!(body["voided"], true);
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await, [("hold".into(), "".into()), ("void".into(), "session_not_ready".into())]);
    assert!(received(&shop.psp, "POST", DELEGATE_PATH).await.is_empty());
    assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty());
}

#[tokio::test]
async fn acp_items_create_a_session_with_a_stable_key_and_merchant_errors_reach_the_agent() {
    let shop = shop().await;
    shop.serve("POST", "/checkout_sessions", answer(201, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json")).await;
    let agent = shop.app.create_agent("creator", 10_000_000, None).await;

    let order = json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-jacket" });
    let (status, body) = shop.checkout(&agent, order.clone(), Some("from-items-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checkout_session_id"], SESSION);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    let creations = received(&shop.merchant, "POST", "/checkout_sessions").await;
    assert_eq!(creations.len(), 1);
    let created = json_body(&creations[0]);
    assert_eq!(created["line_items"], json!([{ "id": "item_123" }]));
    assert_eq!(created["currency"], "usd");
    assert_eq!(created["capabilities"], json!({ "interventions": { "supported": [] } }));
    let create_key = header(&creations[0], "idempotency-key").to_owned();
    assert!(create_key.starts_with("create_"), "{create_key}");

    // A retry with the agent's key asks the merchant with the same key, and pays nothing more.
    let (status, again) = shop.checkout(&agent, order, Some("from-items-1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    let creations = received(&shop.merchant, "POST", "/checkout_sessions").await;
    assert_eq!(header(&creations[1], "idempotency-key"), create_key);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));

    // The merchant's own code, message and param reach the agent.
    shop.merchant.reset().await;
    shop.serve("POST", "/checkout_sessions", answer(400, "error_invalid_item.json")).await;
    let bad = json!({ "merchant": MERCHANT, "items": [{ "id": "invalid_item" }] });
    let (status, body) = shop.checkout(&agent, bad, None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "acp_merchant_error");
    assert_eq!(body["detail"], "The item ID 'invalid_item' does not exist.");
    assert_eq!(body["provider_error"]["code"], "invalid_item_id");
    assert_eq!(body["provider_error"]["param"], "$.line_items[0].item.id");
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
}

#[tokio::test]
async fn acp_refuses_bad_requests_before_calling_anyone() {
    // Without configuration.
    let bare = spawn_app_with(AppOptions::default()).await;
    let agent = bare.create_agent("no-acp", 10_000_000, None).await;
    let (status, body) = bare.agent_call(&agent.token, Method::POST, "/v1/acp/checkouts", Some(pay_session())).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("acp_not_configured")), "{body}");

    let shop = shop().await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("sloppy", 10_000_000, None).await;
    // A forged token is refused before any merchant is asked anything.
    let last = if agent.token.ends_with('0') { "1" } else { "0" };
    let forged = Agent {
        id: agent.id.clone(),
        token: format!("{}{last}", &agent.token[..agent.token.len() - 1]),
        tree: agent.tree.clone(),
    };
    let (status, body) = shop.checkout(&forged, pay_session(), None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");
    let (status, body) = shop.cancel(&forged, json!({ "merchant": MERCHANT })).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("invalid_token")), "{body}");

    let cases = [
        (json!({ "merchant": "nobody", "checkout_session_id": SESSION }), 422, "acp_unknown_merchant"),
        (json!({ "merchant": MERCHANT }), 422, "invalid_body"),
        (
            json!({ "merchant": MERCHANT, "checkout_session_id": SESSION, "items": [{ "id": "x" }] }),
            422,
            "invalid_body",
        ),
        (json!({ "merchant": MERCHANT, "items": [] }), 422, "invalid_body"),
        (json!({ "merchant": MERCHANT, "checkout_session_id": "../agentic_commerce" }), 422, "acp_invalid_input"),
        (json!({ "merchant": MERCHANT, "checkout_session_id": SESSION, "tip": 5 }), 422, "invalid_body"),
    ];
    for (body, want_status, want_code) in cases {
        let (status, answer) = shop.checkout(&agent, body.clone(), None).await;
        assert_eq!((status, answer["code"].as_str()), (want_status, Some(want_code)), "{body}: {answer}");
    }
    let merchant_calls = shop.merchant.received_requests().await.expect("recording").len();
    assert_eq!(merchant_calls, 0, "no merchant was called");
    assert!(shop.psp.received_requests().await.expect("recording").is_empty());
}

/// A fixture session with its `total` line set to `cents`.
fn with_total(fixture_name: &str, cents: u64) -> Value {
    let mut session: Value = serde_json::from_str(&fixture(fixture_name)).expect("fixture");
    for total in session["totals"].as_array_mut().expect("totals") {
        if total["type"] == "total" {
            total["amount"] = json!(cents);
        }
    }
    session
}

/// A fixture session with another status.
fn with_status(fixture_name: &str, status: &str) -> Value {
    let mut session: Value = serde_json::from_str(&fixture(fixture_name)).expect("fixture");
    session["status"] = json!(status);
    session
}

const WEBHOOK_SECRET: &str = "whsec_acp_test_0123456789";

fn alert_config(receiver: &MockServer) -> AlertConfig {
    let secret = WebhookSecret::new(WEBHOOK_SECRET.into()).expect("secret");
    let mut config = AlertConfig::new(&format!("{}/hooks", receiver.uri()), secret).expect("config");
    config.poll_interval = Duration::from_millis(20);
    config.retry_base = Duration::from_millis(20);
    config.retry_max = Duration::from_millis(200);
    config
}

// Issue 13, case 4: a completed order is never voided.
#[tokio::test]
async fn acp_an_order_completed_at_a_lower_total_is_settled_at_what_was_charged() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    let cheaper = with_total("session_completed.json", 200);
    shop.serve("POST", COMPLETE_PATH, ResponseTemplate::new(200).set_body_json(cheaper)).await;
    let agent = shop.app.create_agent("discounted", 10_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), Some("cheaper-1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["order"]["id"], "ord_abc123");
    assert_eq!(body["amount_micros"], 2_000_000);
    assert_eq!(body["total"], json!({ "amount": 200, "currency": "usd" }));
    assert_eq!(body["total_changed"], json!({ "read": 480, "completed": 200 }));
    assert_eq!(body["receipt"]["receipt"]["amount_micros"], 2_000_000);
    // The card was charged 200 cents: that is what is spent, and nothing stays held.
    assert_eq!(shop.money(&agent).await, (2_000_000, 0));
    assert_eq!(
        shop.events(&agent).await,
        [("hold".into(), "".into()), ("settle".into(), "".into()), ("note".into(), "total_changed".into())]
    );
    let note = shop.log_entry(&agent, "note").await;
    let detail: Value = serde_json::from_str(note["detail"].as_str().expect("detail")).expect("detail JSON");
    assert_eq!(
        (detail["read_minor_units"].as_str(), detail["completed_minor_units"].as_str()),
        (Some("480"), Some("200"))
    );

    let (status, again) = shop.checkout(&agent, pay_session(), Some("cheaper-1")).await;
    assert_eq!(
        (status, again["replayed"].as_bool(), again["amount_micros"].as_u64()),
        (200, Some(true), Some(2_000_000))
    );
    assert_eq!(shop.money(&agent).await, (2_000_000, 0));
}

#[tokio::test]
async fn acp_an_order_completed_above_the_hold_settles_the_hold_and_raises_an_incident() {
    let receiver = MockServer::start().await;
    Mock::given(method("POST")).and(path("/hooks")).respond_with(ResponseTemplate::new(200)).mount(&receiver).await;
    let shop = shop_of(ShopOptions { alerts: Some(alert_config(&receiver)), ..ShopOptions::default() }).await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed_total_changed.json")).await;
    let agent = shop.app.create_agent("overcharged", 20_000_000, None).await;

    let (status, body) = shop.checkout(&agent, pay_session(), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["total_changed"], json!({ "read": 480, "completed": 830 }));
    // The allowance capped what the PSP could charge at the hold: the hold is spent, not more.
    assert_eq!(body["amount_micros"], JACKET);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(
        shop.events(&agent).await,
        [
            ("hold".into(), "".into()),
            ("settle".into(), "".into()),
            ("note".into(), "incident_charged_above_hold".into())
        ]
    );
    // The token allowed the total read, not the merchant's new one.
    let delegation = json_body(&received(&shop.psp, "POST", DELEGATE_PATH).await[0]);
    assert_eq!(delegation["allowance"]["max_amount"], 480);
    wait_for("the incident webhook", Duration::from_secs(10), || {
        let receiver = &receiver;
        async move {
            let requests = receiver.received_requests().await.unwrap_or_default();
            requests.iter().any(|request| {
                let alert: Value = serde_json::from_slice(&request.body).unwrap_or_default();
                alert["type"] == "payment.incident"
                    && alert["data"]["reason"] == "incident_charged_above_hold"
                    && alert["data"]["detail"]["completed_minor_units"] == "830"
            })
        }
    })
    .await;
}

// Issue 13, case 6: a cancel resolves by reading the session.
#[tokio::test]
async fn acp_a_cancel_after_the_daemons_own_uses_a_merchant_key_that_cannot_collide() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    let (agent, hold) = purchase_in_doubt(&shop, "key-clash", "jacket-3").await;

    // A strict merchant: the daemon's own cancel key sent again with another body is a conflict.
    let daemons_key = header(&received(&shop.merchant, "POST", CANCEL_PATH).await[0], "idempotency-key").to_owned();
    assert!(daemons_key.starts_with(&format!("{hold}:cancel")), "{daemons_key}");
    Mock::given(method("POST"))
        .and(path(CANCEL_PATH))
        .and(wiremock::matchers::header("idempotency-key", daemons_key.as_str()))
        .respond_with(answer(422, "error_idempotency_conflict.json"))
        .mount(&shop.merchant)
        .await;
    shop.serve("POST", CANCEL_PATH, answer(200, "session_canceled.json")).await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;

    let (status, body) = shop.cancel(&agent, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "canceled");
    assert_eq!(body["released_micros"], JACKET);
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(shop.events(&agent).await.last(), Some(&("void".into(), "canceled_by_agent".into())));
    let cancels = received(&shop.merchant, "POST", CANCEL_PATH).await;
    let keys: Vec<&str> = cancels.iter().map(|request| header(request, "idempotency-key")).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1], "the agent's cancel has a key of its own");
}

#[tokio::test]
async fn acp_a_cancel_reads_the_session_and_voids_an_expired_one_or_settles_a_completed_one() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    let (agent, hold) = purchase_in_doubt(&shop, "session-gone", "jacket-4").await;
    // The session expired at the merchant, which refuses to cancel it again.
    shop.serve(
        "GET",
        SESSION_PATH,
        ResponseTemplate::new(200).set_body_json(with_status("session_canceled.json", "expired")),
    )
    .await;
    let invalid_state = r#"{"type":"invalid_request","code":"invalid_state","message":"session is expired"}"#;
    shop.serve("POST", CANCEL_PATH, ResponseTemplate::new(405).set_body_raw(invalid_state, "application/json")).await;
    let (status, body) = shop.cancel(&agent, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["status"].as_str(), body["session_status"].as_str()), (Some("canceled"), Some("expired")));
    assert_eq!(body["released_micros"], JACKET);
    assert_eq!(shop.money(&agent).await, (0, 0));

    // The merchant did charge this one: the cancel settles it and says so.
    shop.merchant.reset().await;
    let (payer, hold) = purchase_in_doubt(&shop, "charged-after-all", "jacket-5").await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_completed.json")).await;
    let (status, body) = shop.cancel(&payer, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("acp_already_completed")), "{body}");
    assert_eq!(body["settled_micros"], JACKET);
    assert_eq!(body["order_id"], "ord_abc123");
    assert_eq!(shop.money(&payer).await, (JACKET, 0));
    assert_eq!(shop.events(&payer).await.last().map(|(event, _)| event.as_str()), Some("settle"));
    // Only the daemon's own cancel (which got no answer) was sent for it.
    assert_eq!(received(&shop.merchant, "POST", CANCEL_PATH).await.len(), 1);
}

// Issue 13, case 7: one purchase per session at a time, and a session read back before paying.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acp_one_session_is_paid_by_one_purchase_at_a_time_whatever_the_keys_and_instances() {
    let shop = shop().await;
    let other = shop.second_instance().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json").set_delay(Duration::from_millis(1500)))
        .await;
    let agent = shop.app.create_agent("eager", 100_000_000, None).await;

    let purchases = (0..5).map(|n| {
        let app = if n % 2 == 0 { &shop.app } else { &other };
        let request = app
            .http
            .post(app.url("/v1/acp/checkouts"))
            .bearer_auth(&agent.token)
            .header("Idempotency-Key", format!("parallel-{n}"))
            .json(&pay_session());
        async move {
            let response = request.send().await.expect("checkout");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    });
    let answers = futures::future::join_all(purchases).await;
    let paid = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(paid, 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(status, _)| *status != 200) {
        assert_eq!((*status, body["code"].as_str()), (409, Some("acp_session_busy")), "{body}");
    }
    assert_eq!(received(&shop.psp, "POST", DELEGATE_PATH).await.len(), 1, "one token delegated");
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1, "one completion");
    assert_eq!(shop.money(&agent).await, (JACKET, 0));

    // Afterwards the session reads completed: another key gets no token and no completion.
    shop.merchant.reset().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_completed.json")).await;
    let (status, body) = shop.checkout(&agent, pay_session(), Some("parallel-5")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("acp_session_not_ready")), "{body}");
    assert_eq!(received(&shop.psp, "POST", DELEGATE_PATH).await.len(), 1);
    assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty());
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
}

#[tokio::test]
async fn acp_a_resumed_items_purchase_reads_the_session_back_and_never_completes_a_canceled_one() {
    let shop = shop_with(Duration::from_millis(1000)).await;
    // The merchant replays its first answer to the create, whatever happened to the session since.
    shop.serve("POST", "/checkout_sessions", answer(201, "session_ready.json")).await;
    shop.serve_once("GET", SESSION_PATH, unavailable()).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(200, "session_completed.json").set_delay(Duration::from_secs(4))).await;
    shop.serve_once("POST", CANCEL_PATH, unavailable()).await;
    let agent = shop.app.create_agent("resumer", 10_000_000, None).await;
    let order = json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-jacket" });

    let (status, body) = shop.checkout(&agent, order.clone(), Some("items-1")).await;
    assert_eq!((status, body["code"].as_str()), (504, Some("acp_outcome_unknown")), "{body}");
    assert_eq!(shop.money(&agent).await, (0, JACKET));

    // Meanwhile the session was canceled at the merchant.
    shop.serve("GET", SESSION_PATH, answer(200, "session_canceled.json")).await;
    let (status, body) = shop.checkout(&agent, order, Some("items-1")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("acp_session_not_ready")), "{body}");
    assert_eq!(body["voided"], true);
    assert_eq!(shop.money(&agent).await, (0, 0));
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1, "no complete to a canceled session");
}

// Issue 13, case 10: the key stands for the whole request.
#[tokio::test]
async fn acp_the_same_key_with_another_request_is_a_conflict_before_any_merchant_call() {
    let shop = shop().await;
    shop.serve("POST", "/checkout_sessions", answer(201, "session_ready.json")).await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("consistent", 100_000_000, None).await;

    let order = json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-jacket" });
    let (status, first) = shop.checkout(&agent, order.clone(), Some("same-key")).await;
    assert_eq!(status, 200, "{first}");
    let others = [
        json!({ "merchant": MERCHANT, "items": [{ "id": "item_456" }], "task": "buy-jacket" }),
        json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-boots" }),
        json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-jacket", "currency": "eur" }),
        json!({ "merchant": MERCHANT, "checkout_session_id": SESSION, "task": "buy-jacket" }),
    ];
    for other in others {
        let (status, body) = shop.checkout(&agent, other.clone(), Some("same-key")).await;
        assert_eq!((status, body["code"].as_str()), (422, Some("idempotency_conflict")), "{other}: {body}");
    }
    // Key order and spacing do not make another request; the replay keeps the first status.
    let reordered = json!({ "task": "buy-jacket", "items": [{ "id": "item_123" }], "merchant": MERCHANT });
    let (status, again) = shop.checkout(&agent, reordered, Some("same-key")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    assert_eq!(again["receipt"], first["receipt"]);
    // The merchant saw the first request (and its replay) only.
    let creations = received(&shop.merchant, "POST", "/checkout_sessions").await;
    assert!(creations.iter().all(|request| json_body(request)["line_items"] == json!([{ "id": "item_123" }])));
    assert!(creations.iter().all(|request| json_body(request)["currency"] == "usd"));
    assert_eq!(received(&shop.merchant, "GET", SESSION_PATH).await.len(), 0);
    assert_eq!(shop.money(&agent).await, (JACKET, 0));

    // A refused purchase replays its own status.
    shop.merchant.reset().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve("POST", COMPLETE_PATH, answer(402, "error_payment_declined.json")).await;
    let (status, declined) = shop.checkout(&agent, pay_session(), Some("declined-key")).await;
    assert_eq!((status, declined["code"].as_str()), (422, Some("acp_merchant_error")), "{declined}");
    let (status, replayed) = shop.checkout(&agent, pay_session(), Some("declined-key")).await;
    assert_eq!(
        (status, replayed["code"].as_str(), replayed["replayed"].as_bool()),
        (422, Some("acp_merchant_error"), Some(true))
    );
}

// Issue 13, case 8: nothing reaches a merchant for an agent that may not pay it.
#[tokio::test]
async fn acp_a_revoked_or_denied_agent_reaches_neither_merchant_nor_psp_and_is_refused_once() {
    let shop = shop().await;
    shop.serve("POST", "/checkout_sessions", answer(201, "session_ready.json")).await;
    shop.serve_happy_path().await;
    let revoked = shop.app.create_agent("revoked", 10_000_000, None).await;
    let (status, body) = shop
        .app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", revoked.id), Some(json!({ "reason": "test" })))
        .await;
    assert_eq!(status, 200, "{body}");
    let no_acp = shop.app.create_agent("no-acp", 10_000_000, None).await;
    let not_acme = shop.app.create_agent("not-acme", 10_000_000, None).await;
    for (agent, controls) in [
        (&no_acp, json!({ "protocols": { "deny": ["acp"] } })),
        (&not_acme, json!({ "services": { "deny": [MERCHANT] } })),
    ] {
        let (status, body) =
            shop.app.admin(Method::PUT, &format!("/v1/agents/{}/controls", agent.id), Some(controls)).await;
        assert_eq!(status, 200, "{body}");
    }
    let items = json!({ "merchant": MERCHANT, "items": [{ "id": "item_123" }], "task": "buy-jacket" });
    // (the agent, what it is told)
    for (agent, code) in [(&revoked, "agent_revoked"), (&no_acp, "protocol_denied"), (&not_acme, "service_denied")] {
        for request in [pay_session(), items.clone()] {
            let (status, body) = shop.checkout(agent, request, None).await;
            assert_eq!(body["code"], code, "{}: {body}", agent.id);
            assert!(status == 402 || status == 403, "{status} {body}");
        }
        let refusals: Vec<(String, String)> =
            shop.events(agent).await.into_iter().filter(|(event, _)| event == "refuse").collect();
        assert_eq!(refusals, [("refuse".to_owned(), code.to_owned()), ("refuse".to_owned(), code.to_owned())]);
        let refused = shop.log_entry(agent, "refuse").await;
        assert_eq!((refused["protocol"].as_str(), refused["service"].as_str()), (Some("acp"), Some(MERCHANT)));
        assert_eq!(refused["task"], "buy-jacket");
        let (status, report) =
            shop.app.admin(Method::GET, &format!("/v1/reports?format=json&agent={}", agent.id), None).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(
            (report["refusals"][0]["reason"].as_str(), report["refusals"][0]["count"].as_u64()),
            (Some(code), Some(2))
        );
    }
    assert!(shop.merchant.received_requests().await.expect("recording").is_empty(), "the merchant was called");
    assert!(shop.psp.received_requests().await.expect("recording").is_empty(), "the PSP was called");
    let scrape = crate::metrics::scrape_metrics(&shop.app).await;
    for code in ["agent_revoked", "protocol_denied", "service_denied"] {
        let counted =
            crate::metrics::counter(&scrape, "spendcap_refusals_total", &[("reason", code), ("protocol", "acp")]);
        assert_eq!(counted, 2, "{code}");
    }
}

// Issue 13, case 5: an unknown outcome never lapses into "nothing was spent".
#[tokio::test]
async fn acp_an_unknown_outcome_is_read_back_by_the_daemon_itself_and_settled() {
    let resolve =
        ResolvePolicy { attempts: 20, first_wait: Duration::from_millis(20), max_wait: Duration::from_millis(100) };
    let shop = shop_of(ShopOptions { timeout: Duration::from_millis(1000), resolve, ..ShopOptions::default() }).await;
    let (agent, hold) = purchase_in_doubt(&shop, "resolved-later", "jacket-6").await;

    // The merchant answers again, and did complete the order: the daemon settles it unasked.
    shop.serve("GET", SESSION_PATH, answer(200, "session_completed.json")).await;
    wait_for("the daemon to settle the purchase by itself", Duration::from_secs(10), || {
        let (shop, agent) = (&shop, &agent);
        async move { shop.money(agent).await == (JACKET, 0) }
    })
    .await;
    assert_eq!(shop.events(&agent).await.last().map(|(event, _)| event.as_str()), Some("settle"));
    // The retry with the same key is told the truth: this hold paid the order.
    let (status, body) = shop.checkout(&agent, pay_session(), Some("jacket-6")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["hold_id"].as_str(), body["order"]["id"].as_str()), (Some(hold.as_str()), Some("ord_abc123")));
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(received(&shop.psp, "POST", DELEGATE_PATH).await.len(), 1);
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1);
}

#[tokio::test]
async fn acp_an_unknown_outcome_stays_counted_past_the_hold_ttl_and_every_answer_says_so() {
    let resolve =
        ResolvePolicy { attempts: 2, first_wait: Duration::from_millis(20), max_wait: Duration::from_millis(20) };
    let shop = shop_of(ShopOptions { timeout: Duration::from_millis(1000), resolve, ..ShopOptions::default() }).await;
    let (agent, hold) = purchase_in_doubt(&shop, "never-told", "jacket-7").await;
    // The daemon's own read-backs get no answer either (the merchant has no session to show).
    wait_for("the daemon's read-backs", Duration::from_secs(10), || {
        let shop = &shop;
        async move { received(&shop.merchant, "GET", SESSION_PATH).await.len() >= 4 }
    })
    .await;

    // Long past the hold's TTL the money is still counted, and shown as of unknown outcome.
    shop.app.clock.advance_ms(24 * 3600 * 1000);
    let (status, me) = shop.app.agent_call(&agent.token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!((me["held_micros"].as_u64(), me["unknown_micros"].as_u64()), (Some(JACKET), Some(JACKET)), "{me}");
    assert_eq!(shop.money(&agent).await, (0, JACKET));
    let (status, unknown) =
        shop.app.admin(Method::GET, &format!("/v1/holds?state=unknown&agent={}", agent.id), None).await;
    assert_eq!(status, 200, "{unknown}");
    assert!(unknown.to_string().contains(&hold), "{unknown}");

    // A retry with the same key resumes the same purchase and says the outcome is unknown,
    // never that the hold expired with nothing spent.
    shop.merchant.reset().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve("POST", COMPLETE_PATH, unavailable()).await;
    shop.serve("POST", CANCEL_PATH, unavailable()).await;
    let (status, body) = shop.checkout(&agent, pay_session(), Some("jacket-7")).await;
    assert_eq!((status, body["code"].as_str()), (504, Some("acp_outcome_unknown")), "{body}");
    assert_eq!(body["hold_id"], hold.as_str());
    assert_eq!(shop.money(&agent).await, (0, JACKET));
    // So does a cancel the merchant does not confirm: the money stays held.
    let (status, body) = shop.cancel(&agent, json!({ "merchant": MERCHANT, "hold_id": hold })).await;
    assert_eq!((status, body["code"].as_str()), (504, Some("acp_outcome_unknown")), "{body}");
    assert_eq!(shop.money(&agent).await, (0, JACKET));
}

// Issue 13: over a bad day at the merchant, what the PSP charged is exactly what the ledger
// settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acp_over_declines_timeouts_lost_answers_total_changes_and_retries_the_psp_charged_what_the_ledger_settled() {
    use spendcap::sim::acp::{AcpShop, CompletionFault};

    let catalog = [("tee", "T-shirt", 1_500), ("mug", "Mug", 900), ("hat", "Hat", 2_200)];
    let sim = AcpShop::start(MERCHANT, &catalog).await.expect("simulated merchant and PSP");
    let mut config = AcpConfig::from_json(&sim.config_json().to_string()).expect("valid ACP configuration");
    config.conformance = ConformanceSink::to_dir(ConformanceSink::test_dir());
    config.timeout = Duration::from_millis(400);
    config.resolve =
        ResolvePolicy { attempts: 40, first_wait: Duration::from_millis(20), max_wait: Duration::from_millis(200) };
    let app = spawn_app_with(AppOptions {
        protocols: ProtocolConfig { acp: config, ..Default::default() },
        ..Default::default()
    })
    .await;
    let agent = app.create_agent("bad-day", 1_000_000_000, None).await;

    let lost = Duration::from_millis(900);
    sim.push_faults([
        CompletionFault::Decline,
        CompletionFault::LoseAnswer(lost),
        CompletionFault::Discount(300),
        CompletionFault::Unavailable,
        CompletionFault::Stall(lost),
        CompletionFault::LoseAnswer(lost),
        CompletionFault::Decline,
        CompletionFault::Discount(50),
        CompletionFault::Unavailable,
        CompletionFault::LoseAnswer(lost),
        CompletionFault::Stall(lost),
        CompletionFault::Discount(1),
    ]);
    // Some of the read-backs get no answer either.
    sim.fail_reads(3);

    let items = ["tee", "mug", "hat"];
    let mut answers = Vec::new();
    for round in 0..5 {
        let purchases = (0..4).map(|slot| {
            let n = round * 4 + slot;
            let lines: Vec<Value> = (0..=(n % 3)).map(|i| json!({ "id": items[(n + i) % 3] })).collect();
            let order = json!({ "merchant": MERCHANT, "items": lines, "task": format!("errand-{}", n % 3) });
            let key = format!("bad-day-{n}");
            let (app, token) = (&app, &agent.token);
            async move {
                let send = || {
                    let request = app
                        .http
                        .post(app.url("/v1/acp/checkouts"))
                        .bearer_auth(token)
                        .header("Idempotency-Key", &key)
                        .json(&order);
                    async move {
                        let response = request.send().await.expect("checkout");
                        let status = response.status().as_u16();
                        (status, response.json::<Value>().await.expect("JSON"))
                    }
                };
                // Every fourth purchase is sent twice at once; an answer in doubt is retried with
                // the same key.
                let mut last = if n % 4 == 0 { futures::future::join(send(), send()).await.0 } else { send().await };
                for _ in 0..3 {
                    let in_doubt = last.0 == 504 || last.1["code"] == "idempotency_in_flight";
                    if !in_doubt {
                        break;
                    }
                    last = send().await;
                }
                last
            }
        });
        answers.extend(futures::future::join_all(purchases).await);
    }

    // Every doubt ends: the daemon reads the sessions back by itself.
    wait_for("every ACP hold to be resolved", Duration::from_secs(30), || {
        let (app, agent) = (&app, &agent);
        async move { app.show(&agent.id).await["held_micros"] == 0 }
    })
    .await;
    let outcomes: Vec<String> = answers
        .iter()
        .map(|(status, body)| format!("{status} {}", body["code"].as_str().unwrap_or("completed")))
        .collect();
    let log = app.log().await;
    let settled: u64 = log
        .iter()
        .filter(|entry| entry["event"] == "settle" && entry["protocol"] == "acp")
        .map(|entry| entry["amount"].as_u64().expect("amount"))
        .sum();
    let charged = sim.charged_cents();
    assert_eq!(settled, charged * 10_000, "settled {settled} micros, the PSP charged {charged} cents: {outcomes:?}");
    assert_eq!(app.show(&agent.id).await["spent_micros"], settled);
    // The bad day did happen: paid orders, declines, changed totals and doubts that were resolved.
    let count = |event: &str, reason: &str| {
        log.iter().filter(|entry| entry["event"] == event && entry["reason"].as_str().unwrap_or("") == reason).count()
    };
    assert!(charged > 0 && count("void", "merchant_declined") > 0, "{outcomes:?}");
    assert!(count("note", "total_changed") > 0, "{outcomes:?}");
    assert!(log.iter().any(|entry| entry["event"] == "unknown"), "some outcome was unknown for a while");
    assert!(answers.iter().any(|(status, _)| *status == 200));
}

/// The ledger calls and provider requests of one ACP checkout, as Redis and the providers saw
/// them (see `calls.rs`): precheck, the key's fingerprint (a read), the session's exclusive
/// budget (created once per session),
/// the hold, the settle (the receipt signed ahead and linked, and the answer stored for
/// retries, in the same call); merchant: read the session, complete it; PSP: one delegation.
#[tokio::test]
async fn acp_a_checkout_costs_its_counted_ledger_calls_and_provider_requests() {
    let shop = shop().await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("counted", 10_000_000, None).await;
    let redis = shop.app.redis.clone().expect("a Redis ledger");
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let (status, body) = shop.checkout(&agent, pay_session(), Some("counted-1")).await;
    let calls = crate::calls::purchase_calls(calls.stop(&redis));
    assert_eq!((status, body["status"].as_str()), (200, Some("completed")), "{body}");
    assert_eq!(
        calls,
        [
            "FCALL spendcap_precheck",
            // The agent's Idempotency-Key read before anyone is called (another request under
            // the key is refused before the merchant is asked anything).
            "HGET",
            "FCALL spendcap_create_bucket",
            "FCALL spendcap_hold",
            "FCALL spendcap_settle",
        ],
        "ledger calls of one checkout"
    );
    let merchant = shop.merchant.received_requests().await.expect("recorded");
    let psp = shop.psp.received_requests().await.expect("recorded");
    let verbs: Vec<String> = merchant.iter().map(|r| format!("{} {}", r.method, r.url.path())).collect();
    assert_eq!(verbs, [format!("GET {SESSION_PATH}"), format!("POST {COMPLETE_PATH}")], "merchant requests");
    assert_eq!(psp.len(), 1, "one delegated payment token");
    // The answer stored by the settle is what a retry gets.
    let (status, again) = shop.checkout(&agent, pay_session(), Some("counted-1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    assert_eq!(again["receipt"], body["receipt"]);
}

/// A declined checkout: the void that releases the hold also stores the answer for the key's
/// retries, in the same ledger call.
#[tokio::test]
async fn acp_a_declined_checkout_costs_its_counted_ledger_calls_and_replays_its_answer() {
    let shop = shop().await;
    shop.serve("GET", SESSION_PATH, answer(200, "session_ready.json")).await;
    shop.serve_delegation(answer(201, "psp_delegate_payment_response.json")).await;
    shop.serve_once("POST", COMPLETE_PATH, answer(200, "complete_declined_session.json")).await;
    let agent = shop.app.create_agent("declined-counted", 10_000_000, None).await;
    let redis = shop.app.redis.clone().expect("a Redis ledger");
    let calls = crate::calls::LedgerCalls::watch(&redis);
    let (status, body) = shop.checkout(&agent, pay_session(), Some("declined-1")).await;
    let calls = crate::calls::purchase_calls(calls.stop(&redis));
    assert_eq!((status, body["code"].as_str()), (422, Some("acp_merchant_declined")), "{body}");
    assert_eq!(
        calls,
        [
            "FCALL spendcap_precheck",
            "HGET",
            "FCALL spendcap_create_bucket",
            "FCALL spendcap_hold",
            "FCALL spendcap_note",
            "FCALL spendcap_void",
        ],
        "ledger calls of a declined checkout (the void stores the answer)"
    );
    let (status, again) = shop.checkout(&agent, pay_session(), Some("declined-1")).await;
    assert_eq!(
        (status, again["code"].as_str(), again["replayed"].as_bool()),
        (422, Some("acp_merchant_declined"), Some(true))
    );
    assert_eq!(again["released_micros"], body["released_micros"], "{again}");
    assert_eq!(shop.money(&agent).await, (0, 0));
}

#[tokio::test]
async fn acp_a_checkout_waiting_for_approval_sends_nothing_and_completes_once_approved() {
    let shop = shop().await;
    shop.serve_happy_path().await;
    let agent = shop.app.create_agent("approved-shopper", 10_000_000, None).await;
    let rule = json!({ "approval": { "protocols": ["acp"], "ttl_secs": 600 } });
    let (status, shown) = shop.app.admin(Method::PUT, "/v1/agents/approved-shopper/controls", Some(rule)).await;
    assert_eq!(status, 200, "{shown}");

    let (status, waiting) = shop.checkout(&agent, pay_session(), Some("jacket-1")).await;
    assert_eq!((status, waiting["code"].as_str()), (202, Some("approval_required")), "{waiting}");
    assert_eq!(waiting["reason"], "listed_protocol");
    assert!(received(&shop.psp, "POST", DELEGATE_PATH).await.is_empty(), "no delegated token before approval");
    assert!(received(&shop.merchant, "POST", COMPLETE_PATH).await.is_empty(), "nothing completed before approval");
    assert_eq!(shop.money(&agent).await, (0, JACKET), "the total is held meanwhile");
    let id = waiting["approval_id"].as_str().expect("id").to_owned();

    let (status, decided) =
        shop.app.admin(Method::POST, &format!("/v1/approvals/{id}/approve"), Some(json!({ "note": "ok" }))).await;
    assert_eq!(status, 200, "{decided}");
    let (status, body) = shop.checkout(&agent, pay_session(), Some("jacket-1")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("completed")), "{body}");
    assert_eq!(body["hold_id"], id.as_str(), "paid from the approved reservation");
    assert_eq!(shop.money(&agent).await, (JACKET, 0));
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1);
    let (status, again) = shop.checkout(&agent, pay_session(), Some("jacket-1")).await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)), "{again}");
    assert_eq!(received(&shop.merchant, "POST", COMPLETE_PATH).await.len(), 1, "completed once");
}
