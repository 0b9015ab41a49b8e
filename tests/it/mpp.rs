//! The MPP endpoint end to end: a real daemon on a real Redis paying a resource server built with
//! the official `mpp` crate's server (`Mpp::create_stripe`, the `stripe` charge method), whose
//! Stripe API — and the PSP that mints the daemon's Shared Payment Tokens — is a stub over real
//! HTTP that keeps Stripe's rules that matter here: a token is bounded to an amount, a currency
//! and an expiry, and a repeated `Idempotency-Key` gets the first answer back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::mpp::server::{Mpp, StripeChargeMethod, StripeConfig};
use adapters::conformance::ConformanceSink;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::mpp::{MppConfig, MppPsp};
use spendcap::protocols::ProtocolConfig;

use crate::support::{spawn_app_with, AppOptions, TestApp};

const PRICE: &str = "0.10";
const PRICE_MICROS: u64 = 100_000;
const HMAC_SECRET: &str = "test-hmac-secret-of-at-least-32-bytes!!";

/// A minted token and the form it was minted with.
type Minted = (String, HashMap<String, String>);

/// What the Stripe stub saw: minted tokens (by idempotency key) and charges (by idempotency key).
#[derive(Default)]
pub(crate) struct StripeState {
    /// idempotency key → (token, its form).
    tokens: Mutex<HashMap<String, Minted>>,
    pub(crate) mint_requests: AtomicUsize,
    /// idempotency key → (PaymentIntent id, amount in cents).
    pub(crate) charges: Mutex<HashMap<String, (String, u64)>>,
    refused_charges: AtomicUsize,
    /// Every charge is declined (the card is refused).
    decline: AtomicBool,
}

async fn mint(
    State(stripe): State<Arc<StripeState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    stripe.mint_requests.fetch_add(1, Ordering::SeqCst);
    if !headers.get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("Basic ")) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": {"message": "no key"}}))).into_response();
    }
    let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return (StatusCode::BAD_REQUEST, "no idempotency key").into_response();
    };
    let mut tokens = stripe.tokens.lock().expect("lock");
    let token = tokens
        .entry(key)
        .or_insert_with(|| (format!("spt_{}", hex::encode(rand::random::<[u8; 8]>())), form))
        .0
        .clone();
    Json(json!({ "id": token, "object": "shared_payment.issued_token" })).into_response()
}

async fn payment_intent(
    State(stripe): State<Arc<StripeState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if let Some((id, _)) = stripe.charges.lock().expect("lock").get(&key) {
        return Json(json!({ "id": id, "status": "succeeded" })).into_response();
    }
    let spt = form.get("shared_payment_granted_token").cloned().unwrap_or_default();
    let amount: u64 = form.get("amount").and_then(|a| a.parse().ok()).unwrap_or(u64::MAX);
    let limits = stripe.tokens.lock().expect("lock").values().find(|(token, _)| *token == spt).map(|(_, f)| f.clone());
    let within = limits.is_some_and(|limits| {
        let max: u64 = limits.get("usage_limits[max_amount]").and_then(|m| m.parse().ok()).unwrap_or(0);
        let expires: u64 = limits.get("usage_limits[expires_at]").and_then(|e| e.parse().ok()).unwrap_or(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
        amount <= max && limits.get("usage_limits[currency]") == form.get("currency") && now < expires
    });
    if !within || stripe.decline.load(Ordering::SeqCst) {
        stripe.refused_charges.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::PAYMENT_REQUIRED, Json(json!({"error": {"code": "shared_payment_token_limit"}})))
            .into_response();
    }
    let id = format!("pi_{}", hex::encode(rand::random::<[u8; 6]>()));
    stripe.charges.lock().expect("lock").insert(key, (id.clone(), amount));
    Json(json!({ "id": id, "status": "succeeded" })).into_response()
}

