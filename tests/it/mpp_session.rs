//! MPP `session` over `tempo` end to end: a real daemon on a real Redis paying the simulated
//! session server (`sim::mpp::MppSessionShop`, over real HTTP), which verifies every voucher's
//! EIP-712 signature, the deposit, the HMAC-bound challenge and that each voucher pays the price.
//! The deposit is one hold; each accepted voucher settles its increment; a close settles what
//! was vouched and releases the rest.

use std::time::Duration;

use adapters::conformance::ConformanceSink;
use adapters::mpp::session::{recover, voucher_digest, SessionPayload, B256, TEMPO_CHAIN_ID};
use adapters::x402::{Address, EvmSigner};
use reqwest::Method;
use serde_json::{json, Value};
use spendcap::protocols::mpp::MppConfig;
use spendcap::protocols::ProtocolConfig;
use spendcap::sim::mpp::{MppSessionShop, SESSION_ESCROW};

use crate::support::{spawn_app_with, AppOptions, TestApp};

const PRICE: u64 = 30_000;
const DEPOSIT: u64 = 100_000;
const KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

struct World {
    app: TestApp,
    shop: MppSessionShop,
}

async fn world() -> World {
    let shop = MppSessionShop::start(PRICE, DEPOSIT).await.expect("the session server starts");
    let mpp = MppConfig {
        tempo_signer: Some(EvmSigner::from_hex(KEY).expect("key")),
        allow_private: vec!["127.0.0.1".parse().expect("address")],
        timeout: Duration::from_millis(2_000),
        conformance: ConformanceSink::to_dir(ConformanceSink::test_dir().with_file_name("conformance-mpp")),
        ..MppConfig::default()
    };
    let app =
        spawn_app_with(AppOptions { protocols: ProtocolConfig { mpp, ..Default::default() }, ..Default::default() })
            .await;
    World { app, shop }
}

async fn fetch(world: &World, token: &str, key: Option<&str>) -> (u16, Value) {
    let body = json!({ "url": format!("{}/stream", world.shop.base()), "task": "stream" });
    let mut request = world.app.http.post(world.app.url("/v1/mpp/fetch")).bearer_auth(token).json(&body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json"))
}

/// The agent's spent and held micros.
async fn money(app: &TestApp, agent: &str) -> (u64, u64) {
    let shown = app.show(agent).await;
    (shown["spent_micros"].as_u64().expect("spent"), shown["held_micros"].as_u64().expect("held"))
}

fn payload(credential: &str) -> SessionPayload {
    let credential = ::mpp::parse_authorization(credential).expect("the official parser reads it");
    assert_eq!((credential.challenge.method.as_str(), credential.challenge.intent.as_str()), ("tempo", "session"));
    serde_json::from_value(credential.payload).expect("a session payload")
}

#[tokio::test]
async fn a_session_holds_the_deposit_settles_each_voucher_and_closes_for_what_was_vouched() {
    let world = world().await;
    let agent = world.app.create_agent("session-buyer", 1_000_000, None).await;
    for n in 1..=3u64 {
        let (status, body) = fetch(&world, &agent.token, Some(&format!("chunk-{n}"))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["payment"]["status"], "settled", "{body}");
        assert_eq!(
            (body["payment"]["method"].as_str(), body["payment"]["intent"].as_str()),
            (Some("tempo"), Some("session"))
        );
        assert_eq!(body["payment"]["amount_micros"], PRICE);
        // The whole deposit is held from the start; each voucher moved its price to spent.
        assert_eq!(money(&world.app, &agent.id).await, (n * PRICE, DEPOSIT - n * PRICE));
    }
    // The fourth does not fit the deposit (90k + 30k > 100k): the channel closes for what was
    // vouched (the last 10k released) and a new one opens with its own deposit.
    let (status, body) = fetch(&world, &agent.token, Some("chunk-4")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(money(&world.app, &agent.id).await, (4 * PRICE, DEPOSIT - PRICE));
    assert_eq!(world.shop.channels(), 2);
    // What the server can redeem is exactly what the ledger settled.
    assert_eq!(world.shop.charged_micros(), 4 * PRICE);

    // The credentials: an open, then cumulative vouchers signed by the daemon's key for this
    // channel, chain and escrow.
    let credentials = world.shop.credentials();
    assert_eq!(credentials.len(), 4);
    let payer = EvmSigner::from_hex(KEY).expect("key").address();
    let escrow: Address = SESSION_ESCROW.parse().expect("escrow");
    let SessionPayload::Open { channel_id, cumulative_amount, authorized_signer, .. } = payload(&credentials[0]) else {
        panic!("the first credential opens the channel")
    };
    assert_eq!((cumulative_amount.as_str(), authorized_signer.parse::<Address>().ok()), ("30000", Some(payer)));
    let SessionPayload::Voucher { channel_id: second, cumulative_amount, signature } = payload(&credentials[2]) else {
        panic!("then vouchers")
    };
    assert_eq!((second.as_str(), cumulative_amount.as_str()), (channel_id.as_str(), "90000"));
    let id: B256 = channel_id.parse().expect("channel id");
    assert_eq!(recover(&voucher_digest(id, 90_000, escrow, TEMPO_CHAIN_ID), &signature), Some(payer));
    assert!(matches!(payload(&credentials[3]), SessionPayload::Open { .. }), "a new channel");

    // The log: two holds (the deposits), four part settles, one close (settle 0, release 10k).
    let log = world.app.log().await;
    let mine: Vec<&Value> = log.iter().filter(|e| e["agent"] == agent.id.as_str()).collect();
    let count = |event: &str| mine.iter().filter(|e| e["event"] == event).count();
    assert_eq!((count("hold"), count("psettle"), count("settle")), (2, 4, 1), "{mine:?}");
    let close = mine.iter().find(|e| e["event"] == "settle").expect("the close");
    assert_eq!((close["amount"].as_u64(), close["released"].as_u64()), (Some(0), Some(10_000)), "{close}");
}

#[tokio::test]
async fn a_session_is_refused_before_any_deposit_beyond_the_cap_and_nothing_is_sent() {
    let world = world().await;
    let poor = world.app.create_agent("session-poor", DEPOSIT - 1, None).await;
    let (status, body) = fetch(&world, &poor.token, None).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("cap_exceeded")), "{body}");
    assert!(world.shop.credentials().is_empty(), "nothing was signed or sent");
    assert_eq!(money(&world.app, &poor.id).await, (0, 0));
}