async fn start(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

/// The resource server: the official SDK's Stripe charge at `GET /paid`.
pub(crate) struct Shop {
    mpp: Mpp<StripeChargeMethod>,
    /// Every `Authorization` a paid request carried.
    pub(crate) credentials: Mutex<Vec<String>>,
    /// The next paid request is charged, then its answer never comes (the connection hangs).
    hang_once: AtomicBool,
    /// An `amount` the receipts report (base units), if any.
    reported_amount: Mutex<Option<String>>,
}

async fn paid(State(shop): State<Arc<Shop>>, headers: HeaderMap) -> Response {
    let challenge = || {
        let challenge = shop.mpp.stripe_charge(PRICE).expect("challenge");
        let header = ::mpp::format_www_authenticate(&challenge).expect("header");
        (StatusCode::PAYMENT_REQUIRED, [("www-authenticate", header)], "payment required").into_response()
    };
    let Some(authorization) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return challenge();
    };
    shop.credentials.lock().expect("lock").push(authorization.to_owned());
    let Ok(credential) = ::mpp::parse_authorization(authorization) else { return challenge() };
    match shop.mpp.stripe_verify_charge(&credential, PRICE).await {
        Ok(mut receipt) => {
            if let Some(amount) = shop.reported_amount.lock().expect("lock").clone() {
                receipt.extensions.insert("amount".to_owned(), Value::String(amount));
            }
            if shop.hang_once.swap(false, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let receipt = ::mpp::format_receipt(&receipt).expect("receipt");
            (StatusCode::OK, [("payment-receipt", receipt)], "the paid content").into_response()
        }
        Err(_) => challenge(),
    }
}

pub(crate) struct World {
    pub(crate) app: TestApp,
    pub(crate) stripe: Arc<StripeState>,
    pub(crate) shop: Arc<Shop>,
    shop_url: String,
}

/// Where the credentials sent are recorded: beside `target/conformance` (which the shared
/// `conform` tool reads) and `target/conformance-sdk` (`scripts/conform-sdk`), since neither
/// knows MPP; this test reads them back with the official crate instead.
fn mpp_conformance_dir() -> std::path::PathBuf {
    ConformanceSink::test_dir().with_file_name("conformance-mpp")
}

pub(crate) async fn world() -> World {
    world_with(None).await
}

/// The world, with the daemon's PSP at `psp` instead of the Stripe stub.
async fn world_with(psp: Option<String>) -> World {
    let stripe = Arc::new(StripeState::default());
    let stripe_url = start(
        Router::new()
            .route(adapters::mpp::SPT_PATH, post(mint))
            .route("/v1/payment_intents", post(payment_intent))
            .with_state(stripe.clone()),
    )
    .await;
    let mpp = Mpp::create_stripe(
        ::mpp::server::stripe(StripeConfig {
            secret_key: "sk_test_shop",
            network_id: "net_shop",
            payment_method_types: &["card"],
            currency: "usd",
            decimals: 2,
        })
        .realm("shop.example")
        .secret_key(HMAC_SECRET)
        .stripe_api_base(&stripe_url),
    )
    .expect("the official server builds");
    let shop = Arc::new(Shop {
        mpp,
        credentials: Mutex::new(Vec::new()),
        hang_once: AtomicBool::new(false),
        reported_amount: Mutex::new(None),
    });
    let shop_url = start(
        Router::new().route("/paid", get(paid)).route("/free", get(|| async { "free" })).with_state(shop.clone()),
    )
    .await;
    let mpp_config = MppConfig {
        psp: Some(MppPsp {
            base_url: psp.unwrap_or(stripe_url),
            secret_key: "sk_test_owner".to_owned(),
            payment_method: "pm_card_visa".to_owned(),
        }),
        allow_private: vec!["127.0.0.1".parse().expect("address")],
        timeout: Duration::from_millis(2_000),
        conformance: ConformanceSink::to_dir(mpp_conformance_dir()),
        ..MppConfig::default()
    };
    let app = spawn_app_with(AppOptions {
        protocols: ProtocolConfig { mpp: mpp_config, ..Default::default() },
        ..Default::default()
    })
    .await;
    World { app, stripe, shop, shop_url }
}

pub(crate) async fn fetch(world: &World, token: &str, key: Option<&str>, max: Option<u64>) -> (u16, Value) {
    let mut body = json!({ "url": format!("{}/paid", world.shop_url), "task": "research" });
    if let Some(max) = max {
        body["max_amount_micros"] = json!(max);
    }
    let mut request = world.app.http.post(world.app.url("/v1/mpp/fetch")).bearer_auth(token).json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

async fn me(app: &TestApp, token: &str) -> Value {
    let (status, body) = app.agent_call(token, Method::GET, "/v1/me", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn charged_cents(stripe: &StripeState) -> u64 {
    stripe.charges.lock().expect("lock").values().map(|(_, cents)| cents).sum()
}

#[tokio::test]
async fn a_stripe_charge_is_held_paid_once_with_a_token_bounded_to_the_hold_and_settled() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-buyer", 1_000_000, None).await;
    let (status, body) = fetch(&world, &agent.token, Some("buy-1"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], 200);
    assert_eq!(body["body"], "the paid content");
    let payment = &body["payment"];
    assert_eq!(payment["status"], "settled");
    assert_eq!(payment["amount_micros"], PRICE_MICROS);
    assert_eq!((payment["method"].as_str(), payment["intent"].as_str()), (Some("stripe"), Some("charge")));
    assert_eq!(payment["realm"], "shop.example");
    assert!(payment["reference"].as_str().is_some_and(|r| r.starts_with("pi_")), "{payment}");
    assert!(payment["receipt"]["signature"].is_string(), "a signed spendcap receipt: {payment}");

    // The money: the shop charged 10 cents once, the ledger settled 0.10 USD, nothing held.
    assert_eq!(charged_cents(&world.stripe), 10);
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(PRICE_MICROS), Some(0)));

    // The token was minted bounded to the held amount, its currency, the shop's network, and
    // the credential the shop got reads back with the official parser and carries that token.
    let tokens = world.stripe.tokens.lock().expect("lock").clone();
    assert_eq!(tokens.len(), 1);
    let (spt, limits) = tokens.values().next().expect("one token");
    assert_eq!(limits["usage_limits[max_amount]"], "10");
    assert_eq!(limits["usage_limits[currency]"], "usd");
    assert_eq!(limits["seller_details[network_id]"], "net_shop");
    assert_eq!(limits["payment_method"], "pm_card_visa");
    let credentials = world.shop.credentials.lock().expect("lock").clone();
    assert_eq!(credentials.len(), 1);
    let credential = ::mpp::parse_authorization(&credentials[0]).expect("a valid credential");
    assert_eq!(credential.payload["spt"], spt.as_str());
    assert_eq!(credential.challenge.method.as_str(), "stripe");

    // The log: one hold and one settle under protocol mpp.
    let log = world.app.log().await;
    let mine: Vec<&Value> = log.iter().filter(|e| e["agent"] == agent.id.as_str()).collect();
    let events: Vec<&str> = mine.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(events.iter().filter(|e| **e == "hold").count(), 1, "{mine:?}");
    assert_eq!(events.iter().filter(|e| **e == "settle").count(), 1, "{mine:?}");
    let hold = mine.iter().find(|e| e["event"] == "hold").expect("the hold");
    assert_eq!(hold["protocol"], "mpp", "{hold}");

    // An unpaid answer passes through, nothing held.
    let (status, body) = world
        .app
        .agent_call(
            &agent.token,
            Method::POST,
            "/v1/mpp/fetch",
            Some(json!({"url": format!("{}/free", world.shop_url)})),
        )
        .await;
    assert_eq!((status, body["payment"].clone()), (200, Value::Null), "{body}");

    // The proxy form pays the same way.
    let response = world
        .app
        .http
        .get(world.app.url(&format!("/v1/mpp/proxy/{}/paid", world.shop_url)))
        .bearer_auth(&agent.token)
        .header("x-spendcap-task", "proxy")
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-spendcap-payment"], "settled");
    assert_eq!(response.headers()["x-spendcap-amount-micros"], PRICE_MICROS.to_string().as_str());
    assert!(response.headers().contains_key("payment-receipt"));
    assert_eq!(response.text().await.expect("body"), "the paid content");
    assert_eq!(charged_cents(&world.stripe), 20);
    let balance = me(&world.app, &agent.token).await;
    assert_eq!(balance["spent_micros"].as_u64(), Some(2 * PRICE_MICROS));
}

#[tokio::test]
async fn cap_and_maximum_refusals_and_a_revoked_agent_get_no_token_minted_and_nothing_sent() {
    let world = world().await;
    let poor = world.app.create_agent("mpp-poor", 50_000, None).await;
    let (status, body) = fetch(&world, &poor.token, None, None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("cap_exceeded")), "{body}");
    let (status, body) = {
        let rich = world.app.create_agent("mpp-careful", 1_000_000, None).await;
        fetch(&world, &rich.token, None, Some(50_000)).await
    };
    assert_eq!((status, body["code"].as_str()), (402, Some("mpp_over_payment_maximum")), "{body}");
    assert_eq!(body["requested_micros"], PRICE_MICROS, "{body}");

    let revoked = world.app.create_agent("mpp-revoked", 1_000_000, None).await;
    let (status, _) = world
        .app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", revoked.id), Some(json!({"reason": "test"})))
        .await;
    assert_eq!(status, 200);
    let (status, body) = fetch(&world, &revoked.token, None, None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");

    // Controls: an agent denied the mpp protocol is refused before anything is fetched.
    let no_mpp = world.app.create_agent("mpp-denied", 1_000_000, None).await;
    let (status, shown) = world
        .app
        .admin(
            Method::PUT,
            &format!("/v1/agents/{}/controls", no_mpp.id),
            Some(json!({"protocols": {"deny": ["mpp"]}})),
        )
        .await;
    assert_eq!(status, 200, "{shown}");
    let (status, body) = fetch(&world, &no_mpp.token, None, None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("protocol_denied")), "{body}");

    // No token was minted, no credential reached the shop, nothing was charged.
    assert_eq!(world.stripe.mint_requests.load(Ordering::SeqCst), 0);
    assert!(world.shop.credentials.lock().expect("lock").is_empty());
    assert_eq!(charged_cents(&world.stripe), 0);
    assert_eq!(me(&world.app, &poor.token).await["held_micros"].as_u64(), Some(0));
}

#[tokio::test]
async fn a_lost_answer_stays_held_and_a_retry_resends_the_same_credential_and_settles_once() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-retry", 1_000_000, None).await;
    world.shop.hang_once.store(true, Ordering::SeqCst);
    let (status, body) = fetch(&world, &agent.token, Some("lost-1"), None).await;
    assert_eq!(body["code"], "mpp_payment_outcome_unknown", "{body}");
    assert!(status == 504 || status == 502, "{status} {body}");
    // The shop charged; the daemon does not know: the amount stays held (unknown), not spent.
    assert_eq!(charged_cents(&world.stripe), 10);
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(PRICE_MICROS)));
    let (status, unknown) = world.app.admin(Method::GET, "/v1/holds?state=unknown", None).await;
    assert_eq!(status, 200);
    assert!(unknown.to_string().contains(body["hold_id"].as_str().expect("hold id")), "{unknown}");

    // The same key: the same token (the PSP's idempotency), the same credential, one charge.
    let (status, body) = fetch(&world, &agent.token, Some("lost-1"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["payment"]["status"], "settled");
    let credentials = world.shop.credentials.lock().expect("lock").clone();
    assert_eq!(credentials.len(), 2);
    assert_eq!(credentials[0], credentials[1], "the retry re-sends the very same credential");
    assert_eq!(world.stripe.tokens.lock().expect("lock").len(), 1, "one token for one purchase");
    assert_eq!(charged_cents(&world.stripe), 10, "charged once");
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(PRICE_MICROS), Some(0)));

    // A third request with the key replays the stored answer; nothing is sent again.
    let (status, body) = fetch(&world, &agent.token, Some("lost-1"), None).await;
    assert_eq!((status, body["replayed"].as_bool()), (200, Some(true)), "{body}");
    assert_eq!(world.shop.credentials.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_settle_at_most_once() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-race", 1_000_000, None).await;
    let attempts = (0..6).map(|_| fetch(&world, &agent.token, Some("race-1"), None));
    let answers = futures::future::join_all(attempts).await;
    let paid = answers.iter().filter(|(status, body)| *status == 200 && body["payment"]["status"] == "settled").count();
    assert!(paid >= 1, "{answers:?}");
    for (status, body) in &answers {
        assert!(*status == 200 || body["code"] == "idempotency_in_flight", "{status} {body}");
    }
    assert_eq!(charged_cents(&world.stripe), 10, "charged once");
    assert_eq!(world.stripe.tokens.lock().expect("lock").len(), 1);
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(PRICE_MICROS), Some(0)));
}