#[tokio::test]
async fn revocation_mid_session_sends_nothing_more_and_closes_the_channel_for_what_was_vouched() {
    let world = world().await;
    let agent = world.app.create_agent("session-revoked", 1_000_000, None).await;
    for key in ["a", "b"] {
        let (status, body) = fetch(&world, &agent.token, Some(key)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(money(&world.app, &agent.id).await, (2 * PRICE, DEPOSIT - 2 * PRICE));
    let (status, _) = world
        .app
        .admin(Method::POST, &format!("/v1/agents/{}/revoke", agent.id), Some(json!({"reason": "test"})))
        .await;
    assert_eq!(status, 200);
    let (status, body) = fetch(&world, &agent.token, Some("c")).await;
    assert_eq!((status, body["code"].as_str()), (402, Some("agent_revoked")), "{body}");
    assert_eq!(world.shop.credentials().len(), 2, "no voucher after the revocation");
    // The channel closed for what was vouched: the rest of the deposit is back.
    assert_eq!(money(&world.app, &agent.id).await, (2 * PRICE, 0));
    assert_eq!(world.shop.charged_micros(), 2 * PRICE);
}

#[tokio::test]
async fn a_retry_with_the_same_key_resends_the_same_voucher_and_settles_once() {
    let world = world().await;
    let agent = world.app.create_agent("session-retry", 1_000_000, None).await;
    for _ in 0..2 {
        let (status, body) = fetch(&world, &agent.token, Some("same")).await;
        assert_eq!(status, 200, "{body}");
    }
    let credentials = world.shop.credentials();
    assert_eq!(credentials.len(), 2);
    assert_eq!(payload(&credentials[0]), payload(&credentials[1]), "the very same voucher");
    assert_eq!(money(&world.app, &agent.id).await, (PRICE, DEPOSIT - PRICE));
    assert_eq!(world.shop.charged_micros(), PRICE);
}

#[tokio::test]
async fn a_lost_answer_keeps_the_voucher_counted_and_a_retry_settles_it_once() {
    let world = world().await;
    let agent = world.app.create_agent("session-lost", 1_000_000, None).await;
    world.shop.hang_next();
    let (status, body) = fetch(&world, &agent.token, Some("lost")).await;
    assert_eq!(body["code"], "mpp_payment_outcome_unknown", "{status} {body}");
    // Nothing released: the whole deposit (the voucher included) stays counted, and the hold
    // never lapses while its outcome is unknown.
    assert_eq!(money(&world.app, &agent.id).await, (0, DEPOSIT));
    let hold = body["hold_id"].as_str().expect("hold id");
    let log = world.app.log().await;
    assert!(log.iter().any(|e| e["event"] == "unknown" && e["hold"] == hold), "{log:?}");
    let (status, body) = fetch(&world, &agent.token, Some("lost")).await;
    assert_eq!(status, 200, "{body}");
    let credentials = world.shop.credentials();
    assert_eq!(payload(&credentials[0]), payload(&credentials[1]), "the same voucher again");
    assert_eq!(money(&world.app, &agent.id).await, (PRICE, DEPOSIT - PRICE));
    assert_eq!(world.shop.charged_micros(), PRICE);
}