#[tokio::test]
async fn the_credentials_sent_are_recorded_and_read_back_by_the_official_parser() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-conform", 1_000_000, None).await;
    let (status, body) = fetch(&world, &agent.token, None, None).await;
    assert_eq!(status, 200, "{body}");
    let folder = mpp_conformance_dir().join("mpp").join("PaymentCredential");
    let mut checked = 0;
    for entry in std::fs::read_dir(&folder).expect("credentials recorded") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        let mut recorded: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(recorded["authorization_scheme"], "Payment");
        assert!(recorded["payload"]["spt"].as_str().is_some_and(|s| s.starts_with("spt_*")), "the token is masked");
        if let Value::Object(map) = &mut recorded {
            map.remove("authorization_scheme");
        }
        let credential: ::mpp::PaymentCredential =
            serde_json::from_value(recorded).expect("the official type reads it");
        let header = ::mpp::format_authorization(&credential).expect("formats");
        ::mpp::parse_authorization(&header).expect("and parses back");
        checked += 1;
    }
    assert!(checked >= 1);
}

/// The mission's sum check for MPP: what the simulated shop charged equals what the ledger settled.
#[tokio::test]
async fn the_simulated_shop_charged_what_the_ledger_settled() {
    let providers = spendcap::sim::Providers::start().await.expect("simulated providers");
    let protocols = providers.protocol_config().expect("configuration for the providers");
    let app = spawn_app_with(AppOptions { protocols, ..Default::default() }).await;
    let agent = app.create_agent("mpp-sim", 1_000_000, None).await;
    for i in 0..3 {
        let url = format!("{}/data?i={i}", providers.mpp.base());
        let (status, body) =
            app.agent_call(&agent.token, Method::POST, "/v1/mpp/fetch", Some(json!({"url": url, "task": "sum"}))).await;
        assert_eq!((status, body["payment"]["status"].as_str()), (200, Some("settled")), "{body}");
    }
    // A repeated purchase is replayed, not paid again.
    let url = format!("{}/data?i=0", providers.mpp.base());
    let (status, body) =
        app.agent_call(&agent.token, Method::POST, "/v1/mpp/fetch", Some(json!({"url": url, "task": "sum"}))).await;
    assert_eq!((status, body["replayed"].as_bool()), (200, Some(true)), "{body}");
    let charged = providers.mpp.charged_micros();
    assert_eq!(charged, 3 * spendcap::sim::MPP_PRICE_CENTS * 10_000);
    let balance = me(&app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(charged), Some(0)));
}

#[tokio::test]
async fn a_declined_credential_stays_held_until_its_token_expires_and_no_token_means_no_hold() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-declined", 1_000_000, None).await;
    world.stripe.decline.store(true, Ordering::SeqCst);
    let (status, body) = fetch(&world, &agent.token, Some("declined-1"), None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("mpp_payment_rejected")), "{body}");
    // The token was sent: it could still be charged until it expires, so its hold stays.
    assert_eq!(charged_cents(&world.stripe), 0);
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(PRICE_MICROS)));
    let held_until = body["held_until_ms"].as_u64().expect("held until");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as u64;
    assert!(held_until > now_ms && held_until <= now_ms + 301_000, "{held_until} vs {now_ms}");
    let notes: Vec<Value> = world.app.log().await.into_iter().filter(|e| e["event"] == "note").collect();
    assert!(notes.iter().any(|e| e.to_string().contains("mpp_payment_rejected")), "{notes:?}");

    // A PSP that does not answer: no token exists, nothing is sent, the hold is voided.
    let world = world_with(Some("http://127.0.0.1:1".to_owned())).await;
    let agent = world.app.create_agent("mpp-no-psp", 1_000_000, None).await;
    let (status, body) = fetch(&world, &agent.token, None, None).await;
    assert_eq!((status, body["code"].as_str()), (502, Some("mpp_psp_unreachable")), "{body}");
    assert!(world.shop.credentials.lock().expect("lock").is_empty());
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(0), Some(0)));
}

#[tokio::test]
async fn a_receipt_reporting_less_settles_that_and_one_reporting_more_settles_the_hold() {
    let world = world().await;
    let agent = world.app.create_agent("mpp-reported", 1_000_000, None).await;
    *world.shop.reported_amount.lock().expect("lock") = Some("7".to_owned());
    let (status, body) = fetch(&world, &agent.token, Some("less"), None).await;
    assert_eq!((status, body["payment"]["amount_micros"].as_u64()), (200, Some(70_000)), "{body}");
    let balance = me(&world.app, &agent.token).await;
    assert_eq!((balance["spent_micros"].as_u64(), balance["held_micros"].as_u64()), (Some(70_000), Some(0)));
    *world.shop.reported_amount.lock().expect("lock") = Some("50".to_owned());
    let (status, body) = fetch(&world, &agent.token, Some("more"), None).await;
    assert_eq!((status, body["payment"]["amount_micros"].as_u64()), (200, Some(PRICE_MICROS)), "{body}");
    let balance = me(&world.app, &agent.token).await;
    assert_eq!(balance["spent_micros"].as_u64(), Some(70_000 + PRICE_MICROS));
}
